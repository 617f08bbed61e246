"""What the dashboard's JSON endpoints return: plain dicts built from the results store, the
runs' CSV files, Optuna's tables in the same database, and the files under the results folder.
Nothing here writes: Optuna is opened with ``skip_table_creation`` and only when its tables exist."""
from __future__ import annotations

import math
import re
import threading

from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa

from bench.dashboard import curves, markdown
from bench.tracking.records import ResultsStore, RunRecord, StorageError

PLOT_KINDS = {".png": "image", ".svg": "image", ".jpg": "image", ".jpeg": "image", ".gif": "image",
              ".html": "html"}
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
    row.update(budget=_budget(r.budget), started_at=r.started_at, finished_at=r.finished_at)
    return row


def runs(store: ResultsStore, **filters: str | None) -> dict[str, Any]:
    return {"runs": [run_row(r) for r in store.list(**filters)]}


def run_detail(store: ResultsStore, run_id: str) -> dict[str, Any] | None:
    r = store.get(run_id)
    return None if r is None else {"record": r.to_dict(), "row": run_row(r)}


def run_curves(store: ResultsStore, run_ids: list[str], metrics: list[str] | None = None) -> dict[str, Any]:
    """Curves of each asked-for run, in the order asked (only ``metrics`` when given, else all);
    unknown ids get a note, not an error."""
    out = []
    for rid in run_ids:
        r = store.get(rid)
        if r is None:
            out.append({"run_id": rid, "label": rid, "note": "no curve: no such run in the store",
                        "available": [], "metrics": {}, "x_axes": ["step"], "files": []})
            continue
        label = " ".join(x for x in (r.family, r.preset, f"seed {r.seed}") if x) + f" ({rid})"
        found = curves.curves(r.paths, metrics)
        if not found["metrics"] and r.curve:  # run directory not here: the record's own curve
            found = curves.record_curve(r.curve, metrics)
        out.append({"run_id": rid, "label": label, **found})
    return {"runs": out}


# -- Optuna ------------------------------------------------------------------------------------

class Studies:
    """Optuna studies stored in the results database (one RDBStorage, opened on first use)."""

    def __init__(self, store: ResultsStore):
        self.store = store
        self.url = store.engine.url.render_as_string(hide_password=False)  # absolute SQLite path
        self.shown = store.engine.url.render_as_string(hide_password=True)
        self.hint = f"optuna-dashboard {self.shown}"
        self._storage = None
        self._lock = threading.Lock()

    def _open(self):
        """The Optuna storage, or None when the database has no Optuna tables."""
        with self._lock:
            if self._storage is None:
                tables = set(sa.inspect(self.store.engine).get_table_names())
                if not {"studies", "trials", "version_info"} <= tables:
                    return None
                import optuna

                try:
                    self._storage = optuna.storages.RDBStorage(self.url, skip_table_creation=True)
                except (RuntimeError, ValueError, sa.exc.SQLAlchemyError) as e:  # e.g. an older schema
                    raise StorageError(f"cannot read the Optuna studies in {self.shown}: {e}") from None
            return self._storage

    def summaries(self) -> dict[str, Any]:
        out: dict[str, Any] = {"studies": [], "hint": self.hint, "note": None}
        storage = self._open()
        if storage is None:
            out["note"] = "no studies: this database has no Optuna tables (`moe-bench sweep` creates them)"
            return out
        import optuna

        for s in optuna.get_all_study_summaries(storage, include_best_trial=True):
            best = s.best_trial
            out["studies"].append({
                "name": s.study_name, "directions": [d.name.lower() for d in s.directions],
                "n_trials": s.n_trials, "best_value": None if best is None else best.value,
                "best_run_id": None if best is None else best.user_attrs.get("run_id"),
                "started_at": s.datetime_start.isoformat(timespec="seconds") if s.datetime_start else None,
                "user_attrs": s.user_attrs,
            })
        if not out["studies"]:
            out["note"] = "no studies yet"
        return out

    def trials(self, name: str) -> dict[str, Any] | None:
        """Trials of study ``name``; None when there is no such study."""
        storage = self._open()
        if storage is None:
            return None
        import optuna

        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            return None
        rows = []
        for t in study.get_trials(deepcopy=False):
            duration = t.duration.total_seconds() if t.duration is not None else None
            rows.append({"number": t.number, "state": t.state.name.lower(), "values": t.values,
                         "params": t.params, "run_id": t.user_attrs.get("run_id"), "user_attrs": t.user_attrs,
                         "started_at": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
                         "duration_s": duration, "last_step": t.last_step})
        return {"name": name, "directions": [d.name.lower() for d in study.directions],
                "user_attrs": study.user_attrs, "trials": rows, "hint": self.hint}


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


def report(results_dir: Path) -> dict[str, Any]:
    """REPORT.md rendered to HTML, and the plots under ``plots/`` with their /files/ URLs."""
    md = results_dir / "REPORT.md"
    out: dict[str, Any] = {"path": str(md), "html": None, "note": None, "plots": []}
    if md.is_file():
        try:
            out["html"] = markdown.render(md.read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            out["note"] = f"cannot read {md}: {e}"
    else:
        out["note"] = f"no report: {md} does not exist (`moe-bench report` writes it)"
    plots = results_dir / "plots"
    if plots.is_dir():
        for p in sorted(plots.rglob("*")):
            kind = PLOT_KINDS.get(p.suffix.lower())
            if kind and p.is_file():
                rel = p.relative_to(results_dir).as_posix()
                out["plots"].append({"name": p.relative_to(plots).as_posix(), "kind": kind, "url": "/files/" + quote(rel)})
    return out
