"""Shared fixtures: every variant that is built and runs here, and quiet BLAS threads."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's own pool must not spin beside ours

import pytest  # noqa: E402

from refmoe import kernels  # noqa: E402

VARIANTS = kernels.available_variants()


@pytest.fixture(params=VARIANTS)
def variant(request) -> str:
    return request.param


def randomize_bf16(model, bias_buffers=()) -> None:
    """Fill a transformers model with N(0, 0.2) weights (norms around 1), rounded to bf16 values
    so refmoe's bf16 expert kernels see exactly the weights transformers uses; buffers whose
    name contains one of bias_buffers get N(0, 0.1)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            v = torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0)
            p.copy_(v.to(torch.bfloat16).float())
        for name, b in model.named_buffers():
            if any(key in name for key in bias_buffers):
                b.copy_(torch.randn_like(b) * 0.1)
