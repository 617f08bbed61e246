"""Fine-grained and shared experts and sparse upcycling through the real train path (tiny runs)."""
from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from bench.config import ConfigError
from bench.flops import model_cost
from bench.models import model_config
from bench.tracking.records import ResultsStore
from bench.train.run import train
from bench.train.upcycling import from_dense_run
from tests.train.conftest import SMALL

TASK = "tinyshakespeare-char"


def _train(run_env, family, extra=(), budget=None, **kw):
    return train(TASK, family, "tiny", overrides=SMALL + list(extra), budget=budget or {"kind": "steps", "value": 5},
                 storage=run_env["storage"], progress=False, **kw)


@pytest.mark.parametrize("family, extra, resolved", [
    ("moe", ["granularity=2"], dict(num_experts=8, top_k=4, d_expert=16, granularity=2, shared_experts=0)),
    ("switch", ["shared_experts=1"], dict(num_experts=4, top_k=1, d_expert=32, granularity=1, shared_experts=1)),
])
def test_fine_grained_and_shared_experts_train(run_env, family, extra, resolved):
    record = _train(run_env, family, extra)
    assert record.status == "finished" and record.steps == 5
    moe = record.config["model"]["moe"]
    assert {k: moe[k] for k in resolved} == resolved  # the derived shapes and the user's settings, recorded
    cfg = model_config(family, "tiny", [o for o in SMALL if o.split("=")[0] in ("d_model", "n_layers", "n_heads",
                                                                                  "d_ff", "num_experts")] + extra,
                       vocab_size=65, max_seq_len=256)
    cost = model_cost(cfg, 256)
    assert record.params["active"] == cost.active_params and record.params["total"] == cost.total_params
    assert record.train_flops == pytest.approx(5 * 4 * 256 * cost.train_flops_per_token)
    assert len(record.expert_stats[0]["tokens_per_expert"]) == resolved["num_experts"]


def _source(run_env, record):
    return from_dense_run(record.run_id, run_env["storage"])


class _AtStart(pl.Callback):
    """The model's weights when training starts (after any initialisation)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def test_upcycled_run_starts_from_the_dense_weights_and_counts_its_flops(run_env):
    dense = _train(run_env, "dense", budget={"kind": "steps", "value": 5})
    weights = torch.load(Path(dense.paths["model"]), weights_only=True)["state_dict"]
    start = _AtStart()
    budget = dense.train_flops * 2  # total FLOPs: the dense run's, then as many again upcycled
    record = _train(run_env, "switch", budget={"kind": "flops", "value": budget}, init_from=_source(run_env, dense),
                    extra_callbacks=[start])
    assert record.status == "finished"
    assert start.state["blocks.1.ffn.w1"].shape == (4, 32, 64)
    for e in range(4):  # every expert of the MoE layer (block 1) is the dense FFN there
        assert torch.equal(start.state["blocks.1.ffn.w1"][e], weights["blocks.1.ffn.w1.weight"].t())
    assert torch.equal(start.state["embed.tok.weight"], weights["embed.tok.weight"])
    assert torch.equal(start.state["blocks.0.ffn.w2.weight"], weights["blocks.0.ffn.w2.weight"])
    # the record: the source, this run's FLOPs, and the total with the dense run's
    assert record.config["init_from"] == {"run_id": dense.run_id, "family": "dense", "task": TASK,
                                          "train_flops": dense.train_flops}
    assert record.steps == 5  # same shapes, same FLOPs per token (+ the router): 5 steps reach the budget
    assert budget - dense.train_flops <= record.train_flops < budget - dense.train_flops + record.train_flops / 5
    assert record.extra["total_train_flops"] == pytest.approx(dense.train_flops + record.train_flops)
    stored = ResultsStore(run_env["storage"]).get(record.run_id)
    assert stored.config["init_from"]["run_id"] == dense.run_id

    # refused before any record: a dense run of other shapes, a spent budget, a sparse source
    before = {r.run_id for r in ResultsStore(run_env["storage"]).list()}
    with pytest.raises(ConfigError, match="d_model differs: the dense run has d_model=32, this model d_model=64"):
        _train(run_env, "switch", ["d_model=64"], init_from=_source(run_env, dense))
    with pytest.raises(ConfigError, match="is already spent by run .*: an upcycled run's FLOPs budget counts"):
        _train(run_env, "switch", budget={"kind": "flops", "value": dense.train_flops},
               init_from=_source(run_env, dense))
    with pytest.raises(ConfigError, match="the source is a switch model: upcycling starts from a dense one"):
        _train(run_env, "switch", init_from=_source(run_env, record))
    with pytest.raises(ConfigError, match="run_id='nope' is not in the results store"):
        _train(run_env, "switch", init_from=from_dense_run("nope", run_env["storage"]))
    assert {r.run_id for r in ResultsStore(run_env["storage"]).list()} == before


def test_cli_init_from_reports_the_source_and_total_flops(run_env, capsys):
    from bench.cli import main

    dense = _train(run_env, "dense", budget={"kind": "steps", "value": 5})
    args = ["train", "--task", TASK, "--model", "switch", "--storage", run_env["storage"], "--json",
            "--init-from", dense.run_id, "--budget-steps", "2"] + [a for o in SMALL for a in ("--set", o)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["init_from"] == dense.run_id
    assert summary["total_train_flops"] == pytest.approx(dense.train_flops + summary["train_flops"])
    assert main(["train", "--resume", "x", "--init-from", dense.run_id, "--storage", run_env["storage"]]) == 2
    assert "--init-from starts a new run; --resume continues one" in capsys.readouterr().err
