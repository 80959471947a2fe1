"""Pieces every model family shares: rope (default and YaRN), attention, RMSNorm, device weight
loading (dequantized, or FP8 projections through the CPU kernels) and the dense MLP. The MoE
block is in experts.py, the caches in kv_cache.py, the decoder skeleton in decoder.py.

Legend: T = tokens in this call, H = hidden, E = routed experts, K = experts per token.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from refmoe import kernels
from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.kernels import formats

FLOAT_DTYPES = ("float32", "bfloat16", "float16")

# ---------------------------------------------------------------------------------------------
# Rotary embedding (default and YaRN, as Hugging Face computes them)
# ---------------------------------------------------------------------------------------------


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float, float]:
    """(inv_freq [dim/2], factor on cos/sin, factor on the softmax scale)."""
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind in ("default", None):
        return 1.0 / pos_freqs, 1.0, 1.0
    if kind != "yarn":
        raise ValueError(
            f"config.json: rope_scaling type {kind!r} is not supported (default or yarn)"
        )
    factor = float(s["factor"])
    orig = int(s["original_max_position_embeddings"])
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    attn = s.get("attention_factor")
    if attn is None:
        attn = (
            _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
            if mscale and mscale_all_dim
            else _mscale(factor)
        )

    def correction_dim(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    softmax = _mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
    return inv_freq, float(attn), softmax


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
) -> torch.Tensor:
    """x [..., T, d], cos/sin [T, d/2]. Interleaved pairs (x0, x1), (x2, x3)... as DeepSeek lays
    them out (the result de-interleaved, as Hugging Face returns it), or rotate-half."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# from this many queries on, attention on the CPU runs torch's flash kernel (it never builds
# the score matrix and skips the blocks the causal rule hides); fewer (decode, a short chunk)
# run the grouped product below, faster there (measured on a 2-vCPU Zen 4 over 4,096 keys:
# 16 query heads on 2 KV heads, 1 token 1.2 ms against 2.7; 128 tokens 98 against 78)
CPU_FLASH_MIN_TOKENS = 64


def _fused_attention(q, k, v, start: int, scale: float) -> torch.Tensor | None:
    """Fused attention through torch's scaled_dot_product_attention: on CUDA flash or
    memory-efficient attention in bf16; on the CPU its flash kernel in the inputs' dtype
    (float32: within 1e-6 of the product below, 2.5x as fast over a 1,024-token prompt of 128
    heads, 1.7x for 201 tokens after 4,127 cached). v is padded to q's head size when they
    differ (MLA). None when no such kernel takes the shapes (never the math backend, which
    would build the whole score matrix)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t, s, dv = q.shape[1], k.shape[1], v.shape[-1]
    mask = (
        None
        if start == 0 and t == s
        else (
            torch.arange(s, device=q.device)[None, :]
            <= (start + torch.arange(t, device=q.device))[:, None]
        )
    )  # [T, S] keep
    cuda = q.is_cuda
    dtype = torch.bfloat16 if cuda else q.dtype
    backends = [SDPBackend.FLASH_ATTENTION] + ([SDPBackend.EFFICIENT_ATTENTION] if cuda else [])
    vb = v.to(dtype)
    if dv < q.shape[-1]:
        vb = F.pad(vb, (0, q.shape[-1] - dv))
    try:
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(  # the fused kernels want [B, n, T, d]
                q.to(dtype)[None],
                k.to(dtype)[None],
                vb[None],
                attn_mask=mask,
                is_causal=mask is None and t > 1,
                scale=scale,
                enable_gqa=k.shape[0] != q.shape[0],
            )[0]
    except RuntimeError:
        return None
    return out[..., :dv].to(q.dtype)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    scale: float,
    budget_bytes: int = 1 << 30,
    window: int = 0,
    sinks: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    key_start: int = 0,
) -> torch.Tensor:
    """Causal attention of queries at positions start .. start+T over keys key_start ..
    key_start+S (key_start > 0: a sliding window's cache, which holds only its last keys).
    q [n, T, d], k [g, S, d], v [g, S, dv] -> [n, T, dv], where g divides n (GQA: each key
    head serves n / g consecutive query heads, which are stacked as rows of one product over
    its keys, so the cache is never copied per query head). Query blocks keep the score matrix
    under budget_bytes, so a long prompt never builds an [n, T, S] tensor at once.
    window > 0: a query at position p sees keys p - window + 1 .. p only (sliding-window
    layers), and a block reads only the keys its queries can see. sinks [n] (gpt-oss): one more
    logit per head in every softmax's denominator, attending to nothing. allowed [T, S] bool
    (DSA): the keys each query may attend to besides the causal rule."""
    n, t, d = q.shape
    g, s, dv = k.shape[0], k.shape[1], v.shape[2]
    if n % g or v.shape[0] != g:
        raise ValueError(f"{n} query heads over {g} key and {v.shape[0]} value heads")
    if t == 0:  # a rank that only hosts a distributed prefill attends for no query
        return q.new_zeros((n, 0, dv))
    if key_start and (window <= 0 or allowed is not None):
        raise ValueError("keys from a later position than 0 come only from a sliding window")
    fused = q.is_cuda or (t >= CPU_FLASH_MIN_TOKENS and q.dtype == torch.float32)
    if fused and window == 0 and sinks is None and allowed is None:
        out = _fused_attention(q, k, v, start, scale)
        if out is not None:
            return out
    r = n // g  # query heads per key head
    grouped = q.reshape(g, r, t, d)
    block = max(1, min(t, budget_bytes // max(1, n * s * 4)))
    outs = []
    for lo in range(0, t, block):
        hi = min(t, lo + block)
        b = hi - lo
        # the oldest key any query of the block sees, as a position and as an index into k
        first = max(key_start, start + lo - window + 1) if window > 0 else 0
        i0, seen = first - key_start, s - (first - key_start)
        rows = grouped[:, :, lo:hi].reshape(g, r * b, d)
        scores = (rows @ k[:, i0:].transpose(1, 2)).view(g, r, b, seen) * scale
        scores = mask_causal(scores, start + lo, first, window)  # [g, r, b, seen]
        if allowed is not None:
            scores = scores.masked_fill(~allowed[lo:hi, first:], float("-inf"))
        if sinks is not None:
            sink = sinks.to(scores.dtype).view(g, r, 1, 1).expand(g, r, b, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out = probs.reshape(g, r * b, seen) @ v[:, i0:]  # [g, r b, dv]
        outs.append(out.view(n, b, dv))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def mask_causal(scores: torch.Tensor, start: int, first: int = 0, window: int = 0) -> torch.Tensor:
    """scores [..., T, S] of queries at positions start .. start+T over keys first .. first+S,
    with every key ahead of its query at -inf, and with window > 0 every key window or more
    behind it too (untouched when none is)."""
    t, s = scores.shape[-2:]
    keys = first + torch.arange(s, device=scores.device)[None, :]  # [1, S]
    queries = (start + torch.arange(t, device=scores.device))[:, None]  # [T, 1]
    hidden = keys > queries
    if window > 0:
        hidden |= keys <= queries - window
    elif start + 1 >= first + s:  # every key at or behind every query
        return scores
    return scores.masked_fill(hidden, float("-inf"))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dim; weight None: unweighted (DeepSeek-V4's).
    Float32 on the CPU runs one kernel call (kernels.rms_norm) where torch runs five
    operations of 20-25 us each at decode's one row on the 2-vCPU VM; elsewhere torch."""
    on_cpu = x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad
    if on_cpu and (weight is None or (weight.device.type == "cpu" and weight.dtype == x.dtype)):
        w = None if weight is None else weight.detach().numpy()
        return torch.from_numpy(kernels.rms_norm(x.detach().numpy(), w, eps))
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed if weight is None else weight * normed


# ---------------------------------------------------------------------------------------------
# Loading: device tensors (dequantized) and routed experts (one host copy, kernel formats)
# ---------------------------------------------------------------------------------------------


def load_dense(ck: Checkpoint, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A device weight as float32; FP8 ones are dequantized with their block scales."""
    dtype = ck.dtype(name)
    a = ck.get(name, shape, FLOAT_DTYPES + ("float8_e4m3fn",))
    if dtype == "float8_e4m3fn":
        s, block = ck.fp8_scales(name, (shape[0], shape[1]))
        return torch.from_numpy(formats.fp8_dequantize(a, s, block).astype(np.float32))
    if dtype == "bfloat16":
        return torch.from_numpy(formats.bf16_decode(a).astype(np.float32))
    return torch.from_numpy(np.array(a, dtype=np.float32))


def load_norm(ck: Checkpoint, name: str, size: int, cfg: ModelConfig) -> torch.Tensor:
    """An RMSNorm's scale: the stored weight, or 1 + it where the family stores the offset
    from one (Qwen3-Next: cfg.norm_offset)."""
    w = load_dense(ck, name, (size,))
    return w + 1.0 if cfg.norm_offset else w


class Linear:
    """y = x W^T for one projection. FP8 weights stay as stored (codes, views of the mapped
    checkpoint, and their scales, one per `block`) and run through the CPU kernels; other
    dtypes become float32 torch tensors. Legend: N = out features, K = in features."""

    def __init__(self, ck: Checkpoint, name: str, shape: tuple[int, int]):
        self.n, self.k = shape
        self.weight = self.codes = self.scale = None
        self.block = (formats.BLOCK, formats.BLOCK)
        if ck.dtype(name) == "float8_e4m3fn":
            self.codes = ck.get(name, shape, ("float8_e4m3fn",))
            self.scale, self.block = ck.fp8_scales(name, shape)
        else:
            self.weight = load_dense(ck, name, shape)

    @property
    def nbytes(self) -> int:
        if self.weight is not None:
            return self.weight.numel() * self.weight.element_size()
        assert self.codes is not None and self.scale is not None  # FP8: both kept
        return self.codes.nbytes + self.scale.nbytes

    def dense(self) -> torch.Tensor:
        """The weight as a float32 tensor [N, K]."""
        if self.weight is not None:
            return self.weight
        assert self.codes is not None and self.scale is not None  # FP8: both kept
        w = formats.fp8_dequantize(self.codes, self.scale, self.block)
        return torch.from_numpy(w.astype(np.float32))

    def to(self, device: torch.device) -> None:
        """On an accelerator the projection runs there on the dequantized weight; on the CPU it
        keeps the FP8 codes for the kernels."""
        if device.type != "cpu":
            self.weight, self.codes, self.scale = self.dense().to(device), None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return x @ self.weight.T
        if x.numel() == 0:  # no tokens (a rank that only hosts a prefill): no call
            return x.new_zeros((*x.shape[:-1], self.n), dtype=torch.float32)
        assert self.codes is not None and self.scale is not None  # FP8: both kept
        x2 = x.reshape(-1, self.k).float().contiguous().numpy()  # [T, K]
        y = kernels.fp8_gemm(x2, self.codes, self.scale, block=self.block)  # [T, N]
        return torch.from_numpy(y).reshape(*x.shape[:-1], self.n)


def project(x: torch.Tensor, linears: list[Linear]) -> list[torch.Tensor]:
    """[lin(x) for lin in linears]: the projections of one input, its FP8 weights on the CPU
    in one kernel call (kernels.fp8_gemm_many: one parallel region instead of one per weight;
    the same numbers as one by one)."""
    fp8 = [lin for lin in linears if lin.codes is not None]
    if len(fp8) < 2 or x.numel() == 0 or x.device.type != "cpu":
        return [lin(x) for lin in linears]
    k = linears[0].k
    if any(lin.k != k for lin in linears):
        raise ValueError(
            f"project: every weight must take {k} inputs, got {[lin.k for lin in linears]}"
        )
    x2 = x.reshape(-1, k).float().contiguous().numpy()  # [T, K]
    ys = iter(kernels.fp8_gemm_many(x2, [(lin.codes, lin.scale, lin.block) for lin in fp8]))
    lead = x.shape[:-1]
    return [
        torch.from_numpy(next(ys)).reshape(*lead, lin.n) if lin.codes is not None else lin(x)
        for lin in linears
    ]


# ---------------------------------------------------------------------------------------------
# The dense MLP (dense layers; the shared expert)
# ---------------------------------------------------------------------------------------------


class MLP:
    """down(silu(gate x) * up x); limit > 0 (DeepSeek-V4): gate clamped above at limit and up
    to [-limit, limit] first."""

    def __init__(self, ck: Checkpoint, p: str, h: int, inter: int, limit: float = 0.0):
        self.gate = Linear(ck, f"{p}.gate_proj.weight", (inter, h))
        self.up = Linear(ck, f"{p}.up_proj.weight", (inter, h))
        self.down = Linear(ck, f"{p}.down_proj.weight", (h, inter))
        self.limit = limit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g, u = project(x, [self.gate, self.up])
        if self.limit > 0:
            g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
        return self.down(F.silu(g) * u)
