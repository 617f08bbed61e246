"""Finding, verifying and downloading corpus files (downloads only from a local http.server)."""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import pytest

from bench.data import sources
from bench.data.sources import ChecksumError, DataError, file_digests, resolve_corpus
from bench.data.tasks import load_task, parse_task

TEXT = "hello world\nthe quick brown fox\n" * 50


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _task(files: list[dict], name="toy"):
    return parse_task({
        "name": name, "type": "lm", "seq_len": 8, "vocab_size": 20, "tokenizer": {"kind": "char"},
        "corpus": {"dir": "toy", "format": "text", "files": files},
        "splits": {"train": {"file": files[0]["name"], "end": 0.9},
                   "val": {"file": files[0]["name"], "start": 0.9}},
    })


# --------------------------------------------------------------------------- local data


def test_resolves_shared_data_and_verifies_sha256sums(shared_data):
    task = load_task("multi30k-de-en")
    corpus = resolve_corpus(task, shared_data)
    assert set(corpus.paths) == {f.name for f in task.corpus.files}
    assert all(o == "--data-dir" for o in corpus.origin.values())
    assert corpus.sha256["train.de.gz"] == task.corpus.file("train.de.gz").sha256


def test_env_var_and_corpus_dir_itself(shared_data, monkeypatch):
    task = load_task("tinyshakespeare-char")
    monkeypatch.setenv("MOE_BENCH_DATA", str(shared_data))
    assert resolve_corpus(task).origin == {"input.txt": "$MOE_BENCH_DATA"}
    # --data-dir wins over the env var, and may point at the corpus folder itself
    assert resolve_corpus(task, shared_data / "tinyshakespeare").origin == {"input.txt": "--data-dir"}


def test_corrupt_local_file_is_reported_not_deleted(tmp_path):
    root = tmp_path / "data"
    (root / "toy").mkdir(parents=True)
    (root / "toy" / "a.txt").write_text(TEXT)
    # the SHA256SUMS of the data dir (as in ../shared/data) says it should be something else
    (root / "SHA256SUMS").write_text(f"{_sha(b'other')}  toy/a.txt\n")
    with pytest.raises(ChecksumError) as e:
        resolve_corpus(_task([{"name": "a.txt"}]), root)
    assert "toy/a.txt" in str(e.value) and _sha(b"other") in str(e.value)
    assert (root / "toy" / "a.txt").exists()
    # fixed SHA256SUMS (in the corpus dir this time, plain file names): accepted
    (root / "SHA256SUMS").unlink()
    (root / "toy" / "SHA256SUMS").write_text(f"{_sha(TEXT.encode())}  a.txt\n")
    assert resolve_corpus(_task([{"name": "a.txt"}]), root).sha256["a.txt"] == _sha(TEXT.encode())


def test_verification_is_cached_by_path_size_mtime(tmp_path, offline_private_cache, monkeypatch):
    f = tmp_path / "f.txt"
    f.write_text(TEXT)
    first = file_digests(f)
    assert first["sha256"] == _sha(TEXT.encode())
    assert first["git_blob"] == hashlib.sha1(f"blob {len(TEXT)}\0{TEXT}".encode()).hexdigest()
    assert (offline_private_cache / "verified.json").is_file()  # persisted for the next process
    sources._memo.clear()
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (reads.append(p), real_open(p, *a, **k))[1])
    assert file_digests(f) == first and not any(str(p) == str(f.resolve()) for p in reads)
    f.write_text(TEXT + "x")  # size (and mtime) change -> hashed again
    assert file_digests(f)["sha256"] == _sha((TEXT + "x").encode())


# --------------------------------------------------------------------------- missing data


def test_missing_data_gives_one_clear_error(tmp_path):
    task = load_task("tinyshakespeare-char")
    with pytest.raises(DataError) as e:
        resolve_corpus(task, tmp_path / "nowhere")
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError)
    assert "MOE_BENCH_DATA" in msg and "--data-dir" in msg
    assert str(tmp_path / "nowhere" / "tinyshakespeare" / "input.txt") in msg  # every place looked
    assert "not set" in msg  # the env var
    assert str(Path(os.environ["MOE_BENCH_CACHE"]) / "data" / "tinyshakespeare") in msg
    assert "offline" in msg and "unset MOE_BENCH_OFFLINE" in msg


def test_without_moe_bench_data_the_data_beside_the_checkout_is_found(monkeypatch, tmp_path):
    from bench.data import sources

    beside = tmp_path / "shared" / "data"
    (beside / "tinyshakespeare").mkdir(parents=True)
    (beside / "tinyshakespeare" / "input.txt").write_text("hello")
    monkeypatch.setattr(sources, "REPO_DATA_DIRS", (tmp_path / "data", beside))
    task = load_task("tinyshakespeare-char")
    with pytest.raises(DataError, match="beside the checkout"):  # found there (the checksum fails on "hello")
        resolve_corpus(task)


def test_missing_file_without_url_lists_all_missing(tmp_path):
    task = _task([{"name": "a.txt"}, {"name": "b.txt"}])
    task.splits.val.file = "b.txt"
    with pytest.raises(DataError) as e:
        resolve_corpus(task)
    msg = str(e.value)
    assert "missing: a.txt, b.txt" in msg and "gives no URL" in msg


# --------------------------------------------------------------------------- downloads


def test_download_verifies_and_caches(http_root, offline_private_cache):
    (http_root.root / "a.txt").write_text(TEXT)
    task = _task([{"name": "a.txt", "url": http_root.url("a.txt"), "sha256": _sha(TEXT.encode())}])
    corpus = resolve_corpus(task)
    path = offline_private_cache / "data" / "toy" / "a.txt"
    assert corpus.paths["a.txt"] == path and corpus.origin["a.txt"] == "download"
    assert path.read_text() == TEXT
    assert http_root.requests == ["/a.txt"]
    again = resolve_corpus(task)  # served from the cache, no second request
    assert again.origin["a.txt"] == "cache" and http_root.requests == ["/a.txt"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_sha256_mismatch_leaves_nothing_in_cache(http_root, offline_private_cache):
    (http_root.root / "a.txt").write_text(TEXT)
    task = _task([{"name": "a.txt", "url": http_root.url("a.txt"), "sha256": _sha(b"expected")}])
    with pytest.raises(ChecksumError) as e:
        resolve_corpus(task)
    msg = str(e.value)
    assert _sha(b"expected") in msg and _sha(TEXT.encode()) in msg and "nothing was saved" in msg
    leftovers = [p for p in offline_private_cache.rglob("*") if p.is_file() and p.name != "verified.json"]
    assert leftovers == []


def test_git_blob_is_checked_and_sha_recorded_on_first_use(http_root, offline_private_cache):
    (http_root.root / "a.txt").write_text(TEXT)
    blob = hashlib.sha1(f"blob {len(TEXT)}\0{TEXT}".encode()).hexdigest()
    bad = _task([{"name": "a.txt", "url": http_root.url("a.txt"), "git_blob": "0" * 40}])
    with pytest.raises(ChecksumError, match="git blob id"):
        resolve_corpus(bad)
    good = _task([{"name": "a.txt", "url": http_root.url("a.txt"), "git_blob": blob}])
    resolve_corpus(good)
    sums = (offline_private_cache / "data" / "toy" / "SHA256SUMS").read_text()
    assert f"{_sha(TEXT.encode())}  a.txt" in sums
    # later corruption of the cached copy is caught: the bad copy is dropped and fetched again
    cached = offline_private_cache / "data" / "toy" / "a.txt"
    cached.write_text("garbage")
    assert resolve_corpus(good).origin["a.txt"] == "download" and cached.read_text() == TEXT


def test_http_error_is_a_clear_data_error(http_root):
    task = _task([{"name": "a.txt", "url": http_root.url("missing.txt")}])
    with pytest.raises(DataError) as e:
        resolve_corpus(task)
    assert "HTTP 404" in str(e.value) and "MOE_BENCH_DATA" in str(e.value)


def test_offline_never_downloads(http_root, monkeypatch):
    (http_root.root / "a.txt").write_text(TEXT)
    task = _task([{"name": "a.txt", "url": http_root.url("a.txt")}])
    monkeypatch.setenv("MOE_BENCH_OFFLINE", "1")
    with pytest.raises(DataError, match="skipped"):
        resolve_corpus(task)
    assert http_root.requests == []


def test_archive_members_are_extracted(http_root, offline_private_cache):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("toy/train.tokens", TEXT)
        z.writestr("toy/valid.tokens", TEXT[:100])
    (http_root.root / "toy.zip").write_bytes(buf.getvalue())
    url = http_root.url("toy.zip")
    task = _task([{"name": "train.txt", "url": url, "member": "toy/train.tokens", "sha256": _sha(TEXT.encode())},
                  {"name": "valid.txt", "url": url, "member": "toy/valid.tokens"}])
    task.splits.val.file = "valid.txt"
    corpus = resolve_corpus(task)
    assert corpus.paths["train.txt"].read_text() == TEXT
    assert corpus.paths["valid.txt"].read_text() == TEXT[:100]
    assert http_root.requests == ["/toy.zip"]  # one download for both members
    assert not list((offline_private_cache / "downloads").iterdir())  # archive cleaned up
