"""Read corpus files and cut them into the task's splits (raw text, before tokenization).

An LM split reads one or more documents (files) one after the other; see ``split_documents``
for how names, glob patterns and the every-n-th-document rule choose them.
"""
from __future__ import annotations

import gzip
from pathlib import Path

from bench.data.sources import Corpus, DataError
from bench.data.tasks import SplitSpec, TaskConfig, is_pattern

SPLITS = ("train", "val", "test")


def read_text(path: str | Path, fmt: str) -> str:
    """Whole file as text. Bytes are decoded as-is (no newline translation) so splits are exact."""
    raw = Path(path).read_bytes()
    if fmt.startswith("gzip"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def strip_tags(text: str, separator: str) -> str:
    """``The/at jury/nn`` -> ``The jury``, line by line (line count kept, so parallel files stay
    aligned); the tag is what follows the last separator, and a token without one is kept."""
    def word(token: str) -> str:
        return token.rsplit(separator, 1)[0] if separator in token else token

    return "\n".join(" ".join(w for w in map(word, line.split()) if w) for line in text.split("\n"))


def drop_blank_lines(text: str) -> str:
    """``text`` without its lines of nothing but whitespace (the lines in which ``str.split``
    finds no word); every other line is kept byte for byte, with its newline."""
    lines = text.split("\n")
    last = lines.pop()  # what follows the final newline: "" or an unterminated last line
    return "".join(line + "\n" for line in lines if line.strip()) + (last if last.strip() else "")


def prepare_text(task: TaskConfig, text: str) -> str:
    """Decoded text as the task's tokenizer sees it: tags stripped (``corpus.tag_separator``),
    then blank lines dropped (``corpus.blank_lines: skip``), in that order, so a line left with
    only tags counts as blank."""
    sep = task.corpus.tag_separator
    if sep:
        text = strip_tags(text, sep)
    if task.corpus.blank_lines == "skip":
        text = drop_blank_lines(text)
    return text


def read_document(task: TaskConfig, path: str | Path) -> str:
    """One corpus file as the task reads it (see ``prepare_text``)."""
    return prepare_text(task, read_text(path, task.corpus.format))


def split_lines(text: str) -> list[str]:
    """Lines split on "\n" only (str.splitlines also splits on \x85, \u2028, ..., which would
    misalign parallel files); a trailing newline does not make an extra empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [l[:-1] if l.endswith("\r") else l for l in lines]


def read_lines(path: str | Path, fmt: str) -> list[str]:
    """One entry per line, line terminators removed."""
    return split_lines(read_text(path, fmt))


def _cut(n: int, spec: SplitSpec) -> slice:
    # int(n * frac) on both ends, like nanoGPT's data[:int(n*0.9)] / data[int(n*0.9):], so adjacent
    # splits share a boundary and never overlap or leave a gap.
    return slice(int(n * spec.start), int(n * spec.end))


def split_spec(task: TaskConfig, split: str) -> SplitSpec:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} is not allowed: expected one of 'train', 'val', 'test'")
    spec = getattr(task.splits, split)
    if not spec.defined:
        raise ValueError(f"task {task.name!r} has no {split} split (see splits in its YAML file)")
    return spec


def _listed(spec: SplitSpec, corpus: Corpus) -> list[str]:
    """The split's names with each pattern replaced by its sorted matches; a file named twice counts once."""
    names: list[str] = []
    for item in spec.items:
        names.extend(corpus.matches[item] if is_pattern(item) else [item])
    return list(dict.fromkeys(names))


def split_documents(task: TaskConfig, corpus: Corpus) -> dict[str, list[str]]:
    """Documents (file names in the corpus dir) of each defined LM split, in reading order.

    A split with ``every: n, offset: k`` keeps documents k, k + n, k + 2n, ... of its list; those
    documents are taken out of train, which keeps the rest. Raises DataError when a split gets no
    document or val and test would share one (evaluating on the same text twice is never meant).
    """
    docs = {s: _listed(getattr(task.splits, s), corpus) for s in SPLITS if task.has_split(s)}
    held_out: dict[str, str] = {}
    for split in ("val", "test"):
        spec = getattr(task.splits, split)
        if split not in docs or spec.every is None:
            continue
        listed = docs[split]
        docs[split] = listed[spec.offset::spec.every]
        for d in docs[split]:
            if d in held_out:
                raise DataError(f"task {task.name!r}: document {d} is in both {held_out[d]} and {split}; give "
                                f"splits.val and splits.test different offsets (or every values)")
            held_out[d] = split
        if not docs[split]:
            raise DataError(f"task {task.name!r}: splits.{split} gets no document: its files list "
                            f"{len(listed)} documents, and every={spec.every} from offset={spec.offset} picks none")
    docs["train"] = [d for d in docs["train"] if d not in held_out]
    if not docs["train"]:
        raise DataError(f"task {task.name!r}: splits.train gets no document: val/test's every rule took "
                        "all of its files")
    return docs


def lm_text(task: TaskConfig, corpus: Corpus, split: str) -> str:
    """The raw text of an LM split: its documents one after the other (each ends in a newline,
    so no two run together), then the split's character range of that text."""
    spec = split_spec(task, split)
    docs = [read_document(task, corpus.path(d)) for d in split_documents(task, corpus)[split]]
    text = "".join(_joinable(t, last=i == len(docs) - 1) for i, t in enumerate(docs))
    return text[_cut(len(text), spec)]


def _joinable(doc: str, last: bool) -> str:
    # An empty document has no line to end: a newline for it would be a blank line that is not
    # in the data (an <eos> for the word tokenizer, even with blank_lines: skip).
    return doc if last or not doc or doc.endswith("\n") else doc + "\n"


def parallel_lines(task: TaskConfig, corpus: Corpus, split: str) -> tuple[list[str], list[str]]:
    """(source sentences, target sentences) of a translation split, aligned by line."""
    spec = split_spec(task, split)
    src = split_lines(read_document(task, corpus.path(spec.src)))
    tgt = split_lines(read_document(task, corpus.path(spec.tgt)))
    if len(src) != len(tgt):
        raise ValueError(f"task {task.name!r} split {split}: {spec.src} has {len(src)} lines but "
                         f"{spec.tgt} has {len(tgt)}; parallel files must align line by line")
    cut = _cut(len(src), spec)
    return src[cut], tgt[cut]
