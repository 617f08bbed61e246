"""Weights & Biases for moe-bench: offline unless logged in, and never fatal.

``make_wandb_logger`` starts the W&B run itself (so every failure surfaces here, not in the middle
of ``Trainer.fit``) and wraps it in a ``lightning.pytorch.loggers.WandbLogger``. Mode:
``$WANDB_MODE`` if set, else online when logged in (``WANDB_API_KEY`` or a netrc entry for the W&B
host, checked without network), else offline. If wandb cannot be imported or started it warns once
per process and returns None; training then logs to the local CSV only.

Offline runs are written to ``<save_dir>/wandb/offline-run-<YYYYmmdd_HHMMSS>-<id>/`` containing
``run-<id>.wandb`` (the binary transaction log with every logged row), ``files/`` (config,
requirements, output) and ``logs/``; upload later with ``wandb sync <that dir>``.
``read_offline_history`` / ``read_offline_run_keys`` read the transaction log back without network.
"""
from __future__ import annotations

import json
import netrc
import os
import struct
import sys
import time
import warnings
import zlib

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

DEFAULT_WANDB_HOST = "https://api.wandb.ai"
# The run summary keeps the best value of these (W&B's default is the last one).
SUMMARY_BEST = {"val/loss": "min", "val/perplexity": "min", "val/quality": "max", "val/mean_token_prob": "max",
                "val/curve_bleu": "max"}
_MODE_ALIASES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                 "disabled": "disabled"}
_shown: set[str] = set()  # once-per-process messages already shown ("warning", "mode")


class WandbUnavailableWarning(RuntimeWarning):
    """W&B logging is off for this process (or fell back to offline); local CSV logging continues."""


def _warn_once(message: str) -> None:
    if "warning" in _shown:
        return
    _shown.add("warning")
    warnings.warn(message, WandbUnavailableWarning, stacklevel=3)


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw in ("1", "true", "yes", "on")


def _note_once(key: str, message: str) -> None:
    if key in _shown:
        return
    _shown.add(key)
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Mode decision (no network)
# ----------------------------------------------------------------------------------------------

def _netrc_path() -> Path:
    """The netrc file wandb reads: $NETRC, else ~/.netrc, else ~/_netrc (same order as wandb)."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix = Path("~/.netrc").expanduser()
    windows = Path("~/_netrc").expanduser()
    return windows if not unix.exists() and windows.exists() else unix


def _wandb_host() -> str:
    url = os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_HOST
    return urlsplit(url if "://" in url else "https://" + url).netloc or url


def _netrc_login(host: str) -> tuple[bool, str]:
    path = _netrc_path()
    try:
        creds = netrc.netrc(str(path)).authenticators(host)
    except FileNotFoundError:
        return False, f"no {path}"
    except (netrc.NetrcParseError, OSError) as e:
        return False, f"{path} unreadable ({e})"
    if creds and creds[2]:
        return True, f"{host} entry in {path}"
    return False, f"no {host} entry in {path}"


def wandb_mode() -> tuple[str, str]:
    """('online' | 'offline' | 'disabled', one-line reason). Never touches the network."""
    raw = os.environ.get("WANDB_MODE", "").strip()
    if raw:
        mode = _MODE_ALIASES.get(raw.lower())
        if mode is not None:
            return mode, f"WANDB_MODE={raw}"
        return "offline", (f"WANDB_MODE={raw!r} is not one of online, offline, disabled; "
                           f"using offline")
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED is set"
    if os.environ.get("WANDB_API_KEY", "").strip():
        return "online", "logged in (WANDB_API_KEY is set)"
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE", "").strip():
        return "online", "logged in (WANDB_IDENTITY_TOKEN_FILE is set)"
    host = _wandb_host()
    ok, where = _netrc_login(host)
    if ok:
        return "online", f"logged in ({where})"
    return "offline", f"not logged in to W&B (no WANDB_API_KEY, {where}); `wandb login` enables online logging"


# ----------------------------------------------------------------------------------------------
# Logger
# ----------------------------------------------------------------------------------------------

def start_wandb_run(project: str, name: str, group: str | None, config: dict[str, Any],
                    save_dir: str | os.PathLike, tags: list[str] | None = None, job_type: str = "train",
                    setup: Callable[[Any], Any] | None = None) -> Any:
    """A started W&B run, or None when W&B is disabled or unusable (then one warning per process
    says why). ``setup(run)`` runs right after ``wandb.init`` and its result is returned instead of
    the run; a failure in either tries offline next. The run directory lands under
    ``save_dir/wandb/``; project and entity come from ``WANDB_PROJECT``/``WANDB_ENTITY`` when set."""
    mode, reason = wandb_mode()
    if mode == "disabled":
        _note_once("mode", f"wandb: disabled ({reason}); metrics go to the local CSV only")
        return None
    try:
        import wandb
    except Exception as e:  # ImportError, or a broken install raising anything else on import
        _warn_once(f"W&B logging is off: cannot import wandb ({type(e).__name__}: {e}); "
                   f"metrics still go to the local CSV log")
        return None

    save_dir = Path(save_dir)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _warn_once(f"W&B logging is off: cannot create {save_dir} ({e}); metrics still go to the local CSV log")
        return None

    try:  # wandb wants plain JSON-like values; tensors/paths/dataclasses become numbers/strings
        from bench.tracking.records import _jsonable

        config = json.loads(json.dumps(dict(config or {}), default=lambda v: _safe_json(v, _jsonable)))
    except (TypeError, ValueError):
        config = {k: str(v) for k, v in dict(config or {}).items()}
    failures: list[str] = []
    for attempt in ([mode] if mode == "offline" else [mode, "offline"]):
        run = None
        try:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT") or project,
                             entity=os.environ.get("WANDB_ENTITY") or None, name=name, group=group, config=config,
                             tags=list(tags) if tags else None, dir=str(save_dir), mode=attempt,
                             reinit="finish_previous", job_type=job_type,
                             # W&B's own banner, sparkline history and summary per run drown the
                             # training output; our one line below says where the run went.
                             settings=wandb.Settings(silent=_env_flag("WANDB_SILENT", True)))
            result = setup(run) if setup is not None else run
        except Exception as e:
            failures.append(f"{attempt} init failed: {type(e).__name__}: {e}")
            if run is not None:  # started but could not be set up: do not leave it open
                try:
                    run.finish(exit_code=1)
                except Exception:
                    pass
            continue
        run_dir = _run_dir(run) or save_dir / "wandb"
        if failures:
            _warn_once(f"W&B {mode} logging failed ({failures[0]}); logging offline to {run_dir} instead. "
                       f"Upload later with `wandb sync {run_dir}`")
        if attempt == "offline":
            _note_once("mode", f"wandb: offline ({reason}). Runs are saved under <save_dir>/wandb/ "
                               f"(this one: {run_dir}); upload later with `wandb sync {run_dir}`")
        else:
            _note_once("mode", f"wandb: online ({reason}); local copy in {run_dir}")
        return result
    _warn_once("W&B logging is off for this process: " + "; ".join(failures)
               + ". Metrics still go to the local CSV log")
    return None


def make_wandb_logger(project: str, name: str, group: str | None, config: dict[str, Any],
                      save_dir: str | os.PathLike, tags: list[str] | None = None, job_type: str = "train"):
    """A ``lightning.pytorch.loggers.WandbLogger`` whose run is already started (so every failure
    surfaces here, not in the middle of ``Trainer.fit``), or None when W&B is off; CSV logging is
    unaffected. Call :func:`finish_wandb_logger` when training ends so the run is closed and flushed."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except Exception as e:
        _warn_once(f"W&B logging is off: cannot import WandbLogger ({type(e).__name__}: {e}); "
                   f"metrics still go to the local CSV log")
        return None

    def wrap(run):
        logger = WandbLogger(project=project, name=name, save_dir=str(save_dir), experiment=run,
                             group=group, tags=list(tags) if tags else None)
        # Same x-axis as WandbLogger sets up when it creates the run itself; the budget
        # counters are metrics too, so tokens, training FLOPs or seconds can be the x-axis.
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        for counter in ("train/tokens_seen", "train/flops_spent", "train/seconds"):
            run.define_metric(counter, step_metric="trainer/global_step", summary="max")
        for key, best in SUMMARY_BEST.items():
            run.define_metric(key, step_metric="trainer/global_step", summary=best)
        return logger

    return start_wandb_run(project, name, group, config, save_dir, tags, job_type, setup=wrap)


def log_tables(name: str, group: str | None, job_type: str, tables: dict[str, tuple[list[str], list[list[Any]]]],
               save_dir: str | os.PathLike, config: dict[str, Any] | None = None, tags: list[str] | None = None,
               files: list[Path] | None = None, artifact: str | None = None) -> str | None:
    """One W&B run holding ``tables`` (name -> (columns, rows)) as ``wandb.Table``s, and ``files``
    as one artifact of type "report" named ``artifact``: the comparison itself, beside its runs.
    Returns the run's local directory, or None when W&B is off. Never raises."""
    run = start_wandb_run("moe-bench", name, group, config or {}, save_dir, tags, job_type)
    if run is None:
        return None
    try:
        import wandb

        run.log({key: wandb.Table(columns=list(cols), data=[list(r) for r in rows])
                 for key, (cols, rows) in tables.items()})
        if files:
            art = wandb.Artifact(artifact or name, type="report")
            for f in files:
                art.add_file(str(f), name=Path(f).name if Path(f).parent.name != "plots" else f"plots/{Path(f).name}")
            run.log_artifact(art)
    except Exception as e:  # a table that cannot be logged never fails the command
        _warn_once(f"W&B tables were not logged ({type(e).__name__}: {e})")
    run_dir = _run_dir(run)
    finish_wandb_logger(SimpleNamespace(_experiment=run))
    return str(run_dir) if run_dir else None


def _safe_json(value: Any, convert) -> Any:
    try:
        return convert(value)
    except TypeError:
        return str(value)


def _run_dir(run: Any) -> Path | None:
    try:
        return Path(run.settings.sync_dir)
    except Exception:
        return None


def wandb_run_info(logger: Any) -> dict[str, Any]:
    """{'mode', 'run_id', 'dir'} of a logger from :func:`make_wandb_logger` (for RunRecord.wandb
    and paths); ``{'mode': 'disabled'}`` for None."""
    if logger is None:
        return {"mode": "disabled", "run_id": None, "dir": None}
    run = getattr(logger, "_experiment", None)
    try:
        mode = str(run.settings.mode)
        mode = _MODE_ALIASES.get(mode, mode)
    except Exception:
        mode = None
    run_dir = _run_dir(run) if run is not None else None
    return {"mode": mode, "run_id": getattr(run, "id", None), "dir": str(run_dir) if run_dir else None}


def finish_wandb_logger(logger: Any, status: str = "finished", timeout: float = 30.0) -> None:
    """Close the logger's W&B run and wait (up to ``timeout`` s) until its local transaction log
    is complete. ``status`` is a RunRecord status: 'finished' and 'pruned' end with exit code 0,
    others with 1. Never raises; a None logger is fine."""
    run = getattr(logger, "_experiment", None) if logger is not None else None
    if run is None:
        return
    log_file = None
    try:
        log_file = Path(run.settings.sync_file)
    except Exception:
        pass
    try:
        run.finish(exit_code=0 if status in ("finished", "pruned") else 1)
    except Exception as e:
        _warn_once(f"W&B run could not be finished cleanly ({type(e).__name__}: {e}); "
                   f"the local CSV log is unaffected")
        return
    if log_file is not None:
        _wait_for_exit_record(log_file, timeout)


def _wait_for_exit_record(path: Path, timeout: float) -> bool:
    """wandb-core may still be writing the transaction log when ``run.finish()`` returns (seen with
    wandb 0.31 offline: sometimes only the 7-byte header is on disk at that point). Wait until the
    log ends with the run's exit record so readers and ``wandb sync`` see the whole run."""
    deadline = time.monotonic() + timeout
    last_size = -1
    while True:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        if size > _HEADER and size == last_size and _has_exit_record(path):
            return True
        if time.monotonic() >= deadline:
            return False
        last_size = size
        time.sleep(0.05)


def _has_exit_record(path: Path) -> bool:
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in _records(path))
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# Reading offline runs (transaction log, no network)
# ----------------------------------------------------------------------------------------------
# run-<id>.wandb: header b":W&B" + magic 0xBEE1 (LE) + version 0, then LevelDB-log records in
# 32 KiB blocks: crc32(type + data) u32 LE, length u16 LE, type u8 (1 full, 2 first, 3 middle,
# 4 last), data; a block tail shorter than a record header is zero padding. Each complete record
# is a wandb.proto.wandb_internal_pb2.Record.

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _find_wandb_file(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no W&B run at {path}")
    found = sorted(path.glob("run-*.wandb")) or sorted({p.resolve() for p in path.rglob("*.wandb")})
    if not found:
        raise FileNotFoundError(f"no .wandb transaction log under {path}")
    if len(found) > 1:
        raise ValueError(f"{len(found)} W&B runs under {path}; pass one run directory: "
                         + ", ".join(str(f.parent) for f in found))
    return found[0]


def _raw_records(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log (bad header)")
    pos, pending = _HEADER, None
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        if kind == 0 and length == 0 and crc == 0:  # zero padding (preallocated / block tail)
            pos += left
            continue
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            return  # truncated or still being written: stop at the last complete record
        pos += _HEADER + length
        if kind == _FULL:
            pending = None
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE and pending is not None:
            pending += chunk
        elif kind == _LAST and pending is not None:
            yield pending + chunk
            pending = None


def _item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def _decode(value_json: str) -> Any:
    try:
        return json.loads(value_json)
    except ValueError:
        return value_json


def _records(run_dir: str | os.PathLike) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = _find_wandb_file(run_dir).read_bytes()
    for raw in _raw_records(data):
        record = pb.Record()
        try:
            record.ParseFromString(raw)
        except Exception:
            continue
        yield record


def read_offline_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Logged rows of an offline run, in order (keys include wandb's _step/_runtime/_timestamp).
    ``run_dir``: the run directory, its .wandb file, or a folder holding exactly one run."""
    rows = []
    for record in _records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append({_item_key(item): _decode(item.value_json) for item in record.history.item})
    return rows


def read_offline_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Name, group, job type, tags and config of an offline run, as its .wandb file records them."""
    info: dict[str, Any] = {"config": {}}
    for record in _records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            info.update(name=run.display_name, group=run.run_group, job_type=run.job_type, tags=list(run.tags),
                        project=run.project)
            info["config"].update({_item_key(i): _decode(i.value_json) for i in run.config.update})
        elif kind == "config":
            info["config"].update({_item_key(i): _decode(i.value_json) for i in record.config.update})
    return info


def read_offline_tables(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The ``wandb.Table``s an offline run logged: name -> {"columns", "data"} (read from the run's
    ``files/media/table/`` copy, where ``wandb sync`` uploads them from)."""
    root = _find_wandb_file(run_dir).parent
    tables = {}
    for row in read_offline_history(root):
        for key, value in row.items():
            if key.endswith("._type") and value == "table-file":
                name = key[:-len("._type")]
                tables[name] = json.loads((root / "files" / row[f"{name}.path"]).read_text(encoding="utf-8"))
    return tables


def read_offline_artifacts(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Artifacts an offline run logged: name -> {"type", "files": [paths inside the artifact]}."""
    found = {}
    for record in _records(run_dir):
        if record.WhichOneof("record_type") == "artifact":
            art = record.artifact
            found[art.name] = {"type": art.type, "files": sorted(c.path for c in art.manifest.contents)}
    return found


def read_offline_run_keys(run_dir: str | os.PathLike) -> set[str]:
    """Metric keys logged in an offline run (history rows and summary updates), without wandb's
    internal ``_``-prefixed keys."""
    keys: set[str] = set()
    for record in _records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            keys.update(_item_key(item) for item in record.history.item)
        elif kind == "summary":
            keys.update(_item_key(item) for item in record.summary.update)
    return {k for k in keys if k and not k.startswith("_")}
