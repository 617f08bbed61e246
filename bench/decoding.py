"""Autoregressive decoding for the seq2seq translation models: greedy, beam search, ``translate``.

Both model classes are driven through ``_Seq2SeqAdapter`` (encode once, then one ``step`` per
output position), so the search code never branches on the architecture:

- ``TransformerSeq2Seq``: incremental, with a key/value cache (``TransformerSeq2Seq.decode(...,
  cache=)``): each step runs the decoder on the one new position, attending to the cached keys and
  values of the earlier ones; cross-attention projects the encoder output once. Decoding L tokens
  costs O(L) decoder token passes instead of O(L^2) for re-running the prefix (``kv_cache=False``).
  Same logits as the full-prefix recomputation (tested), except for MoE token dropping, where an
  eval capacity is counted over the step's tokens instead of the whole prefix. Speeds:
  ``moe-bench perf --only decoding`` and ``docs/performance.md``.
- ``RNNSeq2Seq``: one token per step; the LSTM (h, c) states are carried with ``state=``. The
  decoder starts from ``state=None``, as ``RNNSeq2Seq.forward`` does.

Conventions (fairseq-like): outputs are token ids *without* BOS, EOS or padding; PAD and BOS are
never generated (their log-probs are set to -inf, without renormalising); ``max_len`` counts
generated tokens including the EOS, and for transformers is capped at ``cfg.max_seq_len``
(the prefix fed to the decoder may not exceed the position table). A hypothesis that reaches
``max_len`` without EOS is returned as is.

Target masks: the prefix is passed with ``tgt_mask`` True for the inputs of hypotheses still
being extended (BOS and generated non-EOS tokens), False after EOS, matching the training
batches (``tgt_in`` never contains the final EOS). Only MoE routing reads it, so finished
hypotheses do not take expert capacity. With a capacity limit at eval
(``moe.eval_capacity_factor`` not None) token dropping depends on the other tokens in the batch,
so a switch/moe model's output can depend on batch composition; dropless routing removes that.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from bench.models.rnn import RNNSeq2Seq
from bench.models.transformer import TransformerSeq2Seq

NEG_INF = float("-inf")


class _Seq2SeqAdapter:
    """Uniform incremental interface over TransformerSeq2Seq and RNNSeq2Seq.

    ``start(src, src_mask)`` encodes once and returns the decoder state; ``step(state, tokens,
    mask)`` takes the full prefix ``tokens`` (N, t) (BOS first) and its mask and returns the
    log-probs of the next token (N, V) and the new state; ``reorder(state, index)`` selects /
    repeats rows (beam search). The state is a dict of tensors with the batch on dim 0, except
    the LSTM states (1, N, C) with the batch on dim 1.
    """

    def __init__(self, model: nn.Module, kv_cache: bool = True):
        model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: drive the module itself
        if isinstance(model, RNNSeq2Seq):
            self.kind = "rnn"
        elif isinstance(model, TransformerSeq2Seq):
            self.kind = "transformer"
        else:
            raise TypeError(f"cannot decode with {type(model).__name__}: expected TransformerSeq2Seq or RNNSeq2Seq")
        self.model = model
        self.kv_cache = kv_cache
        self.max_prefix = model.cfg.max_seq_len if self.kind == "transformer" else None

    def start(self, src: Tensor, src_mask: Tensor | None) -> dict:
        if self.kind == "rnn":
            memory, _, _ = self.model.encode(src, src_mask)
            return {"memory": memory, "src_mask": src_mask, "lstm": None}
        memory, _ = self.model.encode(src, src_mask)
        state = {"memory": memory, "src_mask": src_mask, "lstm": None}
        if self.kv_cache:
            state["cache"] = [{} for _ in self.model.decoder]
        return state

    def step(self, state: dict, tokens: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        if self.kind == "rnn":
            logits, _, finals = self.model.decode(state["memory"], state["src_mask"], tokens[:, -1:],
                                                  mask[:, -1:], state=state["lstm"])
            state = dict(state, lstm=finals)
        elif self.kv_cache:  # the new position only; keys/values of the earlier ones come from the cache
            logits, _ = self.model.decode(state["memory"], state["src_mask"], tokens[:, -1:], mask[:, -1:],
                                          cache=state["cache"])
        else:  # the whole prefix again, O(t) per step (a reference, and for benchmarks)
            logits, _ = self.model.decode(state["memory"], state["src_mask"], tokens, mask, last_only=True)
        return torch.log_softmax(logits[:, -1].float(), dim=-1), state

    @staticmethod
    def reorder(state: dict, index: Tensor) -> dict:
        out = {"memory": state["memory"].index_select(0, index),
               "src_mask": None if state["src_mask"] is None else state["src_mask"].index_select(0, index),
               "lstm": None}
        if state["lstm"] is not None:
            out["lstm"] = [tuple(s.index_select(1, index) for s in hc) for hc in state["lstm"]]
        if "cache" in state:  # per layer {"self"/"cross": {"k", "v"}}, batch on dim 0
            out["cache"] = [{part: {name: t.index_select(0, index) for name, t in kv.items()}
                             for part, kv in layer.items()} for layer in state["cache"]]
        return out


class _eval_no_grad:
    """model.eval() + torch.no_grad() for the block; restores the previous training flags."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        for m, mode in self.modes:
            m.training = mode
        return False


def _forbid(logp: Tensor, ids: Iterable[int | None]) -> Tensor:
    for i in ids:
        if i is not None and 0 <= i < logp.shape[-1]:
            logp[:, i] = NEG_INF
    return logp


def _strip(row: list[int], bos_id: int, eos_id: int, pad_id: int | None) -> list[int]:
    out = []
    for t in row:
        if t == eos_id:
            break
        if t != bos_id and t != pad_id:
            out.append(t)
    return out


def _check(src: Tensor, src_mask: Tensor | None, max_len: int, adapter: _Seq2SeqAdapter) -> int:
    if src.dim() != 2:
        raise ValueError(f"src must be (batch, src_len), got shape {tuple(src.shape)}")
    if src_mask is not None and src_mask.shape != src.shape:
        raise ValueError(f"src_mask shape {tuple(src_mask.shape)} != src shape {tuple(src.shape)}")
    if max_len < 1:
        raise ValueError(f"max_len={max_len} is not allowed: must be >= 1")
    return min(max_len, adapter.max_prefix) if adapter.max_prefix else max_len


def greedy_decode(model: nn.Module, src: Tensor, src_mask: Tensor | None, bos_id: int, eos_id: int,
                  max_len: int, pad_id: int = 0, kv_cache: bool = True) -> list[list[int]]:
    """Argmax decoding of a batch: y_t = argmax_v log p(v | y_<t, x), until EOS or ``max_len``.

    src: (B, S) ids, src_mask: (B, S) bool True = real token (None = no padding). Returns one
    id list per sentence, without BOS/EOS/PAD. Batched: one decoder call per step for all B.
    ``kv_cache=False`` re-runs a transformer decoder over the whole prefix at every step.
    """
    adapter = _Seq2SeqAdapter(model, kv_cache)
    max_len = _check(src, src_mask, max_len, adapter)
    B, device = src.shape[0], src.device
    if B == 0:
        return []
    with _eval_no_grad(model):
        state = adapter.start(src, src_mask)
        tokens = torch.full((B, 1), bos_id, dtype=torch.long, device=device)
        mask = torch.ones((B, 1), dtype=torch.bool, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_len):
            logp, state = adapter.step(state, tokens, mask)
            nxt = _forbid(logp, (pad_id, bos_id)).argmax(dim=-1)
            nxt = nxt.masked_fill(finished, pad_id)
            finished = finished | (nxt == eos_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            mask = torch.cat([mask, ~finished[:, None]], dim=1)
            if bool(finished.all()):
                break
    return [_strip(row, bos_id, eos_id, pad_id) for row in tokens[:, 1:].tolist()]


def gnmt_length_penalty(length: Tensor, alpha: float) -> Tensor:
    """GNMT (Wu et al. 2016, eq. 14): lp(Y) = ((5 + |Y|) / 6) ** alpha; alpha = 0 disables it."""
    return ((5.0 + length.float()) / 6.0) ** alpha


def beam_search(model: nn.Module, src: Tensor, src_mask: Tensor | None, bos_id: int, eos_id: int,
                max_len: int, beam_size: int = 4, length_penalty: float = 0.6,
                pad_id: int = 0, kv_cache: bool = True) -> list[list[int]]:
    """Beam search over (B * beam_size) rows; returns the best hypothesis per sentence.

    Beams are ranked by cumulative log-prob log p(y | x) while searching; a beam that emits EOS
    stays in the beam with its score frozen (its only continuation is PAD at log-prob 0). The
    search stops when every beam of every sentence has finished, or after ``max_len`` tokens.
    The returned hypothesis maximises log p(y | x) / lp(|y|) with the GNMT penalty
    lp = ((5 + |y|) / 6) ** length_penalty, |y| counting the EOS when there is one.
    beam_size=1 is greedy decoding. Larger beams usually, but not always, score above greedy:
    the greedy path can be pruned early (a search error). ``kv_cache`` as in ``greedy_decode``.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} is not allowed: must be >= 1")
    alpha = length_penalty
    adapter = _Seq2SeqAdapter(model, kv_cache)
    max_len = _check(src, src_mask, max_len, adapter)
    B, K, device = src.shape[0], beam_size, src.device
    N = B * K
    if B == 0:
        return []
    with _eval_no_grad(model):
        state = adapter.start(src, src_mask)
        state = adapter.reorder(state, torch.arange(B, device=device).repeat_interleave(K))
        tokens = torch.full((N, 1), bos_id, dtype=torch.long, device=device)
        mask = torch.ones((N, 1), dtype=torch.bool, device=device)
        scores = torch.zeros(B, K, device=device)
        scores[:, 1:] = NEG_INF  # all beams start identical: expand only the first
        finished = torch.zeros(B, K, dtype=torch.bool, device=device)
        lengths = torch.zeros(B, K, dtype=torch.long, device=device)
        base = (torch.arange(B, device=device) * K)[:, None]
        for _ in range(max_len):
            logp, state = adapter.step(state, tokens, mask)
            logp = _forbid(logp, (pad_id, bos_id))
            V = logp.shape[-1]
            logp = logp.view(B, K, V)
            frozen = torch.full((V,), NEG_INF, device=device)
            frozen[pad_id] = 0.0
            logp = torch.where(finished[..., None], frozen, logp)
            cand = (scores[..., None] + logp).view(B, K * V)
            scores, flat = cand.topk(K, dim=-1)  # (B, K)
            beam, tok = flat // V, flat % V
            rows = (base + beam).view(-1)
            tokens, mask = tokens.index_select(0, rows), mask.index_select(0, rows)
            state = adapter.reorder(state, rows)
            was_finished = finished.gather(1, beam)
            lengths = lengths.gather(1, beam) + (~was_finished).long()
            finished = was_finished | (tok == eos_id)
            tokens = torch.cat([tokens, tok.view(N, 1)], dim=1)
            mask = torch.cat([mask, ~finished.view(N, 1)], dim=1)
            if bool(finished.all()):
                break
        normed = scores / gnmt_length_penalty(lengths, alpha)  # -inf rows stay -inf
        best = (base[:, 0] + normed.argmax(dim=-1))
        out = tokens.index_select(0, best)[:, 1:].tolist()
    return [_strip(row, bos_id, eos_id, pad_id) for row in out]


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def translate(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], tokenizer, beam_size: int = 1,
              max_len: int | None = None, length_penalty: float = 0.6) -> list[str]:
    """Decode every batch dict (``src``, ``src_mask``) of a dataloader to detokenized strings, in order.

    beam_size=1 is greedy. max_len=None: 2 * S + 10 generated tokens for a batch of source
    length S (capped at the transformer's max_seq_len). Strings come from ``tokenizer.decode``.
    """
    device = _model_device(model)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    if bos is None or eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no bos/eos ids: translation needs both")
    out: list[str] = []
    for batch in batches:
        src = batch["src"].to(device)
        src_mask = batch.get("src_mask")
        src_mask = None if src_mask is None else src_mask.to(device)
        n = max_len if max_len is not None else 2 * src.shape[1] + 10
        if beam_size == 1:
            ids = greedy_decode(model, src, src_mask, bos, eos, n, pad_id=pad)
        else:
            ids = beam_search(model, src, src_mask, bos, eos, n, beam_size=beam_size,
                              length_penalty=length_penalty, pad_id=pad)
        out.extend(tokenizer.decode(row) for row in ids)
    return out


__all__ = ["beam_search", "gnmt_length_penalty", "greedy_decode", "translate"]
