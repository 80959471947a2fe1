"""Shared fixtures: every variant that is built and runs here, and quiet BLAS threads."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's own pool must not spin beside ours

import pytest  # noqa: E402

from refmoe import kernels  # noqa: E402

VARIANTS = kernels.available_variants()


@pytest.fixture(params=VARIANTS)
def variant(request) -> str:
    return request.param
