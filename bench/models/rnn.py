"""LSTM models with a mixture of experts between LSTM layers (Shazeer et al. 2017).

``moe-rnn``: embedding -> LSTM -> [x + dropout(MoE(x))] -> LSTM ... -> output, noisy top-k
gating (k = 4 by default), no capacity limit. ``lstm``: the same network with the MoE replaced
by a dense FFN of equal forward FLOPs (see ``bench.models.config.match_lstm_to_moe_rnn``), the
compute-matched control. Translation: an LSTM encoder-decoder with dot-product attention
(Luong et al. 2015) and the MoE block between the first and second LSTM of each stack.
Shapes: B batch, T target length, S source length, C = d_model.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.models.config import ModelConfig
from bench.models.moe import FeedForward, MoEAux, MoELayer, trunc_normal_
from bench.models.transformer import ModelOutput, collect_aux, output_head


class MixtureBlock(nn.Module):
    """x + dropout(MoE(x)) for moe-rnn, x + dropout(FFN(x)) for the lstm control."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family == "moe-rnn":
            self.ffn = MoELayer(cfg.d_model, cfg.expert_width, cfg.moe, cfg.activation, cfg.init_scale, causal=True)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, 0.0, cfg.init_scale)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, MoEAux | None]:
        if isinstance(self.ffn, MoELayer):
            h, aux = self.ffn(x, mask=mask)
            return x + self.drop(h), aux
        return x + self.drop(self.ffn(x)), None


class LSTMStack(nn.Module):
    """LSTM layer 1 -> mixture block -> LSTM layers 2..n, dropout between layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.d_model
        self.first = nn.LSTM(C, C, batch_first=True)
        self.mixture = MixtureBlock(cfg)
        self.rest = nn.ModuleList(nn.LSTM(C, C, batch_first=True) for _ in range(cfg.n_layers - 1))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, state: list | None = None):
        """x: (B, T, C) -> (B, T, C), aux, final (h, c) of every LSTM layer."""
        state = state or [None] * (1 + len(self.rest))
        x, s0 = self.first(x, state[0])
        x, aux = self.mixture(self.drop(x), mask)
        finals = [s0]
        for lstm, s in zip(self.rest, state[1:]):
            x, s = lstm(self.drop(x), s)
            finals.append(s)
        return self.drop(x), aux, finals


def _embedding(cfg: ModelConfig) -> nn.Embedding:
    """Uniform(-0.1, 0.1), the usual LSTM-LM init (Zaremba et al. 2014; Merity et al. 2018).

    The transformers' N(0, 0.02) sits in front of a LayerNorm; an LSTM has none, and with the
    tied output layer such small embeddings make both its inputs and its logits tiny: measured
    on Tiny Shakespeare (tiny preset, 2 seeds), the lstm control then sat at the unigram loss
    (3.34) for 200-380+ steps, while with this init it is at 3.22 after 50 steps and 2.54
    after 255."""
    emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
    nn.init.uniform_(emb.weight, -0.1, 0.1)
    return emb


class RNNLM(nn.Module):
    """forward(idx (B, T)) -> ModelOutput: hidden (B, T, C), logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = _embedding(cfg)
        self.stack = LSTMStack(cfg)
        self.head = output_head(cfg, self.embed)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: Tensor) -> ModelOutput:
        x, aux, _ = self.stack(self.drop(self.embed(idx)))
        aux_loss, stats = collect_aux([aux] if aux else [], x)
        return ModelOutput(x, self.head, aux_loss, stats)


class RNNSeq2Seq(nn.Module):
    """LSTM encoder-decoder; the decoder attends (dot product) from its top layer to the encoder
    outputs before the output layer. The decoder starts from a zero state, not the encoder's
    final state: with right-padded batches that state would have run over the padding, while
    the masked attention sees exactly the real source tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.d_model
        self.embed = _embedding(cfg)
        self.encoder = LSTMStack(cfg)
        self.decoder = LSTMStack(cfg)
        self.attn_out = nn.Linear(2 * C, C, bias=False)  # [h; context] -> C (Luong eq. 5)
        trunc_normal_(self.attn_out.weight, 2 * C, cfg.init_scale)
        self.head = output_head(cfg, self.embed)
        self.drop = nn.Dropout(cfg.dropout)

    def encode(self, src: Tensor, src_mask: Tensor | None):
        memory, aux, finals = self.encoder(self.drop(self.embed(src)), src_mask)
        return memory, [aux] if aux else [], finals

    def decode(self, memory: Tensor, src_mask: Tensor | None, tgt_in: Tensor, tgt_mask: Tensor | None = None,
               state: list | None = None):
        """(logits (B, T, vocab), aux, final LSTM states)."""
        hidden, aux, finals = self.decode_hidden(memory, src_mask, tgt_in, tgt_mask, state)
        return self.head(hidden), aux, finals

    def decode_hidden(self, memory: Tensor, src_mask: Tensor | None, tgt_in: Tensor,
                      tgt_mask: Tensor | None = None, state: list | None = None):
        """``decode`` before the vocab projection: the output layer's input (B, T, C)."""
        h, aux, finals = self.decoder(self.drop(self.embed(tgt_in)), tgt_mask, state)
        scores = torch.bmm(h, memory.transpose(1, 2))  # (B, T, S)
        if src_mask is not None:
            scores = scores.masked_fill(~src_mask[:, None, :], float("-inf"))
        context = torch.bmm(scores.softmax(dim=-1), memory)  # (B, T, C)
        out = torch.tanh(self.attn_out(torch.cat([h, context], dim=-1)))
        return self.drop(out), [aux] if aux else [], finals

    def forward(self, src: Tensor, tgt_in: Tensor, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None) -> ModelOutput:
        memory, enc_aux, _ = self.encode(src, src_mask)
        hidden, dec_aux, _ = self.decode_hidden(memory, src_mask, tgt_in, tgt_mask)
        aux_loss, stats = collect_aux(enc_aux + dec_aux, hidden)
        return ModelOutput(hidden, self.head, aux_loss, stats)
