"""`refmoe bench kernels`: kernel speed as ratios to limits measured in the same run.

Every row times the kernel over enough distinct weight copies to defeat the caches (> 100 MB per
pass) and, right beside it with the same threads, a plain read of the same bytes; the figure
that travels between machines is their ratio. GEMM rows also carry the FMA peak of the threads
used, measured in the same run, and every FP8 row the same operation through torch (FP8 ->
bf16, then matmul) as a peer baseline.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial

import numpy as np

from refmoe import contention, kernels
from refmoe.kernels import formats

MIN_BYTES = 100 * 2**20  # weights per timed pass: well past any L3


@dataclass(slots=True)
class Row:
    """One benchmark result; `ratio` is gbps / limit_gbps measured in the same run."""

    op: str
    dtype: str
    model: str
    m: int
    n: int
    k: int
    threads: int
    variant: str
    time_us: float
    gbps: float
    limit_gbps: float
    ratio: float
    ratio_min: float
    ratio_max: float
    gflops: float
    fma_peak_gflops: float | None = None
    fma_ratio: float | None = None
    torch_us: float | None = None
    torch_speedup: float | None = None
    cpu_busy: float = 0.0  # process CPU time / (wall * threads) while the kernel ran
    loadavg: float = 0.0  # 1-minute load average when the row started
    others_cores: float = 0.0  # cores other processes used while the row ran (/proc/stat)
    suspect: str = ""  # why the row should not be trusted (contention, impossible ratio), or ""
    attempts: int = 1  # runs of the row: contaminated or impossible ones are redone, bounded
    fp8_route: str = ""  # FP8 rows: the GEMV route the variant took (kernels.fp8_gemv_route)
    tiles: str = ""  # GEMM rows: "amx" where the product ran on AMX tiles (kernels.amx_tiles)
    gbps_samples: list[float] = field(default_factory=list)  # one per rep
    limit_gbps_samples: list[float] = field(default_factory=list)  # the read beside each


@dataclass(slots=True, frozen=True)
class Shape:
    model: str
    name: str  # gate_up or down
    n: int
    k: int


DEEPSEEK = [Shape("deepseek-v3", "gate_up", 2048, 7168), Shape("deepseek-v3", "down", 7168, 2048)]
QWEN3 = [Shape("qwen3-235b", "gate_up", 1536, 4096), Shape("qwen3-235b", "down", 4096, 1536)]
QUICK = [Shape("tiny", "gate_up", 256, 512)]


def _copies(base: tuple[np.ndarray, ...], count: int) -> list[tuple[np.ndarray, ...]]:
    """count weight sets with distinct memory (rows rolled so no two are byte-identical)."""
    return [tuple(np.roll(a, i, axis=0) for a in base) for i in range(count)]


# FP8 rows by the block one scale covers: DeepSeek's 128 x 128, and compressed-tensors' per
# output channel (llm-compressor's FP8_DYNAMIC releases) and per tensor
FP8_BLOCKS = {
    "fp8": (128, 128),
    "fp8-channel": (1, formats.WHOLE),
    "fp8-tensor": (formats.WHOLE, formats.WHOLE),
}


@lru_cache(maxsize=8)
def _make(fmt: str, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Weights of one expert matrix in fmt, from seeded Gaussians (cached: FP8 encoding of a
    DeepSeek matrix takes seconds)."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    if fmt in FP8_BLOCKS:
        return formats.fp8_quantize(w, FP8_BLOCKS[fmt])
    codes, scale, g = formats.encode(w, fmt, 32)
    if scale is None:  # bf16
        return (codes,)
    return (codes, scale, np.array([g], np.float32)) if fmt == "nvfp4" else (codes, scale)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed_pair(run_kernel, run_read, reps: int, threads: int):
    """Alternate kernel pass and read pass; return per-rep times and the CPU busy fraction."""
    run_kernel()  # warm-up: page faults, libgomp pool, branch predictors
    run_read()
    tk, tr, busy = [], [], []
    for _ in range(reps):
        c0, w0 = _cpu_seconds(), time.perf_counter()
        run_kernel()
        w1, c1 = time.perf_counter(), _cpu_seconds()
        tk.append(w1 - w0)
        busy.append((c1 - c0) / ((w1 - w0) * threads))
        w0 = time.perf_counter()
        run_read()
        tr.append(time.perf_counter() - w0)
    return tk, tr, statistics.median(busy)


def _torch_time(fmt: str, x: np.ndarray, w: tuple[np.ndarray, ...], threads: int) -> float | None:
    """Seconds for the same product through torch: FP8 -> bf16 (block scales applied), matmul."""
    if fmt != "fp8":
        return None
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    codes, s = w
    n, k = codes.shape
    wt = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    st = torch.from_numpy(s).to(torch.bfloat16)
    xt = torch.from_numpy(x).to(torch.bfloat16)

    def run():
        full = st.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        return xt @ (wt.to(torch.bfloat16) * full).T

    run()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gemm_call(fmt: str):
    if fmt in FP8_BLOCKS:
        block = FP8_BLOCKS[fmt]
        return lambda x, w, t, v: kernels.fp8_gemm(
            x, w[0], w[1], block=block, num_threads=t, variant=v
        )
    if fmt == "int4":
        return lambda x, w, t, v: kernels.int4_gemm(x, w[0], w[1], num_threads=t, variant=v)
    # 4-bit: validated once when made (as at load), not on every timed call
    if fmt == "mxfp4":
        return lambda x, w, t, v: kernels.mxfp4_gemm(
            x, w[0], w[1], num_threads=t, variant=v, validate=False
        )
    if fmt == "nvfp4":
        return lambda x, w, t, v: kernels.nvfp4_gemm(
            x, w[0], w[1], w[2], num_threads=t, variant=v, validate=False
        )
    if fmt == "int4g":
        return lambda x, w, t, v: kernels.int4g_gemm(
            x, w[0], w[1], num_threads=t, variant=v, validate=False
        )
    return lambda x, w, t, v: kernels.bf16_gemm(x, w[0], num_threads=t, variant=v)


def bench_gemm(
    fmt: str,
    shape: Shape,
    m: int,
    threads: int,
    variant: str,
    reps: int,
    with_torch: bool,
    min_bytes: int = MIN_BYTES,
) -> Row:
    """y = x W^T over rotating copies of one expert matrix."""
    base = _make(fmt, shape.n, shape.k)
    nbytes = sum(a.nbytes for a in base)
    copies = _copies(base, max(2, -(-min_bytes // nbytes)))
    x = np.random.default_rng(1).standard_normal((m, shape.k)).astype(np.float32)
    call = _gemm_call(fmt)
    bufs = [a.reshape(-1).view(np.uint8) for w in copies for a in w]
    loadavg = os.getloadavg()[0]
    tk, tr, busy = _timed_pair(
        lambda: [call(x, w, threads, variant) for w in copies],
        lambda: [kernels.read_bandwidth_probe(b, num_threads=threads) for b in bufs],
        reps,
        threads,
    )
    per = statistics.median(tk) / len(copies)
    ratios = [r / k for k, r in zip(tk, tr)]
    total = nbytes * len(copies)
    gflops = 2 * m * shape.n * shape.k / per / 1e9
    row = Row(
        op="gemv" if m == 1 else "gemm",
        dtype=fmt,
        model=f"{shape.model}.{shape.name}",
        m=m,
        n=shape.n,
        k=shape.k,
        threads=threads,
        variant=variant,
        fp8_route=kernels.fp8_gemv_route(variant) if fmt in FP8_BLOCKS else "",
        tiles="amx" if m >= kernels.AMX_MIN_TOKENS and kernels.amx_tiles(variant) else "",
        time_us=per * 1e6,
        gbps=nbytes / per / 1e9,
        limit_gbps=total / statistics.median(tr) / 1e9,
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        gflops=gflops,
        cpu_busy=busy,
        loadavg=loadavg,
        gbps_samples=[total / t / 1e9 for t in tk],
        limit_gbps_samples=[total / t / 1e9 for t in tr],
    )
    if m > 1:
        row.fma_peak_gflops = kernels.fma_peak_gflops(num_threads=threads, variant=variant)
        row.fma_ratio = gflops / row.fma_peak_gflops
    if with_torch:
        t = _torch_time(fmt, x, base, threads)
        if t is not None:
            row.torch_us, row.torch_speedup = t * 1e6, t / per
    return row


def bench_moe_layer(
    fmt: str,
    hidden: int,
    inter: int,
    top_k: int,
    threads: int,
    variant: str,
    reps: int,
    model: str,
    layers: int = 2,
) -> Row:
    """One token's MoE decode step: top_k routed experts plus one shared, fused in one call,
    rotating over `layers` distinct layers."""
    e = top_k + 1
    gate, up, down = (
        _make(fmt, inter, hidden, 0),
        _make(fmt, inter, hidden, 1),
        _make(fmt, hidden, inter, 2),
    )
    g_all, u_all, d_all = (_copies(b, layers * e) for b in (gate, up, down))
    scales = (lambda ws: [w[1] for w in ws]) if fmt != "bf16" else (lambda ws: [])
    glob = (lambda ws: [float(w[2][0]) for w in ws]) if fmt == "nvfp4" else (lambda ws: [])
    sets = []
    for layer in range(layers):
        g, u, d = (a[layer * e : (layer + 1) * e] for a in (g_all, u_all, d_all))
        sets.append(
            kernels.ExpertWeights(
                "fp8" if fmt in FP8_BLOCKS else fmt,
                hidden,
                inter,
                [w[0] for w in g],
                [w[0] for w in u],
                [w[0] for w in d],
                scales(g),
                scales(u),
                scales(d),
                group_size=32 if fmt == "int4g" else 128,
                fp8_block=FP8_BLOCKS.get(fmt, (128, 128)),
                gate_global=glob(g),
                up_global=glob(u),
                down_global=glob(d),
            )
        )
    x = np.random.default_rng(3).standard_normal((1, hidden)).astype(np.float32)
    tok = np.zeros(e, np.int64)
    exp = np.arange(e)
    rw = np.full(e, 1.0 / e, np.float32)
    bufs = [
        a.reshape(-1).view(np.uint8)
        for s in sets
        for a in (*s.gate, *s.up, *s.down, *s.gate_scale, *s.up_scale, *s.down_scale)
    ]
    nbytes = sum(b.nbytes for b in bufs) // layers
    loadavg = os.getloadavg()[0]
    tk, tr, busy = _timed_pair(
        lambda: [
            kernels.fused_moe(x, tok, exp, rw, s, num_threads=threads, variant=variant)
            for s in sets
        ],
        lambda: [kernels.read_bandwidth_probe(b, num_threads=threads) for b in bufs],
        reps,
        threads,
    )
    per = statistics.median(tk) / layers
    ratios = [r / k for k, r in zip(tk, tr)]
    return Row(
        op="moe_decode_layer",
        dtype=fmt,
        model=f"{model}.{top_k}+1experts",
        m=1,
        n=inter,
        k=hidden,
        threads=threads,
        variant=variant,
        fp8_route=kernels.fp8_gemv_route(variant) if fmt in FP8_BLOCKS else "",
        time_us=per * 1e6,
        gbps=nbytes / per / 1e9,
        limit_gbps=nbytes * layers / statistics.median(tr) / 1e9,
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        gflops=2 * 3 * e * hidden * inter / per / 1e9,
        cpu_busy=busy,
        loadavg=loadavg,
        gbps_samples=[nbytes * layers / t / 1e9 for t in tk],
        limit_gbps_samples=[nbytes * layers / t / 1e9 for t in tr],
    )


def bench_kernels(
    threads: list[int],
    variants: list[str],
    reps: int = 5,
    quick: bool = False,
    with_torch: bool = True,
    progress=None,
    dtypes: list[str] | None = None,
) -> list[Row]:
    """The standard suite: FP8/INT4/BF16 GEMV, FP8 GEMM M=32, MXFP4/NVFP4/INT4-g32 GEMV and
    per-channel FP8 (fp8-channel) GEMV, the MoE decode layer in FP8 (both) and each 4-bit
    format."""
    shapes = QUICK if quick else DEEPSEEK + QWEN3
    jobs: list[partial[Row]] = []
    size = 4 * 2**20 if quick else MIN_BYTES
    for v in variants:
        for t in threads:
            for m in (1, 32):  # GEMV, then the small GEMM, over every shape
                jobs += [
                    partial(bench_gemm, "fp8", s, m, t, v, reps, with_torch, size) for s in shapes
                ]
            jobs += [
                partial(bench_gemm, f, shapes[0], 1, t, v, reps, False, size)
                for f in ("int4", "bf16")
            ]
            # the 4-bit formats as stored, at the Kimi-K2 / DeepSeek expert shapes (the same),
            # and FP8 with one scale per output channel
            jobs += [
                partial(bench_gemm, f, s, 1, t, v, reps, False, size)
                for f in (*kernels.LUT4_FORMATS, "fp8-channel")
                for s in shapes[:2]
            ]
            for f in ("fp8", "fp8-channel", *kernels.LUT4_FORMATS):
                if quick:
                    jobs.append(partial(bench_moe_layer, f, 512, 256, 2, t, v, reps, "tiny"))
                else:
                    jobs.append(
                        partial(bench_moe_layer, f, 7168, 2048, 8, t, v, reps, "deepseek-v3")
                    )
    if dtypes is not None:  # every job's first argument is its format
        unknown = set(dtypes) - {job.args[0] for job in jobs}
        if unknown:
            raise ValueError(f"--dtypes: no rows for {sorted(unknown)}")
        jobs = [job for job in jobs if job.args[0] in dtypes]
    rows = []
    for job in progress(jobs) if progress else jobs:
        row, others, why, attempts = contention.measured(job, lambda r: r.ratio)
        row.others_cores, row.suspect, row.attempts = others, why, attempts
        rows.append(row)
    flag_thread_inversions(rows)
    return rows


def flag_thread_inversions(rows: list[Row], factor: float = 0.7) -> None:
    """More threads far slower than fewer on the same case (under `factor` of their GB/s)
    cannot be the kernel: something else held the cores. Both rows are flagged."""
    by_case: dict[tuple, list[Row]] = {}
    for r in rows:
        by_case.setdefault((r.op, r.dtype, r.model, r.m, r.variant), []).append(r)
    for case in by_case.values():
        case.sort(key=lambda r: r.threads)
        for few, many in zip(case, case[1:]):
            if many.threads > few.threads and many.gbps < factor * few.gbps:
                why = (
                    f"{many.threads} threads at {many.gbps:.1f} GB/s, {few.threads} at "
                    f"{few.gbps:.1f}: more threads far slower"
                )
                for r in (few, many):
                    r.suspect = f"{r.suspect}; {why}" if r.suspect else why


def format_rows(rows: list[Row]) -> str:
    """The human block: one line per row, bandwidth and ratios first."""
    head = (
        f"{'op':<17}{'dtype':<12}{'model':<28}{'m':>3}{'thr':>4} {'variant':<16}"
        f"{'time_us':>10}{'GB/s':>7}{'read':>7}{'ratio':>6} {'[min-max]':<11}"
        f"{'GFLOP/s':>8}{'fma%':>6}{'torch_x':>8}  flag"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        fma = f"{100 * r.fma_ratio:5.0f}%" if r.fma_ratio is not None else "     -"
        tx = f"{r.torch_speedup:7.1f}x" if r.torch_speedup is not None else "       -"
        route = ("/bf16" if r.fp8_route == "bf16" else "") + ("/amx" if r.tiles else "")
        line = (
            f"{r.op:<17}{r.dtype:<12}{r.model:<28}{r.m:>3}{r.threads:>4} "
            f"{r.variant + route:<16}"
            f"{r.time_us:>10.1f}{r.gbps:>7.1f}{r.limit_gbps:>7.1f}{r.ratio:>6.2f} "
            f"[{r.ratio_min:.2f}-{r.ratio_max:.2f}]{r.gflops:>8.1f}{fma}{tx}"
        )
        lines.append(contention.flagged(line, r.suspect))
    flagged = sum(1 for r in rows if r.suspect)
    if flagged:
        lines.append(
            f"{flagged} row(s) flagged SUSPECT after {contention.RETRIES + 1} runs each: do not "
            "quote them (another process held the cores, or the figure is impossible)"
        )
    return "\n".join(lines)


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
