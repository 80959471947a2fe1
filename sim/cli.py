"""`refmoe-sim predict | serve | sweep | calibrate | validate | reproduce-paper`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from sim import catalog

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _cmd_predict(args) -> int:
    from sim.hardware import Hardware
    from sim.predict import predict

    cfg, hw = catalog.load(args.model), Hardware.load(args.hardware)
    catalog.check_context(cfg, args.prompt_tokens, args.output_tokens, args.model)
    routing = _routing(args, cfg)

    def run(profile):
        return predict(
            cfg,
            profile,
            args.prompt_tokens,
            args.output_tokens,
            args.prefill,
            args.devices,
            routing_skew=args.routing_skew,
            routing=routing,
        )

    p = run(hw)
    band = {}
    if args.interval:
        from sim.interval import bootstrap

        band = bootstrap(
            lambda h: {"ttft_s": run(h).ttft_s, "tpot_s": run(h).tpot_s}, hw, args.interval
        )
    if args.json:
        print(json.dumps({**p.as_dict(), **{f"{k}_interval_90": v for k, v in band.items()}}))
    else:
        path = f"SLP on {p.devices} GPU(s)" if p.prefill == "slp" else "CPU experts"
        iv = {k: f" [90%: {lo * 1e3:.1f}-{hi * 1e3:.1f}]" for k, (lo, hi) in band.items()}
        print(
            f"TTFT {p.ttft_s * 1e3:.1f} ms{iv.get('ttft_s', '')} "
            f"({p.prompt_tokens / p.ttft_s:.0f} prefill tok/s, "
            f"{path}), TPOT {p.tpot_s * 1e3:.1f} ms{iv.get('tpot_s', '')} "
            f"({p.decode_tok_s:.2f} tok/s), {p.bytes_per_token / 1e9:.2f} GB per token"
        )
        if p.device_matmuls:
            print(f"device matmuls: {p.device_matmuls}")
    return 0


def _routing(args, cfg):
    """--routing FILE: routing recorded by the engine, per layer (sim.predict.load_routing)."""
    if not args.routing:
        return None
    from sim.predict import load_routing

    return load_routing(args.routing, cfg)


def _cmd_serve(args) -> int:
    from refmoe.serving_metrics import format_summary, summary, workload
    from sim.hardware import Hardware
    from sim.serve import simulate

    if args.scenario == "agent":
        return _serve_agents(args)
    if args.csv:
        try:
            lines = open(args.csv).read().splitlines()
            if not lines or lines[0].strip() != "arrived_at,num_prefill_tokens,num_decode_tokens":
                raise ValueError(
                    "the header must be arrived_at,num_prefill_tokens,num_decode_tokens"
                )
            reqs = [
                (float(a), int(p), int(o))
                for a, p, o in (ln.split(",") for ln in lines[1:] if ln.strip())
            ]
        except (OSError, ValueError) as e:
            raise ValueError(f"{args.csv}: {e}") from None
    else:
        reqs = workload(
            args.num_prompts, args.request_rate, args.prompt_len, args.output_len, args.seed
        )
    hw, cfg = Hardware.load(args.hardware), catalog.load(args.model)
    routing = _routing(args, cfg)
    out = simulate(
        cfg,
        hw,
        reqs,
        args.max_batch,
        prefill=args.prefill,
        trace=bool(args.trace),
        utilization=bool(args.utilization),
        dual_batch=args.dual_batch,
        trace_layers=args.trace_layers,
        routing_skew=args.routing_skew,
        routing=routing,
        chunked_prefill=args.chunked_prefill,
        decode_slowdown=args.decode_slowdown,
        chunk_stall=args.chunk_stall,
    )
    outcomes, duration = out[0], out[1]
    if args.utilization:
        from sim.serve import plot_utilization

        plot_utilization(
            out[-1],
            args.utilization,
            f"{hw.name}: link utilization, {len(reqs)} requests, prefill {args.prefill}",
        )
    from sim.sweep import slo

    def figures(outcomes, duration) -> dict:
        """The benchmark block's figures, and with SLOs given their attainment and goodput."""
        r = summary(outcomes, duration)
        if args.slo_ttft is not None or args.slo_tpot is not None:
            r.update(
                slo(
                    outcomes,
                    duration,
                    args.slo_ttft if args.slo_ttft is not None else float("inf"),
                    args.slo_tpot if args.slo_tpot is not None else float("inf"),
                )
            )
        return r

    result = figures(outcomes, duration)
    band = {}
    if args.interval:
        from sim.interval import bootstrap

        def rerun(profile):
            r = figures(
                *simulate(
                    cfg,
                    profile,
                    reqs,
                    args.max_batch,
                    prefill=args.prefill,
                    dual_batch=args.dual_batch,
                    routing_skew=args.routing_skew,
                    routing=routing,
                )[:2]
            )
            return {
                k: r[k] for k in (*INTERVAL_FIGURES, "slo_attainment", "goodput_req_s") if k in r
            }

        band = bootstrap(rerun, hw, args.interval)
        result["interval_90"] = {k: list(v) for k, v in band.items()}
    if args.trace:
        out[2].metadata["result"] = result
        out[2].write(args.trace)
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_summary(result))
    if "slo_attainment" in result:
        within = ", ".join(
            f"{name} <= {value:g} s"
            for name, value in (("TTFT", args.slo_ttft), ("TPOT", args.slo_tpot))
            if value is not None
        )
        print(f"{'SLO attainment:':<40}{result['slo_attainment']:.2f} ({within})")
        print(f"{'Request goodput (req/s):':<40}{result['goodput_req_s']:.3f}")
    if band:
        print(
            f"90% intervals ({args.interval} bootstrap replicates"
            + (f", drift between {len(hw.runs)} calibrations" if len(hw.runs) > 1 else "")
            + "):"
        )
        for k, (lo, hi) in band.items():
            print(f"  {k:<28}{lo:>10.2f} - {hi:.2f}")
    return 0


# the serving figures `refmoe-sim serve --interval` gives intervals for
INTERVAL_FIGURES = (
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "output_throughput",
    "request_throughput",
)


def _serve_agents(args) -> int:
    """`refmoe-sim serve --scenario agent`: the agent benchmark's workload, predicted; with
    --capacity, how many such agents the box holds within --slo-ttft and --min-tok-s."""
    from dataclasses import asdict

    from refmoe.serving_metrics import (
        agent_shape,
        agent_summary,
        agent_workload_of,
        format_agent_summary,
    )
    from sim.agents import capacity
    from sim.hardware import Hardware
    from sim.serve import Simulation

    hw, cfg = Hardware.load(args.hardware), catalog.load(args.model)
    kw = dict(
        max_batch=args.max_batch,
        prefill=args.prefill,
        dual_batch=args.dual_batch,
        chunked_prefill=args.chunked_prefill,
        decode_slowdown=args.decode_slowdown,
        chunk_stall=args.chunk_stall,
        prefix_cache_gib=args.prefix_cache_gib,
    )
    if args.capacity:
        ttft = args.slo_ttft if args.slo_ttft is not None else 10.0
        n, verdicts = capacity(
            cfg,
            hw,
            ttft,
            args.min_tok_s,
            args.turns,
            args.context,
            args.new_tokens,
            args.output_len,
            args.think_s,
            most=args.capacity,
            seed=args.seed,
            **kw,
        )
        if args.json:
            print(json.dumps({"agents": n, "tried": [asdict(v) for v in verdicts]}))
        else:
            for v in verdicts:
                print(
                    f"{v.conversations:>4} agents: p90 TTFT {v.p90_ttft_s:8.2f} s, slowest "
                    f"10% decode {v.decode_tok_s:7.2f} tok/s  {'ok' if v.ok else 'no'}"
                )
            print(
                f"{hw.name} holds {n} concurrent agents within a p90 TTFT of {ttft:g} s and "
                f"{args.min_tok_s:g} tok/s each ({args.context}-token contexts, "
                f"{args.turns} turns)"
            )
        return 0
    convos = agent_workload_of(agent_shape(args))
    run = Simulation(cfg, hw, [], conversations=convos, trace=bool(args.trace), **kw).run()
    result = agent_summary(run.records, run.duration_s)
    if args.trace and run.trace is not None:
        run.trace.write(args.trace)
    print(
        json.dumps({"op": "serve_agent", **result}) if args.json else format_agent_summary(result)
    )
    return 0


def _cmd_sweep(args) -> int:
    from sim import sweep

    cfg = catalog.load(args.model)
    hardware = args.hardware.split(",")
    policies = args.prefill.split(",")
    bad = [p for p in policies if p not in ("cpu", "slp", "auto")]
    if bad:
        raise ValueError(f"--prefill: unknown policy {bad[0]!r} (cpu, slp, auto)")
    progress = None
    if sys.stderr.isatty() and not args.json:
        from tqdm import tqdm

        progress = lambda it, n: tqdm(it, total=n, desc="sweep", unit="case")  # noqa: E731
    if args.request_rates:
        rows = sweep.sweep_rates(
            cfg,
            hardware,
            policies,
            args.request_rates,
            args.num_prompts,
            args.prompt_len,
            args.output_len,
            args.slo_ttft,
            args.slo_tpot,
            args.seed,
            args.workers,
            progress,
        )
    else:
        rows = sweep.sweep_lengths(
            cfg, hardware, policies, args.prompt_tokens, args.output_tokens, args.workers, progress
        )
    if args.plot:
        sweep.plot(rows, args.plot)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(
                ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                )
            )
    return 0


def _peer_params(items: list[str]) -> dict:
    """ENGINE:FIELD=VALUE items -> {engine: {field: value}} (numbers and true/false)."""
    out: dict = {}
    for item in items:
        try:
            engine, rest = item.split(":", 1)
            key, value = rest.split("=", 1)
        except ValueError:
            raise ValueError(
                f"--peer {item!r}: expected ENGINE:FIELD=VALUE, "
                "e.g. ktransformers:offload_above=8192"
            ) from None
        v: object
        if value.lower() in ("true", "false"):
            v = value.lower() == "true"
        else:
            try:
                v = int(value)
            except ValueError:
                try:
                    v = float(value)
                except ValueError:
                    raise ValueError(f"--peer {item!r}: {value!r} is not a number") from None
        out.setdefault(engine, {})[key] = v
    return out


def _cmd_compare(args) -> int:
    from sim import compare, peers, workloads
    from sim.hardware import Hardware

    cfg = catalog.load(args.model)
    hw = Hardware.load(args.hardware)
    wl = workloads.get(args.workload).scaled(args.num_prompts, args.request_rate)
    engines = tuple(args.engines.split(","))
    overrides = _peer_params(args.peer or [])
    for name, params in overrides.items():
        peers.peer(name, params)  # names a bad engine or field before anything runs
    progress = None
    if sys.stderr.isatty() and not args.json:
        from tqdm import tqdm

        bar = tqdm(total=len(engines), desc="compare", unit="engine")
        progress = lambda name: bar.update(1)  # noqa: E731
    res = compare.compare(
        cfg,
        hw,
        wl,
        engines,
        tuple(args.prompt_tokens),
        args.interference_tokens,
        overrides,
        progress,
    )
    res["model"] = args.model
    if args.plot:
        compare.plot(res, args.plot)
    if args.json:
        print(json.dumps(res))
    else:
        print(compare.format_table(res))
        print(
            f"\nworkload {wl.name}: {wl.what}; SLOs: TTFT {wl.slo_ttft_s:g} s, TPOT "
            f"{wl.slo_tpot_s * 1e3:.0f} ms"
        )
        for name in engines:
            if name in peers.PEERS:
                print(f"{name}: {peers.PEERS[name].source}")
    return 0


def _cmd_advise(args) -> int:
    from sim import advise, workloads

    cfg = catalog.load(args.model)
    wl = workloads.get(args.workload).scaled(args.num_prompts, args.request_rate)
    if args.slo_ttft is not None or args.slo_tpot is not None:
        from dataclasses import replace

        wl = replace(
            wl,
            slo_ttft_s=wl.slo_ttft_s if args.slo_ttft is None else args.slo_ttft,
            slo_tpot_s=wl.slo_tpot_s if args.slo_tpot is None else args.slo_tpot,
        )
    parts = advise.load_parts(args.parts)
    progress = None
    if sys.stderr.isatty() and not args.json:
        from tqdm import tqdm

        progress = lambda it, n: tqdm(it, total=n, desc="advise", unit="box")  # noqa: E731
    res = advise.advise(
        cfg, wl, parts, args.max_gpus, args.budget, args.workers, args.ray, progress
    )
    res["model"] = args.model
    if args.plot:
        advise.plot(res, args.plot)
    if args.json:
        print(json.dumps(res))
    else:
        print(advise.format_front(res))
        print(
            "\nattainment [range]: the same box with every rate 15% lower and higher "
            "(spec-sheet efficiencies are guesses); prices are the catalog's"
        )
    return 0


def _cmd_reproduce(args) -> int:
    from sim.hardware import Hardware
    from sim.paper import format_rows, reproduce

    rows = reproduce(Hardware.load(args.hardware))
    print(json.dumps(rows) if args.json else format_rows(rows))
    return 0


def _cmd_calibrate(args) -> int:
    from sim.calibrate import calibrate
    from sim.hardware import Hardware
    from sim.interval import pool

    if args.merge:
        hw = pool([Hardware.load(p) for p in args.merge], args.name)
    else:
        if args.runs < 1 or args.gap < 0:
            raise ValueError("calibrate: --runs must be >= 1 and --gap >= 0")
        from refmoe import contention

        runs, suspects = [], []
        for i in range(args.runs):
            if i and args.gap:
                print(f"calibrate: run {i + 1} of {args.runs} in {args.gap:g} s", file=sys.stderr)
                time.sleep(args.gap)
            # a calibration taken while other processes held the cores is redone (bounded),
            # and one that stays contaminated is never kept silently
            hw_i, others, why, attempts = contention.measured(
                lambda: calibrate(args.name), lambda h: h.cpu.fp8_gemv_efficiency
            )
            if why:
                suspects.append(f"run {i + 1}: {why} (after {attempts} attempts)")
                print(f"calibrate: SUSPECT run {i + 1}: {why}", file=sys.stderr)
            runs.append(hw_i)
        hw = pool(runs, args.name) if len(runs) > 1 else runs[0]
    if args.out:
        hw.save(args.out)
        if not args.merge and suspects:
            from pathlib import Path

            out = Path(args.out)
            out.write_text(
                "".join(f"# SUSPECT calibration {s}\n" for s in suspects) + out.read_text()
            )
    from dataclasses import asdict

    if args.json:
        doc = asdict(hw)
        if not args.merge:
            doc["suspect"] = suspects
        print(json.dumps(doc))
        return 0
    c = hw.cpu
    print(
        f"calibrated {hw.name}: {c.threads} threads, plain read "
        f"{c.dram_gbps_per_socket * c.sockets:.1f} GB/s, FP8 GEMV "
        f"{c.fp8_gemv_gbps_per_core:.1f} GB/s per core x {c.fp8_gemv_efficiency:.2f}, "
        f"fixed per-layer cost {c.layer_overhead_us / 1e3:.2f} ms; "
        f"{sum(len(v) for v in hw.samples.values())} samples of {len(hw.samples)} fields"
        + (f", {len(hw.runs)} calibrations pooled" if hw.runs else "")
        + (f" -> {args.out}" if args.out else " (not saved: --out FILE)")
    )
    return 0


def _cmd_validate(args) -> int:
    from pathlib import Path

    from sim.hardware import Hardware
    from sim.interval import drift_pairs, pool
    from sim.validate import plot, summarize, validate

    if args.live:
        return _live(args)
    if not args.traces:
        raise ValueError("validate: give TRACE.json files, or --live")
    if not args.hardware and not args.beside:
        raise ValueError("validate: give --hardware PROFILE or --beside")

    def calibrations(trace: str) -> list[Hardware]:
        """The calibrations taken beside a trace X.json: X-before.yaml and X-after.yaml."""
        base = Path(trace).with_suffix("")
        found = [p for p in (Path(f"{base}-before.yaml"), Path(f"{base}-after.yaml")) if p.exists()]
        if not found:
            raise ValueError(f"{trace}: no {base.name}-before.yaml or -after.yaml beside it")
        return [Hardware.load(p) for p in found]

    # the drift the intervals allow for: how far this machine moved between the two
    # calibrations around each trace given (with --beside), and between the runs pooled into
    # the profiles named by --drift (calibrations only, never a trace's own measurements)
    beside = {t: calibrations(t) for t in args.traces} if args.beside else {}
    drift = [(each[0], each[-1]) for each in beside.values() if len(each) > 1]
    drift += drift_pairs([Hardware.load(p) for p in args.drift or []])
    if args.lanes:
        return _lanes(args)
    results = []
    for t in args.traces:
        hw = (
            pool(beside[t], f"{Path(t).stem} calibrations, pooled")
            if args.beside
            else Hardware.load(args.hardware)
        )
        results.append(validate(t, hw, args.interval, drift=drift or None))
    table = summarize(results)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        print(json.dumps({"traces": results, "summary": table}))
        return 0
    for r in results:
        if r.get("warning"):
            print(f"{r['trace']}: warning: {r['warning']}", file=sys.stderr)
        for metric, m in r["metrics"].items():
            unit, f = _unit(metric)
            band = ""
            if "interval" in m:
                lo, hi = m["interval"]
                band = (
                    f" [90%: {lo * f:.1f}-{hi * f:.1f}, measured "
                    f"{'inside' if m['inside'] else 'outside'}]"
                )
            d = 1 if unit else 3  # decimals: a rate without a unit (a hit rate) gets more
            print(
                f"{r['trace']}: {metric} predicted {m['predicted'] * f:.{d}f} {unit}{band}, "
                f"measured {m['measured'] * f:.{d}f} {unit}, error {100 * m['error']:+.1f}%"
            )
    print(f"{'metric':<14} {'traces':>6} {'MAPE':>7} {'bias':>7} {'abs error':>12}")
    for metric, t in table.items():
        unit, f = _unit(metric)
        inside = (
            f"  {t['inside_interval']}/{t['n']} inside the interval"
            if "inside_interval" in t
            else ""
        )
        print(
            f"{metric:<14} {t['n']:>6} {100 * t['mape']:>6.1f}% {100 * t['bias']:>+6.1f}% "
            f"{t['mae'] * f:>8.1f} {unit}{inside}"
        )
    return 0


def _live(args) -> int:
    """validate --live: calibrations and held-out segments in turn (sim/live.py)."""
    from pathlib import Path

    from sim import live

    if args.traces:
        raise ValueError("validate --live measures its own segments: give no traces")
    if args.segments < 1 or args.reps < 1:
        raise ValueError("validate --live: --segments and --reps must be >= 1")
    show = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        show = lambda it: tqdm(it, desc="calibrate + segment", unit="segment")  # noqa: E731
    out = Path(args.out or "live-validation")
    results = live.run(
        out,
        args.segments,
        args.reps,
        args.interval or 20,
        quick=args.quick,
        models=Path(args.models) if args.models else None,
        progress=show,
    )
    if args.plot:
        from sim.validate import plot

        plot(results["segments"], args.plot)
    if args.json:
        print(json.dumps(results))
    else:
        print(live.format_results(results))
        print(f"calibrations, traces and live.json under {out}/")
    return 0


def _lanes(args) -> int:
    """validate --lanes OUT.json: one single-request trace's measured and simulated per-layer
    lanes, side by side in one Perfetto file, and where the time goes per lane."""
    from pathlib import Path

    from sim.hardware import Hardware
    from sim.lanes import compare, format_rows
    from sim.validate import load_trace

    if len(args.traces) != 1 or not args.hardware:
        raise ValueError("validate --lanes: give one trace and --hardware PROFILE")
    doc = load_trace(args.traces[0])
    if len(doc["metadata"]["requests"]) != 1:
        raise ValueError(f"{args.traces[0]}: --lanes takes a single request's trace")
    rows, merged = compare(doc, Hardware.load(args.hardware))
    Path(args.lanes).write_text(json.dumps(merged))
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_rows(rows))
        print(f"measured and simulated lanes side by side -> {args.lanes} (opens in Perfetto)")
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _gpu_spec(text: str) -> tuple[str, float, int, float]:
    try:
        name, hbm, gen, bf16 = text.split(",")
        return name, float(hbm), int(gen), float(bf16)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME,HBM_GBPS,PCIE_GEN,BF16_TFLOPS (e.g. RTX5090,1792,5,209), got {text!r}"
        ) from None


def _unit(metric: str) -> tuple[str, float]:
    """How a validated metric prints: times in ms, rates in tok/s, the rest as they are."""
    if metric.endswith("tok_s"):
        return "tok/s", 1.0
    if metric.endswith("_s"):
        return "ms", 1e3
    return "", 1.0


def _cmd_profile_new(args) -> int:
    from sim.hardware import from_spec_sheet

    hw = from_spec_sheet(
        args.name,
        args.sockets,
        args.cores_per_socket,
        args.channels,
        args.mts,
        args.fma_gflops_per_core,
        args.interconnect_gbps,
        args.gpu or [],
    )
    hw.save(args.out)
    c = hw.cpu
    print(
        f"wrote {args.out}: {c.sockets} x {c.cores_per_socket} cores, "
        f"{c.dram_gbps_per_socket * c.sockets:.0f} GB/s DRAM peak, {len(hw.gpus)} GPU(s); "
        f"try: refmoe-sim predict --model deepseek-v3 --hardware {args.out} "
        "--prompt-tokens 8192 --output-tokens 64"
    )
    return 0


def _cmd_models(args) -> int:
    rows = []
    for name in catalog.names():
        cfg = catalog.load(name)
        rows.append(
            {
                "name": name,
                "source": catalog.source(name),
                "layers": cfg.num_hidden_layers,
                "hidden": cfg.hidden_size,
                "experts": cfg.n_routed_experts,
                "top_k": cfg.num_experts_per_tok,
                "shared": cfg.n_shared_experts,
                "context": cfg.max_position_embeddings,
                "fp8": cfg.is_fp8,
            }
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'name':<18}{'layers':>7}{'hidden':>7}{'experts':>8}{'top-k':>6}{'context':>9}  source")
    for r in rows:
        print(
            f"{r['name']:<18}{r['layers']:>7}{r['hidden']:>7}{r['experts']:>8}{r['top_k']:>6}"
            f"{r['context']:>9}  {r['source']}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="refmoe-sim", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="TTFT and TPOT of one request")
    pr.add_argument(
        "--model",
        required=True,
        help="config.json, a model directory, or a name from `refmoe-sim models`",
    )
    pr.add_argument("--hardware", required=True, help="profile YAML or a name in sim/profiles")
    pr.add_argument("--prompt-tokens", type=int, default=1024)
    pr.add_argument("--output-tokens", type=int, default=128)
    pr.add_argument(
        "--prefill",
        choices=["cpu", "slp", "auto"],
        default="auto",
        help="prefill path (auto: the engine's cost model picks)",
    )
    pr.add_argument("--devices", type=int, help="GPUs for SLP (default: all in the profile)")
    pr.add_argument(
        "--interval",
        type=int,
        default=0,
        metavar="N",
        help="a 90%% interval from N bootstrap replicates of the profile's "
        "calibration samples (and its drift, when it pools several)",
    )
    pr.add_argument(
        "--routing-skew",
        type=float,
        default=0.0,
        metavar="S",
        help="expert popularity: 0 uniform, else Zipf exponent S",
    )
    pr.add_argument(
        "--routing",
        metavar="FILE",
        help="replay routing recorded by the engine: "
        "a routing JSON (refmoe.routing) or a trace from `refmoe bench serve "
        "--trace`",
    )
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=_cmd_predict)
    from refmoe.serving_metrics import add_agent_arguments, add_chunked_prefill_arguments
    from refmoe.serving_metrics import parse_range as _range

    se = sub.add_parser(
        "serve",
        help="many requests through the engine's scheduler: the "
        "serving benchmark's summary, predicted",
    )
    se.add_argument(
        "--model",
        required=True,
        help="config.json, a model directory, or a name from `refmoe-sim models`",
    )
    se.add_argument("--hardware", required=True)
    se.add_argument(
        "--csv",
        help="a request CSV: arrived_at,num_prefill_tokens,"
        "num_decode_tokens (else a Poisson workload)",
    )
    se.add_argument(
        "--scenario",
        choices=["poisson", "agent"],
        default="poisson",
        help="poisson: open-loop requests (or --csv); agent: multi-turn conversations",
    )
    add_agent_arguments(se, "agent: ")
    add_chunked_prefill_arguments(se)
    se.add_argument(
        "--prefix-cache-gib", type=float, default=16.0, help="agent: the prefix cache's memory"
    )
    se.add_argument(
        "--capacity",
        type=int,
        metavar="MOST",
        help="agent: find the most concurrent agents (up to MOST) within --slo-ttft "
        "(default 10 s, p90) and --min-tok-s each (slowest 10%%)",
    )
    se.add_argument(
        "--min-tok-s", type=float, default=15.0, help="agent --capacity: decode speed per user"
    )
    se.add_argument("--num-prompts", type=int, default=100)
    se.add_argument("--request-rate", type=float, default=1.0)
    se.add_argument("--prompt-len", type=_range, default=(16, 64))
    se.add_argument("--output-len", type=_range, default=(8, 32))
    se.add_argument("--max-batch", type=int, default=16)
    se.add_argument("--prefill", choices=["cpu", "slp", "auto"], default="cpu")
    se.add_argument(
        "--dual-batch",
        choices=["auto", "on", "off"],
        default="auto",
        help="dual-batch overlap of decode micro-batches (auto: with a GPU)",
    )
    se.add_argument("--seed", type=int, default=0)
    se.add_argument(
        "--trace",
        help="write the simulated run as a Chrome trace (the engine's lanes and request records)",
    )
    se.add_argument(
        "--trace-layers",
        action="store_true",
        help="with --trace: per-layer attention and expert spans too, as the engine writes them",
    )
    se.add_argument(
        "--utilization",
        metavar="PNG",
        help="plot every link's load over time (each decode step simulated on its own)",
    )
    se.add_argument(
        "--routing-skew",
        type=float,
        default=0.0,
        metavar="S",
        help="expert popularity: 0 uniform, else Zipf exponent S",
    )
    se.add_argument(
        "--routing",
        metavar="FILE",
        help="replay routing recorded by the engine: "
        "a routing JSON (refmoe.routing) or a trace from `refmoe bench serve "
        "--trace`",
    )
    se.add_argument(
        "--slo-ttft",
        type=float,
        metavar="S",
        help="a TTFT SLO in seconds: "
        "print the share of requests that meet the SLOs given, and the goodput",
    )
    se.add_argument("--slo-tpot", type=float, metavar="S", help="a TPOT SLO in seconds")
    se.add_argument(
        "--interval",
        type=int,
        default=0,
        metavar="N",
        help="90%% intervals of the latency and throughput figures from N "
        "bootstrap replicates of the profile's calibration (and its drift, when "
        "it pools several)",
    )
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=_cmd_serve)
    sw = sub.add_parser("sweep", help="many configurations in parallel processes, with plots")
    sw.add_argument(
        "--model",
        required=True,
        help="config.json, a model directory, or a name from `refmoe-sim models`",
    )
    sw.add_argument("--hardware", required=True, help="profiles, comma-separated")
    sw.add_argument("--prefill", default="cpu,slp", help="policies: cpu,slp,auto")
    sw.add_argument("--prompt-tokens", type=_ints, default=[256, 1024, 4096, 16384, 32768])
    sw.add_argument("--output-tokens", type=int, default=8)
    sw.add_argument("--request-rates", type=_floats, help="sweep rates instead (serving)")
    sw.add_argument("--num-prompts", type=int, default=100)
    sw.add_argument("--prompt-len", type=_range, default=(256, 2048))
    sw.add_argument("--output-len", type=_range, default=(32, 256))
    sw.add_argument("--slo-ttft", type=float, default=10.0, help="seconds")
    sw.add_argument("--slo-tpot", type=float, default=0.1, help="seconds")
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--workers", type=int, help="processes (default: one per CPU)")
    sw.add_argument("--plot", help="write a PNG")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(func=_cmd_sweep)
    cp = sub.add_parser(
        "compare",
        help="refmoe's policies beside llama.cpp's and KTransformers' on one box (sim/peers.py)",
    )
    cp.add_argument(
        "--model",
        required=True,
        help="config.json, a model directory, or a name from `refmoe-sim models`",
    )
    cp.add_argument("--hardware", required=True, help="profile YAML or a name in sim/profiles")
    cp.add_argument(
        "--workload", default="mixed", help="chat, long-prompt, mixed or agent (sim/workloads.py)"
    )
    cp.add_argument("--engines", default="refmoe,llama.cpp,ktransformers")
    cp.add_argument("--prompt-tokens", type=_ints, default=[1024, 4096, 16384, 32768])
    cp.add_argument(
        "--interference-tokens",
        type=int,
        default=16384,
        help="the long prompt that prefills beside a decoding request",
    )
    cp.add_argument(
        "--num-prompts", type=int, help="the workload's requests (agents: conversations)"
    )
    cp.add_argument("--request-rate", type=float, help="the workload's arrival rate (req/s)")
    cp.add_argument(
        "--peer",
        action="append",
        metavar="ENGINE:FIELD=VALUE",
        help="a peer's parameter (sim/peers.py Peer), e.g. llama.cpp:forward_tokens=4096",
    )
    cp.add_argument("--plot", help="write a PNG")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=_cmd_compare)
    ad = sub.add_parser(
        "advise",
        help="which box to buy: every box a parts catalog makes, simulated, its Pareto front",
    )
    ad.add_argument(
        "--model",
        required=True,
        help="config.json, a model directory, or a name from `refmoe-sim models`",
    )
    ad.add_argument(
        "--workload", default="chat", help="chat, long-prompt, mixed or agent (sim/workloads.py)"
    )
    ad.add_argument("--slo-ttft", type=float, help="seconds (default: the workload's)")
    ad.add_argument("--slo-tpot", type=float, help="seconds (default: the workload's)")
    ad.add_argument("--budget", type=float, help="USD: boxes above it are dropped")
    ad.add_argument(
        "--parts", help="a parts catalog YAML with your prices (default: sim/parts.yaml)"
    )
    ad.add_argument("--max-gpus", type=int, default=8)
    ad.add_argument(
        "--num-prompts", type=int, help="the workload's requests (agents: conversations)"
    )
    ad.add_argument("--request-rate", type=float, help="the workload's arrival rate (req/s)")
    ad.add_argument("--workers", type=int, help="processes (default: one per CPU; 1: none)")
    ad.add_argument(
        "--ray", metavar="ADDRESS", help="run the boxes as Ray tasks there (local: start one here)"
    )
    ad.add_argument("--plot", help="write a PNG")
    ad.add_argument("--json", action="store_true")
    ad.set_defaults(func=_cmd_advise)
    rp = sub.add_parser(
        "reproduce-paper",
        help="the paper's headline numbers, predicted from "
        "its machine's spec sheet, beside the paper's",
    )
    rp.add_argument("--hardware", default="paper-2x9355-2x5090")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=_cmd_reproduce)
    pf = sub.add_parser("profile", help="hardware profiles: `profile new` from a spec sheet")
    pf_sub = pf.add_subparsers(dest="profile_command", required=True)
    pn = pf_sub.add_parser("new", help="write a profile from spec-sheet numbers")
    pn.add_argument("--name", required=True)
    pn.add_argument("--out", required=True, help="the YAML file to write")
    pn.add_argument("--sockets", type=int, required=True)
    pn.add_argument("--cores-per-socket", type=int, required=True)
    pn.add_argument("--channels", type=int, required=True, help="DRAM channels per socket")
    pn.add_argument("--mts", type=float, required=True, help="DRAM MT/s (e.g. 6400)")
    pn.add_argument(
        "--fma-gflops-per-core", type=float, default=100.0, help="one core's FMA peak (default 100)"
    )
    pn.add_argument(
        "--interconnect-gbps",
        type=float,
        default=0.0,
        help="socket link GB/s, both directions (required with 2+ sockets)",
    )
    pn.add_argument(
        "--gpu",
        type=_gpu_spec,
        action="append",
        help="NAME,HBM_GBPS,PCIE_GEN,BF16_TFLOPS; repeat per GPU",
    )
    pn.set_defaults(func=_cmd_profile_new)
    mo = sub.add_parser("models", help="the published model configs usable by name")
    mo.add_argument("--json", action="store_true")
    mo.set_defaults(func=_cmd_models)
    ca = sub.add_parser("calibrate", help="this machine's profile from micro-benchmarks")
    ca.add_argument("--name", default="this-machine")
    ca.add_argument("--out", help="write the profile YAML here")
    ca.add_argument(
        "--runs",
        type=int,
        default=1,
        help="calibrate N times and pool the "
        "samples; each run's medians are kept, and intervals allow for the drift "
        "between consecutive runs",
    )
    ca.add_argument(
        "--gap",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds to wait "
        "between runs (space them as far apart as the runs you will predict last)",
    )
    ca.add_argument(
        "--merge",
        nargs="+",
        metavar="PROFILE",
        help="pool these calibrated profiles instead of measuring",
    )
    ca.add_argument("--json", action="store_true")
    ca.set_defaults(func=_cmd_calibrate)
    va = sub.add_parser("validate", help="compare predictions with measured traces")
    va.add_argument("traces", nargs="*")
    va.add_argument(
        "--live",
        action="store_true",
        help="measure instead: short calibrations and held-out workloads (other hidden "
        "sizes, expert counts, top-k, formats, threads, contexts) in turn, each predicted "
        "from the calibration just before it; prints the distribution of the errors",
    )
    va.add_argument("--segments", type=int, default=6, help="--live: workloads to measure")
    va.add_argument("--reps", type=int, default=3, help="--live: reps of each calibration")
    va.add_argument("--out", help="--live: where segments are kept (default live-validation/)")
    va.add_argument("--models", help="--live: where the held-out models are built")
    va.add_argument(
        "--quick", action="store_true", help="--live: tiny models, quick calibrations (smoke)"
    )
    va.add_argument("--hardware", help="the profile to replay every trace on")
    va.add_argument(
        "--beside",
        action="store_true",
        help="replay each trace X.json on its own "
        "calibrations X-before.yaml and X-after.yaml, pooled; intervals then allow "
        "for the drift between the two calibrations around every trace given",
    )
    va.add_argument(
        "--drift",
        nargs="+",
        metavar="PROFILE",
        help="profiles pooled from "
        "several calibrations (calibrate --runs/--merge): intervals allow for the "
        "drift between their consecutive runs",
    )
    va.add_argument(
        "--interval",
        type=int,
        default=0,
        metavar="N",
        help="90%% intervals from N bootstrap replicates of the calibration samples",
    )
    va.add_argument("--plot", help="write predicted-versus-measured as a PNG")
    va.add_argument(
        "--lanes",
        metavar="OUT.json",
        help="one single-request trace: its measured and simulated per-layer lanes side by "
        "side in one Perfetto file, and the time per phase and lane, measured and simulated",
    )
    va.add_argument("--json", action="store_true")
    va.set_defaults(func=_cmd_validate)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"refmoe-sim: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
