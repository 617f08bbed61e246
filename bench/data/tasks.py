"""Task definitions: one YAML file in ``tasks/`` per benchmark task, parsed into ``TaskConfig``.

A task says *what* data a run uses (corpus files and where they come from, how the splits are cut,
how text becomes ids) and the sizes a model needs before any data is loaded (``vocab_size``,
``seq_len`` / ``src_len`` / ``tgt_len``). Parsing reuses ``bench.config`` so a bad value is
reported the same way as a bad model setting: field, value and what is allowed, all at once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from bench.config import ConfigError, apply_overrides, check, from_dict

TASK_TYPES = ("lm", "translation")
FORMATS = ("text", "gzip-text", "lines", "gzip-lines")
LINE_FORMATS = ("lines", "gzip-lines")
METRICS = {
    "lm": ("loss", "perplexity", "bits_per_token", "bits_per_char"),
    "translation": ("loss", "perplexity", "bleu", "chrf"),
}
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # BPE ids 0..3, in this order
WORD_SPECIALS = ("<unk>", "<eos>")  # word tokenizer ids 0, 1
SUMS_FILE = "SHA256SUMS"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_GLOB_CHARS = set("*?[")


def is_pattern(name: str) -> bool:
    """A glob pattern (``c*``, ``docs/*.txt``, ``ca0[1-9]``) rather than one file name."""
    return bool(_GLOB_CHARS & set(name))


def _relative_problem(key: str, name: str) -> list[str]:
    if not name:
        return [f"{key} is required"]
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return [f"{key}={name!r} is not allowed: must be a relative path inside the corpus dir"]
    return []


def default_tasks_dir() -> Path:
    """The repository's ``tasks/`` folder (next to the ``bench`` package)."""
    return Path(__file__).resolve().parents[2] / "tasks"


@dataclass
class FileSpec:
    """One corpus file. ``name`` is where it lives inside the corpus directory."""

    name: str = ""
    url: Optional[str] = None  # where to download it from when no local copy exists
    sha256: Optional[str] = None  # of the file itself (of the extracted member for archives)
    git_blob: Optional[str] = None  # git blob id (sha1), for files only known by their git id
    member: Optional[str] = None  # set when ``url`` is a .zip/.tar(.gz): the path inside it

    def problems(self) -> list[str]:
        p = _relative_problem("name", self.name)
        if is_pattern(self.name):
            # A pattern stands for files only known once it is expanded: nothing to download or pin.
            given = [k for k in ("url", "sha256", "git_blob", "member") if getattr(self, k) is not None]
            if given:
                p.append(f"name={self.name!r} is a glob pattern, so {', '.join(given)} is not allowed: pin matched "
                         f"files with a {SUMS_FILE} file in the corpus dir instead")
        if self.url is not None and not re.match(r"^(https?|file)://", self.url):
            p.append(f"url={self.url!r} is not allowed: expected an http(s):// or file:// URL")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            p.append(f"sha256={self.sha256!r} is not allowed: expected 64 lowercase hex digits")
        if self.git_blob is not None and not _SHA1.match(self.git_blob):
            p.append(f"git_blob={self.git_blob!r} is not allowed: expected 40 lowercase hex digits")
        if self.member is not None and self.url is None:
            p.append(f"member={self.member!r} is not allowed without url (the archive to extract it from)")
        return p


@dataclass
class CorpusConfig:
    dir: str = ""  # subdirectory of the data dir / cache dir holding the files
    format: Literal["text", "gzip-text", "lines", "gzip-lines"] = "text"
    files: list = field(default_factory=list)  # list[FileSpec] (dicts from YAML are converted)
    # Tagged text: each whitespace-separated token "word<sep>TAG" is read as "word" (cut at the
    # last separator, so "1/2/cd" -> "1/2"); tokens without the separator are kept as they are.
    tag_separator: Optional[str] = None
    # Lines with nothing but whitespace. "keep" (default) reads them like any line: the word
    # tokenizer gives each one an <eos>, which WikiText's 33,278-word vocabulary and token counts
    # assume. "skip" drops them before tokenizing, so a corpus with blank separator lines does
    # not train on runs of <eos> (or of newlines, for char and BPE).
    blank_lines: Literal["keep", "skip"] = "keep"

    def __post_init__(self):
        # bench.config.from_dict only builds nested dataclasses for plain fields, not for list
        # items; convert here (collecting problems for problems()) so overrides round-trip too.
        self._file_problems: list[str] = []
        files = []
        for i, f in enumerate(self.files):
            if isinstance(f, dict):
                f = from_dict(FileSpec, f, prefix=f"files[{i}].", problems=self._file_problems)
            if isinstance(f, FileSpec):
                self._file_problems.extend(f"files[{i}].{q}" for q in f.problems())
            else:
                self._file_problems.append(f"files[{i}]={f!r} is not allowed: expected a mapping")
            files.append(f)
        self.files = files

    def file(self, name: str) -> FileSpec:
        for f in self.files:
            if isinstance(f, FileSpec) and f.name == name:
                return f
        raise KeyError(name)

    def problems(self) -> list[str]:
        p = list(self._file_problems)
        if not self.dir or Path(self.dir).is_absolute() or ".." in Path(self.dir).parts:
            p.append(f"dir={self.dir!r} is not allowed: expected a relative directory name")
        if self.tag_separator is not None and (not self.tag_separator or any(c.isspace() for c in self.tag_separator)):
            p.append(f"tag_separator={self.tag_separator!r} is not allowed: expected a non-empty string without "
                     "whitespace, e.g. '/' for word/TAG")
        names = [f.name for f in self.files if isinstance(f, FileSpec)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            p.append(f"files lists {', '.join(dupes)} more than once")
        return p


@dataclass
class SplitSpec:
    """A split is a [start, end) fraction of one file, of several files read one after the other
    (LM), or of a parallel file pair (translation).

    LM files are names or glob patterns inside the corpus dir; a pattern's matches are taken in
    sorted order. ``every``/``offset`` cut a corpus of many documents (files) by document: a val
    or test split keeps documents ``offset, offset + every, ...`` of its list, and those documents
    are removed from train (train keeps the rest)."""

    file: Optional[Union[str, list]] = None  # LM: one file name or pattern (a list is reported)
    files: list[str] = field(default_factory=list)  # LM: several names / patterns, in this order
    src: Optional[str] = None  # translation: source-language file
    tgt: Optional[str] = None  # translation: target-language file
    start: float = 0.0  # fraction of characters (LM) or of lines (translation)
    end: float = 1.0
    every: Optional[int] = None  # LM val/test: every n-th document of the list ...
    offset: int = 0  # ... starting at this one (0-based)

    @property
    def defined(self) -> bool:
        return bool(self.file or self.files or self.src or self.tgt)

    @property
    def items(self) -> list[str]:
        """The names and patterns this split reads, in order."""
        one = [self.file] if isinstance(self.file, str) and self.file else []
        return one + list(self.files) + [f for f in (self.src, self.tgt) if f]

    def problems(self) -> list[str]:
        p = []
        if not 0.0 <= self.start < self.end <= 1.0:
            p.append(f"start={self.start}, end={self.end} is not allowed: need 0 <= start < end <= 1")
        if isinstance(self.file, list):
            p.append(f"file={self.file!r} is not allowed: file names one file or pattern; "
                     f"for several use files: {self.file!r}")
        elif self.file:
            p.extend(_relative_problem("file", self.file))
            if self.files:
                p.append("file and files are not allowed together: put every name in files")
        for i, name in enumerate(self.files):
            p.extend(_relative_problem(f"files[{i}]", name))
        if self.every is not None and self.every < 2:
            p.append(f"every={self.every} is not allowed: must be >= 2 (every n-th document)")
        elif self.every is not None and not 0 <= self.offset < self.every:
            p.append(f"offset={self.offset} is not allowed: need 0 <= offset < every={self.every}")
        if self.every is None and self.offset != 0:
            p.append(f"offset={self.offset} is not allowed without every")
        return p


@dataclass
class SplitsConfig:
    train: SplitSpec = field(default_factory=SplitSpec)
    val: SplitSpec = field(default_factory=SplitSpec)
    test: SplitSpec = field(default_factory=SplitSpec)  # may be left out (no file) = no test split


@dataclass
class TokenizerConfig:
    kind: Literal["char", "word", "bpe"] = "char"
    vocab_size: Optional[int] = None  # BPE training target; null = the task's vocab_size
    joint: bool = True  # translation: one vocabulary for source and target (models share embeddings)
    pre_tokenizer: Literal["byte_level", "metaspace"] = "byte_level"  # BPE only
    min_frequency: int = 2  # BPE only: merges need a pair seen at least this often
    # Word only, counted on the training split: rarer words, and words beyond the max_vocab most
    # frequent, are read as <unk>. max_vocab counts <unk> and <eos> too: it is the vocabulary size.
    min_count: int = 1
    max_vocab: Optional[int] = None


@dataclass
class TaskConfig:
    name: str = ""
    type: Literal["lm", "translation"] = "lm"
    description: str = ""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: Optional[int] = None  # LM block length (tokens per training example)
    src_len: Optional[int] = None  # translation: max source tokens (incl. <eos>)
    tgt_len: Optional[int] = None  # translation: max decoder input/output tokens
    # Vocabulary size the models are built with. null: the size of the tokenizer built from the
    # training split (bench.data.tokenizers.derive_vocab_size); given: checked against it.
    vocab_size: Optional[int] = None
    src_lang: Optional[str] = None
    tgt_lang: Optional[str] = None
    metrics: list[str] = field(default_factory=list)

    @property
    def max_seq_len(self) -> int:
        """Longest sequence a model sees: what ``ModelConfig.max_seq_len`` must cover."""
        if self.type == "lm":
            return int(self.seq_len or 0)
        return max(int(self.src_len or 0), int(self.tgt_len or 0))

    @property
    def target_len(self) -> int:
        """Tokens per example that FLOPs per token are counted at: the LM block length, or the
        translation target length (the encoder's cost per target token included)."""
        return int(self.seq_len if self.type == "lm" else self.tgt_len)

    def has_split(self, split: str) -> bool:
        return getattr(self.splits, split).defined

    def problems(self) -> list[str]:
        p: list[str] = []
        if not self.name:
            p.append("name is required")
        if self.vocab_size is not None and self.vocab_size < 1:
            p.append(f"vocab_size={self.vocab_size} is not allowed: must be >= 1 (or left out: derived from the data)")
        tok = self.tokenizer
        if tok.kind in ("char", "word") and tok.vocab_size is not None:
            cap = " or tokenizer.max_vocab to cap a word vocabulary" if tok.kind == "word" else ""
            p.append(f"tokenizer.vocab_size={tok.vocab_size} is not allowed for kind={tok.kind!r}: "
                     f"the vocabulary comes from the training text (set the task's vocab_size instead{cap})")
        if tok.kind != "word":
            for key, default in (("min_count", 1), ("max_vocab", None)):
                if getattr(tok, key) != default:
                    p.append(f"tokenizer.{key}={getattr(tok, key)} is not allowed for kind={tok.kind!r}: "
                             "it caps a word vocabulary (kind: word)")
        if tok.min_count < 1:
            p.append(f"tokenizer.min_count={tok.min_count} is not allowed: must be >= 1")
        if tok.max_vocab is not None and tok.max_vocab <= len(WORD_SPECIALS):
            p.append(f"tokenizer.max_vocab={tok.max_vocab} is not allowed: must be > {len(WORD_SPECIALS)} "
                     f"(it counts {' and '.join(WORD_SPECIALS)})")
        bpe_size = tok.vocab_size or self.vocab_size
        if tok.kind == "bpe" and bpe_size is None:
            p.append("vocab_size is required for kind='bpe': it is the size BPE is trained to")
        elif tok.kind == "bpe":
            floor = len(SPECIAL_TOKENS) + (256 if tok.pre_tokenizer == "byte_level" else 1)
            if bpe_size < floor:
                key = "tokenizer.vocab_size" if tok.vocab_size is not None else "vocab_size"
                p.append(f"{key}={bpe_size} is not allowed for {tok.pre_tokenizer} BPE: must be >= {floor} "
                         "(specials + base alphabet)")
            if tok.vocab_size is not None and self.vocab_size is not None and tok.vocab_size != self.vocab_size:
                p.append(f"tokenizer.vocab_size={tok.vocab_size} is not allowed: must equal vocab_size={self.vocab_size} "
                         "(or be null)")
        if tok.min_frequency < 1:
            p.append(f"tokenizer.min_frequency={tok.min_frequency} is not allowed: must be >= 1")
        # --- lengths ---
        if self.type == "lm":
            if self.seq_len is None or self.seq_len < 1:
                p.append(f"seq_len={self.seq_len!r} is not allowed for type='lm': must be an integer >= 1")
        else:
            for name in ("src_len", "tgt_len"):
                v = getattr(self, name)
                if v is None or v < 2:
                    p.append(f"{name}={v!r} is not allowed for type='translation': must be an integer >= 2")
            if tok.kind != "bpe":
                p.append(f"tokenizer.kind={tok.kind!r} is not allowed for type='translation': expected 'bpe'")
            if not tok.joint:
                p.append("tokenizer.joint=false is not allowed: the seq2seq models share one embedding "
                         "between source and target, so the vocabulary must be joint")
            if self.corpus.blank_lines != "keep":
                p.append(f"corpus.blank_lines={self.corpus.blank_lines!r} is not allowed for type='translation': "
                         "dropping lines would misalign the parallel files (empty training pairs are left out "
                         "anyway); expected 'keep'")
            if self.corpus.format not in LINE_FORMATS:
                p.append(f"corpus.format={self.corpus.format!r} is not allowed for type='translation': "
                         f"expected one of {', '.join(map(repr, LINE_FORMATS))} (one sentence per line)")
        # --- splits ---
        names = {f.name for f in self.corpus.files if isinstance(f, FileSpec)}
        for split in ("train", "val", "test"):
            s: SplitSpec = getattr(self.splits, split)
            if not s.defined:
                if split != "test":
                    p.append(f"splits.{split} is required")
                continue
            lm_files = bool(s.file or s.files)
            if self.type == "lm" and (not lm_files or s.src or s.tgt):
                p.append(f"splits.{split} is not allowed as {_short(s)}: type='lm' needs 'file' or 'files' "
                         "(not src/tgt)")
            if self.type == "translation" and (lm_files or not s.src or not s.tgt):
                p.append(f"splits.{split} is not allowed as {_short(s)}: type='translation' needs 'src' and 'tgt'")
            if s.every is not None and (split == "train" or self.type != "lm"):
                p.append(f"splits.{split}.every is not allowed " + (
                    "on train: train keeps the documents val/test leave, so give every on val/test"
                    if split == "train" else "for type='translation' (a split is one parallel file pair)"))
            # A pattern is expanded in the corpus dir; a plain name is declared in corpus.files
            # (where its URL and checksum live), so a typo is caught before any data is read.
            for f in s.items:
                if not is_pattern(f) and f not in names:
                    p.append(f"splits.{split} file {f!r} is not allowed: not in corpus.files "
                             f"(have {', '.join(sorted(names)) or 'none'})")
        allowed = METRICS.get(self.type, ())
        for m in self.metrics:
            if m not in allowed:
                p.append(f"metrics entry {m!r} is not allowed for type={self.type!r}: "
                         f"expected any of {', '.join(map(repr, allowed))}")
        return p


def _short(s: SplitSpec) -> str:
    keys = (("file", s.file), ("files", s.files), ("src", s.src), ("tgt", s.tgt), ("every", s.every))
    return "{" + ", ".join(f"{k}: {v}" for k, v in keys if v) + "}"


def available_tasks(tasks_dir: str | Path | None = None) -> list[str]:
    d = Path(tasks_dir) if tasks_dir else default_tasks_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def task_path(name_or_path: str | Path, tasks_dir: str | Path | None = None) -> Path:
    """A task name (``tinyshakespeare-char``) or a path to a YAML file -> the YAML file."""
    text = str(name_or_path)
    direct = Path(text).expanduser()
    if direct.suffix in (".yaml", ".yml") or direct.is_file() or "/" in text:
        if direct.is_file():
            return direct
        raise ConfigError([f"task file {text!r} does not exist"], "task")
    d = Path(tasks_dir) if tasks_dir else default_tasks_dir()
    path = d / f"{text}.yaml"
    if not path.is_file():
        names = available_tasks(d)
        raise ConfigError([f"task={text!r} is not allowed: expected one of {', '.join(names) or '(none)'} "
                           f"(from {d}) or a path to a task YAML file"], "task")
    return path


def parse_task(data: Any, default_name: str = "", context: str = "task") -> TaskConfig:
    """Build and validate a TaskConfig from a dict (e.g. parsed YAML)."""
    if not isinstance(data, dict):
        raise ConfigError([f"a task file must be a mapping, got {type(data).__name__}"], context)
    data = dict(data)
    data.setdefault("name", default_name)
    problems: list[str] = []
    task = from_dict(TaskConfig, data, problems=problems)
    problems.extend(check(task))
    if problems:
        raise ConfigError(problems, context)
    return task


def load_task(
    name_or_path: str | Path,
    tasks_dir: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> TaskConfig:
    """Load ``tasks/<name>.yaml`` (or a YAML path), validate it, apply ``key=value`` overrides."""
    path = task_path(name_or_path, tasks_dir)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"], "task") from None
    context = f"task {path.stem!r} ({path})"
    task = parse_task(data, default_name=path.stem, context=context)
    if overrides:
        task = apply_overrides(task, overrides, context=context)
    return task
