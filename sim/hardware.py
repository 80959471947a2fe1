"""Hardware profiles: peak numbers from spec sheets times efficiencies from calibration (YAML).

cpu.dram_gbps is the plain-read bandwidth of all cores (per socket times sockets, times
dram_efficiency); the FP8 kernels reach min(that, cores * fp8_gemv_gbps_per_core) times
fp8_gemv_efficiency. A GPU, when present, runs attention and dense layers at
hbm_gbps * hbm_efficiency plus a fixed per-layer cost (kernel launches, small ops).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml


@dataclass(slots=True)
class CPU:
    sockets: int
    cores_per_socket: int
    dram_gbps_per_socket: float  # peak
    dram_efficiency: float = 0.85  # plain read / peak
    fp8_gemv_gbps_per_core: float = 20.0  # compute ceiling of the FP8 GEMV on one core
    fp8_gemv_efficiency: float = 0.85  # kernel GB/s / plain read, when memory-bound
    # the 4-bit formats' GEMV (mxfp4, nvfp4, int4g): kernel GB/s of packed bytes / plain read,
    # measured by calibrate; a format missing here runs at the FP8 GEMV's rate
    gemv_efficiency_by_format: dict = field(default_factory=dict)
    fma_gflops_per_core: float = 100.0
    layer_overhead_us: float = 0.0  # per layer, when attention runs on the CPU (torch glue)
    moe_overhead_us: float = 0.0  # per MoE call (pool wake-up, routing)
    # FP8 weight GB/s of all cores when M tokens share each weight (the GEMM tile path); empty:
    # fall back to the FMA peak at 0.6 efficiency
    gemm_gbps_by_m: dict = field(default_factory=dict)
    # the same for routed experts in one fused MoE call, every expert serving M tokens (what
    # prefill runs); empty: the GEMM curve
    moe_gbps_by_m: dict = field(default_factory=dict)
    # threads the CPU kernels use (0: every core); fewer leave cores to the other worker
    kernel_threads: int = 0
    # plain read GB/s of the whole machine with that many threads (0: the DRAM read): one
    # core alone cannot pull all of DRAM's bandwidth
    kernel_read_gbps: float = 0.0
    # the link between sockets (xGMI / UPI), GB/s both directions together; 0: one socket
    interconnect_gbps: float = 0.0
    # True: the engine's NUMA-aware layout (each socket's cores read the weights in their own
    # DRAM); False: weights interleaved over all nodes, so (sockets-1)/sockets of every read
    # crosses the interconnect (what a NUMA-unaware engine gets)
    numa_aware: bool = True
    # attention on the CPU (no GPU), as the engine runs it in torch: what a decode step's
    # attention block costs per sequence and layer beyond layer_overhead_us, in microseconds,
    # after C cached tokens (C -> us, interpolated linearly, extended past the last point by
    # the last slope; empty: nothing); and the rate of a prompt's scores and weighted sums,
    # GFLOP/s of all cores (0: half the FMA peak)
    attention_us_by_context: dict = field(default_factory=dict)
    attention_gflops: float = 0.0
    # a linear-attention layer's prompt beyond its projections (Qwen3-Next / Qwen3.5: the
    # convolution, norms, gates and the chunked gated delta rule, as the engine runs them), in
    # the recurrence's FLOPs (refmoe.costmodel.recurrent_flops per token) per second;
    # 0: attention_gflops
    linear_gflops: float = 0.0
    # the heads of the block that curve was timed on (DeepSeek-V3's 128), and the same curve
    # timed on a block of attention_few_heads heads (empty: none): with both, a model's
    # curve lies between them, linear in its head count (reading the latent cache costs the
    # same for any head count, the scores scale with the heads)
    attention_heads: int = 128
    attention_us_by_context_few_heads: dict = field(default_factory=dict)
    attention_few_heads: int = 8
    # the decode MoE call itself (one token, top-8 routed experts and the shared one of
    # DeepSeek-V3, fused in one call as the engine makes it), kernel GB/s of the stored bytes
    # over the plain read beside it, per format (fp8 too); empty: the GEMV's efficiencies
    moe_decode_efficiency_by_format: dict = field(default_factory=dict)
    # SLP where the "device" is the CPU itself (the engine on a machine without a GPU, prefill
    # auto or slp): its loader copies each expert's stored bytes into a ring slot in host
    # memory (slp_copy_gbps, memory to memory, one thread), and its compute lane dequantizes
    # them (slp_dequant_gbps of FP8 weight bytes) and runs torch's float32 matmuls
    # (slp_gflops, every core), as refmoe.costmodel.measure_device times them; 0: not
    # calibrated (half the read for the copy; 0.1 GB/s per thread for the dequantization,
    # torch's FP8 conversion as a 2-vCPU Zen 4 VM measured it on 2026-12-05; 0.6 of the FMA
    # peak for the matmuls)
    slp_copy_gbps: float = 0.0
    slp_dequant_gbps: float = 0.0
    slp_gflops: float = 0.0

    def slp_rates(self) -> tuple[float, float, float]:
        """(copy GB/s, dequantization GB/s, matmul GFLOP/s) of SLP on this CPU."""
        return (
            self.slp_copy_gbps or self.read_gbps() / 2,
            self.slp_dequant_gbps or 0.1 * self.threads,
            self.slp_gflops or 0.6 * self.threads * self.fma_gflops_per_core,
        )

    def gemm_gbps(self, m: float) -> float | None:
        """Interpolated (log-log) from the calibrated points; past the last point the GEMM is
        compute-bound, so GB/s falls as 1/M."""
        return self._curve(self.gemm_gbps_by_m, m)

    def moe_gbps(self, m: float) -> float | None:
        """The fused MoE's rate at M tokens per expert (else the GEMM's)."""
        return self._curve(self.moe_gbps_by_m, m) if self.moe_gbps_by_m else self.gemm_gbps(m)

    @staticmethod
    def _curve(points: dict, m: float) -> float | None:
        if not points:
            return None
        pts = sorted((int(k), float(v)) for k, v in points.items())
        if m <= pts[0][0]:
            return pts[0][1]
        for (m0, g0), (m1, g1) in zip(pts, pts[1:]):
            if m <= m1:
                f = (math.log(m) - math.log(m0)) / (math.log(m1) - math.log(m0))
                return math.exp(math.log(g0) + f * (math.log(g1) - math.log(g0)))
        return pts[-1][1] * pts[-1][0] / m

    def attention_us(self, context: float, heads: int | None = None) -> float:
        """The decode attention's cost after `context` cached tokens, beyond the fixed
        per-sequence cost (attention_us_by_context), for a model of `heads` attention heads
        where the profile has the curve at two head counts (else as timed)."""
        many = self._context_curve(self.attention_us_by_context, context)
        if heads is None or not self.attention_us_by_context_few_heads:
            return many
        few = self._context_curve(self.attention_us_by_context_few_heads, context)
        f = (heads - self.attention_few_heads) / (self.attention_heads - self.attention_few_heads)
        return max(0.0, few + f * (many - few))

    @staticmethod
    def _context_curve(points: dict, context: float) -> float:
        pts = sorted((int(k), float(v)) for k, v in points.items())
        if not pts:
            return 0.0
        if context <= pts[0][0] or len(pts) == 1:
            return pts[0][1]
        for (c0, t0), (c1, t1) in zip(pts, pts[1:]):  # noqa: B007 - read after the loop
            if context <= c1:
                break  # else the last segment, extended
        return t0 + (context - c0) * (t1 - t0) / (c1 - c0)

    def score_gflops(self) -> float:
        """The rate of the engine's CPU attention over a prompt (refmoe.models.layers.attend:
        torch's flash kernel from CPU_FLASH_MIN_TOKENS queries on), in the FLOPs it computes:
        a prompt from position 0 its causal FLOPs (the kernel skips the hidden blocks), a
        chunk after a cached past every key's (sim.costs.score_flops dense: the causal rule
        there is a mask)."""
        return (
            self.attention_gflops
            if self.attention_gflops > 0
            else 0.5 * self.cores * self.fma_gflops_per_core
        )

    def recurrence_gflops(self) -> float:
        """The rate a prompt's linear-attention layers run at (linear_gflops, else the
        attention's)."""
        return self.linear_gflops if self.linear_gflops > 0 else self.score_gflops()

    @property
    def cores(self) -> int:
        return self.sockets * self.cores_per_socket

    @property
    def threads(self) -> int:
        return min(self.kernel_threads, self.cores) if self.kernel_threads > 0 else self.cores

    def read_gbps(self) -> float:
        return self.sockets * self.dram_gbps_per_socket * self.dram_efficiency

    def remote_share(self) -> float:
        """The share of a CPU kernel's weight reads that crosses the interconnect."""
        return 0.0 if self.numa_aware or self.sockets == 1 else (self.sockets - 1) / self.sockets

    def stream_gbps(self, fmt: str = "fp8") -> float:
        """What the GEMV of weights stored in fmt sustains (fp8_stream_gbps for FP8, and for
        a 4-bit format the calibration has not measured)."""
        eff = self.gemv_efficiency_by_format.get(fmt)
        if fmt == "fp8" or eff is None:
            return self.fp8_stream_gbps()
        return self._stream_at(eff)

    def _stream_at(self, efficiency: float) -> float:
        """The kernels' read (their threads' plain read) at that efficiency, over the
        interconnect too when the weights are not placed per node."""
        read = (
            min(self.kernel_read_gbps, self.read_gbps())
            if self.kernel_read_gbps > 0
            else self.read_gbps()
        )
        rate = read * efficiency
        if self.remote_share():
            rate = min(rate, self.interconnect_gbps / self.remote_share())
        return rate

    def moe_stream_gbps(self, fmt: str = "fp8") -> float:
        """What the decode MoE call sustains over experts stored in fmt (stream_gbps where
        the calibration has not timed that call)."""
        eff = self.moe_decode_efficiency_by_format.get(fmt)
        return self.stream_gbps(fmt) if eff is None else self._stream_at(eff)

    def fp8_stream_gbps(self) -> float:
        """What the FP8 GEMV sustains over DRAM with every core (and over the interconnect,
        when the weights are not placed per node)."""
        ceiling = self.threads * self.fp8_gemv_gbps_per_core  # the cores' conversion rate
        return min(self._stream_at(self.fp8_gemv_efficiency), ceiling)


@dataclass(slots=True)
class GPU:
    name: str
    hbm_gbps: float
    hbm_efficiency: float = 0.8
    pcie_gbps: float = 50.0  # host-to-device, per direction
    layer_overhead_us: float = 250.0  # per decoder layer at batch 1
    expert_tflops: float = 100.0  # SLP's expert matmuls in BF16 (dense TFLOP/s x efficiency)
    attention_tflops: float = 100.0  # prefill attention and dense layers (same; always BF16)
    # FP8 experts on the FP8 tensor cores (the engine's REFMOE_SLP_MATMUL=scaled_mm), TFLOP/s x
    # efficiency; 0, the engine's default: every expert dequantized and multiplied in BF16
    fp8_expert_tflops: float = 0.0
    socket: int | None = None  # the socket its PCIe root hangs off (default d % sockets)
    memory_gb: float = 0.0  # its memory (0: not given); what fits, and peers' chunk sizes

    def matmul_precision(self, fmt: str) -> str:
        """The precision SLP's expert matmuls run in for experts stored in fmt: fp8 on the FP8
        tensor cores where the profile gives their rate and the experts are FP8 (the engine
        sends 4-bit experts through dequantization whatever it is asked), else bf16."""
        return "fp8" if fmt == "fp8" and self.fp8_expert_tflops > 0 else "bf16"

    def expert_rate(self, fmt: str) -> float:
        """SLP's expert matmul rate, TFLOP/s, for experts stored in fmt."""
        fp8 = self.matmul_precision(fmt) == "fp8"
        return self.fp8_expert_tflops if fp8 else self.expert_tflops


def _build(kind, data, where: str):
    """kind(**data), with a missing or unknown field named (and what the missing one holds)."""
    import dataclasses

    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of fields, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    missing = [
        n
        for n, f in known.items()
        if n not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(
            f"{where}: missing required field(s) {', '.join(missing)} "
            f"(docs/simulator.md lists every field with its unit)"
        )
    return kind(**data)


@dataclass(slots=True)
class Hardware:
    name: str
    cpu: CPU
    gpus: list[GPU] = field(default_factory=list)
    # calibration samples: field path ("cpu.dram_gbps_per_socket", "cpu.gemm_gbps_by_m.4",
    # "gpus.0.pcie_gbps") -> the repeated measurements whose median the field holds
    samples: dict = field(default_factory=dict)
    # the separate calibrations pooled into this one, in the order they were taken: each a
    # field path -> its median in that calibration; consecutive ones measure how far the
    # machine drifts between calibrations (sim/interval.py)
    runs: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict, source: str = "profile") -> Hardware:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a hardware profile is a mapping, got {type(d).__name__}")
        if "name" not in d:
            raise ValueError(f"{source}: missing field 'name' (the profile's name)")
        cpu = _build(CPU, d.get("cpu"), f"{source}: cpu")
        gpus_in = d.get("gpus") or []
        if not isinstance(gpus_in, list):
            raise ValueError(f"{source}: gpus must be a list of GPUs")
        gpus = [_build(GPU, g, f"{source}: gpus[{i}]") for i, g in enumerate(gpus_in)]
        try:
            hw = cls(d["name"], cpu, gpus, dict(d.get("samples") or {}), list(d.get("runs") or []))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: bad hardware profile ({e})") from None
        for key in (
            "sockets",
            "cores_per_socket",
            "dram_gbps_per_socket",
            "fp8_gemv_gbps_per_core",
        ):
            if not getattr(cpu, key) > 0:
                raise ValueError(f"{source}: cpu.{key} must be > 0")
        for key in ("attention_gflops", "layer_overhead_us", "moe_overhead_us"):
            if not getattr(cpu, key) >= 0:
                raise ValueError(f"{source}: cpu.{key} must be >= 0")
        for name in ("attention_us_by_context", "attention_us_by_context_few_heads"):
            for c, t in getattr(cpu, name).items():
                if not (str(c).isdigit() and isinstance(t, (int, float)) and t >= 0):
                    raise ValueError(
                        f"{source}: cpu.{name} maps cached tokens to microseconds >= 0, "
                        f"got {c}: {t}"
                    )
        if not 0 < cpu.attention_few_heads < cpu.attention_heads:
            raise ValueError(
                f"{source}: cpu.attention_few_heads must lie in (0, cpu.attention_heads)"
            )
        for key in ("dram_efficiency", "fp8_gemv_efficiency"):
            if not 0 < getattr(cpu, key) <= 1.0:
                raise ValueError(f"{source}: cpu.{key} must lie in (0, 1]")
        for fmt, eff in cpu.moe_decode_efficiency_by_format.items():
            if fmt not in ("fp8", "mxfp4", "nvfp4", "int4g") or not (
                isinstance(eff, (int, float)) and 0 < eff <= 1.0
            ):
                raise ValueError(
                    f"{source}: cpu.moe_decode_efficiency_by_format maps fp8, mxfp4, nvfp4 or "
                    f"int4g to an efficiency in (0, 1], got {fmt}: {eff}"
                )
        for fmt, eff in cpu.gemv_efficiency_by_format.items():
            if fmt not in ("mxfp4", "nvfp4", "int4g") or not (
                isinstance(eff, (int, float)) and 0 < eff <= 1.0
            ):
                raise ValueError(
                    f"{source}: cpu.gemv_efficiency_by_format maps mxfp4, nvfp4 or int4g to "
                    f"an efficiency in (0, 1], got {fmt}: {eff}"
                )
        if cpu.sockets > 1 and not cpu.interconnect_gbps > 0:
            raise ValueError(
                f"{source}: cpu.interconnect_gbps must be > 0 with {cpu.sockets} sockets"
            )
        for key, values in hw.samples.items():
            try:
                hw.get(key)
            except (AttributeError, IndexError, KeyError, ValueError):
                raise ValueError(f"{source}: samples.{key} names no field of the profile") from None
            if (
                not isinstance(values, list)
                or not values
                or not all(isinstance(v, (int, float)) and v > 0 for v in values)
            ):
                raise ValueError(f"{source}: samples.{key} must be a list of positive numbers")
        for i, run in enumerate(hw.runs):
            if not isinstance(run, dict) or not run:
                raise ValueError(f"{source}: runs[{i}] must map field paths to values")
            for key, value in run.items():
                try:
                    hw.get(key)
                except (AttributeError, IndexError, KeyError, ValueError):
                    raise ValueError(
                        f"{source}: runs[{i}].{key} names no field of the profile"
                    ) from None
                if not isinstance(value, (int, float)) or not value >= 0:
                    raise ValueError(f"{source}: runs[{i}].{key} must be a number >= 0")
        for i, g in enumerate(gpus):
            if g.socket is not None and not 0 <= g.socket < cpu.sockets:
                raise ValueError(
                    f"{source}: gpus[{i}].socket {g.socket} is not one of the {cpu.sockets} sockets"
                )
            for key in ("hbm_gbps", "pcie_gbps", "expert_tflops", "attention_tflops"):
                if not getattr(g, key) > 0:
                    raise ValueError(f"{source}: gpus[{i}].{key} must be > 0")
            if not g.fp8_expert_tflops >= 0:
                raise ValueError(f"{source}: gpus[{i}].fp8_expert_tflops must be >= 0")
        return hw

    def get(self, key: str):
        """The value at a field path such as cpu.gemm_gbps_by_m.4 or gpus.0.pcie_gbps."""
        obj = self
        for part in key.split("."):
            obj = self._child(obj, part)
        return obj

    def set(self, key: str, value: float) -> None:
        *head, last = key.split(".")
        obj = self
        for part in head:
            obj = self._child(obj, part)
        if isinstance(obj, dict):
            k = next(k for k in obj if str(k) == last)
            obj[k] = value
        elif isinstance(obj, list):
            obj[int(last)] = value
        else:
            getattr(obj, last)
            setattr(obj, last, value)

    @staticmethod
    def _child(obj, part: str):
        if isinstance(obj, dict):
            for k in obj:
                if str(k) == part:
                    return obj[k]
            raise KeyError(part)
        if isinstance(obj, list):
            return obj[int(part)]
        if part.startswith("_") or part in ("samples", "runs"):
            raise AttributeError(part)
        return getattr(obj, part)

    @classmethod
    def load(cls, path: str | Path) -> Hardware:
        path = Path(path)
        if not path.exists() and (Path(__file__).parent / "profiles" / f"{path}.yaml").exists():
            path = Path(__file__).parent / "profiles" / f"{path}.yaml"
        try:
            return cls.from_dict(yaml.safe_load(path.read_text()), str(path))
        except FileNotFoundError:
            raise ValueError(f"{path}: no such hardware profile") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))


PCIE_X16_GBPS = {3: 16.0, 4: 32.0, 5: 64.0, 6: 128.0}  # lane rate per direction, x16


def from_spec_sheet(
    name: str,
    sockets: int,
    cores_per_socket: int,
    channels_per_socket: int,
    mts: float,
    fma_gflops_per_core: float = 100.0,
    interconnect_gbps: float = 0.0,
    gpus: list[tuple[str, float, int, float]] | None = None,
) -> Hardware:
    """A profile from spec-sheet numbers, with the efficiencies docs/simulator.md gives as
    typical (DRAM read 0.8 of peak, the FP8 kernel 0.85 of the read, pinned copies 0.8 of the
    PCIe lane rate, expert matmuls 0.5 and attention 0.7 of the dense BF16 rate). gpus: (name,
    HBM GB/s, PCIe generation at x16, dense BF16 TFLOP/s). Validated as any profile is; a
    calibration on the box itself (refmoe-sim calibrate) replaces the CPU guesses."""
    gpu_docs: list[dict] = []
    doc = {
        "name": name,
        "cpu": {
            "sockets": sockets,
            "cores_per_socket": cores_per_socket,
            "dram_gbps_per_socket": channels_per_socket * mts * 8 / 1000,
            "dram_efficiency": 0.8,
            "fp8_gemv_efficiency": 0.85,
            "fma_gflops_per_core": fma_gflops_per_core,
            "interconnect_gbps": interconnect_gbps,
        },
        "gpus": gpu_docs,
    }
    for gpu_name, hbm, gen, bf16 in gpus or []:
        if gen not in PCIE_X16_GBPS:
            raise ValueError(f"--gpu {gpu_name}: PCIe generation {gen} (known: 3, 4, 5, 6)")
        gpu_docs.append(
            {
                "name": gpu_name,
                "hbm_gbps": hbm,
                "pcie_gbps": 0.8 * PCIE_X16_GBPS[gen],
                "expert_tflops": 0.5 * bf16,
                "attention_tflops": 0.7 * bf16,
            }
        )
    return Hardware.from_dict(doc, f"spec sheet {name}")
