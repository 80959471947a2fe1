"""GLM-4.5 / 4.6 / 4.7 and -Air (Glm4MoeForCausalLM): grouped-query attention with q/k/v
biases, partial rotary (rotate-half on the first half of each head) and, where use_qk_norm,
per-head q/k RMSNorm; the first first_k_dense_replace layers dense; DeepSeek-V3's router
(sigmoid, correction bias, groups, routed_scaling_factor) and its shared expert, under the same
tensor names. The multi-token-prediction layer the releases append (num_nextn_predict_layers,
layer num_hidden_layers) is not read.

The attention (gqa.py), router, MoE block, MLP, norms and loading are shared; here: the
Transformer and a smoke run.
"""

from __future__ import annotations

from refmoe.models import gqa
from refmoe.models.decoder import smoke


class Transformer(gqa.Transformer):
    """The whole GLM-4.5 model (see DecoderModel.forward)."""


if __name__ == "__main__":  # smoke run: python -m refmoe.models.glm4_moe MODEL_DIR
    smoke(Transformer)
