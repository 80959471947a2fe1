"""The machine the simulator runs on: one box's links (DRAM per socket, the socket link, PCIe
per GPU, GPU compute, CPU core pools) as fluid-shared links, and the engine's operations on
them (CPU kernels reading experts, GPU work, copies)."""

from __future__ import annotations

import math

import simpy

from refmoe import costmodel
from refmoe.config import ModelConfig
from sim import costs
from sim.fluid import FluidNetwork, Link
from sim.hardware import Hardware
from sim.routing import routing_bins


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
        self._moe_rates: dict = {}  # (format, bytes per weight) -> {tokens: GB/s} (_mixture)
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

    def mark(
        self, process: str, lane: str, name: str, start: float, end: float | None = None, **args
    ) -> None:
        """An operation of the forward ended (at `end`, or now: the engine's trace lanes);
        kept by the serving simulator's cost runs for per-layer spans, ignored here."""

    # an SLP layer's parts as trace spans: (process, lane) and the span's name
    SLP_SPANS = {
        "attention": ("device", "attention", "attention"),
        "experts": ("slp", "experts", "experts"),
        "dense": ("device", "dense mlp", "dense mlp"),
    }

    def mark_slp(self, lay, part: str, start: float, end: float | None = None) -> None:
        """An SLP layer's part ended (Machine.pipeline and its closed form alike)."""
        process, lane, name = self.SLP_SPANS[part]
        self.mark(process, lane, f"{name} L{lay.layer}", start, end, tokens=lay.tokens)

    def layer(self, i: int, key: tuple, body):
        """Layer i's operations: body() (a generator) run on this machine. `key` names what
        they depend on beyond the forward's own arguments (the layer's costs and routing):
        sim.serve's cost runs take a layer whose key they have seen from the first one."""
        yield from body()

    def pipeline(self, layers: list, ring: int):
        """An SLP prefill's layers (sim.forward.SlpLayer, in order) as the engine runs them: a
        loader streams each MoE layer's experts (its `load`, one copy per GPU at once) into a
        ring of `ring` layers, at most ring - 1 ahead of the compute, which runs each layer's
        attention, then (once its experts are in) the experts and the exchange, or the dense
        MLP; each step on every GPU at once, the slowest deciding."""
        env = self.env
        loaded = {id(lay): env.event() for lay in layers if lay.load}
        slots = simpy.Container(env, capacity=ring, init=ring)

        def loader():
            for lay in layers:
                if lay.load:
                    yield slots.get(1)
                    yield from self.each(lay.load)
                    loaded[id(lay)].succeed()

        env.process(loader())
        for lay in layers:
            t0 = env.now
            yield from self.each(lay.attention)
            self.mark_slp(lay, "attention", t0)
            t0 = env.now
            if lay.load:
                yield loaded[id(lay)]
                yield from self.each(lay.experts)
                if lay.exchange:
                    yield from self.each(lay.exchange)
                yield slots.put(1)
                self.mark_slp(lay, "experts", t0)
            else:
                yield from self.each(lay.dense)
                self.mark_slp(lay, "dense", t0)

    def each(self, ops: list):
        """Operations (seconds, demand) that run at once, one per GPU: one runs as it is,
        several as processes the slowest of which ends the step."""
        if len(ops) == 1:
            yield from self.work(*ops[0])
        else:
            yield simpy.AllOf(self.env, [self.env.process(self.work(*op)) for op in ops])

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
        if cpu.remote_share() and self.interconnect is not None:
            d[self.interconnect] = gbps * 1e9 * cpu.remote_share()
        return d

    def cpu_fp8(self, nbytes: float, tokens: float = 1.0, moe: bool = False):
        """An FP8 kernel call over weights that `tokens` tokens share: a DRAM stream capped by
        the cores' conversion rate (GEMV) or by the calibrated GEMM rate at that many tokens
        (moe: inside the fused MoE call, as the shared expert runs)."""
        g = self.rate_gbps(tokens, moe=moe)
        yield from self.work(nbytes / (g * 1e9), self.cpu_demand(g))

    def rate_gbps(
        self, tokens: float, moe: bool = False, fmt: str = "fp8", bytes_per_weight: float = 1.0
    ) -> float:
        """The kernel's GB/s of stored weight bytes when `tokens` tokens share each weight
        (moe: inside one fused MoE call, whose one-token rate the calibration times per
        format); fmt: the weights' format, bytes_per_weight its stored bytes per weight.
        Beyond one token the calibrated GEMM curve caps it: a rate in FP8 bytes, so in
        weights per second (compute on the weights, whatever their storage), taken to the
        stored bytes at bytes_per_weight (a 4-bit expert takes as long per weight as FP8)."""
        cpu = self.hw.cpu
        cap = cpu.moe_stream_gbps(fmt) if moe else cpu.stream_gbps(fmt)
        if tokens > 1:
            gemm = cpu.moe_gbps(tokens) if moe else cpu.gemm_gbps(tokens)
            if gemm is None:  # uncalibrated: the FMA peak at 0.6
                gemm = cpu.threads * cpu.fma_gflops_per_core * 0.6 / (2 * tokens)
            cap = min(cap, gemm * bytes_per_weight)
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

    def cpu_fp8_mixed(
        self,
        one: float,
        experts: int,
        tokens: int,
        p: float,
        layer: int = 0,
        fmt: str = "fp8",
        bytes_per_weight: float = 1.0,
    ):
        """`experts` matrices of `one` bytes, each used by Binomial(tokens, p) tokens (or, with
        recorded or skewed routing, by the layer's popularity groups, Machine.groups): one
        stream at the rate that takes the expected total time."""
        groups = self.groups(layer, experts, round(p * experts))
        nbytes = seconds = 0.0
        for count, q in groups:
            if q <= 0:  # experts no token picks
                continue
            b, t = self.mixture(one, count, tokens, q, fmt, bytes_per_weight)
            nbytes, seconds = nbytes + b, seconds + t
        if nbytes > 0:
            yield from self.work(seconds, self.cpu_demand(nbytes / seconds / 1e9))

    def mixture(self, *call) -> tuple[float, float]:
        """(expected bytes, expected seconds) of that call, its arguments those of _mixture
        (memoized: every MoE layer of a forward asks the same)."""
        if call not in self._mixtures:
            self._mixtures[call] = self._mixture(*call)
        return self._mixtures[call]

    def _mixture(
        self,
        one: float,
        experts: int,
        tokens: int,
        p: float,
        fmt: str = "fp8",
        bytes_per_weight: float = 1.0,
    ) -> tuple[float, float]:
        nbytes = seconds = 0.0
        mean, sd = tokens * p, math.sqrt(tokens * p * (1 - p))
        lo, hi = max(1, int(mean - 12 * sd - 1)), min(tokens, int(mean + 12 * sd + 2))
        rates = self._moe_rates.setdefault((fmt, bytes_per_weight), {})  # by tokens an expert
        whole = math.lgamma(tokens + 1)
        log_p, log_q = (math.log(p), math.log1p(-p)) if p < 1 else (0.0, 0.0)
        for m in range(lo, hi + 1):  # the rest of the distribution weighs < 1e-30
            pm = (
                math.exp(
                    whole
                    - math.lgamma(m + 1)
                    - math.lgamma(tokens - m + 1)
                    + m * log_p
                    + (tokens - m) * log_q
                )
                if p < 1
                else float(m == tokens)
            )
            nbytes += experts * pm * one
            rate = rates.get(m)
            if rate is None:
                rate = rates[m] = self.rate_gbps(
                    m, moe=True, fmt=fmt, bytes_per_weight=bytes_per_weight
                )
            seconds += experts * pm * one / (rate * 1e9)
        return nbytes, seconds

    def dma(self, nbytes: float, d: int):
        """Pinned host memory to GPU d (dma_op)."""
        yield from self.work(*self.dma_op(nbytes, d))

    def dma_op(self, nbytes: float, d: int) -> tuple[float, dict]:
        """(seconds, demand) of a copy from pinned host memory to GPU d: its PCIe link, the
        DRAM the weights lie in (spread over the sockets), and the interconnect for the share
        on other sockets."""
        cpu, pcie = self.hw.cpu, self.hw.gpus[d].pcie_gbps * 1e9
        remote = (cpu.sockets - 1) / cpu.sockets
        link = self.interconnect if remote else None  # two sockets or more: the socket link
        rate = min(
            [pcie]
            + [c.capacity * cpu.sockets for c in self.dram]
            + ([link.capacity / remote] if link is not None else [])
        )
        demand = {self.pcie[d]: rate}
        for s in range(cpu.sockets):
            demand[self.dram[s]] = rate / cpu.sockets
        if link is not None:
            demand[link] = rate * remote
        return nbytes / rate, demand

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

    # the engine's: up to this many new tokens of a sequence take the absorbed attention
    # (refmoe.models.deepseek_v3.ABSORB_MAX_TOKENS, held equal by tests/test_sim_agents.py;
    # not imported, so that the simulator does not load torch)
    ABSORB_MAX_TOKENS = 8

    def prefix_attention(self, cfg: ModelConfig, tokens: int, past: int) -> tuple[float, dict]:
        """(seconds, demand) per layer of `tokens` new tokens of one sequence attending to
        the `past` tokens it has cached (a prefix restored from the prefix cache, or the
        chunks a chunked prefill has run): beyond what a prefill from position 0 costs. On a
        GPU the cache read once or the score FLOPs; on the CPU a few tokens run the engine's
        absorbed attention (each as a decode token after `past`), more the expanded one: the
        chunk's scores over every key (the causal rule a mask there; costs.score_flops dense)
        at the calibrated rate, less the causal FLOPs of the same tokens from position 0
        (charged with the chunk), and for MLA the cached latents expanded through kv_b (a
        GEMM over `past` more tokens, at the FP8 kernels' rate for that many)."""
        if past <= 0 or tokens <= 0:
            return 0.0, {}
        dense = not self.hw.gpus  # on the CPU a masked kernel: every key is scored
        flops = costs.score_flops(cfg, tokens, past, dense) - costs.score_flops(cfg, tokens, 0)
        if self.hw.gpus:
            g = self.hw.gpus[self.gpu_index]
            t = max(
                past * costs.kv_bytes_per_token(cfg) / (g.hbm_gbps * g.hbm_efficiency * 1e9),
                flops / (g.attention_tflops * 1e12),
            )
            return t, {self.gpu[self.gpu_index]: 1.0}
        cpu = self.hw.cpu
        v4 = cfg.family == "deepseek_v4"  # its window and entries: by FLOPs, not MLA's curve
        if tokens <= self.ABSORB_MAX_TOKENS and not v4:  # linear-attention layers read no past
            heads, full = cfg.num_attention_heads, 1 - costmodel.linear_share(cfg)
            t = tokens * full * (cpu.attention_us(past, heads) - cpu.attention_us(0, heads)) * 1e-6
        else:
            t = flops / (cpu.score_gflops() * 1e9)
            if cfg.is_mla:  # kv_b over every cached latent, not only the new tokens'
                n = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
                kv_b = costs.fp8_bytes(n, cfg.kv_lora_rank, cfg.fp8_block)
                m = past + tokens
                t += kv_b / (self.rate_gbps(m) * 1e9) * past / m
        return max(t, 0.0), {c: 1.0 for c in self.cores}

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
        cpu, heads = self.hw.cpu, cfg.num_attention_heads
        # a linear-attention layer (its share of the layers) costs what attention costs with
        # nothing cached, whatever the context: its state is fixed
        full = 1 - costmodel.linear_share(cfg)
        if cfg.family == "deepseek_v4":  # a window and compressed entries, by their FLOPs
            t = sum(
                cpu.attention_us(0, heads) * 1e-6
                + (costs.score_flops(cfg, 1, c, True) - costs.score_flops(cfg, 1, 0, True))
                / (cpu.score_gflops() * 1e9)
                for c in contexts
            )
        else:
            t = (
                sum(
                    full * cpu.attention_us(c, heads) + (1 - full) * cpu.attention_us(0, heads)
                    for c in contexts
                )
                * 1e-6
            )
        if tokens > len(contexts):  # a prompt: its tokens attend to each other
            flops, rec = costs.score_flops(cfg, tokens), costs.recurrent_part(cfg, tokens)
            t += (flops - rec) / (cpu.score_gflops() * 1e9)
            t += rec / (cpu.recurrence_gflops() * 1e9)
        return t, {c: 1.0 for c in self.cores}
