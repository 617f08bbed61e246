"""Run records and the results database.

One :class:`RunRecord` per training run holds everything needed to compare runs later (resolved
config, seed, git commit, compute budget, parameter and FLOP counts, final metrics, timings, MoE
expert statistics, status). :class:`ResultsStore` keeps them in one SQL table via SQLAlchemy Core,
so the same database file can also hold Optuna's study tables (``moe-bench sweep``), and several
sweep workers can write to one SQLite file at once (WAL journal plus a busy timeout).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import secrets
import sqlite3
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from bench.config import ConfigError, coerce

STATUSES = ("running", "finished", "failed", "interrupted", "pruned")
BudgetKind = Literal["flops", "tokens", "steps", "seconds"]
BUDGET_KINDS = get_args(BudgetKind)
DEFAULT_STORAGE_URL = "sqlite:///results/moe-bench.db"
STORAGE_ENV = "MOE_BENCH_STORAGE"
TABLE_NAME = "moe_bench_runs"
SQLITE_BUSY_TIMEOUT_S = 60.0

Status = Literal[STATUSES]


class RecordError(ConfigError):
    """A run record that does not have the expected shape; ``problems`` lists each issue."""

    def __init__(self, problems: list[str], context: str = "run record"):
        super().__init__(problems, context)


class StorageError(RuntimeError):
    """The results database cannot be opened, read or written (message says what to check)."""


def utc_now_iso() -> str:
    """Current UTC time as an ISO-8601 string with seconds precision, e.g. 2026-11-28T20:15:00+00:00."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


THROUGHPUT_KIND = "throughput"  # extra["kind"] of a quiet throughput measurement (bench.throughput), not a run


def is_throughput(record: "RunRecord") -> bool:
    return record.extra.get("kind") == THROUGHPUT_KIND


def throughput_by_arm(records: list["RunRecord"]) -> dict[str, list[float]]:
    """arm -> tokens/s of every finished quiet throughput measurement among ``records``."""
    out: dict[str, list[float]] = {}
    for r in records:
        tps = r.metrics.get("tokens_per_second")
        if is_throughput(r) and r.status == "finished" and tps:
            out.setdefault(r.extra.get("arm"), []).append(float(tps))
    return out


def runs_dir() -> Path:
    """Where run folders go: ``$MOE_BENCH_RUNS`` or ``runs`` (relative to the working directory)."""
    return Path(os.environ.get("MOE_BENCH_RUNS", "runs"))


# Under the runs folder: W&B runs holding a comparison's tables (not run folders; `clean` skips it).
SUMMARIES_DIR = "_summaries"


def new_run_id(label: str, when: _dt.datetime | None = None) -> str:
    """A unique, sortable run id: ``YYYYmmdd-HHMMSS-<label>-<4 hex>`` (local time), e.g.
    ``20261128-201500-dense-3f9a``. ``label`` is usually the model family."""
    when = when or _dt.datetime.now()
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(label)).strip("-") or "run"
    return f"{when:%Y%m%d-%H%M%S}-{safe}-{secrets.token_hex(2)}"


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """``git rev-parse HEAD`` of the checkout containing ``path`` (default: this package's repo),
    with ``+dirty`` appended when tracked files outside ``results/`` have uncommitted changes. Outside a git
    checkout (a copy of the tree sent to a GPU machine) ``$MOE_BENCH_GIT_COMMIT`` if set, else None."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    if cwd.is_file():
        cwd = cwd.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20,
                                 env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return os.environ.get("MOE_BENCH_GIT_COMMIT") or None
    # results/ holds the stores runs write into while they run: changes there are not code changes.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return commit + "+dirty" if status else commit


def _jsonable(value: Any) -> Any:
    """json.dumps fallback: tensors/numpy scalars and arrays, paths, sets, dataclasses."""
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars (0-d -> plain number)
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass
class RunRecord:
    """Everything about one training run. Dict fields use these keys (all optional):

    - ``budget``: kind (flops|tokens|steps|seconds), value
    - ``params``: total, active, total_no_embed, active_no_embed
    - ``flops``: forward_per_token, train_per_token, executed_train_per_token
    - ``metrics``: val_loss, quality, quality_per_active_param, perplexity, bits_per_char, bleu,
      chrf, test_* ...
    - ``timings``: wall_seconds, train_seconds, tokens_per_second
    - ``expert_stats``: one dict per MoE layer, from the last training step: tokens_per_expert
      (list), fraction_dropped, dropped_by_position (list, per quarter of the sequence),
      router_entropy, topk_margin, max_violation (MaxVio), dead_experts, aux losses; and "eval":
      the run's last evaluation over all its batches (max_violation, dead_experts,
      fraction_dropped, dropped_pos, router_entropy, topk_margin, assignment_stability)
    - ``paths``: checkpoint_dir, csv_file, wandb_dir
    - ``wandb``: mode, run_id
    - ``curve``: one dict per intermediate evaluation: step, tokens, flops, seconds (training
      time so far), loss (validation), mean_token_prob, aux_loss
    """

    run_id: str
    name: str = ""
    group: str | None = None
    task: str = ""
    family: str = ""
    preset: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    git_commit: str | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, Any] = field(default_factory=dict)
    train_flops: float = 0.0
    tokens_seen: int = 0
    steps: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    expert_stats: list[dict[str, Any]] = field(default_factory=list)
    status: Status = "running"
    error: str | None = None
    started_at: str = field(default_factory=utc_now_iso)
    finished_at: str | None = None
    paths: dict[str, Any] = field(default_factory=dict)
    wandb: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)  # one point per evaluation
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys from newer/older versions

    def problems(self) -> list[str]:
        found = []
        if not isinstance(self.run_id, str) or not self.run_id.strip():
            found.append(f"run_id={self.run_id!r} must be a non-empty string")
        if self.status not in STATUSES:
            found.append(f"status={self.status!r} is not allowed: expected one of {', '.join(STATUSES)}")
        kind = self.budget.get("kind") if isinstance(self.budget, dict) else None
        if kind is not None and kind not in BUDGET_KINDS:
            found.append(f"budget.kind={kind!r} is not allowed: expected one of {', '.join(BUDGET_KINDS)}")
        if isinstance(self.expert_stats, list):
            for i, layer in enumerate(self.expert_stats):
                if not isinstance(layer, dict):
                    found.append(f"expert_stats[{i}]={layer!r} must be a mapping")
        return found

    # -- lifecycle helpers -------------------------------------------------------------------
    def finish(self, status: Status = "finished", error: str | None = None) -> RunRecord:
        """Set the final status (and error), stamp ``finished_at``; returns self."""
        self.status = status
        self.error = error
        self.finished_at = utc_now_iso()
        return self

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        extra = data.pop("extra")
        return {**extra, **data} if extra else data

    def to_json(self, indent: int | None = None) -> str:
        """JSON text (NaN/inf kept as Python's json writes them; tensors/numpy become numbers)."""
        return json.dumps(self.to_dict(), indent=indent, default=_jsonable, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> RunRecord:
        """Build a record, collecting every problem into one RecordError. With ``strict=False``
        unknown keys are kept in ``extra`` instead of being rejected (used when reading stored
        records written by another version)."""
        if not isinstance(data, dict):
            raise RecordError([f"expected a JSON object, got {type(data).__name__}"])
        hints = get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        problems, kwargs, extra = [], {}, {}
        for key, value in data.items():
            if key not in names:
                if strict:
                    problems.append(f"unknown key {key!r}; valid keys: {', '.join(names)}")
                else:
                    extra[key] = value
                continue
            try:  # the same field checks as every config (bench.config)
                kwargs[key] = coerce(value, hints[key], key)
            except ValueError as e:
                problems.append(str(e))
        if "run_id" not in data:
            problems.append("run_id is missing")
        if problems:
            raise RecordError(problems)
        record = cls(**kwargs, extra=extra)
        problems = record.problems()
        if problems:
            raise RecordError(problems)
        return record

    @classmethod
    def from_json(cls, text: str | bytes, strict: bool = True) -> RunRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError([f"not valid JSON: {e}"]) from None
        return cls.from_dict(data, strict=strict)

    # -- summaries ---------------------------------------------------------------------------
    @property
    def active_params(self) -> int | None:
        return self.params.get("active", self.params.get("total"))

    @property
    def total_params(self) -> int | None:
        return self.params.get("total")

    def summary(self) -> dict[str, Any]:
        """Flat dict for ``moe-bench train --json``: the headline numbers (None when unknown),
        then every other final metric under its own name."""
        m = self.metrics
        quality, active = m.get("quality"), self.active_params
        qpa = m.get("quality_per_active_param")
        if qpa is None and _is_number(quality) and _is_number(active) and active > 0:
            from bench.metrics import quality_per_active_param

            qpa = quality_per_active_param(quality, active)
        out = {
            "run_id": self.run_id,
            "name": self.name,
            "group": self.group,
            "task": self.task,
            "family": self.family,
            "preset": self.preset,
            "status": self.status,
            "seed": self.seed,
            "val_loss": m.get("val_loss"),
            "quality": quality,
            "quality_per_active_param": qpa,
            "active_params": active,
            "total_params": self.total_params,
            "train_flops": self.train_flops,
            "tokens_seen": self.tokens_seen,
            "steps": self.steps,
            "wall_seconds": self.timings.get("wall_seconds"),
            "tokens_per_second": self.timings.get("tokens_per_second"),
            "error": self.error,
        }
        for key, value in m.items():
            out.setdefault(key, value)
        return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------------------------
# Results database
# ----------------------------------------------------------------------------------------------

def default_storage_url() -> str:
    """``$MOE_BENCH_STORAGE`` if set, else ``sqlite:///results/moe-bench.db`` (relative to cwd)."""
    return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE_URL


def normalize_storage_url(url: str | os.PathLike | None) -> str:
    """An SQLAlchemy URL; a plain file path (no ``://``) means an SQLite file."""
    if url is None:
        url = default_storage_url()
    url = os.fspath(url)
    if "://" not in url:
        return "sqlite:///" + url
    return url


def _metadata_and_table() -> tuple[sa.MetaData, sa.Table]:
    md = sa.MetaData()
    table = sa.Table(
        TABLE_NAME, md,
        sa.Column("run_id", sa.String(200), primary_key=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("task", sa.String(200)),
        sa.Column("family", sa.String(100)),
        sa.Column("group_name", sa.String(200)),
        sa.Column("record", sa.Text, nullable=False),
        sa.Index(f"ix_{TABLE_NAME}_created_at", "created_at"),
    )
    return md, table


def _utc_now_naive() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


class ResultsStore:
    """Run records in table ``moe_bench_runs`` of any SQLAlchemy database (SQLite by default).

    ``url``: an SQLAlchemy URL (``sqlite:///results/moe-bench.db``, ``postgresql://...``) or a
    plain SQLite file path; default ``$MOE_BENCH_STORAGE`` or ``sqlite:///results/moe-bench.db``
    relative to the current directory. The table is created when missing; other tables in the
    same database (Optuna's) are left alone. Raises StorageError when the database cannot be used.
    """

    def __init__(self, url: str | os.PathLike | None = None, read_only: bool = False):
        """``read_only``: only read (the dashboard): no table creation, no WAL switch, and an SQLite
        file is opened with ``mode=ro`` so nothing is written into or beside it."""
        self.url = normalize_storage_url(url)
        self.read_only = read_only
        self._shown = self.url
        try:
            parsed = sa.engine.make_url(self.url)
        except (sa_exc.ArgumentError, ValueError) as e:
            raise StorageError(
                f"invalid results database URL {self.url!r}: {e}. Expected an SQLAlchemy URL such as "
                f"'sqlite:///results/moe-bench.db' or 'postgresql://user:password@host/dbname' "
                f"(set with ${STORAGE_ENV} or the storage option)") from None
        self._shown = parsed.render_as_string(hide_password=True)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.sqlite_path: Path | None = None
        if self.is_sqlite and parsed.database and parsed.database != ":memory:" \
                and not parsed.database.startswith("file:"):
            # Absolute, so a later chdir cannot send new pool connections to another file.
            self.sqlite_path = Path(parsed.database).expanduser().absolute()
            parsed = parsed.set(database=str(self.sqlite_path))
            try:
                if not read_only:
                    self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(
                    f"cannot create the directory for results database {self._shown!r}: {e}. "
                    f"Check the path and its permissions, or set ${STORAGE_ENV}") from None
        kwargs: dict[str, Any] = {}
        if read_only and self.sqlite_path is not None:
            # A fresh connection per use (NullPool), so each one sees whether a writer is active now.
            path = self.sqlite_path
            kwargs.update(creator=lambda: sqlite_read_only_connect(path), poolclass=sa.pool.NullPool)
        elif self.is_sqlite:
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = sa.create_engine(parsed, **kwargs)
        except (sa_exc.NoSuchModuleError, sa_exc.ArgumentError, ImportError) as e:
            raise StorageError(
                f"cannot use results database {self._shown!r}: {type(e).__name__}: {e}. Check the URL's "
                f"dialect (sqlite, postgresql, mysql ...) and that its Python driver is installed "
                f"(postgresql: `pip install 'psycopg[binary]'`; mysql: `pip install pymysql` with "
                f"mysql+pymysql://)") from None
        if self.is_sqlite and not read_only:
            sa.event.listen(self.engine, "connect", _sqlite_on_connect)
        self.metadata, self.table = _metadata_and_table()
        if not read_only:
            with self._guard("create the runs table in"):
                self._create_table()

    def __repr__(self) -> str:
        return f"ResultsStore({self._shown!r})"

    # -- internals ---------------------------------------------------------------------------
    def _create_table(self) -> None:
        from sqlalchemy.schema import CreateIndex, CreateTable

        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Concurrent CREATE ... IF NOT EXISTS can fail on PostgreSQL (duplicate key in
                # pg_type) when sweep workers open a fresh database at once: serialise them.
                conn.execute(sa.text(f"SELECT pg_advisory_xact_lock(hashtext('{TABLE_NAME}'))"))
            conn.execute(CreateTable(self.table, if_not_exists=True))
            for index in self.table.indexes:
                conn.execute(CreateIndex(index, if_not_exists=True))

    def _guard(self, action: str):
        return _StorageGuard(self, action)

    def _explain(self, action: str, err: BaseException) -> StorageError:
        detail = (str(getattr(err, "orig", None) or err).strip().splitlines() or [type(err).__name__])[0]
        low = detail.lower()
        if self.is_sqlite:
            where = str(self.sqlite_path) if self.sqlite_path else self._shown
            if "not a database" in low or "malformed" in low or "file is encrypted" in low:
                hint = (f"The file {where} is not a valid SQLite database (corrupt or another kind of file): "
                        f"move it away or delete it, or set ${STORAGE_ENV} to another file")
            elif "locked" in low or "busy" in low:
                hint = (f"Another process kept {where} locked for more than {SQLITE_BUSY_TIMEOUT_S:.0f} s; "
                        f"check for stuck moe-bench processes, and do not put the file on a network filesystem")
            elif "unable to open" in low or "readonly" in low or "read-only" in low or "permission" in low:
                hint = f"Check that {where} and its directory exist and are writable"
            else:
                hint = f"Check the file {where}"
        else:
            hint = ("Check that the database server is running and reachable from this machine, the "
                    "user name/password, and that the database exists")
        return StorageError(f"cannot {action} results database {self._shown!r}: {detail}. {hint}")

    # -- public API --------------------------------------------------------------------------
    def save(self, record: RunRecord) -> None:
        """Insert or update (by run_id) ``record``; ``created_at`` is kept from the first save."""
        problems = record.problems()
        if problems:
            raise RecordError(problems)
        text = record.to_json()
        now = _utc_now_naive()
        values = {"run_id": record.run_id, "created_at": now, "updated_at": now, "status": record.status,
                  "task": record.task, "family": record.family, "group_name": record.group, "record": text}
        changes = {k: v for k, v in values.items() if k not in ("run_id", "created_at")}
        dialect = self.engine.dialect.name
        with self._guard("write to"):
            with self.engine.begin() as conn:
                if dialect in ("sqlite", "postgresql"):
                    mod = __import__(f"sqlalchemy.dialects.{dialect}", fromlist=["insert"])
                    stmt = mod.insert(self.table).values(**values)
                    stmt = stmt.on_conflict_do_update(index_elements=["run_id"], set_=changes)
                    conn.execute(stmt)
                    return
                updated = conn.execute(sa.update(self.table).where(self.table.c.run_id == record.run_id)
                                       .values(**changes)).rowcount
                if not updated:
                    conn.execute(sa.insert(self.table).values(**values))

    def get(self, run_id: str) -> RunRecord | None:
        """The record with ``run_id``, or None."""
        with self._guard("read from"):
            with self.engine.connect() as conn:
                text = conn.execute(sa.select(self.table.c.record)
                                    .where(self.table.c.run_id == run_id)).scalar_one_or_none()
        return None if text is None else RunRecord.from_json(text, strict=False)

    def list(self, task: str | None = None, family: str | None = None, group: str | None = None,
             status: str | None = None) -> list[RunRecord]:
        """Records matching every given filter, oldest first (by first save)."""
        c = self.table.c
        query = sa.select(c.run_id, c.record).order_by(c.created_at, c.run_id)
        for column, value in ((c.task, task), (c.family, family), (c.group_name, group), (c.status, status)):
            if value is not None:
                query = query.where(column == value)
        with self._guard("read from"):
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
        records = []
        for run_id, text in rows:
            try:
                records.append(RunRecord.from_json(text, strict=False))
            except (RecordError, TypeError, ValueError) as e:  # one damaged row must not hide the others
                warnings.warn(f"skipping run {run_id} in {self.url}: its record cannot be read ({e})", stacklevel=2)
        return records

    def delete(self, run_id: str) -> bool:
        """Remove a record; returns whether it existed."""
        with self._guard("delete from"):
            with self.engine.begin() as conn:
                return conn.execute(sa.delete(self.table).where(self.table.c.run_id == run_id)).rowcount > 0

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _StorageGuard:
    """Turns SQLAlchemy/DBAPI errors into one StorageError naming the database and what to check."""

    def __init__(self, store: ResultsStore, action: str):
        self.store, self.action = store, action

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, (sa_exc.SQLAlchemyError, sqlite3.Error, ImportError, OSError)):
            return False
        raise self.store._explain(self.action, exc) from None


def sqlite_file(storage: str | os.PathLike | None) -> Path | None:
    """The SQLite file a storage URL names, or None (another database, in-memory, or a bad URL,
    which ResultsStore explains)."""
    try:
        parsed = sa.engine.make_url(normalize_storage_url(storage))
    except (sa.exc.ArgumentError, ValueError):
        return None
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).expanduser().absolute()


def reading_store(storage: str | os.PathLike | None = None) -> ResultsStore:
    """A store for commands that only read (`runs`, `report`): an SQLite file is opened read-only
    (nothing written into or beside it, so a read-only copy works), and a missing one reads as
    empty without being created."""
    url = normalize_storage_url(storage)
    path = sqlite_file(url)
    if path is None:
        return ResultsStore(url)
    if not path.exists():
        store = ResultsStore("sqlite://")  # in memory: lists nothing, leaves nothing behind
        store.url = url
        return store
    return ResultsStore(url, read_only=True)


def sqlite_read_only_connect(path: Path) -> sqlite3.Connection:
    """A connection that cannot write to ``path`` nor create anything beside it. A WAL-mode file
    needs its ``-wal``/``-shm`` files to be read: they exist while a writer has it open; when they
    do not, nobody is writing, and ``mode=ro`` alone would create both and leave them behind, so
    the file is opened ``immutable`` instead (a snapshot, taken afresh by each connection)."""
    with open(path, "rb") as f:  # a missing file is an error here, not a new database
        header = f.read(20)
    wal_mode = len(header) == 20 and header[18:20] == b"\x02\x02"
    writer_active = all(Path(f"{path}-{ext}").exists() for ext in ("wal", "shm"))
    flags = "mode=ro&immutable=1" if wal_mode and not writer_active else "mode=ro"
    uri = f"{path.as_uri()}?{flags}"
    return sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False)


def _sqlite_on_connect(dbapi_conn, _record) -> None:
    """WAL journal + busy timeout so several processes (sweep workers) can share one file."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        row = cur.execute("PRAGMA journal_mode").fetchone()
        if row and str(row[0]).lower() != "wal":
            try:
                cur.execute("PRAGMA journal_mode = WAL")
            except Exception:  # e.g. a read-only file or another process switching at once: rollback journal still works
                pass
        cur.execute("PRAGMA synchronous = NORMAL")
    finally:
        cur.close()


# ----------------------------------------------------------------------------------------------
# Plain-text table for `moe-bench runs`
# ----------------------------------------------------------------------------------------------

def _fmt_sci(x: Any) -> str:
    """1.234e15 -> '1.23e15'."""
    if not _is_number(x):
        return "-"
    return f"{x:.2e}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _fmt_num(x: Any) -> str:
    """About 4 significant digits without switching notation in the usual ranges."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-"
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return _fmt_sci(x)
    decimals = 4 if a < 10 else 2 if a < 100 else 1 if a < 1000 else 0
    return f"{x:.{decimals}f}"


def _fmt_count(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return str(int(x))


def _fmt_duration(s: Any) -> str:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


_COLUMNS = [  # header, right-aligned, value(record)
    ("run_id", False, lambda r: r.run_id),
    ("task", False, lambda r: r.task or "-"),
    ("family", False, lambda r: r.family or "-"),
    ("preset", False, lambda r: r.preset or "-"),
    ("status", False, lambda r: r.status),
    ("steps", True, lambda r: str(r.steps) if r.steps or r.status != "running" else "-"),
    ("train_FLOPs", True, lambda r: _fmt_sci(r.train_flops) if r.train_flops else "-"),
    ("val_loss", True, lambda r: _fmt_num(r.metrics.get("val_loss"))),
    ("quality", True, lambda r: _fmt_num(r.metrics.get("quality"))),
    ("quality/active-M", True, lambda r: _fmt_num(r.summary()["quality_per_active_param"])),
    ("active", True, lambda r: _fmt_count(r.active_params)),
    ("wall", True, lambda r: _fmt_duration(r.timings.get("wall_seconds"))),
]


def format_runs_table(records: list[RunRecord]) -> str:
    """A plain-text table (one line per run) for ``moe-bench runs``; '-' marks missing values."""
    headers = [h for h, _, _ in _COLUMNS]
    rows = [[fn(r) for _, _, fn in _COLUMNS] for r in records]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if right else c.ljust(w)
                 for c, w, (_, right, _) in zip(cells, widths, _COLUMNS)]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    if not rows:
        out.append("(no runs)")
    return "\n".join(out)
