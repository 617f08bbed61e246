"""`--set devices=2 strategy=ddp_spawn expert_parallel=2`: Lightning training with sharded experts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.config import ConfigError
from bench.models import build_model, model_config
from bench.train.run import train
from tests.train.conftest import SMALL

TASK = "tinyshakespeare-char"
DDP = ["devices=2", "strategy=ddp_spawn", "grad_clip=0.05"]  # a clip that binds: the norm spans both shards


def _train(run_env, extra, **kw):
    return train(TASK, "switch", "tiny", overrides=SMALL + extra, budget={"kind": "steps", "value": 6},
                 storage=run_env["storage"], progress=False, **kw)


@pytest.mark.slow
def test_expert_parallel_trains_like_ddp_and_checkpoints_every_expert(run_env):
    ddp = _train(run_env, DDP)
    ep = _train(run_env, DDP + ["expert_parallel=2"], keep_checkpoints=True)
    assert ddp.status == ep.status == "finished" and ep.steps == 6
    assert ep.config["run"]["train"]["expert_parallel"] == 2
    # Same data, same routing, same updates: the final evaluation (all val tokens) agrees to float rounding.
    assert ep.metrics["val_loss"] == pytest.approx(ddp.metrics["val_loss"], abs=1e-5)
    assert ep.tokens_seen == ddp.tokens_seen == 6 * 4 * 256 * 2
    # all-to-all per step and rank: 4 x 1 MoE layer x top-1 x d_model 32 values per token, 4 x 256
    # tokens per rank, fp32; half of it leaves the rank (EP size 2)
    assert ep.flops["all_to_all_bytes_per_step_per_rank"] == 4 * 1 * 1 * 32 * 4 * 256 * 4
    assert ep.flops["all_to_all_bytes_off_rank_per_step_per_rank"] == 4 * 32 * 4 * 256 * 4 / 2
    assert "all_to_all_bytes_per_step_per_rank" not in ddp.flops
    # The checkpoint holds all 4 experts of each MoE layer (and their Adam moments), so it loads
    # into a model without expert parallelism.
    ckpt = torch.load(Path(ep.paths["checkpoint_dir"]) / "last.ckpt", map_location="cpu", weights_only=False)
    banks = {k: v for k, v in ckpt["state_dict"].items() if k.endswith((".w1", ".w2"))}
    assert banks and all(v.shape[0] == 4 for v in banks.values())
    moments = [s["exp_avg"] for s in ckpt["optimizer_states"][0]["state"].values() if s["exp_avg"].dim() == 3]
    assert len(moments) == len(banks) and all(m.shape[0] == 4 for m in moments)
    cfg = model_config("switch", "tiny", [o for o in SMALL if o.split("=")[0] in
                                          ("d_model", "n_layers", "n_heads", "d_ff", "num_experts")],
                       vocab_size=65, max_seq_len=256)
    model = build_model(cfg, "lm")
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    # The saved model (written after training) holds every expert too.
    saved = torch.load(ep.paths["model"], map_location="cpu", weights_only=False)
    weights = saved.get("state_dict", saved)
    assert all(v.shape[0] == 4 for k, v in weights.items() if k.endswith((".w1", ".w2")))


@pytest.mark.parametrize("extra, family, message", [
    (["devices=2", "strategy=ddp", "expert_parallel=3"], "switch",
     "expert_parallel=3 is not allowed: it must divide the 2 processes (devices=2 x num_nodes=1)"),
    (["devices=2", "expert_parallel=2"], "switch", "expert_parallel=2 needs strategy=ddp or ddp_spawn"),
    (["devices=4", "strategy=ddp", "expert_parallel=4", "num_experts=6"], "switch",
     "expert_parallel=4 is not allowed: it must divide the 6 experts of every MoE layer"),
    (["devices=2", "strategy=ddp", "expert_parallel=2"], "dense",
     "expert_parallel=2 is not allowed: a dense model has no experts to shard"),
    (["expert_parallel=0"], "switch", "expert_parallel=0 is not allowed: must be >= 1"),
])
def test_bad_expert_parallel_settings_are_refused_before_any_work(run_env, tmp_path, extra, family, message):
    with pytest.raises(ConfigError) as e:
        train(TASK, family, "tiny", overrides=SMALL + extra, budget={"kind": "steps", "value": 1},
              storage=run_env["storage"], progress=False)
    assert message in str(e.value)


@pytest.mark.slow
def test_strategy_ddp_from_the_cli_makes_one_run_with_every_rank(run_env):
    """strategy=ddp re-runs the command for rank 1 (LOCAL_RANK=1): that process joins rank 0's run
    (same run id, no record, lock or summary of its own) and the result equals ddp_spawn's."""
    import json
    import subprocess
    import sys

    from bench.tracking.records import ResultsStore

    sets = [a for o in SMALL + ["devices=2", "strategy=ddp", "grad_clip=0.05", "expert_parallel=2"]
            for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "train", "--task", TASK, "--model", "switch",
                           "--budget-steps", "6", "--storage", run_env["storage"], "--json"] + sets,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # printed by rank 0 only
    (record,) = ResultsStore(run_env["storage"]).list()  # one run, not one per rank
    assert record.status == "finished" and record.timings["processes"] == 2 and record.steps == 6
    spawned = _train(run_env, DDP + ["expert_parallel=2"])
    assert record.metrics["val_loss"] == pytest.approx(spawned.metrics["val_loss"], abs=1e-5)
