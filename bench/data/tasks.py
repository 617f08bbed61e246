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
from typing import Any, Literal, Optional

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
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")


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
        p = []
        if not self.name:
            p.append("name is required")
        elif Path(self.name).is_absolute() or ".." in Path(self.name).parts:
            p.append(f"name={self.name!r} is not allowed: must be a relative path inside the corpus dir")
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
        if not self.files:
            p.append("files is required: list every file the splits use")
        names = [f.name for f in self.files if isinstance(f, FileSpec)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            p.append(f"files lists {', '.join(dupes)} more than once")
        return p


@dataclass
class SplitSpec:
    """A split is a [start, end) fraction of one file (LM) or of a parallel file pair."""

    file: Optional[str] = None  # LM: the text file
    src: Optional[str] = None  # translation: source-language file
    tgt: Optional[str] = None  # translation: target-language file
    start: float = 0.0  # fraction of characters (LM) or of lines (translation)
    end: float = 1.0

    @property
    def defined(self) -> bool:
        return bool(self.file or self.src or self.tgt)

    @property
    def files(self) -> list[str]:
        return [f for f in (self.file, self.src, self.tgt) if f]

    def problems(self) -> list[str]:
        if not 0.0 <= self.start < self.end <= 1.0:
            return [f"start={self.start}, end={self.end} is not allowed: need 0 <= start < end <= 1"]
        return []


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
    vocab_size: int = 0  # expected vocabulary size; checked when the tokenizer is built
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
        if self.vocab_size < 1:
            p.append(f"vocab_size={self.vocab_size} is not allowed: must be >= 1")
        tok = self.tokenizer
        if tok.kind in ("char", "word") and tok.vocab_size is not None:
            p.append(f"tokenizer.vocab_size={tok.vocab_size} is not allowed for kind={tok.kind!r}: "
                     "the vocabulary comes from the training text (set the task's vocab_size instead)")
        bpe_size = tok.vocab_size or self.vocab_size
        if tok.kind == "bpe":
            floor = len(SPECIAL_TOKENS) + (256 if tok.pre_tokenizer == "byte_level" else 1)
            if bpe_size < floor:
                p.append(f"vocab_size={bpe_size} is not allowed for {tok.pre_tokenizer} BPE: must be >= {floor} "
                         "(specials + base alphabet)")
            if tok.vocab_size is not None and tok.vocab_size != self.vocab_size:
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
            if self.type == "lm" and (s.file is None or s.src or s.tgt):
                p.append(f"splits.{split} is not allowed as {_short(s)}: type='lm' needs 'file' (not src/tgt)")
            if self.type == "translation" and (s.file or not s.src or not s.tgt):
                p.append(f"splits.{split} is not allowed as {_short(s)}: type='translation' needs 'src' and 'tgt'")
            for f in s.files:
                if f not in names:
                    p.append(f"splits.{split} file {f!r} is not allowed: not in corpus.files "
                             f"(have {', '.join(sorted(names)) or 'none'})")
        allowed = METRICS.get(self.type, ())
        for m in self.metrics:
            if m not in allowed:
                p.append(f"metrics entry {m!r} is not allowed for type={self.type!r}: "
                         f"expected any of {', '.join(map(repr, allowed))}")
        return p


def _short(s: SplitSpec) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in (("file", s.file), ("src", s.src), ("tgt", s.tgt)) if v) + "}"


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
