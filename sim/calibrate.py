"""`refmoe-sim calibrate`: this machine's profile from the engine's own micro-benchmarks (read
bandwidth, FP8 GEMV hot and cold, FMA peak, per-call overheads), never from end-to-end traces,
so that traces stay an honest test of the model."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from refmoe import cpu, kernels
from refmoe.bench import Shape, bench_gemm, bench_moe_layer
from refmoe.kernels import formats
from sim.hardware import CPU, Hardware


def _times(fn, reps: int) -> list[float]:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def gemv_ceiling_gbps(reps: int = 15, samples: list | None = None, calls: int = 20) -> float:
    """One core's FP8 GEMV rate on an L2-resident matrix (the conversion ceiling), with the
    fixed per-call cost removed by timing two sizes: each rep times `calls` calls of each size
    back to back, giving one sample (into `samples`); the result is their median."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 7168)).astype(np.float32)
    c1, s1 = formats.fp8_quantize(rng.standard_normal((32, 7168)))
    c2, s2 = np.concatenate([c1, c1]), np.concatenate([s1, s1])[:1]

    def timed(c, sc) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            kernels.fp8_gemm(x, c, sc, num_threads=1)
        return time.perf_counter() - t0

    timed(c1, s1), timed(c2, s2)
    got = []
    for _ in range(reps):
        t1, t2 = timed(c1, s1), timed(c2, s2)
        if t2 > t1:  # a rep disturbed so that the bigger call ran faster says nothing
            got.append(calls * c1.nbytes / (t2 - t1) / 1e9)
    if not got:
        raise RuntimeError("the GEMV ceiling could not be timed: every rep was disturbed")
    if samples is not None:
        samples.extend(got)
    return statistics.median(got)


# a small MLA block (hidden 1024, 8 heads, 1.4 MB of FP8 projections): its decode step is
# almost all fixed cost (norms, rope, the small ops, torch), which V3's 187 MB hide
SMALL_ATTENTION = dict(
    hidden_size=1024,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=256,
)


def attention_block_us(
    contexts=(64,), reps: int = 10, shape: dict | None = None
) -> dict[int, list[float]]:
    """One decode step of a DeepSeek-V3 attention block at its real dimensions (MLA, 128
    heads, FP8 projections through the CPU kernels, 187 MB), or at `shape`'s (demo_config's
    overrides), after each of `contexts` cached tokens: per context, every rep's time in
    microseconds. The contexts take turns within each rep (one block, one cache per
    context), so that this machine's drift between reps falls on all of them alike and their
    differences stay clean."""
    import torch

    from refmoe import demo
    from refmoe.checkpoint import Checkpoint, save_file
    from refmoe.config import ModelConfig
    from refmoe.models.deepseek_v3 import MLA

    c = demo.demo_config(1, 16, shape=shape)
    cfg = ModelConfig.from_dict(c)
    h, n = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    gen = demo._Codes(0)
    tensors, dtypes = {}, {}
    for name, dims in (
        ("q_a_proj", (c["q_lora_rank"], h)),
        ("q_b_proj", (n * qk, c["q_lora_rank"])),
        ("kv_a_proj_with_mqa", (c["kv_lora_rank"] + c["qk_rope_head_dim"], h)),
        ("kv_b_proj", (n * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])),
        ("o_proj", (h, n * c["v_head_dim"])),
    ):
        codes, scale = gen.matrix(*dims)
        tensors[f"a.{name}.weight"], dtypes[f"a.{name}.weight"] = codes, "F8_E4M3"
        tensors[f"a.{name}.weight_scale_inv"] = scale
    tensors["a.q_a_layernorm.weight"] = np.ones(c["q_lora_rank"], np.float32)
    tensors["a.kv_a_layernorm.weight"] = np.ones(c["kv_lora_rank"], np.float32)
    rope = c["qk_rope_head_dim"] // 2
    times: dict[int, list[float]] = {ctx: [] for ctx in contexts}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, Path(tmp) / "model.safetensors", dtypes)
        del tensors
        attn = MLA(Checkpoint(tmp), "a", cfg)
        caches = {}
        for ctx in contexts:  # cached tokens as the cache holds them (no prompt to run)
            caches[ctx] = attn.new_cache()
            caches[ctx].kv.append(torch.randn(ctx, c["kv_lora_rank"] + 2 * rope) * 0.1)
        x, cos, sin = torch.randn(1, h) * 0.1, torch.ones(1, rope), torch.zeros(1, rope)
        for ctx in contexts:  # warm-up: the absorbed weights, the allocator, the threads
            attn(x, cos, sin, 1.0, caches[ctx])
        for _ in range(reps):
            for ctx in contexts:
                t0 = time.perf_counter()
                attn(x, cos, sin, 1.0, caches[ctx])
                times[ctx].append((time.perf_counter() - t0) * 1e6)
    return times


def attention_gflops(tokens: int = 1024, reps: int = 3, samples: list | None = None) -> float:
    """GFLOP/s of the engine's causal attention over a prompt (refmoe.models.layers.attend,
    DeepSeek-V3's 128 heads of 192 + 128 dims) of `tokens` tokens: the rate a prompt's own
    scores and weighted sums run at on the CPU (median of reps, into `samples`), in causal
    FLOPs (each query over the keys at or behind it: the flash kernel attend runs skips the
    rest)."""
    import torch

    from refmoe.models.layers import attend

    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(128, tokens, 192, generator=g) for _ in range(2))
    v = torch.randn(128, tokens, 128, generator=g)
    flops = 2.0 * 128 * tokens * (tokens + 1) / 2 * (192 + 128)
    got = [flops / t / 1e9 for t in _times(lambda: attend(q, k, v, 0, 0.07), reps)]
    if samples is not None:
        samples.extend(got)
    return statistics.median(got)


def slp_lane(reps: int = 3, samples: dict | None = None) -> tuple[float, float, float]:
    """SLP's lanes where the device is this CPU, as the engine measures them at start
    (refmoe.costmodel.measure_h2d_gbps and measure_device, on DeepSeek-V3's expert shape):
    (the loader's memory-to-memory copy GB/s, the compute lane's FP8 dequantization GB/s,
    its matmul GFLOP/s), medians of reps, each rep's into `samples` (field path -> values)."""
    from refmoe import costmodel, demo
    from refmoe.config import ModelConfig

    cfg = ModelConfig.from_dict(demo.demo_config(1, 16))
    copy, dequant, gflops = [], [], []
    for _ in range(reps):
        copy.append(costmodel.measure_h2d_gbps("cpu"))
        g, w = costmodel.measure_device(cfg, "cpu")
        gflops.append(g)
        dequant.append(w)
    if samples is not None:
        samples["cpu.slp_copy_gbps"] = copy
        samples["cpu.slp_dequant_gbps"] = dequant
        samples["cpu.slp_gflops"] = gflops
    return statistics.median(copy), statistics.median(dequant), statistics.median(gflops)


def linear_gflops(tokens: int = 1024, reps: int = 3, samples: list | None = None) -> float:
    """A linear-attention layer's prompt beyond its projections, as the engine runs it
    (refmoe.models.qwen3_next.GatedDeltaNet._sequence: the causal convolution, the norms and
    gates, the chunked gated delta rule) at Qwen3-Next's shape (16 key and 32 value heads of
    128, kernel 4), in the recurrence's FLOPs (costmodel.recurrent_flops per token) per
    second: the rate a linear layer's prompt runs at on the CPU besides its FP8 projections
    (median of reps, into `samples`). The delta rule is about 40% of that time."""
    from types import SimpleNamespace
    from typing import cast

    import torch

    from refmoe.config import ModelConfig
    from refmoe.models.qwen3_next import GatedDeltaNet, LinearCache

    hk, hv, d, kernel = 16, 32, 128, 4
    layer = object.__new__(GatedDeltaNet)  # the engine's own code, without a checkpoint
    layer.cfg = cast(ModelConfig, SimpleNamespace(rms_norm_eps=1e-6))  # all _sequence reads
    layer.hk, layer.hv, layer.dk, layer.dv = hk, hv, d, d
    layer.channels = 2 * hk * d + hv * d
    g = torch.Generator().manual_seed(4)
    layer.conv = torch.randn(layer.channels, 1, kernel, generator=g) * 0.3
    layer.dt_bias = torch.randn(hv, generator=g)
    layer.a_log = torch.randn(hv, generator=g) * 0.5
    layer.norm = torch.ones(d)
    mixed = torch.randn(tokens, layer.channels, generator=g)
    z = torch.randn(tokens, hv, d, generator=g)
    b, a = torch.randn(tokens, hv, generator=g), torch.randn(tokens, hv, generator=g)
    flops = tokens * 8.0 * hv * d * d
    got = [
        flops / t / 1e9
        for t in _times(lambda: layer._sequence(mixed, z, b, a, LinearCache()), reps)
    ]
    if samples is not None:
        samples.extend(got)
    return statistics.median(got)


def moe_overhead_us(reps: int = 50, samples: list | None = None) -> float:
    """A fused MoE call on tiny experts: the pool wake-up, barriers and Python around it."""
    rng = np.random.default_rng(1)
    mats = [formats.fp8_quantize(rng.standard_normal((128, 128)))[0] for _ in range(3)]
    scales = [np.ones((1, 1), np.float32)] * 3
    ew = kernels.ExpertWeights(
        "fp8", 128, 128, mats, list(mats), list(mats), scales, list(scales), list(scales)
    )
    x = np.ones((1, 128), np.float32)
    times = [
        t * 1e6
        for t in _times(
            lambda: kernels.fused_moe(
                x, np.zeros(3, int), np.arange(3), np.ones(3, np.float32), ew
            ),
            reps,
        )
    ]
    if samples is not None:
        samples.extend(times)
    return statistics.median(times)


CURVE_M = (2, 4, 8, 16, 32, 64, 128)  # tokens per weight the GEMM and MoE curves are timed at
QUICK_M = (2, 8, 32, 128)


def gemm_curve(
    threads: int, reps: int = 3, samples: dict | None = None, ms: tuple = CURVE_M
) -> dict[int, float]:
    """FP8 weight GB/s of all cores at M tokens per weight (cold DeepSeek gate/up)."""
    shape = Shape("deepseek-v3", "gate_up", 2048, 7168)
    out = {}
    for m in ms:
        row = bench_gemm("fp8", shape, m, threads, kernels.variant(), reps, with_torch=False)
        out[m] = row.gbps
        if samples is not None:
            samples[f"cpu.gemm_gbps_by_m.{m}"] = row.gbps_samples
    return out


def moe_curve(
    threads: int,
    reps: int = 3,
    samples: dict | None = None,
    experts: int = 8,
    ms: tuple = CURVE_M,
) -> dict[int, float]:
    """Expert weight GB/s of one fused MoE call when every expert serves M tokens: `experts`
    cold DeepSeek-V3 experts (gate, up, down), M tokens each routed to all of them. This is
    the call prefill makes (all experts of a layer in one parallel region), which runs faster
    than separate GEMMs at the same M."""
    rng = np.random.default_rng(2)
    h, inter = 7168, 2048

    def mats(n, k):
        c, sc = formats.fp8_quantize(rng.standard_normal((n, k)).astype(np.float32))
        return [np.roll(c, i, axis=0) for i in range(experts)], [sc] * experts

    (g, gs), (u, us), (d, ds) = mats(inter, h), mats(inter, h), mats(h, inter)
    ew = kernels.ExpertWeights("fp8", h, inter, g, u, d, gs, us, ds)
    nbytes = sum(a.nbytes for a in (*g, *u, *d)) + sum(a.nbytes for a in (*gs, *us, *ds))
    out = {}
    for m in ms:
        x = rng.standard_normal((m, h)).astype(np.float32)
        tok = np.repeat(np.arange(m), experts)
        exp = np.tile(np.arange(experts), m)
        rw = np.full(m * experts, 1.0 / experts, np.float32)
        times = _times(lambda: kernels.fused_moe(x, tok, exp, rw, ew, num_threads=threads), reps)
        gbps = [nbytes / t / 1e9 for t in times]
        out[m] = statistics.median(gbps)
        if samples is not None:
            samples[f"cpu.moe_gbps_by_m.{m}"] = gbps
    return out


def format_efficiencies(threads: int, reps: int, samples: dict | None = None) -> dict:
    """Each 4-bit format's GEMV at V3's gate/up shape, packed-byte GB/s over the plain read
    measured beside it (refmoe bench kernels' rows): the simulator's per-format rate."""
    out = {}
    for fmt in kernels.LUT4_FORMATS:
        row = bench_gemm(
            fmt,
            Shape("deepseek-v3", "gate_up", 2048, 7168),
            1,
            threads,
            kernels.variant(),
            reps,
            with_torch=False,
        )
        out[fmt] = min(row.ratio, 1.0)
        if samples is not None:
            samples[f"cpu.gemv_efficiency_by_format.{fmt}"] = [
                min(k / r, 1.0) for k, r in zip(row.gbps_samples, row.limit_gbps_samples)
            ]
    return out


def moe_decode_efficiencies(
    threads: int, reps: int, samples: dict | None = None, formats_: tuple | None = None
) -> dict:
    """The decode MoE call as the engine makes it (one token, DeepSeek-V3's top-8 routed
    experts and the shared one fused in one call, two layers' copies in turn) per format:
    kernel GB/s of the stored bytes over the plain read of the same bytes measured beside it
    (refmoe bench's moe_decode_layer row). The single GEMV's efficiency misses what the
    fused call gains (nine experts' three matrices in one parallel region): measured here
    the engine's int4g decode read its experts at 22 GB/s where that GEMV said 12."""
    out = {}
    for fmt in formats_ or ("fp8", *kernels.LUT4_FORMATS):
        row = bench_moe_layer(fmt, 7168, 2048, 8, threads, kernels.variant(), reps, "v3")
        out[fmt] = min(row.ratio, 1.0)
        if samples is not None:
            samples[f"cpu.moe_decode_efficiency_by_format.{fmt}"] = [
                min(k / r, 1.0) for k, r in zip(row.gbps_samples, row.limit_gbps_samples)
            ]
    return out


def read_gbps(threads: int, reps: int = 5, nbytes: int = 512 << 20) -> list[float]:
    """Plain read GB/s of a buffer far beyond the caches, with `threads` threads, per rep."""
    buf = np.ones(nbytes, np.uint8)
    times = _times(lambda: kernels.read_bandwidth_probe(buf, num_threads=threads), reps)
    return [nbytes / t / 1e9 for t in times]


def calibrate(name: str = "this-machine", reps: int = 5, quick: bool = False) -> Hardware:
    """This machine as one socket of its usable cores, the kernels at their default thread
    count (REFMOE_NUM_THREADS). Every number is the median of its reps; the reps themselves
    go into the profile's `samples` (field path -> values), which prediction intervals
    resample (sim/interval.py). quick: fewer points on each curve, fewer reps of the
    attention block, the decode MoE call in FP8 only (a smoke run's calibration, measured
    27 s against 33 s before that call was added; never for figures)."""
    ms = QUICK_M if quick else CURVE_M
    contexts = QUICK_CONTEXTS if quick else CONTEXTS
    threads, cores = cpu.default_threads(), len(cpu.usable_cpus())
    cold = bench_gemm(
        "fp8",
        Shape("deepseek-v3", "gate_up", 2048, 7168),
        1,
        threads,
        kernels.variant(),
        reps,
        with_torch=False,
    )
    read = cold.limit_gbps
    samples: dict = {
        "cpu.dram_gbps_per_socket": cold.limit_gbps_samples,
        "cpu.fp8_gemv_efficiency": [
            min(k / r, 1.0) for k, r in zip(cold.gbps_samples, cold.limit_gbps_samples)
        ],
        "cpu.fp8_gemv_gbps_per_core": [],
        "cpu.moe_overhead_us": [],
    }
    kernel_read = 0.0
    if cores > threads:  # the DRAM link: what all cores read; the kernel: what its threads do
        kernel_read = read
        samples["cpu.kernel_read_gbps"] = cold.limit_gbps_samples
        samples["cpu.dram_gbps_per_socket"] = all_cores = read_gbps(cores, reps)
        read = statistics.median(all_cores)
    hw = Hardware(
        name,
        CPU(
            sockets=1,
            cores_per_socket=cores,
            dram_gbps_per_socket=read,
            dram_efficiency=1.0,
            kernel_threads=threads if cores > threads else 0,
            kernel_read_gbps=kernel_read,
            fp8_gemv_gbps_per_core=gemv_ceiling_gbps(samples=samples["cpu.fp8_gemv_gbps_per_core"]),
            fp8_gemv_efficiency=min(cold.ratio, 1.0),
            fma_gflops_per_core=kernels.fma_peak_gflops(num_threads=1),
            layer_overhead_us=0.0,
            moe_overhead_us=moe_overhead_us(samples=samples["cpu.moe_overhead_us"]),
            gemm_gbps_by_m=gemm_curve(threads, samples=samples, ms=ms),
            moe_gbps_by_m=moe_curve(threads, samples=samples, experts=4 if quick else 8, ms=ms),
            gemv_efficiency_by_format=format_efficiencies(threads, reps, samples=samples),
            moe_decode_efficiency_by_format=moe_decode_efficiencies(
                threads, reps, samples, ("fp8",) if quick else None
            ),
        ),
    )
    # the attention block beyond streaming its projections at the kernel's rate (small
    # matrices, norms, rope, the scores, torch), per sequence and layer: timed whole after a
    # few cached contexts, at V3's dimensions and on a small block of few heads. The small
    # block's step after the shortest context, less its (small) weight time, is the fixed
    # per-layer cost (`layer_overhead_us`): taken from V3's block instead, it is the small
    # difference of two large times (11 ms less 10.4 ms of weights), which this machine's
    # noise drowned (0.001-0.4 ms, where the small block measures 0.75 ms). What the longer
    # contexts add over the shortest is the curve at each head count.
    from refmoe import demo
    from refmoe.config import ModelConfig
    from sim.costs import attention_bytes

    def stream_us(shape):
        cfg = ModelConfig.from_dict(demo.demo_config(1, 16, shape=shape))
        return attention_bytes(cfg) / (hw.cpu.fp8_stream_gbps() * 1e9) * 1e6

    n = max(3 if quick else 10, 2 * reps)
    for shape, curve_field in (
        (None, "attention_us_by_context"),
        (SMALL_ATTENTION, "attention_us_by_context_few_heads"),
    ):
        blocks = attention_block_us(contexts, n, shape)
        first = blocks[contexts[0]]
        if shape is SMALL_ATTENTION:
            stream = stream_us(shape)
            samples["cpu.layer_overhead_us"] = [max(1.0, t - stream) for t in first]
            hw.cpu.layer_overhead_us = statistics.median(samples["cpu.layer_overhead_us"])
        curve = {contexts[0]: 0.0}
        for c in contexts[1:]:  # each rep against the same rep at the shortest context
            extra = [max(1e-3, b - a) for a, b in zip(first, blocks[c])]
            samples[f"cpu.{curve_field}.{c}"] = extra
            curve[c] = statistics.median(extra)
        setattr(hw.cpu, curve_field, curve)
    hw.cpu.attention_heads = int(demo.V3_LAYER["num_attention_heads"])
    hw.cpu.attention_few_heads = SMALL_ATTENTION["num_attention_heads"]
    samples["cpu.attention_gflops"] = []
    hw.cpu.attention_gflops = attention_gflops(
        tokens=512 if quick else 1024, samples=samples["cpu.attention_gflops"]
    )
    samples["cpu.linear_gflops"] = []
    hw.cpu.linear_gflops = linear_gflops(
        tokens=512 if quick else 1024, samples=samples["cpu.linear_gflops"]
    )
    hw.cpu.slp_copy_gbps, hw.cpu.slp_dequant_gbps, hw.cpu.slp_gflops = slp_lane(
        2 if quick else reps, samples
    )
    hw.samples = samples
    return hw


# the cached tokens the attention block is timed after
CONTEXTS = (16, 64, 256, 1024, 4096, 16384)
QUICK_CONTEXTS = (16, 256, 4096)
