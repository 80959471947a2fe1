"""One forward pass on the simulated machine, as the engine runs it: a step over some tokens
of some sequences (attention, dense layers, experts on the CPU kernels), and an SLP prefill
(a loader streaming each MoE layer's experts over the GPUs' PCIe links into a ring of two
layers while the GPUs compute, chunk by chunk, with DSLP's exchange)."""

from __future__ import annotations

from dataclasses import dataclass, field

import simpy

from refmoe import costmodel
from refmoe.config import ModelConfig
from sim import costs
from sim.machine import Machine


def _step(
    m: Machine, cfg: ModelConfig, tokens: int, out: dict, sequences: int = 1, contexts: tuple = ()
):
    """One forward over `tokens` new tokens of `sequences` sequences (a prefill chunk of one,
    or a decode step of `tokens` whose sequences have `contexts` tokens cached). The
    attention block's per-layer cost beyond its weights (the scores, norms, small ops) is
    paid once per sequence, as the engine attends each sequence on its own, plus its cost for
    the cached tokens (Machine.attention_extra)."""
    hw = m.hw
    layer_overhead = (
        (hw.gpus[0].layer_overhead_us if hw.gpus else hw.cpu.layer_overhead_us) * 1e-6 * sequences
    )
    attn_flops = costs.attention_flops(cfg, tokens)
    extra = m.attention_extra(cfg, tokens, contexts)
    k = cfg.num_experts_per_tok

    def layer(i: int, cost: costs.LayerCost):
        t0 = m.env.now
        yield from m.device(cost.attention_bytes, layer_overhead, tokens, attn_flops)
        yield from m.work(*extra)
        m.mark("device", "attention", f"attention L{i}", t0, tokens=tokens)
        t0 = m.env.now
        if cost.expert_bytes:
            one = costs.routed_expert_bytes(cfg) * m.expert_scale
            # each routed expert serves a Binomial(tokens, k/E) number of tokens, and the
            # kernel's rate depends steeply on it (one token: the GEMV; more: tiles), so the
            # expected time is a sum over that distribution, not the rate at the mean; the
            # GEMV's rate is the stored format's
            weights = 3 * cfg.moe_intermediate_size * cfg.hidden_size
            yield from m.cpu_fp8_mixed(
                one,
                cfg.n_routed_experts,
                tokens,
                k / cfg.n_routed_experts,
                layer=i,
                fmt=cfg.expert_format[0],
                bytes_per_weight=one / weights,
            )
            if cfg.n_shared_experts:  # in the same fused call
                yield from m.cpu_fp8(
                    costs.shared_expert_bytes(cfg) * m.expert_scale, tokens, moe=True
                )
            yield m.env.timeout(hw.cpu.moe_overhead_us * 1e-6)
            m.mark("cpu", "experts", f"experts L{i}", t0, tokens=tokens)
        else:
            yield from m.device(cost.dense_bytes, 0.0, tokens, 2.0 * tokens * cost.dense_bytes)
            m.mark("device", "dense mlp", f"dense mlp L{i}", t0, tokens=tokens)

    for i, cost in enumerate(costs.layer_costs(cfg)):
        # what a layer's operations depend on: its costs and, for an MoE layer, its routing
        routing = tuple(m.groups(i, cfg.n_routed_experts, k)) if cost.expert_bytes else ()
        yield from m.layer(i, (cost, routing), lambda i=i, cost=cost: layer(i, cost))
    yield from m.device(costs.head_bytes(cfg), 0.0, 1)  # logits of the last position only
    out["t"] = m.env.now


@dataclass(slots=True)
class SlpLayer:
    """One layer of one chunk of an SLP prefill, each step as (seconds, demand) per GPU: its
    attention; for an MoE layer the copy of its experts, their compute and (DSLP) the
    exchange of hidden states; else its dense MLP (Machine.pipeline runs them)."""

    layer: int
    tokens: int
    attention: list
    load: list = field(default_factory=list)
    experts: list = field(default_factory=list)
    exchange: list = field(default_factory=list)
    dense: list = field(default_factory=list)


def _slp_prefill(
    m: Machine,
    cfg: ModelConfig,
    tokens: int,
    devices: int | list[int],
    out: dict,
    chunk_tokens: int = costmodel.SLP_CHUNK_TOKENS["cuda"],
):
    """SLP over `devices` GPUs (a count: the first N; or their indices), chunk by chunk as
    the engine runs it (at most `chunk_tokens` a chunk, each a full pass over the experts):
    per MoE layer, each GPU streams its 1/N of the expert slots over its own PCIe link while
    computing; the ring holds two layers, so the loader runs at most one layer ahead. The
    chunk's tokens are split in context-parallel slices as the engine splits them
    (costmodel.context_split: the earlier ranks take more tokens, so that their causal
    attention costs about the same); each GPU computes the attention and dense layers of its
    own slice, and the experts it holds for every token of the chunk."""
    env, hw = m.env, m.hw
    if not hw.gpus:  # the engine without a GPU streams to the CPU itself
        yield from _cpu_slp_prefill(m, cfg, tokens, out)
        return
    ids = list(range(devices)) if isinstance(devices, int) else list(devices)
    n, gpus = len(ids), [hw.gpus[d] for d in ids]
    chunks = [(lo, min(chunk_tokens, tokens - lo)) for lo in range(0, tokens, chunk_tokens)]
    streamed: dict = {}  # (the layer's routing, tokens) -> its copy to each GPU

    def load(layer: int, t: int) -> list[tuple[float, dict]]:
        key = (tuple(m.groups(layer, cfg.n_routed_experts, cfg.num_experts_per_tok)), t)
        if key not in streamed:
            nbytes = _streamed_bytes(m, cfg, layer, t) / n
            streamed[key] = [m.dma_op(nbytes, d) for d in ids]
        return streamed[key]

    def on_gpus(seconds_of) -> list[tuple[float, dict]]:
        """seconds_of(k, gpu): the k-th GPU's part of a step."""
        return [(seconds_of(k, g), {m.gpu[d]: 1.0}) for k, (d, g) in enumerate(zip(ids, gpus))]

    overhead = gpus[0].layer_overhead_us * 1e-6
    fmt = cfg.expert_format[0]  # BF16 or FP8 matmuls on the devices (GPU.matmul_precision)
    plan = []
    for lo, t in chunks:
        sizes = costmodel.context_split(cfg, t, n, lo)
        starts = [lo + sum(sizes[:k]) for k in range(n)]
        attn = [costs.attention_flops(cfg, size, start) for size, start in zip(sizes, starts)]
        # DSLP: each GPU receives the others' share of the chunk's hidden states (all-gather)
        # and of the summed expert outputs (reduce-scatter), float32, over its own PCIe link,
        # where it shares the link with the next layer's stream (no NVLink on these boxes)
        exchange = 2 * t * cfg.hidden_size * 4 * (n - 1) / n if n > 1 else 0.0
        flops = costmodel.expert_flops(cfg, t) / n
        experts = on_gpus(lambda k, g: flops / (g.expert_rate(fmt) * 1e12))
        received = [
            (exchange / (hw.gpus[d].pcie_gbps * 1e9), {m.pcie[d]: hw.gpus[d].pcie_gbps * 1e9})
            for d in ids
        ]
        for i, cost in enumerate(costs.layer_costs(cfg)):
            attention = on_gpus(
                lambda k, g: (
                    max(
                        cost.attention_bytes / (g.hbm_gbps * g.hbm_efficiency * 1e9),
                        attn[k] / (g.attention_tflops * 1e12),
                    )
                    + overhead
                )
            )
            if cost.expert_bytes:
                moe = SlpLayer(i, t, attention, load(i, t), experts, received if exchange else [])
                plan.append(moe)
                continue
            dense = on_gpus(
                lambda k, g: max(
                    cost.dense_bytes / (g.hbm_gbps * g.hbm_efficiency * 1e9),
                    2.0 * sizes[k] * cost.dense_bytes / (g.attention_tflops * 1e12),
                )
            )
            plan.append(SlpLayer(i, t, attention, dense=dense))
    yield from m.pipeline(plan, 2)  # the engine's ring holds two layers
    yield from m.device(costs.head_bytes(cfg), 0.0, 1, gpu=ids[-1])
    out["t"] = env.now


def _streamed_bytes(m: Machine, cfg: ModelConfig, layer: int, tokens: int) -> float:
    """The bytes SLP streams of one MoE layer for a chunk of `tokens` tokens: every expert
    slot (routed and shared), or only those the chunk routes to when it does not hit them all
    (costmodel.streaming_for), at the layer's routing (Machine.groups)."""
    slots: float = cfg.n_routed_experts + cfg.n_shared_experts
    hit = sum(
        count * (1 - (1 - q) ** tokens)
        for count, q in m.groups(layer, cfg.n_routed_experts, cfg.num_experts_per_tok)
    )
    if costmodel.streaming_for(cfg.n_routed_experts, hit) == "selective":
        slots = hit + cfg.n_shared_experts
    return slots * costmodel.expert_bytes(cfg)


def _cpu_slp_prefill(
    m: Machine,
    cfg: ModelConfig,
    tokens: int,
    out: dict,
    chunk_tokens: int = costmodel.SLP_CHUNK_TOKENS["cpu"],
):
    """SLP where the device is the CPU (refmoe.slp on a machine without a GPU): attention
    and dense layers as a CPU prefill runs them (_step's costs, plus each later chunk's
    scores over the chunks before it); per MoE layer, a loader thread copies the streamed
    experts' bytes into the ring in host memory (one core's share, DRAM read and write) at
    most one layer ahead, and the compute lane dequantizes them and runs torch's matmuls on
    every core (CPU.slp_rates, as refmoe.costmodel.measure_device times them)."""
    env, cpu = m.env, m.hw.cpu
    copy_gbps, dequant_gbps, gflops = cpu.slp_rates()
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    chunks = [(lo, min(chunk_tokens, tokens - lo)) for lo in range(0, tokens, chunk_tokens)]
    loaded = {(c, i): env.event() for c in range(len(chunks)) for i in layers}
    ring = simpy.Container(env, capacity=2, init=2)  # two layers of slots
    streamed = {
        (c, i): _streamed_bytes(m, cfg, i, t) for c, (_, t) in enumerate(chunks) for i in layers
    }
    one_core = {core: 1.0 / cpu.cores for core in m.cores}

    def loader():
        for c in range(len(chunks)):
            for i in layers:
                yield ring.get(1)
                nbytes = streamed[(c, i)]
                rate = copy_gbps * 1e9
                demand = {**one_core, **{d: 2 * rate / len(m.dram) for d in m.dram}}
                yield from m.work(nbytes / rate, demand)
                loaded[(c, i)].succeed()

    env.process(loader())
    every_core = {core: 1.0 for core in m.cores}
    for c, (lo, t) in enumerate(chunks):
        attn_flops = costs.attention_flops(cfg, t)
        extra = m.attention_extra(cfg, t)
        past = m.prefix_attention(cfg, t, lo)
        for i, cost in enumerate(costs.layer_costs(cfg)):
            t0 = env.now
            yield from m.device(cost.attention_bytes, cpu.layer_overhead_us * 1e-6, t, attn_flops)
            yield from m.work(*extra)
            yield from m.work(*past)
            m.mark("device", "attention", f"attention L{i}", t0, tokens=t)
            t0 = env.now
            if cost.expert_bytes:
                yield loaded[(c, i)]
                nbytes = streamed[(c, i)]
                seconds = costmodel.expert_flops(cfg, t) / (gflops * 1e9)
                seconds += nbytes / (dequant_gbps * 1e9)
                yield from m.work(seconds, every_core)
                yield ring.put(1)
                m.mark("slp", "experts", f"experts L{i}", t0, tokens=t)
            else:
                yield from m.device(cost.dense_bytes, 0.0, t, 2.0 * t * cost.dense_bytes)
                m.mark("device", "dense mlp", f"dense mlp L{i}", t0, tokens=t)
    yield from m.device(costs.head_bytes(cfg), 0.0, 1)
    out["t"] = env.now


def _offload_prefill(m: Machine, cfg: ModelConfig, tokens: int, out: dict):
    """A forward over `tokens` tokens as the peers offload a large batch to the GPU (see
    sim/peers.py): per layer, attention on the GPU, then the layer's whole expert tensors
    (every routed expert and the shared ones, whichever the batch routes to) copied over
    PCIe, then the experts computed on the GPU: copy and compute one after the other, nothing
    streamed ahead. Weight bytes are m.expert_scale times the checkpoint's FP8 ones."""
    hw = m.hw
    d = m.gpu_index
    g = hw.gpus[d]
    overhead = g.layer_overhead_us * 1e-6
    attn_flops = costs.attention_flops(cfg, tokens)
    rate = g.expert_rate(cfg.expert_format[0])  # BF16 or FP8 matmuls (GPU.matmul_precision)
    layer_bytes = (
        cfg.n_routed_experts * costs.routed_expert_bytes(cfg) + costs.shared_expert_bytes(cfg)
    ) * m.expert_scale
    for i, cost in enumerate(costs.layer_costs(cfg)):
        t0 = m.env.now
        yield from m.device(cost.attention_bytes, overhead, tokens, attn_flops)
        m.mark("device", "attention", f"attention L{i}", t0, tokens=tokens)
        t0 = m.env.now
        if cost.expert_bytes:
            yield from m.dma(layer_bytes, d)
            m.mark("device", "copy", f"copy L{i}", t0, tokens=tokens)
            t0 = m.env.now
            flops = costmodel.expert_flops(cfg, tokens)
            yield from m.work(flops / (rate * 1e12), {m.gpu[d]: 1.0})
            m.mark("device", "experts", f"experts L{i}", t0, tokens=tokens)
        else:
            yield from m.device(cost.dense_bytes, 0.0, tokens, 2.0 * tokens * cost.dense_bytes)
            m.mark("device", "dense mlp", f"dense mlp L{i}", t0, tokens=tokens)
    yield from m.device(costs.head_bytes(cfg), 0.0, 1)
    out["t"] = m.env.now
