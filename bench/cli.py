"""`moe-bench` command line: the only module that parses arguments."""
from __future__ import annotations

import argparse
import json
import sys

from bench.config import ConfigError, to_dict

EPILOG = "Docs: README.md. Every --set key is a dotted config field (or a unique last part of one)."


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
    cfg = model_config(args.model, args.preset, args.overrides, vocab_size=task.vocab_size,
                       max_seq_len=task.max_seq_len)
    target_len = task.seq_len if task.type == "lm" else task.tgt_len
    cost = model_cost(cfg, target_len, task.type, src_len=task.src_len)
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
        print(f"  {m.num_experts} experts of width {cfg.expert_width}, {m.router} router, top-{m.top_k}, {cap}")
    rows = [
        ("total params", _fmt_int(cost.total_params), f"{_fmt_int(cost.total_params_no_embed)} without embeddings"),
        ("active params", _fmt_int(cost.active_params), f"{_fmt_int(cost.active_params_no_embed)} without embeddings"),
        (f"forward FLOPs / {per}", _fmt_flops(cost.forward_flops_per_token), ""),
        (f"train FLOPs / {per}", _fmt_flops(cost.train_flops_per_token), "3 x forward"),
        (f"executed fwd FLOPs / {per}", _fmt_flops(cost.executed_forward_flops_per_token),
         "with capacity padding" if cfg.is_sparse else ""),
    ]
    for name, value, note in rows:
        print(f"  {name:<30} {value:>18}   {note}")
    total = cost.forward_flops_per_token
    parts = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in cost.forward_breakdown.items())
    print(f"  forward FLOPs by part: {parts}")
    return 0


def cmd_perf(args: argparse.Namespace) -> int:
    from bench.perf import format_layer_table, layer_benchmark

    tokens = tuple(args.tokens)
    experts = tuple(args.experts)
    progress = None if args.json else (lambda msg: print(f"  timing {msg} ...", file=sys.stderr, flush=True))
    result = {"layer": layer_benchmark(tokens, experts, args.repeats, with_peer=not args.no_peer,
                                       progress=progress)}
    if args.json:
        print(json.dumps(result))
    else:
        print(format_layer_table(result["layer"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-bench", description="Fair dense vs mixture-of-experts benchmarks.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="parameters and FLOPs per token of a model on a task")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("perf", help="benchmark: MoE layer vs FLOP-matched dense FFN vs HF peer")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="token batch sizes")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128], help="expert counts")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the best is reported")
    p.add_argument("--no-peer", action="store_true", help="skip the HuggingFace peer")
    p.set_defaults(func=cmd_perf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"moe-bench {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
