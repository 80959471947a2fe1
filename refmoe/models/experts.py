"""The MoE block: routed experts loaded once into a CPU kernel format (the one host copy the
CPU kernels read and SLP streams), the router (DeepSeek-V3's noaux_tc, as GLM and MiniMax use
it; Qwen3's softmax top-k; gpt-oss's softmax over the top-k logits), and the block that runs
them (routed experts on the CPU kernels, the shared expert fused into the same call or beside
it). Where each family keeps these tensors: MoENames.

Legend: T = tokens in this call, H = hidden, E = routed experts, K = experts per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from refmoe import kernels
from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.kernels import formats
from refmoe.models.layers import FLOAT_DTYPES, MLP, load_dense

# ---------------------------------------------------------------------------------------------
# Loading: routed experts (one host copy, kernel formats)
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Stored:
    """One expert projection as the checkpoint holds it (views of the mapped shard)."""

    fmt: str  # fp8, bf16 (any float), mxfp4, nvfp4, int4g
    w: np.ndarray
    scale: np.ndarray | None = None
    global_scale: float = 1.0
    group: int = 0
    float_dtype: str = ""  # float32 / float16 / bfloat16 for the float formats
    block: tuple[int, int] = (formats.BLOCK, formats.BLOCK)  # FP8: the block one scale covers

    def dense(self, cols: int) -> np.ndarray:
        """Exact float64 [rows, cols]."""
        s = self.scale
        if s is None:  # a float weight
            if self.float_dtype == "bfloat16":
                return formats.bf16_decode(self.w)
            return np.asarray(self.w, np.float64)
        if self.fmt == "fp8":
            return formats.fp8_dequantize(self.w, s, self.block)
        if self.fmt == "mxfp4":
            return formats.mxfp4_dequantize(self.w, s, cols)
        if self.fmt == "nvfp4":
            return formats.nvfp4_dequantize(self.w, s, self.global_scale, cols)
        return formats.int4g_dequantize(self.w, s, cols, self.group)


def stored_format(ck: Checkpoint, base: str) -> str:
    """The format of projection `base` (e.g. model.layers.1.mlp.experts.0.gate_proj) as the
    checkpoint stores it, told by its tensors' names and dtypes."""
    if f"{base}.weight_blocks" in ck:
        return "mxfp4"
    if f"{base}.weight_packed" in ck:
        return "int4g"
    if f"{base}.weight_scale_2" in ck:
        return "nvfp4"
    dtype = ck.dtype(f"{base}.weight")
    if dtype == "int8" and f"{base}.weight_scale_inv" in ck:
        return "mxfp4"  # DeepSeek-V4: E2M1 pairs in int8, E8M0 scales per 32 (MXFP4's bytes)
    return "fp8" if dtype == "float8_e4m3fn" else "bf16"


def read_projection(ck: Checkpoint, base: str, shape: tuple[int, int], group: int) -> Stored:
    """Projection `base` [rows, cols] as stored: gpt-oss's MXFP4 suffixes per projection
    (weight_blocks uint8 [rows, cols/32, 16], weight_scales uint8 E8M0), ModelOpt NVFP4
    (weight uint8, weight_scale E4M3, weight_scale_2 float32), compressed-tensors
    pack-quantized INT4 (weight_packed int32, weight_scale bf16, weight_shape), FP8 (weight
    E4M3 with DeepSeek's weight_scale_inv per block or compressed-tensors' weight_scale per
    block, channel or tensor: Checkpoint.fp8_scales) or a float weight."""
    rows, cols = shape
    fmt = stored_format(ck, base)
    if fmt == "mxfp4" and f"{base}.weight_blocks" not in ck:  # DeepSeek-V4's FP4 experts
        if cols % formats.MX_BLOCK:
            raise ValueError(
                f"{ck.dir}: tensor {base}.weight: FP4 experts need their {cols} columns in "
                f"whole blocks of {formats.MX_BLOCK}"
            )
        nb = cols // formats.MX_BLOCK
        w = ck.get(f"{base}.weight", (rows, cols // 2), ("int8",)).view(np.uint8)
        s = ck.get(f"{base}.weight_scale_inv", (rows, nb), ("float8_e8m0fnu",))
        return Stored(fmt, w.reshape(rows, nb, 16), s)
    if fmt == "mxfp4":
        nb = -(-cols // formats.MX_BLOCK)
        w = ck.get(f"{base}.weight_blocks", (rows, nb, 16), ("uint8",))
        return Stored(fmt, w, ck.get(f"{base}.weight_scales", (rows, nb), ("uint8",)))
    if fmt == "nvfp4":
        nb = -(-cols // formats.NV_BLOCK)
        w = ck.get(f"{base}.weight", (rows, nb * 8), ("uint8",))
        s = ck.get(f"{base}.weight_scale", (rows, nb), ("float8_e4m3fn",))
        g = np.asarray(ck.get(f"{base}.weight_scale_2", None, ("float32",))).reshape(-1)
        if g.size != 1 or not g[0] > 0:
            raise ValueError(f"{ck.dir}: tensor {base}.weight_scale_2: one positive float, got {g}")
        return Stored(fmt, w, s, float(g[0]))
    if fmt == "int4g":
        if group == 0:
            raise ValueError(
                f"{ck.dir}: tensor {base}.weight_packed is compressed-tensors INT4 but "
                "config.json has no compressed-tensors quantization_config (its group size)"
            )
        w = ck.get(f"{base}.weight_packed", (rows, -(-cols // 8)), ("int32",))
        s = ck.get(f"{base}.weight_scale", (rows, -(-cols // group)), ("bfloat16",))
        if f"{base}.weight_shape" in ck:
            declared = [int(v) for v in np.asarray(ck.get(f"{base}.weight_shape")).reshape(-1)]
            if declared != [rows, cols]:
                raise ValueError(
                    f"{ck.dir}: tensor {base}.weight_shape is {declared}, the config needs "
                    f"{[rows, cols]}"
                )
        return Stored(fmt, w, s, group=group)
    w = ck.get(f"{base}.weight", shape, FLOAT_DTYPES + ("float8_e4m3fn",))
    if fmt == "fp8":
        scale, block = ck.fp8_scales(f"{base}.weight", shape)
        return Stored(fmt, w, scale, block=block)
    return Stored(fmt, w, float_dtype=ck.dtype(f"{base}.weight"))


EXPERT_DTYPES = formats.ENCODINGS


@dataclass(frozen=True, slots=True)
class MoENames:
    """Where a family keeps its MoE block's tensors, relative to the block's prefix."""

    router: str = "gate"  # {router}.weight [E, H] (and {router}.bias with cfg.router_bias)
    correction_bias: str = "gate.e_score_correction_bias"  # sigmoid routers: for the choice
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # gpt-oss: every expert in one tensor per projection, experts.gate_up_proj[_blocks,
    # _scales, _bias] with gate and up interleaved by rows, experts.down_proj[...]
    fused: bool = False
    # Qwen3-Next: one shared expert (shared_expert) scaled per token by sigmoid(x . w) of
    # shared_expert_gate.weight [1, H]; "" where the shared experts have no gate
    shared_gate: str = ""


DEEPSEEK = MoENames()  # DeepSeek-V3, Qwen3-MoE, GLM-4.5
MINIMAX = MoENames(correction_bias="e_score_correction_bias", projections=("w1", "w3", "w2"))
GPT_OSS = MoENames(router="router", fused=True)
QWEN3_NEXT = MoENames(shared_gate="shared_expert_gate")


def read_fused(ck: Checkpoint, prefix: str, cfg: ModelConfig, e: int) -> list[Stored]:
    """Expert e of gpt-oss's fused tensors: gate, up, down as Stored [rows, cols]. As
    released: MXFP4 experts.gate_up_proj_blocks [E, 2I, H/32, 16] and _scales [E, 2I, H/32],
    gate on even rows, up on odd (each copied out once into its own contiguous rows: the bytes
    as stored, reordered); as transformers saves a float model: experts.gate_up_proj
    [E, H, 2I] (x @ W, gate on even columns)."""
    h, i, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    gu, dn = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
    if f"{gu}_blocks" in ck:
        nh, ni = -(-h // formats.MX_BLOCK), -(-i // formats.MX_BLOCK)
        gub = ck.get(f"{gu}_blocks", (n, 2 * i, nh, 16), ("uint8",))[e]
        gus = ck.get(f"{gu}_scales", (n, 2 * i, nh), ("uint8",))[e]
        return [
            Stored("mxfp4", np.ascontiguousarray(gub[0::2]), np.ascontiguousarray(gus[0::2])),
            Stored("mxfp4", np.ascontiguousarray(gub[1::2]), np.ascontiguousarray(gus[1::2])),
            Stored(
                "mxfp4",
                ck.get(f"{dn}_blocks", (n, h, ni, 16), ("uint8",))[e],
                ck.get(f"{dn}_scales", (n, h, ni), ("uint8",))[e],
            ),
        ]
    w = ck.get(gu, (n, h, 2 * i), FLOAT_DTYPES)[e]
    d = ck.get(dn, (n, i, h), FLOAT_DTYPES)[e]
    dt = ck.dtype(gu)
    return [
        Stored("bf16", np.ascontiguousarray(w[:, 0::2].T), float_dtype=dt),
        Stored("bf16", np.ascontiguousarray(w[:, 1::2].T), float_dtype=dt),
        Stored("bf16", np.ascontiguousarray(d.T), float_dtype=ck.dtype(dn)),
    ]


def read_stacked(ck: Checkpoint, prefix: str, cfg: ModelConfig, e: int) -> list[Stored]:
    """Expert e where every expert sits in one float tensor per projection, as transformers 5
    keeps them and Qwen3.5 releases them: experts.gate_up_proj [E, 2I, H] (gate rows, then
    up rows) and experts.down_proj [E, H, I]. Each part is a view of the mapped file."""
    h, i, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    gu, dn = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
    w = ck.get(gu, (n, 2 * i, h), FLOAT_DTYPES)[e]  # [2I, H]
    return [
        Stored("bf16", w[:i], float_dtype=ck.dtype(gu)),
        Stored("bf16", w[i:], float_dtype=ck.dtype(gu)),
        Stored("bf16", ck.get(dn, (n, h, i), FLOAT_DTYPES)[e], float_dtype=ck.dtype(dn)),
    ]


def fused_biases(ck: Checkpoint, prefix: str, cfg: ModelConfig) -> list[np.ndarray]:
    """gpt-oss's expert biases, read once per layer: gate [E, I], up [E, I] (the even and odd
    columns of gate_up_proj_bias) and down [E, H], float32."""
    h, i, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    gub = load_dense(ck, f"{prefix}.experts.gate_up_proj_bias", (n, 2 * i)).numpy()
    down = load_dense(ck, f"{prefix}.experts.down_proj_bias", (n, h)).numpy()
    return [np.ascontiguousarray(gub[:, 0::2]), np.ascontiguousarray(gub[:, 1::2]), down]


def load_experts(
    ck: Checkpoint,
    prefix: str,
    cfg: ModelConfig,
    expert_dtype: str | None,
    with_shared: bool = False,
    names: MoENames = DEEPSEEK,
) -> kernels.ExpertWeights:
    """Routed experts of one layer in a kernel format (with_shared: the shared expert as one
    more slot, index n_routed_experts). As stored where possible (FP8 codes, BF16 bits and the
    4-bit formats are views of the mapped checkpoint: no copy); converted otherwise
    (expert_dtype, or a shared expert stored in another format)."""
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    declared, group = cfg.expert_format
    gate_name, up_name, down_name = names.projections
    # every expert in one tensor per projection: gpt-oss's layout (names.fused), or stacked
    # (transformers 5, Qwen3.5) where a family that names experts one by one has none
    stacked = not names.fused and f"{prefix}.experts.gate_up_proj" in ck
    if names.fused or stacked:
        first = f"{prefix}.experts.gate_up_proj"
        stored = "mxfp4" if f"{first}_blocks" in ck else "bf16"
    else:
        first = f"{prefix}.experts.0.{gate_name}"
        stored = stored_format(ck, first)
    four_bit = kernels.LUT4_FORMATS
    if stored != declared and (stored in four_bit or declared in four_bit):
        # a 4-bit format on either side must be the same on both
        raise ValueError(
            f"{ck.dir}: tensor {first} is stored as {stored}, but config.json's "
            f"quantization_config says {declared}"
        )
    fmt = expert_dtype or stored
    group = group if stored == "int4g" else 32  # INT4-g: the stored group, else Kimi's 32
    if fmt not in EXPERT_DTYPES:
        raise ValueError(f"expert dtype must be one of {', '.join(EXPERT_DTYPES)}, got {fmt!r}")
    # FP8: the block of the stored scales, which a projection converted to FP8 takes too
    block = (formats.BLOCK, formats.BLOCK)
    if stored == "fp8" and fmt == "fp8":
        block = read_projection(ck, first, (i, h), group).block
    parts: dict[str, list[list]] = {k: [[], [], []] for k in ("gate", "up", "down")}
    biases: list = fused_biases(ck, prefix, cfg) if names.fused else [[], [], []]  # rows: experts
    slots = [f"experts.{e}" for e in range(cfg.n_routed_experts)]
    for e, slot in enumerate(slots + (["shared_experts"] if with_shared else [])):
        kinds = (("gate", (i, h)), ("up", (i, h)), ("down", (h, i)))
        if names.fused:
            mats = read_fused(ck, prefix, cfg, e)
        elif stacked and e < cfg.n_routed_experts:
            mats = read_stacked(ck, prefix, cfg, e)
        else:
            mats = [
                read_projection(ck, f"{prefix}.{slot}.{name}", shape, group)
                for name, (_, shape) in zip((gate_name, up_name, down_name), kinds)
            ]
        for (kind, shape), st in zip(kinds, mats):
            if st.fmt == fmt and (fmt != "bf16" or st.float_dtype == "bfloat16"):
                if fmt == "fp8" and st.block != block:
                    raise ValueError(
                        f"{ck.dir}: {prefix}.{slot}: FP8 scales per {st.block}, the layer's "
                        f"other experts per {block}"
                    )
                w, s, g = st.w, st.scale, st.global_scale
            elif fmt == "fp8":
                w, s = formats.fp8_quantize(st.dense(shape[1]), block)
                g = 1.0
            else:
                w, s, g = formats.encode(st.dense(shape[1]), fmt, group)
            for part, value in zip(parts[kind], (w, s, g)):
                part.append(value)
    lut4 = fmt in kernels.LUT4_FORMATS
    return kernels.ExpertWeights(
        fmt,
        h,
        i,
        parts["gate"][0],
        parts["up"][0],
        parts["down"][0],
        [] if fmt == "bf16" else parts["gate"][1],
        [] if fmt == "bf16" else parts["up"][1],
        [] if fmt == "bf16" else parts["down"][1],
        group_size=group if fmt == "int4g" else 128,
        fp8_block=block,
        validate=lut4,  # FP8 codes were checked by Checkpoint.get; 4-bit scales here (cheap)
        gate_global=parts["gate"][2] if fmt == "nvfp4" else [],
        up_global=parts["up"][2] if fmt == "nvfp4" else [],
        down_global=parts["down"][2] if fmt == "nvfp4" else [],
        activation=cfg.hidden_act,
        alpha=cfg.swiglu_alpha,
        limit=cfg.swiglu_limit,
        gate_bias=list(biases[0]),
        up_bias=list(biases[1]),
        down_bias=list(biases[2]),
    )


# ---------------------------------------------------------------------------------------------
# The router and the block
# ---------------------------------------------------------------------------------------------


class Gate:
    """The router. sigmoid (DeepSeek-V3's noaux_tc, GLM, MiniMax): sigmoid scores, correction
    bias for selection only, the top topk_group groups by the sum of their two best biased
    scores, top-k experts within them. softmax (Qwen3-MoE): softmax scores, plain top-k. Weights
    are the unbiased scores, normalized when norm_topk_prob, times routed_scaling_factor.
    softmax_topk (gpt-oss): the top-k logits (the router's linear has a bias), softmax over
    those k. sqrtsoftplus (DeepSeek-V4): sqrt(softplus(logits)) scores, as sigmoid's. A hash
    router (DeepSeek-V4's first layers, a `tid2eid` [V, K] table beside its weight) takes the
    experts from the token ids instead (`tokens`, set by the block before the call); their
    weights are still the scores'."""

    def __init__(self, ck: Checkpoint, p: str, cfg: ModelConfig, names: MoENames = DEEPSEEK):
        self.cfg = cfg
        e = cfg.n_routed_experts
        self.weight = load_dense(ck, f"{p}.{names.router}.weight", (e, cfg.hidden_size))
        self.logit_bias = (
            load_dense(ck, f"{p}.{names.router}.bias", (e,)) if cfg.router_bias else None
        )
        bias = f"{p}.{names.correction_bias}"
        self.bias = load_dense(ck, bias, (e,)) if bias in ck else torch.zeros(e)
        table = f"{p}.{names.router}.tid2eid"
        self.tid2eid = None
        if table in ck:
            self.tid2eid = torch.from_numpy(
                np.array(
                    ck.get(table, (cfg.vocab_size, cfg.num_experts_per_tok), ("int64", "int32"))
                )
            ).long()
            if self.tid2eid.numel() and not (
                0 <= int(self.tid2eid.min()) and int(self.tid2eid.max()) < e
            ):
                raise ValueError(f"{ck.dir}: tensor {table}: expert ids outside [0, {e})")
        self.tokens: torch.Tensor | None = None  # the token ids of x, for a hash router

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, K] float32, expert ids [T, K])."""
        cfg, t = self.cfg, x.shape[0]
        logits = x.float() @ self.weight.float().T  # [T, E]
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        if cfg.scoring_func == "softmax_topk":
            top, ids = logits.topk(cfg.num_experts_per_tok, dim=-1)  # [T, K]
            return top.softmax(-1) * cfg.routed_scaling_factor, ids
        if cfg.scoring_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        else:
            scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        if self.tid2eid is not None:
            if self.tokens is None or self.tokens.shape[0] != t:
                raise ValueError("a hash router needs the token ids of its inputs (Gate.tokens)")
            ids = self.tid2eid.to(x.device)[self.tokens.to(x.device)]  # [T, K]
            weights = scores.gather(1, ids)
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            return weights * cfg.routed_scaling_factor, ids
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
        names: MoENames = DEEPSEEK,
    ):
        self.gate = Gate(ck, p, cfg, names)
        # One shared expert the size of a routed one joins the fused call as one more slot with
        # weight 1: the whole MoE layer is one pass of the thread pool. Wider shared MLPs
        # (n_shared_experts > 1) run beside it.
        # (A shared expert stored in another format than the routed ones, as 4-bit checkpoints
        # keep it in BF16, runs beside them rather than be requantized.)
        self.fused_shared = cfg.n_shared_experts == 1 and (
            expert_dtype is not None
            or stored_format(ck, f"{p}.shared_experts.gate_proj")
            == stored_format(ck, f"{p}.experts.0.gate_proj")
        )
        self.experts = load_experts(ck, p, cfg, expert_dtype, self.fused_shared, names)
        self.shared = (
            MLP(
                ck,
                f"{p}.shared_experts",
                cfg.hidden_size,
                cfg.moe_intermediate_size * cfg.n_shared_experts,
                cfg.swiglu_limit if cfg.hidden_act == "silu_clamp" else 0.0,
            )
            if cfg.n_shared_experts >= 1 and not self.fused_shared
            else None
        )
        self.shared_gate = None  # Qwen3-Next's gated shared expert
        if names.shared_gate and cfg.shared_expert_intermediate_size:
            size = cfg.shared_expert_intermediate_size
            self.shared = MLP(ck, f"{p}.shared_expert", cfg.hidden_size, size)
            self.shared_gate = load_dense(
                ck, f"{p}.{names.shared_gate}.weight", (1, cfg.hidden_size)
            )
        self.num_threads = num_threads
        self.packed = None  # the experts' packed host buffer (refmoe.expert_store.pack_model)
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
        return out + self.shared_out(x)

    def shared_out(self, x: torch.Tensor) -> torch.Tensor | float:
        """What the shared experts that run beside the routed ones add for x [T, H] (0.0
        where none does): their MLP, times sigmoid(x . w) where they are gated (Qwen3-Next)."""
        if self.shared is None:
            return 0.0
        y = self.shared(x)
        return y * torch.sigmoid(x @ self.shared_gate.T) if self.shared_gate is not None else y
