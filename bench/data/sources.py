"""Find a task's corpus files on disk, or download them into the cache, and verify them.

Each file a task's splits need is looked up, in order, in:
  1. the explicit ``data_dir`` argument (``--data-dir``),
  2. ``$MOE_BENCH_DATA``, or when it is not set ``<checkout>/data`` and ``<checkout>/../shared/data``,
  3. the cache: ``$MOE_BENCH_CACHE`` or ``~/.cache/moe-bench`` (``<cache>/data/<corpus dir>/``),
and otherwise downloaded from the task's URL into the cache. Data dirs may be read-only (CI mounts
the shared data that way), so everything this module writes goes to the cache.

A split may also name glob patterns (``c*``): each is expanded in the first of those local places
where it matches anything (patterns are never downloaded), sorted, and every match verified as a
single file is. A pattern that matches nothing is an error naming it and each directory searched.

Checksums come from the task file and from a ``SHA256SUMS`` file next to the data (in the corpus
dir, or in the data dir with ``<corpus dir>/<file>`` paths). Hashing is cached by
(path, size, mtime) so repeated runs do not re-read large corpora.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from bench.data.tasks import SUMS_FILE, FileSpec, TaskConfig, is_pattern

ENV_DATA = "MOE_BENCH_DATA"
ENV_CACHE = "MOE_BENCH_CACHE"
ENV_OFFLINE = "MOE_BENCH_OFFLINE"
SUMS_NAME = SUMS_FILE
# Looked in when $MOE_BENCH_DATA is not set: <checkout>/data, then <checkout>/../shared/data.
_REPO = Path(__file__).resolve().parents[2]
REPO_DATA_DIRS = (_REPO / "data", _REPO.parent / "shared" / "data")
_CHUNK = 1 << 20


class DataError(RuntimeError):
    """Task data is missing or corrupt. The message lists every place looked and how to fix it."""


class ChecksumError(DataError):
    """A file's contents do not match its expected checksum."""


def cache_dir(path: str | Path | None = None) -> Path:
    """The writable cache root: ``path``, else ``$MOE_BENCH_CACHE``, else ``~/.cache/moe-bench``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moe-bench"


def offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "").lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Write ``path`` through a temp file in the same directory, renamed into place on success
    and removed on any error, so readers never see a half-written or partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def _umask_mode() -> int:
    # mkstemp creates 0600 files; give finished files the usual umask-based mode instead, so a
    # cache shared by a group (or a data dir prepared by one user) stays readable.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- hashing


class _Hasher:
    """sha256 and git blob id over one stream (git's id hashes a 'blob <size>\\0' header first)."""

    def __init__(self, size: int | None):
        self.sha256 = hashlib.sha256()
        self.git = hashlib.sha1(f"blob {size}\0".encode()) if size is not None else None

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        if self.git is not None:
            self.git.update(chunk)

    def digests(self) -> dict[str, str]:
        d = {"sha256": self.sha256.hexdigest()}
        if self.git is not None:
            d["git_blob"] = self.git.hexdigest()
        return d


_memo: dict[tuple[str, int, int], dict[str, str]] = {}


def _index_path(cache: Path) -> Path:
    return cache / "verified.json"


def file_digests(path: str | Path, cache: str | Path | None = None) -> dict[str, str]:
    """``{'sha256': ..., 'git_blob': ...}`` of ``path``, memoized by (path, size, mtime).

    The memo lives in memory and in ``<cache>/verified.json`` (best effort: a read-only or
    missing cache only costs a re-hash).
    """
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _memo:
        return _memo[key]
    index_file = _index_path(cache_dir(cache))
    index = _read_json(index_file)
    entry = index.get(key[0])
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        _memo[key] = entry["digests"]
        return entry["digests"]
    h = _Hasher(st.st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    digests = h.digests()
    _memo[key] = digests
    index = _read_json(index_file)  # re-read: another process may have added entries meanwhile
    index[key[0]] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digests": digests}
    try:
        atomic_write_bytes(index_file, json.dumps(index, indent=1, sort_keys=True).encode())
    except OSError:
        pass
    return digests


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_sha256sums(path: str | Path) -> dict[str, str]:
    """Parse a ``sha256sum``-style file into {relative path: hex digest}."""
    sums = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def _expected(spec: FileSpec, corpus_dir: Path) -> list[tuple[str, str, str]]:
    """(kind, digest, where it came from) for every checksum we know for this file."""
    out = []
    if spec.sha256:
        out.append(("sha256", spec.sha256, "the task file"))
    if spec.git_blob:
        out.append(("git_blob", spec.git_blob, "the task file"))
    for sums_file, key in ((corpus_dir / SUMS_NAME, spec.name), (corpus_dir.parent / SUMS_NAME, f"{corpus_dir.name}/{spec.name}")):
        if sums_file.is_file():
            digest = read_sha256sums(sums_file).get(key)
            if digest:
                out.append(("sha256", digest, str(sums_file)))
    return out


def verify_file(path: Path, expected: list[tuple[str, str, str]], cache: Path) -> dict[str, str]:
    """Digests of ``path``; raise ChecksumError if any expected checksum differs."""
    digests = file_digests(path, cache)
    for kind, digest, source in expected:
        if digests[kind] != digest:
            raise ChecksumError(
                f"{path} is corrupt or a different version: its {kind} is {digests[kind]}, "
                f"but {source} expects {digest}.\n"
                f"  fix: replace it with a good copy (or delete it if it is under the cache, "
                f"{cache}, so it is downloaded again)."
            )
    return digests


# --------------------------------------------------------------------------- downloading


def download(url: str, dest: str | Path, sha256: str | None = None, git_blob: str | None = None,
             desc: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` with pooch (temporary file, sha256 check, progress bar on a
    terminal), then check a git blob id where that is all the task knows (pooch cannot).

    On any failure (network, checksum, Ctrl-C) ``dest`` is either absent or complete and verified.
    """
    import pooch  # only needed online

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    bar = sys.stderr.isatty()
    downloader = pooch.HTTPDownloader(progressbar=bar, timeout=timeout, headers={"User-Agent": "moe-bench"})
    try:
        pooch.retrieve(url, known_hash=f"sha256:{sha256}" if sha256 else None, fname=dest.name, path=dest.parent,
                       downloader=downloader, progressbar=bar)
    except ValueError as e:  # pooch: "SHA256 hash of downloaded file (...) does not match the known hash"
        raise ChecksumError(f"downloaded {url}: {e}; nothing was saved to {dest}. The file may have changed "
                            f"upstream or the download was corrupted.") from None
    if git_blob:
        blob = file_digests(dest)["git_blob"]
        if blob != git_blob:
            _unlink(dest)
            raise ChecksumError(f"downloaded {url} but its git blob id is {blob}, expected {git_blob}; "
                                f"nothing was saved to {dest}.")
    return dest


def _extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy one member of a zip / tar archive to ``dest`` atomically."""
    try:
        with atomic_open(dest) as out:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, _CHUNK)
            else:
                with tarfile.open(archive) as t:
                    src = t.extractfile(member)  # KeyError if absent, None if not a regular file
                    if src is None:
                        raise KeyError(member)
                    shutil.copyfileobj(src, out, _CHUNK)
    except KeyError:
        raise DataError(f"{archive} has no file {member!r}") from None


def _record_sum(corpus_dir: Path, name: str, digest: str) -> None:
    """Trust-on-first-use: remember a downloaded file's sha256 so later corruption is caught."""
    sums_file = corpus_dir / SUMS_NAME
    sums = read_sha256sums(sums_file) if sums_file.is_file() else {}
    sums[name] = digest
    text = "".join(f"{d}  {n}\n" for n, d in sorted(sums.items()))
    atomic_write_bytes(sums_file, text.encode())


# --------------------------------------------------------------------------- resolving


@dataclass
class Corpus:
    """Where a task's files were found: file name -> path, its sha256, and which source; and
    what each glob pattern matched (sorted names relative to the corpus dir)."""

    task: str
    paths: dict[str, Path] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    matches: dict[str, list[str]] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.paths[name]


def _candidates(data_dir: str | Path | None, cache: Path) -> Iterator[tuple[str, Path | None, str]]:
    """(label, data root or None, note) for each local place, in lookup order."""
    if data_dir is not None:
        yield "--data-dir", Path(data_dir).expanduser(), ""
    else:
        yield "--data-dir", None, "not given"
    env = os.environ.get(ENV_DATA)
    if env:
        yield f"${ENV_DATA}", Path(env).expanduser(), ""
    else:
        yield f"${ENV_DATA}", None, "not set"
        # The same data inside and outside `make`: a data folder in or beside the checkout.
        for root in REPO_DATA_DIRS:
            if root.is_dir():
                yield "beside the checkout", root, ""
    yield "cache", cache / "data", ""


def _corpus_dirs(root: Path, rel: str) -> list[Path]:
    # A data dir normally holds one subdirectory per corpus; also accept the corpus dir itself
    # (--data-dir .../tinyshakespeare), but only under its own name: wikitext-2 and wikitext-103
    # both have a train.txt, and one must never be read as the other.
    return [root / rel] + ([root] if root.name == Path(rel).name else [])


def _split_items(task: TaskConfig) -> list[str]:
    return [f for s in (task.splits.train, task.splits.val, task.splits.test) for f in s.items]


def required_files(task: TaskConfig) -> list[str]:
    """Files (not patterns) the task's defined splits read, in corpus order."""
    needed = {f for f in _split_items(task) if not is_pattern(f)}
    return [f.name for f in task.corpus.files if f.name in needed]


def required_patterns(task: TaskConfig) -> list[str]:
    """Glob patterns the task's defined splits read, first use first, each once."""
    return list(dict.fromkeys(f for f in _split_items(task) if is_pattern(f)))


def resolve_corpus(task: TaskConfig, data_dir: str | Path | None = None, *,
                   cache: str | Path | None = None, allow_download: bool | None = None) -> Corpus:
    """Locate (or download) and verify every file the task's splits need.

    Raises one DataError naming each missing file, every place looked, and how to fix it.
    ``allow_download=None`` means: download unless ``$MOE_BENCH_OFFLINE`` is set.
    """
    cache = cache_dir(cache)
    if allow_download is None:
        allow_download = not offline()
    corpus = Corpus(task.name)
    missing: dict[str, list[str]] = {}
    archives: list[Path] = []
    try:
        for name in required_files(task):
            looked = _find_local(task, name, data_dir, cache, corpus)
            if name in corpus.paths:
                continue
            # --- not found locally: download into the cache ---
            spec = task.corpus.file(name)
            if not spec.url:
                looked.append("download: the task file gives no URL for it")
            elif not allow_download:
                looked.append(f"download from {spec.url}: skipped (offline: ${ENV_OFFLINE} is set)")
            else:
                try:
                    _download_into_cache(task, spec, cache, corpus, archives)
                    continue
                except ChecksumError as e:
                    raise ChecksumError(f"data for task {task.name!r}: {e}") from None
                except (urllib.error.URLError, http.client.HTTPException, OSError, DataError) as e:
                    looked.append(f"download from {spec.url}: failed ({_reason(e)})")
            missing[name] = looked
    finally:
        for a in archives:  # members are extracted (or failed): the archive is not needed any more
            _unlink(a)
    if missing:
        raise DataError(_missing_message(task, missing, cache))
    unmatched = {}
    for pattern in required_patterns(task):
        looked = _expand_pattern(task, pattern, data_dir, cache, corpus)
        if looked:
            unmatched[pattern] = looked
    if unmatched:
        raise DataError(_unmatched_message(task, unmatched, cache))
    return corpus


def _expand_pattern(task: TaskConfig, pattern: str, data_dir: str | Path | None, cache: Path,
                    corpus: Corpus) -> list[str]:
    """Expand ``pattern`` in the first local corpus dir where it matches, verify and record each
    match; return the places searched when it matches nothing (empty list when it matched)."""
    looked = []
    for label, root, note in _candidates(data_dir, cache):
        if root is None:
            looked.append(f"{label}: {note}")
            continue
        dirs = [root / task.corpus.dir] if label == "cache" else _corpus_dirs(root, task.corpus.dir)
        for d in dirs:
            names = _glob(d, pattern)
            if not names:
                looked.append(f"{label}: nothing matches in {d}" if d.is_dir() else f"{label}: no directory {d}")
                continue
            for name in names:
                if name in corpus.paths:  # also named by another pattern or as a file
                    continue
                try:
                    digests = verify_file(d / name, _expected(FileSpec(name=name), d), cache)
                except ChecksumError as e:
                    raise ChecksumError(f"data for task {task.name!r} ({label}, pattern {pattern!r}): {e}") from None
                corpus.paths[name], corpus.sha256[name], corpus.origin[name] = d / name, digests["sha256"], label
            corpus.matches[pattern] = names
            return []
    return looked


def _glob(corpus_dir: Path, pattern: str) -> list[str]:
    """Regular files under ``corpus_dir`` matching ``pattern``, as sorted relative names; our own
    checksum file and hidden files (e.g. half-written temp files) are never documents."""
    if not corpus_dir.is_dir():
        return []
    names = []
    for path in corpus_dir.glob(pattern):
        rel = path.relative_to(corpus_dir)
        if path.is_file() and rel.name != SUMS_NAME and not any(part.startswith(".") for part in rel.parts):
            names.append(rel.as_posix())
    return sorted(names)


def _unmatched_message(task: TaskConfig, unmatched: dict[str, list[str]], cache: Path) -> str:
    lines = [f"data for task {task.name!r}: no file matches {', '.join(map(repr, unmatched))}"]
    for pattern, looked in unmatched.items():
        lines.append(f"  pattern {pattern!r} (relative to the corpus dir {task.corpus.dir!r}) -- searched:")
        lines.extend(f"    - {x}" for x in looked)
    lines += [
        "  how to fix (any one):",
        "    - check the pattern against the file names (patterns are matched inside corpus.dir)",
        f"    - set {ENV_DATA}=/path/to/data (or pass --data-dir) to a directory holding {task.corpus.dir}/",
    ]
    return "\n".join(lines)


def _find_local(task: TaskConfig, name: str, data_dir: str | Path | None, cache: Path, corpus: Corpus) -> list[str]:
    """Look for ``name`` in the local places; record it in ``corpus`` if found and good.

    Returns what was looked at, for the error message. A corrupt copy in a user's data dir is an
    error (never touched); a corrupt copy in our own cache is removed so it is downloaded again.
    """
    spec, rel, looked = task.corpus.file(name), task.corpus.dir, []
    for label, root, note in _candidates(data_dir, cache):
        if root is None:
            looked.append(f"{label}: {note}")
            continue
        dirs = [root / rel] if label == "cache" else _corpus_dirs(root, rel)
        found = [d for d in dirs if (d / name).is_file()]
        if not found:
            looked.append(f"{label}: no {' or '.join(str(d / name) for d in dirs)}")
            continue
        d = found[0]
        try:
            digests = verify_file(d / name, _expected(spec, d), cache)
        except ChecksumError as e:
            if label != "cache":
                raise ChecksumError(f"data for task {task.name!r} ({label}): {e}") from None
            _unlink(d / name)
            looked.append(f"{label}: {d / name} was corrupt and has been removed")
            continue
        corpus.paths[name], corpus.sha256[name], corpus.origin[name] = d / name, digests["sha256"], label
        break
    return looked


def _download_into_cache(task: TaskConfig, spec: FileSpec, cache: Path, corpus: Corpus,
                         archives: list[Path]) -> None:
    target_dir = cache / "data" / task.corpus.dir
    path = _fetch(spec, target_dir, cache, archives)
    try:
        digests = verify_file(path, _expected(spec, target_dir), cache)
    except ChecksumError:
        _unlink(path)  # never leave a file that failed verification in the cache
        raise
    if not spec.sha256:
        _record_sum(target_dir, spec.name, digests["sha256"])
    corpus.paths[spec.name], corpus.sha256[spec.name], corpus.origin[spec.name] = path, digests["sha256"], "download"


def _fetch(spec: FileSpec, target_dir: Path, cache: Path, archives: list[Path]) -> Path:
    dest = target_dir / spec.name
    if spec.member is None:
        return download(spec.url, dest, sha256=spec.sha256, git_blob=spec.git_blob, desc=spec.name)
    # URL hash in the name: two corpora's "data.zip" must not collide
    url_id = hashlib.sha256(spec.url.encode()).hexdigest()[:12]
    archive = cache / "downloads" / f"{url_id}-{Path(spec.url.split('?')[0]).name}"
    if not archive.is_file():
        download(spec.url, archive)
        archives.append(archive)
    _extract_member(archive, spec.member, dest)
    return dest


def _reason(e: BaseException) -> str:
    response = getattr(e, "response", None)  # requests' HTTPError (pooch downloads with requests)
    if response is not None and getattr(response, "status_code", None):
        return f"HTTP {response.status_code} {response.reason}"
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e)


def _missing_message(task: TaskConfig, missing: dict[str, list[str]], cache: Path) -> str:
    rel = task.corpus.dir
    lines = [f"data for task {task.name!r} is missing: {', '.join(missing)}"]
    for name, looked in missing.items():
        lines.append(f"  {name} -- looked in:")
        lines.extend(f"    - {x}" for x in looked)
    example = f"{rel}/{next(iter(missing))}"
    lines += [
        "  how to fix (any one):",
        f"    - set {ENV_DATA}=/path/to/data (or pass --data-dir) to a directory holding {example}",
        f"    - put the files in the cache: {cache / 'data' / rel}/ ({ENV_CACHE} moves the cache)",
    ]
    if any(task.corpus.file(n).url for n in missing):
        if os.environ.get(ENV_OFFLINE):
            lines.append(f"    - go online once (unset {ENV_OFFLINE}) so they are downloaded into the cache")
        else:
            lines.append("    - check the network: the download from the task's URL failed (see above)")
    return "\n".join(lines)
