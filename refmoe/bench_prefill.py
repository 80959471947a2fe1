"""`refmoe bench prefill`: stream-loading prefill over a sweep of prompt lengths.

Each row: prompt tokens, TTFT (the whole prefill, logits of the last position included),
prefill tok/s, the bytes SLP streamed, the host-to-device bandwidth measured in the same run
just before, the PCIe-bound throughput (tokens over bytes / bandwidth) and tok/s over it.
With --cpu, the plain CPU-expert prefill of the same prompt beside it. The cost model's
choice and its crossover use rates measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from refmoe import costmodel, slp


@dataclass(slots=True)
class PrefillRow:
    op: str
    model: str
    device: str
    prompt_tokens: int
    ttft_s: float
    tok_s: float
    bytes_streamed: int
    h2d_gbps: float
    limit_tok_s: float  # PCIe-bound: tokens / (bytes streamed / h2d GB/s)
    ratio: float  # tok_s / limit_tok_s
    mode: str
    ring_slots: int
    matmul: str
    chunks: int
    cpu_tok_s: float | None  # the plain CPU path, when asked for
    chosen: str  # what the cost model picks for this length
    estimate_s: dict
    matmul_note: str  # why the device's FP8 matmul is not used, if it is not


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_prefill(
    model,
    name: str,
    lengths: list[int],
    device: str | None = None,
    ring: int | None = None,
    chunk_tokens: int | None = None,
    with_cpu: bool = False,
    seed: int = 0,
    trace=None,
    progress=None,
) -> tuple[list[PrefillRow], costmodel.Rates]:
    """One prefill per length after a warm-up at the longest; the trace, if given, records
    the longest."""
    if device is not None and torch.device(device).type == "cuda":
        slp.pack_model(model, pin=True)  # a CPU-loaded model streamed to a GPU: pin it once
    runner = slp.StreamPrefill(model, device, ring=ring, chunk_tokens=chunk_tokens)
    dev = runner.device
    rates = costmodel.measure_rates(model.cfg, dev)
    g = torch.Generator().manual_seed(seed)
    # warm-up at the longest length: CUDA context, kernels, the ring, and the allocator's
    # blocks, so that no timed run pays for growing device memory
    warm = torch.randint(0, model.cfg.vocab_size, (max(lengths),), generator=g)
    runner.prefill(warm, model.new_cache(), all_logits=False)
    rows = []
    for t in progress(lengths) if progress else lengths:
        if t + 1 > model.cfg.max_position_embeddings:
            raise ValueError(
                f"--prompt-tokens {t}: the model's context is "
                f"{model.cfg.max_position_embeddings} tokens"
            )
        ids = torch.randint(0, model.cfg.vocab_size, (t,), generator=g)
        h2d = costmodel.measure_h2d_gbps(dev)
        runner.stats = slp.Stats(matmul=runner.matmul.kind)
        runner.trace = trace if t == max(lengths) else None
        _sync(dev)
        start = time.perf_counter()
        logits = runner.prefill(ids, model.new_cache(), all_logits=False)  # as the engine
        logits[-1].cpu()
        _sync(dev)
        ttft = time.perf_counter() - start
        st = runner.stats
        st.matmul = runner.matmul.used  # per weight shape: what actually ran
        limit = slp.pcie_bound_tok_s(t, st.bytes_streamed, h2d)
        cpu_tok_s = None
        if with_cpu:
            start = time.perf_counter()
            model.forward(ids, model.new_cache(), logits="last")[-1].cpu()
            cpu_tok_s = t / (time.perf_counter() - start)
        choice = costmodel.choose_prefill(model.cfg, t, rates)
        rows.append(
            PrefillRow(
                "prefill",
                name,
                str(dev),
                t,
                ttft,
                t / ttft,
                st.bytes_streamed,
                h2d,
                limit,
                (t / ttft) / limit,
                st.mode,
                st.slots,
                st.matmul,
                st.chunks,
                cpu_tok_s,
                choice.path,
                {k: round(v, 4) for k, v in choice.seconds.items()},
                runner.matmul.why_not,
            )
        )
    runner.trace = None
    return rows, rates


def format_rows(rows: list[PrefillRow], rates: costmodel.Rates, cfg) -> str:
    out = [
        f"{'tokens':>7} {'TTFT s':>8} {'tok/s':>9} {'streamed':>9} {'h2d GB/s':>8} "
        f"{'bound':>9} {'ratio':>5} {'mode':>9} {'slots':>5} {'cpu tok/s':>9} choice"
    ]
    for r in rows:
        cpu = f"{r.cpu_tok_s:9.1f}" if r.cpu_tok_s is not None else f"{'-':>9}"
        out.append(
            f"{r.prompt_tokens:7d} {r.ttft_s:8.3f} {r.tok_s:9.1f} "
            f"{r.bytes_streamed / 1e9:8.2f}G {r.h2d_gbps:8.1f} {r.limit_tok_s:9.1f} "
            f"{r.ratio:5.2f} {r.mode:>9} {r.ring_slots:5d} {cpu} {r.chosen}"
        )
    cross = costmodel.crossover_tokens(cfg, rates)
    out.append(
        f"\nrates measured in this run: h2d {rates.h2d_gbps:.1f} GB/s, CPU experts "
        f"{rates.cpu_gemv_gbps:.1f} GB/s (1 token) / {rates.cpu_gflops:.0f} GFLOP/s "
        f"(64 tokens), device experts {rates.device_gflops:.0f} GFLOP/s "
        f"({rows[0].matmul if rows else '?'})"
    )
    if rows and rows[0].matmul_note:
        out.append(f"device FP8 matmul (torch._scaled_mm) not used: {rows[0].matmul_note}")
    out.append(
        "cost-model crossover (SLP on one device beats the CPU experts from): "
        + (f"{cross} tokens" if cross else "never, up to 1M tokens")
    )
    return "\n".join(out)


def rows_as_dicts(rows: list[PrefillRow]) -> list[dict]:
    return [asdict(r) for r in rows]
