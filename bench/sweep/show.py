"""`moe-bench sweep --show STUDY`: the trials, the best trial or Pareto set, parameter importances."""
from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from bench.config import ConfigError
from bench.sweep.study import SPEC_ATTR, optuna_storage, retried_numbers
from bench.tracking.records import ResultsStore


def load_existing_study(study_name: str, storage: str | None) -> optuna.Study:
    url = ResultsStore(storage).url
    storage_obj = optuna_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage_obj, include_best_trial=False)]
    if study_name not in names:
        known = ", ".join(names) or "none yet"
        raise ConfigError([f"study {study_name!r} is not in {url} (studies there: {known})"], "sweep --show")
    return optuna.load_study(study_name=study_name, storage=storage_obj)


def _state(t: FrozenTrial, retried: set[int]) -> str:
    if t.state == TrialState.FAIL:
        if t.user_attrs.get("surplus"):
            return "surplus"
        if t.user_attrs.get("duplicate"):
            return "duplicate"
        if t.number in retried:
            return "interrupted"
    return t.state.name.lower()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Everything `--show` prints, as plain data (also what `--show --json` emits)."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    objectives = study.user_attrs.get("objectives") or [f"value{i}" for i in range(len(study.directions))]
    rows = []
    for t in trials:
        rows.append({"number": t.number, "state": _state(t, retried), "params": t.params,
                     "values": t.values if t.values is not None else (
                         [t.intermediate_values[t.last_step]] if t.last_step is not None else None),
                     "run_id": t.user_attrs.get("run_id"), "family": t.user_attrs.get("family"),
                     "wall_seconds": t.user_attrs.get("wall_seconds"), "error": t.user_attrs.get("error"),
                     "retry_of": t.system_attrs.get("failed_trial")})
    summary: dict[str, Any] = {
        "study": study.study_name, "objectives": objectives,
        "directions": [d.name.lower() for d in study.directions],
        "spec": study.user_attrs.get(SPEC_ATTR, {}), "trials": rows,
        "counts": {s: sum(r["state"] == s for r in rows) for s in
                   ("complete", "pruned", "fail", "running", "waiting", "interrupted", "surplus", "duplicate")},
    }
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
        summary["best" if len(study.directions) == 1 else "pareto"] = [t.number for t in best]
    summary["importances"] = _importances(study, objectives, complete)
    return summary


def _importances(study: optuna.Study, objectives: list[str], complete: list[FrozenTrial]) -> dict[str, Any]:
    """Parameter importances per objective (fANOVA); a reason instead when they cannot be computed."""
    varied = {name for name in {k for t in complete for k in t.params}
              if len({repr(t.params.get(name)) for t in complete}) > 1}
    if len(complete) < 2 or not varied:
        return {"note": "need at least 2 completed trials whose parameters differ"}
    out: dict[str, Any] = {}
    for i, name in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(
                    study, params=sorted(varied), target=(lambda t, i=i: t.values[i]) if len(objectives) > 1 else None)
            out[name] = {k: float(v) for k, v in imp.items()}
        except (RuntimeError, ValueError) as e:
            out[name] = {"note": str(e)}
    return out


def format_study(summary: dict[str, Any], storage_url: str) -> str:
    spec = summary["spec"]
    obj = ", ".join(f"{o} ({d})" for o, d in zip(summary["objectives"], summary["directions"]))
    lines = [f"study {summary['study']}: task {spec.get('task')}, families {', '.join(spec.get('families', []))}, "
             f"budget {spec.get('budget', {}).get('kind')} = {spec.get('budget', {}).get('value')}",
             f"objectives: {obj}; sampler {spec.get('sampler', {}).get('name')}, "
             f"pruner {spec.get('pruner', {}).get('name')}",
             "trials: " + ", ".join(f"{n} {s}" for s, n in summary["counts"].items() if n), ""]
    shown = [r for r in summary["trials"] if r["state"] not in ("surplus", "duplicate")]
    param_names = sorted({k for r in shown for k in r["params"]})
    header = ["#", "state", *param_names, *summary["objectives"], "wall s", "run id / error"]
    table = []
    for r in shown:
        values = r["values"] or []
        vals = [_fmt(values[i]) if i < len(values) and values[i] is not None else "-"
                for i in range(len(summary["objectives"]))]
        if r["state"] == "pruned" and values:
            vals[0] += " (last)"
        note = r["run_id"] or ""
        if r["error"] and r["state"] != "complete":
            note = r["error"].splitlines()[0][:80]
        if r["retry_of"] is not None:
            note += f" (retry of #{r['retry_of']})"
        wall = r["wall_seconds"]
        table.append([str(r["number"]), r["state"], *[_fmt(r["params"].get(p, "-")) for p in param_names], *vals,
                      "-" if wall is None else f"{wall:.0f}", note])
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *table]]
    skipped = len(summary["trials"]) - len(shown)
    if skipped:
        lines.append(f"({skipped} skipped trial(s) — surplus or duplicate grid points, never trained — not shown)")
    by_number = {r["number"]: r for r in summary["trials"]}
    lines.append("")
    if "best" in summary:
        b = by_number[summary["best"][0]]
        lines.append(f"best trial #{b['number']}: {summary['objectives'][0]} = {_fmt(b['values'][0])} with "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in b["params"].items()) + f"  (run {b['run_id']})")
    elif "pareto" in summary:
        lines.append(f"Pareto set ({len(summary['pareto'])} trial(s), no other trial is better on every objective):")
        for n in summary["pareto"]:
            b = by_number[n]
            vals = ", ".join(f"{o} {_fmt(v)}" for o, v in zip(summary["objectives"], b["values"]))
            lines.append(f"  #{n}: {vals}  with " + ", ".join(f"{k}={_fmt(v)}" for k, v in b["params"].items()))
    else:
        lines.append("no completed trials yet")
    imp = summary["importances"]
    if "note" in imp:
        lines.append(f"parameter importances: {imp['note']}")
    else:
        for objective, values in imp.items():
            if "note" in values:
                lines.append(f"parameter importances for {objective}: {values['note']}")
            else:
                shown_imp = ", ".join(f"{k} {v:.2f}" for k, v in values.items() if not math.isnan(v))
                lines.append(f"parameter importances for {objective} (fANOVA): {shown_imp}")
    lines.append(f"\nbrowse it: optuna-dashboard {storage_url}")
    return "\n".join(lines)


__all__ = ["load_existing_study", "study_summary", "format_study"]
