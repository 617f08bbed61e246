"""How fast one arm of a plan learns at several init scales (``init_scale``: weights ~ truncated
normal, sigma = sqrt(scale / fan_in); the Switch paper recommends 0.1 for sparse models, 1.0 is the
usual default). A pilot, not a result: one seed, the plan's batches and learning rate, a constant
rate after the plan's warmup (no decay), bf16 autocast, the fused AdamW the runs use; prints the
validation loss on the first --val-batches batches at three points.

    .venv/bin/python scripts/init_scale_pilot.py translation dense 0.1 1.0 --steps 1200   # ~7 min on 2 cores
    .venv/bin/python scripts/init_scale_pilot.py switch-vs-dense dense 0.1 1.0 --steps 450
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan")
    ap.add_argument("arm")
    ap.add_argument("scales", nargs="+", type=float)
    ap.add_argument("--tier", default="ref")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--val-batches", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from bench.data.datamodules import build_datamodule
    from bench.data.tasks import load_task
    from bench.models import build_model
    from bench.models.expert_parallel import clip_grad_norm
    from bench.plans import load_plan
    from bench.runtime import apply_cpu_settings
    from bench.train.loss import output_cross_entropy
    from bench.train.module import LMModule, TranslationModule, adamw
    from bench.train.run import resolve_configs

    apply_cpu_settings()
    plan = load_plan(args.plan)
    task = load_task(plan.task)
    arm = plan.arm(args.arm)
    cfg, rc = resolve_configs(task, arm.model, plan.tier(args.tier).preset, plan.arm_settings(arm, args.tier), None)
    dm = build_datamodule(task, batch_size=rc.train.batch_size, seed=args.seed, allow_download=False)
    dm.prepare_data()
    dm.setup("fit")
    val = [b for _, b in zip(range(args.val_batches), dm.val_dataloader())]
    marks = {max(1, args.steps * k // 3) for k in (1, 2, 3)}

    def batches():
        while True:  # epochs one after another
            yield from dm.train_dataloader()

    for scale in args.scales:
        torch.manual_seed(args.seed)
        model = build_model(dataclasses.replace(cfg, init_scale=scale), task.type)
        module = (LMModule if task.type == "lm" else TranslationModule)(model, rc.optim, active_params=1)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        opt = adamw([{"params": decay, "weight_decay": rc.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                    lr=rc.optim.lr, betas=(rc.optim.beta1, rc.optim.beta2))
        warmup = max(1, rc.optim.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))

        def loss(batch):
            out, targets = module.forward_batch(batch)
            return output_cross_entropy(out.hidden, out.head, targets, module.ignore_index), out.aux_loss

        points, start, it = [], time.perf_counter(), batches()
        for step in range(1, args.steps + 1):
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
        print(f"{args.plan} {args.arm} init_scale {scale:g} (lr {rc.optim.lr:g}, seed {args.seed}): validation loss "
              + ", ".join(f"step {s} {v:.3f}" for s, v in points) + f" ({time.perf_counter() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
