"""Thin LightningModules: any moe-bench model, one shared step for train/val/test.

The model stays plain torch (it never imports Lightning); this module adds the loss (the output
layer's cross-entropy in row chunks, bench.train.loss, + the model's weighted auxiliary losses),
AdamW with warmup and decay, and the ``train/...``, ``val/...`` metric names every logger and
the budget callback rely on.
"""
from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import nn

from bench.data.tasks import TaskConfig
from bench.metrics import bits_per_token, perplexity, quality_lm, quality_per_active_param
from bench.models.config import ModelConfig
from bench.models.expert_parallel import clip_grad_norm
from bench.train.config import OptimConfig
from bench.train.loss import IGNORE_INDEX, output_cross_entropy


def lr_lambda(step: int, progress: float, cfg: OptimConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine / linear decay to ``min_lr_ratio`` as
    the budget is spent (``progress`` in [0, 1]): the same schedule for FLOP, token, step and
    time budgets, without guessing a step count in advance."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


# Evaluation memory has two parts. The output layer's logits (tokens x vocab) are bounded per
# chunk by bench.train.loss.LOGITS_CHUNK_BYTES, whatever the batch; what grows with the batch is
# the layers' activations (tokens x width). An evaluation batch holds at most
# train.eval_batch_size sequences, and fewer when their activations would pass this bound.
EVAL_ACTIVATION_BYTES = 2 * 2**30


def eval_batch_size(requested: int, cfg: ModelConfig, task: TaskConfig,
                    budget_bytes: int = EVAL_ACTIVATION_BYTES) -> int:
    """Sequences per evaluation batch: ``requested`` (train.eval_batch_size), or fewer so that the
    batch's tokens (seq_len, or src_len + tgt_len) x fp32 activations of one layer fit ``budget_bytes``.

    One layer's activations per token are taken as 8 x d_model (residual, norm, q/k/v, attention
    output, LSTM gates) plus twice the FFN width (before and after the activation function; for
    sparse models the top_k experts a token visits): a coarse upper estimate, layers are freed
    one after the other under no_grad. The shipped presets and tasks stay at the default 64."""
    tokens = task.seq_len if task.type == "lm" else task.src_len + task.tgt_len
    ffn = cfg.moe.top_k * cfg.expert_width if cfg.is_sparse else cfg.d_ff
    per_token = 4 * (8 * cfg.d_model + 2 * ffn)
    return max(1, min(requested, budget_bytes // (per_token * tokens)))


class BenchModule(pl.LightningModule):
    """Shared logic; subclasses say how a batch becomes (model output, targets)."""

    ignore_index = IGNORE_INDEX
    quality_from_loss = True  # LM: quality = exp(-loss); translation: BLEU/100 after decoding

    def __init__(self, model: nn.Module, optim: OptimConfig, active_params: int):
        super().__init__()
        self.model = model
        self.optim_cfg = optim
        self.active_params = active_params
        self.last_moe_stats: list[dict] = []

    def budget_fraction(self) -> float:
        """Fraction of the compute budget spent, from the trainer's BudgetStop (0 without one)."""
        trainer = self._trainer
        for cb in trainer.callbacks if trainer is not None else []:
            if hasattr(cb, "fraction") and hasattr(cb, "spent"):
                return cb.fraction
        return 0.0

    # --- subclasses -------------------------------------------------------------------------
    def forward_batch(self, batch):
        raise NotImplementedError

    def batch_tokens(self, batch) -> int:
        raise NotImplementedError

    # --- shared step ------------------------------------------------------------------------
    def _step(self, batch, stage: str):
        out, targets = self.forward_batch(batch)
        ce = output_cross_entropy(out.hidden, out.head, targets, self.ignore_index)
        loss = ce + out.aux_loss
        if stage == "train" and not torch.isfinite(loss):
            # Fail fast and clearly (a sweep records the trial as failed and goes on).
            raise FloatingPointError(f"training loss is {float(loss.detach())} at step {self.global_step}: lower the "
                                     "learning rate (optim.lr) or check the data")
        tokens = self.batch_tokens(batch)
        on_step = stage == "train"
        self.log(f"{stage}/loss", ce, on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=tokens, sync_dist=not on_step)
        if out.moe_stats:
            self.log(f"{stage}/aux_loss", out.aux_loss, on_step=on_step, on_epoch=not on_step,
                     batch_size=tokens, sync_dist=not on_step)
            if stage == "train":
                self.last_moe_stats = out.moe_stats
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_derived("val")

    def on_test_epoch_end(self) -> None:
        self._log_derived("test")

    def _log_derived(self, stage: str) -> None:
        loss = self.trainer.callback_metrics.get(f"{stage}/loss")
        if loss is None:
            return
        loss = float(loss)
        metrics = {f"{stage}/perplexity": perplexity(min(loss, 50.0)), f"{stage}/bits_per_token": bits_per_token(loss),
                   # Geometric-mean probability of the correct token: rises as loss falls, for
                   # every task (sweeps prune on it when they maximise quality).
                   f"{stage}/mean_token_prob": quality_lm(loss)}
        if self.quality_from_loss:
            quality = quality_lm(loss)  # DESIGN.md: LM quality = 1 / perplexity
            metrics[f"{stage}/quality"] = quality
            metrics[f"{stage}/quality_per_active_param"] = quality_per_active_param(quality, self.active_params)
        self.log_dict(metrics, sync_dist=True)

    # --- optimisation -----------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip the global gradient norm (Trainer's gradient_clip_val) ourselves: Lightning's mixed-
        precision plugin refuses to clip for fused optimizers, which may unscale fp16 gradients
        inside their step. We train in fp32 or bf16 only, never with an fp16 GradScaler, so the
        gradients here are the true ones."""
        if gradient_clip_val:  # with expert parallelism: the norm over every rank's expert shards
            clip_grad_norm([p for g in optimizer.param_groups for p in g["params"]], gradient_clip_val, self.model)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        opt = adamw(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, self.budget_fraction(), cfg))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's two groups, in the order checkpoints store them: weight decay on matrices and
    expert banks; none on norms, biases or embeddings."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel where the device has one (CPU and CUDA do), else the default.

    On CPUs the default is a Python loop over parameters (its multi-tensor "foreach" path is
    CUDA-only); measured here on one thread, a step over the tiny Switch translation model's 24M
    parameters took 134 ms unfused vs 29 ms fused (dense tiny LM, 3.2M: 9.1 vs 2.2 ms). An MoE
    model has E times the FFN parameters of its FLOP-matched dense model, so the unfused step
    alone cost it a large share of its throughput. Same update, up to float rounding."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, **kwargs)


class LMModule(BenchModule):
    def forward_batch(self, batch):
        x, y = batch  # (B, T), (B, T) shifted by one
        return self.model(x), y

    def batch_tokens(self, batch) -> int:
        return batch[0].numel()


class TranslationModule(BenchModule):
    quality_from_loss = False
    def forward_batch(self, batch):
        out = self.model(batch["src"], batch["tgt_in"], batch["src_mask"], batch["tgt_mask"])
        targets = batch["tgt_out"].masked_fill(~batch["tgt_mask"], self.ignore_index)
        return out, targets

    def batch_tokens(self, batch) -> int:
        return int(batch["tgt_mask"].sum())
