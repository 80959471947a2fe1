"""The GEMVs' weight prefetch, hint by distance, from DRAM, alternating in one process.

Which prefetch instruction (`prefetchnta`, `prefetcht0`, `prefetcht1`) and how far ahead the
GEMVs ask for their weights decides how much of the memory's bandwidth a decode step gets: on
the Zen 4 VM prefetchnta 2 KiB ahead read the FP8 GEMV at half the plain read, prefetcht1 16
KiB ahead at three quarters (docs/kernels.md, "Prefetcht1 on Zen 4"). The defaults are chosen
per CPU (refmoe.kernels.default_prefetch_hint); this script measures the choices on the CPU at
hand so a user can set REFMOE_PREFETCH_HINT / REFMOE_PREFETCH_BYTES for one not yet measured.

Each round times, for every setting in turn, one GEMV over each of --matrices copies of an
N x K matrix (together past any L3, so every byte comes from DRAM) with --threads threads,
then the plain read of a 512 MiB buffer (the same threads), each in a contention window
(refmoe.contention: redone while other processes take more than 0.15 of a core, then
flagged). Printed per setting: the GEMV's GB/s (weight bytes as stored) and its ratio to the
read of the same round, medians over the rounds with the spread; one JSON line each with
--json. The outputs are the same bits under every setting (tests/test_kernels.py); the script
checks that too.

Usage: python benchmarks/prefetch_ab.py [--settings nta:2048,t0:2048,t1:16384]
       [--format fp8|mxfp4] [--shape 2048x7168] [--matrices 24] [--threads N] [--rounds 5]
       [--json]   (check /proc/loadavg first: MEASURING.md)
"""

import argparse
import statistics
import time

import numpy as np

from refmoe import contention, cpu, kernels
from refmoe.kernels import formats


def matrices(fmt: str, n: int, k: int, count: int, rng):
    """count calls y = x @ W_i.T of the format (one matrix made, the rest copies of it) and
    the bytes each reads."""
    w = rng.standard_normal((n, k))
    if fmt == "fp8":
        codes, s = formats.fp8_quantize(w)
        copies = [codes.copy() for _ in range(count)]
        return [
            lambda x, t, c=c: kernels.fp8_gemm(x, c, s, num_threads=t) for c in copies
        ], codes.nbytes + s.nbytes
    blocks, scales = formats.mxfp4_quantize(w)
    copies = [blocks.copy() for _ in range(count)]
    return [
        lambda x, t, b=b: kernels.mxfp4_gemm(x, b, scales, num_threads=t, validate=False)
        for b in copies
    ], blocks.nbytes + scales.nbytes


def sweep(calls, x, threads: int) -> float:
    t0 = time.perf_counter()
    for call in calls:
        call(x, threads)
    return time.perf_counter() - t0


def read_seconds(buf: np.ndarray, threads: int) -> float:
    t0 = time.perf_counter()
    kernels.read_bandwidth_probe(buf, num_threads=threads)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="nta:2048,t0:2048,t1:2048,t1:16384")
    ap.add_argument("--format", choices=("fp8", "mxfp4"), default="fp8")
    ap.add_argument("--shape", default="2048x7168")
    ap.add_argument("--matrices", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    settings = []
    for item in args.settings.split(","):
        hint, _, nbytes = item.partition(":")
        if hint not in kernels.PREFETCH_HINTS or not nbytes.isdigit():
            raise SystemExit(
                f"--settings: expected HINT:BYTES with HINT in "
                f"{', '.join(kernels.PREFETCH_HINTS)}, got {item!r}"
            )
        settings.append((hint, int(nbytes)))
    threads = args.threads or cpu.default_threads()
    n, k = (int(v) for v in args.shape.split("x"))
    rng = np.random.default_rng(0)
    calls, nbytes = matrices(args.format, n, k, args.matrices, rng)
    x = rng.standard_normal((1, k)).astype(np.float32)
    buf = np.ones(512 << 20, np.uint8)
    four_bit = args.format == "mxfp4"  # the 4-bit loop has a setting of its own
    before = kernels.prefetch_hint(four_bit=four_bit), kernels.prefetch_distance()
    gbps: dict = {s: [] for s in settings}
    ratios: dict = {s: [] for s in settings}
    flags: dict = {s: [] for s in settings}
    try:
        want = None
        for hint, dist in settings:  # the same bits under every setting
            kernels.set_prefetch_hint(hint, four_bit=four_bit)
            kernels.set_prefetch_distance(dist)
            got = calls[0](x, threads)
            assert want is None or np.array_equal(got, want), (hint, dist)
            want = got
        for _ in range(args.rounds):
            for s in settings:
                kernels.set_prefetch_hint(s[0], four_bit=four_bit)
                kernels.set_prefetch_distance(s[1])
                sec, _, why, _ = contention.measured(lambda: sweep(calls, x, threads))
                rsec, _, rwhy, _ = contention.measured(lambda: read_seconds(buf, threads))
                rate = len(calls) * nbytes / sec / 1e9
                gbps[s].append(rate)
                ratios[s].append(rate / (buf.nbytes / rsec / 1e9))
                flags[s] += [w for w in (why, rwhy) if w]
    finally:
        kernels.set_prefetch_hint(before[0], four_bit=four_bit)
        kernels.set_prefetch_distance(before[1])
    for s in settings:
        row = {
            "format": args.format,
            "n": n,
            "k": k,
            "threads": threads,
            "hint": s[0],
            "bytes_ahead": s[1],
            "gbps": statistics.median(gbps[s]),
            "gbps_all": gbps[s],
            "ratio": statistics.median(ratios[s]),
            "ratio_min": min(ratios[s]),
            "ratio_max": max(ratios[s]),
            "suspect": "; ".join(flags[s]),
        }
        line = (
            f"{args.format} {n}x{k} thr={threads} {s[0]:>3} {s[1]:>6} B ahead: "
            f"{row['gbps']:5.1f} GB/s, of the read {row['ratio']:.2f} "
            f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]"
        )
        contention.print_row(row, line, args.json)


if __name__ == "__main__":
    main()
