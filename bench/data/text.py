"""Read corpus files and cut them into the task's splits (raw text, before tokenization)."""
from __future__ import annotations

import gzip
from pathlib import Path

from bench.data.sources import Corpus
from bench.data.tasks import SplitSpec, TaskConfig


def read_text(path: str | Path, fmt: str) -> str:
    """Whole file as text. Bytes are decoded as-is (no newline translation) so splits are exact."""
    raw = Path(path).read_bytes()
    if fmt.startswith("gzip"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


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


def lm_text(task: TaskConfig, corpus: Corpus, split: str) -> str:
    """The raw text of an LM split (a character range of its file)."""
    spec = split_spec(task, split)
    text = read_text(corpus.path(spec.file), task.corpus.format)
    return text[_cut(len(text), spec)]


def parallel_lines(task: TaskConfig, corpus: Corpus, split: str) -> tuple[list[str], list[str]]:
    """(source sentences, target sentences) of a translation split, aligned by line."""
    spec = split_spec(task, split)
    src = read_lines(corpus.path(spec.src), task.corpus.format)
    tgt = read_lines(corpus.path(spec.tgt), task.corpus.format)
    if len(src) != len(tgt):
        raise ValueError(f"task {task.name!r} split {split}: {spec.src} has {len(src)} lines but "
                         f"{spec.tgt} has {len(tgt)}; parallel files must align line by line")
    cut = _cut(len(src), spec)
    return src[cut], tgt[cut]
