"""`moe-bench evaluate` and `moe-bench translate`: a trained run's model on its own splits or new files.

    evaluate_run(run_id)                      -> the run's final evaluation again (same numbers)
    evaluate_run(run_id, split="test")        -> one of its splits
    evaluate_run(run_id, text="my.txt")       -> LM loss / perplexity / bits per token (and char) on any text
    evaluate_run(run_id, src=..., ref=...)    -> translation BLEU / chrF on any file pair
    translate_file(run_id, src)               -> one hypothesis per source line

The weights come from ``runs/<id>/model.pt`` (saved when a run finishes) or, failing that, the
run's ``checkpoints/last.ckpt`` (kept with --keep-checkpoints). Metrics come from the functions
the run's own final evaluation used (``final_evaluation`` / ``evaluate_loader`` / ``decode`` in
bench/train/run.py) under the recorded run config (evaluation batch size, precision, beam size,
length limit), so `evaluate RUN_ID` reproduces the record's final metrics by construction.
Every result is appended to ``record.extra["evaluations"]``; the run's own metrics never change.
The metrics the run's task lists (its YAML's ``metrics:``) come first (bench/train/task_metrics.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.config import ConfigError, from_dict
from bench.data.datamodules import BlockDataset, PairDataset, build_datamodule, collate_pairs, encode_pairs
from bench.data.sources import resolve_corpus
from bench.data.tasks import TaskConfig
from bench.data.text import prepare_text, split_lines
from bench.data.tokenizers import get_tokenizer
from bench.flops import model_cost
from bench.runtime import skip_uninitialized_fill
from bench.models import build_model
from bench.models.config import ModelConfig
from bench.tracking.liveness import live_owner
from bench.tracking.records import ResultsStore, RunRecord, runs_dir, utc_now_iso
from bench.train.config import RunConfig
from bench.train.module import LMModule, TranslationModule, eval_batch_size
from bench.train.run import (MODEL_FILE, _precision, _recorded_task, decode, evaluate_loader, final_evaluation,
                             stored_record)
from bench.train.task_metrics import add_bits_per_char, listed_first

SPLITS = ("val", "test")


@dataclass
class LoadedRun:
    record: RunRecord
    task: TaskConfig
    cfg: ModelConfig
    rc: RunConfig
    module: pl.LightningModule
    active_params: int
    run_dir: Path
    data_dir: str | None

    @property
    def eval_batch_size(self) -> int:
        """Sequences per evaluation batch, as the run's own evaluation had them."""
        return eval_batch_size(self.rc.train.eval_batch_size, self.cfg, self.task)


def load_run(run_id: str, storage: str | None, context: str, beam_size: int | None = None) -> LoadedRun:
    """The run's record, task, run config (``beam_size`` replacing the recorded one) and model."""
    record = stored_record(run_id, storage, context)
    run_dir = Path(record.paths.get("run_dir") or runs_dir() / run_id)
    if record.status == "running" and live_owner(run_dir) is not None:
        raise ConfigError([f"run {run_id} is still running: {context} it when it has finished"], context)
    task = _recorded_task(record, context)
    cfg = from_dict(ModelConfig, record.config["model"])
    rc = from_dict(RunConfig, record.config["run"])
    if beam_size is not None:
        if task.type != "translation":
            raise ConfigError([f"--beam-size applies to translation runs; run {run_id} is a language model "
                               f"(task {task.name})"], context)
        if beam_size < 1:
            raise ConfigError([f"beam_size={beam_size} is not allowed: must be >= 1"], context)
        rc.train.beam_size = beam_size
    model = build_model(cfg, task.type)
    model.load_state_dict(_weights(record, run_dir, context))
    cost = model_cost(cfg, task.target_len, task.type, src_len=task.src_len)  # as _execute computes it
    module = (LMModule if task.type == "lm" else TranslationModule)(model, rc.optim, cost.active_params)
    return LoadedRun(record, task, cfg, rc, module, cost.active_params, run_dir,
                     record.config.get("data_dir"))


def _weights(record: RunRecord, run_dir: Path, context: str) -> dict[str, torch.Tensor]:
    model_file = Path(record.paths.get("model") or run_dir / MODEL_FILE)
    ckpt = Path(record.paths.get("checkpoint_dir") or run_dir / "checkpoints") / "last.ckpt"
    path = model_file if model_file.is_file() else ckpt if ckpt.is_file() else None
    if path is None:
        raise ConfigError([f"run {record.run_id} has no saved model: neither {model_file} nor {ckpt} exists (sweep "
                           "trials, runs from before model.pt existed and runs cleaned with `moe-bench clean --models` "
                           "keep none); train it again"], context)
    try:
        if path == model_file:
            return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        # A Lightning checkpoint holds the LightningModule's state: the model's under "model.".
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    except Exception as e:
        raise ConfigError([f"the saved model of run {record.run_id} cannot be read ({type(e).__name__}: {e}): "
                           f"{path}"], context) from None


def _trainer(run: LoadedRun) -> pl.Trainer:
    """A trainer for evaluation only, with the run's precision (the same numbers as its final evaluation).

    One device, whatever the run trained on (``accelerator="auto"``, as training): a run's own
    final evaluation does not shard its loaders either (``use_distributed_sampler=False``), so
    with several devices each scored the whole split and the ranks' means agree; one device gives
    the same numbers without starting a process group or scoring everything N times."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    trainer = pl.Trainer(accelerator="auto", devices=1, precision=_precision(run.rc.train.precision), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(run.run_dir), deterministic="warn", use_distributed_sampler=False)
    skip_uninitialized_fill()
    return trainer


def read_lines(path: str | Path, what: str, context: str) -> list[str]:
    """Lines of a UTF-8 file (as corpus files are split), or one clear error."""
    text = read_text(path, what, context)
    return split_lines(text)


def read_text(path: str | Path, what: str, context: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{what} file {path} does not exist"], context)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{what} file {path} is not UTF-8 text ({e})"], context) from None
    if not text.strip():
        raise ConfigError([f"{what} file {path} is empty"], context)
    return text


def _pair_loader(tok, src: list[str], tgt: list[str], run: LoadedRun) -> DataLoader:
    # As TranslationDataModule's evaluation loaders: same encoding, truncation, batch size and order.
    task = run.task
    ds = PairDataset(*encode_pairs(tok, src, tgt, task.src_len, task.tgt_len))
    return DataLoader(ds, batch_size=run.eval_batch_size, shuffle=False,
                      collate_fn=partial(collate_pairs, pad_id=tok.pad_id))


def _block_loader(ids: list[int], run: LoadedRun) -> DataLoader:
    # As LMDataModule's evaluation loaders: non-overlapping blocks of seq_len, every token after
    # the first predicted once, the incomplete tail block dropped.
    seq_len = run.task.seq_len
    ds = BlockDataset(np.asarray(ids, dtype=np.int64), seq_len)
    return DataLoader(ds, batch_size=run.eval_batch_size, sampler=range(0, len(ds), seq_len))


def _tokenizer(run: LoadedRun):
    """The run's task tokenizer, as its datamodule built (or cached) it."""
    return get_tokenizer(run.task, resolve_corpus(run.task, run.data_dir))


def evaluate_run(run_id: str, storage: str | None = None, split: str | None = None, text: str | None = None,
                 src: str | None = None, ref: str | None = None, beam_size: int | None = None) -> dict[str, Any]:
    """Evaluate a run's model and append the result to its record; returns that entry
    ({"source", "metrics", "at"}, plus "hypotheses" for translation) with "run_id"."""
    ctx = "evaluate"
    given = [name for name, v in (("--split", split), ("--text", text), ("--src/--ref", src or ref)) if v]
    if len(given) > 1:
        raise ConfigError([f"give one of --split, --text, --src/--ref, not {' and '.join(given)}"], ctx)
    if bool(src) != bool(ref):
        raise ConfigError(["--src and --ref go together: the source sentences and their reference translations"],
                          ctx)
    if split is not None and split not in SPLITS:
        raise ConfigError([f"split={split!r} is not allowed: expected one of {', '.join(SPLITS)}"], ctx)
    run = load_run(run_id, storage, ctx, beam_size)
    task, rc = run.task, run.rc
    if text and task.type != "lm":
        raise ConfigError([f"run {run_id} is a translation model (task {task.name}): --text scores language "
                           "models; give --src FILE --ref FILE"], ctx)
    if src and task.type != "translation":
        raise ConfigError([f"run {run_id} is a language model (task {task.name}): --src/--ref score translation "
                           "models; give --text FILE"], ctx)
    if split and not task.has_split(split):
        raise ConfigError([f"task {task.name} has no {split} split"], ctx)
    entry: dict[str, Any] = {}
    if text:
        # Tags and blank lines go the way the task's corpus reads them, so a file in the corpus's own
        # format scores like its splits do.
        body = prepare_text(task, read_text(text, "--text", ctx))
        if not body.strip():
            raise ConfigError([f"--text file {text} has no text left once prepared like task {task.name} "
                               "(tags stripped, blank lines skipped)"], ctx)
        try:
            ids = _tokenizer(run).encode(body)
        except ValueError as e:  # a char vocabulary has no <unk>
            raise ConfigError([f"--text file {text} cannot be tokenized like task {task.name}: {e}"], ctx) from None
        if len(ids) < task.seq_len + 1:
            raise ConfigError([f"--text file {text} has {len(ids)} tokens, fewer than one block of seq_len + 1 = "
                               f"{task.seq_len + 1}"], ctx)
        loader = _block_loader(ids, run)
        metrics = evaluate_loader(_trainer(run), run.module, loader, "val", task, rc, run.active_params)
        metrics["tokens"] = len(loader.sampler) * task.seq_len  # tokens scored
        add_bits_per_char(metrics, task, "", len(ids), len(body))
        source: dict[str, Any] = {"text": str(Path(text).resolve())}
    elif src:
        sources, refs = read_lines(src, "--src", ctx), read_lines(ref, "--ref", ctx)
        if len(sources) != len(refs):
            raise ConfigError([f"--src has {len(sources)} lines but --ref has {len(refs)}: they must pair up line "
                               "by line"], ctx)
        tok = _tokenizer(run)
        hyp_file = run.run_dir / f"eval-{Path(src).name}.hyp.txt"
        metrics = evaluate_loader(_trainer(run), run.module, _pair_loader(tok, sources, refs, run), "val",
                                  task, rc, run.active_params, tok, refs, hyp_file)
        metrics["sentences"] = len(sources)
        source = {"src": str(Path(src).resolve()), "ref": str(Path(ref).resolve())}
        entry["hypotheses"] = str(hyp_file)
    else:  # the run's own final evaluation, with its own data module settings
        dm = build_datamodule(task, data_dir=run.data_dir, batch_size=rc.train.batch_size, seed=run.record.seed,
                              num_workers=rc.train.num_workers)
        dm.eval_batch_size = run.eval_batch_size
        splits = [split] if split else None
        metrics = final_evaluation(_trainer(run), run.module, dm, task, rc, run.active_params, splits=splits,
                                   hyp_prefix="eval-")
        metrics = {k: v for k, v in metrics.items() if v is not None}
        source = {"split": split or "final"}
        if task.type == "translation":
            entry["hypotheses"] = [str(run.run_dir / f"eval-{s}.hyp.txt")
                                   for s in (splits or ["val", "test"]) if task.has_split(s)]
    if task.type == "translation":
        source["beam_size"] = rc.train.beam_size
    entry = {"source": source, "metrics": listed_first(task, metrics), "at": utc_now_iso(), **entry}
    _append_evaluation(run_id, storage, entry)
    return {"run_id": run_id, **entry}


def _append_evaluation(run_id: str, storage: str | None, entry: dict) -> None:
    store = ResultsStore(storage)
    record = store.get(run_id)  # read again: the run's record may have changed while this evaluated
    record.extra.setdefault("evaluations", []).append(entry)
    store.save(record)


def translate_file(run_id: str, src: str, out: str | None = None, beam_size: int | None = None,
                   storage: str | None = None) -> list[str]:
    """One hypothesis per line of ``src``, decoded as the run's final evaluation decodes; written to ``out``."""
    ctx = "translate"
    run = load_run(run_id, storage, ctx, beam_size)
    if run.task.type != "translation":
        raise ConfigError([f"run {run_id} is a language model (task {run.task.name}), not a translation model"],
                          ctx)
    sources = read_lines(src, "--src", ctx)
    tok = _tokenizer(run)
    hyps = decode(run.module.model, _pair_loader(tok, sources, [""] * len(sources), run), tok,
                  run.task, run.rc)
    if out:
        Path(out).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    return hyps


__all__ = ["evaluate_run", "load_run", "translate_file"]
