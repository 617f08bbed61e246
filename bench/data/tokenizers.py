"""Tokenizers behind one small interface, built from a task's training split and cached on disk.

- ``CharTokenizer``: the sorted set of characters of the training text (nanoGPT); no specials.
- ``WordTokenizer``: whitespace words plus ``<eos>`` at every line end (PyTorch word LM example;
  blank lines too, unless ``corpus.blank_lines: skip`` drops them from the text first),
  ``<unk>`` for words not seen in training, or left out by ``min_count`` / ``max_vocab``.
- ``BPETokenizer``: HF ``tokenizers`` BPE (byte-level or metaspace pre-tokenizer) with
  ``<pad>=0, <bos>=1, <eos>=2, <unk>=3``; joint over source and target for translation. An LM
  split is encoded as one text: a newline is a byte like any other (no <eos>), and the ids of a
  byte-level vocabulary decode to the split's exact text.

Every tokenizer has ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` (detokenized text,
specials dropped, ready for BLEU), ``vocab_size``, ``pad_id``/``bos_id``/``eos_id``/``unk_id``
(None where a tokenizer has no such token), ``save(path)`` and ``load_tokenizer(path)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from bench.config import ConfigError
from bench.data.sources import Corpus, DataError, atomic_write_bytes, cache_dir, resolve_corpus
from bench.data.tasks import SPECIAL_TOKENS, WORD_SPECIALS, TaskConfig
from bench.data.text import lm_text, parallel_lines, split_documents, split_lines

FORMAT_VERSION = 1  # bump when training/encoding changes, so old cached tokenizers are not reused


class VocabSizeError(ConfigError):
    """The tokenizer built from the data does not have the vocab_size the task file declares."""


class Tokenizer:
    kind = ""
    pad_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def _payload(self) -> dict:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {"kind": self.kind, "format_version": FORMAT_VERSION, **self._payload()}
        atomic_write_bytes(path, json.dumps(data, ensure_ascii=False).encode("utf-8"))
        return path

    @staticmethod
    def load(path: str | Path) -> "Tokenizer":
        return load_tokenizer(path)


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self.stoi.keys())
            raise ValueError(f"characters not in the training vocabulary: {unknown!r} "
                             "(a char vocab has no <unk>; they never occur in the training split)") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def _payload(self) -> dict:
        return {"chars": self.chars}


class WordTokenizer(Tokenizer):
    kind = "word"
    SPECIALS = WORD_SPECIALS

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        self.stoi = {w: i for i, w in enumerate(self.words)}
        self.unk_id, self.eos_id = self.stoi["<unk>"], self.stoi["<eos>"]

    @classmethod
    def train(cls, texts: Iterable[str], min_count: int = 1, max_vocab: int | None = None) -> "WordTokenizer":
        """Every word seen ``min_count`` times or more, most frequent first, at most ``max_vocab``
        entries in all (specials included); any other word encodes to <unk>."""
        counts: Counter[str] = Counter()
        for t in texts:
            for line in split_lines(t):
                counts.update(line.split())
        # specials first (fixed ids 0, 1), then by frequency; Counter keeps first-seen order on ties
        words = [w for w, n in counts.most_common() if w not in cls.SPECIALS and n >= min_count]
        if max_vocab is not None:
            words = words[:max_vocab - len(cls.SPECIALS)]
        return cls([*cls.SPECIALS, *words])

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        get, unk, eos = self.stoi.get, self.unk_id, self.eos_id
        for line in split_lines(text):
            ids.extend(get(w, unk) for w in line.split())
            ids.append(eos)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, line = [], []
        for i in ids:
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.words[i])
        if line:
            out.append(" ".join(line))
        return "".join(out)

    def _payload(self) -> dict:
        return {"words": self.words}


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        # Text that happens to contain "<eos>" etc. must stay text: otherwise it would encode to a
        # special id, which decode drops, and decode(encode(s)) != s.
        self.hf.encode_special_tokens = True
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pre_tokenizer: str = "byte_level",
              min_frequency: int = 2, prepend_scheme: str = "always") -> "BPETokenizer":
        """``prepend_scheme`` (metaspace only): "always" marks every sentence's first word as
        word-initial, as later words are; "never" keeps a text stream's spaces exactly, so it
        decodes to itself even when it starts with a space ("always" would drop that space)."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE(unk_token="<unk>"))
        extra = {}
        if pre_tokenizer == "byte_level":
            # Byte-level: every string is encodable (no <unk>), and decode restores it exactly.
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
            extra["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
        else:
            hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme)
            hf.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False, **extra)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def _payload(self) -> dict:
        return {"tokenizer": json.loads(self.hf.to_str())}


def load_tokenizer(path: str | Path) -> Tokenizer:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    kind = data.get("kind")
    if kind == "char":
        return CharTokenizer(data["chars"])
    if kind == "word":
        return WordTokenizer(data["words"])
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(data["tokenizer"])))
    raise ValueError(f"{path}: unknown tokenizer kind {kind!r}")


# --------------------------------------------------------------------------- building + caching


def _train_files(task: TaskConfig, corpus: Corpus) -> list[str]:
    if task.type == "lm":
        return split_documents(task, corpus)["train"]  # reading order: it decides ties in word counts
    # Sorted, so multi30k-de-en and multi30k-en-de train (and cache) the very same joint tokenizer.
    return sorted(task.splits.train.items)


# Settings added after tokenizers were first cached: left out of the key at their defaults, so
# the tokenizers (and encoded corpora) of existing tasks keep their cache entries.
_LATER_DEFAULTS = {"min_count": 1, "max_vocab": None}


def tokenizer_key(task: TaskConfig, corpus: Corpus) -> str:
    """Hash of everything the trained tokenizer depends on: settings + training data checksums."""
    settings = dataclasses.asdict(task.tokenizer)
    for key, default in _LATER_DEFAULTS.items():
        if settings.get(key) == default:
            del settings[key]
    if task.tokenizer.kind == "bpe":
        settings["vocab_size"] = task.tokenizer.vocab_size or task.vocab_size
        if _prepend_scheme(task) != "always":
            settings["prepend_scheme"] = _prepend_scheme(task)
    spec = task.splits.train
    blob = {
        "version": FORMAT_VERSION,
        "tokenizer": settings,
        "format": task.corpus.format,
        "train": [[f, corpus.sha256[f]] for f in _train_files(task, corpus)],
        "range": [spec.start, spec.end],
    }
    if task.corpus.tag_separator:
        blob["tag_separator"] = task.corpus.tag_separator
    if task.corpus.blank_lines != "keep":
        blob["blank_lines"] = task.corpus.blank_lines
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def training_texts(task: TaskConfig, corpus: Corpus) -> list[str]:
    """What the tokenizer learns from: the training split only (never val/test)."""
    if task.type == "lm":
        return [lm_text(task, corpus, "train")]
    src, tgt = parallel_lines(task, corpus, "train")
    by_file = {task.splits.train.src: src, task.splits.train.tgt: tgt}
    return [line for f in _train_files(task, corpus) for line in by_file[f]]


def train_tokenizer(task: TaskConfig, texts: list[str]) -> Tokenizer:
    cfg = task.tokenizer
    if cfg.kind == "char":
        return CharTokenizer.train(texts)
    if cfg.kind == "word":
        return WordTokenizer.train(texts, cfg.min_count, cfg.max_vocab)
    return BPETokenizer.train(texts, cfg.vocab_size or task.vocab_size, cfg.pre_tokenizer, cfg.min_frequency,
                              _prepend_scheme(task))


def _prepend_scheme(task: TaskConfig) -> str:
    # Metaspace BPE: translation reads sentences, an LM one stream whose spaces must all survive.
    return "never" if task.type == "lm" and task.tokenizer.pre_tokenizer == "metaspace" else "always"


def check_vocab_size(task: TaskConfig, tok: Tokenizer) -> None:
    """A declared vocab_size must be the data's; an absent one is the data's by definition."""
    if task.vocab_size is not None and tok.vocab_size != task.vocab_size:
        # Not `--set vocab_size`: that resizes the model and leaves the task's (wrong) value as it was.
        bpe_hint = (" (or give BPE more training text)"
                    if tok.kind == "bpe" and tok.vocab_size < task.vocab_size else "")
        raise VocabSizeError(
            [f"vocab_size={task.vocab_size} does not match the data: the {tok.kind} tokenizer built from "
             f"the training split has {tok.vocab_size} tokens. Edit the task's YAML file: set "
             f"`vocab_size: {tok.vocab_size}`, or remove the vocab_size line to have it derived from the data"
             + bpe_hint],
            f"task {task.name!r}",
        )


def tokenizer_path(task: TaskConfig, corpus: Corpus, cache: str | Path | None = None) -> Path:
    size = f"{task.tokenizer.vocab_size or task.vocab_size}" if task.tokenizer.kind == "bpe" else ""
    name = f"{Path(task.corpus.dir).name}-{task.tokenizer.kind}{size}-{tokenizer_key(task, corpus)[:16]}.json"
    return cache_dir(cache) / "tokenizers" / name


def get_tokenizer(task: TaskConfig, corpus: Corpus, cache: str | Path | None = None,
                  check: bool = True) -> Tokenizer:
    """Load the task's tokenizer from the cache, or train it on the training split and cache it.

    With ``check`` (default) its size must equal ``task.vocab_size`` (VocabSizeError otherwise).
    """
    path = tokenizer_path(task, corpus, cache)
    tok = None
    if path.is_file():
        try:
            tok = load_tokenizer(path)
        except Exception:  # noqa: BLE001 - any unreadable cache entry (incl. HF parse errors)
            tok = None  # unreadable cache entry: retrain and overwrite it
    if tok is None:
        tok = train_tokenizer(task, training_texts(task, corpus))
        tok.save(path)
    if check:
        check_vocab_size(task, tok)
    return tok


def derive_vocab_size(task: TaskConfig, data_dir: str | Path | None = None, *, cache: str | Path | None = None,
                      allow_download: bool | None = None) -> TaskConfig:
    """The task with the vocab_size its models are built with, checked before any run exists.

    Finds and verifies the data and builds (or loads) the tokenizer from the training split; a
    task without vocab_size gets the tokenizer's size, a task with one must match it. Raises
    DataError or VocabSizeError with the fix.
    """
    tok = get_tokenizer(task, resolve_corpus(task, data_dir, cache=cache, allow_download=allow_download), cache)
    return task if task.vocab_size is not None else dataclasses.replace(task, vocab_size=tok.vocab_size)


def data_fingerprint(task: TaskConfig, data_dir: str | Path | None = None, *, cache: str | Path | None = None,
                     allow_download: bool | None = None) -> dict[str, str]:
    """{file: sha256} of every corpus file the task reads, sorted by name (kept in a run's record so
    ``--resume`` can tell that the data changed even when the vocabulary size did not)."""
    corpus = resolve_corpus(task, data_dir, cache=cache, allow_download=allow_download)
    return dict(sorted(corpus.sha256.items()))


def check_resumed_vocab_size(task: TaskConfig, recorded: int, run_id: str, data_dir: str | Path | None = None, *,
                             recorded_sha256: dict[str, str] | None = None, cache: str | Path | None = None,
                             allow_download: bool | None = None) -> None:
    """A resumed run continues a model built for ``recorded`` tokens on the data it started with:
    the task's files must still have the sha256s it recorded (``recorded_sha256``; records made
    before it was kept have none) and give a tokenizer of that size. Raises DataError (data missing,
    corrupt or changed) or VocabSizeError (the tokenizer changed) before the run is touched."""
    corpus = resolve_corpus(task, data_dir, cache=cache, allow_download=allow_download)
    if recorded_sha256 is not None:
        now = dict(corpus.sha256)
        changed = sorted(f for f in set(now) | set(recorded_sha256) if now.get(f) != recorded_sha256.get(f))
        if changed:
            def state(f: str) -> str:
                if f not in recorded_sha256:
                    return f"{f} (new)"
                return f"{f} (gone)" if f not in now else f"{f} (sha256 {recorded_sha256[f][:12]} -> {now[f][:12]})"
            shown = ", ".join(state(f) for f in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise DataError(f"run {run_id} trained on other data: the task's files changed since it started: "
                            f"{shown}. Put back the data it trained on to resume it, or start a new run")
    tok = get_tokenizer(task, corpus, cache, check=False)  # a declared vocab_size gets the message below too
    if tok.vocab_size != recorded:
        raise VocabSizeError(
            [f"run {run_id} was built for a vocabulary of {recorded} tokens, but the {tok.kind} tokenizer built "
             f"from the task's training split now has {tok.vocab_size}: the data (or the tokenizer settings) "
             "changed since the run started. Put back the data it trained on to resume it, or start a new run"],
            "resume",
        )
