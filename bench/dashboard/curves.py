"""Training curves of one run, read from its Lightning ``CSVLogger`` files.

A run logs to ``<run_dir>/csv/metrics.csv``; each resume logs to a new
``<run_dir>/csv-resumed-<time>/metrics.csv`` (CSVLogger would overwrite the first). Rows are
sparse: one row per ``log`` call site and step, a column empty where that row did not log it.
"""
from __future__ import annotations

import bisect
import csv
import functools
import math

from pathlib import Path
from typing import Any

# x-axis name -> CSV columns that hold it, first present wins (BudgetStop logs train/flops_spent).
X_AXES = {
    "flops": ("train/flops_spent", "train/flops"),
    "tokens": ("train/tokens_seen",),
    "seconds": ("train/seconds",),
}
SKIP_METRICS = {"step", "epoch", "train/steps_done"}  # counters, not curves
MAX_POINTS = 5000  # per series; longer ones are thinned evenly (the last point is always kept)


def metric_files(paths: dict[str, Any]) -> list[Path]:
    """The run's CSV files in logging order: ``csv/metrics.csv``, then ``csv-resumed-*`` by name
    (their names end in a timestamp), plus ``paths["csv_file"]`` when it lies elsewhere."""
    files: list[Path] = []
    run_dir = paths.get("run_dir")
    if run_dir:
        d = Path(run_dir)
        files += [d / "csv" / "metrics.csv"] + sorted(d.glob("csv-resumed-*/metrics.csv"))
    csv_file = paths.get("csv_file")
    if csv_file and Path(csv_file) not in files:
        files.append(Path(csv_file))
    return files


def _number(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def read_rows(path: Path) -> list[dict[str, float]]:
    """Rows of one metrics.csv as {column: number}, empty and non-numeric cells left out; rows
    without a step are dropped. Raises OSError / csv.Error / ValueError on unreadable files.
    Cached while the file's size and mtime stay the same (a running run's file keeps growing)."""
    st = path.stat()
    return _read_rows(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _read_rows(path: str, _mtime_ns: int, _size: int) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if "step" not in header:
            raise ValueError(f"no 'step' column (columns: {', '.join(header) or 'none'})")
        rows = []
        for cells in reader:
            row = {}
            for name, text in zip(header, cells):
                if text and (x := _number(text)) is not None:
                    row[name] = x
            if "step" in row:
                rows.append(row)
    return rows


def merge_rows(parts: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Rows of all files sorted by step. A resumed run restarts from its last checkpoint, so the
    rows an earlier file logged at or after the resumed file's first step are superseded."""
    merged: list[dict[str, float]] = []
    for rows in parts:
        if not rows:
            continue
        first = min(r["step"] for r in rows)
        merged = [r for r in merged if r["step"] < first] + rows
    merged.sort(key=lambda r: r["step"])  # stable: rows of one step keep their file order
    return merged


def _x_lookup(rows: list[dict[str, float]], columns: tuple[str, ...]):
    """step -> x for one x-axis; steps between logged values are interpolated linearly (FLOPs,
    tokens and seconds grow about linearly with the step), steps past the ends scale with the
    nearest known value. None when no column of the axis was logged."""
    col = next((c for c in columns if any(c in r for r in rows)), None)
    if col is None:
        return None
    known: dict[float, float] = {}
    for r in rows:
        if col in r:
            known[r["step"]] = r[col]  # the last row of a step wins
    steps = sorted(known)

    def at(step: float) -> float:
        if step in known:
            return known[step]
        i = bisect.bisect_left(steps, step)
        if 0 < i < len(steps):
            s0, s1 = steps[i - 1], steps[i]
            return known[s0] + (known[s1] - known[s0]) * (step - s0) / (s1 - s0)
        s = steps[0] if i == 0 else steps[-1]
        return known[s] * step / s if s else known[s]

    return at


def _thin(idx: list[int], limit: int) -> list[int]:
    if len(idx) <= limit:
        return idx
    stride = math.ceil(len(idx) / limit)
    return idx[::stride] + ([idx[-1]] if (len(idx) - 1) % stride else [])


def record_curve(points: list[dict[str, Any]], metrics: list[str] | None = None) -> dict[str, Any]:
    """The same shape as ``curves`` from the evaluation curve kept in the run record itself
    (``RunRecord.curve``): what remains when the run directory is not on this machine, e.g. for
    committed reference results. Validation metrics only."""
    names = {"loss": "val/loss", "mean_token_prob": "val/mean_token_prob", "aux_loss": "val/aux_loss"}
    out: dict[str, Any] = {"files": [], "available": [], "x_axes": ["step", "flops", "tokens", "seconds"],
                           "metrics": {}, "note": "validation curve from the run record (no CSV files here)"}
    points = [p for p in points if isinstance(p, dict) and isinstance(p.get("step"), (int, float))]
    out["available"] = sorted({names[k] for p in points for k in p if k in names})
    for key, name in names.items():
        if name not in out["available"] or (metrics is not None and name not in metrics):
            continue
        pts = [p for p in points if isinstance(p.get(key), (int, float))]
        out["metrics"][name] = {"step": [p["step"] for p in pts], "y": [p[key] for p in pts],
                                "x": {axis: [p.get(axis) for p in pts] for axis in ("flops", "tokens", "seconds")}}
    return out


def curves(paths: dict[str, Any], metrics: list[str] | None = None, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """``{"files", "available", "x_axes", "metrics": {name: {"step": [...], "y": [...], "x": {axis:
    [...]}}}, "note"}`` for one run; ``note`` says why there is no curve (never raises for bad
    files). ``available`` lists every logged metric, ``metrics`` holds those asked for (default
    all); ``x`` maps the steps to each other x-axis the CSV logged (see X_AXES)."""
    files = metric_files(paths or {})
    out: dict[str, Any] = {"files": [str(f) for f in files], "available": [], "x_axes": ["step"], "metrics": {},
                           "note": None}
    if not files:
        out["note"] = "no curve: the record has no csv_file or run_dir path"
        return out
    parts, problems = [], []
    for f in files:
        if not f.is_file():
            # csv/metrics.csv is only a guess from run_dir; the record's own csv_file must exist.
            if str(f) == str(paths.get("csv_file")) or len(files) == 1:
                problems.append(f"{f} not found")
            continue
        try:
            parts.append(read_rows(f))
        except (OSError, csv.Error, ValueError, UnicodeDecodeError) as e:
            problems.append(f"{f} unreadable: {e}")
    rows = merge_rows(parts)
    if not rows:
        out["note"] = "no curve: " + ("; ".join(problems) if problems else "the CSV files hold no logged rows")
        return out
    if problems:
        out["note"] = "partial curve: " + "; ".join(problems)
    lookups = {axis: fn for axis, cols in X_AXES.items() if (fn := _x_lookup(rows, cols)) is not None}
    out["x_axes"] += list(lookups)
    x_columns = {c for cols in X_AXES.values() for c in cols}
    out["available"] = sorted({k for r in rows for k in r} - SKIP_METRICS - x_columns)
    for name in out["available"] if metrics is None else [m for m in metrics if m in out["available"]]:
        idx = _thin([i for i, r in enumerate(rows) if name in r], max_points)
        steps = [rows[i]["step"] for i in idx]
        out["metrics"][name] = {
            "step": [int(s) if s.is_integer() else s for s in steps],
            "y": [rows[i][name] for i in idx],
            "x": {axis: [fn(s) for s in steps] for axis, fn in lookups.items()},
        }
    return out
