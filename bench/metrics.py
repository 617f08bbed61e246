"""Evaluation metrics: corpus BLEU / chrF (sacrebleu) for translation, and LM loss transforms
(perplexity, bits per token, bits per character).

Translation scores are computed on *detokenized* text (``tokenizer.decode`` output against the
raw references), with sacrebleu's defaults (BLEU: 13a tokenization, exp smoothing, mixed case;
chrF: character 6-grams, beta 2, no word n-grams), and are returned with sacrebleu's signature
string so that reported numbers are reproducible (Post 2018).

Quality measures put both task types on one "higher is better" scale in [0, 1]:
``quality_lm = exp(-loss)`` (the geometric-mean probability of the correct token, = 1 / ppl)
and ``quality_translation = BLEU / 100``; ``quality_per_active_param`` divides either by the
number of parameters active per token, in millions.
"""
from __future__ import annotations

import math
from typing import Sequence

from sacrebleu.metrics import BLEU, CHRF

LN2 = math.log(2.0)


def _check_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    hyps, refs = list(hypotheses), list(references)
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references: they must pair up one to one")
    if not hyps:
        raise ValueError("cannot score an empty corpus: no hypotheses")
    for name, seq in (("hypotheses", hyps), ("references", refs)):
        bad = next((i for i, s in enumerate(seq) if not isinstance(s, str)), None)
        if bad is not None:
            raise TypeError(f"{name}[{bad}] is {type(seq[bad]).__name__}, expected str (detokenized text)")
    return hyps, refs


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU (Papineni et al. 2002) via ``sacrebleu.metrics.BLEU()`` (tokenize='13a').

    BLEU = 100 * BP * exp(mean_n log p_n), n = 1..4, p_n the clipped n-gram precision over the
    corpus, BP = min(1, exp(1 - ref_len / hyp_len)). One reference per hypothesis.
    Returns {"score": float in [0, 100], "signature": sacrebleu signature string}.
    """
    hyps, refs = _check_corpus(hypotheses, references)
    metric = BLEU()
    score = metric.corpus_score(hyps, [refs])
    return {"score": float(score.score), "signature": str(metric.get_signature())}


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus chrF (Popovic 2015) via ``sacrebleu.metrics.CHRF()``: character n-gram F-beta,
    n = 1..6, beta = 2 (recall weighted), whitespace ignored.

    Returns {"score": float in [0, 100], "signature": sacrebleu signature string}.
    """
    hyps, refs = _check_corpus(hypotheses, references)
    metric = CHRF()
    score = metric.corpus_score(hyps, [refs])
    return {"score": float(score.score), "signature": str(metric.get_signature())}


def perplexity(loss: float) -> float:
    """exp(loss), loss the mean cross-entropy in nats per token; inf when it overflows."""
    try:
        return math.exp(float(loss))
    except OverflowError:
        return math.inf


def bits_per_token(loss: float) -> float:
    """loss / ln 2: the mean cross-entropy in bits per token (bits per character for char LMs)."""
    return float(loss) / LN2


def bits_per_char(bits_per_token: float, tokens: int, chars: int) -> float:
    """Bits per character of an LM split: total nats over the split / (characters x ln 2), i.e.
    ``bits_per_token`` (the mean over the scored tokens) x ``tokens`` / ``chars``.

    ``tokens`` is the number of tokens the split's text encodes to and ``chars`` its number of
    characters (Unicode code points of the text as the task reads it: after tag stripping,
    newlines and spaces included, since the model predicts them too: as tokens, as word
    boundaries or as <eos>). The mean stands in for the few tokens evaluation does not score (the
    first one, which has no context, and the tail shorter than a block). This is the bits-per-byte
    convention of Gao et al. 2020 (The Pile) with characters for bytes, and it puts word, BPE and
    char models on one scale. A char tokenizer has one token per character, so it equals
    ``bits_per_token`` exactly. A word vocabulary maps unseen or capped-out words to <unk>, whose
    probability covers all of them at once: with <unk> in the split this understates the bits a
    model would need to spell those words out."""
    if tokens < 1 or chars < 1:
        raise ValueError(f"tokens={tokens}, chars={chars} is not allowed: both must be >= 1")
    return float(bits_per_token) * (tokens / chars)


def quality_lm(loss: float) -> float:
    """exp(-loss) = 1 / perplexity, in (0, 1]: geometric-mean probability of the correct token."""
    return math.exp(-float(loss))


def quality_translation(bleu: float) -> float:
    """BLEU / 100, in [0, 1]."""
    return float(bleu) / 100.0


def quality_per_active_param(quality: float, active_params: float) -> float:
    """quality / (active_params / 1e6): quality per million parameters active per token."""
    if active_params <= 0:
        raise ValueError(f"active_params={active_params} is not allowed: must be > 0")
    return float(quality) / (float(active_params) / 1e6)


def last_eval_max_violation(expert_stats: Sequence[dict] | None) -> float | None:
    """MaxVio (Wang et al. 2024: busiest expert's load / mean load - 1) of a run's last whole
    evaluation, averaged over its MoE layers (``expert_stats[N]["eval"]``); None without routing."""
    values = [v for v in ((layer.get("eval") or {}).get("max_violation") for layer in expert_stats or []
                          if isinstance(layer, dict)) if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


__all__ = [
    "bits_per_char", "bits_per_token", "corpus_bleu", "corpus_chrf", "last_eval_max_violation", "perplexity",
    "quality_lm", "quality_per_active_param", "quality_translation",
]
