"""Report: verdicts against hand-made records, and REPORT.md + plots written from a store."""
from __future__ import annotations

import json
import math

import pytest

from bench.plans import load_plan
from bench.report import write_report
from bench.report.claims import arm_stats, evaluate_claim, record_values
from bench.tracking.records import ResultsStore, RunRecord


def rec(arm, seed, loss, repro="switch-vs-dense", family="switch", tps=1000.0, dropped=0.0, load=(1, 1, 1, 1),
        steps=100, curve=None, **metrics):
    return RunRecord(
        run_id=f"{repro}-{arm}-{seed}".replace(" ", "_"), group=f"repro-{repro}-tiny", task="tinyshakespeare-char",
        family=family, preset="tiny", seed=seed, status="finished", steps=steps, tokens_seen=steps * 1000,
        train_flops=1e12, metrics={"val_loss": loss, "quality": 2.718281828 ** -loss, **metrics},
        params={"active": 1000, "total": 4000 if family != "dense" else 1000}, flops={"train_per_token": 6e6},
        timings={"tokens_per_second": tps, "wall_seconds": 10.0},
        expert_stats=[] if family in ("dense", "lstm") else [{"tokens_per_expert": list(load), "fraction_dropped": dropped}],
        curve=curve if curve is not None else [{"step": s, "tokens": s * 1000, "flops": s * 1e10, "seconds": s / 10,
                                                "loss": loss + 1.0 - s / steps} for s in (25, 50, 75, 100)],
        config={"model": {"family": family, "moe": {"num_experts": len(load), "capacity_factor": 1.0}}},
        extra={"reproduction": repro, "arm": arm})


def test_better_claims_are_judged_on_paired_seeds():
    from bench.plans import Claim

    arms = arm_stats([rec("a", 0, 2.00), rec("a", 1, 2.02), rec("a", 2, 2.01),
                      rec("b", 0, 2.10), rec("b", 1, 2.16), rec("b", 2, 2.12)])
    claim = Claim(text="a beats b", a="a", b="b", metric="val_loss", direction="lower")
    result = evaluate_claim(claim, arms)
    assert result.verdict == "reproduced" and result.effect.n_seeds == 3
    assert ("effect in the paper's direction +0.1167, 95% CI [+0.0650, +0.1684] over 3 paired seed(s) (two-sided p "
            "0.01); delta") in result.evidence
    assert result.as_json("plan", "tiny", 1e12)["p_value"] == pytest.approx(result.effect.p_value)
    backwards = Claim(text="b beats a", a="b", b="a", metric="val_loss", direction="lower")
    assert evaluate_claim(backwards, arms).verdict == "refuted"
    ghost = Claim(text="a beats zzz", a="a", b="zzz", metric="val_loss")
    assert evaluate_claim(ghost, arms).verdict == "no-data"


def test_an_inconclusive_claim_says_how_many_paired_seeds_would_decide_it():
    from bench.plans import Claim

    # gains 0.01 and 0.03: mean 0.02, sd 0.01414; half-widths 0.0351 (n 3), 0.0225 (n 4), 0.0176 (n 5)
    arms = arm_stats([rec("a", 0, 2.00), rec("a", 1, 2.02), rec("b", 0, 2.01), rec("b", 1, 2.05)])
    result = evaluate_claim(Claim(text="a beats b", a="a", b="b", metric="val_loss", direction="lower"), arms)
    assert result.verdict == "inconclusive" and result.seeds_to_decide == 5
    assert "if this mean and spread held, ~5 paired seed(s) would decide it" in result.evidence
    assert result.as_json("plan", "tiny", 1e12)["seeds_to_decide"] == 5
    decided = evaluate_claim(Claim(text="a beats b", a="a", b="b", metric="val_loss", direction="lower"),
                             arm_stats([rec("a", s, 2.00 + 0.01 * s) for s in range(3)]
                                       + [rec("b", s, 2.10 + 0.012 * s) for s in range(3)]))
    assert decided.verdict == "reproduced" and decided.as_json("p", "t", 1.0)["seeds_to_decide"] is None
    assert "would decide it" not in decided.evidence


def test_one_seed_claims_have_null_bounds_in_claims_json():
    from bench.plans import Claim

    one = evaluate_claim(Claim(text="a beats b", a="a", b="b", metric="val_loss", direction="lower"),
                         arm_stats([rec("a", 0, 2.0), rec("b", 0, 2.1)]))
    out = one.as_json("plan", "tiny", 1e12)
    assert (out["n_seeds"], out["ci_low"], out["ci_high"], out["verdict"]) == (1, None, None, "inconclusive")
    assert out["estimate"] == pytest.approx(0.1) and out["per_seed"] == {"0": pytest.approx(0.1)}
    json.dumps(out, allow_nan=False)  # strict JSON
    assert "effect in the paper's direction +0.1000, no interval from one seed over 1 paired seed(s)" in one.evidence


def test_a_rerun_of_an_arm_seed_replaces_the_older_run():
    old, new = rec("a", 0, 3.0), rec("a", 0, 2.0)
    old.started_at, new.started_at = "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"
    new.run_id = "newer"
    arms = arm_stats([new, old])
    assert arms["a"].n == 1 and arms["a"].values["val_loss"] == [2.0]


def _measured(arm, repeat, tps, when="2026-01-01T00:00:00+00:00"):
    r = rec(arm, repeat, 0.0)
    r.run_id, r.started_at = f"tp-{arm}-{repeat}-{when}", when
    r.metrics, r.extra = {"tokens_per_second": tps}, {"reproduction": "switch-vs-dense", "arm": arm, "kind": "throughput"}
    return r


def test_speed_claims_use_quiet_throughput_measurements_paired_by_repeat_never_the_runs_timings():
    from bench.plans import Claim
    from bench.report.claims import throughput_arms

    # the training runs' own timings say top-1 is 2x faster: taken under different loads, ignored
    arms = arm_stats([rec("top1", s, 2.0, tps=2000.0) for s in range(3)] + [rec("top2", s, 2.0, tps=1000.0)
                                                                            for s in range(3)])
    claim = Claim(text="top-1 trains faster", a="top1", b="top2", metric="tokens_per_second", direction="higher")
    unmeasured = evaluate_claim(claim, arms)
    assert unmeasured.verdict == "no-data" and "--throughput" in unmeasured.evidence
    # repeat i of both arms was timed back to back: ratios 1.10, 1.05, 1.12 -> relative effect +0.09
    quiet = [_measured("top1", i, t) for i, t in enumerate((1100.0, 1050.0, 1120.0))]
    quiet += [_measured("top2", i, 1000.0) for i in range(3)]
    quiet.append(_measured("top2", 0, 5000.0, when="2025-01-01T00:00:00+00:00"))  # older: replaced by the newer
    for r in quiet:
        r.config["model"]["moe"]["top_k"] = 1 if r.extra["arm"] == "top1" else 2
    result = evaluate_claim(claim, arms, throughput_arms(quiet))
    assert result.effect.n_seeds == 3 and result.effect.estimate == pytest.approx((0.10 + 0.05 + 0.12) / 3)
    assert result.effect.per_seed == pytest.approx({0: 0.10, 1: 0.05, 2: 0.12})
    assert result.verdict == "reproduced" and "interleaved repeat(s) of a quiet throughput measurement" in result.evidence


def test_a_speed_trend_is_judged_over_the_arms_the_tier_trained_when_all_of_them_were_measured():
    from bench.report.sections import build_section

    plan = load_plan("capacity")  # x spans cf 0.5 .. 2.0 (6 arms); the ref tier trains 4 of them
    cfs = {"switch cf=0.5": 0.5, "switch cf=1.0": 1.0, "switch cf=1.25": 1.25, "switch cf=2.0": 2.0}
    runs = [rec(arm, seed, 1.55, repro="capacity") for arm in cfs for seed in (0, 1)]
    speed = [_measured(arm, repeat, (repeat + 1) * (1000.0 - 100.0 * cf)) for arm, cf in cfs.items() for repeat in (0, 1)]
    for r in speed:  # timed with each arm's capacity (a kernel that pads to capacity, say)
        r.extra["reproduction"] = "capacity"
        r.config["model"]["moe"]["capacity_factor"] = cfs[r.extra["arm"]]
    (claim,) = [c for c in build_section(plan, "ref", runs, plot_dir=None, throughput=speed).claims
                if c.claim.metric == "tokens_per_second"]
    # tokens/s relative to each repeat's mean over arms (881.25 x (repeat + 1)): slope -100 / 881.25 per unit
    # of cf, in the paper's direction (slower with more capacity) +0.11348 in both repeats
    assert claim.verdict == "reproduced" and claim.effect.n_seeds == 2
    assert claim.effect.estimate == pytest.approx(100 / 881.25)
    missing = [r for r in speed if r.extra["arm"] != "switch cf=2.0"]  # a trained arm was not measured
    (claim,) = [c for c in build_section(plan, "ref", runs, plot_dir=None, throughput=missing).claims
                if c.claim.metric == "tokens_per_second"]
    assert claim.verdict == "no-data"
    # timed dropless (what `--throughput` does for sparse arms): arms that differ only in their capacity
    # ran the same computation, so any gap is noise and the claim is not measured
    for r in speed:
        r.extra["dropless"] = True
    (claim,) = [c for c in build_section(plan, "ref", runs, plot_dir=None, throughput=speed).claims
                if c.claim.metric == "tokens_per_second"]
    assert claim.verdict == "no-data" and claim.effect.n_seeds == 0
    assert claim.evidence.startswith("not measured: the quiet throughput measurement timed the same model for each "
                                     "arm (it times sparse arms dropless, so arms that differ only in their capacity")


def test_trend_claims_are_per_seed_slopes_on_log2_x():
    from bench.plans import Claim

    falling = arm_stats([rec(f"switch E={e}", seed, 2.3 - 0.05 * math.log2(e) + 0.001 * seed * e)
                         for e in (1, 2, 4, 8) for seed in range(3)])
    claim = Claim(text="loss falls with E", kind="trend", x={f"switch E={e}": e for e in (1, 2, 4, 8)}, log_x=True,
                  metric="val_loss", direction="lower", delta=0.005)
    result = evaluate_claim(claim, falling)
    assert result.verdict == "reproduced" and result.effect.n_seeds == 3
    assert result.effect.per_seed[0] == pytest.approx(0.05)
    rising = Claim(text="loss rises with E", kind="trend", x=claim.x, log_x=True, metric="val_loss",
                   direction="higher", delta=0.005)
    assert evaluate_claim(rising, falling).verdict == "refuted"


def test_record_values_load_imbalance_and_dropped_tokens():
    v = record_values(rec("s", 0, 2.0, load=(6, 1, 1, 0), dropped=0.25))
    assert v["max_over_mean_load"] == pytest.approx(3.0)  # 6 / (8 / 4)
    assert v["fraction_dropped"] == 0.25 and v["val_perplexity"] == pytest.approx(2.718281828 ** 2.0)
    assert "max_violation" not in v  # no evaluation health in this record


def test_record_values_max_violation_is_the_last_evaluations_mean_over_layers():
    r = rec("s", 0, 2.0)
    r.expert_stats = [{"tokens_per_expert": [1, 1], "eval": {"max_violation": 0.5}},
                      {"tokens_per_expert": [1, 1], "eval": {"max_violation": 0.25}}]
    assert record_values(r)["max_violation"] == pytest.approx(0.375)


def test_report_from_a_store_has_verdicts_tables_and_plots(tmp_path):
    store = ResultsStore(f"sqlite:///{tmp_path / 'r.db'}")
    losses = {"dense": (2.30, 2.31), "dense-wide": (2.00, 2.01), "switch cf=1.0": (2.10, 2.12),
              "switch cf=1.25": (2.08, 2.09), "switch cf=2.0": (2.07, 2.09), "moe cf=1.0": (2.15, 2.16),
              "moe cf=1.25": (2.14, 2.15), "moe cf=2.0": (2.13, 2.14)}
    for arm, pair in losses.items():
        family = arm.split()[0] if " " in arm else "dense"
        for seed, loss in enumerate(pair):
            store.save(rec(arm, seed, loss, family=family, tps=2000.0 if family == "switch" else 1500.0))
    store.save(rec("dense", 2, 9.9, family="dense").finish("failed", "boom"))  # failed runs never count
    path = write_report(store.url, tmp_path / "out")
    text = path.read_text()
    assert "## Switch Transformer vs dense at equal FLOPs" in text
    row = next(line for line in text.splitlines() if line.startswith("| switch-vs-dense | tiny | 8e+12 | 16 | Switch (cf 1.25) "
                                                                       "reaches a lower validation loss"))
    assert row.endswith("| +0.22 [+0.22, +0.22] | 2 | **reproduced** |")  # gains 0.22 and 0.22: no spread
    matches_wide = next(line for line in text.splitlines() if "matches the ~3.5x-FLOPs dense" in line
                        and line.startswith("| switch-vs-dense"))
    assert matches_wide.endswith("**refuted** |")  # the wide model is better by far more than delta
    def strict(constant: str):  # NaN / Infinity are not JSON: browsers' and jq's parsers reject them
        raise ValueError(f"claims.json holds {constant}")

    claims = json.loads((tmp_path / "out" / "claims.json").read_text(), parse_constant=strict)
    headline = next(c for c in claims if c["claim"].startswith("Switch (cf 1.25) reaches a lower validation loss"))
    assert {k: headline[k] for k in ("reproduction", "tier", "metric", "n_seeds", "verdict")} == {
        "reproduction": "switch-vs-dense", "tier": "tiny", "metric": "val_loss", "n_seeds": 2, "verdict": "reproduced"}
    assert headline["estimate"] == pytest.approx(0.22) and headline["ci_low"] == pytest.approx(0.22)
    assert "| dense | 2 | 1,000 | 1,000 | 6.00 |" in text  # the failed third dense seed is not counted
    assert "T5-Base: -1.731, 1600 ex/s" in text
    assert ("Not in this store yet: `balancing`, `capacity`, `expert-choice`, `granularity`, `moe-rnn`, "
            "`shared-experts`, `switch-experts`, `switch-lr`, `translation`, `upcycling`") in text
    budget = load_plan("switch-vs-dense").tiers["tiny"].budget_flops
    assert "95% CI" in text and f"Budget: {budget:.3g} training FLOPs per run" in text
    # 8 arms x 2 seeds of a tier planned as 9 arms x 3 seeds: said, with the command that adds the rest
    assert ("then `moe-bench report`. **Incomplete:** 16 of the tier's 27 runs (3 seeds per arm); "
            "`moe-bench reproduce switch-vs-dense --tier tiny` trains the rest (finished runs are skipped).") in text
    assert "Throughput was consistent across seeds (within 0% for every arm)" in text
    pngs = sorted(p.name for p in (tmp_path / "out" / "plots").glob("*.png"))
    assert "switch-vs-dense-curves.png" in pngs and "switch-vs-dense-pareto.png" in pngs
    assert "](plots/switch-vs-dense-curves.png)" in text and "](plots/switch-vs-dense-curves.html)" in text
    # the same store gives the same report
    assert write_report(store.url, tmp_path / "out").read_text() == text


def test_report_on_an_empty_store_says_how_to_fill_it(tmp_path):
    path = write_report(f"sqlite:///{tmp_path / 'e.db'}", tmp_path / "out", plots=False)
    assert "No reproduction runs in this store yet: run `moe-bench reproduce NAME`" in path.read_text()


def test_noisy_throughput_is_flagged():
    from bench.report.sections import build_section

    records = [rec("dense", 0, 2.3, family="dense", tps=1000.0), rec("dense", 1, 2.3, family="dense", tps=1500.0)]
    section = build_section(load_plan("switch-vs-dense"), "tiny", records, plot_dir=None)
    assert any(n.startswith("Caution: tokens/s of one arm differed by up to 50% between its seeds (dense)")
               for n in section.notes)


def test_runs_and_throughput_measurements_on_a_busy_machine_are_named():
    from bench.report.sections import build_section

    def loaded(r, mean, cpus=2):
        r.timings.update(load_avg_mean=mean, load_avg_max=mean + 1, load_samples=10, cpus=cpus)
        return r

    plan = load_plan("switch-vs-dense")  # has the curve-based equal-time claim
    quiet = [loaded(rec("dense", 0, 2.3, family="dense"), 2.1), loaded(rec("switch cf=1.25", 0, 2.2), 2.5)]
    busy = loaded(rec("switch cf=1.25", 1, 2.2), 4.2)
    old = rec("dense", 1, 2.3, family="dense")  # made before runs recorded their load: not judged
    notes = build_section(plan, "tiny", [*quiet, old], plot_dir=None).notes
    assert ("Machine load: all 2 runs that recorded it ran alone (mean 1-minute load within 1.25x the cores), so "
            "their tokens/s are a quiet machine's.") in notes
    notes = build_section(plan, "tiny", [*quiet, busy, old], plot_dir=None).notes
    (note,) = [n for n in notes if n.startswith("Machine load:")]
    assert note == ("Machine load: 1 of 3 runs shared the machine with other work (mean 1-minute load above 1.25x "
                    "the cores): switch cf=1.25 seed 1 (load 4.2 on 2 cores). Their tokens/s and the curve-based "
                    "equal-time estimate, which reads these runs' clocks, are slower than a quiet machine's; losses "
                    "and step counts do not depend on it.")
    speed = _measured("dense", 0, 1000.0)
    speed.timings.update(load_avg=3.0, cpus=2)
    notes = build_section(load_plan("capacity"), "tiny", [old], plot_dir=None, throughput=[speed]).notes
    assert ("Machine load: 1 of 1 quiet-throughput measurements ran on a busy machine (mean 1-minute load above "
            "1.25x the cores): re-measure with `--throughput` on a quiet one.") in notes


def test_a_runs_cpu_share_decides_whether_it_shared_the_machine_where_it_has_one():
    from bench.report.sections import build_section

    def measured(r, load, share=None):
        r.timings.update(load_avg_mean=load, load_avg_max=load, load_samples=10, cpus=2)
        if share is not None:
            r.timings["cpu_share"] = share
        return r

    plan = load_plan("capacity")  # no curve-based equal-time claim
    # niced tests beside a run: load 3.1 but the run kept 0.95 of its threads -> quiet by its share
    niced = measured(rec("switch cf=1.25", 0, 2.2), 3.1, share=0.95)
    alone = measured(rec("switch cf=2.0", 0, 2.2), 2.0, share=0.97)
    (note,) = [n for n in build_section(plan, "tiny", [niced, alone], plot_dir=None).notes
               if n.startswith("Machine load:")]
    assert note == ("Machine load: all 2 runs that recorded it ran alone (CPU share of their threads at least "
                    "0.85), so their tokens/s are a quiet machine's.")
    halved = measured(rec("switch cf=0.5", 0, 2.3), 2.0, share=0.52)  # an equal-priority job took a core
    older = measured(rec("switch cf=1.0", 0, 2.3), 4.0)  # recorded before the share: judged by its load
    (note,) = [n for n in build_section(plan, "tiny", [niced, alone, halved, older], plot_dir=None).notes
               if n.startswith("Machine load:")]
    assert note == ("Machine load: 2 of 4 runs shared the machine with other work (CPU share of their threads "
                    "below 0.85; records made before the share was measured: mean 1-minute load above 1.25x the "
                    "cores): switch cf=0.5 seed 0 (CPU share 0.52), switch cf=1.0 seed 0 (load 4.0 on 2 cores). "
                    "Their tokens/s are slower than a quiet machine's; losses and step counts do not depend on it.")


def test_runs_on_several_machines_are_counted_and_split_equal_time_pairs_named():
    from bench.report.sections import build_section

    def on(r, *machines):
        r.timings["machines"] = list(machines)
        return r

    plan = load_plan("switch-vs-dense")  # has the curve-based equal-time claim
    one = [on(rec("dense", 0, 2.3, family="dense"), "aaaa0001"), on(rec("switch cf=1.25", 0, 2.2), "aaaa0001")]
    assert not [n for n in build_section(plan, "tiny", one, plot_dir=None).notes if n.startswith("Machines:")]
    runs = [*one, on(rec("dense", 1, 2.3, family="dense"), "aaaa0001"),
            on(rec("switch cf=1.25", 1, 2.2), "aaaa0001", "bbbb0002"),  # resumed on another machine
            rec("dense", 2, 2.3, family="dense")]  # older: no machine recorded
    (note,) = [n for n in build_section(plan, "tiny", runs, plot_dir=None).notes if n.startswith("Machines:")]
    assert note == ("Machines: 4 runs trained on 2 machines (boots), 1 older runs did not record theirs; look-alike "
                    "machines have differed 1.6x in speed here, so the table's tokens/s mixes machines (speed claims "
                    "use the quiet `--throughput` measurement, one process with the arms interleaved); the "
                    "curve-based equal-time estimate reads each run's clock, and the arms of seed(s) 1 trained on "
                    "different machines.")


def test_q_values_per_tier_and_the_note_on_verdicts_that_do_not_survive_a_5_percent_fdr():
    from bench.report import add_q_values, fdr_notes

    def c(tier, name, verdict, p):
        return {"tier": tier, "reproduction": "plan", "claim": name, "verdict": verdict, "p_value": p}

    claims = [c("ref", "a", "reproduced", 0.001), c("ref", "b", "refuted", 0.03), c("ref", "d", "no-effect", 0.5),
              c("ref", "e", "inconclusive", None), c("tiny", "f", "reproduced", 0.04)]
    add_q_values(claims)
    # ref: 3 tests, p 0.001 / 0.03 / 0.5 -> q 0.003 / 0.045 / 0.5; tiny alone: q = p
    assert [x["q_value"] for x in claims] == pytest.approx([0.003, 0.045, 0.5, None, 0.04])
    assert fdr_notes(claims) == [
        "Many claims, one tier: at tier `ref`, 2 of 2 reproduced / refuted verdicts keep a Benjamini-Hochberg q below "
        "0.05 over the tier's 3 tested claims (`q_value` in claims.json), i.e. survive a 5% false-discovery rate.",
        "Many claims, one tier: at tier `tiny`, 1 of 1 reproduced / refuted verdicts keep a Benjamini-Hochberg q below "
        "0.05 over the tier's 1 tested claims (`q_value` in claims.json), i.e. survive a 5% false-discovery rate."]
    claims.append(c("ref", "g", "reproduced", 0.04))  # now q of b and g: 0.04 x 4 / 3 = 0.0533 -> not below 0.05
    add_q_values(claims)
    (ref, _) = fdr_notes(claims)
    assert ref.startswith("Many claims, one tier: at tier `ref`, 1 of 3 reproduced / refuted verdicts keep")
    assert ref.endswith("these do not, so read them as weaker evidence: plan: b (q 0.053); plan: g (q 0.053).")


def test_cli_report_and_reproduce_list(tmp_path, capsys):
    from bench.cli import main

    url = f"sqlite:///{tmp_path / 'c.db'}"
    ResultsStore(url).save(rec("dense", 0, 2.3, family="dense"))
    assert main(["report", "--storage", url, "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    assert f"wrote {tmp_path / 'o' / 'REPORT.md'}" in capsys.readouterr().out
    assert main(["reproduce", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "switch-vs-dense" in listing and "tier tiny   preset tiny   8e+12 FLOPs/run, 8 arms x 3 seeds" in listing
    assert "tier ref    preset tiny   1.5e+14 FLOPs/run, 3 arms x 5 seeds" in listing
    assert main(["reproduce", "capacity", "--budget-tokens", "100"]) == 2
    assert "reproductions are matched on training FLOPs: use --budget-flops" in capsys.readouterr().err
    assert main(["reproduce", "capacity", "--arm", "bogus", "--storage", url]) == 2
    assert "arm 'bogus' is not in capacity" in capsys.readouterr().err


def test_gap_trend_compares_each_seed_with_the_baseline_at_half_and_at_the_end():
    from bench.report.claims import arm_stats
    from bench.report.sections import build_section, gap_at_half_and_end

    def curve(losses):
        return [{"step": s, "loss": v} for s, v in zip((50, 100, 150, 200), losses)]

    records = [rec("dense", 0, 2.0, family="dense", curve=curve([2.6, 2.4, 2.2, 2.0])),
               rec("dense", 1, 2.1, family="dense", curve=curve([2.7, 2.5, 2.3, 2.1])),
               rec("switch cf=1.25", 0, 1.9, curve=curve([2.58, 2.38, 2.1, 1.9])),  # -0.02 at 100, -0.10 at 200
               rec("switch cf=1.25", 1, 2.06, curve=curve([2.69, 2.46, 2.28, 2.06])),  # -0.04, -0.04
               rec("moe cf=1.0", 0, 2.0, family="moe", curve=curve([2.5, 2.3, 2.1, 2.0])),  # -0.10, 0.00
               rec("moe cf=2.0", 0, 2.03, family="moe", curve=curve([2.5, 2.42, 2.2, 2.03]))]  # +0.02, +0.03
    records[-1].curve[1]["loss"], records[-1].curve[3]["loss"] = 2.38, 2.03  # -0.02 at half, +0.03 at the end
    arms = arm_stats(records)
    assert gap_at_half_and_end(arms["switch cf=1.25"], arms["dense"]) == pytest.approx((-0.03, -0.07))
    assert gap_at_half_and_end(arms["moe cf=1.0"], arms["dense"]) == pytest.approx((-0.10, 0.0))
    section = build_section(load_plan("switch-vs-dense"), "tiny", records, plot_dir=None)
    note = next(n for n in section.notes if n.startswith("Loss gap to dense"))
    assert "switch cf=1.25 -0.030 → -0.070 (widening)" in note and "moe cf=1.0 -0.100 → +0.000 (narrowing)" in note
    assert "moe cf=2.0 -0.020 → +0.030 (changed sign)" in note


def test_runs_at_another_budget_get_their_own_section_and_a_cross_budget_note(tmp_path):
    store = ResultsStore(f"sqlite:///{tmp_path / 'b.db'}")
    default = load_plan("switch-experts").tiers["tiny"].budget_flops
    arms = {"dense": ("dense", 1, (2.40, 2.42), (2.10, 2.12)), "switch E=8": ("switch", 8, (2.41, 2.43), (2.05, 2.06))}
    for arm, (family, e, short, long) in arms.items():
        for seed in range(2):
            r = rec(arm, seed, short[seed], repro="switch-experts", family=family, load=(1,) * e)
            r.budget = {"kind": "flops", "value": default}  # an untagged run from before the budget tag
            store.save(r)
            r = rec(arm, seed, long[seed], repro="switch-experts", family=family, load=(1,) * e)
            r.run_id += "-long"
            r.budget, r.extra["budget_flops"] = {"kind": "flops", "value": 3e13}, 3e13
            store.save(r)
    text = write_report(store.url, tmp_path / "out").read_text()
    # Two sections, each comparing its own seeds: the long runs did not replace the short ones.
    assert text.count("## More experts at equal FLOPs per token") == 2
    assert "`switch-experts`, tier `tiny`, budget 3e+13 training FLOPs" in text
    assert f"| switch-experts | tiny | {default:.3g} | 4 |" in text and "| switch-experts | tiny | 3e+13 | 4 |" in text
    assert "| dense | 2 | 1,000 | 1,000 | 6.00 | 0.10M | 2.4100 ± 0.0141 |" in text
    assert "| dense | 2 | 1,000 | 1,000 | 6.00 | 0.10M | 2.1100 ± 0.0141 |" in text
    assert ('moe-bench reproduce switch-experts --tier tiny --seeds 2 --budget-flops 3e+13 --arm "dense" '
            '--arm "switch E=8"') in text
    assert f"Budget: 3e+13 training FLOPs per run ({3e13 / default:.3g}x the tier's default {default:.3g})" in text
    note = (f"dense loss 2.410 at {default:.3g} → 2.110 at 3e+13; "
            f"switch E=8 gap +0.010 at {default:.3g} → -0.055 at 3e+13.")
    assert text.count(note) == 2  # in both sections
    assert (tmp_path / "out" / "plots" / "switch-experts-3e13flops-curves.png").exists()
    assert (tmp_path / "out" / "plots" / "switch-experts-curves.png").exists()


def test_final_loss_slope_looks_past_a_short_last_interval():
    from bench.report.sections import final_loss_slope

    curve = [{"step": 350, "loss": 4.0}, {"step": 400, "loss": 3.9}, {"step": 413, "loss": 3.9}]
    # From step 350 (>= 50 steps back) to 413: (4.0 - 3.9) / 4.0 per 63 steps -> 3.97% per 100 steps.
    assert final_loss_slope(curve) == pytest.approx(0.1 / 4.0 * 100 / 63)
    long = [{"step": s, "loss": 3.0 - s / 10000} for s in range(0, 2001, 100)]  # window 10% = 200 steps
    assert final_loss_slope(long) == pytest.approx((0.02 / (3.0 - 0.18)) * 100 / 200)
    assert final_loss_slope([{"step": 10, "loss": 2.0}]) is None
    assert final_loss_slope([{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.9}]) == pytest.approx(0.05 * 10)


def test_gap_trend_compares_runs_of_different_lengths_at_the_same_fraction_of_their_run():
    from bench.report.claims import arm_stats
    from bench.report.sections import gap_at_half_and_end

    base = rec("lstm", 0, 3.0, family="lstm", curve=[{"step": s, "loss": 4.0 - s / 400} for s in (100, 200, 300, 400)])
    # An arm with cheaper tokens takes twice the steps for the same FLOPs; evaluations every 150 steps.
    arm = rec("moe-rnn E=4", 0, 2.8, family="moe-rnn",
              curve=[{"step": s, "loss": 4.0 - s / 800 - 0.2 * s / 800} for s in (150, 300, 450, 600, 750, 800)])
    arms = arm_stats([base, arm])
    half, end = gap_at_half_and_end(arms["moe-rnn E=4"], arms["lstm"])
    # Half: arm at step 400 (interpolated between 300 and 450) vs baseline at step 200.
    assert half == pytest.approx((4.0 - 0.5 - 0.1) - (4.0 - 0.5))
    assert end == pytest.approx((4.0 - 1.0 - 0.2) - 3.0)


def test_a_tier_judges_only_the_claims_on_its_own_arms(tmp_path):
    """The ref tier of switch-vs-dense trains dense, switch cf=1.25 and its equal-time arm: the claim on
    dense-wide (a tiny-tier arm) is listed as untested there, not judged; a claim on a tier arm with no
    runs yet stays in claims.json as inconclusive with has_data false (the file's four verdicts)."""
    store = ResultsStore(f"sqlite:///{tmp_path / 'r.db'}")
    budget = load_plan("switch-vs-dense").tiers["ref"].budget_flops
    for arm, family, pair in (("dense", "dense", (2.30, 2.31)), ("switch cf=1.25", "switch", (2.20, 2.22))):
        for seed, loss in enumerate(pair):
            r = rec(arm, seed, loss, family=family)
            r.group, r.train_flops, r.extra["tier"] = "repro-switch-vs-dense-ref", budget, "ref"
            store.save(r)
    text = write_report(store.url, tmp_path / "out").read_text()
    ref = text[text.index("`switch-vs-dense`, tier `ref`"):]
    assert ("Not tested at tier `ref` (the tier does not train an arm they need): Switch matches the ~3.5x-FLOPs "
            "dense model (T5-Large's role) trained for the same steps (needs dense-wide);") in ref
    assert not any(line.startswith("| switch-vs-dense | ref |") and "3.5x-FLOPs" in line for line in text.splitlines())
    claims = [c for c in json.loads((tmp_path / "out" / "claims.json").read_text()) if c["tier"] == "ref"]
    assert not any("3.5x-FLOPs" in c["claim"] for c in claims)
    assert {c["verdict"] for c in claims} <= {"reproduced", "refuted", "no-effect", "inconclusive"}
    equal_time = next(c for c in claims if c["claim"].startswith("Switch (cf 1.25) trained for the dense model's wall"))
    assert (equal_time["verdict"], equal_time["has_data"], equal_time["n_seeds"]) == ("inconclusive", False, 0)
    headline = next(c for c in claims if c["claim"].startswith("Switch (cf 1.25) reaches a lower validation loss"))
    assert (headline["verdict"], headline["has_data"], headline["n_seeds"]) == ("reproduced", True, 2)


def test_a_trend_is_judged_over_the_arms_its_tier_trains(tmp_path):
    """switch-experts' ref tier trains dense and E=4/16/64 of the trend's seven arms: the slope is
    taken over those four, not refused for the three the tier leaves out."""
    store = ResultsStore(f"sqlite:///{tmp_path / 'r.db'}")
    budget = load_plan("switch-experts").tiers["ref"].budget_flops
    for arm, loss in (("dense", 2.30), ("switch E=4", 2.26), ("switch E=16", 2.22), ("switch E=64", 2.18)):
        for seed in (100, 101):
            r = rec(arm, seed, loss + 0.001 * seed, repro="switch-experts", family="dense" if arm == "dense" else "switch")
            r.group, r.train_flops, r.extra["tier"] = "repro-switch-experts-ref", budget, "ref"
            store.save(r)
    write_report(store.url, tmp_path / "out")
    claims = json.loads((tmp_path / "out" / "claims.json").read_text())
    trend = next(c for c in claims if c["tier"] == "ref" and c["claim"].startswith("Validation loss falls as experts"))
    # log2 x = 0, 2, 4, 6 against losses falling 0.04 per step of 2: slope -0.02 per doubling, +0.02 in the paper's direction
    assert trend["has_data"] and trend["n_seeds"] == 2 and trend["estimate"] == pytest.approx(0.02)


def test_sequential_looks_raise_the_false_verdict_rate_under_no_effect():
    from bench.report.stats import sequential_false_verdict_rate as rate

    assert rate((5,)) == pytest.approx(0.05, abs=0.003)  # one look: the nominal 5%
    assert rate((10,)) == pytest.approx(0.05, abs=0.003)
    assert rate((3, 5)) == pytest.approx(0.086, abs=0.004)  # the ref tier's 3-then-5 rule
    assert rate((5, 10)) == pytest.approx(0.086, abs=0.004)
    assert rate((3, 5, 10)) > rate((5, 10)) + 0.02  # every extra look costs


def test_a_tier_whose_seeds_were_raised_after_a_look_says_so_in_the_report_and_claims_json():
    from bench.plans import load_plan
    from bench.report.sections import build_section

    plan = load_plan("capacity")
    assert plan.tiers["ref"].looks == [3, 5]
    arms = ["switch cf=0.5", "switch cf=1.0", "switch cf=1.25", "switch cf=2.0"]
    records = [rec(arm, seed, 2.0 - 0.01 * i + 0.003 * seed, repro="capacity", dropped=0.1 / (i + 1))
               for i, arm in enumerate(arms) for seed in range(4)]
    section = build_section(plan, "ref", records, None)
    result = next(c for c in section.claims if c.claim.metric == "val_loss")
    assert result.looks == [3, 5] and result.false_verdict_rate == pytest.approx(0.086, abs=0.004)
    assert ("the tier's seeds come in looks (at 3, 5 seeds: more only while a headline claim is undecided), so "
            "under no effect a verdict comes out ~8.") in result.evidence
    assert result.evidence.endswith("; interim: 4 of the 5 seeds") and result.stopped_at is None
    out = result.as_json("capacity", "ref", 1.5e14)
    assert out["looks"] == [3, 5] and out["false_verdict_rate"] == pytest.approx(0.086, abs=0.004)
    assert out["stopped_at_look"] is None
    tiny = build_section(plan, "tiny", [rec(arm, s, 2.0, repro="capacity") for arm in arms for s in range(2)], None)
    assert all(c.looks == [] and c.as_json("capacity", "tiny", 1.0)["false_verdict_rate"] is None for c in tiny.claims)


def test_runs_that_kept_float32_denormals_are_counted_in_a_note():
    from bench.report.sections import _denormals_note

    old, new = rec("dense", 0, 2.0), rec("dense", 1, 2.0)
    old.timings.update(device="cpu (x86_64, 1 threads)")
    new.timings.update(device="cpu (x86_64, 1 threads)", denormals_flushed=True)
    gpu = rec("dense", 2, 2.0)
    gpu.timings.update(device="NVIDIA H200")
    assert _denormals_note([new, gpu]) is None  # flushed, or not a CPU: nothing to say
    assert _denormals_note([old, new, gpu]).startswith("Denormals: 1 of 2 runs trained with float32 denormals kept")
    assert _denormals_note([old]).startswith("Denormals: All runs trained")


def test_a_verdict_before_the_tiers_last_look_is_marked_interim_in_the_tables():
    from bench.report import verdict_cell

    assert verdict_cell("reproduced", None, "val_bleu", [5, 10], 7) == "**reproduced** (interim: 7 of 10 seeds)"
    assert verdict_cell("inconclusive", 11, "val_bleu", [5, 10], 5) == "inconclusive (interim: 5 of 10 seeds)"
    assert verdict_cell("inconclusive", 11, "val_bleu", [5, 10], 10) == "inconclusive (~11 seeds to decide)"
    assert verdict_cell("refuted", None, "val_loss", None, 3) == "**refuted**"


def test_an_inconclusive_verdict_that_no_affordable_seed_count_decides_says_so():
    from bench.report import verdict_cell
    from bench.report.stats import Effect, seeds_to_decide

    # a mean of +0.2 BLEU with a paired sd of 5: an interval inside +-1 needs a half-width under 0.8,
    # i.e. n ~ (1.98 * 5 / 0.8)^2 ~ 153 seeds
    effect = Effect(0.2, -3.4, 3.8, 10, sd=5.0)
    assert seeds_to_decide(effect, 1.0) is None
    assert verdict_cell("inconclusive", None, "val_bleu", [5, 10], 10, True) == "inconclusive (over 100 seeds to decide)"
    assert verdict_cell("inconclusive", None, "val_bleu", None, 1, True) == "inconclusive"  # one seed: no spread
    assert verdict_cell("inconclusive", None, "val_bleu", None, 4, False) == "inconclusive"


def test_an_arm_whose_runs_trained_with_different_settings_is_named_with_each_value():
    from bench.report.sections import build_section, mixed_design_note

    def optim(r, warmup, **extra):
        r.config["run"] = {"optim": {"lr": 2e-3, "warmup_steps": warmup}, **extra}
        return r

    plan = load_plan("switch-vs-dense")
    same = [optim(rec("dense", s, 2.3, family="dense"), 40) for s in range(3)]
    # A setting added after the older runs (missing from their records) is no difference.
    same.append(optim(rec("dense", 3, 2.3, family="dense"), 40, train={"curve_bleu_batches": 0}))
    assert mixed_design_note(same) is None
    assert not [n for n in build_section(plan, "tiny", same, plot_dir=None).notes if "Mixed designs" in n]
    mixed = [*same, optim(rec("dense", 4, 2.0, family="dense"), 400), optim(rec("switch cf=1.25", 0, 2.2), 40)]
    (note,) = [n for n in build_section(plan, "tiny", mixed, plot_dir=None).notes if "Mixed designs" in n]
    assert note.startswith("**Mixed designs**: runs of one arm trained with different settings, and the figures "
                           "above pool them: `dense` (run.optim.warmup_steps 40 in 4 runs, 400 in 1 run). ")
    assert "`scripts/archive_runs.py repro-switch-vs-dense-tiny --arm ARM --into sqlite:///archive.db`" in note


def test_a_tier_stops_at_a_look_that_decides_every_headline_claim_and_its_verdicts_are_final():
    from bench.report import verdict_cell
    from bench.report.claims import undecided
    from bench.report.sections import build_section

    plan = load_plan("capacity")  # ref looks [3, 5]; the quality slope is its headline claim
    arms = ["switch cf=0.5", "switch cf=1.0", "switch cf=1.25", "switch cf=2.0"]

    def runs(noise):  # loss falls 0.01 per arm step (cf up); `noise` scrambles the slope by seed
        return [rec(arm, seed, 2.0 - 0.01 * i + noise * ((i * 7 + seed * 5) % 3), repro="capacity",
                    dropped=0.1 / (i + 1)) for i, arm in enumerate(arms) for seed in range(3)]

    section = build_section(plan, "ref", runs(0.001), None)
    assert not undecided(section.claims)
    headline = next(c for c in section.claims if c.claim.headline)
    assert headline.verdict == "reproduced" and headline.stopped_at == 3
    assert headline.evidence.endswith("; every headline claim was decided at 3 seeds, so the tier stopped there")
    assert "interim" not in headline.evidence
    assert headline.looks_run == [3] and headline.as_json("capacity", "ref", 1.5e14)["stopped_at_look"] == 3
    assert verdict_cell(headline.verdict, None, "val_loss", headline.looks_run, 3) == "**reproduced**"
    # the same seeds with a slope buried in noise: the headline claim is open, so 3 seeds are interim
    open_section = build_section(plan, "ref", runs(0.05), None)
    (still,) = undecided(open_section.claims)
    assert still.claim.headline and still.verdict == "inconclusive" and still.stopped_at is None
    assert still.evidence.endswith("; interim: 3 of the 5 seeds") and still.looks_run == [3, 5]
