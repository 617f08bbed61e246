"""The README's answers-at-a-glance table, regenerated from ``claims.json`` so its numbers are never
copied by hand: ``moe-bench report --readme README.md [--readme-tier ref]``.

The table replaces whatever lies between two marker lines in the file (added once, by hand):

    <!-- moe-bench:results begin -->
    <!-- moe-bench:results end -->

Everything outside the markers is left as it is, so the prose that interprets the numbers stays
the author's; the table is what the store says.
"""
from __future__ import annotations

from pathlib import Path

from bench.config import ConfigError
from bench.report import format_effect, verdict_cell

BEGIN = "<!-- moe-bench:results begin -->"
END = "<!-- moe-bench:results end -->"


def results_table(claims: list[dict], tier: str, planned: list[str] = ()) -> list[str]:
    """Markdown lines: every claim of ``tier`` that has data, in ``claims.json`` order; the claims
    without data of plans that have some (with the reason); then the plans in ``planned`` (those
    defining the tier) that have none yet."""
    rows = [c for c in claims if c.get("tier") == tier and c.get("has_data", True)]
    lines = [f"Tier `{tier}`, generated from `results/claims.json` by `moe-bench report --readme` (do not edit "
             "between the markers; effects are in the paper's direction, 95% CI over paired seeds):", ""]
    if rows:
        lines += ["| plan | claim | metric | effect [95% CI] | seeds | verdict |", "|---|---|---|---|---|---|"]
        budgets = {}
        for c in rows:
            budgets.setdefault(c["reproduction"], set()).add(c.get("budget_flops"))
        for c in rows:
            plan = f"`{c['reproduction']}`"
            if len(budgets[c["reproduction"]]) > 1:  # a --budget-flops run beside the tier's own budget
                plan += f" at {c.get('budget_flops'):.3g} FLOPs"
            claim = str(c["claim"]).replace("|", "\\|")
            effect = format_effect(c.get("estimate"), c.get("ci_low"), c.get("ci_high"), digits=3)
            looks = c.get("looks") or []
            if c.get("stopped_at_look") in looks:  # the tier stopped at that look: its verdicts are final
                looks = looks[:looks.index(c["stopped_at_look"]) + 1]
            verdict = verdict_cell(c["verdict"], c.get("seeds_to_decide"), c.get("metric", ""), looks or None,
                                   c.get("n_seeds", 0), c.get("detectable_effect") is not None)
            lines.append(f"| {plan} | {claim} | `{c.get('metric')}` | {effect} | {c.get('n_seeds', 0)} | {verdict} |")
    else:
        lines.append(f"No claim of tier `{tier}` has runs yet.")
    decided = {c["reproduction"] for c in rows}
    # a plan with runs whose claim still has no data (e.g. a speed claim no measurement can see): say why
    silent = [c for c in claims if c.get("tier") == tier and not c.get("has_data", True) and c["reproduction"] in decided]
    if silent:
        lines += ["", "Claims of these plans with no data yet:"]
        lines += [f"- `{c['reproduction']}`: {c['claim']}: {str(c.get('evidence') or 'no data').split('. ')[0]}"
                  for c in silent]
    pending = [p for p in planned if p not in decided]
    if pending:
        lines += ["", f"No `{tier}` runs finished yet: {', '.join(f'`{p}`' for p in pending)}."]
    return lines


def _block(path: Path) -> tuple[str, list[str], int, int]:
    """The file's text, its lines and the indices of the two marker lines (ConfigError if unusable)."""
    if not path.is_file():
        raise ConfigError([f"--readme {path}: no such file"], "report")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ConfigError([f"--readme {path}: needs exactly one line '{BEGIN}' followed by one line '{END}' "
                           f"(found {len(starts)} and {len(ends)}); add them where the results table should go"],
                          "report")
    return text, lines, starts[0], ends[0]


def check_readme(path: str | Path) -> None:
    """Raise ConfigError now, before a long report, if ``path`` cannot take the table."""
    _block(Path(path))


def update_readme(path: str | Path, claims: list[dict], tier: str = "ref", planned: list[str] = ()) -> bool:
    """Rewrite the block between the markers of ``path``; True if the file changed."""
    path = Path(path)
    text, lines, begin, end = _block(path)
    new = lines[:begin + 1] + results_table(claims, tier, planned) + lines[end:]
    out = "\n".join(new) + ("\n" if text.endswith("\n") else "")
    if out == text:
        return False
    path.write_text(out, encoding="utf-8")
    return True


__all__ = ["BEGIN", "END", "check_readme", "results_table", "update_readme"]
