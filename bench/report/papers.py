"""What the papers report, transcribed from their tables and text, for side-by-side reports.

Absolute numbers are not comparable with ours (C4 / 1B-Word on TPU clusters vs Tiny Shakespeare
on a CPU); the report compares *orderings and ratios*, which is what the papers' claims are about.
"""
from __future__ import annotations

FEDUS2021 = "Fedus, Zoph & Shazeer 2021, *Switch Transformers* (JMLR 2022)"
SHAZEER2017 = "Shazeer et al. 2017, *Outrageously Large Neural Networks* (ICLR 2017)"

# Fedus et al. Table 1: T5-Base-sized models, 128 experts, C4, 100k steps. "neg log perp" is the
# negative log perplexity after 100k steps (higher is better); hours to reach -1.50; examples/s.
SWITCH_TABLE1 = {
    "dense": {"model": "T5-Base", "neg_log_perp": -1.731, "hours_to_threshold": None, "examples_per_s": 1600},
    "dense-wide": {"model": "T5-Large", "neg_log_perp": -1.550, "hours_to_threshold": 131.1, "examples_per_s": 470},
    "moe cf=2.0": {"model": "MoE-Base cf 2.0", "neg_log_perp": -1.547, "hours_to_threshold": 68.7,
                   "examples_per_s": 840},
    "switch cf=2.0": {"model": "Switch-Base cf 2.0", "neg_log_perp": -1.554, "hours_to_threshold": 72.8,
                      "examples_per_s": 860},
    "moe cf=1.25": {"model": "MoE-Base cf 1.25", "neg_log_perp": -1.559, "hours_to_threshold": 80.7,
                    "examples_per_s": 790},
    "switch cf=1.25": {"model": "Switch-Base cf 1.25", "neg_log_perp": -1.553, "hours_to_threshold": 65.0,
                       "examples_per_s": 910},
    "moe cf=1.0": {"model": "MoE-Base cf 1.0", "neg_log_perp": -1.572, "hours_to_threshold": 80.1,
                   "examples_per_s": 860},
    "switch cf=1.0": {"model": "Switch-Base cf 1.0", "neg_log_perp": -1.561, "hours_to_threshold": 62.8,
                      "examples_per_s": 1000},
}

# Fedus et al. Sec. 3.2 / Figure 5: Switch-Base with 64 experts reaches T5-Base's step-60k quality
# at step 450k of T5-Base, i.e. a 7.5x speed-up in steps; Figure 4: loss falls with more experts
# at a fixed FLOPs per token.
SWITCH_STEP_SPEEDUP_64_EXPERTS = 7.5

# Shazeer et al. Table 6 (1B-Word LM, the paper's MoE language model), by the weights of the
# importance and load losses: test perplexity, CV(importance), max/mean expert load.
SHAZEER_TABLE6 = [
    {"w_importance": 0.0, "w_load": 0.0, "test_perplexity": 39.8, "cv_importance": 3.04, "max_over_mean_load": 17.80},
    {"w_importance": 0.2, "w_load": 0.0, "test_perplexity": 35.6, "cv_importance": 0.06, "max_over_mean_load": 1.47},
    {"w_importance": 0.0, "w_load": 0.2, "test_perplexity": 35.7, "cv_importance": 0.22, "max_over_mean_load": 1.15},
    {"w_importance": 0.1, "w_load": 0.1, "test_perplexity": 35.6, "cv_importance": 0.06, "max_over_mean_load": 1.14},
    {"w_importance": 0.01, "w_load": 0.01, "test_perplexity": 35.7, "cv_importance": 0.48,
     "max_over_mean_load": 2.37},
    {"w_importance": 1.0, "w_load": 1.0, "test_perplexity": 35.7, "cv_importance": 0.03, "max_over_mean_load": 1.07},
]

# Shazeer et al. Table 2: WMT'14 En->De newstest2014 BLEU, MoE (2048 experts) vs GNMT (dense LSTM).
SHAZEER_WMT14_EN_DE = {"moe": 26.03, "dense": 24.91}
