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
from sim.forward import _slp_prefill, _step
from sim.hardware import Hardware
from sim.machine import Machine
from sim.routing import load_routing, recorded_bins, routing_bins

__all__ = [
    "Machine",
    "Prediction",
    "load_routing",
    "predict",
    "rates",
    "recorded_bins",
    "routing_bins",
    "unique_experts",
]


@dataclass(slots=True)
class Prediction:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float
    bytes_per_token: int
    prefill: str = "cpu"
    devices: int = 0  # GPUs streaming experts (SLP), 0 for the CPU path
    device_matmuls: str = ""  # the precision and rates of the GPUs' matmuls it assumes

    @property
    def decode_tok_s(self) -> float:
        return 1.0 / self.tpot_s if self.tpot_s > 0 else math.inf

    def as_dict(self) -> dict:
        return {**asdict(self), "decode_tok_s": self.decode_tok_s}


unique_experts = costmodel.unique_experts  # one definition, re-exported for sim users


def rates(hw: Hardware, devices: int | None = None, fmt: str = "fp8") -> costmodel.Rates:
    """The cost model's rates from a hardware profile, as the engine measures them at start
    (refmoe.costmodel.measure_rates): the CPU kernels' GEMV rate and their GFLOP/s at 64
    tokens (the calibrated GEMM curve there, else 0.6 of the FMA peak); SLP's link, matmul
    and dequantization rates on the first GPU, or where the profile has none on the CPU
    itself (CPU.slp_rates), as the engine streams on a machine without a GPU. fmt: the
    experts' stored format (the GPU's matmul rate for it, GPU.expert_rate)."""
    cpu, gpu = hw.cpu, hw.gpus[0] if hw.gpus else None
    n = len(hw.gpus) if devices is None else devices
    at64 = cpu.gemm_gbps(64)
    cpu_gflops = at64 * 2 * 64 if at64 else cpu.threads * cpu.fma_gflops_per_core * 0.6
    if gpu is not None:
        link, dequant = gpu.pcie_gbps, 0.0
        gflops = gpu.expert_rate(fmt) * 1e3
    else:
        link, dequant, gflops = cpu.slp_rates()
    return costmodel.Rates(
        h2d_gbps=link,
        cpu_gemv_gbps=cpu.fp8_stream_gbps(),
        cpu_gflops=cpu_gflops,
        device_gflops=gflops,
        device_weight_gbps=dequant,
        devices=max(1, n),
        device="gpu" if gpu else "cpu",
    )


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
    (default: all in the profile; more than one is DSLP; a profile without a GPU streams to
    the CPU itself, sim.forward._cpu_slp_prefill); expert_bits: bits per routed-expert
    weight, scales included, when the experts are not FP8 (e.g. 4.5 for Q4_K-class INT4),
    read by the CPU kernels at the same efficiency; routing_skew: 0 for uniform routing, else the
    Zipf exponent of expert popularity (routing_bins); routing: recorded routing per layer
    (load_routing), which takes the place of either."""
    if prompt_tokens < 1 or output_tokens < 1:
        raise ValueError("prompt_tokens and output_tokens must be >= 1")
    if prefill not in ("cpu", "slp", "auto"):
        raise ValueError(f"prefill must be cpu, slp or auto, got {prefill!r}")
    # without a GPU, SLP streams to the CPU itself (one "device"), as the engine does; a
    # conversion to refmoe's own INT4 (expert_bits) is not streamable there
    n = (len(hw.gpus) if devices is None else devices) if hw.gpus else 1
    if prefill == "auto" and not hw.gpus and expert_bits is not None:
        prefill = "cpu"
    if prefill != "cpu" and hw.gpus and not 1 <= n <= len(hw.gpus):
        raise ValueError(f"{hw.name} has {len(hw.gpus)} GPUs, asked for {n}")
    if prefill != "cpu" and not hw.gpus and devices not in (None, 1):
        raise ValueError(f"{hw.name} has no GPU: SLP on the CPU is one device, asked for {n}")
    if prefill == "auto":
        choice = costmodel.choose_prefill(
            cfg,
            prompt_tokens,
            rates(hw, n, cfg.expert_format[0]),
            None if hw.gpus else costmodel.SLP_CHUNK_TOKENS["cpu"],
        )
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
        device_matmuls(hw, cfg.expert_format[0]) if hw.gpus else "",
    )


def device_matmuls(hw: Hardware, fmt: str) -> str:
    """What a prediction assumes of the first GPU's matmuls, in words: experts stored in fmt
    (BF16 after dequantization on the device, or FP8 on its tensor cores) and attention."""
    g = hw.gpus[0]
    if g.matmul_precision(fmt) == "fp8":
        experts = f"experts FP8 at {g.fp8_expert_tflops:.0f} TFLOP/s (REFMOE_SLP_MATMUL=scaled_mm)"
    else:
        experts = f"experts BF16 at {g.expert_tflops:.0f} TFLOP/s (stored {fmt}, dequantized)"
    return f"{experts}, attention BF16 at {g.attention_tflops:.0f} TFLOP/s"
