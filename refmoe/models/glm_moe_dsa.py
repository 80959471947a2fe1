"""GLM-5 (GlmMoeDsaForCausalLM): DeepSeek-V3.2's architecture (MLA, DSA's lightning indexer,
noaux_tc routing, a shared expert, dense first layers) with GLM's two changes: the indexer
ropes its first dims as interleaved pairs, and only some layers run an indexer (`full` in
indexer_types); each `shared` layer attends to the positions the full layer before it chose,
and keeps no indexer cache. Everything is in deepseek_v32.py; here the family's name.
"""

from __future__ import annotations

from refmoe.models import deepseek_v32
from refmoe.models.decoder import smoke


class Transformer(deepseek_v32.Transformer):
    """The whole GLM-5 model (see DecoderModel.forward)."""


if __name__ == "__main__":  # smoke run: python -m refmoe.models.glm_moe_dsa MODEL_DIR
    smoke(Transformer)
