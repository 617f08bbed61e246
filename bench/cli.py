"""`moe-bench` command line: the only module that parses arguments."""
from __future__ import annotations

import argparse
import json
import sys

from pathlib import Path

from bench.config import ConfigError, to_dict

EPILOG = "Docs: README.md. Every --set key is a dotted config field (or a unique last part of one)."


def _add_budget_args(p: argparse.ArgumentParser, default: str = "") -> None:
    budget = p.add_argument_group(f"compute budget (give one{default})")
    budget.add_argument("--budget-flops", type=float, help="training FLOPs (3 x forward, bench.flops)")
    budget.add_argument("--budget-tokens", type=float, help="training (target) tokens")
    budget.add_argument("--budget-steps", type=int, help="optimizer steps")
    budget.add_argument("--budget-seconds", type=float, help="training wall-clock seconds")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from bench.models.config import FAMILIES, PRESETS

    p.add_argument("--task", required=True, help="task name (a file in tasks/) or a YAML path")
    p.add_argument("--model", required=True, metavar="FAMILY", help=f"one of: {', '.join(FAMILIES)}")
    p.add_argument("--preset", default="tiny", help=f"size preset, one of: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set moe.num_experts=32 --set capacity_factor=null")


def _fmt_int(n: float) -> str:
    return f"{int(round(n)):,}"


def _fmt_flops(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}FLOP"
    return f"{n:.0f} FLOP"


def cmd_flops(args: argparse.Namespace) -> int:
    from bench.data.tasks import load_task
    from bench.flops import model_cost
    from bench.models.config import model_config

    task = load_task(args.task)
    if task.vocab_size is None:  # a user's task that takes its vocabulary size from its data
        from bench.data.tokenizers import derive_vocab_size

        task = derive_vocab_size(task)
    cfg = model_config(args.model, args.preset, args.overrides, vocab_size=task.vocab_size,
                       max_seq_len=task.max_seq_len)
    cost = model_cost(cfg, task.target_len, task.type, src_len=task.src_len)
    if args.json:
        print(json.dumps(dict(task=task.name, family=cfg.family, preset=args.preset, **cost.as_dict(),
                              config=to_dict(cfg))))
        return 0
    per = "target token" if task.type == "translation" else "token"
    lens = (f"src_len {task.src_len}, tgt_len {task.tgt_len}" if task.type == "translation"
            else f"seq_len {task.seq_len}")
    print(f"{cfg.family} (preset {args.preset}) on {task.name}: vocab {cfg.vocab_size}, {lens}")
    if cfg.is_sparse:
        m = cfg.moe
        cap = "dropless" if m.capacity_factor is None else f"capacity factor {m.capacity_factor}"
        G = m.granularity
        fine = f" (granularity {G}: {m.num_experts // G} x {G})" if G > 1 else ""
        shared = f" + {m.shared_experts} shared" if m.shared_experts else ""
        if m.router == "expert_choice":  # no top-k: each expert takes its top tokens of the group
            routes = "expert_choice router (each expert takes capacity factor x tokens / experts)"
            if m.causal_router:
                routes += f", causal stacks: {m.causal_router} router, top-{m.top_k}"
        else:
            routes = f"{m.router} router, top-{m.top_k}"
        print(f"  {m.num_experts} experts{fine}{shared} of width {cfg.expert_width}, {routes}, {cap}")
    rows = [
        ("total params", _fmt_int(cost.total_params), f"{_fmt_int(cost.total_params_no_embed)} without embeddings"),
        ("active params", _fmt_int(cost.active_params), f"{_fmt_int(cost.active_params_no_embed)} without embeddings"),
        (f"forward FLOPs / {per}", _fmt_flops(cost.forward_flops_per_token), ""),
        (f"train FLOPs / {per}", _fmt_flops(cost.train_flops_per_token), "3 x forward"),
        (f"executed fwd FLOPs / {per}", _fmt_flops(cost.executed_forward_flops_per_token),
         _executed_note(cfg)),
    ]
    for name, value, note in rows:
        print(f"  {name:<30} {value:>18}   {note}".rstrip())
    total = cost.forward_flops_per_token
    parts = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in cost.forward_breakdown.items())
    print(f"  forward FLOPs by part: {parts}")
    if cfg.is_sparse:  # expert parallelism's all-to-all traffic (bench/flops.py: Cost.all_to_all_values_per_token)
        v = cost.all_to_all_values_per_token
        print(f"  expert-parallel all-to-all: {v:,.0f} values / {per} / training step = {_fmt_bytes(2 * v)} in bf16, "
              f"{_fmt_bytes(4 * v)} in fp32 (dispatch + return, forward + backward; at most: dropped tokens stay "
              "home, and with EP size M about (M-1)/M of it leaves the rank)")
    return 0


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000


def _executed_note(cfg) -> str:
    """What the executed FLOPs add to the nominal count: token choice pads each expert to its
    capacity; expert choice fills every expert's capacity by construction."""
    if not cfg.is_sparse or cfg.moe.capacity_factor is None:
        return ""
    if cfg.moe.router == "expert_choice":
        return "every expert computes its full capacity" + (
            "; token choice (causal stacks) with capacity padding" if cfg.moe.causal_router else "")
    return "with capacity padding"


def cmd_perf_device(args: argparse.Namespace) -> int:
    """`moe-bench perf --device DEVICE`: layer and training speed, MFU, on an accelerator (or CPU)."""
    import torch

    from bench.perf_device import (device_layer_benchmark, device_training_benchmark, format_device_layer_table,
                                   format_device_training_table)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"--device {args.device}: this torch build sees no CUDA device "
                           f"(torch {torch.__version__}, cuda {torch.version.cuda}); use --device cpu"], "perf")
    if args.only not in (None, "layer", "training"):
        raise ConfigError([f"--only {args.only}: --device runs the layer and training parts only"], "perf")
    progress = None if args.json else (lambda msg: print(f"  timing {msg} ...", file=sys.stderr, flush=True))
    result = {}
    if args.only in (None, "layer"):
        result["layer"] = device_layer_benchmark(device, args.layer_preset, tuple(args.tokens or (8192, 65536)),
                                                 tuple(args.experts), args.precision, args.repeats, progress)
    if args.only in (None, "training"):
        result["training"] = device_training_benchmark(
            device, tuple(args.presets), batch=args.batch, seq=args.seq_len, vocab=args.vocab,
            steps=args.train_steps, warmup=args.warmup_steps, precision=args.precision, compile=args.compile,
            peak_tflops=args.peak_tflops, progress=progress)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n\n".join(fmt(result[k]) for k, fmt in (("layer", format_device_layer_table),
                                                         ("training", format_device_training_table)) if k in result))
    return 0


def cmd_perf(args: argparse.Namespace) -> int:
    if args.device:
        return cmd_perf_device(args)
    args.tokens = args.tokens or [2048, 8192]
    from bench.perf import (decoding_benchmark, evaluation_benchmark, format_decoding_table, format_evaluation_table,
                            format_layer_table, format_training_table, layer_benchmark, training_benchmark)

    progress = None if args.json else (lambda msg: print(f"  timing {msg} ...", file=sys.stderr, flush=True))
    result = {}
    if args.only in (None, "layer"):
        result["layer"] = layer_benchmark(tuple(args.tokens), tuple(args.experts), args.repeats,
                                          with_peer=not args.no_peer, progress=progress)
    if args.only in (None, "training"):
        result["training"] = training_benchmark(steps=args.train_steps, progress=progress)
    if args.only in (None, "decoding"):
        result["decoding"] = decoding_benchmark(progress=progress)
    if args.only in (None, "evaluation"):
        result["evaluation"] = evaluation_benchmark(progress=progress)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n\n".join(fmt(result[k]) for k, fmt in (("layer", format_layer_table),
                                                         ("training", format_training_table),
                                                         ("decoding", format_decoding_table),
                                                         ("evaluation", format_evaluation_table)) if k in result))
    return 0


def _budget(args: argparse.Namespace) -> dict | None:
    from bench.tracking.records import BUDGET_KINDS

    given = [(k, getattr(args, f"budget_{k}")) for k in BUDGET_KINDS
             if getattr(args, f"budget_{k}") is not None]
    if len(given) > 1:
        raise ConfigError([f"give one budget, not {len(given)}: " + ", ".join(f"--budget-{k}" for k, _ in given)],
                          "budget")
    return {"kind": given[0][0], "value": given[0][1]} if given else None


def cmd_train(args: argparse.Namespace) -> int:
    from bench.train.run import resume_run, train

    if args.resume and args.init_from:
        raise ConfigError(["--init-from starts a new run; --resume continues one (which keeps its own init)"],
                          "arguments")
    init_from = None
    if args.init_from and not args.resume:
        from bench.train.upcycling import from_dense_run

        init_from = from_dense_run(args.init_from, args.storage)
    if args.resume:
        record = resume_run(args.resume, storage=args.storage, data_dir=args.data_dir, progress=not args.json,
                            keep_checkpoints=args.keep_checkpoints)
    else:
        if not args.task or not args.model:
            raise ConfigError(["--task and --model are required (or --resume RUN_ID)"], "arguments")
        record = train(args.task, args.model, args.preset, args.overrides, budget=_budget(args), seed=args.seed,
                       storage=args.storage, data_dir=args.data_dir, group=args.group, name=args.name,
                       progress=not args.json, keep_checkpoints=args.keep_checkpoints, init_from=init_from)
    from bench.train.run import launched_worker

    if launched_worker():  # another rank of rank 0's run (strategy=ddp): rank 0 prints the summary
        return 0
    summary = record.summary()
    if "init_from" in record.config:  # upcycled: the source, and the FLOPs with the dense run's
        summary.update(init_from=record.config["init_from"]["run_id"],
                       total_train_flops=record.extra.get("total_train_flops"))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"\nrun {record.run_id}: {record.status}" + (f" ({record.error})" if record.error else ""))
        for k, v in summary.items():
            if k not in ("run_id", "status", "error") and v is not None:
                print(f"  {k:<28} {_fmt_value(k, v)}")
        print(f"  record in {args.storage or 'results/moe-bench.db'}; run files in {record.paths.get('run_dir')}")
    return 0 if record.status == "finished" else 1


def _fmt_value(key: str, value) -> str:
    """Numbers as a reader wants them: counts with separators, losses to 4 decimals, times in s."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key.endswith(("_params", "tokens_seen", "steps")) or key == "seed":
        return f"{int(value):,}"
    if "flops" in key:
        return f"{value:.3g}"
    if key.endswith("seconds"):
        return f"{value:,.1f} s"
    if key.endswith("per_second"):
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def cmd_compare(args: argparse.Namespace) -> int:
    from bench.report.summary import format_plan_results
    from bench.runner import compare

    budget = _budget(args)
    if budget is None:
        raise ConfigError(["give the shared budget: --budget-flops (matched compute), --budget-tokens, "
                           "--budget-steps or --budget-seconds"], "compare")
    started = _now()
    plan, records = compare(args.task, args.models, args.preset, budget, seeds=args.seeds,
                            overrides=args.overrides, storage=args.storage, data_dir=args.data_dir, group=args.group,
                            progress=not args.json, announce=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps([r.summary() for r in records]))
    else:
        print()
        print(format_plan_results(plan, "cli", records))
        group = next((r.group for r in records), None)
        print(f"\nrecords in group {group} (moe-bench runs --group {group})")
    _log_plan_summary(plan, "compare", records, started, job_type="compare")
    return 0 if all(r.status == "finished" for r in records) else 1


def _now() -> str:
    from bench.tracking.records import utc_now_iso

    return utc_now_iso()


def _log_plan_summary(plan, tier: str, records: list, started: str, job_type: str) -> None:
    """The comparison's tables (arms, claims, runs) as one W&B run in the runs' group, when this
    command trained something (a re-run that only reads finished runs adds no duplicate)."""
    if not any((r.finished_at or "") > started for r in records):  # seconds: a run takes longer
        return
    from bench.report.summary import plan_tables
    from bench.tracking.records import SUMMARIES_DIR, runs_dir
    from bench.tracking.wandb_setup import log_tables

    group = records[0].group
    log_tables(f"{plan.title} ({tier}): summary", group, job_type, plan_tables(plan, records),
               save_dir=runs_dir() / SUMMARIES_DIR, config={"plan": plan.name, "tier": tier, "task": plan.task},
               tags=[f"reproduction:{plan.name}"[:64], "summary"])


def cmd_runs(args: argparse.Namespace) -> int:
    from bench.tracking.records import format_runs_table, reading_store

    records = reading_store(args.storage).list(task=args.task, family=args.model, group=args.group)
    if args.json:
        print(json.dumps([r.summary() for r in records]))
    else:
        print(format_runs_table(records) if records else "no runs recorded yet")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from bench.tracking.cleanup import human, plan_cleanup, remove
    from bench.tracking.records import ResultsStore, runs_dir

    runs = Path(args.runs_dir) if args.runs_dir else runs_dir()
    items = plan_cleanup(runs, ResultsStore(args.storage), orphans=args.orphans, models=args.models)
    if not items:
        print(f"nothing to clean in {runs}/")
        return 0
    for item in items:
        print(f"{'remove' if item.removable else 'keep':<7} {human(item.bytes):>9}  {item.path}  ({item.why})")
    freed = sum(i.bytes for i in items if i.removable)
    if not args.yes:
        also = [note for note, given in (("--models also removes model.pt files, which evaluate and translate use",
                                          args.models),
                                         ("--orphans also removes run folders with no record in this store",
                                          args.orphans)) if not given]
        print(f"\n{human(freed)} can be freed; nothing removed yet: run again with --yes"
              + (f" ({'; '.join(also)})" if also else ""))
        return 0
    print(f"\nremoved {human(remove(items))}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bench.train.evaluate import evaluate_run

    result = evaluate_run(args.run_id, storage=args.storage, split=args.split, text=args.text, src=args.src,
                          ref=args.ref, beam_size=args.beam_size)
    if args.json:
        print(json.dumps(result))
        return 0
    source = ", ".join(f"{k} {v}" for k, v in result["source"].items()).replace("split final", "final evaluation")
    print(f"run {result['run_id']}: {source}")
    for k, v in result["metrics"].items():
        print(f"  {k:<32} {f'{v:,}' if isinstance(v, int) else _fmt_value(k, v)}")
    hyps = result.get("hypotheses")
    if hyps:
        print(f"  hypotheses in {', '.join(hyps) if isinstance(hyps, list) else hyps}")
    print(f"  added to the run's record (extra.evaluations) in {args.storage or 'results/moe-bench.db'}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from bench.train.evaluate import translate_file

    hyps = translate_file(args.run_id, args.src, out=args.out, beam_size=args.beam_size, storage=args.storage)
    if args.out:
        print(f"wrote {len(hyps)} lines to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write("".join(h + "\n" for h in hyps))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Any experiment file: a plan of arms goes to `reproduce`, a search space to `sweep`."""
    from bench.runner import experiment_kind

    kind, _ = experiment_kind(args.plan)
    return main(["reproduce" if kind == "plan" else "sweep", args.plan, *args.rest])


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.show:
        from bench.sweep.show import format_study, load_existing_study, study_summary
        from bench.tracking.records import ResultsStore

        summary = study_summary(load_existing_study(args.show, args.storage))
        print(json.dumps(summary) if args.json else format_study(summary, ResultsStore(args.storage).url))
        return 0
    if not args.spec:
        raise ConfigError(["give a study spec (a YAML file or a shipped name such as switch-experts), "
                           "or --show STUDY"], "sweep")
    from bench.runner.search import run_sweep
    from bench.sweep import load_spec
    from bench.sweep.show import format_study, load_existing_study, study_summary

    spec = load_spec(args.spec, args.overrides, budget=_budget(args), n_trials=args.n_trials)
    result = run_sweep(spec, storage=args.storage, study_name=args.study, data_dir=args.data_dir,
                       progress=not args.json, trial_progress=args.trial_progress)
    summary = study_summary(load_existing_study(result.study_name, result.storage))
    print(json.dumps(summary) if args.json else "\n" + format_study(summary, result.storage))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from bench.plans import all_plans, load_plan
    from bench.report.summary import format_plan_results
    from bench.runner import run_plan

    if args.list:
        for name, plan in all_plans().items():
            print(f"{name:<16} {plan.title}\n{'':<16} task {plan.task}; {len(plan.arms)} arms")
            for tier_name, tier in plan.tiers.items():
                arms = len(plan.tier_arms(tier_name))
                print(f"{'':<18}tier {tier_name:<6} preset {tier.preset:<6} {tier.budget_flops:.2g} FLOPs/run, "
                      f"{arms} arms x {tier.seeds} seeds" + (f" ({tier.note})" if tier.note else ""))
        return 0
    tier = args.tier or args.preset or "tiny"
    if args.status and not args.name:
        from bench.runner.status import format_overview, tier_overview
        from bench.tracking.records import ResultsStore

        overview = tier_overview(tier, ResultsStore(args.storage))
        print(json.dumps(overview) if args.json else format_overview(overview))
        return 0
    if not args.name:
        raise ConfigError([f"name a plan: one of {', '.join(all_plans())}, or the path of your own plan YAML "
                           "(--list shows them; --status without a name: every plan's progress)"], "reproduce")
    budget = _budget(args)
    if budget is not None and budget["kind"] != "flops":
        raise ConfigError(["reproductions are matched on training FLOPs: use --budget-flops"], "reproduce")
    plan = load_plan(args.name)
    if args.status:
        from bench.config import override_pairs
        from bench.runner.status import format_status, plan_status
        from bench.tracking.records import ResultsStore

        problems: list[str] = []
        extra = dict(override_pairs(args.overrides, problems))
        if problems:
            raise ConfigError(problems, "reproduce --set")
        status = plan_status(plan, tier, ResultsStore(args.storage), args.seeds, args.arm or None,
                             budget["value"] if budget else None, extra)
        print(json.dumps(status) if args.json else format_status(status))
        return 0
    if args.throughput:
        from bench.throughput import measure_throughput

        records = measure_throughput(plan, tier, storage=args.storage, arms=args.arm or None, repeats=args.repeats,
                                     data_dir=args.data_dir, announce=lambda msg: print(msg, file=sys.stderr, flush=True))
        if args.json:
            print(json.dumps([r.summary() for r in records]))
        else:
            by_arm: dict[str, list[float]] = {}
            for r in records:
                by_arm.setdefault(r.extra["arm"], []).append(r.metrics["tokens_per_second"])
            for arm, values in by_arm.items():
                print(f"{arm:<24} {sorted(values)[len(values) // 2]:>10,.0f} tokens/s (median of {len(values)})")
        return 0
    started = _now()
    records = run_plan(plan, tier=tier, seeds=args.seeds, storage=args.storage, data_dir=args.data_dir,
                       overrides=args.overrides, arms=args.arm or None,
                       budget_flops=budget["value"] if budget else None, progress=not args.json,
                       keep_checkpoints=args.keep_checkpoints)
    if args.json:
        print(json.dumps([r.summary() for r in records]))
        return 0
    from bench.tracking.records import ResultsStore, is_throughput

    # the tier's quiet throughput measurements judge its tokens/s claims (bench.report.claims)
    speed = [r for r in ResultsStore(args.storage).list(group=plan.group(tier)) if is_throughput(r)]
    print("\n" + format_plan_results(plan, tier, records + speed))
    storage = f" --storage {args.storage}" if args.storage else ""
    print(f"\nnext: moe-bench report{storage}")
    _log_plan_summary(plan, tier, records + speed, started, job_type="reproduce")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report import write_report

    plans = None
    if args.plan:
        from bench.plans import all_plans, load_plan

        plans = all_plans()
        for path in args.plan:
            own = load_plan(path)
            plans[own.name] = own
    if args.readme:
        from bench.report.readme import check_readme

        check_readme(args.readme)  # before the report, which takes minutes on a big store
    path = write_report(args.storage, args.out, plots=not args.no_plots, plans=plans)
    print(f"wrote {path}" + ("" if args.no_plots else f" and plots in {path.parent / 'plots'}"))
    if args.readme:
        _update_readme(args.readme, args.readme_tier, path.parent / "claims.json", plans)
    if args.wandb:
        _log_report(path)
    return 0


def _update_readme(readme: str, tier: str, claims_file: Path, plans) -> None:
    from bench.plans import all_plans
    from bench.report.readme import update_readme

    claims = json.loads(claims_file.read_text(encoding="utf-8"))
    planned = [name for name, plan in (plans or all_plans()).items() if tier in plan.tiers]
    changed = update_readme(readme, claims, tier, planned)
    print(f"{'updated' if changed else 'unchanged'}: the tier-{tier} results table in {readme}")


CLAIM_TABLE_KEYS = ["reproduction", "tier", "budget_flops", "claim", "metric", "estimate", "ci_low", "ci_high",
                    "n_seeds", "delta", "verdict"]


def _log_report(report: Path) -> None:
    """The report as a W&B artifact (REPORT.md, claims.json, plots) and its claims as a table."""
    from bench.tracking.records import SUMMARIES_DIR, runs_dir
    from bench.tracking.wandb_setup import log_tables

    out = report.parent
    claims = json.loads((out / "claims.json").read_text(encoding="utf-8"))
    rows = [[c.get(k) for k in CLAIM_TABLE_KEYS] for c in claims]
    files = [report, out / "claims.json", *sorted((out / "plots").glob("*"))]
    where = log_tables("moe-bench report", "report", "report", {"claims": (CLAIM_TABLE_KEYS, rows)},
                       save_dir=runs_dir() / SUMMARIES_DIR, files=[f for f in files if f.is_file()],
                       artifact="moe-bench-report")
    if where:
        print(f"logged to W&B: the claims table and the report as artifact moe-bench-report ({where})")


def cmd_dashboard(args: argparse.Namespace) -> int:
    from bench.dashboard import serve

    if not 0 <= args.port <= 65535:
        raise ConfigError([f"port={args.port} is not allowed: expected 0-65535 (0 = any free port)"], "dashboard")
    try:
        serve(args.storage, host=args.host, port=args.port, results_dir=args.results_dir, open_browser=args.open)
    except OSError as e:  # port in use, address not available
        print(f"moe-bench dashboard: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-bench", description="Fair dense vs mixture-of-experts benchmarks.",
                                     epilog=EPILOG)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error (also: MOE_BENCH_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="parameters and FLOPs per token of a model on a task")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("train", help="train one model under a compute budget; writes a run record")
    p.add_argument("--task", help="task name (a file in tasks/) or a YAML path")
    p.add_argument("--model", metavar="FAMILY", help="dense, switch, moe, moe-rnn or lstm")
    p.add_argument("--preset", default="tiny", help="size preset: tiny, small, base (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model or run field, e.g. --set num_experts=16 --set lr=3e-4 --set batch_size=32")
    _add_budget_args(p, "; default --budget-steps 500")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", help="results store URL (default sqlite:///results/moe-bench.db)")
    p.add_argument("--data-dir", help="local corpus directory (default $MOE_BENCH_DATA)")
    p.add_argument("--group", help="comparison / study name for W&B grouping")
    p.add_argument("--name", help="run name (default: the run id)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue a killed run from its last checkpoint")
    p.add_argument("--init-from", metavar="RUN_ID",
                   help="sparse upcycling (Komatsuzaki et al. 2022): start a switch/moe model from a finished dense "
                        "run's weights, every expert a copy of its FFN; --budget-flops then counts that run's FLOPs too")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep runs/<id>/checkpoints/last.ckpt after the run finishes (default: removed)")
    p.add_argument("--json", action="store_true", help="print the run record summary as JSON (last line)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train several families at one matched budget and tabulate them")
    p.add_argument("--task", required=True)
    p.add_argument("--models", nargs="+", required=True, metavar="FAMILY", help="e.g. dense switch")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every model")
    _add_budget_args(p)
    p.add_argument("--seeds", type=int, default=1, help="seeds per model (mean and spread reported)")
    p.add_argument("--storage")
    p.add_argument("--data-dir")
    p.add_argument("--group", help="group name (default: a fresh compare-... id)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("runs", help="list recorded runs")
    p.add_argument("--storage", help="results store URL")
    p.add_argument("--task")
    p.add_argument("--model", metavar="FAMILY")
    p.add_argument("--group")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("clean", help="free disk space: checkpoints of finished runs (a dry run unless --yes)")
    p.add_argument("--storage", help="results store whose records decide what is finished")
    p.add_argument("--runs-dir", help="run folders (default $MOE_BENCH_RUNS or runs)")
    p.add_argument("--orphans", action="store_true", help="also remove run folders with no record in the store")
    p.add_argument("--models", action="store_true",
                   help="also remove finished runs' runs/<id>/model.pt (evaluate and translate need it)")
    p.add_argument("--yes", action="store_true", help="remove (default: list what would go and its size)")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("evaluate", help="a trained run's model on its own splits (its final metrics again), "
                                        "a text file (LM) or a file pair (translation); adds the result to its record")
    p.add_argument("run_id", metavar="RUN_ID")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--split", choices=["val", "test"], help="one of the run's splits (default: its final "
                                                                "evaluation: val and test)")
    which.add_argument("--text", metavar="FILE", help="LM: loss, perplexity, bits per token on a UTF-8 text file")
    which.add_argument("--src", metavar="FILE", help="translation: source sentences, one per line (with --ref)")
    p.add_argument("--ref", metavar="FILE", help="translation: reference translations, line by line with --src")
    p.add_argument("--beam-size", type=int, help="translation: beam size (default: the run's)")
    p.add_argument("--storage", help="results store URL (default sqlite:///results/moe-bench.db)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("translate", help="translate a file with a trained translation run, one line per line")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--src", metavar="FILE", required=True, help="source sentences, one per line (UTF-8)")
    p.add_argument("--out", metavar="FILE", help="write the translations here (default: stdout)")
    p.add_argument("--beam-size", type=int, help="beam size (default: the run's)")
    p.add_argument("--storage", help="results store URL (default sqlite:///results/moe-bench.db)")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("sweep", help="an Optuna study: every trial a training run at the same budget")
    p.add_argument("spec", nargs="?", help="study spec: a YAML path or a shipped name (sweeps/NAME.yaml)")
    p.add_argument("--n-trials", type=int, help="trials the study should hold in all (default: the spec's)")
    p.add_argument("--storage", help="results store + Optuna storage URL (default sqlite:///results/moe-bench.db; "
                                     "a postgresql:// URL lets workers on several machines share the study)")
    p.add_argument("--study", help="study name (default: the spec's name); the same command continues it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed setting for every trial, e.g. --set preset=tiny --set eval_every=50")
    _add_budget_args(p, "; replaces the spec's per-trial budget")
    p.add_argument("--data-dir")
    p.add_argument("--show", metavar="STUDY", help="print a study's trials, best trial / Pareto set, importances")
    p.add_argument("--trial-progress", action="store_true", help="show each trial's training progress bar")
    p.add_argument("--json", action="store_true", help="print the study summary as one JSON object")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("run", help="run any experiment file: a plan of arms (as reproduce) or a search space "
                                   "(as sweep); the other flags go to that command")
    p.add_argument("plan", help="a YAML path or a shipped name in sweeps/")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="flags of reproduce or sweep, e.g. --tier tiny")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("reproduce", help="run a plan: paper reproductions or your own arms at one matched budget")
    p.add_argument("name", nargs="?", help="a shipped plan (--list shows them) or the path of your own plan YAML")
    p.add_argument("--tier", help="tiny (quick, 2-core CPU), ref (reference results, CPU-hours), small or base "
                                  "(GPU); default tiny")
    p.add_argument("--preset", help=argparse.SUPPRESS)  # the tier's old name (tiers were presets)
    p.add_argument("--seeds", type=int, help="seeds per arm (default: the tier's)")
    p.add_argument("--storage", help="results store URL (default sqlite:///results/moe-bench.db)")
    p.add_argument("--data-dir")
    p.add_argument("--arm", action="append", help="run only this arm (repeatable), e.g. --arm dense")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every arm (changes the reproduction: say so when you report it)")
    _add_budget_args(p, "; --budget-flops replaces the tier's per-run budget")
    p.add_argument("--throughput", action="store_true",
                   help="instead of training: measure every arm's training tokens/s together in this process "
                        "(interleaved; for the equal-wall-clock claims). Run it on a quiet machine")
    p.add_argument("--repeats", type=int, default=3, help="--throughput: measurements per arm (default 3)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' final checkpoints")
    p.add_argument("--list", action="store_true", help="list the plans, their tiers and budgets")
    p.add_argument("--status", action="store_true",
                   help="instead of training: each (arm, seed) pair's state (finished, running, resumable, to do), "
                        "the wall time spent and an estimate of the time left; without a name, one line per "
                        "shipped plan at --tier")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="REPORT.md + plots: the reproductions beside the papers, with verdicts")
    p.add_argument("--storage", help="results store URL (default sqlite:///results/moe-bench.db)")
    p.add_argument("--out", default="results", help="output folder (REPORT.md and plots/; default results)")
    p.add_argument("--no-plots", action="store_true", help="Markdown and claims.json only")
    p.add_argument("--wandb", action="store_true",
                   help="also log the claims as a W&B table and the report as an artifact (offline unless logged in)")
    p.add_argument("--plan", action="append", metavar="PLAN.yaml",
                   help="also report this plan of your own (repeatable); shipped plans are always included")
    p.add_argument("--readme", metavar="FILE",
                   help="also rewrite the claims table between the '<!-- moe-bench:results begin/end -->' lines of FILE")
    p.add_argument("--readme-tier", default="ref", help="the tier whose claims --readme shows (default ref)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dashboard", help="browse runs, curves, studies and the report in a local web app")
    p.add_argument("--storage", help="results store URL (default sqlite:///results/moe-bench.db)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--results-dir", default="results", help="folder with REPORT.md and plots/ (default results)")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("perf", help="benchmarks: MoE layer vs dense FFN and HF peer, training and decoding speed, "
                                    "large-vocabulary loss memory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tokens", type=int, nargs="+", help="token batch sizes (default 2048 8192; with --device "
                                                          "8192 65536)")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128], help="expert counts")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the best is reported")
    p.add_argument("--no-peer", action="store_true", help="skip the HuggingFace peer")
    p.add_argument("--only", choices=["layer", "training", "decoding", "evaluation"], help="run one part only")
    p.add_argument("--train-steps", type=int, default=12, help="timed steps per training-throughput row")
    g = p.add_argument_group("accelerator benchmark (--device): layer and training speed, MFU")
    g.add_argument("--device", help="cuda, cuda:1, cpu, ...: run the device benchmark there (bench/perf_device.py)")
    g.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast precision (default bf16)")
    g.add_argument("--layer-preset", choices=["tiny", "small", "base"], default="base",
                   help="d_model/d_ff of the layer part (default base: 768/3072)")
    g.add_argument("--presets", nargs="+", choices=["tiny", "small", "base"], default=["small", "base"],
                   help="model presets of the training part (default small base)")
    g.add_argument("--batch", type=int, default=32, help="training sequences per step (default 32)")
    g.add_argument("--seq-len", type=int, default=1024, help="training sequence length (default 1024)")
    g.add_argument("--vocab", type=int, default=32000, help="synthetic vocabulary size (default 32000)")
    g.add_argument("--warmup-steps", type=int, default=10, help="untimed training steps first (default 10)")
    g.add_argument("--compile", action="store_true", help="also time the plain loop under torch.compile")
    g.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: data sheet of known GPUs)")
    p.set_defaults(func=cmd_perf)
    return parser


# Commands that train, evaluate or time models (the rest need not pay for importing torch).
_COMPUTE_COMMANDS = {"train", "compare", "evaluate", "translate", "sweep", "run", "reproduce", "perf"}


def main(argv: list[str] | None = None) -> int:
    from bench.data.sources import DataError
    from bench.runtime import flush_denormals
    from bench.tracking.records import StorageError

    args = build_parser().parse_args(argv)
    if args.command in _COMPUTE_COMMANDS:  # before torch starts its thread pool: its threads inherit it
        flush_denormals()
    try:
        return args.func(args)
    except (ConfigError, DataError, StorageError) as e:  # user-fixable: message, no traceback
        print(f"moe-bench {args.command}: {e}", file=sys.stderr)
        if getattr(args, "json", False):  # scripts reading stdout get the error too
            print(json.dumps({"status": "error", "command": args.command, "error": str(e),
                              "problems": getattr(e, "problems", None)}))
        return 2
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: finished work is recorded, the same command continues
        print(f"moe-bench {args.command}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    except Exception as e:  # anything else: one line (a failed run is already recorded with its traceback)
        import os

        if args.debug or os.environ.get("MOE_BENCH_DEBUG", "").strip() not in ("", "0"):
            raise
        print(f"moe-bench {args.command}: failed: {type(e).__name__}: {e}\n"
              f"  (run `moe-bench --debug {args.command} ...` for the traceback)", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"status": "error", "command": args.command, "error": f"{type(e).__name__}: {e}"}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
