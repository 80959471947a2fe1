"""Replay a measured trace's request on a calibrated profile and compare TTFT and TPOT."""

from __future__ import annotations

import json
import statistics
from dataclasses import fields
from pathlib import Path

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
    steps = [e["dur"] / 1e6 for e in doc["traceEvents"]
             if e.get("ph") == "X" and e.get("name") == "decode"]
    return {"ttft_s": req["first_token_time"] - req["arrival"],
            "tpot_s": statistics.median(steps) if steps else float("nan"),
            "prompt_tokens": req["prompt_tokens"], "output_tokens": req["output_tokens"]}


def validate(path: str | Path, hw: Hardware) -> dict:
    doc = load_trace(path)
    names = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in doc["metadata"]["model"].items() if k in names})
    if len(doc["metadata"]["requests"]) > 1:
        return validate_serving(path, doc, cfg, hw)
    got = measured(doc)
    p = predict(cfg, hw, got["prompt_tokens"], got["output_tokens"])
    rows = {}
    for metric in ("ttft_s", "tpot_s"):
        pred, meas = getattr(p, metric), got[metric]
        rows[metric] = {"predicted": pred, "measured": meas, "error": (pred - meas) / meas}
    return {"trace": str(path), "hardware": hw.name, "metrics": rows}


def validate_serving(path, doc: dict, cfg: ModelConfig, hw: Hardware) -> dict:
    """A served workload: replay its requests (arrival, prompt and output tokens, from the
    trace's records) through the engine's scheduler in the simulator; compare the means of
    TTFT, TPOT and end-to-end latency and the output throughput with the trace's records."""
    from refmoe.bench_serve import summary
    from sim.serve import simulate

    reqs = doc["metadata"]["requests"]
    t0 = min(r["arrival"] for r in reqs)
    workload = [(r["arrival"] - t0, r["prompt_tokens"], r["output_tokens"]) for r in reqs]
    engine = doc["metadata"].get("engine") or {}
    outcomes, duration = simulate(cfg, hw, workload, prefill=engine.get("prefill", "cpu")
                                  if engine.get("prefill") in ("cpu", "slp") else "cpu")
    pred = summary(outcomes, duration)
    ok = [r for r in reqs if r.get("first_token_time") is not None]
    tpot = [(r["finish_time"] - r["first_token_time"]) / (r["output_tokens"] - 1) for r in ok
            if r["output_tokens"] > 1]
    meas = {"ttft_s": statistics.fmean(r["first_token_time"] - r["arrival"] for r in ok),
            "tpot_s": statistics.fmean(tpot) if tpot else float("nan"),
            "e2e_s": statistics.fmean(r["finish_time"] - r["arrival"] for r in ok),
            "output_tok_s": sum(r["output_tokens"] for r in ok) / (
                max(r["finish_time"] for r in ok) - t0)}
    e2e = [o.e2e_s for o in outcomes if o.ok]
    got = {"ttft_s": pred["mean_ttft_ms"] / 1e3, "tpot_s": pred["mean_tpot_ms"] / 1e3,
           "e2e_s": statistics.fmean(e2e) if e2e else float("nan"),
           "output_tok_s": pred["output_throughput"]}
    rows = {k: {"predicted": got[k], "measured": meas[k], "error": (got[k] - meas[k]) / meas[k]}
            for k in meas}
    return {"trace": str(path), "hardware": hw.name, "requests": len(reqs), "metrics": rows}
