"""Pieces every model family shares: rope (default and YaRN), RMSNorm, weight loading (device
weights dequantized, routed experts in a kernel format), dense MLP, the router, the MoE block
with routed experts on the CPU kernels, and the decoder-model skeleton.

Legend: T = tokens in this call, H = hidden, E = routed experts, K = experts per token.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from refmoe import kernels
from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.kernels import formats
from refmoe.trace import maybe

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


def _fused_attention(q, k, v, start: int, scale: float) -> torch.Tensor | None:
    """CUDA: flash or memory-efficient attention in bf16 (v padded to q's head size when they
    differ, as in MLA); None when neither kernel takes the shapes (never the math backend,
    which would build the whole score matrix)."""
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
    vb = v.to(torch.bfloat16)
    if dv < q.shape[-1]:
        vb = F.pad(vb, (0, q.shape[-1] - dv))
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            out = F.scaled_dot_product_attention(  # the fused kernels want [B, n, T, d]
                q.to(torch.bfloat16)[None],
                k.to(torch.bfloat16)[None],
                vb[None],
                attn_mask=mask,
                is_causal=mask is None and t > 1,
                scale=scale,
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
) -> torch.Tensor:
    """Causal attention of queries at positions start .. start+T over keys 0 .. S.
    q [n, T, d], k [n, S, d], v [n, S, dv] -> [n, T, dv]. Query blocks keep the score matrix
    under budget_bytes, so a long prompt never builds an [n, T, S] tensor at once."""
    n, t, _ = q.shape
    s = k.shape[1]
    if t == 0:  # a rank that only hosts a distributed prefill attends for no query
        return q.new_zeros((n, 0, v.shape[2]))
    if q.is_cuda:
        out = _fused_attention(q, k, v, start, scale)
        if out is not None:
            return out
    block = max(1, min(t, budget_bytes // max(1, n * s * 4)))
    outs = []
    for lo in range(0, t, block):
        hi = min(t, lo + block)
        scores = (q[:, lo:hi] @ k.transpose(1, 2)) * scale  # [n, b, S]
        outs.append(torch.softmax(mask_causal(scores, start + lo), dim=-1) @ v)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def mask_causal(scores: torch.Tensor, start: int) -> torch.Tensor:
    """scores [..., T, S] of queries at positions start .. start+T over keys 0 .. S, with every
    key ahead of its query at -inf (untouched when none is)."""
    t, s = scores.shape[-2:]
    if start + 1 >= s:
        return scores
    ahead = (
        torch.arange(s, device=scores.device)[None, :]
        > (start + torch.arange(t, device=scores.device))[:, None]
    )  # [T, S]
    return scores.masked_fill(ahead, float("-inf"))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# ---------------------------------------------------------------------------------------------
# Loading: device tensors (dequantized) and routed experts (one host copy, kernel formats)
# ---------------------------------------------------------------------------------------------


def load_dense(ck: Checkpoint, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A device weight as float32; FP8 ones are dequantized with their weight_scale_inv."""
    dtype = ck.dtype(name)
    a = ck.get(name, shape, FLOAT_DTYPES + ("float8_e4m3fn",))
    if dtype == "float8_e4m3fn":
        s = ck.get(name + "_scale_inv", formats.scale_shape(*shape), ("float32",))
        return torch.from_numpy(formats.fp8_dequantize(a, s).astype(np.float32))
    if dtype == "bfloat16":
        return torch.from_numpy(formats.bf16_decode(a).astype(np.float32))
    return torch.from_numpy(np.array(a, dtype=np.float32))


class Linear:
    """y = x W^T for one projection. FP8 weights stay as stored (codes and weight_scale_inv,
    views of the mapped checkpoint) and run through the CPU kernels; other dtypes become float32
    torch tensors. Legend: N = out features, K = in features."""

    def __init__(self, ck: Checkpoint, name: str, shape: tuple[int, int]):
        self.n, self.k = shape
        self.weight = self.codes = self.scale = None
        if ck.dtype(name) == "float8_e4m3fn":
            self.codes = ck.get(name, shape, ("float8_e4m3fn",))
            self.scale = np.ascontiguousarray(
                ck.get(name + "_scale_inv", formats.scale_shape(*shape), ("float32",))
            )
        else:
            self.weight = load_dense(ck, name, shape)

    @property
    def nbytes(self) -> int:
        if self.weight is not None:
            return self.weight.numel() * self.weight.element_size()
        return self.codes.nbytes + self.scale.nbytes

    def dense(self) -> torch.Tensor:
        """The weight as a float32 tensor [N, K]."""
        if self.weight is not None:
            return self.weight
        return torch.from_numpy(formats.fp8_dequantize(self.codes, self.scale).astype(np.float32))

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
        x2 = x.reshape(-1, self.k).float().contiguous().numpy()  # [T, K]
        y = kernels.fp8_gemm(x2, self.codes, self.scale)  # [T, N]
        return torch.from_numpy(y).reshape(*x.shape[:-1], self.n)


def load_experts(
    ck: Checkpoint,
    prefix: str,
    cfg: ModelConfig,
    expert_dtype: str | None,
    with_shared: bool = False,
) -> kernels.ExpertWeights:
    """Routed experts of one layer in a kernel format (with_shared: the shared expert as one
    more slot, index n_routed_experts). As stored where possible (FP8 codes and BF16 bits are
    views of the mapped checkpoint: no copy); converted otherwise."""
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    first = f"{prefix}.experts.0.gate_proj.weight"
    stored = ck.dtype(first)
    fmt = expert_dtype or ("fp8" if stored == "float8_e4m3fn" else "bf16")
    mats: dict[str, list] = {"gate": [], "up": [], "down": []}
    scales: dict[str, list] = {"gate": [], "up": [], "down": []}
    slots = [f"experts.{e}" for e in range(cfg.n_routed_experts)]
    for slot in slots + (["shared_experts"] if with_shared else []):
        for kind, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
            name = f"{prefix}.{slot}.{kind}_proj.weight"
            w = ck.get(name, shape, FLOAT_DTYPES + ("float8_e4m3fn",))
            dt = ck.dtype(name)
            s = (
                ck.get(name + "_scale_inv", formats.scale_shape(*shape), ("float32",))
                if dt == "float8_e4m3fn"
                else None
            )
            if fmt == "fp8" and dt == "float8_e4m3fn":
                mats[kind].append(w)
                scales[kind].append(np.ascontiguousarray(s))
                continue
            dense = (
                formats.fp8_dequantize(w, s)
                if s is not None
                else (formats.bf16_decode(w) if dt == "bfloat16" else np.asarray(w, np.float64))
            )
            if fmt == "bf16":
                mats[kind].append(w if dt == "bfloat16" else formats.bf16_encode(dense))
            elif fmt == "fp8":
                c, sc = formats.fp8_quantize(dense)
                mats[kind].append(c)
                scales[kind].append(sc)
            elif fmt == "int4":
                c, sc = formats.int4_quantize(dense, 128)
                mats[kind].append(c)
                scales[kind].append(sc)
            else:
                raise ValueError(f"expert dtype must be fp8, int4 or bf16, got {fmt!r}")
    return kernels.ExpertWeights(
        fmt,
        h,
        i,
        mats["gate"],
        mats["up"],
        mats["down"],
        scales["gate"],
        scales["up"],
        scales["down"],
        group_size=128,
        validate=False,
    )  # FP8 codes were checked by Checkpoint.get


# ---------------------------------------------------------------------------------------------
# MLPs: dense (torch), routed experts (CPU kernels) behind the router, shared expert (torch)
# ---------------------------------------------------------------------------------------------


class MLP:
    def __init__(self, ck: Checkpoint, p: str, h: int, inter: int):
        self.gate = Linear(ck, f"{p}.gate_proj.weight", (inter, h))
        self.up = Linear(ck, f"{p}.up_proj.weight", (inter, h))
        self.down = Linear(ck, f"{p}.down_proj.weight", (h, inter))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Gate:
    """The router. DeepSeek-V3 (noaux_tc): sigmoid scores, correction bias for selection only,
    the top topk_group groups by the sum of their two best biased scores, top-k experts within
    them. Qwen3-MoE: softmax scores, plain top-k. Weights are the unbiased scores, normalized
    when norm_topk_prob, times routed_scaling_factor (1 for Qwen3)."""

    def __init__(self, ck: Checkpoint, p: str, cfg: ModelConfig):
        self.cfg = cfg
        self.weight = load_dense(ck, f"{p}.weight", (cfg.n_routed_experts, cfg.hidden_size))
        bias = f"{p}.e_score_correction_bias"
        self.bias = (
            load_dense(ck, bias, (cfg.n_routed_experts,))
            if bias in ck
            else torch.zeros(cfg.n_routed_experts)
        )

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, K] float32, expert ids [T, K])."""
        cfg, t = self.cfg, x.shape[0]
        logits = x.float() @ self.weight.float().T  # [T, E]
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        choice = scores + self.bias
        if cfg.n_group > 1:
            groups = choice.view(t, cfg.n_group, -1).topk(2, dim=-1)[0].sum(-1)  # [T, G]
            keep = groups.topk(cfg.topk_group, dim=-1, sorted=False)[1]
            mask = torch.zeros_like(groups).scatter_(1, keep, 1).bool()
            per = cfg.n_routed_experts // cfg.n_group
            mask = mask.unsqueeze(-1).expand(t, cfg.n_group, per).reshape(t, -1)  # [T, E]
            choice = choice.masked_fill(~mask, float("-inf"))
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]  # [T, K]
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids


class MoE:
    def __init__(
        self,
        ck: Checkpoint,
        p: str,
        cfg: ModelConfig,
        expert_dtype: str | None,
        num_threads: int | None,
    ):
        self.gate = Gate(ck, f"{p}.gate", cfg)
        # One shared expert the size of a routed one joins the fused call as one more slot with
        # weight 1: the whole MoE layer is one pass of the thread pool. Wider shared MLPs
        # (n_shared_experts > 1) run beside it.
        self.fused_shared = cfg.n_shared_experts == 1
        self.experts = load_experts(ck, p, cfg, expert_dtype, with_shared=self.fused_shared)
        self.shared = (
            MLP(
                ck,
                f"{p}.shared_experts",
                cfg.hidden_size,
                cfg.moe_intermediate_size * cfg.n_shared_experts,
            )
            if cfg.n_shared_experts > 1
            else None
        )
        self.num_threads = num_threads
        self.packed = None  # the experts' packed host buffer, once refmoe.slp made one
        self.seconds = 0.0  # time spent in the CPU expert kernels (for metrics)
        # routing as served (refmoe.routing): tokens each routed expert received, tokens routed
        # (counted where the router runs, so SLP on a device adds no copy to the host)
        self.routed = torch.zeros(cfg.n_routed_experts, dtype=torch.int64)
        self.routed_tokens = 0

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's (weights, ids) [T, K] for x [T, H], counted into `routed`."""
        weights, ids = self.gate(x)
        if self.routed.device != ids.device:
            self.routed = self.routed.to(ids.device)
        self.routed += torch.bincount(ids.reshape(-1), minlength=len(self.routed))
        self.routed_tokens += ids.shape[0]
        return weights, ids

    def __call__(self, x: torch.Tensor, streamed=None, layer: int = -1) -> torch.Tensor:
        """streamed: a refmoe.slp chunk that runs the routed experts on its device instead."""
        if streamed is not None:
            return streamed.moe(self, layer, x)
        weights, ids = self.route(x)  # [T, K]
        t, k = ids.shape
        tok = np.repeat(np.arange(t), k)
        ids_np, w_np = ids.reshape(-1).cpu().numpy(), weights.reshape(-1).float().cpu().numpy()
        if self.fused_shared:
            shared_slot = self.experts.num_experts - 1
            tok = np.concatenate([tok, np.arange(t)])
            ids_np = np.concatenate([ids_np, np.full(t, shared_slot)])
            w_np = np.concatenate([w_np, np.ones(t, np.float32)])
        xs = x.detach().float().cpu().contiguous().numpy()  # the experts live in host memory
        start = time.perf_counter()
        y = kernels.fused_moe(xs, tok, ids_np, w_np, self.experts, num_threads=self.num_threads)
        self.seconds += time.perf_counter() - start
        out = torch.from_numpy(y).to(x.device)
        return out + self.shared(x) if self.shared is not None else out


class Growing:
    """A tensor that grows along one dimension by appending; capacity doubles, so a decode step
    writes its own token instead of copying the whole cache (torch.cat would)."""

    def __init__(self, dim: int):
        self.dim, self.n, self.buf = dim, 0, None

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Append x; return the whole contents (a view)."""
        t = x.shape[self.dim]
        if self.buf is None or self.n + t > self.buf.shape[self.dim]:
            shape = list(x.shape)
            shape[self.dim] = max(2 * (self.n + t), 64)
            grown = x.new_empty(shape)
            if self.buf is not None:
                grown.narrow(self.dim, 0, self.n).copy_(self.view())
            self.buf = grown
        self.buf.narrow(self.dim, self.n, t).copy_(x)
        self.n += t
        return self.view()

    def view(self) -> torch.Tensor:
        return self.buf.narrow(self.dim, 0, self.n)


@dataclass(slots=True)
class KVCache:
    """One cache per layer, of the family's own kind (latent for MLA, k/v for GQA)."""

    layers: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def move(obj, device: torch.device) -> None:
    """Put a model part's tensors (and its parts') on device; routed experts stay in host
    memory for the CPU kernels."""
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            setattr(obj, name, value.to(device))
        elif isinstance(value, Linear):
            value.to(device)
        elif isinstance(value, list):
            for item in value:
                if type(item).__module__.startswith("refmoe.models"):
                    move(item, device)
        elif type(value).__module__.startswith("refmoe.models"):
            move(value, device)


class DecoderModel:
    """Embeddings, blocks, final norm and lm_head; a family supplies make_block and the rope
    dimension. forward(token ids) -> logits, with a KV cache of the family's per-layer caches."""

    rope_dim: int

    def __init__(
        self,
        ck: Checkpoint,
        cfg: ModelConfig,
        expert_dtype: str | None = None,
        num_threads: int | None = None,
        progress=None,
        device: str = "cpu",
    ):
        self.cfg = cfg
        h, v = cfg.hidden_size, cfg.vocab_size
        self.embed = load_dense(ck, "model.embed_tokens.weight", (v, h))
        layers = range(cfg.num_hidden_layers)
        self.blocks = [
            self.make_block(ck, i, cfg, expert_dtype, num_threads)
            for i in (progress(layers) if progress else layers)
        ]
        self.norm = load_dense(ck, "model.norm.weight", (h,))
        self.head = (
            None
            if cfg.tie_word_embeddings and "lm_head.weight" not in ck
            else Linear(ck, "lm_head.weight", (v, h))
        )
        self.inv_freq, self.rope_factor, self.softmax_scale = rope_parameters(cfg, self.rope_dim)
        self.trace = None  # a refmoe.trace.Trace to record per-layer spans into, or None
        self.device = resolve_device(device)
        if self.device.type != "cpu":
            move(self, self.device)
            # float32 projections on a GPU run on its tensor cores (TF32), as inference
            # engines do; the CPU path keeps full float32
            torch.backends.cuda.matmul.allow_tf32 = True

    def make_block(self, ck, layer, cfg, expert_dtype, num_threads):
        raise NotImplementedError

    def _rope(self, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + t, dtype=torch.float32, device=self.device)
        freqs = pos[:, None] * self.inv_freq[None, :]  # [T, rope/2]
        return freqs.cos() * self.rope_factor, freqs.sin() * self.rope_factor

    @torch.no_grad()
    def forward_batch(
        self, ids: list[torch.Tensor], caches: list[KVCache], locks=None
    ) -> torch.Tensor:
        """Several sequences in one pass: ids[i] [T_i] after caches[i]. Attention runs per
        sequence over its own cache; the MoE layers run once over every sequence's tokens, so
        each expert's weights are read once for the batch. Returns the logits of each
        sequence's last position, [B, V]. locks: (attention, experts) locks held around each
        layer's two halves, so that two batches in two threads alternate (dual-batch overlap)."""
        ropes = [self._rope(c.length, i.shape[0]) for i, c in zip(ids, caches)]
        xs = [self.embed[i.to(self.device)] for i in ids]
        for layer, block in enumerate(self.blocks):
            xs = block.batch(
                xs, ropes, self.softmax_scale, [c.layers[layer] for c in caches], self.trace, locks
            )
        x = torch.stack([x[-1] for x in xs])  # [B, H]
        x = rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        return x @ self.embed.T if self.head is None else self.head(x)

    def kv_bytes_per_token(self) -> int:
        """Host or device bytes one cached token takes, all layers together."""
        return sum(block.attn.cache_bytes_per_token() for block in self.blocks)

    def new_cache(self) -> KVCache:
        return KVCache([block.attn.new_cache() for block in self.blocks])

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: KVCache, experts=None, cp=None) -> torch.Tensor:
        """ids [T] (the next T tokens after the cache) -> logits [T, V] float32.
        experts: a refmoe.slp chunk that runs the routed experts (stream-loading prefill).
        cp: a refmoe.dslp.ContextParallel when the chunk is split across ranks: ids are this
        rank's slice, at cp.offset within the chunk; every rank's cache gets the whole chunk."""
        t, ids = ids.shape[0], ids.to(self.device)
        first = cache.length + (cp.offset if cp is not None else 0)
        pos = torch.arange(first, first + t, dtype=torch.float32, device=self.device)
        freqs = pos[:, None] * self.inv_freq[None, :]  # [T, rope/2]
        cos, sin = freqs.cos() * self.rope_factor, freqs.sin() * self.rope_factor
        x = self.embed[ids]  # [T, H]
        try:
            for block, layer_cache in zip(self.blocks, cache.layers):
                x = block(x, cos, sin, self.softmax_scale, layer_cache, self.trace, experts, cp)
        finally:
            if experts is not None:
                experts.close()
        x = rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        return x @ self.embed.T if self.head is None else self.head(x)


class Block:
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def batch(
        self, xs: list[torch.Tensor], ropes, softmax_scale, caches, trace=None, locks=None
    ) -> list[torch.Tensor]:
        """Several sequences: attention over each one's own cache (its projections batched),
        then the FFN over all their tokens at once (see DecoderModel.forward_batch)."""
        attn_lock, ffn_lock = locks or (nullcontext(), nullcontext())
        tokens = sum(x.shape[0] for x in xs)
        with (
            attn_lock,
            maybe(
                trace,
                "device",
                "attention",
                f"attention L{self.layer}",
                tokens=tokens,
                sequences=len(xs),
            ),
        ):
            ys = self.attn.batch(
                [rms_norm(x, self.attn_norm, self.eps) for x in xs], ropes, softmax_scale, caches
            )
            xs = [x + y for x, y in zip(xs, ys)]
        sizes = [x.shape[0] for x in xs]
        x = torch.cat(xs)
        moe = isinstance(self.ffn, MoE)
        lane = "experts" if moe else "dense mlp"
        with (
            ffn_lock,
            maybe(
                trace,
                "cpu" if moe else "device",
                lane,
                f"{lane} L{self.layer}",
                tokens=tokens,
                sequences=len(xs),
            ),
        ):
            x = x + self.ffn(rms_norm(x, self.ffn_norm, self.eps))
        return list(x.split(sizes))

    def __init__(
        self, ck: Checkpoint, layer: int, cfg: ModelConfig, attn, expert_dtype, num_threads
    ):
        p = f"model.layers.{layer}"
        self.layer, self.eps = layer, cfg.rms_norm_eps
        self.attn_norm = load_dense(ck, f"{p}.input_layernorm.weight", (cfg.hidden_size,))
        self.ffn_norm = load_dense(ck, f"{p}.post_attention_layernorm.weight", (cfg.hidden_size,))
        self.attn = attn
        self.ffn = (
            MoE(ck, f"{p}.mlp", cfg, expert_dtype, num_threads)
            if cfg.is_moe_layer(layer)
            else MLP(ck, f"{p}.mlp", cfg.hidden_size, cfg.intermediate_size)
        )

    def __call__(
        self, x, cos, sin, softmax_scale, cache, trace=None, streamed=None, cp=None
    ) -> torch.Tensor:
        tokens = x.shape[0]
        with maybe(trace, "device", "attention", f"attention L{self.layer}", tokens=tokens):
            x = x + self.attn(
                rms_norm(x, self.attn_norm, self.eps), cos, sin, softmax_scale, cache, cp
            )
        moe = isinstance(self.ffn, MoE)
        lane = "experts" if moe else "dense mlp"
        where = ("slp" if streamed is not None else "cpu") if moe else "device"
        with maybe(trace, where, lane, f"{lane} L{self.layer}", tokens=tokens):
            xn = rms_norm(x, self.ffn_norm, self.eps)
            return x + (self.ffn(xn, streamed, self.layer) if moe else self.ffn(xn))
