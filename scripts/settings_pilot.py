"""How fast, and how reliably across seeds, one arm of a plan learns under variants of its settings
(e.g. the init scale, the warmup, the learning rate). A pilot, not a result: the plan's batches and
settings with each variant's keys on top, a constant rate after the warmup (no decay), bf16
autocast, the fused AdamW the runs use. A seed fixes the initialisation and the data order (as in
a run, though not the same draws). Prints the validation loss on the first --val-batches batches at
three points per variant and seed, then per variant the mean +- sd over seeds at the last point and,
against the first variant, the mean +- sd of the paired (same-seed) differences.

    .venv/bin/python scripts/settings_pilot.py translation dense --variant "" --variant warmup_steps=400 \\
        --seeds 0 1 2 --steps 1000
    .venv/bin/python scripts/settings_pilot.py switch-vs-dense dense --variant init_scale=0.1 --variant init_scale=1.0
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

import torch
import yaml


def parse_variant(text: str) -> dict[str, Any]:
    """'lr=1e-3 warmup_steps=400' -> {'lr': 0.001, 'warmup_steps': 400}; '' is the plan as it is."""
    from bench.config import yaml_number

    out = {}
    for part in text.split():
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise SystemExit(f"--variant takes KEY=VALUE pairs separated by spaces, got {part!r}")
        out[key] = yaml_number(yaml.safe_load(value))
    return out


def variant_label(variant: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in variant.items()) or "as planned"


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" + (f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("plan")
    ap.add_argument("arm")
    ap.add_argument("--variant", action="append", default=None,
                    help='settings on top of the plan\'s, e.g. "warmup_steps=400 lr=1e-3"; repeat for each variant '
                         '("" = as planned; default: one variant, as planned)')
    ap.add_argument("--tier", default="ref")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--val-batches", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or [""])]

    from bench.data.datamodules import build_datamodule
    from bench.data.tasks import load_task
    from bench.plans import load_plan
    from bench.runtime import apply_cpu_settings
    from bench.train.run import resolve_configs

    apply_cpu_settings()
    plan = load_plan(args.plan)
    task = load_task(plan.task)
    arm = plan.arm(args.arm)
    marks = sorted({max(1, args.steps * k // 3) for k in (1, 2, 3)})
    last: dict[int, dict[int, float]] = {}  # variant index -> seed -> loss at the last mark
    for seed in args.seeds:
        planned = resolve_configs(task, arm.model, plan.tier(args.tier).preset, plan.arm_settings(arm, args.tier), None)
        dm = build_datamodule(task, batch_size=planned[1].train.batch_size, seed=seed, allow_download=False)
        dm.prepare_data()
        dm.setup("fit")
        val = [b for _, b in zip(range(args.val_batches), dm.val_dataloader())]
        for i, variant in enumerate(variants):
            cfg, rc = resolve_configs(task, arm.model, plan.tier(args.tier).preset,
                                      plan.arm_settings(arm, args.tier, variant), None)
            points, seconds = train_points(cfg, rc, task.type, dm, val, seed, marks)
            last.setdefault(i, {})[seed] = points[-1][1]
            print(f"{args.plan} {args.arm} {variant_label(variant)} (lr {rc.optim.lr:g}, seed {seed}): validation loss "
                  + ", ".join(f"step {s} {v:.3f}" for s, v in points) + f" ({seconds:.0f} s)", flush=True)
    if len(args.seeds) > 1:
        print(f"at step {marks[-1]}, over seeds {' '.join(map(str, args.seeds))}:")
        for i, variant in enumerate(variants):
            line = f"  {variant_label(variant)}: validation loss {spread(list(last[i].values()))}"
            if i:
                diffs = [last[i][s] - last[0][s] for s in args.seeds]
                line += f"; minus {variant_label(variants[0])}, paired: {spread(diffs)}"
            print(line, flush=True)


def train_points(cfg, rc, task_type: str, dm, val: list, seed: int, marks: list[int]) -> tuple[list, float]:
    """Train one model from ``seed`` to the last mark; the validation loss at each mark, and the seconds."""
    from bench.models import build_model
    from bench.models.expert_parallel import clip_grad_norm
    from bench.train.loss import output_cross_entropy
    from bench.train.module import LMModule, TranslationModule, adamw

    torch.manual_seed(seed)
    model = build_model(cfg, task_type)
    module = (LMModule if task_type == "lm" else TranslationModule)(model, rc.optim, active_params=1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = adamw([{"params": decay, "weight_decay": rc.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=rc.optim.lr, betas=(rc.optim.beta1, rc.optim.beta2))
    warmup = max(1, rc.optim.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))

    def loss(batch):
        out, targets = module.forward_batch(batch)
        return output_cross_entropy(out.hidden, out.head, targets, module.ignore_index), out.aux_loss

    def batches():  # epochs one after another, each in its own seeded order (as Lightning's set_epoch gives)
        for epoch in itertools.count():
            loader = dm.train_dataloader()
            for sampler in (loader.batch_sampler, loader.sampler):
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
            yield from loader

    points, start, it = [], time.perf_counter(), batches()
    for step in range(1, marks[-1] + 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ce, aux = loss(next(it))
        (ce + aux).backward()
        clip_grad_norm(decay + no_decay, rc.optim.grad_clip, model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step in marks:
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                points.append((step, statistics.mean(float(loss(b)[0]) for b in val)))
            model.train()
    return points, time.perf_counter() - start


if __name__ == "__main__":
    main()
