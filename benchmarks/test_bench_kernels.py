"""pytest-benchmark suite: `python -m pytest benchmarks` (not part of the test run).

Each benchmark times one pass of the kernel over > 100 MB of distinct weight copies, and stores
in extra_info the weight GB/s, the plain-read GB/s of the same bytes with the same threads
measured in the same test, and their ratio.
"""

import statistics
import time
from types import SimpleNamespace

import numpy as np
import pytest

from refmoe import cpu, kernels
from refmoe.bench import MIN_BYTES, _copies, _make

THREADS = cpu.default_threads()


def _read_gbps(bufs, reps=5):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for b in bufs:
            kernels.read_bandwidth_probe(b, num_threads=THREADS)
        times.append(time.perf_counter() - t0)
    return sum(b.nbytes for b in bufs) / statistics.median(times) / 1e9


def _run(benchmark, fmt, n, k, m):
    base = _make(fmt, n, k)
    nbytes = sum(a.nbytes for a in base)
    copies = _copies(base, max(2, -(-MIN_BYTES // nbytes)))
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    call = {
        "fp8": lambda w: kernels.fp8_gemm(x, *w, num_threads=THREADS),
        "int4": lambda w: kernels.int4_gemm(x, *w, num_threads=THREADS),
        "bf16": lambda w: kernels.bf16_gemm(x, *w, num_threads=THREADS),
    }[fmt]
    bufs = [a.reshape(-1).view(np.uint8) for w in copies for a in w]
    read = _read_gbps(bufs)
    benchmark.pedantic(lambda: [call(w) for w in copies], rounds=5, warmup_rounds=1)
    per = benchmark.stats.stats.median / len(copies)
    gbps = nbytes / per / 1e9
    benchmark.extra_info.update(
        variant=kernels.variant(),
        threads=THREADS,
        gbps=gbps,
        limit_gbps=read,
        ratio=gbps / read,
        gflops=2 * m * n * k / per / 1e9,
    )


@pytest.mark.parametrize("n, k", [(2048, 7168), (7168, 2048), (1536, 4096), (4096, 1536)])
def test_fp8_gemv(benchmark, n, k):
    _run(benchmark, "fp8", n, k, 1)


@pytest.mark.parametrize("n, k", [(2048, 7168), (7168, 2048)])
def test_fp8_gemm_m32(benchmark, n, k):
    _run(benchmark, "fp8", n, k, 32)
    benchmark.extra_info["fma_peak_gflops"] = kernels.fma_peak_gflops(num_threads=THREADS)


@pytest.mark.parametrize("fmt", ["int4", "bf16"])
def test_other_formats_gemv(benchmark, fmt):
    _run(benchmark, fmt, 2048, 7168, 1)


def test_torch_fp8_baseline(benchmark):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(THREADS)
    codes, s = _make("fp8", 2048, 7168)
    wt = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    full = (
        torch.from_numpy(s).to(torch.bfloat16).repeat_interleave(128, 0).repeat_interleave(128, 1)
    )
    x = torch.ones(1, 7168, dtype=torch.bfloat16)
    benchmark.pedantic(lambda: x @ (wt.to(torch.bfloat16) * full).T, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("path", ["fp8_heads", "float32_bmm"])
def test_absorbed_mla_kv_b(benchmark, path):
    """One absorbed MLA decode step's kv_b work at DeepSeek-V3's size (128 heads, key and
    value halves of 128 x 512, one token): every head's W_uk^T q and W_uv o, through the FP8
    per-head kernel (17 MB read) or float32 bmm on the dequantized halves (67 MB), over
    distinct copies of the layer. extra_info: the step's time per layer, kv_b's FP8 bytes per
    second of it and the plain-read GB/s of the same copies; compare the two paths' medians."""
    import torch

    from refmoe.models.deepseek_v3 import Absorbed
    from refmoe.models.layers import Linear

    torch.set_num_threads(THREADS)
    n, half, lora = 128, 128, 512
    cfg = SimpleNamespace(
        num_attention_heads=n, qk_nope_head_dim=half, v_head_dim=half, kv_lora_rank=lora
    )
    codes, s = _make("fp8", n * 2 * half, lora)
    weight_bytes = codes.nbytes * (1 if path == "fp8_heads" else 4)
    layers = []
    for i in range(max(2, -(-MIN_BYTES // weight_bytes))):
        kv_b = Linear.__new__(Linear)
        kv_b.n, kv_b.k, kv_b.weight = n * 2 * half, lora, None
        kv_b.codes, kv_b.scale = np.roll(codes, i, axis=0), s
        if path == "float32_bmm":
            kv_b.weight, kv_b.codes, kv_b.scale = kv_b.dense(), None, None
        layers.append(Absorbed(kv_b, cfg))
        assert layers[-1].fp8 == (path == "fp8_heads")
    q, o = torch.randn(n, 1, half), torch.randn(n, 1, lora)
    read = _read_gbps([np.roll(codes, i, axis=0).reshape(-1) for i in range(7)])
    benchmark.pedantic(
        lambda: [(a.keys(q), a.values(o)) for a in layers], rounds=5, warmup_rounds=1
    )
    per = benchmark.stats.stats.median / len(layers)
    benchmark.extra_info.update(
        variant=kernels.variant(),
        threads=THREADS,
        path=path,
        ms_per_layer=per * 1e3,
        fp8_gbps=codes.nbytes / per / 1e9,
        limit_gbps=read,
    )
