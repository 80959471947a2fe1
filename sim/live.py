"""`refmoe-sim validate --live`: validation that this machine's drift cannot swamp.

A shared machine's speed moves by 15-30% within minutes, so a calibration taken at one time
says little about a run ten minutes later, and a validation of traces measured once mixes
model error with drift. Here short calibration passes and measured segments alternate in
one run: calibrate, run a held-out workload, calibrate, run the next, ... and each segment
is predicted from the calibration taken just before it (its 90% interval: that
calibration's bootstrap times the drift between the consecutive calibrations of this same
run, calibrations only). The distribution of the errors is the result.

The held-out set differs from what the calibration times (DeepSeek-V3's shapes, FP8, all
cores) in hidden size, expert count, top-k, expert format, kernel threads and context
length. Each segment runs in a process of its own (the kernel threads are fixed at import)
and keeps its calibration (`calibration.yaml`) and trace (`trace.json`) under the output
folder, so that any one of them can be opened with `validate --lanes`."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sim.hardware import Hardware


@dataclass(frozen=True)
class Case:
    """One held-out workload: a demo model of other layer shapes and its request."""

    name: str
    shape: dict
    experts: int
    layers: int
    fmt: str = "fp8"
    threads: int | None = None  # None: the default (every usable core)
    prompt: int = 256
    output: int = 32
    quick: bool = field(default=False, compare=False)


H4096 = dict(  # a DeepSeek-V2-like layer: hidden 4096, 64 heads, top-6 of 1536-wide experts
    hidden_size=4096,
    moe_intermediate_size=1536,
    num_experts_per_tok=6,
    num_attention_heads=64,
    num_key_value_heads=64,
)
# hidden size, experts, top-k, format, threads and context all vary; none is the demo's
# (hidden 7168, FP8, top-8, every core) in more than two of them
CASES = (
    Case(
        "h4096-e48-k6-fp8",
        H4096,
        48,
        3,
        prompt=384,
        output=32,
    ),
    Case(
        "h2048-e64-k6-fp8-1thread",
        dict(
            hidden_size=2048,
            moe_intermediate_size=1408,
            num_experts_per_tok=6,
            num_attention_heads=16,
            num_key_value_heads=16,
            q_lora_rank=768,
        ),
        64,
        4,
        threads=1,
        prompt=256,
        output=32,
    ),
    Case(
        "h5120-e32-k4-mxfp4",
        dict(
            hidden_size=5120,
            moe_intermediate_size=1536,
            num_experts_per_tok=4,
            num_attention_heads=96,
            num_key_value_heads=96,
        ),
        32,
        3,
        fmt="mxfp4",
        prompt=128,
        output=32,
    ),
    Case("v3-e32-k8-int4g-2k", {}, 32, 2, fmt="int4g", prompt=2048, output=24),
    Case(
        "h3072-e64-k8-nvfp4-1thread",
        dict(
            hidden_size=3072,
            moe_intermediate_size=1024,
            num_experts_per_tok=8,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
        64,
        3,
        fmt="nvfp4",
        threads=1,
        prompt=512,
        output=24,
    ),
    Case(
        "h4096-e48-k6-fp8-1k",
        H4096,
        48,
        3,
        prompt=1024,
        output=24,
    ),
)
# small and fast, for a smoke run (tests): still not the demo's shapes
QUICK = (
    Case(
        "quick-h1024-e16-k4-fp8",
        dict(
            hidden_size=1024,
            moe_intermediate_size=512,
            num_experts_per_tok=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            q_lora_rank=256,
            kv_lora_rank=128,
        ),
        16,
        1,
        prompt=24,
        output=6,
        quick=True,
    ),
    Case(
        "quick-h768-e16-k2-mxfp4-1thread",
        dict(
            hidden_size=768,
            moe_intermediate_size=256,
            num_experts_per_tok=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=128,
            kv_lora_rank=64,
        ),
        16,
        1,
        fmt="mxfp4",
        threads=1,
        prompt=16,
        output=6,
        quick=True,
    ),
)


def model_dir(case: Case, root: Path) -> Path:
    """Where the case's model is built (once; later runs reuse it)."""
    import hashlib

    shape = json.dumps(case.shape, sort_keys=True).encode()
    digest = hashlib.sha1(shape).hexdigest()[:8]
    return root / f"{case.name}-L{case.layers}-E{case.experts}-{case.fmt}-{digest}"


def segment(case: Case, models: Path, out: Path, reps: int) -> None:
    """One segment, in this process (its kernel threads set before it started): a short
    calibration pass, then the case's request measured with its trace. Writes
    out/calibration.yaml, out/trace.json and out/segment.json (when each began)."""
    from refmoe import demo
    from refmoe.config import ModelConfig
    from refmoe.trace import for_run
    from sim.calibrate import calibrate

    out.mkdir(parents=True, exist_ok=True)
    d = demo.build(
        model_dir(case, models),
        case.layers,
        case.experts,
        vocab=1024 if case.quick else 8192,
        expert_format=case.fmt,
        shape=case.shape,
    )
    cfg = ModelConfig.from_file(d)
    # a model just built leaves gigabytes of dirty pages: written back during the calibration,
    # they would take the memory bandwidth and CPU it measures (first runs on a new machine)
    os.sync()
    t_cal = time.time()
    hw = calibrate(f"calibration before {case.name}", reps=reps, quick=case.quick)
    hw.save(out / "calibration.yaml")
    t_run = time.time()
    trace = for_run(cfg, "cpu", expert_dtype=case.fmt, case=case.name)
    demo.run(d, case.prompt, case.output, trace=trace)
    trace.write(out / "trace.json")
    (out / "segment.json").write_text(
        json.dumps({"case": case.name, "calibrated_at": t_cal, "ran_at": t_run})
    )


def run(
    out: Path,
    segments: int = 6,
    reps: int = 3,
    interval: int = 20,
    quick: bool = False,
    models: Path | None = None,
    progress=None,
) -> dict:
    """Alternate calibrations and held-out segments (`segments` of them, the cases in turn),
    each in a process of its own; then predict each from the calibration before it. Returns
    {"segments": [...], "summary": {...}}; also written to out/live.json."""
    cases = QUICK if quick else CASES
    models = models or Path.home() / ".cache" / "refmoe" / "heldout"
    out.mkdir(parents=True, exist_ok=True)
    dirs = []
    steps = range(segments)
    for i in progress(steps) if progress else steps:
        case = cases[i % len(cases)]
        seg = out / f"{i:02d}-{case.name}"
        env = dict(os.environ)
        env.pop("REFMOE_NUM_THREADS", None)
        if case.threads:
            env["REFMOE_NUM_THREADS"] = str(case.threads)
        cmd = [sys.executable, "-m", "sim.live", str(i % len(cases)), str(models), str(seg)]
        cmd += [str(reps), "quick" if quick else "full"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"segment {i} ({case.name}) failed:\n{done.stderr[-3000:]}")
        dirs.append(seg)
    results = predict_segments(dirs, interval)
    (out / "live.json").write_text(json.dumps(results, indent=1))
    return results


def predict_segments(dirs: list[Path], interval: int = 20) -> dict:
    """Each segment predicted from its own calibration (taken just before it); the interval
    allows for the drift between each two consecutive calibrations of the run at the same
    kernel threads (calibrations only: no segment's measurement goes into any interval)."""
    from sim.validate import validate

    cals = [Hardware.load(d / "calibration.yaml") for d in dirs]
    # drift: each two consecutive calibrations at the same kernel threads (a 1-thread and a
    # 2-thread calibration differ by the threads, not by how far the machine moved)
    drift = []
    for threads in sorted({hw.cpu.threads for hw in cals}):
        same = [hw for hw in cals if hw.cpu.threads == threads]
        drift += list(zip(same, same[1:]))
    rows = []
    for d, hw in zip(dirs, cals):
        r = validate(d / "trace.json", hw, interval, drift=drift or None)
        rows.append({"segment": d.name, **r})
    return {"segments": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    """Per metric: the median and 90th percentile of |error|, the bias, how many segments lie
    inside their interval, and the count within the issue's targets."""
    out = {}
    for metric, target in (("ttft_s", 0.10), ("tpot_s", 0.05)):
        errs = [r["metrics"][metric]["error"] for r in rows if metric in r["metrics"]]
        if not errs:
            continue
        absolute = sorted(abs(e) for e in errs)
        inside = [r["metrics"][metric].get("inside") for r in rows]
        out[metric] = {
            "n": len(errs),
            "median_abs_error": statistics.median(absolute),
            "p90_abs_error": absolute[min(len(absolute) - 1, int(0.9 * len(absolute)))],
            "bias": statistics.median(errs),
            "within_target": sum(a <= target for a in absolute),
            "target": target,
            "inside_interval": sum(bool(i) for i in inside),
            "with_interval": sum(i is not None for i in inside),
        }
    return out


def format_results(results: dict) -> str:
    lines = [
        f"{'segment':<34} {'TTFT meas':>10} {'pred':>8} {'err':>7}  {'TPOT meas':>10} "
        f"{'pred':>8} {'err':>7}"
    ]
    for r in results["segments"]:
        m = r["metrics"]
        cells = []
        for k in ("ttft_s", "tpot_s"):
            x = m[k]
            mark = "" if "inside" not in x else (" " if x["inside"] else "*")
            cells.append(
                f"{x['measured'] * 1e3:>8.0f}ms {x['predicted'] * 1e3:>6.0f}ms "
                f"{100 * x['error']:>+6.1f}%{mark}"
            )
        lines.append(f"{r['segment']:<34} {cells[0]}  {cells[1]}")
    for metric, s in results["summary"].items():
        lines.append(
            f"{metric}: median |error| {100 * s['median_abs_error']:.1f}% (target "
            f"{100 * s['target']:.0f}%), 90th percentile {100 * s['p90_abs_error']:.1f}%, bias "
            f"{100 * s['bias']:+.1f}%, {s['within_target']}/{s['n']} within the target"
            + (
                f", {s['inside_interval']}/{s['with_interval']} inside the 90% interval"
                if s["with_interval"]
                else ""
            )
        )
    lines.append("(* the measurement lies outside the 90% interval)")
    return "\n".join(lines)


if __name__ == "__main__":  # one segment: python -m sim.live CASE MODELS OUT REPS quick|full
    index, models_root, seg_out, n_reps, kind = sys.argv[1:6]
    chosen = (QUICK if kind == "quick" else CASES)[int(index)]
    segment(chosen, Path(models_root), Path(seg_out), int(n_reps))
