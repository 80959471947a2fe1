"""One file per architecture family; load() picks it from config.json."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig


def load(
    model_dir: str | Path,
    expert_dtype: str | None = None,
    num_threads: int | None = None,
    progress=None,
    device: str = "cpu",
):
    """(ModelConfig, model) for a Hugging Face model directory. device: where attention and
    dense layers run (auto, cpu, cuda); routed experts always run on the CPU kernels."""
    cfg = ModelConfig.from_file(model_dir)
    ck = Checkpoint(model_dir)
    ck.check_fits(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    family = importlib.import_module(f"refmoe.models.{cfg.family}")
    model = family.Transformer(ck, cfg, expert_dtype, num_threads, progress, device)
    if model.device.type == "cuda":
        # the one host copy of the routed experts, packed once into pinned memory: what SLP
        # streams from (async copies need pinned pages) and the CPU kernels read
        from refmoe.expert_store import pack_model

        pack_model(model, pin=True)
    return cfg, model
