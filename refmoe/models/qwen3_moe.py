"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): grouped-query attention with per-head q/k
RMSNorm, rotate-half rope, softmax top-k routing (norm_topk_prob), no shared expert.

The attention (gqa.py), router, MoE block, MLP, norms and loading are shared; here: the
Transformer and a smoke run.
"""

from __future__ import annotations

from refmoe.models import gqa
from refmoe.models.decoder import smoke


class Transformer(gqa.Transformer):
    """The whole Qwen3-MoE model (see DecoderModel.forward)."""


if __name__ == "__main__":  # smoke run: python -m refmoe.models.qwen3_moe MODEL_DIR
    smoke(Transformer)
