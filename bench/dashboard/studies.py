"""The Optuna studies kept in the results database: summaries, trials, and Optuna's own plotly
figures (optimization history, parameter importances, parallel coordinates, intermediate values,
Pareto front) as plotly JSON for the page to draw. Nothing here writes: the storage is opened with
``skip_table_creation``, only when Optuna's tables exist, and on a read-only store through the
store's own read-only SQLite connections."""
from __future__ import annotations

import functools
import json
import threading
import warnings

from typing import Any

import sqlalchemy as sa

from bench.tracking.records import ResultsStore, StorageError, sqlite_read_only_connect


class Studies:
    """Optuna studies stored in the results database (one RDBStorage, opened on first use)."""

    def __init__(self, store: ResultsStore):
        self.store = store
        self.url = store.engine.url.render_as_string(hide_password=False)  # absolute SQLite path
        self.shown = store.engine.url.render_as_string(hide_password=True)
        self.hint = f"optuna-dashboard {self.shown}"
        self._storage = None
        self._lock = threading.Lock()

    def _engine_kwargs(self) -> dict[str, Any]:
        """Optuna's engine makes the same read-only connections as the store (no -wal/-shm files)."""
        if self.store.read_only and self.store.sqlite_path is not None:
            return {"creator": functools.partial(sqlite_read_only_connect, self.store.sqlite_path),
                    "poolclass": sa.pool.NullPool}
        return {}

    def _open(self):
        """The Optuna storage, or None when the database has no Optuna tables."""
        with self._lock:
            if self._storage is None:
                tables = set(sa.inspect(self.store.engine).get_table_names())
                if not {"studies", "trials", "version_info"} <= tables:
                    return None
                import optuna

                try:
                    self._storage = optuna.storages.RDBStorage(self.url, engine_kwargs=self._engine_kwargs(),
                                                               skip_table_creation=True)
                except (RuntimeError, ValueError, sa.exc.SQLAlchemyError) as e:  # e.g. an older schema
                    raise StorageError(f"cannot read the Optuna studies in {self.shown}: {e}") from None
            return self._storage

    def _study(self, name: str):
        storage = self._open()
        if storage is None:
            return None
        import optuna

        try:
            return optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            return None

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
        study = self._study(name)
        if study is None:
            return None
        rows = []
        for t in study.get_trials(deepcopy=False):
            duration = t.duration.total_seconds() if t.duration is not None else None
            rows.append({"number": t.number, "state": t.state.name.lower(), "values": t.values,
                         "params": t.params, "run_id": t.user_attrs.get("run_id"), "user_attrs": t.user_attrs,
                         "started_at": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
                         "duration_s": duration, "last_step": t.last_step})
        return {"name": name, "directions": [d.name.lower() for d in study.directions],
                "objectives": objective_names(study), "user_attrs": study.user_attrs, "trials": rows,
                "hint": self.hint}

    def figures(self, name: str) -> dict[str, Any] | None:
        """Optuna's plotly figures of study ``name``; None when there is no such study."""
        study = self._study(name)
        return None if study is None else study_figures(study)


def objective_names(study) -> list[str]:
    """Objective labels: ``study.metric_names`` (set by ``moe-bench sweep``), else the study's
    ``objectives`` user attribute (studies made before the names were set), else Optuna's default."""
    n = len(study.directions)
    for names in (study.metric_names, study.user_attrs.get("objectives")):
        if isinstance(names, list) and len(names) == n and all(isinstance(x, str) for x in names):
            return names
    return [f"Objective {i}" for i in range(n)]


def study_figures(study) -> dict[str, Any]:
    """``{"figures": [{"kind", "title", "figure"}], "notes": [...]}``; a figure Optuna cannot draw
    for this study (too few trials, no parameters) becomes a note instead of an error."""
    import optuna
    from optuna.visualization import (plot_intermediate_values, plot_optimization_history, plot_parallel_coordinate,
                                      plot_param_importances, plot_pareto_front)

    names = objective_names(study)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    n_params = len({p for t in done for p in t.params})
    # Multi-objective studies need a target per objective for the single-objective plots.
    targets = [(None, names[0])] if len(names) == 1 else \
        [(lambda t, i=i: t.values[i], name) for i, name in enumerate(names)]
    plots: list[tuple[str, str, Any]] = [
        (kind, f"{label}: {name}", functools.partial(plot, study, target=target, target_name=name))
        for kind, label, plot in (("history", "optimization history", plot_optimization_history),
                                  ("importances", "parameter importances", plot_param_importances),
                                  ("parallel", "parallel coordinates", plot_parallel_coordinate))
        for target, name in targets]
    plots.append(("intermediate", "intermediate values", functools.partial(plot_intermediate_values, study)))
    if len(names) in (2, 3):  # Optuna draws 2- and 3-objective fronts
        plots.append(("pareto", "Pareto front", functools.partial(plot_pareto_front, study, target_names=names)))

    out: dict[str, Any] = {"objectives": names, "figures": [], "notes": []}
    for kind, title, make in plots:
        if kind == "importances" and (len(done) < 2 or n_params < 1):
            out["notes"].append(f"{title}: needs at least 2 completed trials and 1 parameter "
                                f"({len(done)} completed, {n_params} parameters)")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna warns about empty or experimental plots
                fig = make()
        except Exception as e:  # noqa: BLE001 (one figure Optuna cannot draw must not hide the others)
            out["notes"].append(f"{title}: Optuna could not draw it ({type(e).__name__}: {e})")
            continue
        fig.update_layout(title={"text": title}, legend={"x": 1.02, "xanchor": "left"})
        out["figures"].append({"kind": kind, "title": title, "figure": json.loads(fig.to_json())})
    return out
