"""One request through the hybrid engine, as SimPy processes over fluid links: prefill then
decode, attention and dense layers on the device (a GPU, or the CPU itself), routed experts on
the CPU kernels reading DRAM. Returns TTFT and TPOT.

The engine's own placement rules apply: with a GPU, attention runs from HBM; without one, every
projection is an FP8 GEMV on the CPU. Prefill here is the baseline CPU path (routed experts on
the CPU kernels for all prompt tokens); SLP arrives with its issue.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import simpy

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

    @property
    def decode_tok_s(self) -> float:
        return 1.0 / self.tpot_s if self.tpot_s > 0 else math.inf

    def as_dict(self) -> dict:
        return {**asdict(self), "decode_tok_s": self.decode_tok_s}


def unique_experts(n_experts: int, k: int, tokens: int) -> float:
    """Expected distinct experts a chunk of tokens routes to (uniform routing)."""
    return n_experts * (1 - (1 - k / n_experts) ** tokens)


class Machine:
    """The links of one box and the engine's operations on them."""

    def __init__(self, env: simpy.Environment, hw: Hardware):
        self.env, self.hw = env, hw
        self.net = FluidNetwork(env)
        self.dram = Link("dram", hw.cpu.read_gbps() * 1e9)
        self.hbm = Link("hbm0", hw.gpus[0].hbm_gbps * hw.gpus[0].hbm_efficiency * 1e9) \
            if hw.gpus else None

    def cpu_fp8(self, nbytes: float, flops: float = 0.0):
        """An FP8 kernel call: a DRAM stream capped by the cores' conversion rate, or the FMA
        time when a GEMM over many tokens is compute-bound."""
        cpu = self.hw.cpu
        cap = min(cpu.cores * cpu.fp8_gemv_gbps_per_core,
                  cpu.read_gbps() * cpu.fp8_gemv_efficiency) * 1e9
        stream = nbytes / cap
        compute = flops / (cpu.cores * cpu.fma_gflops_per_core * 1e9 * 0.6)  # GEMM at ~0.6
        if compute > stream:
            yield self.env.timeout(compute)
        else:
            yield self.net.transfer(nbytes, [self.dram], cap)

    def device(self, nbytes: float, overhead_s: float, flops: float = 0.0):
        """Attention or a dense layer on the device."""
        if self.hbm is not None:
            yield self.net.transfer(nbytes, [self.hbm])
            yield self.env.timeout(overhead_s)
        else:
            yield from self.cpu_fp8(nbytes, flops)
            yield self.env.timeout(overhead_s)


def _step(m: Machine, cfg: ModelConfig, tokens: int, out: dict):
    """One forward over `tokens` new tokens (prefill chunk or one decode step)."""
    hw = m.hw
    layer_overhead = (hw.gpus[0].layer_overhead_us if hw.gpus else hw.cpu.layer_overhead_us) \
        * 1e-6
    for cost in costs.layer_costs(cfg):
        yield from m.device(cost.attention_bytes, layer_overhead,
                            flops=2.0 * tokens * cost.attention_bytes)
        if cost.expert_bytes:
            one = cost.expert_bytes / (cfg.num_experts_per_tok + cfg.n_shared_experts)
            distinct = unique_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, tokens) \
                + cfg.n_shared_experts
            flops = 2.0 * tokens * (cfg.num_experts_per_tok + cfg.n_shared_experts) * one
            yield from m.cpu_fp8(distinct * one, flops)
            yield m.env.timeout(hw.cpu.moe_overhead_us * 1e-6)
        else:
            yield from m.device(cost.dense_bytes, 0.0, flops=2.0 * tokens * cost.dense_bytes)
    yield from m.device(costs.head_bytes(cfg), 0.0, flops=2.0 * costs.head_bytes(cfg))
    out["t"] = m.env.now


def predict(cfg: ModelConfig, hw: Hardware, prompt_tokens: int, output_tokens: int
            ) -> Prediction:
    if prompt_tokens < 1 or output_tokens < 1:
        raise ValueError("prompt_tokens and output_tokens must be >= 1")
    env = simpy.Environment()
    m = Machine(env, hw)
    marks: dict = {}

    def request():
        yield from _step(m, cfg, prompt_tokens, marks)
        marks["first"] = env.now
        steps = []
        for _ in range(output_tokens - 1):
            t0 = env.now
            yield from _step(m, cfg, 1, marks)
            steps.append(env.now - t0)
        marks["steps"] = steps

    env.process(request())
    env.run()
    steps = marks["steps"]
    tpot = sorted(steps)[len(steps) // 2] if steps else 0.0
    return Prediction(prompt_tokens, output_tokens, marks["first"], tpot,
                      costs.bytes_per_token(cfg))
