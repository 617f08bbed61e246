"""BLEU / chrF against sacrebleu and hand-computed values; LM loss transforms."""
from __future__ import annotations

import math

import pytest
import sacrebleu
import torch

from bench.metrics import (bits_per_char, bits_per_token, corpus_bleu, corpus_chrf, last_eval_max_violation,
                           perplexity, quality_lm, quality_per_active_param, quality_translation)

HYPS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog",
    "Hello, world!",
    "",
    "Das ist ein Test .",
]
REFS = [
    "The cat sat on a mat.",
    "The quick brown fox jumped over the lazy dog.",
    "Hello world!",
    "Nothing was produced here.",
    "Das ist ein Test.",
]


def test_bleu_equals_sacrebleu_exactly():
    out = corpus_bleu(HYPS, REFS)
    assert out["score"] == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert isinstance(out["score"], float) and 0 < out["score"] < 100
    sig = out["signature"]
    assert "tok:13a" in sig and "nrefs:1" in sig and "smooth:exp" in sig and "case:mixed" in sig
    assert f"version:{sacrebleu.__version__}" in sig


def test_bleu_hand_checked():
    # Identical text: 100 (up to exp/log rounding in sacrebleu: 100.00000000000004).
    same = corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["score"] == pytest.approx(100.0, abs=1e-9)
    assert corpus_bleu(HYPS[:3], HYPS[:3])["score"] == pytest.approx(100.0, abs=1e-9)
    # Precisions 5/6, 3/5, 2/4, 1/3 ("the" clipped to one match), equal lengths so BP = 1:
    # BLEU = 100 * (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25.
    out = corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert out["score"] == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-9)
    assert corpus_bleu(["xyz"], ["the cat sat on a mat"])["score"] == 0.0


def test_chrf_equals_sacrebleu_exactly():
    out = corpus_chrf(HYPS, REFS)
    assert out["score"] == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    assert 0 < out["score"] < 100
    assert "nc:6" in out["signature"] and "nw:0" in out["signature"]
    assert corpus_chrf(["the cat sat"], ["the cat sat"])["score"] == pytest.approx(100.0, abs=1e-9)
    assert corpus_chrf(["xyz"], ["abc"])["score"] == 0.0


def test_chrf_hand_checked_unigrams_only():
    # One hypothesis "ab" vs reference "ac": char 1-gram P = R = 1/2, 2-gram P = R = 0; chrF
    # averages P and R over n = 1..6 (orders with no n-grams on either side are skipped by
    # sacrebleu's effective order) and combines them with beta = 2.
    p = r = (0.5 + 0.0) / 2
    f = (1 + 4) * p * r / (4 * p + r)
    assert corpus_chrf(["ab"], ["ac"])["score"] == pytest.approx(100 * f)


@pytest.mark.parametrize("fn", (corpus_bleu, corpus_chrf))
def test_corpus_input_checks(fn):
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(TypeError, match="hypotheses\\[0\\]"):
        fn([[1, 2]], ["a"])


def test_lm_metric_formulas():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(torch.tensor(math.log(65.0))) == pytest.approx(65.0, rel=1e-6)
    assert perplexity(1e6) == math.inf
    assert bits_per_token(math.log(2.0)) == pytest.approx(1.0)
    assert bits_per_token(3 * math.log(2.0)) == pytest.approx(3.0)
    assert bits_per_token(1.0) == pytest.approx(1.4426950408889634)
    assert quality_lm(0.0) == 1.0
    assert quality_lm(math.log(4.0)) == pytest.approx(0.25)
    assert quality_lm(2.5) == pytest.approx(1.0 / perplexity(2.5))
    assert quality_translation(25.0) == 0.25
    assert quality_translation(100.0) == 1.0
    assert quality_per_active_param(0.5, 2_000_000) == 0.25
    assert quality_per_active_param(0.3, 500_000) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="active_params"):
        quality_per_active_param(0.5, 0)


def test_bits_per_char_is_total_bits_over_characters():
    # 100 tokens at 2 nats each over 400 characters: 200 nats = 288.539... bits, 0.7213... per character
    assert bits_per_char(bits_per_token(2.0), 100, 400) == pytest.approx(200 / math.log(2) / 400, rel=1e-15)
    assert bits_per_char(bits_per_token(2.0), 100, 400) == pytest.approx(0.7213475204444817)
    for bpt in (0.1, 1.0, 3.0000001192092896, 6.02):  # one token per character: exactly bits per token
        assert bits_per_char(bpt, 12_345, 12_345) == bpt
    for tokens, chars in ((0, 10), (10, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            bits_per_char(1.0, tokens, chars)


def test_last_eval_max_violation_is_the_mean_over_layers_of_the_last_evaluation():
    stats = [{"max_violation": 9.0, "eval": {"max_violation": 0.25}},  # the training batch's figure is not used
             {"eval": {"max_violation": 0.75}}, {"eval": {"max_violation": float("nan")}}, {"z_loss": 0.1}]
    assert last_eval_max_violation(stats) == 0.5
    assert last_eval_max_violation([]) is None and last_eval_max_violation(None) is None
    assert last_eval_max_violation([{"max_violation": 1.0}]) is None  # no evaluation recorded
