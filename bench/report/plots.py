"""The figures of ``moe-bench report``, drawn from run records.

Every function writes ``<stem>.png`` (matplotlib, Agg, no display) and ``<stem>.html`` (plotly,
interactive) into ``out_dir`` and returns those paths. The HTML files load ``plotly.min.js`` from
their own folder (``include_plotlyjs="directory"``), so a folder of plots shares one copy and opens
offline. Only records with status "finished" count; a record missing the values a figure needs is
left out of that figure, and when nothing is left the function writes nothing and returns [].

Records are grouped into arms by ``record.extra["arm"]`` (falling back to the run name, family or
id), each arm keeps one colour in every figure, and seeds are summarised as the mean with its 95%
Student-t interval (``bench.report.stats``, the same as the claims; one seed: no error bar).
"""
from __future__ import annotations

import math
import statistics

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.report.stats import (curve_xy as _curve_xy, finite as _num, mean_curve, mean_interval, paired_gap_band,
                                speedup_to_target)
from bench.tracking.records import RunRecord

X_AXES = ("flops", "step", "tokens", "seconds")
X_LABELS = {"flops": "training FLOPs", "step": "training step", "tokens": "training tokens",
            "seconds": "training time (s)"}
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")  # matplotlib tab10, so PNG and HTML colours match
DPI = 150
PLOTLY_TEMPLATE = "plotly_white"


# ----------------------------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------------------------

def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _finished(records: Iterable[RunRecord | None]) -> list[RunRecord]:
    return [r for r in records or () if isinstance(r, RunRecord) and r.status == "finished"]


def arm_of(record: RunRecord) -> str:
    """The arm label of a record: ``extra["arm"]``, else its name, family or run id."""
    extra = record.extra if isinstance(record.extra, dict) else {}
    return str(extra.get("arm") or record.name or record.family or record.run_id)


def _by_arm(records: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    """Records grouped by arm, arms in order of first appearance."""
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[arm_of(r)].append(r)
    return dict(groups)


def _colors(records: Sequence[RunRecord]) -> dict[str, str]:
    """One colour per arm, by order of first appearance among all finished records, so an arm
    keeps its colour in every figure made from the same records."""
    return {arm: PALETTE[i % len(PALETTE)] for i, arm in enumerate(_by_arm(records))}


def _family(record: RunRecord) -> str:
    return str(_get(record.config, "model", "family") or record.family or "")


def _num_experts(record: RunRecord) -> int | None:
    e = _num(_get(record.config, "model", "moe", "num_experts"))
    return int(e) if e is not None and e >= 1 else None


_INVALID = object()


def _capacity(record: RunRecord) -> Any:
    """``config.model.moe.capacity_factor``: a positive float, None (dropless), or _INVALID when
    the record has no MoE config or an unusable value."""
    moe = _get(record.config, "model", "moe")
    if not isinstance(moe, dict) or "capacity_factor" not in moe:
        return _INVALID
    cf = moe["capacity_factor"]
    if cf is None:
        return None
    return _num(cf) if _num(cf) is not None and _num(cf) > 0 else _INVALID


def _interval(values: Iterable[float | None]) -> tuple[float, float, float] | None:
    """(mean, low, high) of the finite values with a 95% t interval (one value: low = high =
    mean, drawn without a bar), or None when there are none."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    mean, low, high, _ = mean_interval(xs)
    return (mean, low, high) if len(xs) > 1 else (mean, mean, mean)


# ----------------------------------------------------------------------------------------------
# Drawing helpers
# ----------------------------------------------------------------------------------------------

def _figure(width: float, height: float, ncols: int = 1):
    """A matplotlib Figure and its axes, with no pyplot (so no global state, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"the report's PNG plots need matplotlib: pip install 'matplotlib>=3.7' ({e})") from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, chosen here rather than through pyplot's global backend
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.set_axisbelow(True)
    return fig, (axes if ncols > 1 else axes[0])


def _go():
    try:
        import plotly.graph_objects as go
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"the report's HTML plots need plotly: pip install plotly ({e})") from None
    return go


def _wrap_titles(fig) -> None:
    """Long titles (a plan's title with its paper reference and budget) on two lines, not cut off
    at the figure's edge: about 7.5 characters per inch of figure width at the title's font size."""
    import textwrap

    width = max(20, int(fig.get_figwidth() * 7.5))
    for ax in fig.axes:
        title = ax.get_title()
        if len(title) > width:
            ax.set_title(textwrap.fill(title, width))
    suptitle = getattr(fig, "_suptitle", None)
    if suptitle is not None and len(suptitle.get_text()) > width:
        suptitle.set_text(textwrap.fill(suptitle.get_text(), width))


def _legend_outside(ax) -> None:
    """The legend right of the axes, never over a curve (constrained layout makes room for it)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _save(fig, pfig, out_dir: Path, stem: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, html = out_dir / f"{stem}.png", out_dir / f"{stem}.html"
    _wrap_titles(fig)
    fig.savefig(png, dpi=DPI)
    pfig.update_layout(template=PLOTLY_TEMPLATE)
    # A fixed div id (plotly's default is a random uuid) keeps a regenerated report's unchanged plots
    # byte-identical, so a commit of the report shows only the figures whose data changed.
    pfig.write_html(html, include_plotlyjs="directory", full_html=True, config={"displaylogo": False},
                    div_id=f"plot-{stem}")
    return [png, html]


def _fmt_count(x: float) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _fmt_g(x: float) -> str:
    return f"{x:g}"


def _declutter(fig, ax, annotations: list, pad_px: float = 2.0) -> None:
    """Move text labels (offset annotations) so none overlaps another or leaves the axes on the
    right: a label that would stick out goes to the left of its point, then overlapping labels
    are pushed down, top to bottom. Works in display pixels; offsets are in points."""
    if not annotations:
        return
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    to_pt = 72.0 / fig.dpi
    for ann in annotations:
        if ann.get_window_extent(renderer).x1 > axes_box.x1:
            dx, dy = ann.xyann
            ann.xyann = (-abs(dx), dy)
            ann.set_horizontalalignment("right")
    placed = []
    for ann in sorted(annotations, key=lambda a: -a.get_window_extent(renderer).y1):
        box = ann.get_window_extent(renderer)
        for _ in range(len(annotations)):
            hits = [b for b in placed if box.x0 < b.x1 and b.x0 < box.x1 and box.y0 < b.y1 and b.y0 < box.y1]
            if not hits:
                break
            shift = box.y1 - min(b.y0 for b in hits) + pad_px  # pixels to move down
            dx, dy = ann.xyann
            ann.xyann = (dx, dy - shift * to_pt)
            box = box.translated(0, -shift)
        placed.append(box)


# ----------------------------------------------------------------------------------------------
# 1. Learning curves
# ----------------------------------------------------------------------------------------------

def learning_curves(records: Sequence[RunRecord], out_dir: Path, stem: str, title: str,
                    x: str = "flops") -> list[Path]:
    """Validation loss vs ``x`` ("flops", "step", "tokens" or "seconds") from ``record.curve``:
    one colour per arm, a thin line per seed and a thick line for the arm's mean over seeds at the
    x values all its seeds evaluated at (a single-seed arm's line is drawn thick). Log-x for
    FLOPs (points at x <= 0 are left out there)."""
    if x not in X_AXES:
        raise ValueError(f"x={x!r} is not allowed: expected one of {', '.join(X_AXES)}")
    runs = _finished(records)
    colors = _colors(runs)
    arms: dict[str, list[tuple[RunRecord, list[tuple[float, float]]]]] = {}
    for arm, rs in _by_arm(runs).items():
        seeds = [(r, [(px, y) for px, y in _curve_xy(r.curve, x) if x != "flops" or px > 0]) for r in rs]
        seeds = [(r, s) for r, s in seeds if s]
        if seeds:
            arms[arm] = seeds
    if not arms:
        return []

    go = _go()
    fig, ax = _figure(7.5, 4.6)
    pfig = go.Figure()
    finals = []
    for arm, seeds in arms.items():
        color = colors[arm]
        mean = mean_curve([s for _, s in seeds]) if len(seeds) > 1 else []
        if len(mean) < 2:
            mean = []
        # thin seed lines under a thick mean; without a mean (one seed, or seeds evaluated at
        # different x, as with x="seconds") the seed lines themselves carry the arm
        width, alpha = (0.9, 0.45) if mean else (2.0, 1.0) if len(seeds) == 1 else (1.4, 0.85)
        for i, (r, s) in enumerate(seeds):
            xs, ys = [p[0] for p in s], [p[1] for p in s]
            label = arm if (not mean and i == 0) else None
            ax.plot(xs, ys, color=color, linewidth=width, alpha=alpha, label=label)
            pfig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines", name=f"{arm} (seed {r.seed})" if len(seeds) > 1 else arm,
                legendgroup=arm, showlegend=not mean,
                line={"color": color, "width": width + 0.5}, opacity=alpha,
                hovertemplate=f"{arm} seed {r.seed}<br>{x} %{{x:.4g}}<br>val loss %{{y:.4f}}<extra></extra>"))
            finals.append(ys[-1])
        if mean:
            xs, ys = [p[0] for p in mean], [p[1] for p in mean]
            ax.plot(xs, ys, color=color, linewidth=2.2, label=f"{arm} (mean of {len(seeds)})")
            pfig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines", name=f"{arm} (mean of {len(seeds)})", legendgroup=arm,
                line={"color": color, "width": 3},
                hovertemplate=f"{arm} mean<br>{x} %{{x:.4g}}<br>val loss %{{y:.4f}}<extra></extra>"))

    # The first evaluations (loss near log(vocab)) would squeeze the part where arms differ: show
    # from the best loss up to 4x the spread of the final losses above it, and start the x axis
    # where the first line enters that window. The HTML starts the same (double-click: everything).
    all_series = [s for seeds in arms.values() for _, s in seeds]
    lo, top = min(y for s in all_series for _, y in s), max(finals)
    first = max(s[0][1] for s in all_series)
    y_hi = min(first, top + 3 * max(top - lo, 0.02 * abs(top)))
    y_lo = lo - 0.05 * (y_hi - lo)
    y_hi += 0.03 * (y_hi - lo)
    x_lo = min(s[max(0, next((i for i, (_, y) in enumerate(s) if y <= y_hi), 0) - 1)][0] for s in all_series)
    x_hi = max(s[-1][0] for s in all_series)
    if y_hi > y_lo:
        ax.set_ylim(y_lo, y_hi)
        pfig.update_yaxes(range=[y_lo, y_hi])
    if x_hi > x_lo and x == "flops":
        ax.set_xlim(x_lo, x_hi * 1.05)
        pfig.update_xaxes(range=[math.log10(x_lo), math.log10(x_hi * 1.05)])  # plotly log ranges are log10
    elif x_hi > x_lo:
        ax.set_xlim(x_lo, x_hi + 0.02 * (x_hi - x_lo))
        pfig.update_xaxes(range=[x_lo, x_hi + 0.02 * (x_hi - x_lo)])
    if x == "flops":
        ax.set_xscale("log")
    elif x == "tokens":
        from matplotlib.ticker import FuncFormatter
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_count(v) if v else "0"))
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    _legend_outside(ax)
    pfig.update_layout(title=title, xaxis_title=X_LABELS[x], yaxis_title="validation loss",
                       xaxis_type="log" if x == "flops" else "linear", hovermode="closest")
    return _save(fig, pfig, out_dir, stem)


# ----------------------------------------------------------------------------------------------
# 2. Quality vs active parameters
# ----------------------------------------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (active params, quality) points that no other point beats on both (fewer or equal
    params and higher or equal quality), sorted by params."""
    front: list[tuple[float, float]] = []
    for p, q in sorted(points, key=lambda pq: (pq[0], -pq[1])):
        if not front or q > front[-1][1]:
            front.append((p, q))
    return front


def quality_vs_active_params(records: Sequence[RunRecord], out_dir: Path, stem: str, title: str) -> list[Path]:
    """Final quality (mean over seeds, 95% interval error bars) vs active parameters (log-x), one
    labelled point per arm, and the Pareto front (max quality, min active params) as a step line."""
    runs = _finished(records)
    colors = _colors(runs)
    points = []  # (arm, active, mean, lo, hi, n)
    for arm, rs in _by_arm(runs).items():
        pairs = [(_num(r.params.get("active", r.params.get("total"))) if isinstance(r.params, dict) else None,
                  _num(_get(r.metrics, "quality"))) for r in rs]
        pairs = [(a, q) for a, q in pairs if a is not None and a > 0 and q is not None]
        if pairs:
            active = sum(a for a, _ in pairs) / len(pairs)
            mean, lo, hi = _interval(q for _, q in pairs)
            points.append((arm, active, mean, lo, hi, len(pairs)))
    if not points:
        return []

    # Arms with (nearly) the same active params, e.g. capacity factors of one model, are spread
    # a little along x so their error bars stay apart; labels (in the arm's colour) go right of
    # each such cluster, ordered like the points.
    actives = [p[1] for p in points]
    narrow = max(actives) / min(actives) < 3
    log_range = math.log10(max(actives) / min(actives)) + (2 * math.log10(1.6) if narrow else 0.0)
    step = 10 ** (0.012 * log_range)  # about 1% of the axis width
    shown: dict[str, float] = {}  # arm -> x drawn
    anchor: dict[str, float] = {}  # arm -> x its label starts from
    cluster: list[tuple[str, float]] = []
    for arm, active in sorted(((p[0], p[1]) for p in points), key=lambda t: t[1]) + [("", math.inf)]:
        if cluster and active > cluster[0][1] * 1.02:
            k = len(cluster)
            for i, (c_arm, c_active) in enumerate(cluster):
                shown[c_arm] = c_active * step ** (i - (k - 1) / 2)
            for c_arm, _ in cluster:
                anchor[c_arm] = max(shown[c] for c, _ in cluster)
            cluster = []
        cluster.append((arm, active))

    go = _go()
    fig, ax = _figure(7.5, 4.8)
    pfig = go.Figure()
    front = pareto_front([(p[1], p[2]) for p in points])
    front_xy = [(next(shown[p[0]] for p in points if p[1] == a and p[2] == q), q) for a, q in front]
    if len(front) > 1:
        ax.plot([p for p, _ in front_xy], [q for _, q in front_xy], drawstyle="steps-post", color="0.5",
                linestyle="--", linewidth=1.2, zorder=1, label="Pareto front")
        pfig.add_trace(go.Scatter(x=[p for p, _ in front_xy], y=[q for _, q in front_xy], mode="lines",
                                  line={"shape": "hv", "dash": "dash", "color": "gray"}, name="Pareto front",
                                  hoverinfo="skip"))
    labels = []
    for arm, active, mean, lo, hi, n in points:
        ax.errorbar([shown[arm]], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", color=colors[arm],
                    markersize=7, capsize=4, zorder=3)
        labels.append(ax.annotate(arm, (anchor[arm], mean), xytext=(9, 0), textcoords="offset points",
                                  ha="left", va="center", fontsize=8.5, color=colors[arm],
                                  bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}))
        pfig.add_trace(go.Scatter(
            x=[shown[arm]], y=[mean], mode="markers", name=arm, marker={"color": colors[arm], "size": 10},
            error_y={"type": "data", "symmetric": False, "array": [hi - mean], "arrayminus": [mean - lo]},
            hovertemplate=(f"{arm}<br>active params {_fmt_count(active)}<br>quality %{{y:.4f}} "
                           f"(min {lo:.4f}, max {hi:.4f}, {n} seed{'s' * (n > 1)})<extra></extra>")))
    from matplotlib.ticker import FuncFormatter
    ax.set_xscale("log")
    if narrow:  # less than half a decade: keep the points off the edges, label the minor ticks too
        ax.set_xlim(min(actives) / 1.6, max(actives) * 1.6)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: _fmt_count(v)))
        ax.tick_params(axis="x", which="minor", labelsize=8)
    else:
        ax.margins(x=0.12)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.margins(y=0.15)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_count(v)))
    ax.set_xlabel("active parameters per token")
    ax.set_ylabel("final quality (higher is better)")
    ax.set_title(title)
    if len(front) > 1:
        ax.legend(loc="lower right", fontsize=8)
    _declutter(fig, ax, labels)
    for ann, (arm, *_rest) in zip(labels, points):
        dx, dy = ann.xyann  # same offsets in the HTML (points -> CSS pixels)
        pfig.add_annotation(x=math.log10(ann.xy[0]), y=ann.xy[1], text=arm, showarrow=False,
                            xanchor="left" if dx > 0 else "right", xshift=dx * 96 / 72,
                            yshift=dy * 96 / 72, font={"size": 11, "color": colors[arm]})
    pfig.update_layout(title=title, xaxis_title="active parameters per token", xaxis_type="log",
                       yaxis_title="final quality (higher is better)")
    return _save(fig, pfig, out_dir, stem)


# ----------------------------------------------------------------------------------------------
# 3. Validation loss vs number of experts
# ----------------------------------------------------------------------------------------------

def _half_width(stats: tuple[float, float, float]) -> float:
    return (stats[2] - stats[1]) / 2


def loss_vs_experts(records: Sequence[RunRecord], out_dir: Path, stem: str, title: str,
                    baseline_label: str = "dense") -> list[Path]:
    """Mean validation loss ± its 95% interval over seeds vs number of experts (log2 x) for every arm
    other than the baseline that has ``config.model.moe.num_experts``, one line per model family
    and capacity factor;
    the baseline's mean as a dashed horizontal line with its 95% interval as a band."""
    runs = _finished(records)
    colors = _colors(runs)
    # One line per (family, capacity factor): loss vs experts with everything else equal.
    lines: dict[tuple[str, Any], list[tuple[int, float, float, str]]] = defaultdict(list)  # -> (E, mean, hr, arm)
    base = None
    for arm, rs in _by_arm(runs).items():
        if arm == baseline_label:
            base = _interval(_num(_get(r.metrics, "val_loss")) for r in rs)
            continue
        groups: dict[tuple, list[RunRecord]] = defaultdict(list)
        for r in rs:
            if _num_experts(r) is not None:
                cf = _capacity(r)
                groups[(_family(r) or arm, "?" if cf is _INVALID else cf, _num_experts(r))].append(r)
        for (family, cf, e), ers in groups.items():
            stats = _interval(_num(_get(r.metrics, "val_loss")) for r in ers)
            if stats:
                lines[(family, cf)].append((e, stats[0], _half_width(stats), arm))
    if not lines:
        return []
    def name(family: str, cf: Any) -> str:
        if sum(f == family for f, _ in lines) == 1:
            return family
        return f"{family} " + ("dropless" if cf is None else "cf=?" if cf == "?" else f"cf={cf:g}")

    families = {name(*key): pts for key, pts in lines.items()}

    go = _go()
    fig, ax = _figure(7.0, 4.5)
    pfig = go.Figure()
    line_color = {name: colors[pts[0][3]] for name, pts in families.items()}  # its first arm's colour
    experts = sorted({p[0] for pts in families.values() for p in pts})
    if base is not None:
        mean, hr = base[0], _half_width(base)
        ax.axhline(mean, color="black", linestyle="--", linewidth=1.3, label=f"{baseline_label} (mean, 95% CI)")
        if hr > 0:
            ax.axhspan(mean - hr, mean + hr, color="black", alpha=0.08, linewidth=0)
        pfig.add_hline(y=mean, line_dash="dash", line_color="black")
        if hr > 0:
            pfig.add_hrect(y0=mean - hr, y1=mean + hr, fillcolor="black", opacity=0.08, line_width=0)
        pfig.add_trace(go.Scatter(  # a legend entry and hover values for the baseline lines
            x=[experts[0], experts[-1]], y=[mean, mean], mode="lines", name=f"{baseline_label} (mean, 95% CI)",
            line={"color": "black", "dash": "dash"},
            hovertemplate=f"{baseline_label}: {mean:.4f} ± {hr:.4f}<extra></extra>"))
    for family, pts in families.items():
        pts.sort()
        color = line_color[family]
        es, means, hrs = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
        ax.errorbar(es, means, yerr=hrs, fmt="o-", color=color, capsize=4, linewidth=1.6, label=family)
        pfig.add_trace(go.Scatter(
            x=es, y=means, mode="lines+markers", name=family, line={"color": color},
            error_y={"type": "data", "array": hrs}, text=[p[3] for p in pts],
            hovertemplate="%{text}<br>experts %{x}<br>val loss %{y:.4f}<extra></extra>"))
    ax.set_xscale("log", base=2)
    ax.set_xticks(experts, [str(e) for e in experts])
    ax.xaxis.set_minor_formatter("")
    if len(experts) == 1:
        ax.set_xlim(experts[0] / 2, experts[0] * 2)
    ax.set_xlabel("number of experts")
    ax.set_ylabel("final validation loss")
    ax.set_title(title)
    _legend_outside(ax)
    pfig.update_layout(title=title, xaxis_title="number of experts", yaxis_title="final validation loss",
                       xaxis={"type": "log", "tickvals": experts, "ticktext": [str(e) for e in experts]})
    return _save(fig, pfig, out_dir, stem)


# ----------------------------------------------------------------------------------------------
# 4. Capacity factor trade-offs
# ----------------------------------------------------------------------------------------------

def _fraction_dropped(record: RunRecord) -> float | None:
    """Mean over MoE layers of the fraction of tokens dropped (over capacity)."""
    layers = record.expert_stats if isinstance(record.expert_stats, list) else []
    values = [_num(layer.get("fraction_dropped")) for layer in layers if isinstance(layer, dict)]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


_CAPACITY_PANELS = (  # title, value(record), y scale
    ("tokens dropped (%)", lambda r: None if _fraction_dropped(r) is None else 100 * _fraction_dropped(r)),
    ("final validation loss", lambda r: _num(_get(r.metrics, "val_loss"))),
    ("training throughput (tokens/s)", lambda r: _num(_get(r.timings, "tokens_per_second"))),
)


def capacity_tradeoffs(records: Sequence[RunRecord], out_dir: Path, stem: str, title: str) -> list[Path]:
    """Three panels vs capacity factor (``config.model.moe.capacity_factor``): percentage of
    tokens dropped (mean over layers of ``expert_stats`` fraction_dropped), final validation loss
    and tokens/s, each the mean over seeds with 95% interval error bars, one line per family and
    number of experts. Dropless
    arms (capacity factor None) appear as dotted horizontal reference lines."""
    runs = [r for r in _finished(records) if isinstance(_get(r.config, "model", "moe"), dict)]
    colors = _colors(_finished(records))
    # panel -> family -> [(cf, mean, lo, hi, arm)]; panel -> [(arm, mean)] for dropless arms
    series: list[dict[str, list]] = [defaultdict(list) for _ in _CAPACITY_PANELS]
    dropless: list[list[tuple[str, float]]] = [[] for _ in _CAPACITY_PANELS]
    line_arm: dict[str, str] = {}  # line -> its first arm, whose colour it takes
    for arm, rs in _by_arm(runs).items():
        by_cf: dict[tuple, list[RunRecord]] = defaultdict(list)
        for r in rs:
            if _capacity(r) is not _INVALID:
                by_cf[(_capacity(r), _num_experts(r))].append(r)
        for (cf, experts), crs in by_cf.items():
            # one line per family and expert count: vs capacity factor with everything else equal
            name = (_family(crs[0]) or arm) + (f" E={experts}" if experts else "")
            for i, (_, value, *_rest) in enumerate(_CAPACITY_PANELS):
                stats = _interval(value(r) for r in crs)
                if stats is None:
                    continue
                if cf is None:
                    dropless[i].append((arm, stats[0]))
                else:
                    series[i][name].append((cf, *stats, arm))
                    line_arm.setdefault(name, arm)
    if not any(series):
        return []

    go = _go()
    from plotly.subplots import make_subplots
    fig, axes = _figure(13.5, 4.3, ncols=3)
    pfig = make_subplots(rows=1, cols=3, subplot_titles=[p[0] for p in _CAPACITY_PANELS])
    cfs = sorted({p[0] for panel in series for pts in panel.values() for p in pts})
    for i, (ax, (name, *_)) in enumerate(zip(axes, _CAPACITY_PANELS)):
        for family, pts in series[i].items():
            pts.sort()
            color = colors[line_arm[family]]
            xs, means = [p[0] for p in pts], [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(xs, means, yerr=err, fmt="o-", color=color, capsize=4, linewidth=1.6,
                        label=family if i == 0 else None)
            pfig.add_trace(go.Scatter(
                x=xs, y=means, mode="lines+markers", name=family, legendgroup=family, showlegend=i == 0,
                line={"color": color}, text=[p[4] for p in pts],
                error_y={"type": "data", "symmetric": False, "array": err[1], "arrayminus": err[0]},
                hovertemplate=f"%{{text}}<br>capacity factor %{{x}}<br>{name} %{{y:.4g}}<extra></extra>"),
                row=1, col=i + 1)
        for arm, mean in dropless[i]:
            ref = arm if "dropless" in arm.lower() else f"{arm} (dropless)"
            ax.axhline(mean, color=colors[arm], linestyle=":", linewidth=1.4, label=ref)
            pfig.add_trace(go.Scatter(
                x=[cfs[0], cfs[-1]], y=[mean, mean], mode="lines", name=ref, legendgroup=arm,
                showlegend=i == 0, line={"color": colors[arm], "dash": "dot"},
                hovertemplate=f"{ref}<br>{name} {mean:.4g}<extra></extra>"), row=1, col=i + 1)
        ax.set_xticks(cfs, [_fmt_g(c) for c in cfs])
        ax.set_xlabel("capacity factor")
        ax.set_title(name, fontsize=10)
        ax.margins(x=0.08, y=0.12)
        pfig.update_xaxes(title_text="capacity factor", tickvals=cfs, row=1, col=i + 1)
    axes[0].set_ylim(bottom=0)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside right upper", fontsize=8)
    fig.suptitle(title)
    pfig.update_layout(title=title)
    return _save(fig, pfig, out_dir, stem)


# ----------------------------------------------------------------------------------------------
# 5. Expert load heatmap
# ----------------------------------------------------------------------------------------------

def expert_load(record: RunRecord) -> list[tuple[int, list[float]]]:
    """(layer index, each expert's share (%) of that layer's routed tokens) per MoE layer; rows
    sum to 100. Layers without usable ``tokens_per_expert`` (missing, negative, all zero) are
    skipped."""
    rows = []
    layers = record.expert_stats if isinstance(record.expert_stats, list) else []
    for i, layer in enumerate(layers):
        counts = layer.get("tokens_per_expert") if isinstance(layer, dict) else None
        values = [_num(c) for c in counts] if isinstance(counts, list) else []
        if not values or any(v is None or v < 0 for v in values) or sum(values) <= 0:
            continue
        total = sum(values)
        rows.append((i, [100 * v / total for v in values]))
    return rows


def expert_load_heatmap(record: RunRecord, out_dir: Path, stem: str, title: str) -> list[Path]:
    """Layers x experts heatmap of each expert's share of its layer's routed tokens, on a
    diverging colour scale centred at 1/E (white = perfectly balanced, red = overloaded, blue =
    underused), with each layer's max/mean load (and dropped fraction, when known) on the right."""
    if not isinstance(record, RunRecord) or record.status != "finished":
        return []
    found = expert_load(record)
    if not found:
        return []
    layers, rows = [i for i, _ in found], [r for _, r in found]
    n_exp = max(len(r) for r in rows)
    z = [r + [math.nan] * (n_exp - len(r)) for r in rows]
    balanced = 100 / n_exp
    top = max(max(r) for r in rows)
    notes = []
    for li, r in zip(layers, rows):
        note = f"max/mean {max(r) / (100 / len(r)):.2f}"
        dropped = _num(_get(record.expert_stats[li], "fraction_dropped"))
        if dropped is not None:
            note += f", dropped {100 * dropped:.1f}%"
        notes.append(note)

    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator
    go = _go()
    width = min(15.0, max(7.0, 3.5 + 0.42 * n_exp))
    fig, ax = _figure(width, max(2.8, 1.6 + 0.42 * len(rows)))
    ax.grid(False)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=max(top, 2 * balanced))
    image = ax.imshow(z, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    if n_exp <= 16 and len(rows) <= 24:  # cell values only while they stay legible
        for i, r in enumerate(rows):
            for j, v in enumerate(r):
                ax.text(j, i, f"{v:.0f}" if v >= 10 else f"{v:.1f}", ha="center", va="center", fontsize=7.5,
                        color="white" if abs(norm(v) - 0.5) > 0.35 else "black")
    step = max(1, n_exp // 16)
    ax.set_xticks(range(0, n_exp, step))
    ax.set_yticks(range(len(rows)), [f"layer {li}" for li in layers])
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(len(rows)), notes, fontsize=8)
    right.tick_params(length=0)
    ax.set_xlabel("expert")
    ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, location="bottom", shrink=0.6, aspect=40, pad=0.02)
    bar.set_label(f"% of the layer's routed tokens (white = {balanced:.3g}% = 1/E, balanced)", fontsize=8)
    # ticks at 0 and 1/E, then evenly above (the two halves of the bar have different scales)
    above = [t for t in MaxNLocator(5).tick_values(balanced, norm.vmax)
             if balanced + 0.15 * (norm.vmax - balanced) <= t <= norm.vmax]
    bar.set_ticks([0.0, balanced, *above], labels=["0", f"{balanced:.3g}", *(f"{t:g}" for t in above)])
    bar.ax.tick_params(labelsize=8)

    pfig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_exp)), y=[f"layer {li}<br>({note})" for li, note in zip(layers, notes)],
        colorscale="RdBu_r", zmid=balanced, colorbar={"title": {"text": "% of tokens"}},
        hovertemplate="%{y}<br>expert %{x}: %{z:.2f}% of tokens<extra></extra>"))
    pfig.update_layout(title=f"{title}<br><sup>white = {balanced:.3g}% (1/E, balanced)</sup>",
                       xaxis_title="expert", yaxis={"autorange": "reversed"})
    return _save(fig, pfig, out_dir, stem)


# ----------------------------------------------------------------------------------------------
# 6. Steps to reach the baseline's quality
# ----------------------------------------------------------------------------------------------

def _step_curve(record: RunRecord) -> list[tuple[float, float]]:
    """(step, val loss) of one run's evaluation curve. The final evaluation is left out: in quick
    tiers it covers the whole validation split while curve points cover a few batches, and
    mixing the two made the baseline look faster than itself."""
    return _curve_xy(record.curve if isinstance(record.curve, list) else [], "step")


def gap_to_baseline(records: Sequence[RunRecord], out_dir: Path, stem: str, title: str, baseline_label: str,
                    x: str = "tokens") -> list[Path]:
    """The picture of "is the sparse model better?": each arm's validation loss minus the
    baseline's, seed by seed (same seed = same init and data order), against training tokens (or
    ``x``), as the mean over seeds with its 95% interval band. Below zero = better than the
    baseline; where the band excludes zero the difference is resolved."""
    runs = _finished(records)
    groups = _by_arm(runs)
    if baseline_label not in groups:
        return []
    base = {r.seed: _curve_xy(r.curve, x) for r in groups[baseline_label]}
    bands = {arm: paired_gap_band({r.seed: _curve_xy(r.curve, x) for r in rs}, base)
             for arm, rs in groups.items() if arm != baseline_label}
    bands = {arm: b for arm, b in bands.items() if b}
    if not bands:
        return []
    colors = _colors(runs)
    go = _go()
    fig, ax = _figure(7.5, 4.4)
    pfig = go.Figure()
    ax.axhline(0.0, color="black", linewidth=1, linestyle="--")
    for arm, band in bands.items():
        xs = [b[0] for b in band]
        mean = [b[1] for b in band]
        finite = [(b[0], b[2], b[3]) for b in band if math.isfinite(b[2])]
        n = max(b[4] for b in band)
        label = f"{arm} − {baseline_label} ({n} seed{'s' if n > 1 else ''})"
        ax.plot(xs, mean, color=colors[arm], linewidth=2, label=label)
        if finite:
            ax.fill_between([f[0] for f in finite], [f[1] for f in finite], [f[2] for f in finite],
                            color=colors[arm], alpha=0.18, linewidth=0)
            pfig.add_trace(go.Scatter(x=[f[0] for f in finite] + [f[0] for f in reversed(finite)],
                                      y=[f[2] for f in finite] + [f[1] for f in reversed(finite)], fill="toself",
                                      fillcolor=colors[arm], opacity=0.18, line={"width": 0}, hoverinfo="skip",
                                      legendgroup=arm, showlegend=False))
        pfig.add_trace(go.Scatter(x=xs, y=mean, mode="lines", name=label, legendgroup=arm,
                                  line={"color": colors[arm], "width": 3},
                                  hovertemplate=f"{arm}<br>{x} %{{x:.4g}}<br>gap %{{y:+.4f}} nats<extra></extra>"))
    pfig.add_hline(y=0.0, line_dash="dash", line_color="black")
    ylabel = f"val loss − {baseline_label} (nats; 95% CI over paired seeds)"
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_count(v)))
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    _legend_outside(ax)
    pfig.update_layout(title=title, xaxis={"title": {"text": X_LABELS[x]}}, yaxis={"title": {"text": ylabel}},
                       legend={"orientation": "h", "y": -0.2})
    return _save(fig, pfig, out_dir, stem)


def steps_to_quality(records: Sequence[RunRecord], out_dir: Path, stem: str, title: str,
                     baseline_label: str) -> list[Path]:
    """Horizontal bars, one per arm: the speed-up in training steps over the baseline =
    (first step at which the baseline's mean curve reaches its last evaluated loss) / (first step at
    which the arm's mean curve reaches that loss, interpolated between evaluations), all on the evaluation
    curves (one evaluation set). Step and loss are the baseline's means over seeds; an arm's mean
    curve averages its seeds' evaluation curves. The baseline's own bar is 1 by definition; arms
    whose curve never gets there are shown as "not reached". Nothing is drawn without a baseline."""
    runs = _finished(records)
    colors = _colors(runs)
    groups = _by_arm(runs)
    curves = {arm: mean_curve([_step_curve(r) for r in rs], interpolate=True) for arm, rs in groups.items()}
    curves = {arm: c for arm, c in curves.items() if c}
    if baseline_label not in curves:
        return []
    base_runs = [r for r in groups[baseline_label] if _step_curve(r)]
    target = statistics.fmean(_step_curve(r)[-1][1] for r in base_runs)
    # where the baseline's mean curve first reaches that loss (as claims.add_paired_metrics counts)
    base_step = speedup_to_target(curves[baseline_label], target) or \
        statistics.fmean(_step_curve(r)[-1][0] for r in base_runs)
    if base_step <= 0:
        return []
    speedups: dict[str, float | None] = {}
    reached_at: dict[str, float | None] = {}
    for arm, curve in curves.items():
        at = base_step if arm == baseline_label else speedup_to_target(curve, target)
        reached_at[arm] = at
        speedups[arm] = base_step / at if at is not None and at > 0 else None

    go = _go()
    arms = list(speedups)
    fig, ax = _figure(7.5, max(2.6, 1.4 + 0.45 * len(arms)))
    ys = list(range(len(arms)))
    values = [speedups[a] or 0.0 for a in arms]
    bars = ax.barh(ys, values, color=[colors[a] for a in arms], height=0.6,
                   hatch=["//" if a == baseline_label else "" for a in arms], edgecolor="white")
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    top = max(values + [1.0])
    for y, arm, bar in zip(ys, arms, bars):
        s = speedups[arm]
        text = f"{s:.2f}× (step {reached_at[arm]:.0f})" if s else "not reached"
        ax.text((s or 0.0) + 0.015 * top, y, text, va="center", fontsize=8.5, color="black" if s else "0.4")
    ax.set_yticks(ys, arms)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.35)
    ax.grid(False, axis="y")
    ax.set_xlabel(f"step speed-up over {baseline_label} (to val loss {target:.4f}, "
                  f"reached by {baseline_label} at step {base_step:.0f})", fontsize=9)
    ax.set_title(title)

    pfig = go.Figure(go.Bar(
        x=values, y=arms, orientation="h", marker={"color": [colors[a] for a in arms]},
        text=[f"{speedups[a]:.2f}×" if speedups[a] else "not reached" for a in arms], textposition="outside",
        customdata=[f"step {reached_at[a]:.0f}" if reached_at[a] else "never" for a in arms],
        hovertemplate="%{y}: %{text}<br>reaches the target at %{customdata}<extra></extra>"))
    pfig.add_vline(x=1.0, line_dash="dash", line_color="black")
    pfig.update_layout(title=title, yaxis={"autorange": "reversed"},
                       xaxis={"title": {"text": f"step speed-up over {baseline_label} (target val loss "
                                                f"{target:.4f} at step {base_step:.0f})"},
                              "range": [0, top * 1.35]})
    return _save(fig, pfig, out_dir, stem)
