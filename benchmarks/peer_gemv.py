"""refmoe's 4-bit GEMV against llama.cpp's on the same shapes and threads, in one run.

For each shape and each pairing (ours / llama.cpp type / llama.cpp layout):

    mxfp4 / mxfp4 / plain and repack (mxfp4_8x8 where the CPU backend offers it)
    nvfp4 / nvfp4 / plain              (llama.cpp has no repacked NVFP4)
    int4g / q4_0  / plain and repack   (q4_0_8x8: what llama.cpp loads Q4_0 into on AVX2/512)

both sides hold COPIES weight matrices of N x K (more than the last-level cache together, so
every weight comes from DRAM, as in decode), and one round times: our COPIES GEMVs through the
public API (kernels.mxfp4_gemm and siblings, validate=False as the engine calls them), the
peer's graph of COPIES mul_mats (benchmarks/peer/ggml_gemv.c in its own process, told "run" on
stdin), and the plain read of our copies. Rounds alternate the three, so each ratio compares
times taken moments apart (MEASURING.md); medians with their interquartile range, the load
average and this process's CPU time over wall time are printed beside them.

Time per weight is the figure compared (the formats' bytes per weight differ a little: MXFP4
4.25 bits, NVFP4 / Q4_0 / INT4-g32 4.5). peer/ours > 1 means refmoe is faster.

Usage:
    bash benchmarks/peer/build_ggml.sh            # once: build/peer/ggml_gemv
    python benchmarks/peer_gemv.py [--threads 2] [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from refmoe import cpu, kernels
from refmoe.kernels import formats

# (ours, peer type, peer layouts)
PAIRS = [
    ("mxfp4", "mxfp4", ("plain", "repack")),
    ("nvfp4", "nvfp4", ("plain",)),
    ("int4g", "q4_0", ("plain", "repack")),
]
# (label, N, K): DeepSeek-V3 / Kimi-K2 routed experts (gate or up, then down), gpt-oss-120b's
SHAPES = {
    "k2_gate_up": ("DeepSeek-V3 / Kimi-K2 gate or up", 2048, 7168),
    "k2_down": ("DeepSeek-V3 / Kimi-K2 down", 7168, 2048),
    "gptoss_gate_up": ("gpt-oss-120b gate_up", 5760, 2880),
}
LLC_BYTES = 32 << 20  # copies together pass this twice over (the Zen 4 CCD's L3)


class Peer:
    """One ggml_gemv process: COPIES matrices of one type and layout, timed per "run"."""

    def __init__(self, exe: Path, typ: str, n: int, k: int, copies: int, threads: int, layout):
        # the same back-off as refmoe's pool (kernels sets GOMP_SPINCOUNT for this process):
        # the two sides' idle threads must not spin on the cores the other side is timing
        env = dict(os.environ, GOMP_SPINCOUNT=os.environ.get("GOMP_SPINCOUNT", "10000"))
        self.proc = subprocess.Popen(
            [str(exe), typ, str(n), str(k), str(copies), str(threads), layout],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self.stdin, self.stdout, self.stderr = self.proc.stdin, self.proc.stdout, self.proc.stderr
        line = self.stdout.readline().split()
        if not line or line[0] != "ready":
            err = self.stderr.read().strip()
            self.proc.kill()
            raise RuntimeError(f"{exe.name} {typ} {layout}: {err or 'no ready line'}")
        self.bytes_per_copy, self.buffer_type = int(line[1]), line[2]

    def run(self) -> float:
        self.stdin.write("run\n")
        self.stdin.flush()
        return float(self.stdout.readline())

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=30)


def ours(fmt: str, n: int, k: int, copies: int, rng) -> tuple[list, int]:
    """COPIES matrices in fmt (each its own memory, the same values), and bytes per copy."""
    dense = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    w, s, g = formats.encode(dense, fmt, 32)
    mats = [(w.copy(), s.copy(), g) for _ in range(copies)]
    return mats, w.nbytes + s.nbytes


def our_call(fmt: str, threads: int):
    if fmt == "mxfp4":
        return lambda x, w, s, g: kernels.mxfp4_gemm(x, w, s, num_threads=threads, validate=False)
    if fmt == "nvfp4":
        return lambda x, w, s, g: kernels.nvfp4_gemm(
            x, w, s, g, num_threads=threads, validate=False
        )
    return lambda x, w, s, g: kernels.int4g_gemm(x, w, s, num_threads=threads, validate=False)


def quartiles(v: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return q[0], statistics.median(v), q[2]


def measure(
    exe: Path, shape: str, fmt: str, typ: str, layouts, threads: int, rounds: int
) -> dict[str, Any]:
    label, n, k = SHAPES[shape]
    rng = np.random.default_rng(0)
    probe_bytes = n * k // 2
    copies = max(4, -(-2 * LLC_BYTES // probe_bytes))
    mats, our_bytes = ours(fmt, n, k, copies, rng)
    call = our_call(fmt, threads)
    x = rng.standard_normal((1, k)).astype(np.float32)
    flats = [w.reshape(-1).view(np.uint8) for w, _, _ in mats]
    peers = {}
    for layout in layouts:
        try:
            peers[layout] = Peer(exe, typ, n, k, copies, threads, layout)
        except RuntimeError as e:
            print(f"  peer {typ} {layout}: not run ({e})", file=sys.stderr)
    for w, s, g in mats:  # warm-up: every page touched, the pools started
        call(x, w, s, g)
    for p in peers.values():
        p.run()
    t_ours, t_read = [], []
    t_peer: dict[str, list[float]] = {lay: [] for lay in peers}
    ratio: dict[str, list[float]] = {lay: [] for lay in peers}
    for _ in range(rounds):
        t0 = time.perf_counter()
        for w, s, g in mats:
            call(x, w, s, g)
        mine = (time.perf_counter() - t0) / copies
        t_ours.append(mine)
        for lay, p in peers.items():
            theirs = p.run() / copies
            t_peer[lay].append(theirs)
            ratio[lay].append(theirs / mine)
        t0 = time.perf_counter()
        for b in flats:
            kernels.read_bandwidth_probe(b, num_threads=threads)
        t_read.append((time.perf_counter() - t0) / copies)
    for p in peers.values():
        p.close()
    weights = n * k
    peer_rows: dict[str, dict] = {}
    row: dict[str, Any] = {
        "shape": shape,
        "label": label,
        "n": n,
        "k": k,
        "copies": copies,
        "threads": threads,
        "ours": fmt,
        "ours_bytes_per_copy": our_bytes,
        "ours_us": quartiles([t * 1e6 for t in t_ours]),
        "ours_ns_per_kweight": statistics.median(t_ours) / weights * 1e12,
        "read_gbs_codes": quartiles([probe_bytes / t / 1e9 for t in t_read]),
        "ours_of_read": statistics.median(
            [r / o for r, o in zip(t_read, t_ours)]
        ),  # codes' read time over ours, per round
        "peer": peer_rows,
    }
    for lay in peers:
        peer_rows[lay] = {
            "type": typ,
            "buffer_type": peers[lay].buffer_type,
            "bytes_per_copy": peers[lay].bytes_per_copy,
            "us": quartiles([t * 1e6 for t in t_peer[lay]]),
            "peer_over_ours": quartiles(ratio[lay]),
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ggml", type=Path, default=Path("build/peer/ggml_gemv"))
    ap.add_argument("--threads", type=int, default=cpu.default_threads())
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--shapes", default="k2_gate_up,k2_down", help=f"of {','.join(SHAPES)}")
    ap.add_argument("--formats", default="mxfp4,nvfp4,int4g")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.ggml.exists():
        sys.exit(f"{args.ggml}: not built (bash benchmarks/peer/build_ggml.sh)")
    usage0, wall0, load0 = resource.getrusage(resource.RUSAGE_SELF), time.time(), os.getloadavg()
    rows = []
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            sys.exit(f"--shapes: unknown shape {shape!r} (of {', '.join(SHAPES)})")
        for fmt, typ, layouts in PAIRS:
            if fmt not in args.formats.split(","):
                continue
            r: dict[str, Any] = measure(
                args.ggml, shape, fmt, typ, layouts, args.threads, args.rounds
            )
            rows.append(r)
            lo, med, hi = r["ours_us"]
            print(
                f"{r['label']} {r['n']}x{r['k']}, {args.threads} threads, {r['copies']} copies"
                f"\n  refmoe {fmt:6s} {med:8.1f} us [{lo:.1f}-{hi:.1f}]"
                f"  {r['ours_of_read']:.2f} of the read ({r['read_gbs_codes'][1]:.1f} GB/s)"
            )
            for lay, p in r["peer"].items():
                plo, pmed, phi = p["us"]
                q = p["peer_over_ours"]
                print(
                    f"  llama.cpp {typ} {lay} ({p['buffer_type']}) {pmed:8.1f} us"
                    f" [{plo:.1f}-{phi:.1f}]   llama.cpp/refmoe {q[1]:.2f} [{q[0]:.2f}-{q[2]:.2f}]"
                )
    usage1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    cpu_s = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.processor() or platform.machine(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        ),
        "variant": kernels.variant(),
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "our_cpu_s_over_wall": cpu_s / (wall1 - wall0),
        "peer": (args.ggml.parent / "llama.cpp-commit.txt").read_text().strip()
        if (args.ggml.parent / "llama.cpp-commit.txt").exists()
        else "",
        "command": " ".join(sys.argv),
    }
    print(
        f"load average {load0[0]:.2f} -> {meta['loadavg_after'][0]:.2f};"
        f" this process's CPU time / wall {meta['our_cpu_s_over_wall']:.2f}"
        " (the peer's time is in its own process)"
    )
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
