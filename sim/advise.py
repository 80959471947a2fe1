"""`refmoe-sim advise`: which box to buy for a model and a workload.

From a catalog of parts (sim/parts.yaml, or the user's own with their prices) it enumerates
boxes: a CPU model on one or two sockets with every memory channel filled by the smallest
DIMM that holds the model, and none or 1-8 of one GPU model (as many x16 slots as the CPUs'
lanes give). A box that cannot hold the model in RAM, or whose budget is exceeded, is
dropped with the reason. Each remaining box becomes a spec-sheet profile
(sim.hardware.from_spec_sheet, the typical efficiencies), runs the workload through refmoe's
own policy and scheduler (sim.serve.Simulation), and is scored by SLO attainment and goodput.
The Pareto front of price against attainment (then goodput) is printed and plotted; every box
on it is rerun with every rate of its profile 15% lower and 15% higher, a sensitivity range
for spec-sheet guesses (not a statistical interval: calibrate a box you have to get one).

Sweeps run on every local core by default (processes), or on a Ray cluster with
`--ray ADDRESS` (`--ray local` starts one here): one function per box either way.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from refmoe.config import ModelConfig
from sim import costs
from sim.hardware import Hardware, from_spec_sheet
from sim.workloads import Workload

PARTS = Path(__file__).parent / "parts.yaml"
CPU_FIELDS = ("name", "cores", "channels", "mts", "fma_gflops_per_core", "sockets", "price")
GPU_FIELDS = ("name", "memory_gb", "hbm_gbps", "bf16_tflops", "pcie_gen", "price")
SPREAD = 0.15  # the sensitivity range: every rate this much lower and higher
GOODPUT_TIE = 0.01


def load_parts(path: str | Path | None = None) -> dict:
    """The catalog, every part checked for its fields (a missing one named with the file)."""
    path = Path(path) if path else PARTS
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--parts {path}: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"--parts {path}: expected a mapping with cpus, gpus, memory, platform")
    for kind, fields in (("cpus", CPU_FIELDS), ("gpus", GPU_FIELDS)):
        items = doc.get(kind)
        if not isinstance(items, list) or (kind == "cpus" and not items):
            raise ValueError(f"--parts {path}: {kind} must be a list of parts")
        for i, part in enumerate(items):
            missing = [f for f in fields if not isinstance(part, dict) or f not in part]
            if missing:
                raise ValueError(f"--parts {path}: {kind}[{i}] lacks {', '.join(missing)}")
            for f in fields[1:]:
                v = part[f]
                ok = (
                    all(isinstance(x, int) and x > 0 for x in v)
                    if f == "sockets"
                    else (isinstance(v, (int, float)) and v > 0)
                )
                if not ok:
                    raise ValueError(
                        f"--parts {path}: {kind}[{i}] ({part['name']}): bad {f}: {v!r}"
                    )
    mem = doc.get("memory") or {}
    if not mem.get("dimm_gb") or not isinstance(mem.get("price_per_gb"), (int, float)):
        raise ValueError(f"--parts {path}: memory needs dimm_gb (a list) and price_per_gb")
    plat = (doc.get("platform") or {}).get("price_by_sockets")
    if not isinstance(plat, dict):
        raise ValueError(f"--parts {path}: platform needs price_by_sockets (sockets: price)")
    doc["platform"]["price_by_sockets"] = {int(k): float(v) for k, v in plat.items()}
    return doc


@dataclass(frozen=True, slots=True)
class Box:
    cpu: str
    sockets: int
    dimm_gb: int
    ram_gb: int
    gpu: str  # "" for none
    gpus: int
    price: float

    @property
    def name(self) -> str:
        gpu = f", {self.gpus}x {self.gpu}" if self.gpus else ", no GPU"
        return f"{self.sockets}x {self.cpu}, {self.ram_gb} GB{gpu}"


def boxes(
    parts: dict,
    cfg: ModelConfig,
    max_gpus: int = 8,
    budget: float | None = None,
    headroom: float = 1.15,
) -> tuple[list[Box], list[tuple[str, str]]]:
    """Every box the catalog makes (see the module's docstring) that holds the model with
    `headroom` over its weights (caches, the OS) and costs at most `budget`: (boxes, the
    dropped ones as (what, why))."""
    need_gb = costs.model_bytes(cfg) * headroom / 1e9
    mem, plat = parts["memory"], parts["platform"]["price_by_sockets"]
    out, dropped = [], []
    gpu_options = [("", None, 0)] + [
        (g["name"], g, n) for g in parts["gpus"] for n in range(1, max_gpus + 1)
    ]
    for cpu in parts["cpus"]:
        for sockets in cpu["sockets"]:
            channels = cpu["channels"] * sockets
            fits = [d for d in sorted(mem["dimm_gb"]) if d * channels >= need_gb]
            what = f"{sockets}x {cpu['name']}"
            if not fits:
                dropped.append(
                    (
                        what,
                        f"{max(mem['dimm_gb']) * channels} GB at most, the model needs "
                        f"{need_gb:.0f} GB",
                    )
                )
                continue
            if sockets not in plat:
                dropped.append((what, f"no platform price for {sockets} sockets"))
                continue
            dimm = fits[0]
            base = cpu["price"] * sockets + dimm * channels * mem["price_per_gb"] + plat[sockets]
            slots = cpu.get("pcie_lanes", 128) * sockets // 16
            for gname, g, n in gpu_options:
                if n > slots:
                    continue
                price = base + (g["price"] * n if g else 0.0)
                box = Box(cpu["name"], sockets, dimm, dimm * channels, gname, n, price)
                if budget is not None and price > budget:
                    dropped.append((box.name, f"${price:,.0f} over the budget"))
                    continue
                out.append(box)
    return out, dropped


def profile(box: Box, parts: dict, scale: float = 1.0) -> Hardware:
    """The box as a spec-sheet profile; scale multiplies every rate (the sensitivity range)."""
    cpu = next(c for c in parts["cpus"] if c["name"] == box.cpu)
    g = next((x for x in parts["gpus"] if x["name"] == box.gpu), None)
    gpus = [(g["name"], g["hbm_gbps"], g["pcie_gen"], g["bf16_tflops"])] * box.gpus if g else []
    hw = from_spec_sheet(
        box.name,
        box.sockets,
        cpu["cores"],
        cpu["channels"],
        cpu["mts"],
        cpu["fma_gflops_per_core"],
        cpu.get("interconnect_gbps", 0.0) if box.sockets > 1 else 0.0,
        gpus,
    )
    for gpu in hw.gpus:
        gpu.memory_gb = g["memory_gb"] if g else 0.0
    if scale != 1.0:
        hw = copy.deepcopy(hw)
        c = hw.cpu
        c.dram_gbps_per_socket *= scale
        c.fp8_gemv_gbps_per_core *= scale
        c.fma_gflops_per_core *= scale
        c.interconnect_gbps *= scale
        for gpu in hw.gpus:
            gpu.hbm_gbps *= scale
            gpu.pcie_gbps *= scale
            gpu.expert_tflops *= scale
            gpu.fp8_expert_tflops *= scale
            gpu.attention_tflops *= scale
    return hw


def evaluate(case: tuple) -> dict:
    """One box through the workload: (cfg, box, parts, workload, scale) -> its figures."""
    from refmoe.serving_metrics import summary
    from sim.serve import Simulation
    from sim.sweep import slo

    cfg, box, parts, wl, scale = case
    hw = profile(box, parts, scale)
    run = Simulation(
        cfg,
        hw,
        wl.requests(),
        prefill="auto",
        conversations=wl.conversation_turns() or None,
    ).run()
    res = summary(run.outcomes, run.duration_s)
    ttfts = sorted(o.ttft_s for o in run.outcomes if o.ok and o.ttft_s is not None)
    return {
        **asdict(box),
        "box": box.name,
        "scale": scale,
        **slo(run.outcomes, run.duration_s, wl.slo_ttft_s, wl.slo_tpot_s),
        "p90_ttft_s": ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else math.inf,
        "mean_tpot_ms": res.get("mean_tpot_ms", math.nan),
        "output_throughput": res.get("output_throughput", 0.0),
    }


def pareto(rows: list[dict]) -> list[dict]:
    """The boxes no other beats: none as cheap or cheaper with as high an attainment and
    goodput, better in one (sorted by price); goodputs within GOODPUT_TIE of each other are
    the same (the same requests finishing a few seconds apart)."""
    front: list[dict] = []
    key = lambda r: (r["price"], -r["slo_attainment"], -r["goodput_req_s"])  # noqa: E731
    for r in sorted(rows, key=key):
        if not front:
            front.append(r)
            continue
        best = front[-1]
        better = r["slo_attainment"] > best["slo_attainment"] + 1e-9 or (
            r["slo_attainment"] >= best["slo_attainment"] - 1e-9
            and r["goodput_req_s"] > best["goodput_req_s"] * (1 + GOODPUT_TIE)
        )
        if better:
            front.append(r)
    return front


def run_all(fn, cases: list, workers: int | None = None, ray: str | None = None, progress=None):
    """fn over cases on local processes (workers; 1: in this process), or as Ray tasks on the
    cluster at `ray` ("local": a Ray instance started here), in order."""
    if not ray:
        from sim.sweep import _run

        return _run(fn, cases, workers, progress)
    import ray as ray_api

    started = not ray_api.is_initialized()
    if started:
        ray_api.init(
            address=None if ray == "local" else ray,
            include_dashboard=False,
            log_to_driver=False,
            num_cpus=workers if ray == "local" and workers else None,
        )
    try:
        task = ray_api.remote(fn)
        refs = [task.remote(c) for c in cases]
        pending, bar = list(refs), progress(iter(()), len(refs)) if progress else None
        while pending:
            done, pending = ray_api.wait(pending, num_returns=min(len(pending), 16))
            if bar is not None:
                bar.update(len(done))
        return ray_api.get(refs)
    finally:
        if started:
            ray_api.shutdown()


def advise(
    cfg: ModelConfig,
    wl: Workload,
    parts: dict,
    max_gpus: int = 8,
    budget: float | None = None,
    workers: int | None = None,
    ray: str | None = None,
    progress=None,
) -> dict:
    """Every box's figures, the Pareto front with each member's sensitivity range, and the
    boxes dropped with why."""
    candidates, dropped = boxes(parts, cfg, max_gpus, budget)
    if not candidates:
        raise ValueError(
            "no box in the catalog holds the model within the budget: "
            + "; ".join(f"{w}: {why}" for w, why in dropped[:5])
        )
    rows = run_all(evaluate, [(cfg, b, parts, wl, 1.0) for b in candidates], workers, ray, progress)
    front = pareto(rows)
    by_box = {r["box"]: r for r in front}
    corners = [
        (cfg, b, parts, wl, s)
        for b in candidates
        if b.name in by_box
        for s in (1 - SPREAD, 1 + SPREAD)
    ]
    for r in run_all(evaluate, corners, workers, ray):
        key = "low" if r["scale"] < 1 else "high"
        by_box[r["box"]][f"slo_attainment_{key}"] = r["slo_attainment"]
        by_box[r["box"]][f"goodput_req_s_{key}"] = r["goodput_req_s"]
    return {
        "workload": wl.name,
        "slo_ttft_s": wl.slo_ttft_s,
        "slo_tpot_s": wl.slo_tpot_s,
        "model_gb": costs.model_bytes(cfg) / 1e9,
        "evaluated": len(rows),
        "rows": rows,
        "front": front,
        "dropped": [{"what": w, "why": why} for w, why in dropped],
    }


def format_front(res: dict) -> str:
    lines = [
        f"{res['evaluated']} boxes simulated, workload {res['workload']} (SLOs: TTFT "
        f"{res['slo_ttft_s']:g} s, TPOT {res['slo_tpot_s'] * 1e3:.0f} ms); model "
        f"{res['model_gb']:.0f} GB; {len(res['dropped'])} dropped. Pareto front:",
        f"{'price':>9}  {'SLO attained':>20}  {'goodput req/s':>13}  {'p90 TTFT':>9}  "
        f"{'TPOT ms':>8}  box",
    ]
    for r in res["front"]:
        lo, hi = r.get("slo_attainment_low", math.nan), r.get("slo_attainment_high", math.nan)
        att = f"{r['slo_attainment']:.2f} [{min(lo, hi):.2f}-{max(lo, hi):.2f}]"
        lines.append(
            f"${r['price']:>8,.0f}  {att:>20}  {r['goodput_req_s']:>13.4f}  "
            f"{r['p90_ttft_s']:>8.1f}s  {r['mean_tpot_ms']:>8.1f}  {r['box']}"
        )
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    """SLO attainment against price, every box a point (coloured by its GPU), the front a
    line with each member's sensitivity range as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    key = lambda r: r["gpu"] or "no GPU"  # noqa: E731
    for gpu, group in itertools.groupby(sorted(res["rows"], key=key), key=key):
        g = list(group)
        ax.scatter([r["price"] for r in g], [r["slo_attainment"] for r in g], s=14, label=gpu)
    front = res["front"]
    xs = [r["price"] for r in front]
    ys = [r["slo_attainment"] for r in front]
    lo = [y - min(r.get("slo_attainment_low", y), y) for r, y in zip(front, ys)]
    hi = [max(r.get("slo_attainment_high", y), y) - y for r, y in zip(front, ys)]
    ax.errorbar(xs, ys, yerr=[lo, hi], color="black", lw=1.2, capsize=3, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("price (USD, the catalog's)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.set_title(f"workload {res['workload']}: {res['evaluated']} boxes")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
