"""Char / word / BPE tokenizers on the real corpora, and the tokenizer cache."""
from __future__ import annotations

import pytest

from bench.data import tokenizers as tk
from bench.data.sources import resolve_corpus
from bench.data.tasks import load_task
from bench.data.text import lm_text, parallel_lines
from bench.data.tokenizers import (BPETokenizer, CharTokenizer, VocabSizeError, WordTokenizer,
                                   get_tokenizer, load_tokenizer)

SENTENCES = [
    "Two young, White males are outside near many bushes.",
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
    "  odd   spacing, tabs\tand <eos> or <pad> literals \u2014 ok?",
]


def test_tinyshakespeare_char_vocab_and_split_sizes(shared_data):
    task = load_task("tinyshakespeare-char")
    corpus = resolve_corpus(task, shared_data)
    train, val = lm_text(task, corpus, "train"), lm_text(task, corpus, "val")
    assert (len(train), len(val)) == (1_003_854, 111_540)  # nanoGPT: n = 1,115,394; int(n * 0.9)
    assert train + val == corpus.paths["input.txt"].read_text()
    tok = get_tokenizer(task, corpus)
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == 65
    assert tok.chars == sorted(set(train)) and tok.chars[:2] == ["\n", " "]
    assert tok.pad_id is None and tok.eos_id is None
    assert tok.decode(tok.encode(val[:500])) == val[:500]


def test_wikitext2_small_word_vocab(shared_data):
    task = load_task("wikitext2-small")
    corpus = resolve_corpus(task, shared_data)
    tok = get_tokenizer(task, corpus)
    assert isinstance(tok, WordTokenizer) and tok.vocab_size == task.vocab_size == 13_777
    assert (tok.unk_id, tok.eos_id) == (0, 1) and tok.words[2] == "the"  # specials, then by frequency
    assert tok.encode("the cat\n\nsat") == [tok.stoi["the"], tok.stoi["cat"], 1, 1, tok.stoi["sat"], 1]
    ids = tok.encode(lm_text(task, corpus, "train"))
    assert len(ids) == 217_646  # words + one <eos> per line of valid.txt, as in the PyTorch example
    assert tok.encode("zzzunseenzzz") == [0, 1]
    assert tok.decode(tok.encode(" = Homarus = \n")) == "= Homarus =\n"


def test_vocab_size_mismatch_is_a_clear_error(shared_data):
    task = load_task("tinyshakespeare-char", overrides={"vocab_size": 64})
    with pytest.raises(VocabSizeError) as e:
        get_tokenizer(task, resolve_corpus(task, shared_data))
    msg = str(e.value)
    assert "vocab_size=64 does not match" in msg and "has 65 tokens" in msg and "vocab_size: 65" in msg


@pytest.fixture
def small_bpe_task():
    # ~2,900 sentence pairs (first 10% of train) and a 1,000-token vocab keep training well under a second
    return load_task("multi30k-de-en", overrides={"splits.train.end": 0.1, "vocab_size": 1000})


def test_bpe_trains_on_train_split_caches_and_round_trips(shared_data, small_bpe_task, monkeypatch,
                                                         offline_private_cache):
    corpus = resolve_corpus(small_bpe_task, shared_data)
    calls = []
    real_train = tk.train_tokenizer
    monkeypatch.setattr(tk, "train_tokenizer", lambda task, texts: (calls.append(len(texts)), real_train(task, texts))[1])

    tok = get_tokenizer(small_bpe_task, corpus)
    src, tgt = parallel_lines(small_bpe_task, corpus, "train")
    assert calls == [len(src) + len(tgt)] == [5800]  # both sides of the training split only
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 1000
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    path = tk.tokenizer_path(small_bpe_task, corpus)
    assert path.parent == offline_private_cache / "tokenizers" and path.is_file()
    mtime = path.stat().st_mtime_ns

    again = get_tokenizer(small_bpe_task, corpus)  # second call loads, does not retrain
    assert calls == [5800] and path.stat().st_mtime_ns == mtime
    # the reverse direction has the same training data and settings: same cached tokenizer
    reverse = load_task("multi30k-en-de", overrides={"splits.train.end": 0.1, "vocab_size": 1000})
    assert tk.tokenizer_path(reverse, resolve_corpus(reverse, shared_data)) == path
    # different settings -> different key -> retrain
    other = load_task("multi30k-de-en", overrides={"splits.train.end": 0.1, "vocab_size": 900})
    get_tokenizer(other, resolve_corpus(other, shared_data))
    assert len(calls) == 2

    for s in SENTENCES + src[:20] + tgt[:20]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s == again.decode(again.encode(s))
        assert all(0 <= i < tok.vocab_size for i in ids) and tok.unk_id not in ids
    assert tok.decode([tok.bos_id, *tok.encode(SENTENCES[0]), tok.eos_id, tok.pad_id]) == SENTENCES[0]


def test_metaspace_bpe_round_trip():
    texts = SENTENCES[:3] * 20
    tok = BPETokenizer.train(texts, vocab_size=120, pre_tokenizer="metaspace", min_frequency=1)
    for s in SENTENCES[:3]:
        assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize("tok", [
    CharTokenizer.train(["a bc\n"]),
    WordTokenizer.train(["a b\nb c\n"]),
    BPETokenizer.train(SENTENCES * 5, vocab_size=300, min_frequency=1),
])
def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "tok.json")
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    text = "a b c\n" if tok.kind != "bpe" else SENTENCES[0]
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.unk_id) == (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id)


def test_char_tokenizer_rejects_unseen_characters():
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(ValueError, match="not in the training vocabulary"):
        tok.encode("abz")
