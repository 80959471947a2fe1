"""Replay a measured trace's request on a calibrated profile and compare TTFT and TPOT."""

from __future__ import annotations

import json
import statistics
from dataclasses import fields
from pathlib import Path

from refmoe import costmodel
from refmoe.config import ModelConfig
from sim.hardware import Hardware
from sim.predict import predict


def load_trace(path: str | Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable trace ({e})") from None
    meta = doc.get("metadata") or {}
    if not meta.get("requests") or "model" not in meta:
        raise ValueError(f"{path}: trace has no metadata.model or metadata.requests")
    return doc


def measured(doc: dict) -> dict:
    """TTFT of the first request and the median decode step, from the trace itself."""
    req = doc["metadata"]["requests"][0]
    steps = [
        e["dur"] / 1e6
        for e in doc["traceEvents"]
        if e.get("ph") == "X" and e.get("name") == "decode"
    ]
    return {
        "ttft_s": req["first_token_time"] - req["arrival"],
        "tpot_s": statistics.median(steps) if steps else float("nan"),
        "prompt_tokens": req["prompt_tokens"],
        "output_tokens": req["output_tokens"],
    }


def validate(
    path: str | Path,
    hw: Hardware,
    interval: int = 0,
    drift: list[tuple[Hardware, Hardware]] | None = None,
) -> dict:
    """Predicted against measured, per metric; with interval=N also the 90% bootstrap
    interval of each prediction (sim/interval.py) and whether the measurement lies in it.
    drift: (earlier, later) calibrations of this machine whose disagreement the interval
    allows for (default: the runs pooled into hw)."""
    doc = load_trace(path)
    names = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in doc["metadata"]["model"].items() if k in names})
    shape = (doc["metadata"].get("engine") or {}).get("workload") or {}
    if shape.get("scenario") == "agent":
        meas, fn = _agents(doc, cfg, shape)
    elif len(doc["metadata"]["requests"]) > 1:
        meas, fn = _serving(doc, cfg)
    else:
        got = measured(doc)
        meas = {k: got[k] for k in ("ttft_s", "tpot_s")}

        def fn(profile: Hardware) -> dict:
            p = predict(cfg, profile, got["prompt_tokens"], got["output_tokens"])
            return {"ttft_s": p.ttft_s, "tpot_s": p.tpot_s}

    pred = fn(hw)
    rows = {
        k: {"predicted": pred[k], "measured": meas[k], "error": (pred[k] - meas[k]) / meas[k]}
        for k in meas
    }
    if interval:
        from sim.interval import bootstrap

        for k, (lo, hi) in bootstrap(fn, hw, interval, drift=drift).items():
            rows[k]["interval"] = [lo, hi]
            rows[k]["inside"] = bool(lo <= meas[k] <= hi)
    out: dict = {"trace": str(path), "hardware": hw.name, "metrics": rows}
    threads = (doc["metadata"].get("engine") or {}).get("threads")
    if threads and threads != hw.cpu.threads:
        out["warning"] = (
            f"the trace ran the kernels on {threads} threads, the profile on "
            f"{hw.cpu.threads}: calibrate with REFMOE_NUM_THREADS={threads}"
        )
    if len(doc["metadata"]["requests"]) > 1:
        out["requests"] = len(doc["metadata"]["requests"])
    return out


def _serving(doc: dict, cfg: ModelConfig):
    """A served workload: replay its requests (arrival, prompt and output tokens, from the
    trace's records) through the engine's scheduler in the simulator; compare the means of
    TTFT, TPOT and end-to-end latency and the output throughput with the trace's records.
    Returns (measured, a function from a profile to the predicted)."""
    from refmoe.serving_metrics import summary
    from sim.serve import simulate

    reqs = doc["metadata"]["requests"]
    t0 = min(r["arrival"] for r in reqs)
    workload = [(r["arrival"] - t0, r["prompt_tokens"], r["output_tokens"]) for r in reqs]
    engine = doc["metadata"].get("engine") or {}
    path, chunked, rates = engine_policy(engine)
    ok = [r for r in reqs if r.get("first_token_time") is not None]
    tpot = [
        (r["finish_time"] - r["first_token_time"]) / (r["output_tokens"] - 1)
        for r in ok
        if r["output_tokens"] > 1
    ]
    meas = {
        "ttft_s": statistics.fmean(r["first_token_time"] - r["arrival"] for r in ok),
        "tpot_s": statistics.fmean(tpot) if tpot else float("nan"),
        "e2e_s": statistics.fmean(r["finish_time"] - r["arrival"] for r in ok),
        "output_tok_s": sum(r["output_tokens"] for r in ok)
        / (max(r["finish_time"] for r in ok) - t0),
    }

    # the routing the engine served this workload with, replayed when the trace has it
    routing = None
    if "routing" in doc["metadata"]:
        from refmoe.routing import popularity
        from sim.predict import recorded_bins

        routing = recorded_bins(
            popularity(doc["metadata"]["routing"], "the trace's routing"),
            cfg,
            "the trace's routing",
        )

    def fn(profile: Hardware) -> dict:
        outcomes, duration = simulate(
            cfg,
            profile,
            workload,
            prefill=path,
            routing=routing,
            chunked_prefill=chunked,
            rates=rates,
        )
        pred = summary(outcomes, duration)
        e2e = [o.e2e_s for o in outcomes if o.ok]
        return {
            "ttft_s": pred["mean_ttft_ms"] / 1e3,
            "tpot_s": pred["mean_tpot_ms"] / 1e3,
            "e2e_s": statistics.fmean(e2e) if e2e else float("nan"),
            "output_tok_s": pred["output_throughput"],
        }

    return meas, fn


def _agents(doc: dict, cfg: ModelConfig, shape: dict):
    """An agent run (`refmoe bench serve --scenario agent --trace`): the same conversations
    (the workload generator is seeded: its shape in the trace gives the same turns) through
    the simulator's prefix cache and the engine's scheduler; compares the mean TTFT of first
    turns and of later turns, the mean TPOT and the prefix hit rate."""
    from refmoe.serving_metrics import agent_summary, agent_workload_of
    from sim.serve import Simulation

    turns = doc["metadata"].get("turns") or []
    if not turns:
        raise ValueError("an agent trace without metadata.turns (its per-turn records)")
    engine = doc["metadata"].get("engine") or {}

    def split(ttft: dict[int, float]) -> tuple[float, float]:
        later = [v for k, v in ttft.items() if k > 1]
        return ttft[1], statistics.fmean(later) if later else float("nan")

    by_turn: dict[int, list[float]] = {}
    for t in turns:
        if t["ttft_s"] is not None:
            by_turn.setdefault(t["turn"], []).append(t["ttft_s"])
    first, later = split({k: statistics.fmean(v) for k, v in by_turn.items()})
    reqs = doc["metadata"]["requests"]
    tpot = [
        (r["finish_time"] - r["first_token_time"]) / (r["output_tokens"] - 1)
        for r in reqs
        if r.get("first_token_time") is not None and r["output_tokens"] > 1
    ]
    meas = {
        "ttft_first_turn_s": first,
        "ttft_later_turns_s": later,
        "tpot_s": statistics.fmean(tpot),
        "prefix_hit_rate": sum(t["cached_tokens"] for t in turns)
        / sum(t["prompt_tokens"] for t in turns),
    }
    convos = agent_workload_of(shape)
    path, chunked, rates = engine_policy(engine)

    def fn(profile: Hardware) -> dict:
        run = Simulation(
            cfg,
            profile,
            [],
            prefill=path,
            chunked_prefill=chunked,
            conversations=convos,
            rates=rates,
        ).run()
        s = agent_summary(run.records, run.duration_s)
        first, later = split({k: v / 1e3 for k, v in s["mean_ttft_ms_by_turn"].items()})
        return {
            "ttft_first_turn_s": first,
            "ttft_later_turns_s": later,
            "tpot_s": s["mean_tpot_ms"] / 1e3,
            "prefix_hit_rate": s["prefix_hit_rate"],
        }

    return meas, fn


def engine_rates(engine: dict) -> costmodel.Rates | None:
    """The cost model's rates the engine chose paths by, where its trace recorded them
    (refmoe.engine, prefill auto), else None (the profile's)."""
    got = engine.get("rates")
    return costmodel.Rates(**got) if isinstance(got, dict) else None


def engine_policy(engine: dict) -> tuple[str, bool, costmodel.Rates | None]:
    """What a replay takes from a trace's metadata.engine: the prefill policy (auto lets the
    cost model choose per prompt, as the engine did; cpu where the trace names none), chunked
    prefill (traces from before it ran every CPU prefill whole beside decode) and the
    recorded rates (engine_rates)."""
    path = engine.get("prefill") if engine.get("prefill") in ("cpu", "slp", "auto") else "cpu"
    return str(path), bool(engine.get("chunked_prefill", False)), engine_rates(engine)


def summarize(results: list[dict]) -> dict:
    """Per metric over all traces: MAPE, signed bias (mean relative error), mean absolute
    error (in the metric's unit), and how many measurements fell inside their intervals."""
    out: dict = {}
    for r in results:
        for metric, m in r["metrics"].items():
            out.setdefault(metric, []).append(m)
    table = {}
    for metric, ms in out.items():
        errs = [m["error"] for m in ms]
        table[metric] = {
            "n": len(ms),
            "mape": statistics.fmean(abs(e) for e in errs),
            "bias": statistics.fmean(errs),
            "mae": statistics.fmean(abs(m["predicted"] - m["measured"]) for m in ms),
        }
        if all("inside" in m for m in ms):
            table[metric]["inside_interval"] = sum(m["inside"] for m in ms)
    return table


def plot(results: list[dict], path: str) -> None:
    """Predicted against measured, one panel per metric, log axes, y = x, and the bootstrap
    intervals as vertical lines where present."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({k for r in results for k in r["metrics"]})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        pts = [
            (r["metrics"][metric], r.get("segment") or Path(r["trace"]).stem)
            for r in results
            if metric in r["metrics"]
        ]
        for m, label in pts:
            # the interval as drawn, not as error bars about the point: mixed from several
            # calibrations it need not contain the pooled prediction
            line = ax.plot(m["measured"], m["predicted"], "o", label=label)[0]
            if "interval" in m:
                ax.vlines(m["measured"], *m["interval"], color=line.get_color())
        vals = [v for m, _ in pts for v in (m["measured"], m["predicted"], *m.get("interval", ()))]
        lo, hi = min(vals) / 1.3, max(vals) * 1.3
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(
            xscale="log",
            yscale="log",
            xlim=(lo, hi),
            ylim=(lo, hi),
            title=metric,
            xlabel="measured",
            ylabel="predicted",
        )
        for axis in (ax.xaxis, ax.yaxis):  # log minor labels collide on narrow ranges
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    # the legend beside the panels, not over the first one's points
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
