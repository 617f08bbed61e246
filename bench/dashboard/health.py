"""Routing health of a run, per MoE layer, as the dashboard's run page shows it: one row for the
run's last evaluation (``expert_stats[N]["eval"]``, over the whole validation pass, written by
``RoutingHealth``) and one for its last training batch (the rest of ``expert_stats[N]``).
Records from before the health metrics existed simply have fewer columns filled."""
from __future__ import annotations

from typing import Any

# column -> (key in the evaluation's stats, key in the training batch's stats)
COLUMNS = {
    "max_violation": ("max_violation", "max_violation"),
    "dead_experts": ("dead_experts", "dead_experts"),
    "fraction_dropped": ("fraction_dropped", "fraction_dropped"),
    "dropped_by_position": ("dropped_pos", "dropped_by_position"),
    "router_entropy": ("router_entropy", "router_entropy"),
    "topk_margin": ("topk_margin", "topk_margin"),
    "assignment_stability": ("assignment_stability", None),  # between evaluations only
}
SOURCES = (("evaluation", 0), ("last training batch", 1))


def _max_violation(load: Any) -> float | None:
    """MaxVio = max load / mean load - 1, for records that kept the load but not the figure."""
    if not isinstance(load, list) or not load or not all(isinstance(v, (int, float)) for v in load):
        return None
    mean = sum(load) / len(load)
    return max(load) / mean - 1.0 if mean > 0 else None


def routing_health(expert_stats: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Rows ``{"layer", "source", "experts", <COLUMNS>}``: per layer, the evaluation row first
    (when recorded), then the last training batch; a missing figure is None."""
    rows = []
    for layer, stats in enumerate(expert_stats or []):
        if not isinstance(stats, dict):
            continue
        for source, which in SOURCES:
            part = stats.get("eval") if which == 0 else {k: v for k, v in stats.items() if k != "eval"}
            if not isinstance(part, dict) or not part:
                continue
            load = part.get("tokens_per_expert") or part.get("load")
            row = {"layer": layer, "source": source, "experts": len(load) if isinstance(load, list) else None}
            for column, keys in COLUMNS.items():
                key = keys[which]
                row[column] = part.get(key) if key else None
            if row["max_violation"] is None:
                row["max_violation"] = _max_violation(part.get("tokens_per_expert"))
            if any(row[c] is not None for c in COLUMNS):
                rows.append(row)
    return rows
