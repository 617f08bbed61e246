"""Hash routing, expert choice and aux-loss-free balancing through the real train path (tiny runs),
and the routing-health statistics they leave in the CSV log and the run record."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from bench.config import ConfigError
from bench.tracking.records import ResultsStore
from bench.train.run import train
from tests.train.conftest import SMALL

TASK = "tinyshakespeare-char"
EVAL_KEYS = {"max_violation", "dead_experts", "fraction_dropped", "dropped_pos", "router_entropy", "topk_margin",
             "assignment_stability"}


def _train(run_env, extra=(), steps=10, task=TASK, family="switch"):
    # eval_every=5 (SMALL): evaluations at steps 5 and 10, so assignment stability is measured once
    return train(task, family, "tiny", overrides=SMALL + list(extra), budget={"kind": "steps", "value": steps},
                 storage=run_env["storage"], progress=False)


def _csv_keys(record) -> set[str]:
    with open(record.paths["csv_file"]) as f:
        rows = list(csv.DictReader(f))
    return {k for row in rows for k, v in row.items() if v}


def test_hash_routing_trains_and_its_assignment_never_changes(run_env):
    record = _train(run_env, ["router=hash"])
    assert record.status == "finished" and record.steps == 10
    state = torch.load(Path(record.paths["model"]), weights_only=True)["state_dict"]
    assert "blocks.1.ffn.router.hash_table" in state and "blocks.1.ffn.router.weight" not in state
    (layer,) = record.expert_stats
    health = layer["eval"]
    assert EVAL_KEYS - {"router_entropy", "topk_margin"} <= set(health)  # no router: no entropy or margin
    assert health["assignment_stability"] == 1.0  # a fixed token-id table
    assert "moe_eval/layer0/assignment_stability" in _csv_keys(record)


def test_frequency_hash_table_comes_from_the_training_split_counts(run_env):
    from bench.data.datamodules import LMDataModule
    from bench.models.routing import frequency_hash_table

    record = _train(run_env, ["router=hash", "hash_assignment=frequency"], steps=5)
    assert record.status == "finished" and record.config["model"]["moe"]["hash_assignment"] == "frequency"
    vocab = record.config["model"]["vocab_size"]
    counts = LMDataModule(TASK, batch_size=4).train_token_counts(vocab)["tokens"]
    assert int(counts.sum()) > 1_000_000  # the whole training split, not a batch
    state = torch.load(Path(record.paths["model"]), weights_only=True)["state_dict"]
    assert torch.equal(state["blocks.1.ffn.router.hash_table"], frequency_hash_table(counts, 4))


@pytest.mark.slow
def test_frequency_hash_tables_of_a_translation_model_follow_each_side(run_env):
    """The encoder's table from the source side, the decoder's from the decoder's input."""
    from bench.data.datamodules import TranslationDataModule
    from bench.models.routing import frequency_hash_table

    record = _train(run_env, ["router=hash", "hash_assignment=frequency", "batch_size=8", "eval_batches=1"],
                    steps=2, task="multi30k-de-en")
    assert record.status == "finished"
    vocab = record.config["model"]["vocab_size"]
    counts = TranslationDataModule("multi30k-de-en", batch_size=8).train_token_counts(vocab)
    assert not torch.equal(counts["src"], counts["tgt"])
    state = torch.load(Path(record.paths["model"]), weights_only=True)["state_dict"]
    assert torch.equal(state["encoder.1.ffn.router.hash_table"], frequency_hash_table(counts["src"], 4))
    assert torch.equal(state["decoder.1.ffn.router.hash_table"], frequency_hash_table(counts["tgt"], 4))


def test_aux_loss_free_bias_moves_by_u_per_step_and_is_saved(run_env):
    u = 0.01
    record = _train(run_env, ["balance=bias", f"bias_update_rate={u}"])
    assert record.status == "finished"
    moe = record.config["model"]["moe"]
    assert moe["balance"] == "bias" and moe["load_balance_weight"] == 0.0  # no balancing loss, as recorded
    bias = torch.load(Path(record.paths["model"]), weights_only=True)["state_dict"]["blocks.1.ffn.router.balance_bias"]
    steps = bias / u  # 10 updates of exactly +-u or 0 each: an integer number of steps in [-10, 10]
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert steps.abs().max() <= 10 and bias.abs().sum() > 0
    assert abs(float(bias.sum())) < 10 * u * 4  # every step moves some experts down and others up
    health = record.expert_stats[0]["eval"]
    assert EVAL_KEYS <= set(health) and 0.0 <= health["assignment_stability"] <= 1.0
    keys = _csv_keys(record)
    assert {"moe/layer0/max_violation", "moe/layer0/topk_margin", "moe/layer0/dropped_pos3",
            "moe_eval/layer0/max_violation", "moe_eval/layer0/dead_experts"} <= keys


def test_expert_choice_lm_is_refused_unless_the_leak_is_accepted(run_env):
    with pytest.raises(ConfigError, match="not causal"):
        _train(run_env, ["router=expert_choice"], steps=5)
    assert ResultsStore(run_env["storage"]).list() == []  # refused before any record exists
    record = _train(run_env, ["router=expert_choice", "allow_noncausal_routing=true", "capacity_factor=1.0"],
                    steps=5)
    assert record.status == "finished"
    moe = record.config["model"]["moe"]
    assert moe["router"] == "expert_choice" and moe["allow_noncausal_routing"] is True  # the record says so
    assert moe["eval_capacity_factor"] == 1.0
    assert record.expert_stats[0]["max_violation"] == 0.0  # each expert took the same number of tokens


def test_expert_choice_encoder_trains_on_translation(run_env):
    record = _train(run_env, ["router=expert_choice", "causal_router=switch", "decode_batches=1",
                              "eval_batch_size=4", "max_decode_len=8"], steps=5, task="multi30k-de-en")
    assert record.status == "finished"
    assert len(record.expert_stats) == 2  # encoder (expert choice), decoder (switch)
    assert all("eval" in layer for layer in record.expert_stats)


def test_resumed_bias_run_continues_the_bias_and_the_stability_baseline(run_env):
    import lightning.pytorch as pl

    from bench.train.run import resume_run

    class InterruptAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 12:
                raise KeyboardInterrupt

    def run(**kw):
        return train(TASK, "switch", "tiny", overrides=SMALL + ["balance=bias"], budget={"kind": "steps", "value": 15},
                     storage=run_env["storage"], progress=False, seed=3, **kw)

    full = run()
    cut = run(extra_callbacks=[InterruptAt()])
    assert cut.status == "interrupted"
    resumed = resume_run(cut.run_id, storage=run_env["storage"], progress=False)  # from the step-10 checkpoint
    bias = [torch.load(Path(r.paths["model"]), weights_only=True)["state_dict"]["blocks.1.ffn.router.balance_bias"]
            for r in (full, resumed)]
    torch.testing.assert_close(bias[0], bias[1], rtol=0, atol=0)
    assert resumed.expert_stats[0]["eval"]["assignment_stability"] == pytest.approx(
        full.expert_stats[0]["eval"]["assignment_stability"])
