"""Model families on one routing core. ``build_model(cfg, task_type)`` is the entry point.

The modules that build models import torch; they load on first use, so that reading configs
(``bench.models.config``: the CLI's --help, ``flops``, ``runs``) starts fast.
"""
from __future__ import annotations

from bench.models.config import FAMILIES, PRESETS, MoEConfig, ModelConfig, model_config

def build_model(cfg: ModelConfig, task_type: str = "lm"):
    """A plain ``nn.Module`` for ``cfg``: an LM (idx -> logits) or a seq2seq translation model."""
    from bench.models.rnn import RNNLM, RNNSeq2Seq
    from bench.models.transformer import TransformerLM, TransformerSeq2Seq

    if task_type == "lm":
        return RNNLM(cfg) if cfg.is_rnn else TransformerLM(cfg)
    if task_type == "translation":
        return RNNSeq2Seq(cfg) if cfg.is_rnn else TransformerSeq2Seq(cfg)
    raise ValueError(f"task type {task_type!r} is not allowed: expected 'lm' or 'translation' (bench.data.tasks)")


def __getattr__(name: str):
    if name == "ModelOutput":
        from bench.models.transformer import ModelOutput

        return ModelOutput
    raise AttributeError(f"module 'bench.models' has no attribute {name!r}")


__all__ = ["FAMILIES", "PRESETS", "MoEConfig", "ModelConfig", "ModelOutput", "build_model", "model_config"]
