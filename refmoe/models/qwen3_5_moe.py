"""Qwen3.5-MoE and Qwen3.6-MoE (Qwen3_5MoeForConditionalGeneration as released,
Qwen3_5MoeForCausalLM as transformers saves its text model): Qwen3-Next's layers (three Gated
DeltaNet layers to one gated full-attention layer, (1 + w) norms, a softmax router and a
sigmoid-gated shared expert) with three differences in what is stored, none in what is computed:

- a linear layer's input projections are four plain matrices, in_proj_qkv [2 hk dk + hv dv, H]
  (q, k, v each head after head: already the convolution's channel order), in_proj_z
  [hv dv, H], in_proj_b and in_proj_a [hv, H], where Qwen3-Next interleaves them per key head;
- the release keeps the language model under model.language_model. beside a vision tower
  (model.visual.*, not loaded) and an MTP head (mtp.*, loaded by nothing until speculative
  decoding exists); config.json nests the text model's fields under text_config;
- the routed experts are stacked, experts.gate_up_proj [E, 2I, H] and experts.down_proj
  [E, H, I] (experts.read_stacked: views of the file), where save_pretrained writes them one by
  one; both are read.

The router always normalizes its top-k weights (the config has no norm_topk_prob). The rope is
multimodal (mrope_section splits the rotary pairs among time, height and width positions); for
text every section takes the token's own position, which is the plain partial rope Qwen3-Next
uses. Legend: T = tokens, H = hidden, hk / hv = key / value heads, dk / dv = their widths.
"""

from __future__ import annotations

import torch

from refmoe.checkpoint import Checkpoint
from refmoe.models import qwen3_next
from refmoe.models.decoder import smoke
from refmoe.models.layers import Linear, project

RELEASED_PREFIX = "model.language_model."  # where the release keeps the text model


class GatedDeltaNet(qwen3_next.GatedDeltaNet):
    """Qwen3-Next's linear attention over Qwen3.5's four input projections."""

    def load_projections(self, ck: Checkpoint, p: str, h: int) -> None:
        hv, dv = self.hv, self.dv
        self.qkv = Linear(ck, f"{p}.in_proj_qkv.weight", (self.channels, h))
        self.z = Linear(ck, f"{p}.in_proj_z.weight", (hv * dv, h))
        self.b = Linear(ck, f"{p}.in_proj_b.weight", (hv, h))
        self.a = Linear(ck, f"{p}.in_proj_a.weight", (hv, h))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, H] -> q|k|v [T, C] (in the convolution's order as stored), z [T, hv, dv],
        b and a [T, hv]."""
        t = x.shape[0]
        qkv, z, b, a = project(x, [self.qkv, self.z, self.b, self.a])
        return qkv, z.view(t, self.hv, self.dv), b, a


class Transformer(qwen3_next.Transformer):
    """The whole Qwen3.5-MoE text model (see DecoderModel.forward)."""

    linear = GatedDeltaNet

    def __init__(self, ck: Checkpoint, cfg, *args, **kwargs):
        ck.alias(RELEASED_PREFIX, "model.")  # the release's names; save_pretrained's need none
        super().__init__(ck, cfg, *args, **kwargs)


if __name__ == "__main__":  # smoke run: python -m refmoe.models.qwen3_5_moe MODEL_DIR
    smoke(Transformer)
