"""MiniMax-M2 / M2.x (MiniMaxM2ForCausalLM): grouped-query attention with q/k RMSNorm over all
heads at once (one weight of n*d, and of g*d, not one per head) and partial rotary (rotary_dim
of head_dim); every layer MoE, 256 experts top-8 by sigmoid with a correction bias (kept beside
the router, block_sparse_moe.e_score_correction_bias), weights normalized over the chosen ones;
no shared expert; experts named w1 (gate), w3 (up), w2 (down). FP8 128x128 releases.

The attention (gqa.py), router, MoE block, norms and loading are shared; here: the
Transformer, its tensor names and a smoke run.
"""

from __future__ import annotations

from refmoe.models import gqa
from refmoe.models.decoder import smoke
from refmoe.models.experts import MINIMAX


class Transformer(gqa.Transformer):
    """The whole MiniMax-M2 model (see DecoderModel.forward)."""

    ffn = "block_sparse_moe"
    names = MINIMAX


if __name__ == "__main__":  # smoke run: python -m refmoe.models.minimax_m2 MODEL_DIR
    smoke(Transformer)
