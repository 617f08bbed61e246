"""Where a training step's time goes, per arm of a plan's tier: forward, backward, gradient
clipping and the optimizer step, timed separately on the plan's real batches (bf16 autocast as
the runs train, the fused AdamW of bench.train.module.adamw). For questions such as "why does the
FLOP-matched Switch train at 0.6x dense's tokens/s on translation but 0.88x on the LM?".

    .venv/bin/python scripts/step_breakdown.py translation ref dense switch   # ~1 min on 2 cores
    .venv/bin/python scripts/step_breakdown.py switch-vs-dense ref dense "switch cf=1.25"
    .venv/bin/python scripts/step_breakdown.py translation ref switch --checkpoint switch=runs/ID/checkpoints/last.ckpt --denormals keep

--checkpoint ARM=PATH times an arm from a run's checkpoint (weights and optimizer state) instead
of a fresh init: late in training, what the optimizer state holds (e.g. denormals) can matter.
--denormals keep computes on float32 denormals as PyTorch does by default (training flushes them:
bench.runtime.flush_denormals). Compare the two in separate runs: a flushed step writes zeros into
the optimizer state, so alternating the setting within one process would time a cleaned state.

Run it on a quiet machine (pause a reference queue with `kill -STOP`, then `kill -CONT`); phases
are medians over --steps timed steps after --warmup untimed ones, arms interleaved step by step.
"last loss" is the training loss of the last step: two settings that should train alike (e.g.
--denormals) can be compared on it, since every run takes the same batches in the same order.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan")
    ap.add_argument("tier")
    ap.add_argument("arms", nargs="+")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--checkpoint", action="append", default=[], metavar="ARM=PATH",
                    help="start ARM from this Lightning checkpoint (weights and optimizer state)")
    ap.add_argument("--denormals", choices=("flush", "keep"), default="flush",
                    help="float32 denormals flushed to zero (as training runs) or kept (PyTorch's default)")
    args = ap.parse_args()

    from bench.data.datamodules import build_datamodule
    from bench.data.tasks import load_task
    from bench.models import build_model
    from bench.models.expert_parallel import clip_grad_norm
    from bench.plans import load_plan
    from bench.runtime import apply_cpu_settings, denormals_flushed
    from bench.train.loss import output_cross_entropy
    from bench.train.module import LMModule, TranslationModule, adamw, param_groups
    from bench.train.run import resolve_configs

    if args.denormals == "keep":
        os.environ["MOE_BENCH_FLUSH_DENORMALS"] = "0"
    apply_cpu_settings()  # before the first parallel op: intra-op threads copy the setting
    checkpoints = dict(c.split("=", 1) for c in args.checkpoint)
    plan = load_plan(args.plan)
    task = load_task(plan.task)
    setups, batches = {}, None
    for label in args.arms:
        arm = plan.arm(label)
        cfg, rc = resolve_configs(task, arm.model, plan.tier(args.tier).preset, plan.arm_settings(arm, args.tier), None)
        if batches is None:
            dm = build_datamodule(task, batch_size=rc.train.batch_size, seed=0, allow_download=False)
            dm.prepare_data()
            dm.setup("fit")
            it = iter(dm.train_dataloader())
            batches = [next(it) for _ in range(args.warmup + args.steps)]
        torch.manual_seed(0)
        model = build_model(cfg, task.type)
        module = (LMModule if task.type == "lm" else TranslationModule)(model, rc.optim, active_params=1)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = adamw(param_groups(model, rc.optim.weight_decay), lr=rc.optim.lr)
        if label in checkpoints:
            ckpt = torch.load(checkpoints.pop(label), map_location="cpu", weights_only=False)
            module.load_state_dict(ckpt["state_dict"])
            opt.load_state_dict(ckpt["optimizer_states"][0])
            print(f"{label}: from {ckpt.get('global_step')} steps of training")
        setups[label] = (module, opt, params, rc.optim.grad_clip, sum(p.numel() for p in params))
    if checkpoints:
        raise SystemExit(f"--checkpoint names arms not timed here: {sorted(checkpoints)}")

    def timed_step(label: str, batch) -> dict[str, float]:
        module, opt, params, clip, _ = setups[label]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, targets = module.forward_batch(batch)
            loss = output_cross_entropy(out.hidden, out.head, targets, module.ignore_index) + out.aux_loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if clip:
            clip_grad_norm(params, clip, module.model)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "clip": t3 - t2, "optimizer": t4 - t3, "step": t4 - t0,
                "loss": float(loss.detach())}

    times: dict[str, list[dict[str, float]]] = {label: [] for label in setups}
    for i, batch in enumerate(batches):
        for label in setups:  # interleaved: drift hits every arm alike
            t = timed_step(label, batch)
            if i >= args.warmup:
                times[label].append(t)
    phases = ("forward", "backward", "clip", "optimizer", "step")
    tokens = statistics.median(float(module.batch_tokens(b)) for b in batches for module in [setups[args.arms[0]][0]])
    print(f"{args.plan} tier {args.tier}: median ms per phase over {args.steps} steps, ~{tokens:,.0f} tokens per step, "
          f"{torch.get_num_threads()} threads, bf16 autocast, denormals {'flushed' if denormals_flushed() else 'kept'}")
    print(f"{'arm':<16} {'params':>11} " + " ".join(f"{p:>9}" for p in phases) + "  x first  last loss")
    first = None
    for label, rows in times.items():
        med = {p: 1e3 * statistics.median(r[p] for r in rows) for p in phases}
        first = first or med["step"]
        print(f"{label:<16} {setups[label][4]:>11,} " + " ".join(f"{med[p]:>9.1f}" for p in phases)
              + f"  {med['step'] / first:>6.2f}  {rows[-1]['loss']:.6f}")


if __name__ == "__main__":
    main()
