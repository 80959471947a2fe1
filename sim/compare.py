"""`refmoe-sim compare`: refmoe's policies beside other engines' (sim/peers.py) on one model,
one box and one workload, all on the same machine model.

For each engine: TTFT of a lone prompt by length; decode tok/s of a lone request; a decode's
slowdown while a long prompt prefills beside it (its inter-token gaps during the prefill over
its gaps before); and the workload's serving figures with SLO attainment and the worst
request's TPOT over a lone request's.
"""

from __future__ import annotations

import statistics

from refmoe.config import ModelConfig
from refmoe.serving_metrics import summary
from sim.hardware import Hardware
from sim.peers import ENGINES, PEERS, peer, simulate_peer
from sim.serve import Run, Simulation
from sim.sweep import slo
from sim.workloads import Workload


def run_engine(
    engine: str,
    cfg: ModelConfig,
    hw: Hardware,
    requests: list[tuple[float, int, int]],
    overrides: dict | None = None,
    conversations: list | None = None,
) -> Run:
    """Requests (or agents' conversations, refmoe only) through one engine's policy."""
    if engine == "refmoe":
        return Simulation(cfg, hw, requests, prefill="auto", conversations=conversations).run()
    if conversations:
        raise ValueError(f"{engine}: agent conversations are simulated for refmoe only")
    return simulate_peer(cfg, hw, requests, peer(engine, overrides))


def _ttft(o) -> float:
    if o.ttft_s is None:
        raise ValueError(f"a request of {o.prompt_tokens} tokens never started: {o.error}")
    return o.ttft_s


def _gaps(o) -> list[tuple[float, float]]:
    """(start, end) of each inter-token gap of an outcome, in run time."""
    t = o.arrived_at + _ttft(o)
    out = []
    for g in o.itl_s:
        out.append((t, t + g))
        t += g
    return out


def interference(
    engine: str,
    cfg: ModelConfig,
    hw: Hardware,
    prompt_tokens: int,
    overrides: dict | None = None,
    context: int = 1024,
    reply: int = 256,
) -> dict:
    """One request decoding (a `context`-token prompt) when a `prompt_tokens` prompt arrives
    after its 32nd token: its mean gap while that prompt prefills over its median gap before
    it came (slowdown), the longest gap, and the TPOT of a `reply`-token reply that saw it
    (its first reply - 1 gaps) over its gap before (request_tpot_ratio: the per-request
    figure a serving benchmark reports)."""
    long_alone = run_engine(engine, cfg, hw, [(0.0, prompt_tokens, 2)], overrides).outcomes[0]
    dec_alone = run_engine(engine, cfg, hw, [(0.0, context, 34)], overrides).outcomes[0]
    itl = statistics.median(dec_alone.itl_s)
    arrive = _ttft(dec_alone) + 32 * itl
    n_out = max(reply, 34 + int(1.5 * _ttft(long_alone) / itl) + 64)
    run = run_engine(
        engine, cfg, hw, [(0.0, context, n_out), (arrive, prompt_tokens, 2)], overrides
    )
    dec, long = run.outcomes
    end = arrive + _ttft(long)
    gaps = _gaps(dec)
    before = [b - a for a, b in gaps if b <= arrive]
    during = [b - a for a, b in gaps if b > arrive and a < end]
    base = statistics.median(before) if before else itl
    return {
        "prompt_tokens": prompt_tokens,
        "decode_context": context,
        "prefill_s": _ttft(long),
        "prefill_alone_s": _ttft(long_alone),
        "itl_alone_ms": base * 1e3,
        "itl_during_ms": statistics.fmean(during) * 1e3 if during else float("nan"),
        "slowdown": statistics.fmean(during) / base if during else float("nan"),
        "worst_gap_s": max(during) if during else 0.0,
        "request_tpot_ratio": statistics.fmean(dec.itl_s[: reply - 1]) / base,
    }


def serve_workload(
    engine: str,
    cfg: ModelConfig,
    hw: Hardware,
    wl: Workload,
    tpot_alone_s: float,
    overrides: dict | None = None,
) -> dict:
    """The workload's serving figures through one engine, with SLO attainment and the
    worst and P99 request TPOT over a lone request's (`tpot_alone_s`)."""
    run = run_engine(engine, cfg, hw, wl.requests(), overrides, wl.conversation_turns() or None)
    res = summary(run.outcomes, run.duration_s)
    tpots = sorted(
        (o.e2e_s - _ttft(o)) / (o.output_tokens - 1)
        for o in run.outcomes
        if o.ok and o.e2e_s is not None and o.output_tokens > 1
    )
    out = {
        k: res[k]
        for k in (
            "completed",
            "mean_ttft_ms",
            "p99_ttft_ms",
            "mean_tpot_ms",
            "p99_tpot_ms",
            "output_throughput",
        )
        if k in res
    }
    out.update(slo(run.outcomes, run.duration_s, wl.slo_ttft_s, wl.slo_tpot_s))
    if tpots:
        out["worst_tpot_ratio"] = tpots[-1] / tpot_alone_s
        out["p99_tpot_ratio"] = tpots[min(len(tpots) - 1, int(0.99 * len(tpots)))] / tpot_alone_s
    return out


def compare(
    cfg: ModelConfig,
    hw: Hardware,
    wl: Workload,
    engines: tuple[str, ...] = ENGINES,
    lengths: tuple[int, ...] = (1024, 4096, 16384, 32768),
    interference_tokens: int = 16384,
    overrides: dict | None = None,
    progress=None,
) -> dict:
    """Every engine's figures (see the module's docstring) as one dict; overrides: engine ->
    {parameter: value} for the peers (sim.peers.Peer)."""
    overrides = overrides or {}
    for name in engines:
        if name not in ENGINES:
            raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})")
    lengths = tuple(n for n in lengths if n + 2 <= cfg.max_position_embeddings)
    out: dict = {"hardware": hw.name, "workload": wl.name, "engines": {}}
    for name in engines:
        o = overrides.get(name)
        row: dict = {"source": PEERS[name].source if name in PEERS else "refmoe (sim/serve.py)"}
        row["ttft_s"] = {
            n: _ttft(run_engine(name, cfg, hw, [(0.0, n, 2)], o).outcomes[0]) for n in lengths
        }
        lone = run_engine(name, cfg, hw, [(0.0, 1024, 33)], o).outcomes[0]
        tpot = statistics.median(lone.itl_s)
        row["decode_tok_s"] = 1.0 / tpot
        row["interference"] = interference(name, cfg, hw, interference_tokens, o)
        if wl.agents and name != "refmoe":
            row["workload"] = {"skipped": "agent conversations are simulated for refmoe only"}
        else:
            row["workload"] = serve_workload(name, cfg, hw, wl, tpot, o)
        out["engines"][name] = row
        if progress:
            progress(name)
    return out


def format_table(res: dict) -> str:
    engines = res["engines"]
    names = list(engines)
    w = max(14, *(len(n) + 2 for n in names))
    lines = [f"{res['hardware']}, workload {res['workload']}", ""]
    head = f"{'':<34}" + "".join(f"{n:>{w}}" for n in names)
    lines.append(head)
    lengths = list(next(iter(engines.values()))["ttft_s"])
    for n in lengths:
        cells = "".join(f"{engines[e]['ttft_s'][n]:>{w}.2f}" for e in names)
        lines.append(f"{'TTFT (s), ' + format(n, ',') + ' tokens':<34}" + cells)
    lines.append(
        f"{'decode tok/s, one request':<34}"
        + "".join(f"{engines[e]['decode_tok_s']:>{w}.1f}" for e in names)
    )
    inter = next(iter(engines.values()))["interference"]["prompt_tokens"]
    lines.append(
        f"{'decode gap during ' + format(inter, ',') + '-tok prefill':<34}"
        + "".join(f"{engines[e]['interference']['slowdown']:>{w - 1}.2f}x" for e in names)
    )
    lines.append(
        f"{'  TPOT of a 256-token reply':<34}"
        + "".join(f"{engines[e]['interference']['request_tpot_ratio']:>{w - 1}.2f}x" for e in names)
    )
    lines.append(
        f"{'  longest gap (s)':<34}"
        + "".join(f"{engines[e]['interference']['worst_gap_s']:>{w}.2f}" for e in names)
    )
    for key, label, fmt in (
        ("mean_ttft_ms", "workload mean TTFT (s)", lambda v: f"{v / 1e3:.2f}"),
        ("p99_ttft_ms", "workload P99 TTFT (s)", lambda v: f"{v / 1e3:.2f}"),
        ("mean_tpot_ms", "workload mean TPOT (ms)", lambda v: f"{v:.1f}"),
        ("worst_tpot_ratio", "worst TPOT / lone TPOT", lambda v: f"{v:.2f}x"),
        ("slo_attainment", "SLO attainment", lambda v: f"{v:.2f}"),
        ("goodput_req_s", "goodput (req/s)", lambda v: f"{v:.4f}"),
    ):
        cells = ""
        for e in names:
            v = engines[e]["workload"].get(key)
            cells += f"{fmt(v) if v is not None else '-':>{w}}"
        lines.append(f"{label:<34}" + cells)
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    """Three panels: TTFT by prompt length (log-log), decode tok/s alone and during the long
    prefill, and the workload's SLO attainment, one colour per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = res["engines"]
    names = list(engines)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    markers = ["o", "s", "^", "D", "v"]
    for k, name in enumerate(names):
        xs = sorted(engines[name]["ttft_s"], key=int)
        axes[0].plot(
            [int(x) for x in xs],
            [engines[name]["ttft_s"][x] for x in xs],
            marker=markers[k % len(markers)],
            label=name,
        )
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("prompt tokens")
    axes[0].set_ylabel("TTFT alone (s)")
    axes[0].grid(True, which="both", alpha=0.3)
    axes[0].legend()
    xs = list(range(len(names)))
    alone = [engines[n]["decode_tok_s"] for n in names]
    during = [1e3 / engines[n]["interference"]["itl_during_ms"] for n in names]
    axes[1].bar([x - 0.2 for x in xs], alone, 0.4, label="alone")
    inter = engines[names[0]]["interference"]["prompt_tokens"]
    axes[1].bar([x + 0.2 for x in xs], during, 0.4, label=f"during a {inter:,}-token prefill")
    axes[1].set_xticks(list(xs), names)
    axes[1].set_ylabel("decode tok/s of one request")
    axes[1].legend()
    att = [engines[n]["workload"].get("slo_attainment", 0.0) for n in names]
    axes[2].bar(list(xs), att)
    axes[2].set_xticks(list(xs), names)
    axes[2].set_ylim(0, 1.05)
    axes[2].set_ylabel(f"SLO attainment, workload {res['workload']}")
    fig.suptitle(f"{res['hardware']}")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
