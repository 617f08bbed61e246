"""Pre-LN Transformers: a causal decoder-only LM and an encoder-decoder for translation.

Families ``dense``, ``switch`` and ``moe`` are this one file: every ``moe_every``-th FFN slot is an
``MoELayer`` (top-1 switch or top-k) instead of a dense ``FeedForward``. Plain torch, no Lightning.
Shapes: B batch, T target/sequence length, S source length, C = d_model, nh heads, hs head size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.config import ModelConfig
from bench.models.experts import compute_dtype
from bench.models.moe import FeedForward, MoEAux, MoELayer, trunc_normal_


@dataclass
class ModelOutput:
    hidden: Tensor  # (B, T, C): the output layer's input
    head: nn.Linear  # the output layer (logits = head(hidden))
    aux_loss: Tensor  # weighted sum of every MoE layer's auxiliary losses (0 for dense models)
    moe_stats: list[dict[str, Tensor]] = field(default_factory=list)  # one dict per MoE layer

    @property
    def logits(self) -> Tensor:
        """(B, T, vocab), computed at each access. The loss never asks for them: it projects the
        hidden states in row chunks (bench.train.loss), since B x T x vocab floats can be gigabytes."""
        return self.head(self.hidden)


def collect_aux(auxes: list[MoEAux], like: Tensor) -> tuple[Tensor, list[dict[str, Tensor]]]:
    total = like.new_zeros((), dtype=torch.float32)
    for a in auxes:
        total = total + a.loss
    return total, [a.stats for a in auxes]


# On CPUs, PyTorch's bf16 flash-attention kernel has a large fixed cost per (batch, head): measured
# here (one thread, forward+backward, 4 heads of 64), 64 x 16 tokens took 20 ms in bf16 vs 3.7 ms
# in fp32 (casts included), 16 x 128 tokens 29 vs 13 ms; from 256 tokens bf16 is faster (42 vs
# 48 ms). Short sequences (translation batches, decoding steps) therefore attend in fp32.
CPU_FP32_ATTENTION_MAX_LEN = 128


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
              dropout_p: float) -> Tensor:
    """scaled_dot_product_attention, in fp32 for short reduced-precision sequences on CPU (see above)."""
    short = max(q.shape[-2], k.shape[-2]) <= CPU_FP32_ATTENTION_MAX_LEN
    dtype = compute_dtype(q)
    if q.device.type == "cpu" and short and dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs straight back
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                               is_causal=is_causal, dropout_p=dropout_p)
        return y.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``memory`` is None, else cross-attention."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        C = cfg.d_model
        self.n_heads = cfg.n_heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(C, C, bias=False)
            self.kv = nn.Linear(C, 2 * C, bias=False)
        else:
            self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)
        self.dropout = cfg.dropout
        for lin in self.modules():
            if isinstance(lin, nn.Linear):
                trunc_normal_(lin.weight, lin.in_features, cfg.init_scale)

    def forward(self, x: Tensor, memory: Tensor | None = None, causal: bool = False,
                key_mask: Tensor | None = None, cache: dict[str, Tensor] | None = None) -> Tensor:
        """``cache`` (incremental decoding): a dict this layer fills with its keys/values. Self-attention
        appends the new positions' k/v (after the first call, one position per call, attending to
        every cached one); cross-attention projects ``memory`` once and reuses it."""
        B, T, C = x.shape
        nh, hs = self.n_heads, C // self.n_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(B, -1, nh, hs).transpose(1, 2)  # (B, nh, L, hs)

        cached = cache is not None and "k" in cache  # an incremental step after the first
        if self.cross:
            q = self.q(x)
            k, v = (cache["k"], cache["v"]) if cached else map(heads, self.kv(memory).split(C, dim=-1))
        else:
            q, k, v = self.qkv(x).split(C, dim=-1)
            k, v = heads(k), heads(v)
            if cached:
                if T != 1:
                    raise ValueError(f"incremental decoding feeds one position per step after the first, got {T}")
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                causal = False  # the one new query may attend to every cached position
        if cache is not None:
            cache["k"], cache["v"] = k, v
        q = heads(q)  # (B, nh, T, hs)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S) True = attend
        y = attention(q, k, v, attn_mask, causal and attn_mask is None, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LN block: x + Attn(LN(x)) [+ CrossAttn(LN(x), memory)] + FFN-or-MoE(LN(x))."""

    def __init__(self, cfg: ModelConfig, moe: bool, cross: bool = False, causal: bool = True):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln_cross = nn.LayerNorm(cfg.d_model) if cross else None
        self.cross = Attention(cfg, cross=True) if cross else None
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        if moe:
            self.ffn = MoELayer(cfg.d_model, cfg.expert_width, cfg.moe, cfg.activation, cfg.init_scale, causal=causal,
                                vocab_size=cfg.vocab_size)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout, cfg.init_scale)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, causal: bool, mask: Tensor | None = None, memory: Tensor | None = None,
                memory_mask: Tensor | None = None, cache: dict[str, dict[str, Tensor]] | None = None,
                token_ids: Tensor | None = None) -> tuple[Tensor, MoEAux | None]:
        """``cache``: incremental decoding state of this block ({"self": ..., "cross": ...}, filled here).
        ``token_ids`` (B, T): the stack's input ids, for hash routing."""
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        x = x + self.drop(self.attn(self.ln_attn(x), causal=causal, key_mask=None if causal else mask,
                                    cache=self_cache))
        if self.cross is not None:
            x = x + self.drop(self.cross(self.ln_cross(x), memory=memory, key_mask=memory_mask, cache=cross_cache))
        h = self.ln_ffn(x)
        aux = None
        if isinstance(self.ffn, MoELayer):
            h, aux = self.ffn(h, mask=mask, token_ids=token_ids)
        else:
            h = self.ffn(h)
        return x + self.drop(h), aux


class Embedding(nn.Module):
    """Token + learned position embeddings (GPT-2 style), std 0.02."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.max_len = cfg.max_seq_len

    def forward(self, idx: Tensor, offset: int = 0) -> Tensor:
        """``offset``: position of idx[:, 0] (incremental decoding feeds positions offset, offset+1, ...)."""
        T = idx.shape[1]
        if offset + T > self.max_len:
            raise ValueError(f"sequence length {offset + T} exceeds max_seq_len={self.max_len}")
        return self.drop(self.tok(idx) + self.pos(torch.arange(offset, offset + T, device=idx.device)))  # (B, T, C)


def output_head(cfg: ModelConfig, emb: nn.Embedding) -> nn.Linear:
    head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    if cfg.tie_embeddings:
        head.weight = emb.weight
    else:
        trunc_normal_(head.weight, cfg.d_model, cfg.init_scale)
    return head


class TransformerLM(nn.Module):
    """Causal decoder-only LM. forward(idx (B, T)) -> ModelOutput: hidden (B, T, C), logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, moe=cfg.is_moe_layer(i)) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = output_head(cfg, self.embed.tok)

    def forward(self, idx: Tensor) -> ModelOutput:
        x = self.embed(idx)
        auxes = []
        for block in self.blocks:
            x, aux = block(x, causal=True, token_ids=idx)
            if aux is not None:
                auxes.append(aux)
        hidden = self.ln_f(x)
        aux_loss, stats = collect_aux(auxes, hidden)
        return ModelOutput(hidden, self.head, aux_loss, stats)


class TransformerSeq2Seq(nn.Module):
    """Encoder-decoder (Vaswani et al. 2017, pre-LN) with one shared joint-vocabulary embedding.

    forward(src (B, S), tgt_in (B, T), src_mask (B, S) bool True = real token, tgt_mask (B, T))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.encoder = nn.ModuleList(Block(cfg, moe=cfg.is_moe_layer(i), causal=False) for i in range(cfg.n_layers))
        self.ln_enc = nn.LayerNorm(cfg.d_model)
        self.decoder = nn.ModuleList(Block(cfg, moe=cfg.is_moe_layer(i), cross=True) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = output_head(cfg, self.embed.tok)

    def encode(self, src: Tensor, src_mask: Tensor | None) -> tuple[Tensor, list[MoEAux]]:
        x = self.embed(src)
        auxes = []
        for block in self.encoder:
            x, aux = block(x, causal=False, mask=src_mask, token_ids=src)
            if aux is not None:
                auxes.append(aux)
        return self.ln_enc(x), auxes

    def decode(self, memory: Tensor, src_mask: Tensor | None, tgt_in: Tensor,
               tgt_mask: Tensor | None = None, last_only: bool = False,
               cache: list[dict] | None = None) -> tuple[Tensor, list[MoEAux]]:
        """Decoder logits (B, T, vocab); ``last_only`` projects only the last position (B, 1,
        vocab), which is all step-by-step decoding needs (the vocab projection is its largest matmul).

        ``cache`` (incremental decoding, see ``bench.decoding``): one dict per decoder layer, e.g.
        ``[{} for _ in model.decoder]`` before the first call; each call then feeds only the new
        position(s) ``tgt_in`` and ``tgt_mask`` and extends the cache. Same logits as re-running
        the whole prefix, except that MoE capacity is then counted over the new tokens only."""
        hidden, auxes = self.decode_hidden(memory, src_mask, tgt_in, tgt_mask, cache)
        if last_only:
            hidden = hidden[:, -1:]
        return self.head(hidden), auxes

    def decode_hidden(self, memory: Tensor, src_mask: Tensor | None, tgt_in: Tensor,
                      tgt_mask: Tensor | None = None,
                      cache: list[dict] | None = None) -> tuple[Tensor, list[MoEAux]]:
        """The output layer's input (B, T, C): ``decode`` before the vocab projection."""
        offset = 0
        if cache is not None:
            if len(cache) != len(self.decoder):
                raise ValueError(f"cache has {len(cache)} layers, the decoder {len(self.decoder)}")
            past = cache[0].get("self", {}).get("k")
            offset = 0 if past is None else past.shape[2]
        x = self.embed(tgt_in, offset)
        auxes = []
        for i, block in enumerate(self.decoder):
            x, aux = block(x, causal=True, mask=tgt_mask, memory=memory, memory_mask=src_mask,
                           cache=None if cache is None else cache[i], token_ids=tgt_in)
            if aux is not None:
                auxes.append(aux)
        return self.ln_f(x), auxes

    def forward(self, src: Tensor, tgt_in: Tensor, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None) -> ModelOutput:
        memory, enc_aux = self.encode(src, src_mask)
        hidden, dec_aux = self.decode_hidden(memory, src_mask, tgt_in, tgt_mask)
        aux_loss, stats = collect_aux(enc_aux + dec_aux, hidden)
        return ModelOutput(hidden, self.head, aux_loss, stats)
