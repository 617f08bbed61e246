"""Callbacks: compute-budget stop, throughput/FLOPs logging, MoE routing stats, RNG state.

All counters live in callback ``state_dict``s, so a resumed run continues its budget exactly.
"""
from __future__ import annotations

import sys
import time
import warnings
from functools import lru_cache
from typing import Callable

import lightning.pytorch as pl
import torch

from lightning.pytorch.callbacks import ProgressBar

from bench.flops import model_cost
from bench.models.config import ModelConfig
from bench.runtime import CpuClock, load_average, machine_id, usable_cpus


class ComputeTracker:
    """Training FLOPs of one batch, from ``bench.flops`` at the batch's (padded) lengths."""

    def __init__(self, cfg: ModelConfig, task_type: str):
        self.cfg, self.task_type = cfg, task_type

    @lru_cache(maxsize=256)
    def _per_token(self, tgt_len: int, src_len: int | None) -> float:
        return model_cost(self.cfg, tgt_len, self.task_type, src_len=src_len).train_flops_per_token

    def batch(self, batch) -> tuple[int, float]:
        """(real tokens, training FLOPs executed) of one batch."""
        if self.task_type == "lm":
            x = batch[0]
            return x.numel(), self._per_token(x.shape[1], None) * x.numel()
        B, T = batch["tgt_in"].shape
        S = batch["src"].shape[1]
        return int(batch["tgt_mask"].sum()), self._per_token(T, S) * B * T


class BudgetStop(pl.Callback):
    """Counts steps, tokens, FLOPs and seconds; stops training once the chosen one is spent.
    Also logs throughput and learning rate each step (train/tokens_per_sec, train/lr)."""

    def __init__(self, kind: str, value: float, tracker: ComputeTracker):
        self.kind, self.value, self.tracker = kind, float(value), tracker
        self.spent = {"steps": 0, "tokens": 0, "flops": 0.0, "seconds": 0.0}
        self._t0: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Resumed from a checkpoint written after the budget was spent (killed during the final
        # evaluation): evaluate, train no further step.
        if self.exhausted:
            trainer.should_stop = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens, flops = self.tracker.batch(batch)
        world = trainer.world_size  # every process trains on its own batch
        dt = max(time.perf_counter() - self._t0, 1e-9) if self._t0 is not None else None
        self.spent["steps"] += 1
        self.spent["tokens"] += tokens * world
        self.spent["flops"] += flops * world
        if dt is not None:
            self.spent["seconds"] += dt
            pl_module.log_dict({"train/tokens_per_sec": tokens * world / dt,
                                "train/lr": trainer.optimizers[0].param_groups[0]["lr"]},
                               on_step=True, on_epoch=False)
        # Logged counters also reach the main process after a ddp_spawn run (callback_metrics).
        pl_module.log_dict({"train/tokens_seen": float(self.spent["tokens"]),
                            "train/flops_spent": float(self.spent["flops"]),
                            "train/steps_done": float(self.spent["steps"]),
                            "train/seconds": float(self.spent["seconds"])}, on_step=True, on_epoch=False)
        if self.exhausted:
            trainer.should_stop = True

    @property
    def exhausted(self) -> bool:
        return self.spent[self.kind] >= self.value

    @property
    def fraction(self) -> float:
        return min(1.0, self.spent[self.kind] / self.value)

    def state_dict(self) -> dict:
        return {"spent": dict(self.spent)}

    def sync_from_logged(self, metrics: dict) -> None:
        """After a ddp_spawn run the workers' counters exist only as logged metrics."""
        if self.spent["steps"] == 0 and "train/steps_done" in metrics:
            for key, name in (("steps", "train/steps_done"), ("tokens", "train/tokens_seen"),
                              ("flops", "train/flops_spent"), ("seconds", "train/seconds")):
                self.spent[key] = float(metrics[name])

    def load_state_dict(self, state_dict: dict) -> None:
        self.spent.update(state_dict["spent"])


class EvalCurve(pl.Callback):
    """One point per evaluation (step, tokens, FLOPs, seconds, val metrics), kept in the run
    record so reports can draw learning curves and find "steps to reach quality q" from the
    results store alone (run directories are not committed; the store is)."""

    KEYS = ("val/loss", "val/mean_token_prob", "val/aux_loss")

    def __init__(self, budget: BudgetStop):
        self.budget = budget
        self.points: list[dict] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        point = {"step": int(self.budget.spent["steps"]), "tokens": int(self.budget.spent["tokens"]),
                 "flops": float(self.budget.spent["flops"]), "seconds": round(float(self.budget.spent["seconds"]), 3)}
        for key in self.KEYS:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                point[key.split("/", 1)[1]] = float(value)
        if "loss" in point:
            self.points.append(point)

    def state_dict(self) -> dict:
        return {"points": list(self.points)}

    def load_state_dict(self, state: dict) -> None:
        self.points = list(state.get("points", []))


class SaveProgress(pl.Callback):
    """After each evaluation of training, ``save()`` the record as it stands (steps, tokens, FLOPs
    and curve so far, status still "running"): the store shows how far a long run got, and a run
    killed with -9 keeps the curve up to its last checkpoint. A failed save only warns: the run
    goes on, and its final save reports a store that stays broken."""

    def __init__(self, save: Callable[[], None]):
        self.save: Callable[[], None] | None = save
        self.warned = False

    def __getstate__(self) -> dict:
        # strategy=ddp_spawn pickles the callbacks into spawned ranks: ``save`` closes over the
        # launching process's record and store, so a spawned copy saves nothing (the launcher
        # saves the record when training ends).
        return {**self.__dict__, "save": None}

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.save is None or trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        try:
            self.save()
        except Exception as e:  # noqa: BLE001 - progress is a convenience; training must not stop for it
            if not self.warned:
                self.warned = True
                warnings.warn(f"could not save this run's progress to the results store ({type(e).__name__}: {e}); "
                              "training goes on", RuntimeWarning, stacklevel=2)


def _status(trainer, budget: "BudgetStop") -> list[str]:
    """Step, tokens, latest train and validation loss, throughput: the progress line's and bar's middle."""
    spent = budget.spent
    parts = [f"step {spent['steps']}", f"{spent['tokens'] / 1e6:.2f}M tokens"]
    for key, name in (("train/loss", "train loss"), ("val/loss", "val loss")):
        value = trainer.callback_metrics.get(key)
        if value is not None:
            parts.append(f"{name} {float(value):.4f}")
    if spent["seconds"] > 0:
        parts.append(f"{spent['tokens'] / spent['seconds']:,.0f} tokens/s")
    return parts


class ProgressLine(pl.Callback):
    """One progress line every ``every_s`` seconds, for output that is not a terminal (a log file,
    CI, ``tee``), where a progress bar prints nothing useful: budget spent, step, tokens, the
    latest train and validation loss, throughput and the time left at that pace."""

    def __init__(self, budget: BudgetStop, label: str, every_s: float = 60.0, stream=None):
        self.budget, self.label, self.every_s = budget, label, every_s
        self.stream = stream
        self._start = self._last = None
        self._done_at_start = 0.0  # a resumed run starts part-way through its budget

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.monotonic()
        self._done_at_start = self.budget.fraction

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if self._last is None or now - self._last < self.every_s or not trainer.is_global_zero:
            return
        self._last = now
        print(self.line(trainer, now), file=self.stream or sys.stderr, flush=True)

    def line(self, trainer, now: float) -> str:
        done = self.budget.fraction
        parts = [f"{self.label}: {100 * done:4.1f}% of {self.budget.value:.3g} {self.budget.kind}",
                 *_status(trainer, self.budget)]
        elapsed, progressed = now - self._start, done - self._done_at_start
        if progressed > 0 and done < 1:
            parts.append(f"~{_minutes(elapsed * (1 - done) / progressed)} left")
        return " | ".join(parts)


class MachineLoad(pl.Callback):
    """Was the machine shared while this run trained? Two measures, both pooled over a resumed run's
    segments: the 1-minute load average at the start of training and every ``every_s`` seconds (a run
    alone keeps it near its thread count; it also counts niced background work that barely slows the
    run), and this process's CPU share: CPU seconds over wall seconds x torch's threads (~0.97 alone on
    2 cores; ~0.5 when another busy process of equal priority takes half the cores). The report
    judges by the share where a record has it. No load samples where the OS has no load average."""

    def __init__(self, every_s: float = 15.0):
        self.every_s = every_s
        self.samples: list[float] = []
        self._last: float | None = None
        self.clock: CpuClock | None = None

    def _sample(self) -> None:
        load = load_average()
        if load is not None:
            self.samples.append(load)
        self._last = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock = CpuClock()
        self._sample()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._last is None or time.monotonic() - self._last >= self.every_s:
            self._sample()

    def timings(self, earlier: dict | None = None) -> dict:
        """``load_avg_mean``/``load_avg_max``/``load_samples``/``cpus`` and ``cpu_seconds``/
        ``cpu_thread_seconds`` (wall x threads)/``threads``/``cpu_share``, each pooled with a resumed run's earlier
        segments (``earlier``: its record's timings), and ``machines`` (``machine_id`` of every segment);
        empty before training started."""
        earlier = earlier or {}
        out: dict = {}
        n0 = int(earlier.get("load_samples") or 0)
        n = n0 + len(self.samples)
        if n:
            total = (earlier.get("load_avg_mean") or 0.0) * n0 + sum(self.samples)
            peak = max([*self.samples, *([earlier["load_avg_max"]] if n0 else [])])
            out.update(load_avg_mean=total / n, load_avg_max=peak, load_samples=n, cpus=usable_cpus())
        if self.clock is not None:
            cpu = float(earlier.get("cpu_seconds") or 0.0) + self.clock.cpu_seconds()
            capacity = float(earlier.get("cpu_thread_seconds") or 0.0) + self.clock.thread_seconds()
            out.update(cpu_seconds=cpu, cpu_thread_seconds=capacity, threads=self.clock.threads,
                       cpu_share=cpu / capacity if capacity > 0 else None)
            # every machine (boot) the run trained on: a resumed run may have moved
            here = machine_id()
            machines = sorted({*(earlier.get("machines") or []), *([here] if here else [])})
            if machines:
                out["machines"] = machines
        return out


class BudgetBar(ProgressBar):
    """Lightning's progress bar for a terminal, measured in the run's budget: percent of the FLOPs
    (tokens, steps, seconds) spent, time left at the current pace, step, tokens, losses and
    throughput; no per-epoch bars (an "epoch" here is only the evaluation interval)."""

    def __init__(self, budget: BudgetStop, label: str):
        super().__init__()
        self.budget, self.label = budget, label
        self._bar = None
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        from tqdm.auto import tqdm

        # Percent with one decimal as the unit: tqdm's rate and time left then follow the budget.
        self._bar = tqdm(total=1000, initial=round(1000 * self.budget.fraction), dynamic_ncols=True, file=sys.stderr,
                         desc=f"{self.label} ({self.budget.value:.3g} {self.budget.kind})", leave=True,
                         bar_format="{desc}: {percentage:3.0f}%|{bar:20}| [{elapsed}<{remaining}]{postfix}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None:
            return
        self._bar.n = round(1000 * self.budget.fraction)
        self._bar.set_postfix_str(" | ".join(_status(trainer, self.budget)), refresh=False)
        self._bar.refresh()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class CurveBLEU(pl.Callback):
    """Translation: greedy BLEU on the first ``batches`` validation batches at every evaluation,
    added to the learning curve's point ("bleu"), so a report can tell whether BLEU had settled
    by the end of the budget (the final evaluation decodes the whole split)."""

    def __init__(self, curve: EvalCurve, dm, batches: int, max_len: int):
        self.curve, self.dm, self.batches, self.max_len = curve, dm, batches, max_len

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit" or not self.curve.points:
            return
        from bench.decoding import translate
        from bench.metrics import corpus_bleu

        loader = self.dm.val_dataloader()
        batches = [b for _, b in zip(range(self.batches), loader)]
        was_training = pl_module.model.training
        hyps = [h.strip() for h in translate(pl_module.model, batches, self.dm.tokenizer, max_len=self.max_len)]
        pl_module.model.train(was_training)
        bleu = corpus_bleu(hyps, self.dm.references("val")[: len(hyps)])["score"]
        self.curve.points[-1]["bleu"] = float(bleu)
        for logger in trainer.loggers:
            logger.log_metrics({"val/curve_bleu": bleu}, step=trainer.global_step)


def summarize_moe_stats(stats: list[dict]) -> list[dict]:
    """Per MoE layer: plain numbers/lists for records and loggers."""
    out = []
    for s in stats:
        row = {}
        for k, v in s.items():
            v = v.detach().cpu() if isinstance(v, torch.Tensor) else v
            row[k] = v.tolist() if isinstance(v, torch.Tensor) and v.dim() > 0 else float(v)
        out.append(row)
    return out


class ExpertStats(pl.Callback):
    """Every ``every`` steps: per MoE layer fraction dropped (overall and per quarter of the
    sequence, ``dropped_posN``), router entropy, top-k margin, MaxVio, dead experts, aux and z
    losses, and the expert load (fraction of assignments per expert; a histogram in W&B)."""

    SCALARS = ("fraction_dropped", "router_entropy", "load_balance", "z_loss", "importance", "load",
               "unused_experts", "dead_experts", "max_violation", "topk_margin")

    def __init__(self, every: int = 10):
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every or not getattr(pl_module, "last_moe_stats", None):
            return
        metrics = {}
        for i, layer in enumerate(pl_module.last_moe_stats):
            for name in self.SCALARS:
                if name in layer:
                    metrics[f"moe/layer{i}/{name}"] = float(layer[name])
            load = layer["tokens_per_expert"].float()
            metrics[f"moe/layer{i}/max_load_over_mean"] = float(load.max() / load.mean().clamp_min(1e-9))
            for j, value in enumerate(layer.get("dropped_by_position", torch.empty(0)).tolist()):
                metrics[f"moe/layer{i}/dropped_pos{j}"] = float(value)
        # Straight to the loggers at the step they were measured: values logged with self.log in
        # a callback were written again in the next step's row, as if measured there too.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                # global_step already counts this batch's optimizer step; Lightning's own rows
                # for this batch (train/loss) carry the step before it.
                logger.log_metrics(metrics, step=trainer.global_step - 1)
        self._log_histograms(trainer, pl_module.last_moe_stats)

    @staticmethod
    def _log_histograms(trainer, stats: list[dict]) -> None:
        """Expert load as a W&B histogram: one bar per expert, height = assignments."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            try:
                import wandb

                hists = {}
                for i, layer in enumerate(stats):
                    load = layer["tokens_per_expert"].tolist()
                    hists[f"moe/layer{i}/expert_load"] = wandb.Histogram(np_histogram=(load, list(range(len(load) + 1))))
                logger.experiment.log(hists, commit=False)
            except Exception:  # logging never kills training
                pass


class BalanceBias(pl.Callback):
    """Aux-loss-free balancing (``moe.balance=bias``, Wang et al. 2024): after each optimizer step,
    every MoE layer moves its selection bias by u * sign(mean load - load_i), from the loads of
    that step (``bench.models.moe.update_balance_biases``). Never in evaluation; a no-op for other
    models. The bias is a model buffer, so checkpoints carry it and a resumed run continues it."""

    def __init__(self):
        self._step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from bench.models.moe import update_balance_biases

        if trainer.global_step != self._step:  # once per optimizer step
            self._step = trainer.global_step
            update_balance_biases(pl_module.model)


class RoutingHealth(pl.Callback):
    """Routing health of every evaluation, per MoE layer, from the layers' own statistics over
    all evaluated batches: MaxVio, dead experts (no token kept in the whole evaluation), fraction
    dropped overall and per quarter of the sequence, router entropy and top-k margin (token-
    weighted means); and assignment stability: the share of the tokens of a fixed batch (the first
    validation batch, the same at every evaluation) whose first-choice expert is the one it had at
    the previous evaluation. Logged as ``moe_eval/layerN/...`` at each evaluation during training;
    the last evaluation's values (the run's final one) go into the record, ``expert_stats[N]["eval"]``
    (``merge_into``)."""

    def __init__(self):
        self._hooks: list = []
        self._acc: list[dict] = []
        self._top1: list | None = None  # first-choice experts of the fixed batch, being captured
        self.previous: list | None = None  # ... at the previous evaluation
        self.stability: list[float] | None = None
        self.summary: list[dict] = []

    # --- collection -------------------------------------------------------------------------
    def on_validation_start(self, trainer, pl_module) -> None:
        from bench.models.moe import moe_layers

        self._remove_hooks()
        if trainer.sanity_checking:
            return
        layers = moe_layers(pl_module.model)
        self._acc = [{} for _ in layers]
        for i, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_hook(self._collector(i)))
            self._hooks.append(layer.router.register_forward_hook(self._capturer(i)))

    def _collector(self, i: int):
        def hook(module, inputs, output) -> None:
            stats, acc = output[1].stats, self._acc[i]
            n = float(stats["routed_tokens"])
            for key in ("tokens_per_expert", "kept_per_expert", "assignments_by_position"):
                if key in stats:
                    acc[key] = acc.get(key, 0) + stats[key].detach().double().cpu()
            if "dropped_by_position" in stats and "assignments_by_position" in stats:
                dropped = (stats["dropped_by_position"] * stats["assignments_by_position"]).detach().double().cpu()
                acc["dropped"] = acc.get("dropped", 0) + dropped
            for key in ("router_entropy", "topk_margin"):
                if key in stats:
                    acc[key] = acc.get(key, 0.0) + float(stats[key]) * n
                    acc[key + "_tokens"] = acc.get(key + "_tokens", 0.0) + n
        return hook

    def _capturer(self, i: int):
        def hook(module, inputs, routing) -> None:
            if self._top1 is not None:
                self._top1[i] = routing.expert_index[:, 0].detach().cpu()
        return hook

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and trainer.state.fn == "fit" and self._acc:
            self._top1 = [None] * len(self._acc)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._top1 is not None:
            current, self._top1 = self._top1, None
            if all(t is not None for t in current):
                prev = self.previous
                if prev is not None and len(prev) == len(current) and all(
                        p.shape == c.shape for p, c in zip(prev, current)):
                    self.stability = [float((p == c).float().mean()) for p, c in zip(prev, current)]
                self.previous = current

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._remove_hooks()  # before other callbacks decode (CurveBLEU): not part of the evaluation
        if trainer.sanity_checking or not self._acc or not any(self._acc):
            return
        self.summary = [self._summarise(acc) for acc in self._acc]
        if self.stability is not None and len(self.stability) == len(self.summary):  # the latest, from training
            for row, value in zip(self.summary, self.stability):
                row["assignment_stability"] = value
        if trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        metrics = {}
        for i, row in enumerate(self.summary):
            for key, value in row.items():
                if isinstance(value, list):
                    for j, v in enumerate(value):
                        metrics[f"moe_eval/layer{i}/{key}{j}"] = v
                elif key != "tokens_per_expert":
                    metrics[f"moe_eval/layer{i}/{key}"] = value
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @staticmethod
    def _summarise(acc: dict) -> dict:
        row: dict = {}
        if "tokens_per_expert" in acc:
            load = acc["tokens_per_expert"]
            mean = float(load.mean())
            row["tokens_per_expert"] = [int(v) for v in load.tolist()]
            row["max_violation"] = (float(load.max()) - mean) / max(mean, 1e-9)  # Wang et al. 2024 MaxVio
        if "kept_per_expert" in acc:
            row["dead_experts"] = int((acc["kept_per_expert"] == 0).sum())
        if "dropped" in acc:
            total = acc["assignments_by_position"]
            row["fraction_dropped"] = float(acc["dropped"].sum() / total.sum().clamp_min(1))
            row["dropped_pos"] = [float(d / max(float(t), 1.0)) for d, t in zip(acc["dropped"].tolist(), total.tolist())]
        for key in ("router_entropy", "topk_margin"):
            if acc.get(key + "_tokens"):
                row[key] = acc[key] / acc[key + "_tokens"]
        return row

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._top1 = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    # --- record and resume ------------------------------------------------------------------
    def merge_into(self, expert_stats: list[dict]) -> list[dict]:
        """``expert_stats`` (one dict per MoE layer, from the last training step) with the last
        evaluation's health under "eval"."""
        if len(self.summary) == len(expert_stats):
            for layer, row in zip(expert_stats, self.summary):
                layer["eval"] = dict(row)
        return expert_stats

    def state_dict(self) -> dict:
        return {"previous": self.previous, "stability": self.stability, "summary": self.summary}

    def load_state_dict(self, state: dict) -> None:
        self.previous = state.get("previous")
        self.stability = state.get("stability")
        self.summary = list(state.get("summary") or [])


class RNGState(pl.Callback):
    """Saves and restores torch's CPU RNG in checkpoints, so dropout, router jitter and noise
    continue exactly as in an uninterrupted run (Lightning does not save it)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["moe_bench_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._pending = checkpoint.get("moe_bench_rng")

    def on_train_start(self, trainer, pl_module) -> None:
        state = getattr(self, "_pending", None)
        if state is not None:
            torch.set_rng_state(state)
            self._pending = None
