"""What the dashboard's JSON endpoints return for runs and files: plain dicts built from the
results store, the runs' CSV files, and the files under the results folder (Optuna studies:
``studies``; arms over seeds: ``arms``; the report: ``report_page``). Nothing here writes."""
from __future__ import annotations

import math
import re

from collections import Counter
from pathlib import Path
from typing import Any

from bench.dashboard import curves
from bench.dashboard.health import routing_health
from bench.dashboard.report_page import PLOT_KINDS
from bench.report.plots import arm_of
from bench.tracking.records import ResultsStore, RunRecord

# What /files/ serves from the results folder: report, plots and small text outputs, never the database.
SERVED_SUFFIXES = {*PLOT_KINDS, ".md", ".csv", ".json", ".txt", ".js"}
# The whole tag: its integrity hash and crossorigin attribute would block the local copy.
PLOTLY_CDN = re.compile(r"""<script[^>]*\ssrc=["']https?://cdn\.plot\.ly/[^"']*["'][^>]*>""", re.IGNORECASE)
LOCAL_PLOTLY = "/static/plotly.min.js"


def jsonable(value: Any) -> Any:
    """NaN/inf become the strings 'nan'/'inf'/'-inf' (browsers' JSON.parse rejects them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _budget(b: dict[str, Any]) -> str | None:
    kind, value = b.get("kind"), b.get("value")
    if kind is None:
        return None
    return f"{kind} {value:.3g}" if isinstance(value, (int, float)) else f"{kind} {value}"


def run_row(r: RunRecord) -> dict[str, Any]:
    """One line of the runs table."""
    s = r.summary()
    keys = ("run_id", "name", "group", "task", "family", "preset", "seed", "status", "active_params",
            "total_params", "train_flops", "steps", "tokens_seen", "val_loss", "quality",
            "quality_per_active_param", "wall_seconds", "error")
    row = {k: s.get(k) for k in keys}  # summary() derives quality per active param with bench.metrics
    row.update(arm=arm_of(r), reproduction=r.extra.get("reproduction"), budget=_budget(r.budget),
               started_at=r.started_at, finished_at=r.finished_at)
    return row


def runs(store: ResultsStore, **filters: str | None) -> dict[str, Any]:
    return {"runs": [run_row(r) for r in store.list(**filters)]}


def run_detail(store: ResultsStore, run_id: str) -> dict[str, Any] | None:
    r = store.get(run_id)
    if r is None:
        return None
    return {"record": r.to_dict(), "row": run_row(r), "health": routing_health(r.expert_stats)}


def run_curves(store: ResultsStore, run_ids: list[str], metrics: list[str] | None = None) -> dict[str, Any]:
    """Curves of each asked-for run, in the order asked (only ``metrics`` when given, else all);
    unknown ids get a note, not an error. Labels name the arm and seed ("switch cf=1.25 · seed 0"),
    with the run id added only where two runs would share a label."""
    out = []
    for rid in run_ids:
        r = store.get(rid)
        if r is None:
            out.append({"run_id": rid, "label": rid, "note": "no curve: no such run in the store",
                        "available": [], "metrics": {}, "x_axes": ["step"], "files": []})
            continue
        found = curves.curves(r.paths, metrics)
        if not found["metrics"] and r.curve:  # run directory not here: the record's own curve
            found = curves.record_curve(r.curve, metrics)
        out.append({"run_id": rid, "label": f"{arm_of(r)} · seed {r.seed}", "arm": arm_of(r), "seed": r.seed, **found})
    twice = {label for label, n in Counter(run["label"] for run in out).items() if n > 1}
    for run in out:
        if run["label"] in twice and run["label"] != run["run_id"]:
            run["label"] += f" ({run['run_id']})"
    return {"runs": out}


# -- results folder ----------------------------------------------------------------------------

def inside(root: Path, rel: str) -> Path | None:
    """``root/rel`` when it resolves (symlinks included) to a file under ``root`` with a served
    suffix; None otherwise."""
    if "\x00" in rel:
        return None
    base = root.resolve()
    target = (base / rel.lstrip("/")).resolve()
    if not target.is_relative_to(base) or target == base:
        return None
    if target.suffix.lower() not in SERVED_SUFFIXES:
        return None
    return target


def offline_plot_html(text: str) -> str:
    """A plotly HTML file made offline: a CDN plotly.js (``include_plotlyjs="cdn"``) is swapped
    for the dashboard's copy, and a figure written without any plotly.js (``False``) gets it."""
    text = PLOTLY_CDN.sub(f'<script src="{LOCAL_PLOTLY}">', text)
    if "Plotly.newPlot" in text and LOCAL_PLOTLY not in text and "plotly.js v" not in text:
        tag = f'<script src="{LOCAL_PLOTLY}"></script>'
        head = re.search(r"<head[^>]*>", text, re.IGNORECASE)
        text = text[:head.end()] + tag + text[head.end():] if head else tag + text
    return text
