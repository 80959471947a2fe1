"""Measured and simulated lanes side by side: where a single request's time goes, per layer.

`refmoe-sim validate TRACE --hardware P --lanes OUT.json` replays the trace's request in the
simulator with its per-layer spans, writes one Perfetto file holding both (the measured
processes as "measured: device" and so on, the simulated ones as "simulated: ..."), and
prints per phase (prefill, decode step) and lane (attention, experts, dense mlp) the time
measured and simulated over the whole request, and what lies outside the layers (each
forward's span less its layers' spans: embedding, the LM head, sampling, the Python between
layers). A simulated step that carries a prompt chunk and no decode (chunked prefill with
nothing decoding) counts as prefill."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import fields

from refmoe.config import ModelConfig
from sim.hardware import Hardware

PHASES = ("prefill", "decode")
OUTSIDE = "outside the layers"


def _names(doc: dict) -> dict[tuple[int, int], tuple[str, str]]:
    """(pid, tid) -> (process, lane) from the trace's metadata events."""
    procs = {
        e["pid"]: e["args"]["name"]
        for e in doc["traceEvents"]
        if e.get("ph") == "M" and e["name"] == "process_name"
    }
    return {
        (e["pid"], e["tid"]): (procs.get(e["pid"], "?"), e["args"]["name"])
        for e in doc["traceEvents"]
        if e.get("ph") == "M" and e["name"] == "thread_name"
    }


def _phase(e: dict) -> str:
    args = e.get("args") or {}
    if e["name"] == "decode" and args.get("prefill_chunk_tokens") and args.get("requests") == 1:
        return "prefill"  # a chunk with no decode beside it
    return e["name"]


def breakdown(doc: dict) -> dict[tuple[str, str], list[float]]:
    """(phase, lane) -> seconds per layer span (OUTSIDE: per forward), from one request's
    trace: every layer span is charged to the prefill or decode span that holds it."""
    names = _names(doc)
    spans = [e for e in doc["traceEvents"] if e.get("ph") == "X"]
    forwards = sorted(
        (e["ts"], e["ts"] + e["dur"], _phase(e))
        for e in spans
        if names.get((e["pid"], e["tid"]), ("", ""))[0] == "scheduler" and e["name"] in PHASES
    )
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    inside = [0.0] * len(forwards)
    for e in spans:
        process, lane = names.get((e["pid"], e["tid"]), ("", ""))
        if process == "scheduler" or " L" not in e["name"]:
            continue
        mid = e["ts"] + e["dur"] / 2
        for i, (t0, t1, phase) in enumerate(forwards):
            if t0 <= mid <= t1:
                out[(phase, lane)].append(e["dur"] / 1e6)
                inside[i] += e["dur"]
                break
    for (t0, t1, phase), used in zip(forwards, inside):
        out[(phase, OUTSIDE)].append(max(0.0, (t1 - t0) - used) / 1e6)
    return dict(out)


def simulated_trace(doc: dict, hw: Hardware) -> dict:
    """The trace's one request replayed in the simulator with its per-layer spans."""
    from sim.serve import Simulation

    names = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in doc["metadata"]["model"].items() if k in names})
    req = doc["metadata"]["requests"][0]
    run = Simulation(
        cfg,
        hw,
        [(0.0, req["prompt_tokens"], req["output_tokens"])],
        trace=True,
        trace_layers=True,
        blocks=False,
    ).run()
    assert run.trace is not None
    return run.trace.to_json()


def side_by_side(measured: dict, simulated: dict) -> dict:
    """One Perfetto document: the measured processes, then the simulated ones, each named
    for where it came from, both starting at zero."""
    events = []
    for label, doc, base in (("measured", measured, 0), ("simulated", simulated, 1000)):
        xs = [e["ts"] for e in doc["traceEvents"] if e.get("ph") == "X"]
        t0 = min(xs) if xs else 0.0
        for e in doc["traceEvents"]:
            e = dict(e, pid=e["pid"] + base)
            if e.get("ph") == "M" and e["name"] == "process_name":
                e["args"] = {"name": f"{label}: {e['args']['name']}"}
            elif "ts" in e:
                e["ts"] = e["ts"] - t0
            events.append(e)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "metadata": {"measured": measured["metadata"], "simulated": simulated["metadata"]},
    }


def compare(doc: dict, hw: Hardware) -> tuple[list[dict], dict]:
    """Rows of (phase, lane, measured spans, measured and simulated ms in all, the error)
    and the side-by-side Perfetto document."""
    sim_doc = simulated_trace(doc, hw)
    meas, sim = breakdown(doc), breakdown(sim_doc)
    rows = []
    for key in sorted(set(meas) | set(sim), key=lambda k: (PHASES.index(k[0]), k[1])):
        m, s = meas.get(key, []), sim.get(key, [])
        mm, sm = sum(m) * 1e3, sum(s) * 1e3
        rows.append(
            {
                "phase": key[0],
                "lane": key[1],
                "spans": len(m),
                "measured_ms": mm,
                "simulated_ms": sm,
                "error": (sm - mm) / mm if mm > 0 else float("nan"),
            }
        )
    return rows, side_by_side(doc, sim_doc)


def format_rows(rows: list[dict]) -> str:
    head = f"{'phase':<8} {'lane':<20} {'spans':>6} {'measured':>11} {'simulated':>11} error"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['phase']:<8} {r['lane']:<20} {r['spans']:>6} {r['measured_ms']:>9.1f}ms "
            f"{r['simulated_ms']:>9.1f}ms {100 * r['error']:>+6.1f}%"
        )
    return "\n".join(lines)
