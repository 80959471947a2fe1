"""Where a prompt's prefill runs: the CPU kernels, or SLP on one or more devices. A roofline
over measured rates, shared by the engine (the per-request choice, `refmoe bench prefill`)
and the simulator (sim.predict's prefill paths).

Only the routed and shared experts differ between the paths (attention and dense layers run
on the device either way), so the choice compares their time:

    CPU   per MoE layer: max(bytes of the experts the chunk hits / kernel GB/s,
                             expert FLOPs / kernel GFLOP/s)
    SLP   per MoE layer: max(bytes streamed / host-to-device GB/s,
                             expert FLOPs / (devices x device GFLOP/s)
                             + bytes streamed / device weight GB/s)
          + the exchange of hidden states between devices (DSLP) + one layer's load that
          nothing hides (the ring's fill)

The device's weight term is what each expert costs the SLP lane before its tokens count: the
dequantization of its FP8 codes (and a pass over them). A GPU does it at HBM speed, far above
the link, so it vanishes; with the CPU as the device it is torch converting FP8 on the cores,
which makes SLP lose to the CPU kernels (FP8 read as stored) on this machine at any length
measured, where the FLOP term alone had it winning past a few hundred tokens.

Legend: T = prompt tokens, E = routed experts, K = experts per token.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from refmoe.config import ModelConfig


@dataclass(slots=True)
class Rates:
    """Measured (or, for the simulator, profiled) rates of one machine."""

    h2d_gbps: float  # host -> device copy of a slot (pinned on CUDA)
    cpu_gemv_gbps: float  # CPU expert kernels' weight GB/s with few tokens per expert
    cpu_gflops: float  # CPU expert kernels with many tokens per expert
    device_gflops: float  # the device's expert matmuls (the SLP compute lane)
    exchange_gbps: float = 0.0  # between devices (DSLP all-gather / reduce-scatter); 0: none
    # FP8 weight bytes per second the SLP lane prepares (dequantizes) apart from its matmuls;
    # 0: free beside the link (a GPU)
    device_weight_gbps: float = 0.0
    devices: int = 1
    device: str = "cpu"

    def as_dict(self) -> dict:
        return asdict(self)


def expert_shape(cfg: ModelConfig) -> tuple[int, int]:
    return cfg.hidden_size, cfg.moe_intermediate_size


def fp8_matrix_bytes(n: int, k: int, block: tuple[int, int] = (128, 128)) -> int:
    """Bytes of one [N, K] FP8 matrix: codes and a float32 scale per block (bn, bk)."""
    return n * k + 4 * -(-n // block[0]) * -(-k // block[1])


def matrix_bytes(
    fmt: str, n: int, k: int, group: int = 32, block: tuple[int, int] = (128, 128)
) -> int:
    """Bytes of one [N, K] routed-expert matrix as stored: FP8 codes and block scales (one
    per `block`), or a 4-bit format's packed codes and scales (refmoe/kernels/lut4.h)."""
    if fmt == "mxfp4":
        return n * (-(-k // 32) * 17)  # 16 bytes of codes + one E8M0 byte per 32
    if fmt == "nvfp4":
        return n * (-(-k // 16) * 9)  # 8 bytes of codes + one E4M3 byte per 16
    if fmt == "int4g":
        return n * (-(-k // 8) * 4 + -(-k // group) * 2)  # int32 words + a bf16 per group
    return fp8_matrix_bytes(n, k, block)


def expert_bytes(cfg: ModelConfig) -> int:
    """One routed expert, gate, up and down, in its stored format (a 4-bit one the config's
    quantization_config names; FP8 otherwise, as the engine runs float checkpoints' experts
    converted)."""
    h, i = expert_shape(cfg)
    fmt, group = cfg.expert_format
    if fmt not in ("mxfp4", "nvfp4", "int4g"):
        fmt = "fp8"
    block = cfg.fp8_block
    return 2 * matrix_bytes(fmt, i, h, group, block) + matrix_bytes(fmt, h, i, group, block)


# the longest chunk SLP runs in one pass over the experts, by the device it runs on
SLP_CHUNK_TOKENS = {"cuda": 32768, "cpu": 8192}


def attention_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The attention block's projections, [N, K] each: MLA's (DeepSeek) or GQA's (Qwen3), or
    DeepSeek-V4's (its compressors and indexer scaled by the share of layers that have them)."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    if cfg.family == "deepseek_v4":
        return _v4_attention_shapes(cfg)
    if cfg.is_mla:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        shapes = [
            (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
            (n * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
            (h, n * cfg.v_head_dim),
        ]
        shapes += (
            [(cfg.q_lora_rank, h), (n * qk, cfg.q_lora_rank)] if cfg.q_lora_rank else [(n * qk, h)]
        )
        if cfg.is_dsa and cfg.q_lora_rank:  # the indexer (averaged over GLM-5's shared layers)
            ih, idim = cfg.index_n_heads, cfg.index_head_dim
            full = 1.0 - cfg.indexer_types.count("shared") / max(len(cfg.indexer_types), 1)
            for rows, cols in ((ih * idim, cfg.q_lora_rank), (idim, h), (ih, h)):
                shapes.append((max(1, round(rows * full)), cols))
        return shapes
    d, g = cfg.head_dim, cfg.num_key_value_heads
    gated = 2 if cfg.attention_output_gate else 1  # Qwen3-Next: q_proj also yields the gate
    shapes = [(gated * n * d, h), (g * d, h), (g * d, h), (h, n * d)]
    linear = linear_share(cfg)
    if not linear:
        return shapes
    # Gated DeltaNet layers (Qwen3-Next, Qwen3.5) beside the full ones: each part's rows
    # scaled by its share of the layers, so the block is the layers' average
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    own = [(2 * hk * dk + 2 * hv * dv, h), (2 * hv, h), (h, hv * dv)]
    return [(max(1, round(r * (1 - linear))), c) for r, c in shapes] + [
        (max(1, round(r * linear)), c) for r, c in own
    ]


def v4_shares(cfg: ModelConfig) -> tuple[float, float]:
    """DeepSeek-V4: the shares of CSA and of HCA layers."""
    types, n = cfg.layer_types, max(len(cfg.layer_types), 1)
    return (
        types.count("compressed_sparse_attention") / n,
        types.count("heavily_compressed_attention") / n,
    )


def v4_cache_values(cfg: ModelConfig, kind: str) -> tuple[float, int]:
    """One DeepSeek-V4 layer of this kind's cache, in values (the engine keeps them in float32,
    a GPU engine in BF16): (what it grows by a position: its share of a pooled entry, and on
    CSA of the indexer's key, one per rate positions; the fixed part at its largest: the
    window's key-values plus the compressors' kv and gate projections of the windows not
    closed yet, up to rate - 1 positions, 2 rate - 1 where windows overlap (CSA))."""
    d, di = cfg.head_dim, cfg.index_head_dim
    rate = cfg.compress_rates.get(kind, 0)
    fixed = cfg.sliding_window * d
    if not rate:
        return 0.0, fixed
    if kind == "compressed_sparse_attention":
        return (d + di) / rate, fixed + (2 * rate - 1) * 2 * (2 * d + 2 * di)
    return d / rate, fixed + (rate - 1) * 2 * d


def _v4_attention_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    h, n, d, rank = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank or 0
    g, lora = cfg.o_groups, cfg.o_lora_rank
    shapes = [(rank, h), (n * d, rank), (d, h), (g * lora, n * d // g), (h, g * lora)]
    csa, hca = v4_shares(cfg)
    ni, di = cfg.index_n_heads, cfg.index_head_dim
    own = [(csa, 2 * d, h), (csa, 2 * d, h), (hca, d, h), (hca, d, h)]  # compressors kv, gate
    own += [(csa, 2 * di, h), (csa, 2 * di, h), (csa, ni * di, rank), (csa, ni, h)]  # indexer
    return shapes + [(max(1, round(rows * share)), cols) for share, rows, cols in own if share]


def linear_share(cfg: ModelConfig) -> float:
    """The share of layers whose attention is linear (a fixed state, no cache to read)."""
    types = cfg.layer_types
    return types.count("linear_attention") / len(types) if types else 0.0


def sliding_share(cfg: ModelConfig) -> float:
    """The share of layers whose attention is a sliding window (a fixed window to read and keep)."""
    types = cfg.layer_types
    return types.count("sliding_attention") / len(types) if types else 0.0


def recurrent_flops(cfg: ModelConfig) -> float:
    """One token's gated delta rule in one linear layer: decaying the state, recalling k,
    the rank-one update and reading q, each about 2 x value heads x d_k x d_v FLOPs; the
    same for any context."""
    hv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    return 8.0 * hv * dk * dv


def score_dims(cfg: ModelConfig) -> int:
    """Per head, the query-key and value widths one attended key costs (qk + v)."""
    if cfg.is_mla:
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    return 2 * cfg.head_dim


def keys_scored(cfg: ModelConfig, positions: np.ndarray) -> np.ndarray:
    """The attention work of a token at each position, in attended keys of the model's dense
    kind (heads x score_dims each), averaged over the layers: every earlier key and itself on
    a full layer; its window on a sliding one; a linear layer's recurrence, the same at any
    position; DeepSeek-V4's window, plus on a CSA layer its index_topk of the closed entries and
    the indexer's pass over all of them, on an HCA layer every closed entry."""
    p = np.asarray(positions, dtype=np.float64) + 1.0
    per_key = cfg.num_attention_heads * score_dims(cfg)
    if cfg.family == "deepseek_v4":
        csa, hca = v4_shares(cfg)
        rate_c = cfg.compress_rates.get("compressed_sparse_attention", 4)
        rate_h = cfg.compress_rates.get("heavily_compressed_attention", 128)
        index = cfg.index_n_heads * cfg.index_head_dim / per_key
        closed = p / rate_c
        return (
            np.minimum(p, cfg.sliding_window)
            + csa * (np.minimum(closed, cfg.index_topk) + index * closed)
            + hca * p / rate_h
        )
    linear, sliding = linear_share(cfg), sliding_share(cfg)
    keys = (1.0 - linear - sliding) * p
    if sliding:
        keys = keys + sliding * np.minimum(p, cfg.sliding_window)
    if linear:
        keys = keys + linear * recurrent_flops(cfg) / (2.0 * per_key)
    return keys


def context_split(cfg: ModelConfig, tokens: int, ranks: int, past: int = 0) -> list[int]:
    """A chunk of `tokens` new tokens after `past` cached ones split into contiguous slices,
    one per rank in order, so that each rank's attention costs about the same. A token costs
    its projections (2 x the block's weights) plus its scores (keys_scored: on a full layer
    every earlier key, so the later a token the dearer, and equal slices would leave the last
    rank 3/4 of a fresh prompt's scores on two ranks; a window or V4's compressed entries
    cost nearly the same at any position). Every rank gets at least one token when there are
    enough."""
    if ranks < 1 or tokens < 0:
        raise ValueError(f"context_split: {tokens} tokens over {ranks} ranks")
    # in units of one attended key: a token's projections, then its scores
    a = sum(n * k for n, k in attention_shapes(cfg)) / (cfg.num_attention_heads * score_dims(cfg))
    cum = np.concatenate([[0.0], np.cumsum(a + keys_scored(cfg, past + np.arange(tokens)))])
    bounds = [0]
    for r in range(1, ranks):
        target = cum[-1] * r / ranks
        x = int(np.searchsorted(cum, target))  # cum[x - 1] < target <= cum[x]
        if x > 0 and target - cum[x - 1] < cum[x] - target:
            x -= 1  # the nearer of the two
        lo = bounds[-1] + (1 if tokens >= ranks else 0)  # at least one token each
        hi = tokens - (ranks - r if tokens >= ranks else 0)
        bounds.append(min(max(x, lo), max(hi, lo)))
    bounds.append(tokens)
    return [hi - lo for lo, hi in zip(bounds, bounds[1:])]


def unique_experts(n_experts: int, k: int, tokens: int) -> float:
    """Expected distinct experts a chunk of tokens routes to (uniform routing)."""
    return n_experts * (1 - (1 - k / n_experts) ** tokens)


def streaming_for(n_experts: int, hit: float) -> str:
    """The one streaming rule: "selective" (stream only the experts the chunk routes to, once
    the router has run) when more than one expert of the layer is expected to go unused, else
    "prefetch" (stream them all, in order, ahead of the router). hit: the experts the chunk is
    expected to route to (uniform or skewed routing)."""
    return "selective" if hit < n_experts - 1 else "prefetch"


def streaming(cfg: ModelConfig, tokens: int) -> str:
    """streaming_for a chunk of `tokens` tokens under uniform routing."""
    return streaming_for(
        cfg.n_routed_experts, unique_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, tokens)
    )


def moe_layers(cfg: ModelConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


def expert_flops(cfg: ModelConfig, tokens: int) -> float:
    """Multiply-adds x 2 of one MoE layer's routed and shared experts over `tokens` tokens."""
    h, i = expert_shape(cfg)
    return 2.0 * 3 * h * i * tokens * (cfg.num_experts_per_tok + cfg.n_shared_experts)


def cpu_expert_seconds(cfg: ModelConfig, tokens: int, rates: Rates) -> float:
    per = (
        max(
            unique_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, tokens)
            + cfg.n_shared_experts,
            1,
        )
        * expert_bytes(cfg)
        / (rates.cpu_gemv_gbps * 1e9)
    )
    per = max(per, expert_flops(cfg, tokens) / (rates.cpu_gflops * 1e9))
    return per * moe_layers(cfg)


def slp_expert_seconds(
    cfg: ModelConfig, tokens: int, rates: Rates, devices: int = 1, chunk_tokens: int | None = None
) -> float:
    """SLP over `devices` devices (each streams 1/devices of the experts), chunk by chunk."""
    chunk = min(tokens, chunk_tokens or tokens)
    total = 0.0
    for lo in range(0, tokens, chunk):
        t = min(chunk, tokens - lo)
        slots: float = cfg.n_routed_experts + cfg.n_shared_experts
        if streaming(cfg, t) == "selective":  # only what is routed
            slots = (
                unique_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, t)
                + cfg.n_shared_experts
            )
        stream = slots / devices * expert_bytes(cfg) / (rates.h2d_gbps * 1e9)
        compute = expert_flops(cfg, t) / devices / (rates.device_gflops * 1e9)
        if rates.device_weight_gbps:
            compute += slots / devices * expert_bytes(cfg) / (rates.device_weight_gbps * 1e9)
        exchange = 0.0
        if devices > 1:  # gather the chunk's hidden states, scatter the summed results
            exchange = (
                2
                * t
                * cfg.hidden_size
                * 4
                * (devices - 1)
                / devices
                / ((rates.exchange_gbps or rates.h2d_gbps) * 1e9)
            )
        total += moe_layers(cfg) * (max(stream, compute) + exchange) + min(stream, compute)
    return total


@dataclass(slots=True)
class Choice:
    path: str  # "cpu" or "slp"
    devices: int
    seconds: dict  # estimated expert seconds per candidate, e.g. {"cpu": .., "slp1": ..}


def choose_prefill(
    cfg: ModelConfig,
    tokens: int,
    rates: Rates,
    chunk_tokens: int | None = None,
    cpu_share: float = 1.0,
    slp_wait_s: float = 0.0,
) -> Choice:
    """The fastest path for this prompt by the estimates above. cpu_share: the share of the
    CPU a CPU prefill would get (1: alone; less beside decoding requests, when chunked
    prefill keeps most of the CPU for them); slp_wait_s: how long SLP would first wait for
    the prefill worker (busy with another prompt) while a chunked CPU prefill starts now."""
    est = {"cpu": cpu_expert_seconds(cfg, tokens, rates) / cpu_share}
    for n in range(1, max(1, rates.devices) + 1):
        est[f"slp{n}"] = slp_wait_s + slp_expert_seconds(cfg, tokens, rates, n, chunk_tokens)
    best = min(est, key=lambda k: est[k])
    return Choice("cpu" if best == "cpu" else "slp", 1 if best == "cpu" else int(best[3:]), est)


def crossover_tokens(
    cfg: ModelConfig, rates: Rates, devices: int = 1, limit: int = 1 << 20
) -> int | None:
    """The shortest prompt for which SLP on `devices` devices beats the CPU (None: never, up
    to `limit` tokens). Both sides grow with T; SLP's streaming term is flat, so once it
    wins it keeps winning: bisection."""

    def slp_wins(t: int) -> bool:
        return slp_expert_seconds(cfg, t, rates, devices) < cpu_expert_seconds(cfg, t, rates)

    if not slp_wins(limit):
        return None
    lo, hi = 1, limit
    if slp_wins(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if slp_wins(mid) else (mid, hi)
    return hi


# ---------------------------------------------------------------------------------------------
# Measuring the rates on the machine at hand (about a second)
# ---------------------------------------------------------------------------------------------


def _best(fn, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_h2d_gbps(device, nbytes: int = 128 * 2**20, reps: int = 5) -> float:
    """Host-to-device copy bandwidth: pinned host memory to CUDA, or memory to memory when
    the device is the CPU."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy():
        dst.copy_(src, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(device)

    copy()
    return nbytes / _best(copy, reps) / 1e9


def measure_cpu(
    cfg: ModelConfig, num_threads: int | None = None, reps: int = 3
) -> tuple[float, float]:
    """(GEMV weight GB/s at one token, GFLOP/s at 64 tokens) of the FP8 kernels on one expert
    projection of the model's shape."""
    from refmoe import kernels

    h, i = expert_shape(cfg)
    rng = np.random.default_rng(0)
    w = rng.integers(0, 0x7E, size=(i, h), dtype=np.uint8)
    s = np.ones((-(-i // 128), -(-h // 128)), np.float32)
    x1 = rng.standard_normal((1, h)).astype(np.float32)
    x64 = rng.standard_normal((64, h)).astype(np.float32)
    gemv = _best(lambda: kernels.fp8_gemm(x1, w, s, num_threads=num_threads), reps)
    gemm = _best(lambda: kernels.fp8_gemm(x64, w, s, num_threads=num_threads), reps)
    return w.nbytes / gemv / 1e9, 2.0 * 64 * h * i / gemm / 1e9


def measure_device(
    cfg: ModelConfig, device, tokens: tuple[int, int] = (16, 1024), reps: int = 3
) -> tuple[float, float]:
    """The SLP compute lane on one expert projection of the model's shape, as (GFLOP/s of its
    matmul per token, FP8 weight GB/s of its fixed part, the dequantization), for the model
    t(M) = weight bytes / weight GB/s + 2 M N K / GFLOP/s. With the default dequant lane each
    part is timed on its own (the dequantization of the weight, then the matmul on the
    dequantized weight at the larger token count): a fit through two end-to-end times gave a
    fixed part of zero or less whenever the matmul ran faster per token at many tokens (it
    does on AVX-512) or the machine was noisy. The FP8 tensor-core lane has no separate
    dequantization; its fixed part comes from the two end-to-end times, 0 (free) when they
    leave none."""
    import torch

    from refmoe.device_matmul import Matmul, block_dequant, compute_dtype  # no import of slp

    device = torch.device(device)
    h, i = expert_shape(cfg)
    dtype = compute_dtype(device)  # what SLP's compute lane runs in there
    mm = Matmul(device, dtype)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(i, h, generator=g) * 0.05).to(torch.float8_e4m3fn).to(device)
    s = torch.ones(-(-i // 128), -(-h // 128), device=device)
    xs = [torch.randn(m, h, generator=g).to(device, dtype) for m in tokens]

    def timed(fn) -> float:
        def run():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        run()
        return _best(run, reps)

    if mm.kind == "dequant":
        fixed = timed(lambda: block_dequant(w, s, dtype))
        wd = block_dequant(w, s, dtype)
        per_token = timed(lambda: xs[-1] @ wd.T) / tokens[-1]
    else:
        (m0, m1), (t0, t1) = tokens, [timed(lambda x=x: mm(x, w, s)) for x in xs]
        per_token = max((t1 - t0) / (m1 - m0), 1e-15)
        fixed = t0 - m0 * per_token
    return 2.0 * h * i / per_token / 1e9, (h * i / fixed / 1e9 if fixed > 0 else 0.0)


def measure_rates(
    cfg: ModelConfig, device, devices: int = 1, num_threads: int | None = None
) -> Rates:
    gemv, gflops = measure_cpu(cfg, num_threads)
    device_gflops, weight_gbps = measure_device(cfg, device)
    return Rates(
        h2d_gbps=measure_h2d_gbps(device),
        cpu_gemv_gbps=gemv,
        cpu_gflops=gflops,
        device_gflops=device_gflops,
        device_weight_gbps=weight_gbps,
        devices=devices,
        device=str(device),
    )
