"""bench.report.readme: the README's results table from hand-written claims, the text around the
markers untouched, idempotence, and the errors for a file without (or with broken) markers; and
`moe-bench report --readme` end to end on an empty store."""
from __future__ import annotations

import json

import pytest

from bench.cli import main
from bench.config import ConfigError
from bench.report.readme import BEGIN, END, results_table, update_readme


def claim(plan, text, verdict, estimate=0.05, lo=0.02, hi=0.08, tier="ref", seeds=5, budget=1.5e14, metric="val_loss",
          has_data=True):
    return {"reproduction": plan, "tier": tier, "budget_flops": budget, "claim": text, "metric": metric,
            "estimate": estimate, "ci_low": lo, "ci_high": hi, "n_seeds": seeds, "verdict": verdict,
            "has_data": has_data}


CLAIMS = [
    claim("moe-rnn", "MoE beats LSTM", "reproduced", 0.07316, 0.04394, 0.1024),
    claim("switch-vs-dense", "Switch beats dense", "refuted", -0.01122, -0.01583, -0.00662),
    claim("switch-vs-dense", "step speed-up | > 1", "no-effect", -0.006182, -0.0267, 0.01434, metric="step_speedup"),
    claim("switch-vs-dense", "Switch beats dense", "inconclusive", -0.008, -0.045, 0.029, tier="tiny", seeds=3),
    claim("capacity", "drops fall with cf", "inconclusive", None, None, None, seeds=0, has_data=False),
]
README = f"# title\n\nintro line\n\n{BEGIN}\nstale table\n{END}\n\n## after\nkept\n"


def test_results_table_lists_the_tiers_claims_with_data_and_the_plans_still_pending():
    lines = results_table(CLAIMS, "ref", planned=["capacity", "moe-rnn", "switch-vs-dense"])
    rows = [line for line in lines if line.startswith("| `")]
    assert rows == [
        "| `moe-rnn` | MoE beats LSTM | `val_loss` | +0.0732 [+0.0439, +0.102] | 5 | **reproduced** |",
        "| `switch-vs-dense` | Switch beats dense | `val_loss` | -0.0112 [-0.0158, -0.00662] | 5 | **refuted** |",
        "| `switch-vs-dense` | step speed-up \\| > 1 | `step_speedup` | -0.00618 [-0.0267, +0.0143] | 5 "
        "| **no effect beyond delta** |",
    ]
    assert lines[-1] == "No `ref` runs finished yet: `capacity`."
    # a plan with runs names its claims that still have no data, with the first sentence of the reason
    unmeasured = claim("moe-rnn", "MoE trains faster", "inconclusive", None, None, None, seeds=0, has_data=False)
    unmeasured["evidence"] = "not measured: both arms timed one model. Details follow"
    lines = results_table([*CLAIMS, unmeasured], "ref", planned=["capacity", "moe-rnn", "switch-vs-dense"])
    assert lines[-5:] == ["", "Claims of these plans with no data yet:",
                          "- `moe-rnn`: MoE trains faster: not measured: both arms timed one model",
                          "", "No `ref` runs finished yet: `capacity`."]


def test_results_table_names_the_budget_when_a_plan_has_two_and_marks_single_seed_effects():
    two = [claim("capacity", "c", "reproduced"), claim("capacity", "c", "inconclusive", 0.1, float("nan"),
                                                        float("nan"), seeds=1, budget=3e13)]
    rows = [line for line in results_table(two, "ref") if line.startswith("| `")]
    assert rows[0].startswith("| `capacity` at 1.5e+14 FLOPs | c |")
    assert "| +0.1 (1 seed) | 1 | inconclusive |" in rows[1] and "at 3e+13 FLOPs" in rows[1]
    assert results_table([], "gpu")[-1] == "No claim of tier `gpu` has runs yet."


def test_an_inconclusive_row_says_how_many_seeds_would_decide_it():
    open_claim = claim("capacity", "q", "inconclusive", 0.004, -0.036, 0.043, seeds=2)
    open_claim["seeds_to_decide"] = 5
    rows = [line for line in results_table([open_claim], "ref") if line.startswith("| `")]
    assert rows == ["| `capacity` | q | `val_loss` | +0.004 [-0.036, +0.043] | 2 | inconclusive (~5 seeds to decide) |"]
    speed = claim("capacity", "s", "inconclusive", -0.033, -0.105, 0.039, metric="tokens_per_second")
    speed["seeds_to_decide"] = 15
    assert results_table([speed], "ref")[-1].endswith("| 5 | inconclusive (~15 repeats to decide) |")


def test_update_readme_replaces_only_the_block_and_is_idempotent(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert update_readme(readme, CLAIMS, "ref", ["moe-rnn"]) is True
    text = readme.read_text()
    before, block, after = text.partition(BEGIN)[0], text.split(BEGIN)[1].split(END)[0], text.split(END)[1]
    assert before == "# title\n\nintro line\n\n" and after == "\n\n## after\nkept\n"
    assert "stale table" not in block and "| `moe-rnn` | MoE beats LSTM |" in block
    assert update_readme(readme, CLAIMS, "ref", ["moe-rnn"]) is False
    assert readme.read_text() == text


@pytest.mark.parametrize("body, found", [("no markers\n", "found 0 and 0"), (f"{END}\n{BEGIN}\n", "found 1 and 1"),
                                         (f"{BEGIN}\n{BEGIN}\n{END}\n", "found 2 and 1")])
def test_update_readme_refuses_a_file_without_one_ordered_pair_of_markers(tmp_path, body, found):
    readme = tmp_path / "README.md"
    readme.write_text(body)
    with pytest.raises(ConfigError, match=found) as err:
        update_readme(readme, CLAIMS)
    assert BEGIN in str(err.value) and readme.read_text() == body
    with pytest.raises(ConfigError, match="no such file"):
        update_readme(tmp_path / "missing.md", CLAIMS)


def test_report_cli_rewrites_the_readme_block_from_the_claims_it_wrote(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    out = tmp_path / "results"
    rc = main(["report", "--storage", f"sqlite:///{tmp_path / 'empty.db'}", "--out", str(out), "--no-plots",
               "--readme", str(readme)])
    assert rc == 0
    assert json.loads((out / "claims.json").read_text()) == []
    block = readme.read_text().split(BEGIN)[1].split(END)[0]
    assert "No claim of tier `ref` has runs yet." in block
    assert "No `ref` runs finished yet: " in block and "`switch-vs-dense`" in block and "`moe-rnn`" in block
    assert f"updated: the tier-ref results table in {readme}" in capsys.readouterr().out


def test_report_cli_refuses_a_readme_without_markers_before_writing_anything(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    out = tmp_path / "results"
    rc = main(["report", "--storage", f"sqlite:///{tmp_path / 'empty.db'}", "--out", str(out), "--no-plots",
               "--readme", str(readme)])
    assert rc != 0 and not out.exists()
    assert "needs exactly one line '<!-- moe-bench:results begin -->'" in capsys.readouterr().err


def test_a_verdict_before_the_last_look_is_interim_unless_the_tier_stopped_at_that_look():
    early = claim("translation", "Switch beats dense", "reproduced", seeds=5)
    early["looks"] = [5, 10]
    (row,) = [line for line in results_table([early], "ref") if line.startswith("| `")]
    assert row.endswith("| 5 | **reproduced** (interim: 5 of 10 seeds) |")
    early["stopped_at_look"] = 5  # every headline claim decided at 5: the tier stopped, the verdict is final
    (row,) = [line for line in results_table([early], "ref") if line.startswith("| `")]
    assert row.endswith("| 5 | **reproduced** |")
