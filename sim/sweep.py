"""`refmoe-sim sweep`: many configurations at once, in parallel processes, with plots.

Two kinds of sweep over hardware profiles x prefill policies:
- prompt lengths: TTFT and TPOT of one request per length (sim.predict);
- request rates: a Poisson workload per rate through the engine's scheduler (sim.serve) and
  the share of requests that meet a TTFT and a TPOT SLO (attainment) and goodput.
Rows come back as dicts (--json); plots with matplotlib: TTFT versus prompt length per
policy and hardware, SLO attainment versus request rate.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ProcessPoolExecutor


def _length_case(args) -> dict:
    from sim.hardware import Hardware
    from sim.predict import predict

    cfg, hw_name, prefill, tokens, output = args
    hw = Hardware.load(hw_name)
    if prefill != "cpu" and not hw.gpus:
        return {
            "hardware": hw.name,
            "prefill": prefill,
            "prompt_tokens": tokens,
            "skipped": "no GPU in the profile",
        }
    p = predict(cfg, hw, tokens, output, prefill=prefill)
    return {
        "hardware": hw.name,
        "prefill": prefill,
        "chosen": p.prefill,
        "devices": p.devices,
        "prompt_tokens": tokens,
        "ttft_s": p.ttft_s,
        "tpot_s": p.tpot_s,
        "prefill_tok_s": tokens / p.ttft_s,
    }


def slo(outcomes, duration_s: float, ttft_s: float, tpot_s: float) -> dict:
    """The share of requests that finished within both SLOs (TTFT, and TPOT over the tokens
    after the first) and those requests per second: slo_attainment, goodput_req_s."""
    good = [
        o
        for o in outcomes
        if o.ok
        and o.ttft_s <= ttft_s
        and (o.output_tokens < 2 or (o.e2e_s - o.ttft_s) / (o.output_tokens - 1) <= tpot_s)
    ]
    return {
        "slo_attainment": len(good) / len(outcomes) if outcomes else float("nan"),
        "goodput_req_s": len(good) / duration_s if duration_s > 0 else 0.0,
    }


def _rate_case(args) -> dict:
    from refmoe.serving_metrics import summary, workload
    from sim.hardware import Hardware
    from sim.serve import simulate

    cfg, hw_name, prefill, rate, n, plen, olen, slo_ttft, slo_tpot, seed = args
    hw = Hardware.load(hw_name)
    if prefill != "cpu" and not hw.gpus:
        return {
            "hardware": hw.name,
            "prefill": prefill,
            "request_rate": rate,
            "skipped": "no GPU in the profile",
        }
    outcomes, duration = simulate(cfg, hw, workload(n, rate, plen, olen, seed), prefill=prefill)
    res = summary(outcomes, duration)
    return {
        "hardware": hw.name,
        "prefill": prefill,
        "request_rate": rate,
        **slo(outcomes, duration, slo_ttft, slo_tpot),
        **{
            k: res[k]
            for k in (
                "mean_ttft_ms",
                "p99_ttft_ms",
                "mean_tpot_ms",
                "p99_tpot_ms",
                "output_throughput",
            )
        },
    }


def _run(fn, cases: list, workers: int | None, progress) -> list[dict]:
    if workers == 1:
        serial = map(fn, cases)
        return list(progress(serial, len(cases)) if progress else serial)
    with ProcessPoolExecutor(workers) as pool:
        spread = pool.map(fn, cases)
        return list(progress(spread, len(cases)) if progress else spread)


def sweep_lengths(
    cfg,
    hardware: list[str],
    policies: list[str],
    lengths: list[int],
    output_tokens: int = 8,
    workers: int | None = None,
    progress=None,
) -> list[dict]:
    cases = [
        (cfg, h, p, t, output_tokens) for h, p, t in itertools.product(hardware, policies, lengths)
    ]
    return _run(_length_case, cases, workers, progress)


def sweep_rates(
    cfg,
    hardware: list[str],
    policies: list[str],
    rates: list[float],
    num_prompts: int,
    prompt_len,
    output_len,
    slo_ttft_s: float,
    slo_tpot_s: float,
    seed: int = 0,
    workers: int | None = None,
    progress=None,
) -> list[dict]:
    cases = [
        (cfg, h, p, r, num_prompts, prompt_len, output_len, slo_ttft_s, slo_tpot_s, seed)
        for h, p, r in itertools.product(hardware, policies, rates)
    ]
    return _run(_rate_case, cases, workers, progress)


def plot(rows: list[dict], path: str) -> None:
    """Three panels side by side, one line per (hardware, policy), each line its own colour,
    marker and dash so that none hides another, the legend outside the data: by prompt
    length, TTFT, TPOT and prefill throughput; by request rate, SLO attainment, TTFT (mean and
    P99) and output throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "skipped" not in r]
    by_rate = bool(rows) and "request_rate" in rows[0]
    if by_rate:
        x, xlabel = "request_rate", "request rate (req/s)"
        panels = [
            ("slo_attainment", "SLO attainment", 1.0, False),
            ("mean_ttft_ms", "mean TTFT (s)", 1e-3, True),
            ("output_throughput", "output throughput (tok/s)", 1.0, False),
        ]
    else:
        x, xlabel = "prompt_tokens", "prompt tokens"
        panels = [
            ("ttft_s", "TTFT (s)", 1.0, True),
            ("tpot_s", "TPOT (ms)", 1e3, False),
            ("prefill_tok_s", "prefill (tok/s)", 1.0, True),
        ]
    styles = itertools.cycle(
        [(m, d) for d in ("-", "--", ":", "-.") for m in ("o", "s", "^", "D", "v", "x")]
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    groups = itertools.groupby(
        sorted(rows, key=lambda r: (r["hardware"], r["prefill"], r[x])),
        key=lambda r: (r["hardware"], r["prefill"]),
    )
    for (hw, pol), group in groups:
        g = list(group)
        marker, dash = next(styles)
        for ax, (key, _, scale, _) in zip(axes, panels):
            pts = [(r[x], r[key] * scale) for r in g if key in r]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=marker,
                linestyle=dash,
                label=f"{hw} / {pol}",
                alpha=0.85,
            )
    for ax, (_, label, _, log_y) in zip(axes, panels):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        if not by_rate:
            ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    if by_rate:
        axes[0].set_ylim(0, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
