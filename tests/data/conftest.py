"""Fixtures for the data-layer tests.

Every test runs offline with a private cache: MOE_BENCH_CACHE -> tmp dir, MOE_BENCH_OFFLINE=1,
and sockets may only reach loopback (the download tests use a local http.server). Real data is
read (never written) from ../shared/data next to the repository, or from $MOE_BENCH_DATA.
"""
from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _shared_data() -> Path:
    env = os.environ.get("MOE_BENCH_DATA")
    return Path(env) if env else (REPO / ".." / "shared" / "data").resolve()


SHARED_DATA = _shared_data()  # read before any test clears $MOE_BENCH_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED_DATA
    if not (path / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"shared data not found at {path} (set MOE_BENCH_DATA)")
    return path


@pytest.fixture(autouse=True)
def offline_private_cache(tmp_path, monkeypatch):
    """No internet, no user cache, no ambient data dir: each test sees only what it sets up."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOE_BENCH_CACHE", str(cache))
    monkeypatch.setenv("MOE_BENCH_OFFLINE", "1")
    monkeypatch.delenv("MOE_BENCH_DATA", raising=False)
    monkeypatch.setattr("bench.data.sources.REPO_DATA_DIRS", ())  # nor the data beside the checkout
    # (network lookups are limited to loopback for every test by tests/conftest.py)
    return cache


@pytest.fixture
def train_cli(tmp_path, monkeypatch, capsys):
    """``train_cli(*args) -> (exit code, stdout, stderr)`` of ``moe-bench train *args`` on a store,
    run folders and offline W&B under tmp_path (``train_cli.storage`` is the store's URL)."""
    from bench.cli import main

    monkeypatch.setenv("MOE_BENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    storage = f"sqlite:///{tmp_path / 'runs.db'}"

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # only this command's output
        rc = main(["train", *map(str, args), "--storage", storage])
        out = capsys.readouterr()
        return rc, out.out, out.err

    run.storage = storage
    return run


class _Server:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, fmt, *args):  # record instead of printing
                outer.requests.append(self.path)

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 serving a temp dir; downloads are allowed for the test."""
    root = tmp_path / "www"
    root.mkdir()
    server = _Server(root)
    server.thread.start()
    monkeypatch.delenv("MOE_BENCH_OFFLINE")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
