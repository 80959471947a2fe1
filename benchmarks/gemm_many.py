"""The projections of one input as one call (kernels.fp8_gemm_many) against one call each.

Weights of the heights a decode step projects one hidden vector into (default: DeepSeek-V4's
attention, q_a 1024, kv 512, the compressor's kv and gate 512 each, the indexer compressor's
kv and gate 256 each, all of K = 4096, FP8 128 x 128), COPIES sets of them so the whole
stream comes from DRAM as in decode; each round times every set both ways, alternating, and
prints the medians (microseconds, GB/s of codes and scales) and their ratio, one JSON line per
round. The outputs are checked equal first.

Usage: python benchmarks/gemm_many.py [--rows 1024,512,512,512,256,256] [--k 4096]
       [--rounds 3] [--copies 12] [--threads N]   (check /proc/loadavg first: MEASURING.md)
"""

import argparse
import json
import os
import statistics
import time

import numpy as np

from refmoe import kernels
from refmoe.kernels import formats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1024,512,512,512,256,256")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    rng = np.random.default_rng(0)
    sets = [
        [
            (*formats.fp8_quantize(rng.standard_normal((n, args.k)), (128, 128)), (128, 128))
            for n in rows
        ]
        for _ in range(args.copies)
    ]
    x = rng.standard_normal((1, args.k)).astype(np.float32)
    nbytes = sum(w.nbytes + s.nbytes for w, s, _ in sets[0])
    th = args.threads

    def each(ws):
        return [kernels.fp8_gemm(x, w, s, block=b, num_threads=th) for w, s, b in ws]

    for a, b in zip(each(sets[0]), kernels.fp8_gemm_many(x, sets[0], num_threads=th)):
        assert np.array_equal(a, b)
    for r in range(args.rounds):
        t_each, t_many = [], []
        cpu0 = os.times()
        wall0 = time.perf_counter()
        for _ in range(args.reps):
            for ws in sets:
                t0 = time.perf_counter()
                each(ws)
                t_each.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                kernels.fp8_gemm_many(x, ws, num_threads=th)
                t_many.append(time.perf_counter() - t0)
        wall = time.perf_counter() - wall0
        cpu = os.times()
        me, mm = statistics.median(t_each), statistics.median(t_many)
        row = {
            "round": r,
            "weights": rows,
            "k": args.k,
            "threads": kernels._threads(th),
            "each_us": round(me * 1e6, 1),
            "each_us_p10_p90": [round(q * 1e6, 1) for q in np.percentile(t_each, [10, 90])],
            "many_us": round(mm * 1e6, 1),
            "many_us_p10_p90": [round(q * 1e6, 1) for q in np.percentile(t_many, [10, 90])],
            "each_gbps": round(nbytes / me / 1e9, 2),
            "many_gbps": round(nbytes / mm / 1e9, 2),
            "each_over_many": round(me / mm, 3),
            "cpu_over_wall": round((cpu.user + cpu.system - cpu0.user - cpu0.system) / wall, 2),
            "loadavg": os.getloadavg()[0],
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
