"""Many-token GEMMs on AMX tiles (bf16x3) against the float32 tiles, alternating in one process.

For each shape (N x K, FP8 128 x 128 blocks unless --format says otherwise) and token count,
each round times the product both ways (best of --reps, after a warm-up call), in a
contention window (refmoe.contention: a round where other processes took more than 0.15 of a
core is redone, then flagged), and prints GFLOP/s for each and their ratio: medians over the
rounds with the spread, one JSON line per case with --json. The two outputs are checked
against float64 first: AMX within kernels.AMX_EXTRA_ERROR, the float32 tiles within float32's
bound. Needs the avx512_bf16 build on a CPU with AMX-BF16 (Sapphire Rapids or later).

Usage: python benchmarks/amx_tiles.py [--shapes 2048x7168,7168x2048,1536x7168]
       [--tokens 16,64,128,512] [--threads N] [--rounds 3] [--reps 3] [--format fp8|mxfp4|bf16]
       [--json]   (check /proc/loadavg first: MEASURING.md)
"""

import argparse
import statistics
import time
from functools import partial

import numpy as np

from refmoe import contention, cpu, kernels
from refmoe.kernels import formats

VARIANT = "avx512_bf16"


def weights(fmt: str, n: int, k: int, rng):
    """(call(x, threads), float64 W) for one matrix of the format."""
    w = rng.standard_normal((n, k))
    if fmt == "fp8":
        codes, s = formats.fp8_quantize(w)
        return (
            lambda x, t: kernels.fp8_gemm(x, codes, s, variant=VARIANT, num_threads=t),
            formats.fp8_dequantize(codes, s, (128, 128)),
        )
    if fmt == "mxfp4":
        blocks, scales = formats.mxfp4_quantize(w)
        return (
            lambda x, t: kernels.mxfp4_gemm(x, blocks, scales, variant=VARIANT, num_threads=t),
            formats.mxfp4_dequantize(blocks, scales, k),
        )
    bits = formats.bf16_encode(w.astype(np.float32))
    return (
        lambda x, t: kernels.bf16_gemm(x, bits, variant=VARIANT, num_threads=t),
        formats.bf16_decode(bits),
    )


def best_of(call, x, threads: int, reps: int) -> float:
    call(x, threads)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        call(x, threads)
        best = min(best, time.perf_counter() - t0)
    return best


def check(call, x, w64, fmt: str, threads: int) -> None:
    """Both ways against float64 (the 4-bit format on its int8 activations)."""
    xa = formats.q8_quantize(x)[1] if fmt == "mxfp4" else x
    x64 = xa.astype(np.float64)
    y64, mag = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
    k = x.shape[1]
    for amx in (True, False):
        kernels.set_amx_tiles(amx)
        err = np.abs(call(x, threads) - y64)
        bound = 2 * (k + 8) * 2.0**-24 * mag + (kernels.AMX_EXTRA_ERROR * mag if amx else 0)
        assert (err <= bound + 2.0**-100).all(), f"{'AMX' if amx else 'float32'} off the bound"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="2048x7168,7168x2048,1536x7168")
    ap.add_argument("--tokens", default="16,64,128,512")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--format", choices=("fp8", "mxfp4", "bf16"), default="fp8")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if VARIANT not in kernels.available_variants() or not kernels.amx_tiles(VARIANT):
        raise SystemExit(f"no AMX tiles here: {VARIANT} not runnable or no AMX-BF16 / tile state")
    threads = args.threads or cpu.default_threads()
    rng = np.random.default_rng(0)
    before = kernels.set_amx_tiles(True)
    try:
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            call, w64 = weights(args.format, n, k, rng)
            for m in (int(v) for v in args.tokens.split(",")):
                x = rng.standard_normal((m, k)).astype(np.float32)
                check(call, x, w64, args.format, threads)
                rates: dict[bool, list[float]] = {True: [], False: []}
                flags = []
                for _ in range(args.rounds):
                    for amx in (False, True):
                        kernels.set_amx_tiles(amx)
                        sec, _, why, _ = contention.measured(
                            partial(best_of, call, x, threads, args.reps)
                        )
                        rates[amx].append(2 * m * n * k / sec / 1e9)
                        if why:
                            flags.append(why)
                ratios = [a / f for a, f in zip(rates[True], rates[False])]
                row = {
                    "format": args.format,
                    "n": n,
                    "k": k,
                    "tokens": m,
                    "threads": threads,
                    "float32_gflops": statistics.median(rates[False]),
                    "amx_gflops": statistics.median(rates[True]),
                    "ratio": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "suspect": "; ".join(flags),
                }
                line = (
                    f"{args.format} {n}x{k} M={m:4d} thr={threads}: float32 tiles "
                    f"{row['float32_gflops']:6.0f} GFLOP/s, AMX {row['amx_gflops']:6.0f}, "
                    f"AMX / float32 {row['ratio']:.2f} [{row['ratio_min']:.2f}-"
                    f"{row['ratio_max']:.2f}]"
                )
                contention.print_row(row, line, args.json)
    finally:
        kernels.set_amx_tiles(before)


if __name__ == "__main__":
    main()
