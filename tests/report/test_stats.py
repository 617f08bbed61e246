"""Claim statistics against hand-computed values: paired t intervals, per-seed slopes, verdicts,
and the unbiased step speed-up (a run compared with itself gives exactly 1.0x)."""
from __future__ import annotations

import math

import pytest

from bench.plans import Claim
from bench.report.claims import add_paired_metrics, arm_stats, evaluate_claim
from bench.report.stats import (Effect, detectable_effect, mean_interval, paired_difference, paired_slope,
                                seeds_to_decide, t_quantile, verdict)
from tests.report.test_report import rec


def test_t_quantiles_match_the_tables():
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert t_quantile(0.80, 4) == pytest.approx(0.940965, abs=1e-6)


def test_paired_difference_is_a_t_interval_over_seed_pairs():
    a = {0: 2.00, 1: 2.02, 2: 2.01, 7: 1.0}  # seed 7 has no partner in b: not used
    b = {0: 2.10, 1: 2.16, 2: 2.12}
    e = paired_difference(a, b, higher_better=False)  # gains b - a: 0.10, 0.14, 0.11
    sd = math.sqrt(((0.10 - 0.35 / 3) ** 2 + (0.14 - 0.35 / 3) ** 2 + (0.11 - 0.35 / 3) ** 2) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert e.n_seeds == 3 and e.per_seed == pytest.approx({0: 0.10, 1: 0.14, 2: 0.11})
    assert e.estimate == pytest.approx(0.35 / 3) and e.sd == pytest.approx(sd)
    assert (e.ci_low, e.ci_high) == (pytest.approx(0.35 / 3 - half, abs=1e-6), pytest.approx(0.35 / 3 + half, abs=1e-6))
    assert e.detectable == pytest.approx((4.302653 + t_quantile(0.8, 2)) * sd / math.sqrt(3))
    assert verdict(e, delta=0.01) == "reproduced"
    assert verdict(paired_difference(b, a, higher_better=False), 0.01) == "refuted"
    # two-sided t-test p with 2 df, closed form: 1 - t / sqrt(t^2 + 2), t = mean / (sd / sqrt(3))
    t = (0.35 / 3) / (sd / math.sqrt(3))
    assert e.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2)) and e.p_value < 0.05  # the CI excludes 0


def test_p_value_is_below_5_percent_exactly_when_the_interval_excludes_zero():
    from bench.report.stats import p_value

    t = 2 / (1 / math.sqrt(3))  # values 1, 2, 3: mean 2, sd 1
    assert p_value(2.0, 1.0, 3) == pytest.approx(1 - t / math.sqrt(t * t + 2))  # 0.0742
    for values in ([0.1, 0.2, 0.3], [0.1, -0.05, 0.2, 0.02], [1.0, 1.1, 0.9, 1.05, 0.97], [-0.3, 0.1, -0.2]):
        mean, low, high, sd = mean_interval(values)
        assert (p_value(mean, sd, len(values)) < 0.05) == (low > 0 or high < 0)
    assert p_value(1.0, None, 1) is None and p_value(1.0, 0.0, 3) is None  # no spread, no test


def test_paired_pairs_remove_shared_seed_noise():
    # Seeds differ a lot (0.3) but the arms' gap is the same 0.02 in every seed: a tight interval,
    # where the max-min spread rule could not tell the arms apart.
    a = {s: 2.0 + 0.1 * s for s in range(4)}
    b = {s: 2.02 + 0.1 * s for s in range(4)}
    e = paired_difference(a, b, higher_better=False)
    assert e.estimate == pytest.approx(0.02) and e.ci_low == pytest.approx(0.02) and e.ci_high == pytest.approx(0.02)


def test_verdicts():
    def eff(low, high, n=5):
        return Effect((low + high) / 2, low, high, n)

    assert verdict(eff(0.01, 0.05), 0.01) == "reproduced"
    assert verdict(eff(-0.05, -0.01), 0.01) == "refuted"
    assert verdict(eff(-0.004, 0.006), 0.01) == "no-effect"
    assert verdict(eff(-0.004, 0.02), 0.01) == "inconclusive"
    assert verdict(Effect(0.1, -math.inf, math.inf, 1), 0.01) == "inconclusive"  # one seed: no interval
    assert verdict(Effect(None, None, None, 0), 0.01) == "no-data"
    # non-inferiority ("a matches b"): not worse by more than delta
    assert verdict(eff(-0.008, 0.02), 0.01, "not-worse") == "reproduced"
    assert verdict(eff(-0.05, -0.02), 0.01, "not-worse") == "refuted"
    assert verdict(eff(-0.05, 0.02), 0.01, "not-worse") == "inconclusive"


def test_paired_slope_fits_each_seed_then_averages():
    # x = log2 E: 0, 1, 2, 3. Seed 0 falls 0.05 per doubling, seed 1 0.03; seed 2 has 2 arms only (skipped).
    values = {x: {0: 2.3 - 0.05 * x, 1: 2.4 - 0.03 * x} for x in (0, 1, 2, 3)}
    values[0][2], values[3][2] = 2.0, 1.0
    e = paired_slope(values, decreasing=True)
    assert e.per_seed == pytest.approx({0: 0.05, 1: 0.03}) and e.n_seeds == 2
    half = 12.706205 * math.sqrt(2 * 0.01 ** 2) / math.sqrt(2)
    assert e.estimate == pytest.approx(0.04) and e.ci_high == pytest.approx(0.04 + half, abs=1e-5)
    assert verdict(e, 0.005) == "inconclusive"


def test_seeds_to_decide_projects_the_observed_mean_and_spread():
    # mean +0.004, sd 0.0044, delta 0.01 (the capacity slope's shape after two seeds): half-widths
    # t(.975, n-1) * 0.0044 / sqrt(n) are 0.01093 (n 3), 0.00700 (n 4), 0.00546 (n 5); only at
    # n 5 does [0.004 - h, 0.004 + h] fit inside +-0.01 ("no-effect").
    small = Effect(0.004, -0.036, 0.043, 2, sd=0.0044)
    assert seeds_to_decide(small, 0.01) == 5
    # mean +0.05, sd 0.03: half-widths 0.0745 (n 3), 3.182446 * 0.03 / 2 = 0.0477 (n 4) < 0.05: reproduced at 4
    assert seeds_to_decide(Effect(0.05, -0.2, 0.3, 2, sd=0.03), 0.01) == 4
    # already decidable at its own n
    assert seeds_to_decide(Effect(0.05, 0.04, 0.06, 5, sd=0.008), 0.01) == 5
    # non-inferiority: mean -0.005, sd 0.004, delta 0.01: the low end must rise above -0.01;
    # n 3 gives half 0.00994 -> low -0.01494; n 5: 2.776445 * 0.004 / sqrt(5) = 0.00497 -> -0.00997
    assert seeds_to_decide(Effect(-0.005, -0.05, 0.04, 2, sd=0.004), 0.01, "not-worse") == 5
    assert seeds_to_decide(Effect(0.1, -math.inf, math.inf, 1), 0.01) is None  # no spread from one seed
    assert seeds_to_decide(Effect(0.0, -0.1, 0.1, 3, sd=0.05), 0.0) is None  # on the boundary: never decided


def test_mean_interval_of_one_value_is_unbounded():
    assert mean_interval([2.0]) == (2.0, -math.inf, math.inf, None)
    assert detectable_effect(None, 1) is None


def test_a_run_compared_with_itself_has_step_speedup_exactly_one():
    base = [rec("dense", s, 2.0, family="dense") for s in range(3)]
    twin = []
    for r in base:  # the same curves under another arm name
        t = rec("twin", r.seed, 2.0, family="dense")
        t.curve = [dict(p) for p in r.curve]
        twin.append(t)
    arms = arm_stats(base + twin)
    add_paired_metrics(arms, "dense")
    assert arms["dense"].values["step_speedup"] == [1.0, 1.0, 1.0]
    assert arms["twin"].values["step_speedup"] == [1.0, 1.0, 1.0]
    claim = Claim(text="twin is faster", a="twin", b="dense", metric="step_speedup", direction="higher")
    result = evaluate_claim(claim, arms)
    assert result.effect.estimate == 0.0 and result.verdict == "no-effect"


def test_a_baseline_whose_curve_dips_early_is_timed_at_its_first_crossing():
    # dense reaches its final 2.0 already at step 200 (then 2.1, 2.0): its own speed-up is 1.0,
    # and switch, reaching 2.0 at step 150, is 200/150 faster (not 400/150).
    dense = rec("dense", 0, 1.5, family="dense",
                curve=[{"step": s, "loss": v} for s, v in zip((100, 200, 300, 400), (3.0, 2.0, 2.1, 2.0))])
    switch = rec("switch", 0, 1.4,
                 curve=[{"step": s, "loss": v} for s, v in zip((100, 200, 300, 400), (2.5, 1.5, 1.4, 1.3))])
    arms = arm_stats([dense, switch])
    add_paired_metrics(arms, "dense")
    assert arms["dense"].values["step_speedup"] == [1.0]
    assert arms["switch"].values["step_speedup"] == pytest.approx([200 / 150])  # 2.5 -> 1.5 crosses 2.0 at 150


def test_step_speedup_and_equal_time_loss_use_curves_only():
    # The final evaluation (whole split) is lower than any curve point (a few batches): it must not
    # become the target, or the baseline would look faster than itself.
    def curve(losses, seconds_per_step):
        return [{"step": s, "seconds": s * seconds_per_step, "loss": v} for s, v in zip((100, 200, 300, 400), losses)]

    dense = rec("dense", 0, 1.5, family="dense", curve=curve([3.0, 2.5, 2.2, 2.0], 0.1))
    switch = rec("switch", 0, 1.4, curve=curve([2.8, 2.2, 2.0, 1.9], 0.125))
    arms = arm_stats([dense, switch])
    add_paired_metrics(arms, "dense")
    assert arms["dense"].values["step_speedup"] == [1.0]
    assert arms["switch"].values["step_speedup"] == pytest.approx([400 / 300])  # reaches 2.0 at step 300
    # dense trains 40 s; at 40 s switch is at step 320: between 2.0 (300) and 1.9 (400)
    assert arms["switch"].values["loss_at_equal_time"] == pytest.approx([2.0 - 0.1 * 20 / 100])
    assert arms["dense"].values["loss_at_equal_time"] == pytest.approx([2.0])


def test_equal_time_loss_from_a_quiet_throughput_ratio():
    def curve(losses):
        return [{"step": s, "tokens": s * 1000, "seconds": s * 9.9, "loss": v} for s, v in zip((100, 200, 300, 400), losses)]

    dense = rec("dense", 0, 1.5, family="dense", curve=curve([3.0, 2.5, 2.2, 2.0]))
    switch = rec("switch", 0, 1.4, curve=curve([2.8, 2.2, 2.0, 1.9]))
    arms = arm_stats([dense, switch])
    add_paired_metrics(arms, "dense", speed={"dense": 1000.0, "switch": 800.0})
    # in dense's time switch trains 0.8 x 400k = 320k tokens: between 2.0 (300k) and 1.9 (400k)
    assert arms["switch"].values["loss_at_equal_time"] == pytest.approx([1.98])
    assert arms["dense"].values["loss_at_equal_time"] == pytest.approx([2.0])


def test_translation_sections_say_whether_bleu_settled():
    from bench.plans import load_plan
    from bench.report.sections import build_section

    def run(arm, seed, bleus):
        r = rec(arm, seed, 3.0, repro="translation", family="dense", val_bleu=bleus[-1])
        r.curve = [{"step": 100 * (i + 1), "loss": 4.0 - i, "bleu": b} for i, b in enumerate(bleus)]
        return r

    records = [run("dense", 0, [5.0, 8.0, 8.2]), run("dense", 1, [4.0, 7.0, 7.6]), run("switch", 0, [6.0, 9.0, 10.0])]
    section = build_section(load_plan("translation"), "ref", records, plot_dir=None)
    note = next(n for n in section.notes if n.startswith("BLEU at the last two evaluations"))
    assert "dense 7.50 → 7.90 (+0.40)" in note and "switch 9.00 → 10.00 (+1.00)" in note


def test_paired_gap_band_is_a_t_interval_per_evaluation():
    from bench.report.stats import paired_gap_band

    base = {0: [(100, 3.0), (200, 2.5)], 1: [(100, 3.2), (200, 2.7)], 2: [(100, 3.1), (200, 2.6)]}
    arm = {0: [(100, 2.9), (200, 2.4)], 1: [(100, 3.0), (200, 2.5)], 2: [(100, 3.1), (200, 2.45)], 9: [(100, 1.0)]}
    band = paired_gap_band(arm, base)
    assert [b[0] for b in band] == [100, 200] and all(b[4] == 3 for b in band)
    gaps = [-0.1, -0.2, 0.0]  # at x = 100
    assert band[0][1] == pytest.approx(sum(gaps) / 3)
    half = 4.302653 * 0.1 / math.sqrt(3)  # sd of (-0.1, -0.2, 0.0) is 0.1
    assert (band[0][2], band[0][3]) == (pytest.approx(-0.1 - half, abs=1e-6), pytest.approx(-0.1 + half, abs=1e-6))


def test_gap_plot_is_written(tmp_path):
    from bench.report.plots import gap_to_baseline

    records = [rec("dense", s, 2.0, family="dense") for s in range(3)] + [rec("switch", s, 1.9) for s in range(3)]
    files = gap_to_baseline(records, tmp_path, "g", "t", baseline_label="dense")
    assert sorted(f.name for f in files) == ["g.html", "g.png"] and all(f.stat().st_size > 1000 for f in files)
    assert gap_to_baseline(records, tmp_path, "none", "t", baseline_label="nobody") == []


def test_curve_band_is_a_t_interval_at_the_x_values_every_seed_has():
    from bench.report.stats import curve_band, mean_curve

    seeds = [[(1.0, 2.0), (2.0, 1.0)], [(1.0, 2.2), (2.0, 1.4), (3.0, 1.0)]]
    band = curve_band(seeds)
    assert [b[0] for b in band] == [1.0, 2.0] and [b[4] for b in band] == [2, 2]  # x=3: one seed only
    t = 12.7062047  # t(0.975, 1 df); sd of two values a, b is |a - b| / sqrt(2), so half-width = t |a - b| / 2
    assert band[0][1:4] == pytest.approx((2.1, 2.1 - t * 0.1, 2.1 + t * 0.1), rel=1e-6)
    assert band[1][1:4] == pytest.approx((1.2, 1.2 - t * 0.2, 1.2 + t * 0.2), rel=1e-6)
    flat = lambda curve: [v for point in curve for v in point]  # noqa: E731
    assert flat(mean_curve(seeds)) == pytest.approx([1.0, 2.1, 2.0, 1.2])
    assert flat(mean_curve(seeds, interpolate=True)) == pytest.approx([1.0, 2.1, 2.0, 1.2])  # the range both cover


def test_benjamini_hochberg_q_values_by_hand():
    from bench.report.stats import bh_q_values

    # m = 4 tests: p sorted 0.01, 0.02, 0.03, 0.5 -> p m / rank 0.04, 0.04, 0.04, 0.5 (already monotone)
    assert bh_q_values([0.03, None, 0.5, 0.01, 0.02]) == pytest.approx([0.04, None, 0.5, 0.04, 0.04])
    # monotone from the top: p 0.001, 0.04, 0.041 (m 3) -> 0.003, min(0.06, 0.041) = 0.041, 0.041
    assert bh_q_values([0.041, 0.001, 0.04]) == pytest.approx([0.041, 0.003, 0.041])
    assert bh_q_values([None, None]) == [None, None] and bh_q_values([]) == []
