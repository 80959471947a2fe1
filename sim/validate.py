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
    got = measured(doc)
    p = predict(cfg, hw, got["prompt_tokens"], got["output_tokens"])
    rows = {}
    for metric in ("ttft_s", "tpot_s"):
        pred, meas = getattr(p, metric), got[metric]
        rows[metric] = {"predicted": pred, "measured": meas, "error": (pred - meas) / meas}
    return {"trace": str(path), "hardware": hw.name, "metrics": rows}
