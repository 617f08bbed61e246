"""Analytic parameter and FLOP accounting, FLOP matching between families, budget conversion.

Conventions (also in the README):
- A multiply-add is 2 FLOPs. Forward FLOPs count every matmul a token takes part in: attention
  projections, attention scores and the weighted sum of values (the full T x T matrix: fused
  kernels compute it whole, causal or not), the dense FFN or the k experts a token is sent to, the
  router (and the noise projection of noisy top-k, which runs in training), LSTM gate matmuls,
  and the output projection. Embedding lookups, norms, softmaxes and activations are not counted
  (they are not matmuls; FlopCounterMode does not count them either). Kaplan et al. 2020 Table 1;
  PaLM (Chowdhery et al. 2022) appendix B for the 6N + attention form.
- Training FLOPs = 3 x forward (the backward pass costs two forward passes).
- "Executed" forward FLOPs are what a static-shape implementation runs: experts compute
  k * capacity_factor slots per token (padding included) instead of k.
- Translation FLOPs are per *target* token: a (source, target) pair of lengths S and T costs
  encoder(S) + decoder(T), divided by T.
- Active parameters: everything outside expert banks plus k experts per MoE layer (and its shared
  experts, which every token uses). Fine-grained experts (granularity G) are counted at their
  resolved shapes: E*G experts of width W/G, k*G of them active, a router of E*G x d_model.
  Hash routing (Roller et al. 2021) has no router: no router parameters or FLOPs. Expert choice
  (Zhou et al. 2022): each expert takes ceil(k * S / E * capacity_factor) of a group's S tokens,
  so a token is processed by k x capacity_factor experts *on average* (0..E each, no padding): its
  FLOPs and "active" parameters count k x capacity_factor experts (exact when E divides
  k * S * capacity_factor), with the training capacity factor.
  "no_embed" figures exclude token and position embeddings (tied output heads share them).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


from bench.models.config import ModelConfig


@dataclass
class Cost:
    total_params: int
    active_params: int
    embedding_params: int
    forward_flops_per_token: float
    executed_forward_flops_per_token: float
    seq_len: int
    src_len: int | None = None
    forward_breakdown: dict[str, float] = field(default_factory=dict)
    # Expert parallelism: values (of d_model-wide rows) one token's routed assignments put through
    # all-to-all per training step, over every MoE layer it passes: out to the experts and back
    # (2 x k x d_model) in the forward, and the same in the backward. An upper bound: dropped
    # assignments are not sent, and a rank keeps the share routed to its own experts ((M-1)/M leaves
    # it under balanced routing). bench/models/expert_parallel.py sends them in the compute dtype.
    all_to_all_values_per_token: float = 0.0

    def all_to_all_bytes_per_step(self, tokens_per_rank: int, bytes_per_value: int, expert_parallel: int) -> dict:
        """All-to-all bytes one rank sends per training step: the volume, and the part that
        leaves the rank under balanced routing."""
        volume = self.all_to_all_values_per_token * tokens_per_rank * bytes_per_value
        return {"volume": volume, "off_rank": volume * (expert_parallel - 1) / expert_parallel}

    @property
    def train_flops_per_token(self) -> float:
        return 3 * self.forward_flops_per_token

    @property
    def total_params_no_embed(self) -> int:
        return self.total_params - self.embedding_params

    @property
    def active_params_no_embed(self) -> int:
        return self.active_params - self.embedding_params

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(
            train_flops_per_token=self.train_flops_per_token,
            executed_train_flops_per_token=3 * self.executed_forward_flops_per_token,
            total_params_no_embed=self.total_params_no_embed,
            active_params_no_embed=self.active_params_no_embed,
        )
        return d


# ---------------------------------------------------------------------------------------------
# building blocks (per token, forward)


def _mixture_cost(cfg: ModelConfig, sparse: bool, causal: bool = True) -> tuple[dict[str, float], dict[str, float], int, int]:
    """FFN slot: (flops, executed flops, total params, active params). ``causal``: the slot sits in
    a causal stack (LM, decoder, LSTMs), whose router is ``moe.causal_router`` when set."""
    C, m = cfg.d_model, cfg.moe
    if not sparse:
        ffn_flops, ffn_params = 4 * C * cfg.d_ff, 2 * C * cfg.d_ff  # two matmuls C->f->C
        return {"ffn": ffn_flops}, {"ffn": ffn_flops}, ffn_params, ffn_params
    expert_flops, expert_params = 4 * C * cfg.expert_width, 2 * C * cfg.expert_width
    kind = m.router_for(causal)
    router_mats = {"noisy_topk": 2, "hash": 0}.get(kind, 1)  # W_g, plus W_noise for noisy top-k; hash: none
    # num_experts, top_k and expert_width are the resolved (fine-grained) ones: granularity G has
    # already made them E*G, k*G and W/G (config.split_experts), so the router counts E*G x C.
    router = router_mats * 2 * C * m.num_experts
    slots = m.top_k if m.capacity_factor is None else min(m.top_k * m.capacity_factor, m.num_experts)
    k = m.top_k
    if kind == "expert_choice":  # each expert takes ceil(k * S / E * cf) tokens: k * cf per token, no padding
        k = slots = min(m.top_k * m.capacity_factor, m.num_experts)
    flops = {"router": router, "experts": k * expert_flops}
    executed = {"router": router, "experts": slots * expert_flops}
    total = router_mats * C * m.num_experts + m.num_experts * expert_params
    active = total - (m.num_experts - k) * expert_params
    if m.shared_experts:  # DeepSeekMoE shared experts: every token, no capacity, all active
        shared = m.shared_experts * expert_flops
        flops["shared_experts"] = executed["shared_experts"] = shared
        total += m.shared_experts * expert_params
        active += m.shared_experts * expert_params
    return flops, executed, total, active


def _add(acc: dict[str, float], part: dict[str, float], times: float = 1.0) -> None:
    for k, v in part.items():
        acc[k] = acc.get(k, 0.0) + v * times


def _transformer(cfg: ModelConfig, seq_len: int, src_len: int | None, seq2seq: bool):
    C, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    ln = 2 * C
    fl, ex = {}, {}  # per target token (whole pair / T for seq2seq)
    total = active = 0
    T = seq_len
    S = src_len if src_len is not None else seq_len
    for i in range(L):
        sparse = cfg.is_moe_layer(i)
        mix, mix_ex, mix_total, mix_active = _mixture_cost(cfg, sparse)
        self_attn = {"attention": 8 * C * C + 4 * T * C}  # qkv + out proj; QK^T and AV over T keys
        block_params = 2 * ln + 4 * C * C
        if seq2seq:  # encoder block i, run by S source tokens, reported per target token
            enc_attn = {"attention": 8 * C * C + 4 * S * C}
            enc_mix, enc_mix_ex, enc_total, enc_active = _mixture_cost(cfg, sparse, causal=False)
            for part in (enc_attn, enc_mix):
                _add(fl, part, S / T)
            for part in (enc_attn, enc_mix_ex):
                _add(ex, part, S / T)
            total += block_params + enc_total
            active += block_params + enc_active
            # decoder cross-attention: q + out proj per target token, scores over S keys, and
            # the K/V projection of every source token
            cross = {"attention": 4 * C * C + 4 * S * C + 4 * C * C * S / T}
            _add(fl, cross)
            _add(ex, cross)
            block_params_dec = block_params + ln + 4 * C * C
        else:
            block_params_dec = block_params
        _add(fl, self_attn); _add(fl, mix)
        _add(ex, self_attn); _add(ex, mix_ex)
        total += block_params_dec + mix_total
        active += block_params_dec + mix_active
    embed = V * C + cfg.max_seq_len * C
    head = 0 if cfg.tie_embeddings else V * C
    final_ln = ln * (2 if seq2seq else 1)
    total += embed + head + final_ln
    active += embed + head + final_ln
    out = {"output": 2 * C * V}
    _add(fl, out); _add(ex, out)
    return fl, ex, total, active, embed


def _rnn(cfg: ModelConfig, seq_len: int, src_len: int | None, seq2seq: bool):
    C, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    T = seq_len
    S = src_len if src_len is not None else seq_len
    lstm_flops = 8 * C * (C + C)  # 4 gates, input and recurrent matmuls
    lstm_params = 4 * C * (C + C) + 8 * C  # weights + b_ih + b_hh
    mix, mix_ex, mix_total, mix_active = _mixture_cost(cfg, cfg.family == "moe-rnn")
    stack_fl = dict(mix, lstm=L * lstm_flops)
    stack_ex = dict(mix_ex, lstm=L * lstm_flops)
    stack_params = L * lstm_params
    fl, ex = {}, {}
    _add(fl, stack_fl); _add(ex, stack_ex)
    total = stack_params + mix_total
    active = stack_params + mix_active
    if seq2seq:
        _add(fl, stack_fl, S / T); _add(ex, stack_ex, S / T)
        total += stack_params + mix_total + 2 * C * C
        active += stack_params + mix_active + 2 * C * C
        attn = {"attention": 4 * S * C + 4 * C * C}  # scores + context over S, [h; ctx] -> C
        _add(fl, attn); _add(ex, attn)
    embed = V * C
    head = 0 if cfg.tie_embeddings else V * C
    total += embed + head
    active += embed + head
    out = {"output": 2 * C * V}
    _add(fl, out); _add(ex, out)
    return fl, ex, total, active, embed


def model_cost(cfg: ModelConfig, seq_len: int, task_type: str = "lm", src_len: int | None = None) -> Cost:
    """Parameters and per-token FLOPs of ``cfg`` at sequence length ``seq_len`` (target length
    for translation; ``src_len`` defaults to it)."""
    seq2seq = task_type == "translation"
    fn = _rnn if cfg.is_rnn else _transformer
    fl, ex, total, active, embed = fn(cfg, seq_len, src_len, seq2seq)
    # routed assignments per token over all MoE layers = expert FLOPs / one expert's (4 x C x W)
    assignments = fl.get("experts", 0.0) / (4 * cfg.d_model * cfg.expert_width) if cfg.is_sparse else 0.0
    return Cost(
        total_params=int(total), active_params=int(active), embedding_params=int(embed),
        forward_flops_per_token=float(sum(fl.values())),
        executed_forward_flops_per_token=float(sum(ex.values())),
        seq_len=seq_len, src_len=(src_len or seq_len) if seq2seq else None,
        forward_breakdown=fl,
        all_to_all_values_per_token=4 * assignments * cfg.d_model,
    )


# ---------------------------------------------------------------------------------------------
# measurement (the tests compare it with the analytic count)


def _lstm_layer_flops(input_shape, w_ih_shape, w_hh_shape, *args, out_shape=None, **kwargs) -> int:
    """aten.mkldnn_rnn_layer (CPU LSTM): 2 * tokens * (4h x in + 4h x h)."""
    tokens = math.prod(input_shape[:-1])
    return 2 * tokens * (w_ih_shape[0] * w_ih_shape[1] + w_hh_shape[0] * w_hh_shape[1])


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def measure_forward_flops(model, *inputs, **kwargs) -> int:
    """FLOPs of one forward pass as torch.utils.flop_counter.FlopCounterMode counts them.

    FlopCounterMode has no formula for the fused CPU kernels of LSTM and attention; these use
    torch's own SDPA formula and the LSTM gate matmuls, from the runtime tensor shapes. (torch is
    imported here, not at the top: the analytic counts above are plain arithmetic, and
    ``moe-bench flops`` starts in a fraction of a second without it.)"""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    formulas = {torch.ops.aten.mkldnn_rnn_layer: _lstm_layer_flops,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
        out = model(*inputs, **kwargs)
        getattr(out, "logits", None)  # a ModelOutput projects its logits on access: the output layer counts
    return counter.get_total_flops()
