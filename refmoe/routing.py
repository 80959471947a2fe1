"""Routing as the engine served it: how many tokens each routed expert received, per MoE
layer, counted by the router itself (refmoe.models.experts.MoE.route) on every path (CPU
experts, SLP, DSLP). `refmoe bench serve --trace` stores it in the trace's metadata, and the
simulator replays it (`refmoe-sim predict/serve --routing`) in place of uniform routing.

The record: {"n_routed_experts": E, "num_experts_per_tok": K,
             "layers": {"<layer index>": {"tokens": T, "experts": [E counts]}}}
where each count is how many of the layer's T routed tokens picked that expert (so the
counts sum to T * K).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _moe_layers(model) -> list[tuple[int, Any]]:
    return [(i, b.ffn) for i, b in enumerate(model.blocks) if hasattr(b.ffn, "routed")]


def record(model) -> dict:
    """The routing counted so far by every MoE layer of `model`."""
    cfg = model.cfg
    return {
        "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "layers": {
            str(i): {"tokens": int(moe.routed_tokens), "experts": moe.routed.cpu().tolist()}
            for i, moe in _moe_layers(model)
            if moe.routed_tokens
        },
    }


def reset(model) -> None:
    """Start counting afresh (a benchmark's warm-up should not count)."""
    for _, moe in _moe_layers(model):
        moe.routed.zero_()
        moe.routed_tokens = 0


def popularity(rec: dict, source: str = "routing") -> dict[int, np.ndarray]:
    """Per layer, the probability that a token picks each expert (counts / tokens, summing to
    K), checked: a record whose counts cannot come from top-K routing is refused, naming
    `source` and the layer."""
    try:
        e, k, layers = int(rec["n_routed_experts"]), int(rec["num_experts_per_tok"]), rec["layers"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{source}: not a routing record (needs n_routed_experts, "
            f"num_experts_per_tok and layers)"
        ) from None
    out = {}
    for name, layer in layers.items():
        try:
            tokens, counts = int(layer["tokens"]), np.asarray(layer["experts"], np.float64)
            index = int(name)
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{source}: layer {name!r} needs an integer index, tokens and experts"
            ) from None
        if (
            counts.shape != (e,)
            or tokens < 1
            or (counts < 0).any()
            or (counts > tokens).any()
            or counts.sum() != tokens * k
        ):
            raise ValueError(
                f"{source}: layer {name}: expected {e} counts of at most "
                f"{tokens} tokens each, summing to tokens x {k}"
            )
        out[index] = counts / tokens
    if not out:
        raise ValueError(f"{source}: the routing record has no layer")
    return out
