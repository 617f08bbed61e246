"""corpus.blank_lines: `keep` (default) gives every blank line an <eos>, as WikiText's official
counts do; `skip` drops lines of nothing but whitespace before any tokenizer sees the text."""
from __future__ import annotations

import pytest

from bench.config import ConfigError
from bench.data.datamodules import encoded_ids
from bench.data.sources import resolve_corpus
from bench.data.tasks import load_task, parse_task
from bench.data.text import drop_blank_lines, lm_text, prepare_text
from bench.data.tokenizers import CharTokenizer, WordTokenizer, get_tokenizer, tokenizer_path

DOC = "a b\n\n   \nc\n\t\nd"  # 6 lines: 3 blank ("", three spaces, a tab), the last one unterminated


@pytest.mark.parametrize("text, expect", [
    ("a\n\n \nb\n", "a\nb\n"),
    ("\n\na", "a"),
    ("a\n  ", "a\n"),  # an unterminated last line of spaces is blank too
    ("a\r\n\r\nb\r\n", "a\r\nb\r\n"),  # "\r" is whitespace: a blank CRLF line goes, the others keep theirs
    (" a \n\u3000\n", " a \n"),  # other lines keep their spaces; U+3000 is whitespace
    ("", ""),
    ("\n\n", ""),
])
def test_drop_blank_lines(text, expect):
    assert drop_blank_lines(text) == expect


def _task(blank_lines: str | None = None, kind: str = "word", **corpus) -> dict:
    c = {"dir": "blank", "files": [{"name": n} for n in ("doc.txt", "empty.txt", "end.txt")], **corpus}
    if blank_lines:
        c["blank_lines"] = blank_lines
    return {"name": "blank", "type": "lm", "description": "blank lines", "corpus": c,
            "splits": {"train": {"files": ["doc.txt", "empty.txt", "end.txt"]}, "val": {"file": "doc.txt"}},
            "tokenizer": {"kind": kind}, "seq_len": 2, "metrics": ["loss"]}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "doc.txt").write_text(DOC)
    (tmp_path / "blank" / "empty.txt").write_text("")
    (tmp_path / "blank" / "end.txt").write_text("e\n")
    return tmp_path


def _words(tok: WordTokenizer, ids: list[int]) -> list[str]:
    return [tok.words[i] for i in ids]


def test_keep_is_the_default_and_gives_each_blank_line_an_eos(root):
    task = parse_task(_task())
    assert task.corpus.blank_lines == "keep"
    corpus = resolve_corpus(task, root)
    tok = get_tokenizer(task, corpus)
    val = _words(tok, tok.encode(lm_text(task, corpus, "val")))
    assert val == ["a", "b", "<eos>", "<eos>", "<eos>", "c", "<eos>", "<eos>", "d", "<eos>"]
    # Documents are joined by a newline where one lacks it; an empty document adds no (blank) line.
    assert lm_text(task, corpus, "train") == DOC + "\n" + "e\n"


def test_skip_drops_blank_lines_before_tokenizing(root):
    task = parse_task(_task("skip"))
    corpus = resolve_corpus(task, root)
    assert lm_text(task, corpus, "val") == "a b\nc\nd"
    tok = get_tokenizer(task, corpus)
    assert _words(tok, tok.encode(lm_text(task, corpus, "val"))) == ["a", "b", "<eos>", "c", "<eos>", "d", "<eos>"]
    assert tok.vocab_size == 2 + 5  # a, b, c, d, e and the specials: blank lines have no words
    # Cached apart from the default's tokenizer and ids: 7 val tokens here, 10 with keep.
    keep = parse_task(_task())
    assert tokenizer_path(task, corpus) != tokenizer_path(keep, corpus)
    assert len(encoded_ids(task, corpus, tok, "val")) == 7
    assert len(encoded_ids(keep, corpus, get_tokenizer(keep, corpus), "val")) == 10


def test_skip_applies_to_char_text_and_after_tag_stripping(root):
    task = parse_task(_task("skip", kind="char"))
    corpus = resolve_corpus(task, root)
    tok = get_tokenizer(task, corpus)
    assert isinstance(tok, CharTokenizer) and tok.chars == ["\n", " ", "a", "b", "c", "d", "e"]
    assert len(tok.encode(lm_text(task, corpus, "val"))) == len("a b\nc\nd") == 7
    tagged = parse_task(_task("skip", tag_separator="/"))
    # "/." is a word "" (tag "."): its line has no word left, so it is blank.
    assert prepare_text(tagged, "The/at cat/nn\n/.\nsat/vbd\n") == "The cat\nsat\n"


def test_wikitext_keeps_its_official_counts_and_skip_removes_exactly_the_blank_lines(shared_data):
    task = load_task("wikitext2-small")
    skip = load_task("wikitext2-small", overrides={"corpus.blank_lines": "skip"})
    corpus = resolve_corpus(task, shared_data)
    lines = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").split("\n")[:-1]
    blank = sum(1 for line in lines if not line.split())
    assert (len(lines), blank) == (3760, 1299)  # WikiText separates paragraphs and headings by " " lines
    keep_tok, skip_tok = get_tokenizer(task, corpus), get_tokenizer(skip, corpus)
    assert len(keep_tok.encode(lm_text(task, corpus, "train"))) == 217_646  # the PyTorch example's count
    assert len(skip_tok.encode(lm_text(skip, corpus, "train"))) == 217_646 - blank
    assert skip_tok.words == keep_tok.words and skip_tok.vocab_size == 13_777


def test_blank_lines_is_validated():
    with pytest.raises(ConfigError, match="corpus.blank_lines='drop' is not allowed: expected one of 'keep', 'skip'"):
        parse_task(_task("drop"))
    with pytest.raises(ConfigError, match="corpus.blank_lines='skip' is not allowed for type='translation'"):
        load_task("multi30k-de-en", overrides={"corpus.blank_lines": "skip"})
