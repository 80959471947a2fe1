"""gpt-oss (GptOssForCausalLM; gpt-oss-20b and -120b): grouped-query attention with biases on
q/k/v/o and a learned sink per head (one more logit in every softmax's denominator), layers
alternating between a 128-token sliding window and full attention (layer_types), YaRN rope;
every layer MoE: the router's linear has a bias, the top-k logits are softmaxed among
themselves; experts with biases and a clamped SwiGLU ((up + 1) * gate * sigmoid(1.702 gate),
gate clamped above at 7, up to [-7, 7]), stored fused: MXFP4 experts.gate_up_proj_blocks /
_scales with gate and up interleaved by rows (as released), or float gate_up_proj [E, H, 2I]
(as transformers saves it).

The attention (gqa.py), router, MoE block, norms and loading are shared; here: the
Transformer, its tensor names and a smoke run.
"""

from __future__ import annotations

from refmoe.models import gqa
from refmoe.models.decoder import smoke
from refmoe.models.experts import GPT_OSS


class Transformer(gqa.Transformer):
    """The whole gpt-oss model (see DecoderModel.forward)."""

    names = GPT_OSS


if __name__ == "__main__":  # smoke run: python -m refmoe.models.gpt_oss MODEL_DIR
    smoke(Transformer)
