"""A/B of the CPU prefill pieces changed on 2026-12-05, each pair in one process, alternating
(A, B, A, B, ...), medians with their spread, the load average and this process's CPU time
over wall time printed beside them (MEASURING.md: a run that shared the cores is void):

- attention over a prompt (refmoe.models.layers.attend): torch's flash kernel (the engine's
  path from CPU_FLASH_MIN_TOKENS queries on) against the grouped product it replaced;
- SLP's FP8 dequantization on the CPU: kernels.fp8_dequant against torch's conversion;
- SLP's compute lane: torch's bf16 matmul against float32 (bf16 wins only where the CPU has
  bf16 dot products).

Usage: python benchmarks/cpu_prefill_ab.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

from refmoe import kernels
from refmoe.device_matmul import block_dequant, torch_block_dequant
from refmoe.models import layers

# (label, query heads, key heads, new tokens, keys, q/k dims, v dims)
ATTENTION = [
    ("V3 heads, 1,024-token prompt", 128, 128, 1024, 1024, 192, 128),
    ("V3 heads, 512 tokens after 3,584", 128, 128, 512, 4096, 192, 128),
    ("Qwen3-Next GQA, 4,096-token prompt", 16, 2, 4096, 4096, 256, 256),
    ("Qwen3-Next GQA, 201 tokens after 4,127", 16, 2, 201, 4328, 256, 256),
    ("Qwen3-Next GQA, 16 tokens after 4,080", 16, 2, 16, 4096, 256, 256),
]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ab(label: str, a, b, rounds: int, unit: str = "ms") -> None:
    """Alternate a and b (after one warm-up each); print both medians, spreads and b / a."""
    a(), b()
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timed(a))
        tb.append(timed(b))
    ma, mb = statistics.median(ta), statistics.median(tb)
    print(
        f"{label}: new {ma * 1e3:.1f} {unit} ({min(ta) * 1e3:.1f}-{max(ta) * 1e3:.1f}), "
        f"old {mb * 1e3:.1f} ({min(tb) * 1e3:.1f}-{max(tb) * 1e3:.1f}), old / new {mb / ma:.2f}"
    )


def grouped(q, k, v, start, scale):
    """attend as it ran before the flash kernel: the grouped product for any length."""
    keep = layers.CPU_FLASH_MIN_TOKENS
    layers.CPU_FLASH_MIN_TOKENS = 1 << 30
    try:
        return layers.attend(q, k, v, start, scale)
    finally:
        layers.CPU_FLASH_MIN_TOKENS = keep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    rounds = p.parse_args().rounds
    wall0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"load average at start: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}"
    )
    g = torch.Generator().manual_seed(0)
    for label, n, kv, t, s, d, dv in ATTENTION:
        q = torch.randn(n, t, d, generator=g)
        k, v = torch.randn(kv, s, d, generator=g), torch.randn(kv, s, dv, generator=g)
        start = s - t
        new = layers.attend(q, k, v, start, 0.07)
        old = grouped(q, k, v, start, 0.07)
        err = float((new - old).abs().max())
        ab(
            f"attention, {label} (max |new - old| {err:.1e})",
            lambda q=q, k=k, v=v, start=start: layers.attend(q, k, v, start, 0.07),
            lambda q=q, k=k, v=v, start=start: grouped(q, k, v, start, 0.07),
            rounds,
        )
    w = (torch.randn(2048, 7168, generator=g) * 0.05).to(torch.float8_e4m3fn)
    scale = torch.rand(16, 56, generator=g) + 0.5
    codes, sc = w.view(torch.uint8).numpy(), scale.numpy()

    def torch_dequant():
        return torch_block_dequant(w, scale, torch.float32)

    ab(
        "FP8 dequantization 2,048 x 7,168 to float32 (kernel vs torch)",
        lambda: kernels.fp8_dequant(codes, sc, validate=False),
        torch_dequant,
        rounds,
    )
    assert torch.equal(block_dequant(w, scale, torch.float32), torch_dequant())
    x = torch.randn(1024, 7168, generator=g)
    wf = torch.randn(2048, 7168, generator=g)
    xb, wb = x.bfloat16(), wf.bfloat16()
    ab(
        "matmul 1,024 x 7,168 x 2,048 (bf16 vs float32)",
        lambda: xb @ wb.T,
        lambda: x @ wf.T,
        rounds,
    )
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = used.ru_utime + used.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    wall = time.perf_counter() - wall0
    print(
        f"load average at end: {os.getloadavg()[0]:.2f}; this process's CPU time / wall "
        f"{cpu / wall:.2f} over {wall:.0f} s"
    )


if __name__ == "__main__":
    main()
