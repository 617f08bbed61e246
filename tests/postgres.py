"""Fixtures for tests against a real PostgreSQL server (imported by tests/conftest.py).

Start a throwaway server and point the tests at it::

    export MOE_BENCH_TEST_POSTGRES_URL="$(.ci/postgres.sh)"   # postgresql+psycopg://...@127.0.0.1:55432/moebench
    .venv/bin/python -m pytest -q tests/tracking/test_postgres_store.py
    .ci/postgres.sh stop "$MOE_BENCH_TEST_POSTGRES_URL"

Without the variable these tests are skipped, except under CI (``CI=true``, set by .ci/run, which
also starts the server) where they fail: CI never silently skips them.

- ``postgres_url`` (session): the server's base URL, checked once to accept connections.
- ``fresh_postgres_url`` (function): URL of a new, empty, uniquely named database on that server,
  dropped (with any connections still open to it, e.g. from sweep workers) after the test.
- ``fresh_postgres_database(base_url)``: the same as a context manager, for other scopes.
"""
from __future__ import annotations

import contextlib
import os
import secrets

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

POSTGRES_URL_ENV = "MOE_BENCH_TEST_POSTGRES_URL"
NO_SERVER_MESSAGE = (f"no PostgreSQL server for the tests: run .ci/postgres.sh and export "
                     f"{POSTGRES_URL_ENV} (export {POSTGRES_URL_ENV}=\"$(.ci/postgres.sh)\")")


def _shown(url: sa.URL | str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def _admin_engine(base_url: str) -> sa.Engine:
    """AUTOCOMMIT engine on the base database: CREATE/DROP DATABASE cannot run in a transaction."""
    return sa.create_engine(base_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


@contextlib.contextmanager
def fresh_postgres_database(base_url: str) -> Iterator[str]:
    """Create database ``moebench_test_<hex>`` on the server of ``base_url``, yield its URL (same
    user, password, host and driver), then drop it, closing any connections still open to it."""
    name = f"moebench_test_{secrets.token_hex(6)}"
    admin = _admin_engine(base_url)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield sa.make_url(base_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:  # FORCE (PostgreSQL 13+): ends leftover sessions first
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """Base SQLAlchemy URL of the test server (``$MOE_BENCH_TEST_POSTGRES_URL``). Skips when it is
    unset, fails instead when ``CI=true``, and fails when the server does not answer."""
    url = os.environ.get(POSTGRES_URL_ENV, "").strip()
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail(NO_SERVER_MESSAGE, pytrace=False)
        pytest.skip(NO_SERVER_MESSAGE)
    problem, engine = None, None
    try:  # driver missing (pip install -e '.[test]'), server down, bad password: one clear failure
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 10})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as e:  # noqa: BLE001
        detail = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
        problem = f"{type(e).__name__}: {detail}"
    finally:
        if engine is not None:
            engine.dispose()
    if problem:
        pytest.fail(f"{POSTGRES_URL_ENV}={_shown(url)} is set but the server cannot be used: {problem}. "
                    f"Start one with .ci/postgres.sh", pytrace=False)
    return url


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """URL of a new empty database on the test server, dropped after the test."""
    with fresh_postgres_database(postgres_url) as url:
        yield url
