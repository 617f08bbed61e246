"""LM and translation data modules: batch shapes, shifts, determinism, padding and masks."""
from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from bench.data.datamodules import (BucketBatchSampler, LMDataModule, RandomBlockSampler, TranslationDataModule,
                                    build_datamodule, collate_pairs, unigram_baseline_loss)
from bench.data.tasks import load_task


@pytest.fixture
def shakespeare(shared_data):
    dm = LMDataModule("tinyshakespeare-char", data_dir=shared_data, batch_size=8, seq_len=32, seed=1)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_lm_batches_are_shifted_blocks(shakespeare):
    dm = shakespeare
    assert isinstance(dm, pl.LightningDataModule) and dm.vocab_size == 65
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # rows are the blocks starting at the sampler's positions (same seed and epoch -> same starts)
    loader = dm.train_dataloader()
    starts = list(loader.sampler)[:8]
    train = np.asarray(dm.ids["train"], dtype=np.int64)
    for row_x, row_y, s in zip(x, y, starts):
        assert row_x.tolist() == train[s:s + 32].tolist() and row_y.tolist() == train[s + 1:s + 33].tolist()
    assert len(loader) == (len(train) - 1) // 32 // 8  # one "epoch" ~ one pass worth of tokens
    assert x.max() < 65 and x.min() >= 0


def test_lm_train_sampling_is_seeded(shared_data, shakespeare):
    first = [b[0] for _, b in zip(range(3), shakespeare.train_dataloader())]
    same = LMDataModule("tinyshakespeare-char", data_dir=shared_data, batch_size=8, seq_len=32, seed=1)
    other = LMDataModule("tinyshakespeare-char", data_dir=shared_data, batch_size=8, seq_len=32, seed=2)
    again = [b[0] for _, b in zip(range(3), same.train_dataloader())]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], next(iter(other.train_dataloader()))[0])
    s = RandomBlockSampler(100, 50, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0 and len(list(s)) == len(s) == 50 and max(e0) < 100


def test_lm_val_blocks_are_in_order_and_non_overlapping(shakespeare):
    dm = shakespeare
    val = np.asarray(dm.ids["val"], dtype=np.int64)
    xs, ys = zip(*dm.val_dataloader())
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(x) == math.ceil((len(val) - 32) / 32)
    assert torch.equal(x.flatten(), torch.from_numpy(val[: x.numel()]))  # in order, no overlap, no gaps
    assert torch.equal(y.flatten(), torch.from_numpy(val[1: x.numel() + 1]))
    with pytest.raises(RuntimeError, match="no test split"):
        dm.test_dataloader()


def test_lm_encoded_ids_are_cached(shared_data, shakespeare, offline_private_cache, monkeypatch):
    cached = sorted((offline_private_cache / "encoded").glob("tinyshakespeare-*.npy"))
    assert [p.name.split("-")[1] for p in cached] == ["train", "val"]
    from bench.data import datamodules
    monkeypatch.setattr(datamodules, "lm_text", lambda *a: pytest.fail("should load the cached ids"))
    dm = LMDataModule("tinyshakespeare-char", data_dir=shared_data, seq_len=32)
    dm.setup()
    assert np.array_equal(dm.ids["train"], shakespeare.ids["train"])


def test_unigram_baseline(shakespeare):
    assert unigram_baseline_loss([0, 0, 1, 1], [0, 1], vocab_size=2, alpha=0) == pytest.approx(math.log(2))
    assert unigram_baseline_loss([0, 0, 0, 1], [0], vocab_size=2, alpha=0) == pytest.approx(-math.log(0.75))
    assert math.isfinite(unigram_baseline_loss([0], [1], vocab_size=2))  # smoothing: unseen tokens
    loss = shakespeare.unigram_baseline_loss()
    assert 3.0 < loss < math.log(65)  # below uniform, far above what a trained char model reaches


def test_wikitext2_small_trains_on_valid_and_evaluates_on_test(shared_data):
    dm = build_datamodule("wikitext2-small", data_dir=shared_data, batch_size=4)
    assert isinstance(dm, LMDataModule) and dm.seq_len == 128
    dm.setup()
    assert len(dm.ids["train"]) == 217_646
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 128)
    # test.txt starts " \n = Robert <unk> = \n": the blank line is just <eos>; unseen words -> <unk>
    assert dm.tokenizer.decode(x[0, :6].tolist()) == "\n= Robert <unk> =\n"


# --------------------------------------------------------------------------- translation


def test_collate_pads_and_masks():
    pad = 0
    batch = [(torch.tensor([5, 6, 2]), torch.tensor([1, 7, 8, 9, 2])),
             (torch.tensor([5, 2]), torch.tensor([1, 7, 2]))]
    out = collate_pairs(batch, pad)
    assert set(out) == {"src", "src_mask", "tgt_in", "tgt_out", "tgt_mask"}
    assert out["src"].tolist() == [[5, 6, 2], [5, 2, 0]]
    assert out["src_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert out["tgt_in"].tolist() == [[1, 7, 8, 9], [1, 7, 0, 0]]
    assert out["tgt_out"].tolist() == [[7, 8, 9, 2], [7, 2, 0, 0]]
    assert out["tgt_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert out["src_mask"].dtype == out["tgt_mask"].dtype == torch.bool


def test_bucket_batch_sampler_is_seeded_and_covers_everything():
    lengths = np.random.default_rng(0).integers(1, 60, size=1003)
    s = BucketBatchSampler(lengths, batch_size=16, seed=0, pool=8)
    batches = list(s)
    assert len(batches) == len(s)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert batches == list(BucketBatchSampler(lengths, batch_size=16, seed=0, pool=8))
    s.set_epoch(1)
    assert list(s) != batches
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.5 * np.ptp(lengths)  # batches group similar lengths


@pytest.fixture
def multi30k(shared_data):
    task = load_task("multi30k-de-en", overrides={"splits.train.end": 0.1, "vocab_size": 1000, "src_len": 16})
    dm = build_datamodule(task, data_dir=shared_data, batch_size=32, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_translation_batches(multi30k):
    dm = multi30k
    assert isinstance(dm, TranslationDataModule) and dm.pad_id == 0
    tok = dm.tokenizer
    b = next(iter(dm.train_dataloader()))
    B, S = b["src"].shape
    assert B == 32 and S <= 16 and b["tgt_in"].shape == b["tgt_out"].shape == b["tgt_mask"].shape
    assert (b["tgt_in"][:, 0] == tok.bos_id).all()
    for i in range(B):
        n_src, n_tgt = int(b["src_mask"][i].sum()), int(b["tgt_mask"][i].sum())
        assert b["src"][i, n_src - 1] == tok.eos_id and (b["src"][i, n_src:] == dm.pad_id).all()
        assert b["tgt_out"][i, n_tgt - 1] == tok.eos_id and (b["tgt_out"][i, n_tgt:] == dm.pad_id).all()
        assert torch.equal(b["tgt_in"][i, 1:n_tgt], b["tgt_out"][i, : n_tgt - 1])
    assert len(dm.train_dataloader()) == math.ceil(2900 / 32)


def test_translation_val_keeps_raw_references_in_order(multi30k):
    dm = multi30k
    refs, srcs = dm.references("val"), dm.sources("val")
    assert len(refs) == len(srcs) == 1014 and len(dm.references("test")) == 1000
    assert refs[0] == "A group of men are loading cotton onto a truck"
    first = next(iter(dm.val_dataloader()))
    n = int(first["tgt_mask"][0].sum())
    assert dm.tokenizer.decode(first["tgt_out"][0, :n].tolist()) == refs[0]  # detokenized == raw text
    total = sum(len(b["src"]) for b in dm.val_dataloader())
    assert total == 1014
    # source truncated to src_len=16 tokens, the last one <eos>
    assert max(b["src"].shape[1] for b in dm.val_dataloader()) <= 16


def test_build_datamodule_checks_type(shared_data):
    with pytest.raises(ValueError, match="needs 'translation'"):
        TranslationDataModule("tinyshakespeare-char", data_dir=shared_data)
    with pytest.raises(ValueError, match="needs 'lm'"):
        LMDataModule("multi30k-de-en", data_dir=shared_data)


class _Bigram(pl.LightningModule):
    """Smallest model that consumes both batch formats (checks the modules plug into a Trainer)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, vocab)

    def _loss(self, batch):
        if isinstance(batch, dict):
            x, y, ignore = batch["tgt_in"], batch["tgt_out"], 0
        else:
            (x, y), ignore = batch, -100
        return torch.nn.functional.cross_entropy(self.emb(x).flatten(0, 1), y.flatten(), ignore_index=ignore)

    def training_step(self, batch, i):
        return self._loss(batch)

    def validation_step(self, batch, i):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.parametrize("which", ["shakespeare", "multi30k"])
def test_lightning_trainer_fits(which, request, tmp_path):
    dm = request.getfixturevalue(which)
    trainer = pl.Trainer(max_steps=4, limit_val_batches=2, val_check_interval=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(_Bigram(dm.vocab_size), datamodule=dm)
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["val_loss"])


@pytest.mark.parametrize("which", ["shakespeare", "multi30k"])
def test_each_short_epoch_sees_new_batches_in_a_real_trainer(which, request, tmp_path):
    """train() cuts translation epochs at eval_every batches: Lightning must reshuffle each one
    (it calls set_epoch on loader.sampler / loader.batch_sampler.sampler only)."""
    dm = request.getfixturevalue(which)
    seen: list[list] = []

    class FirstBatches(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:
                x = batch["src"] if isinstance(batch, dict) else batch[0]
                seen.append(x[0].tolist())

    trainer = pl.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path, callbacks=[FirstBatches()],
                         use_distributed_sampler=False)
    trainer.fit(_Bigram(dm.vocab_size), datamodule=dm)
    assert len(seen) == 3 and seen[0] != seen[1] != seen[2] and seen[0] != seen[2]
