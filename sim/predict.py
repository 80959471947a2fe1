"""One request through the hybrid engine, as SimPy processes over fluid links: prefill then
decode, attention and dense layers on the device (a GPU, or the CPU itself), routed experts on
the CPU kernels reading DRAM. Returns TTFT and TPOT.

The engine's own placement rules apply: with a GPU, attention runs from HBM; without one, every
projection is an FP8 GEMV on the CPU. Prefill takes the baseline CPU path (routed experts on
the CPU kernels for all prompt tokens) or SLP: a loader process streams each MoE layer's
experts over the GPUs' PCIe links (fluid, 1/N of the experts per GPU with DSLP) into a ring of
two layers while the compute process runs attention and the experts on the GPU. "auto" picks
the path with the engine's own cost model (refmoe.costmodel) from the profile's rates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import simpy

from refmoe import costmodel
from refmoe.config import ModelConfig
from sim import costs
from sim.fluid import FluidNetwork, Link
from sim.hardware import Hardware


@dataclass(slots=True)
class Prediction:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float
    bytes_per_token: int
    prefill: str = "cpu"
    devices: int = 0  # GPUs streaming experts (SLP), 0 for the CPU path

    @property
    def decode_tok_s(self) -> float:
        return 1.0 / self.tpot_s if self.tpot_s > 0 else math.inf

    def as_dict(self) -> dict:
        return {**asdict(self), "decode_tok_s": self.decode_tok_s}


unique_experts = costmodel.unique_experts  # one definition, re-exported for sim users


def routing_bins(
    n_experts: int, k: int, skew: float = 0.0, bins: int = 16
) -> list[tuple[int, float]]:
    """The routing distribution as (experts, probability a token picks each of them) groups.
    skew 0: uniform, every expert k/E. skew s > 0: Zipf-like popularity, expert e weighted
    (e + 1)^-s, scaled so the probabilities sum to k and none exceeds 1 (a token picks k
    distinct experts), then grouped into `bins` groups of neighbours by popularity."""
    if skew < 0:
        raise ValueError(f"routing skew must be >= 0, got {skew}")
    if skew == 0:
        return [(n_experts, k / n_experts)]
    w = [(e + 1) ** -skew for e in range(n_experts)]
    capped: set[int] = set()
    while True:  # water-filling: the most popular are capped at 1, the rest share the rest
        free = [e for e in range(n_experts) if e not in capped]
        scale = (k - len(capped)) / sum(w[e] for e in free)
        over = {e for e in free if w[e] * scale > 1}
        if not over:
            break
        capped |= over
    return _neighbours([1.0 if e in capped else w[e] * scale for e in range(n_experts)], bins)


def _neighbours(p: list[float], bins: int) -> list[tuple[int, float]]:
    """Probabilities in popularity order as `bins` groups of neighbours: (size, mean)."""
    size = -(-len(p) // bins)
    return [
        (len(p[i : i + size]), sum(p[i : i + size]) / len(p[i : i + size]))
        for i in range(0, len(p), size)
    ]


def recorded_bins(
    popularity: dict, cfg: ModelConfig, source: str = "routing", bins: int = 16
) -> dict[int, list[tuple[int, float]]]:
    """Routing recorded by the engine (refmoe.routing.popularity: per layer, the probability a
    token picks each expert) as routing_bins groups per layer: the experts sorted by
    popularity, `bins` groups of neighbours, each at its mean probability."""
    out = {}
    for layer, p in sorted(popularity.items()):
        if len(p) != cfg.n_routed_experts or round(float(sum(p))) != cfg.num_experts_per_tok:
            raise ValueError(
                f"{source}: routing recorded over {len(p)} experts, top-"
                f"{round(float(sum(p)))}; the model routes to "
                f"{cfg.num_experts_per_tok} of {cfg.n_routed_experts}"
            )
        out[layer] = _neighbours(sorted((float(x) for x in p), reverse=True), bins)
    return out


def load_routing(path: str, cfg: ModelConfig) -> dict[int, list[tuple[int, float]]]:
    """A routing record (refmoe.routing) from its own JSON file or from the metadata of an
    engine trace that carries one, as recorded_bins groups per layer."""
    import json

    from refmoe import routing

    try:
        doc = json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read a routing record ({e})") from None
    if isinstance(doc, dict) and "metadata" in doc:
        if "routing" not in doc["metadata"]:
            raise ValueError(f"{path}: this trace carries no routing record")
        doc = doc["metadata"]["routing"]
    return recorded_bins(routing.popularity(doc, path), cfg, path)


class Machine:
    """The links of one box and the engine's operations on them.

    Links: each socket's DRAM (plain-read GB/s) and core pool (capacity 1: all its cores), the
    interconnect between sockets, each GPU's PCIe link (host to device) and the GPU itself
    (capacity 1: its SMs and HBM, time-shared). Every operation is a flow whose size is its
    seconds when it runs alone and whose weights are what it loads each link with at full
    speed, so operations of different kinds slow each other down where they share a link:
    two CPU kernels halve each other's cores, an SLP stream's DMA reads take DRAM bandwidth
    from the CPU experts, a decode step's attention waits behind a prefill on the same GPU.
    """

    def __init__(self, env: simpy.Environment, hw: Hardware, record: bool = False):
        self.env, self.hw = env, hw
        self._mixtures: dict = {}
        self.expert_scale = 1.0  # expert bytes relative to FP8 (INT4: bits per weight / 8)
        self.gpu_index = 0  # the GPU that runs attention and dense layers
        self.routing_skew = 0.0  # 0: uniform routing; else see routing_bins
        self.routing: dict = {}  # recorded routing per layer (load_routing), if any
        cpu = hw.cpu
        self.dram = [
            Link(f"dram{s}", cpu.dram_gbps_per_socket * cpu.dram_efficiency * 1e9)
            for s in range(cpu.sockets)
        ]
        self.cores = [Link(f"cores{s}", 1.0) for s in range(cpu.sockets)]
        self.interconnect = (
            Link("interconnect", cpu.interconnect_gbps * 1e9) if cpu.sockets > 1 else None
        )
        self.pcie = [Link(f"pcie{d}.h2d", g.pcie_gbps * 1e9) for d, g in enumerate(hw.gpus)]
        self.gpu = [Link(f"gpu{d}", 1.0) for d in range(len(hw.gpus))]
        self.net = FluidNetwork(env, self.links(), record)

    def mark(self, process: str, lane: str, name: str, start: float, **args) -> None:
        """An operation of the forward ended now (the engine's trace lanes); kept by the
        serving simulator's cost runs for per-layer spans, ignored here."""

    def links(self) -> list[Link]:
        return (
            self.dram
            + self.cores
            + ([self.interconnect] if self.interconnect else [])
            + self.pcie
            + self.gpu
        )

    def work(self, seconds: float, demand: dict):
        """An operation that takes `seconds` alone and loads each link of `demand` with the
        given units per second meanwhile."""
        if seconds > 0:
            yield self.net.transfer(seconds, list(demand), 1.0, list(demand.values()))

    def cpu_demand(self, gbps: float) -> dict:
        """The kernel's threads (all cores, by default) reading weights at gbps, spread evenly
        over the sockets' DRAM; fewer threads than cores load the core pools with their
        share, leaving the rest to the other worker."""
        cpu, d = self.hw.cpu, {}
        for s in range(cpu.sockets):
            d[self.cores[s]] = cpu.threads / cpu.cores
            d[self.dram[s]] = gbps * 1e9 / cpu.sockets
        if cpu.remote_share():
            d[self.interconnect] = gbps * 1e9 * cpu.remote_share()
        return d

    def cpu_fp8(self, nbytes: float, tokens: float = 1.0):
        """An FP8 kernel call over weights that `tokens` tokens share: a DRAM stream capped by
        the cores' conversion rate (GEMV) or by the calibrated GEMM rate at that many tokens."""
        g = self.rate_gbps(tokens)
        yield from self.work(nbytes / (g * 1e9), self.cpu_demand(g))

    def rate_gbps(self, tokens: float, moe: bool = False) -> float:
        """The FP8 kernel's weight GB/s when `tokens` tokens share each weight (moe: routed
        experts inside one fused MoE call)."""
        cpu = self.hw.cpu
        cap = cpu.fp8_stream_gbps()
        if tokens > 1:
            gemm = cpu.moe_gbps(tokens) if moe else cpu.gemm_gbps(tokens)
            if gemm is None:  # uncalibrated: the FMA peak at 0.6
                gemm = cpu.threads * cpu.fma_gflops_per_core * 0.6 / (2 * tokens)
            cap = min(cap, gemm)
        return cap

    def groups(self, layer: int, experts: int, k: int) -> list[tuple[int, float]]:
        """The layer's routing as (experts, probability a token picks each) groups: recorded
        (a layer the record lacks takes the recorded layer at the same place in the cycle of
        recorded ones), else uniform or Zipf-skewed (routing_bins)."""
        if self.routing:
            if layer not in self.routing:
                keys = sorted(self.routing)
                layer = keys[layer % len(keys)]
            return self.routing[layer]
        return routing_bins(experts, k, self.routing_skew)

    def cpu_fp8_mixed(self, one: float, experts: int, tokens: int, p: float, layer: int = 0):
        """`experts` matrices of `one` bytes, each used by Binomial(tokens, p) tokens (or, with
        recorded or skewed routing, by the layer's popularity groups, Machine.groups): one
        stream at the rate that takes the expected total time."""
        groups = self.groups(layer, experts, round(p * experts))
        nbytes = seconds = 0.0
        for count, q in groups:
            if q <= 0:  # experts no token picks
                continue
            b, t = self.mixture(one, count, tokens, q)
            nbytes, seconds = nbytes + b, seconds + t
        if nbytes > 0:
            yield from self.work(seconds, self.cpu_demand(nbytes / seconds / 1e9))

    def mixture(self, one: float, experts: int, tokens: int, p: float) -> tuple[float, float]:
        """(expected bytes, expected seconds) of that call (memoized: every MoE layer of a
        forward asks the same)."""
        key = (one, experts, tokens, p)
        if key not in self._mixtures:
            self._mixtures[key] = self._mixture(one, experts, tokens, p)
        return self._mixtures[key]

    def _mixture(self, one: float, experts: int, tokens: int, p: float) -> tuple[float, float]:
        nbytes = seconds = 0.0
        mean, sd = tokens * p, math.sqrt(tokens * p * (1 - p))
        lo, hi = max(1, int(mean - 12 * sd - 1)), min(tokens, int(mean + 12 * sd + 2))
        for m in range(lo, hi + 1):  # the rest of the distribution weighs < 1e-30
            pm = (
                math.exp(
                    math.lgamma(tokens + 1)
                    - math.lgamma(m + 1)
                    - math.lgamma(tokens - m + 1)
                    + m * math.log(p)
                    + (tokens - m) * math.log1p(-p)
                )
                if p < 1
                else float(m == tokens)
            )
            nbytes += experts * pm * one
            seconds += experts * pm * one / (self.rate_gbps(m, moe=True) * 1e9)
        return nbytes, seconds

    def dma(self, nbytes: float, d: int):
        """Pinned host memory to GPU d: its PCIe link, the DRAM the weights lie in (spread over
        the sockets), and the interconnect for the share on other sockets."""
        cpu, pcie = self.hw.cpu, self.hw.gpus[d].pcie_gbps * 1e9
        remote = (cpu.sockets - 1) / cpu.sockets
        rate = min(
            [pcie]
            + [c.capacity * cpu.sockets for c in self.dram]
            + ([self.interconnect.capacity / remote] if remote else [])
        )
        demand = {self.pcie[d]: rate}
        for s in range(cpu.sockets):
            demand[self.dram[s]] = rate / cpu.sockets
        if remote:
            demand[self.interconnect] = rate * remote
        yield from self.work(nbytes / rate, demand)

    def device(
        self,
        nbytes: float,
        overhead_s: float,
        tokens: float = 1.0,
        flops: float = 0.0,
        gpu: int | None = None,
    ):
        """Attention or a dense layer on the device: on a GPU its weights from HBM, or its
        FLOPs at attention_tflops when those take longer (long prompts), plus the per-layer
        cost; without a GPU, FP8 GEMVs on the CPU and the torch glue around them."""
        if self.hw.gpus:
            d = self.gpu_index if gpu is None else gpu
            g = self.hw.gpus[d]
            t = (
                max(
                    nbytes / (g.hbm_gbps * g.hbm_efficiency * 1e9),
                    flops / (g.attention_tflops * 1e12),
                )
                + overhead_s
            )
            yield from self.work(t, {self.gpu[d]: 1.0})
        else:
            yield from self.cpu_fp8(nbytes, tokens)
            # the rest of the block is torch on its own threads (every core), no weights
            yield from self.work(overhead_s, {c: 1.0 for c in self.cores})

    def attention_extra(
        self, cfg: ModelConfig, tokens: int, contexts: tuple = ()
    ) -> tuple[float, dict]:
        """(seconds, demand) per layer of what attention costs beyond its projections and
        fixed per-sequence cost: reading what each sequence has cached (`contexts`, one count
        per decoding sequence), and on the CPU a prompt's own scores. On a GPU: the caches
        from HBM or the score FLOPs, whichever takes longer; on the CPU: the engine's torch
        attention after that many cached tokens as calibrated, and a prompt's scores at the
        calibrated matmul rate, on every core."""
        if self.hw.gpus:
            g = self.hw.gpus[self.gpu_index]
            cached = sum(contexts)
            flops = costs.score_flops(cfg, 1, cached) - costs.score_flops(cfg, 1, 0)
            t = max(
                cached * costs.kv_bytes_per_token(cfg) / (g.hbm_gbps * g.hbm_efficiency * 1e9),
                flops / (g.attention_tflops * 1e12),
            )
            return t, {self.gpu[self.gpu_index]: 1.0}
        cpu = self.hw.cpu
        t = sum(cpu.attention_us(c) for c in contexts) * 1e-6
        if tokens > len(contexts):  # a prompt: its tokens attend to each other
            t += costs.score_flops(cfg, tokens) / (cpu.score_gflops() * 1e9)
        return t, {c: 1.0 for c in self.cores}


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
    for i, cost in enumerate(costs.layer_costs(cfg)):
        t0 = m.env.now
        yield from m.device(cost.attention_bytes, layer_overhead, tokens, attn_flops)
        yield from m.work(*extra)
        m.mark("device", "attention", f"attention L{i}", t0, tokens=tokens)
        t0 = m.env.now
        if cost.expert_bytes:
            k = cfg.num_experts_per_tok
            one = cost.expert_bytes * m.expert_scale / (k + cfg.n_shared_experts)
            # each routed expert serves a Binomial(tokens, k/E) number of tokens, and the
            # kernel's rate depends steeply on it (one token: the GEMV; more: tiles), so the
            # expected time is a sum over that distribution, not the rate at the mean
            yield from m.cpu_fp8_mixed(
                one, cfg.n_routed_experts, tokens, k / cfg.n_routed_experts, layer=i
            )
            if cfg.n_shared_experts:
                yield from m.cpu_fp8(cfg.n_shared_experts * one, tokens)
            yield m.env.timeout(hw.cpu.moe_overhead_us * 1e-6)
            m.mark("cpu", "experts", f"experts L{i}", t0, tokens=tokens)
        else:
            yield from m.device(cost.dense_bytes, 0.0, tokens, 2.0 * tokens * cost.dense_bytes)
            m.mark("device", "dense mlp", f"dense mlp L{i}", t0, tokens=tokens)
    yield from m.device(costs.head_bytes(cfg), 0.0, 1)  # logits of the last position only
    out["t"] = m.env.now


def rates(hw: Hardware, devices: int | None = None) -> costmodel.Rates:
    """The cost model's rates from a hardware profile."""
    cpu, gpu = hw.cpu, hw.gpus[0] if hw.gpus else None
    n = len(hw.gpus) if devices is None else devices
    return costmodel.Rates(
        h2d_gbps=gpu.pcie_gbps if gpu else cpu.read_gbps(),
        cpu_gemv_gbps=cpu.fp8_stream_gbps(),
        cpu_gflops=cpu.threads * cpu.fma_gflops_per_core * 0.6,
        device_gflops=gpu.expert_tflops * 1e3 if gpu else cpu.threads * cpu.fma_gflops_per_core,
        devices=max(1, n),
        device="gpu" if gpu else "cpu",
    )


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
    ids = list(range(devices)) if isinstance(devices, int) else list(devices)
    n, gpus = len(ids), [hw.gpus[d] for d in ids]
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    chunks = [(lo, min(chunk_tokens, tokens - lo)) for lo in range(0, tokens, chunk_tokens)]

    def per_gpu(layer: int, t: int) -> float:
        """Each GPU's bytes of the layer for a chunk of t tokens: its 1/N of the expert slots
        (only those routed to, when the chunk does not hit them all)."""
        slots = cfg.n_routed_experts + cfg.n_shared_experts
        hit = sum(
            count * (1 - (1 - q) ** t)
            for count, q in m.groups(layer, cfg.n_routed_experts, cfg.num_experts_per_tok)
        )
        if costmodel.streaming_for(cfg.n_routed_experts, hit) == "selective":
            slots = hit + cfg.n_shared_experts
        return slots / n * costmodel.expert_bytes(cfg)

    loaded = {(c, i): env.event() for c in range(len(chunks)) for i in layers}
    ring = simpy.Container(env, capacity=2, init=2)  # two layers of slots

    def stream(d, nbytes):
        yield from m.dma(nbytes, d)

    def loader():
        for c, (_, t) in enumerate(chunks):
            for i in layers:
                yield ring.get(1)
                nbytes = per_gpu(i, t)
                yield simpy.AllOf(env, [env.process(stream(d, nbytes)) for d in ids])
                loaded[(c, i)].succeed()

    def on_each(seconds_of):
        """seconds_of(k, gpu): the k-th of the GPUs' part, all at once; the slowest decides."""
        return simpy.AllOf(
            env,
            [
                env.process(m.work(seconds_of(k, hw.gpus[d]), {m.gpu[d]: 1.0}))
                for k, d in enumerate(ids)
            ],
        )

    def receive(d, nbytes):
        rate = hw.gpus[d].pcie_gbps * 1e9
        yield from m.work(nbytes / rate, {m.pcie[d]: rate})

    env.process(loader())
    overhead = gpus[0].layer_overhead_us * 1e-6
    for c, (lo, t) in enumerate(chunks):
        sizes = costmodel.context_split(cfg, t, n, lo)
        starts = [lo + sum(sizes[:k]) for k in range(n)]
        attn = [costs.attention_flops(cfg, size, start) for size, start in zip(sizes, starts)]
        # DSLP: each GPU receives the others' share of the chunk's hidden states (all-gather)
        # and of the summed expert outputs (reduce-scatter), float32, over its own PCIe link,
        # where it shares the link with the next layer's stream (no NVLink on these boxes)
        exchange = 2 * t * cfg.hidden_size * 4 * (n - 1) / n if n > 1 else 0.0
        for i, cost in enumerate(costs.layer_costs(cfg)):
            t0 = env.now
            yield on_each(
                lambda k, g: (
                    max(
                        cost.attention_bytes / (g.hbm_gbps * g.hbm_efficiency * 1e9),
                        attn[k] / (g.attention_tflops * 1e12),
                    )
                    + overhead
                )
            )
            m.mark("device", "attention", f"attention L{i}", t0, tokens=t)
            t0 = env.now
            if cost.expert_bytes:
                yield loaded[(c, i)]
                flops = costmodel.expert_flops(cfg, t) / n
                yield on_each(lambda k, g: flops / (g.expert_tflops * 1e12))
                if exchange:
                    yield simpy.AllOf(env, [env.process(receive(d, exchange)) for d in ids])
                yield ring.put(1)
                m.mark("slp", "experts", f"experts L{i}", t0, tokens=t)
            else:
                yield on_each(
                    lambda k, g: max(
                        cost.dense_bytes / (g.hbm_gbps * g.hbm_efficiency * 1e9),
                        2.0 * sizes[k] * cost.dense_bytes / (g.attention_tflops * 1e12),
                    )
                )
                m.mark("device", "dense mlp", f"dense mlp L{i}", t0, tokens=t)
    yield from m.device(costs.head_bytes(cfg), 0.0, 1, gpu=ids[-1])
    out["t"] = env.now


def predict(
    cfg: ModelConfig,
    hw: Hardware,
    prompt_tokens: int,
    output_tokens: int,
    prefill: str = "cpu",
    devices: int | None = None,
    expert_bits: float | None = None,
    routing_skew: float = 0.0,
    routing: dict | None = None,
) -> Prediction:
    """prefill: cpu, slp or auto (the engine's cost model decides); devices: GPUs for SLP
    (default: all in the profile; more than one is DSLP); expert_bits: bits per routed-expert
    weight, scales included, when the experts are not FP8 (e.g. 4.5 for Q4_K-class INT4),
    read by the CPU kernels at the same efficiency; routing_skew: 0 for uniform routing, else the
    Zipf exponent of expert popularity (routing_bins); routing: recorded routing per layer
    (load_routing), which takes the place of either."""
    if prompt_tokens < 1 or output_tokens < 1:
        raise ValueError("prompt_tokens and output_tokens must be >= 1")
    if prefill not in ("cpu", "slp", "auto"):
        raise ValueError(f"prefill must be cpu, slp or auto, got {prefill!r}")
    n = len(hw.gpus) if devices is None else devices
    if prefill == "auto" and not hw.gpus:  # nothing to stream to: the CPU path, as the engine
        prefill = "cpu"
    if prefill != "cpu" and not hw.gpus:
        raise ValueError(f"{hw.name}: SLP needs a GPU in the profile")
    if prefill != "cpu" and not 1 <= n <= len(hw.gpus):
        raise ValueError(f"{hw.name} has {len(hw.gpus)} GPUs, asked for {n}")
    if prefill == "auto":
        choice = costmodel.choose_prefill(cfg, prompt_tokens, rates(hw, n))
        prefill, n = choice.path, choice.devices
    env = simpy.Environment()
    m = Machine(env, hw)
    if expert_bits is not None:
        m.expert_scale = expert_bits / 8
    routing_bins(cfg.n_routed_experts, cfg.num_experts_per_tok, routing_skew)  # validates
    m.routing_skew, m.routing = routing_skew, routing or {}
    marks: dict = {}

    def request():
        if prefill == "slp":
            yield from _slp_prefill(m, cfg, prompt_tokens, n, marks)
        else:
            yield from _step(m, cfg, prompt_tokens, marks)
        marks["first"] = env.now
        steps = []
        for i in range(output_tokens - 1):
            t0 = env.now
            yield from _step(m, cfg, 1, marks, contexts=(prompt_tokens + i,))
            steps.append(env.now - t0)
        marks["steps"] = steps

    env.process(request())
    env.run()
    steps = marks["steps"]
    tpot = sorted(steps)[len(steps) // 2] if steps else 0.0
    return Prediction(
        prompt_tokens,
        output_tokens,
        marks["first"],
        tpot,
        costs.bytes_per_token(cfg),
        prefill,
        n if prefill == "slp" else 0,
    )
