"""The MoE block: routed experts loaded once into a CPU kernel format (the one host copy the
CPU kernels read and SLP streams), the router (DeepSeek-V3's noaux_tc and Qwen3's softmax
top-k), and the block that runs them (routed experts on the CPU kernels, the shared expert
fused into the same call or beside it).

Legend: T = tokens in this call, H = hidden, E = routed experts, K = experts per token.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from refmoe import kernels
from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.kernels import formats
from refmoe.models.layers import FLOAT_DTYPES, MLP, load_dense

# ---------------------------------------------------------------------------------------------
# Loading: routed experts (one host copy, kernel formats)
# ---------------------------------------------------------------------------------------------


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
# The router and the block
# ---------------------------------------------------------------------------------------------


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
        return out + self.shared(x) if self.shared is not None else out
