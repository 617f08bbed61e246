"""Study specs: malformed ones are rejected with field, value and what is allowed."""
from __future__ import annotations

import pytest

from bench.config import ConfigError
from bench.sweep.spec import find_spec, load_spec, parse_spec, shipped_studies

BASE = {"task": "tinyshakespeare-char", "family": "switch", "budget": {"steps": 5}}


def problems_of(data) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_spec(data)
    return e.value.problems


def test_malformed_spec_reports_every_problem_at_once():
    problems = problems_of({
        "task": "tinyshakespeare-char", "family": ["switch", "densse"], "budget": {"flop": 1}, "samplr": "x",
        "sampler": "bayes", "space": {"num_expert": [2], "capacity_factor": {"type": "int", "low": 8, "high": 2},
                                      "lr": {"type": "float", "low": 0, "high": 1, "log": True}},
        "objectives": ["accuracy"], "n_trials": 0})
    text = "\n".join(problems)
    for needle in ["unknown key 'samplr'", "family: 'densse' is not allowed; expected one of dense",
                   "budget: kind 'flop' is not allowed; expected one of flops, tokens, steps, seconds",
                   "sampler: 'bayes' is not allowed; expected one of tpe, random, grid, nsga2",
                   "space.num_expert: unknown key 'num_expert'",
                   "space.capacity_factor.low=8.0, high=2.0 is not allowed",
                   "space.lr.log=true needs low > 0, got 0",
                   "objectives[0].metric='accuracy' is not allowed: expected one of quality, val_loss",
                   "n_trials: 0 is not allowed; expected an integer >= 1"]:
        assert needle in text, f"missing {needle!r} in:\n{text}"


def test_bad_values_in_the_space_fail_before_any_training():
    problems = problems_of({**BASE, "space": {"num_experts": [2, 0]}, "sampler": "grid"})
    assert problems == ["switch/tiny with num_experts=0: moe.num_experts=0 is not allowed: must be >= 1"]


@pytest.mark.parametrize("fields, needle", [
    ({"space": {"num_experts": {"type": "int", "low": 1, "high": 8}}, "sampler": "grid"},
     "space.num_experts: the grid sampler needs a list of values"),
    ({"objectives": ["quality", "active_params"], "pruner": "median"},
     "pruner: 'median' needs one objective"),
    ({"objectives": ["wall_seconds"], "pruner": "median"}, "does not predict objective 'wall_seconds'"),
    ({"space": {"budget.value": [1, 2]}}, "space.budget.value: the budget is the same for every trial"),
    ({"space": {"lr": [1e-3]}, "fixed": {"lr": 1e-3}}, "fixed.lr: also in space"),
    ({"budget": None}, "budget: required"),
    ({"family": ["dense", "switch"], "objectives": ["val_loss", "max_violation"]},
     "objectives: max_violation measures routed experts' load; family dense has no experts"),
    ({"budget": {"steps": 5, "flops": 1e12}}, "gives 2 budgets"),
])
def test_inconsistent_specs_are_rejected(fields, needle):
    assert any(needle in p for p in problems_of({**BASE, **fields})), needle


def test_yaml_scientific_notation_strings_are_numbers():
    # YAML 1.1 reads 1e-3 and 4e13 (no dot) as strings.
    spec = parse_spec({**BASE, "budget": {"flops": "4e13"}, "fixed": {"lr": "1e-3"}})
    assert spec.budget == {"kind": "flops", "value": 4e13}
    assert spec.fixed == {"lr": 1e-3}


def test_family_and_preset_lists_become_searched_parameters():
    spec = parse_spec({**BASE, "family": ["dense", "switch"], "space": {"d_model": [32, 64]}, "sampler": "grid"})
    assert [p.name for p in spec.all_params] == ["family", "d_model"]
    assert spec.grid_size() == 4 and spec.target_trials() == 4
    assert spec.trial_settings({"family": "dense", "d_model": 32}) == ("dense", "tiny", {"d_model": 32})


def test_cli_overrides_join_fixed_settings_and_replace_preset_and_budget(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("task: tinyshakespeare-char\nfamily: switch\npreset: small\nbudget: {flops: 4e13}\n"
                    "fixed: {eval_every: 50}\n")
    spec = load_spec(str(path), ["preset=tiny", "eval_every=7", "lr=3e-4"], budget={"kind": "steps", "value": 20},
                     n_trials=3)
    assert spec.presets == ["tiny"] and spec.fixed == {"eval_every": 7, "lr": 3e-4}
    assert spec.budget == {"kind": "steps", "value": 20} and spec.n_trials == 3 and spec.name == "s"


@pytest.mark.parametrize("name", shipped_studies())
def test_shipped_studies_validate(name):
    spec = load_spec(name, ["preset=tiny"])
    assert spec.budget["kind"] == "flops" and spec.target_trials() >= 6


def test_plans_in_sweeps_are_not_studies():
    assert shipped_studies() == ["moe-designs", "pareto", "switch-tpe"]
    with pytest.raises(ConfigError, match="is a plan of fixed arms.*moe-bench reproduce capacity"):
        load_spec("capacity")


def test_shipped_studies_name_their_objectives():
    assert load_spec("pareto").directions == ["maximize", "minimize"]
    assert load_spec("switch-tpe").pruning_monitor() == "val/mean_token_prob"
    designs = load_spec("moe-designs")
    assert designs.directions == ["minimize", "minimize"] and designs.target_trials() == 4 * 2 * 3


def test_unknown_spec_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="shipped: moe-designs, pareto, switch-tpe\\)"):
        find_spec("no-such-study")


def test_schema_race_errors_are_retried_and_others_are_not():
    from sqlalchemy import exc as sa_exc

    from bench.sweep.study import _is_schema_race

    assert _is_schema_race(sa_exc.OperationalError("CREATE TABLE trial_heartbeats", {},
                                                   Exception("table trial_heartbeats already exists")))
    assert _is_schema_race(sa_exc.IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not _is_schema_race(sa_exc.OperationalError("connect", {}, Exception("unable to open database file")))


def test_four_workers_opening_a_fresh_sqlite_study_store_together_all_succeed(tmp_path):
    import subprocess
    import sys
    import time

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    start = time.time() + 3  # all four create Optuna's tables at the same moment
    code = ("import sys, time; from bench.sweep.study import optuna_storage; "
            "time.sleep(max(0, float(sys.argv[2]) - time.time())); optuna_storage(sys.argv[1]); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err[-500:] for _, err in results]


def test_field_types_are_checked_by_the_one_config_validator():
    text = "\n".join(problems_of({**BASE, "seed": "x", "n_trials": "lots", "description": 3,
                                  "space": {"lr": {"type": "float", "low": "a", "high": 1}, "d_model": "wide"},
                                  "objectives": [{"metric": "quality", "direction": "up"}]}))
    for needle in ("seed='x' is not allowed: expected an integer", "n_trials='lots' is not allowed: expected",
                   "description=3 is not allowed: expected a string", "space.lr.low='a' is not allowed: expected",
                   "space.d_model must be a mapping, got 'wide'",
                   "objectives[0].direction='up' is not allowed: expected one of 'maximize', 'minimize'"):
        assert needle in text, f"missing {needle!r} in:\n{text}"
