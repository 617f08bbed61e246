"""BPE for LM tasks: trained on the training split only, newlines kept as bytes (no <eos>), exact
decoding, the vocabulary size derived or checked, and a short run through `moe-bench train`."""
from __future__ import annotations

import json

import pytest

from bench.data import tokenizers as tk
from bench.data.sources import resolve_corpus
from bench.data.tasks import load_task, parse_task
from bench.data.text import lm_text
from bench.data.tokenizers import VocabSizeError, derive_vocab_size, get_tokenizer, tokenizer_path
from bench.tracking.records import ResultsStore

TRAIN_DOC = "the cat sat\n" * 50
VAL_DOC = "zyx wvu\n" * 5  # none of its letters is in the training text


def _task(**tokenizer) -> dict:
    return {
        "name": "cats", "type": "lm", "description": "synthetic",
        "corpus": {"dir": "cats", "files": [{"name": "train.txt"}, {"name": "val.txt"}]},
        "splits": {"train": {"file": "train.txt"}, "val": {"file": "val.txt"}},
        "tokenizer": {"kind": "bpe", "vocab_size": 300, **tokenizer},
        "seq_len": 8, "metrics": ["loss"],
    }


@pytest.fixture
def cats(tmp_path):
    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "train.txt").write_text(TRAIN_DOC)
    (root / "cats" / "val.txt").write_text(VAL_DOC)
    return root


def test_bpe_learns_only_the_training_split_and_its_size_is_derived(cats):
    task = parse_task(_task())
    corpus = resolve_corpus(task, cats)
    tok = get_tokenizer(task, corpus)
    # Pairs by count: a+t (100) first, then 2 merges each for "the", "Ġc at", "Ġs at": 7 merges in all,
    # after which every word is one token and nothing is left to merge (the 300 asked for is not reached).
    assert tok.vocab_size == 4 + 256 + 7
    assert derive_vocab_size(task, cats).vocab_size == 267
    ids = tok.encode("the cat sat\n")
    assert [tok.hf.id_to_token(i) for i in ids] == ["the", "\u0120cat", "\u0120sat", "\u010a"]  # Ġ space, Ċ newline
    merged = [t for t in tok.hf.get_vocab() if len(t) > 1 and not t.startswith("<")]
    assert len(merged) == 7 and all(set(t) <= set("thecas\u0120") for t in merged)
    # The val text was never seen: one id per byte ("zyx" 3, "Ġ" "wvu" 4, newline 1).
    assert len(tok.encode("zyx wvu\n")) == 8
    val_ids = tok.encode(lm_text(task, corpus, "val"))
    assert len(val_ids) == 5 * 8 and tok.decode(val_ids) == VAL_DOC


def test_a_declared_vocab_size_bpe_cannot_reach_says_so(cats):
    task = parse_task({**_task(vocab_size=None), "vocab_size": 300})
    with pytest.raises(VocabSizeError) as e:
        derive_vocab_size(task, cats)
    msg = str(e.value)
    assert "has 267 tokens" in msg and "`vocab_size: 267`" in msg and "give BPE more training text" in msg


LM_TEXT = " = Title = \n \n first line\r\n\tsecond  line\n\n\nlast"  # leading space, blank lines, no final newline


@pytest.mark.parametrize("pre_tokenizer, vocab_size", [("byte_level", 300), ("metaspace", 40)])
def test_an_lm_text_stream_decodes_to_itself(tmp_path, pre_tokenizer, vocab_size):
    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "train.txt").write_text(LM_TEXT * 20)
    (root / "cats" / "val.txt").write_text(LM_TEXT)
    task = parse_task(_task(pre_tokenizer=pre_tokenizer, vocab_size=vocab_size, min_frequency=1))
    corpus = resolve_corpus(task, root)
    tok = get_tokenizer(task, corpus)
    for split in ("train", "val"):
        text = lm_text(task, corpus, split)
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # newlines, "\r", tabs, runs of spaces and the leading space kept
        assert all(4 <= i < tok.vocab_size for i in ids)  # text never encodes to a special (<eos> included)
    # Each newline is a token of its own (byte-level) or inside one; never an <eos>.
    assert tok.eos_id not in tok.encode("a\nb\n")


def test_the_tokenizer_cache_key_follows_the_settings(cats):
    by_tokenizer = parse_task(_task())
    by_task = parse_task({**_task(vocab_size=None), "vocab_size": 300})
    corpus = resolve_corpus(by_tokenizer, cats)
    # The same BPE target, whichever key says it: one cached tokenizer.
    assert tokenizer_path(by_tokenizer, corpus) == tokenizer_path(by_task, corpus)
    others = [parse_task(_task(vocab_size=400)), parse_task(_task(pre_tokenizer="metaspace")),
              parse_task({**_task(), "corpus": {**_task()["corpus"], "blank_lines": "skip"}})]
    paths = {tokenizer_path(t, corpus) for t in [by_tokenizer, *others]}
    assert len(paths) == 4


def test_tinyshakespeare_bpe_task(shared_data, monkeypatch):
    task = load_task("tinyshakespeare-bpe")
    corpus = resolve_corpus(task, shared_data)
    texts = []
    real_train = tk.train_tokenizer
    monkeypatch.setattr(tk, "train_tokenizer", lambda t, x: (texts.extend(x), real_train(t, x))[1])
    tok = get_tokenizer(task, corpus)
    train, val = lm_text(task, corpus, "train"), lm_text(task, corpus, "val")
    assert texts == [train] and len(train) == 1_003_854  # the first 90% of the characters only
    assert tok.vocab_size == task.vocab_size == 2048
    train_ids, val_ids = tok.encode(train), tok.encode(val)
    # Measured: 2.89 characters per token on train, 2.56 on the unseen val text.
    assert (len(train_ids), len(val_ids)) == (346_967, 43_575)
    assert tok.decode(val_ids) == val and tok.decode(train_ids) == train
    assert max(train_ids + val_ids) < 2048 and min(train_ids + val_ids) >= 4


def test_train_a_bpe_lm_task_through_the_cli(shared_data, train_cli):
    settings = ["d_model=32", "n_layers=2", "n_heads=2", "d_ff=64", "batch_size=4", "eval_every=2",
                "eval_batches=1", "warmup_steps=1", "precision=32"]
    rc, out, err = train_cli("--task", "tinyshakespeare-bpe", "--model", "dense", "--budget-steps", 2,
                             "--data-dir", shared_data, "--json", *[a for s in settings for a in ("--set", s)])
    assert rc == 0, err
    record = ResultsStore(train_cli.storage).get(json.loads(out.strip().splitlines()[-1])["run_id"])
    assert record.status == "finished" and record.steps == 2 and record.tokens_seen == 2 * 4 * 128
    assert record.config["model"]["vocab_size"] == record.config["data_vocab_size"] == 2048
    # Near-uniform after 2 steps: the loss of guessing among 2,048 tokens, ln 2048 = 7.62.
    assert 6.5 < record.metrics["val_loss"] < 8.5
    # The task lists bits_per_char: the val split's bits over its characters (43,575 tokens, 111,540 chars).
    m = record.metrics
    assert m["val_bits_per_char"] == pytest.approx(m["val_bits_per_token"] * 43_575 / 111_540, rel=1e-9)
