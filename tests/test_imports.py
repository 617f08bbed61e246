"""The package's import graph, function-local imports included: no cycle, and no upward arrow.

Layers (DESIGN.md): cli -> {runner, throughput, dashboard} -> perf_device -> {sweep, perf, report} -> train ->
{flops, decoding, plans} -> {models, data, tracking} -> {config, runtime, metrics}. The report and the
dashboard read plans and records only: they never import the runner, the trainer or a sweep.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
LAYER = {
    "config": 0, "runtime": 0, "metrics": 0,
    "models": 1, "data": 1, "tracking": 1,
    "flops": 2, "decoding": 2, "plans": 2,  # use model configs and models
    "train": 3,
    "sweep": 4, "perf": 4, "report": 4,
    "perf_device": 4.5,  # the GPU benchmarks time training with perf's Lightning step timer
    "runner": 5,  # runs plans (arms) and search spaces (sweep specs and studies)
    "dashboard": 5,  # shows what the report computes, with bench.report's statistics
    "throughput": 5,  # times a plan's arms with perf's training step
    "cli": 6,
}
READERS = {"report", "dashboard"}  # read plans and records (and each other): never train/runner/sweep


def _modules() -> dict[str, Path]:
    mods = {}
    for path in BENCH.rglob("*.py"):
        parts = path.relative_to(BENCH.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # every import, at any depth
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bench":
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "bench"]
            else:
                continue
            for target in targets:
                mod = owner(target)
                if mod and mod != name and mod != "bench":
                    graph[name].add(mod)
    return graph


def _package(module: str) -> str:
    return module.split(".")[1]


def test_every_package_has_a_layer():
    assert {_package(m) for m in _modules() if m != "bench"} <= set(LAYER)


def test_no_import_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(_modules()):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_imports_only_point_down():
    upward = []
    for module, targets in import_graph().items():
        src = _package(module)
        for target in targets:
            dst = _package(target)
            if src == dst:
                continue
            if LAYER[dst] >= LAYER[src] or (src in READERS and LAYER[dst] > 2 and dst not in READERS):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_help_runs_and_flops_do_not_import_torch(tmp_path):
    """`moe-bench --help`, `runs` and `flops` start in a fraction of a second: torch (1.5 s to
    import) loads only for commands that build models."""
    import subprocess
    import sys

    code = ("import sys, bench.cli as c; p = c.build_parser(); "
            "c.main(['flops', '--task', 'tinyshakespeare-char', '--model', 'switch']); "
            "c.main(['runs', '--storage', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'r.db'}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
