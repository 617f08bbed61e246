"""bench.report.plots: each figure as PNG + offline HTML from hand-built run records, the numbers
the HTML carries, speedup_to_target against hand-computed crossings, and records that are skipped."""
from __future__ import annotations

import math
import re

import pytest

from bench.report import plots
from bench.report.plots import pareto_front, speedup_to_target
from bench.tracking.records import RunRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = list(range(0, 1001, 100))

# arm -> (family, experts, capacity factor, val loss per seed, decay, tokens/s, fraction dropped)
ARMS = {
    "dense": ("dense", None, None, (3.0, 3.2), 400, 50_000.0, None),
    "switch E=4": ("switch", 4, 1.25, (2.9, 3.0), 300, 40_000.0, 0.03),
    "switch E=8": ("switch", 8, 1.25, (2.8, 2.9), 250, 37_000.0, 0.02),
    "switch E=16": ("switch", 16, 1.25, (2.7, 2.8), 200, 33_000.0, 0.01),
    "switch cf=1.0": ("switch", 8, 1.0, (2.95, 3.05), 260, 41_000.0, 0.08),
    "switch cf=2.0": ("switch", 8, 2.0, (2.75, 2.85), 240, 30_000.0, 0.002),
    "switch dropless": ("switch", 8, None, (2.72, 2.76), 240, 28_000.0, 0.0),
}


def make_record(arm: str, seed: int, status: str = "finished") -> RunRecord:
    family, experts, cf, losses, decay, tps, dropped = ARMS[arm]
    final = losses[seed]
    # Loss falls from ~final+3 to exactly `final` at the last step (same steps in every seed).
    curve = [{"step": s, "tokens": s * 8192, "flops": s * 6e10 * (1 + 0.1 * (experts or 0) ** 0.5),
              "seconds": s * 0.05 * (1 + 0.03 * seed),
              "loss": final + 3.0 * (math.exp(-s / decay) - math.exp(-STEPS[-1] / decay)),
              "mean_token_prob": 0.1} for s in STEPS]
    moe = {} if experts is None else {"moe": {"num_experts": experts, "capacity_factor": cf}}
    stats = [] if experts is None else [
        {"tokens_per_expert": [1000 + 300 * ((i * 7 + layer * 3) % 5) for i in range(experts)],
         "fraction_dropped": dropped * (1 + 0.5 * layer), "router_entropy": 1.0}
        for layer in range(2)]
    active = 10e6 if experts is None else 10.5e6
    return RunRecord(
        run_id=f"run-{arm.replace(' ', '_')}-{seed}", name=f"demo: {arm}", family=family, seed=seed,
        status=status, steps=STEPS[-1], train_flops=curve[-1]["flops"],
        config={"model": {"family": family, **moe}},
        params={"active": active, "total": active if experts is None else active * experts / 2},
        metrics={"val_loss": final, "quality": math.exp(-final)},
        timings={"tokens_per_second": tps * (1 + 0.02 * seed), "wall_seconds": 60.0},
        expert_stats=stats, curve=curve, extra={"reproduction": "demo", "arm": arm})


@pytest.fixture(scope="module")
def records() -> list[RunRecord]:
    return [make_record(arm, seed) for seed in (0, 1) for arm in ARMS]


@pytest.fixture(scope="module")
def written(records, tmp_path_factory) -> dict[str, list]:
    """Every figure drawn once into one folder (drawing is the slow part)."""
    out = tmp_path_factory.mktemp("plots")
    return {
        "curves": plots.learning_curves(records, out, "curves", "Learning curves"),
        "curves-step": plots.learning_curves(records, out, "curves-step", "Learning curves", x="step"),
        "pareto": plots.quality_vs_active_params(records, out, "pareto", "Quality vs active params"),
        "experts": plots.loss_vs_experts(records, out, "experts", "Loss vs experts",
                                         baseline_label="dense"),
        "tradeoffs": plots.capacity_tradeoffs(records, out, "tradeoffs", "Capacity factor"),
        "load": plots.expert_load_heatmap(records[2], out, "load", "Expert load"),
        "speedup": plots.steps_to_quality(records, out, "speedup", "Steps to quality", baseline_label="dense"),
    }


def html_of(files) -> str:
    """The HTML file's text with plotly's JSON escapes undone (\\u00d7 -> ×, \\/ -> /)."""
    text = next(p for p in files if p.suffix == ".html").read_text(encoding="utf-8")
    return text.replace("\\/", "/").encode("ascii", "backslashreplace").decode("unicode_escape")


# -- speedup_to_target ---------------------------------------------------------------------------

CURVE = [{"step": 0, "loss": 5.0}, {"step": 100, "loss": 4.0}, {"step": 200, "loss": 3.0},
         {"step": 300, "loss": 2.5}]


def test_speedup_to_target_exact_crossing_at_an_evaluation():
    assert speedup_to_target(CURVE, 3.0) == 200
    assert speedup_to_target(CURVE, 2.5) == 300


def test_speedup_to_target_interpolates_between_the_evaluations_around_the_crossing():
    assert speedup_to_target(CURVE, 3.5) == pytest.approx(150.0)
    assert speedup_to_target(CURVE, 3.8) == pytest.approx(120.0)  # 100 + (4.0-3.8)/(4.0-3.0)*100
    assert speedup_to_target(CURVE, 2.9) == pytest.approx(220.0)  # 200 + (3.0-2.9)/(3.0-2.5)*100


def test_speedup_to_target_first_crossing_wins_and_first_point_counts():
    bumpy = [{"step": 0, "loss": 5.0}, {"step": 100, "loss": 3.0}, {"step": 200, "loss": 4.0},
             {"step": 300, "loss": 2.0}]
    assert speedup_to_target(bumpy, 3.5) == pytest.approx(75.0)  # 0 + (5-3.5)/(5-3)*100
    assert speedup_to_target(CURVE, 6.0) == 0


def test_speedup_to_target_never_reached_or_empty_is_none():
    assert speedup_to_target(CURVE, 2.4) is None
    assert speedup_to_target([], 3.0) is None
    assert speedup_to_target(None, 3.0) is None
    assert speedup_to_target(CURVE, float("nan")) is None
    assert speedup_to_target(CURVE, None) is None


def test_speedup_to_target_other_axes_unsorted_points_and_gaps():
    points = [{"flops": 2e12, "loss": 3.0}, {"flops": 1e12, "loss": 4.0}, {"flops": 1.5e12},
              {"step": 7, "loss": 1.0}, {"flops": 3e12, "loss": float("nan")}]
    assert speedup_to_target(points, 3.5, x="flops") == pytest.approx(1.5e12)
    assert speedup_to_target([(0, 5.0), (10, 4.0)], 4.5) == pytest.approx(5.0)


def test_pareto_front_keeps_points_no_other_beats():
    points = [(10e6, 0.04), (10.5e6, 0.06), (10.5e6, 0.05), (20e6, 0.055), (40e6, 0.07)]
    assert pareto_front(points) == [(10e6, 0.04), (10.5e6, 0.06), (40e6, 0.07)]


# -- files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["curves", "curves-step", "pareto", "experts", "tradeoffs", "load", "speedup"])
def test_each_figure_writes_a_png_and_an_offline_html(written, kind):
    files = written[kind]
    assert [p.suffix for p in files] == [".png", ".html"]
    assert [p.stem for p in files] == [kind, kind]
    png = files[0].read_bytes()
    assert png.startswith(PNG_SIGNATURE) and 10_000 < len(png) < 2_000_000
    html = html_of(files)
    assert re.search(r'<script [^>]*src="plotly.min.js"', html) and "cdn.plot.ly" not in html
    assert (files[1].parent / "plotly.min.js").stat().st_size > 1_000_000
    assert "Plotly.newPlot" in html


def test_redrawing_a_figure_from_the_same_records_writes_the_same_bytes(records, tmp_path):
    first = plots.capacity_tradeoffs(records, tmp_path / "a", "tradeoffs", "Capacity factor")
    again = plots.capacity_tradeoffs(records, tmp_path / "b", "tradeoffs", "Capacity factor")
    assert first[1].read_bytes() == again[1].read_bytes()
    assert 'id="plot-tradeoffs"' in first[1].read_text(encoding="utf-8")


def test_plots_in_one_folder_share_one_plotly_js(written):
    folders = {p.parent for files in written.values() for p in files}
    assert len(folders) == 1
    assert [p.name for p in folders.pop().glob("*.js")] == ["plotly.min.js"]


def test_learning_curves_have_a_mean_line_per_arm_and_a_line_per_seed(written):
    html = html_of(written["curves"])
    for arm in ARMS:
        assert f"{arm} (mean of 2)" in html
        assert f"{arm} (seed 0)" in html and f"{arm} (seed 1)" in html
    assert '"type":"log"' in html  # FLOPs on a log axis
    with pytest.raises(ValueError, match="x='epochs'"):
        plots.learning_curves([], None, "x", "t", x="epochs")


def test_loss_vs_experts_html_holds_the_means_and_95_percent_intervals(written):
    html = html_of(written["experts"])
    for arm in ("switch E=4", "switch E=8", "switch E=16"):
        lo, hi = ARMS[arm][3]
        assert str((lo + hi) / 2) in html, arm
    # two seeds 3.0 and 3.2: t(0.975, 1 df) = 12.7062 times sd / sqrt(2) = 0.1, not the half-range 0.1
    assert "dense: 3.1000 ± 1.2706" in html
    assert '"tickvals":[4,8,16]' in html


def test_capacity_tradeoffs_html_holds_dropped_percent_and_throughput(written):
    html = html_of(written["tradeoffs"])
    for arm in ("switch cf=1.0", "switch cf=2.0"):  # mean over layers (x1, x1.5) and seeds, in %
        assert str(100 * (ARMS[arm][6] + 1.5 * ARMS[arm][6]) / 2) in html, arm
    assert str((41_000.0 + 41_000.0 * 1.02) / 2) in html
    assert "switch dropless" in html and "(dropless)" not in html
    assert '"tickvals":[1.0,1.25,2.0]' in html


def test_quality_vs_active_params_labels_every_arm(written):
    html = html_of(written["pareto"])
    for arm in ARMS:
        assert f'"text":"{arm}"' in html
    assert str((math.exp(-3.0) + math.exp(-3.2)) / 2) in html
    assert "Pareto front" in html


def test_expert_load_shares_sum_to_100_and_dense_runs_have_none(records, tmp_path):
    rows = plots.expert_load(records[2])  # switch E=8
    assert [i for i, _ in rows] == [0, 1] and all(len(r) == 8 for _, r in rows)
    assert all(sum(r) == pytest.approx(100.0) for _, r in rows)
    assert plots.expert_load_heatmap(records[0], tmp_path, "dense", "t") == []  # dense: no MoE layers
    odd = make_record("switch E=4", 0)
    odd.expert_stats = [{"tokens_per_expert": [0, 0, 0, 0]}, {"fraction_dropped": 0.1}, "junk",
                        {"tokens_per_expert": [1, 3]}]
    assert plots.expert_load(odd) == [(3, [25.0, 75.0])]


def test_expert_load_heatmap_html_is_centred_on_balance(written):
    html = html_of(written["load"])
    assert '"zmid":12.5' in html and "max/mean" in html


def test_steps_to_quality_hand_computed(tmp_path):
    def run(arm, losses, seed=0):
        curve = [{"step": s, "loss": loss} for s, loss in zip((0, 100, 200), losses)]
        return RunRecord(run_id=f"{arm}-{seed}", seed=seed, status="finished", steps=200, curve=curve,
                         metrics={"val_loss": losses[-1]}, extra={"arm": arm})

    records = [run("base", [5.0, 4.0, 3.0]), run("base", [5.0, 4.2, 3.2], seed=1),  # target 3.1, step 200
               run("fast", [5.0, 3.0, 2.5]), run("fast", [5.0, 3.2, 2.6], seed=1),  # mean 3.1 at step 100
               run("slow", [5.0, 4.5, 4.0])]
    files = plots.steps_to_quality(records, tmp_path, "s", "t", baseline_label="base")
    html = html_of(files)
    assert "2.00×" in html and "1.00×" in html and "not reached" in html
    assert plots.steps_to_quality(records, tmp_path, "none", "t", baseline_label="missing") == []


# -- skipped records -----------------------------------------------------------------------------

def test_unfinished_and_incomplete_records_are_skipped(tmp_path):
    bad = [make_record("switch E=8", 0, status=s) for s in ("running", "failed", "pruned")]
    empty = RunRecord(run_id="empty", status="finished")
    junk = RunRecord(run_id="junk", status="finished", curve=[{"step": "x"}, "junk"],
                     metrics={"val_loss": "nan", "quality": None}, expert_stats=[{"tokens_per_expert": None}],
                     config={"model": {"moe": "none"}}, extra={"arm": "junk"})
    for records in ([], bad, [empty, junk], bad + [empty, junk, None]):
        assert plots.learning_curves(records, tmp_path, "a", "t") == []
        assert plots.quality_vs_active_params(records, tmp_path, "b", "t") == []
        assert plots.loss_vs_experts(records, tmp_path, "c", "t") == []
        assert plots.capacity_tradeoffs(records, tmp_path, "d", "t") == []
        assert plots.steps_to_quality(records, tmp_path, "e", "t", baseline_label="dense") == []
    for record in bad + [empty, junk, None]:
        assert plots.expert_load_heatmap(record, tmp_path, "f", "t") == []
    assert list(tmp_path.iterdir()) == []


def test_unfinished_runs_do_not_change_the_numbers(tmp_path):
    crashed = make_record("switch E=8", 0, status="failed")
    crashed.metrics["val_loss"] = 123.456
    records = [make_record(a, s) for s in (0, 1) for a in ("dense", "switch E=8")] + [crashed]
    html = html_of(plots.loss_vs_experts(records, tmp_path, "e", "t"))
    assert "123.456" not in html and str((2.8 + 2.9) / 2) in html
    # an arm with only one usable seed is still drawn
    lone = [make_record("dense", 0), make_record("switch E=4", 1)]
    assert len(plots.loss_vs_experts(lone, tmp_path, "lone", "t")) == 2
    assert len(plots.learning_curves(lone, tmp_path, "lone-curves", "t")) == 2


def test_long_titles_wrap_and_legends_sit_outside_the_axes():
    fig, ax = plots._figure(7.5, 4.6)
    ax.plot([0, 1], [0, 1], label="switch cf=1.25 (mean of 5)")
    title = "Switch Transformer vs dense at equal FLOPs (Fedus et al. 2021, Table 1) (1.5e+14 training FLOPs per run)"
    ax.set_title(title)
    plots._legend_outside(ax)
    plots._wrap_titles(fig)
    lines = ax.get_title().split("\n")
    assert len(lines) == 2 and all(len(line) <= 56 for line in lines) and " ".join(lines) == title
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1  # right of the plotting area: never over a curve
    assert legend.x1 <= fig.bbox.x1 + 1  # and not cut off
