"""`refmoe ...`: the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from refmoe.serving_metrics import (
    add_agent_arguments,
    add_chunked_prefill_arguments,
    parse_range,
)

# numpy's OpenBLAS pool spins after every BLAS call; on a 2-core machine it steals a core from
# the kernels. Set before numpy loads (the user's own setting wins).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


EXPERT_DTYPES = ["fp8", "int4", "bf16", "mxfp4", "nvfp4", "int4g"]  # --expert-dtype: at load


def _id_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token ids, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return values


def _cmd_info(args: argparse.Namespace) -> int:
    from refmoe import __version__, cpu, kernels

    topo = cpu.Topology.read()
    info = {
        "version": __version__,
        "variant": kernels.variant(),
        "available_variants": kernels.available_variants(),
        "threads": cpu.default_threads(),
        "numa_nodes": [list(n) for n in topo.nodes],
        "flags": sorted(f for f in cpu.cpu_flags() if f.startswith(("avx", "fma", "f16c"))),
        "prefetch": {
            "hint": kernels.prefetch_hint(),
            "hint_4bit": kernels.prefetch_hint(four_bit=True),
            "bytes": kernels.prefetch_distance(),
        },
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:<20}{value}")
    return 0


def _cmd_bench_prefill(args: argparse.Namespace) -> int:

    from refmoe import bench_prefill, models
    from refmoe.trace import for_run

    try:
        directory = args.model or _demo_model(args)
        cfg, model = models.load(directory, device=args.device)
        lengths = args.prompt_tokens or [1024, 4096, 16384]
        trace = for_run(cfg, str(model.device), prefill="slp") if args.trace else None
        progress = None
        if not args.json and sys.stderr.isatty():
            from tqdm import tqdm

            progress = lambda it: tqdm(it, desc="bench prefill", unit="prompt")  # noqa: E731
        name = str(directory).rstrip("/").split("/")[-1]
        rows, rates = bench_prefill.bench_prefill(
            model,
            name,
            lengths,
            args.slp_device,
            args.ring,
            args.chunk_tokens,
            args.cpu,
            trace=trace,
            progress=progress,
        )
    except (ValueError, RuntimeError) as e:
        print(f"refmoe bench prefill: {e}", file=sys.stderr)
        return 2
    if trace:
        trace.metadata["engine"]["rates"] = rates.as_dict()
        trace.write(args.trace)
    if args.json:
        print(json.dumps(bench_prefill.rows_as_dicts(rows)))
    else:
        print(bench_prefill.format_rows(rows, rates, cfg))
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:

    from refmoe import bench_serve, models, routing
    from refmoe.trace import for_run

    try:
        directory = args.model or _demo_model(args)
        cfg, model = models.load(directory, device=args.device)
        if args.scenario == "interference":
            rows = [
                bench_serve.interference(
                    model,
                    prefill_tokens=args.prefill_tokens,
                    prefill=args.prefill,
                    engine_kwargs={
                        "chunked_prefill": args.chunked_prefill,
                        "decode_slowdown": args.decode_slowdown,
                        "chunk_stall": args.chunk_stall,
                    },
                )
            ]
        elif args.scenario == "dual-batch":
            rows = [bench_serve.dual_batch(model, dual=None)]
        elif args.scenario == "agent":
            return _bench_agents(args, cfg, model, directory)
        else:
            reqs = bench_serve.workload(
                args.num_prompts, args.request_rate, args.prompt_len, args.output_len, args.seed
            )
            trace = (
                for_run(
                    cfg,
                    str(model.device),
                    prefill=args.prefill,
                    workload={
                        "num_prompts": args.num_prompts,
                        "request_rate": args.request_rate,
                        "prompt_len": args.prompt_len,
                        "output_len": args.output_len,
                        "seed": args.seed,
                    },
                )
                if args.trace
                else None
            )
            routing.reset(model)
            outcomes, duration = bench_serve.run_poisson(
                model,
                str(directory),
                reqs,
                trace,
                args.seed,
                {"prefill": args.prefill, "max_batch": args.max_batch},
            )
            result = bench_serve.summary(outcomes, duration)
            if args.csv:
                bench_serve.write_csv(args.csv, outcomes)
            if trace:
                trace.metadata["result"] = result
                trace.metadata["routing"] = routing.record(model)  # for the simulator
                trace.write(args.trace)
            if args.json:
                print(
                    json.dumps({"op": "serve", **result, "requests": bench_serve.as_rows(outcomes)})
                )
            else:
                print(bench_serve.format_summary(result))
                for o in outcomes:
                    if not o.ok:
                        print(f"failed: {o.error}", file=sys.stderr)
            return 0 if result["failed"] == 0 else 1
    except (ValueError, RuntimeError) as e:
        print(f"refmoe bench serve: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(rows)
        if args.json
        else "\n".join(
            ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())
            for r in rows
        )
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from refmoe import bench, contention, cpu, kernels

    if args.what == "serve":
        return _cmd_bench_serve(args)

    if args.what == "prefill":
        return _cmd_bench_prefill(args)

    if args.what == "decode":
        from refmoe import demo

        directory = _demo_model(args)
        rows: list[dict[str, Any]] = []
        if args.contexts:
            rows = demo.decode_at_contexts(directory, args.contexts, steps=args.reps)
            if args.json:
                print(json.dumps(rows))
            for row in [] if args.json else rows:
                print(
                    f"decode {row['model']} at {row['context']} cached tokens "
                    f"({row['attention']}): {row['step_ms']:.1f} ms a step "
                    f"[{row['step_ms_min']:.1f}-{row['step_ms_max']:.1f}], "
                    f"{row['over_first']:.2f}x the step at {args.contexts[0]}; "
                    f"the cache holds {row['cache_bytes'] / 2**20:.1f} MiB"
                )
            return 0
        for _ in range(min(args.reps, 3)):
            # redone (a bounded number of times) while other processes or guests took CPU or
            # the ratio came out impossible; kept and flagged if it stays so (contention.py)
            r, others, why, attempts = contention.measured(
                lambda: demo.run(directory, 16, 16, device=args.device), lambda r: r.ratio
            )
            rows.append(
                {
                    "op": "decode",
                    "model": f"demo-{args.family or 'deepseek_v3'}-L{r.layers}-E{r.experts}",
                    "threads": kernels._threads(None),
                    "variant": kernels.variant(),
                    "device": r.device,
                    "tok_s": r.tok_s,
                    "limit_tok_s": r.bound_tok_s,
                    "ratio": r.ratio,
                    "bytes_per_token": r.bytes_per_token,
                    "cpu_bytes_per_token": r.cpu_bytes_per_token,
                    "limit_gbps": r.read_gbps,
                    "limit_gbps_before": r.read_before_gbps,
                    "limit_gbps_after": r.read_after_gbps,
                    "ttft_s": r.ttft_s,
                    "others_cores": others,
                    "suspect": why,
                    "attempts": attempts,
                }
            )
        if args.json:
            print(json.dumps(rows))
        else:
            for row in rows:
                line = (
                    f"decode {row['model']} ({row['device']}): {row['tok_s']:.2f} tok/s, "
                    f"bound {row['limit_tok_s']:.2f} tok/s "
                    f"({row['cpu_bytes_per_token'] / 1e6:.0f} MB/token on the CPU "
                    f"at {row['limit_gbps']:.1f} GB/s read: {row['limit_gbps_before']:.1f} "
                    f"before, {row['limit_gbps_after']:.1f} after), ratio {row['ratio']:.2f}"
                )
                print(contention.flagged(line, row["suspect"]))
        return 0

    threads = args.threads or sorted({1, cpu.default_threads()})
    variants = args.variants.split(",") if args.variants else [kernels.variant()]
    for v in variants:
        if v not in kernels.available_variants():
            print(
                f"refmoe bench: variant {v!r} is not available here "
                f"(available: {', '.join(kernels.available_variants())})",
                file=sys.stderr,
            )
            return 2
    progress = None
    if not args.json and sys.stderr.isatty():
        from tqdm import tqdm

        progress = lambda jobs: tqdm(jobs, desc="bench kernels", unit="case")  # noqa: E731
    kernel_rows = bench.bench_kernels(
        threads,
        variants,
        reps=args.reps,
        quick=args.quick,
        with_torch=not args.no_torch,
        progress=progress,
        dtypes=args.dtypes.split(",") if args.dtypes else None,
    )
    if args.json:
        print(json.dumps(bench.rows_as_dicts(kernel_rows)))
    else:
        print(bench.format_rows(kernel_rows))
        print(
            "\nratio = kernel GB/s over a plain read of the same bytes with the same threads, "
            "measured alternately in this run (median, [min-max] over reps);\nfma% = GFLOP/s "
            "over the FMA peak of those threads, also measured now; torch_x = torch "
            "(FP8 -> bf16, matmul) time over ours."
        )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from refmoe import models
    from refmoe.generate import generate
    from refmoe.sampling import SamplingParams
    from refmoe.tokenizer import Tokenizer

    try:
        if args.stop and not all(args.stop):
            raise ValueError("--stop needs a non-empty string")
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        tok = Tokenizer.from_dir(args.model)
        if args.prompt_ids is not None:
            prompt = args.prompt_ids
        elif tok is None:
            raise ValueError(
                f"{args.model}: no tokenizer.json (or tiktoken.model); pass --prompt-ids"
            )
        elif args.chat:  # the template writes the special tokens itself
            turn = [{"role": "user", "content": args.prompt}]
            extra = _template_kwargs(args.chat_template_kwargs)
            prompt = tok.encode(tok.apply_chat_template(turn, True, None, extra), False)
        else:
            prompt = tok.encode(args.prompt)
        show = (
            (lambda it: tqdm(it, desc="loading layers", unit="layer"))
            if sys.stderr.isatty() and not args.json
            else None
        )
        cfg, model = models.load(args.model, args.expert_dtype, progress=show, device=args.device)
        trace = None
        if args.trace:
            from refmoe.trace import for_run

            trace = for_run(cfg, str(model.device), expert_dtype=args.expert_dtype or "as stored")
        from refmoe import dslp, slp
        from refmoe.policy import EngineConfig, Policy
        from refmoe.scheduler import Entry

        if args.ranks < 1:
            raise ValueError(f"--ranks must be >= 1, got {args.ranks}")
        # the one policy seam: the same plan the engine would make for this request alone
        config = EngineConfig(  # one request: no decode to protect, no chunked prefill
            prefill=args.prefill,
            ranks=args.ranks,
            chunk_tokens=args.chunk_tokens,
            chunked_prefill="off",
        )
        rates = slp.model_rates(model) if args.prefill == "auto" and slp.streamable(model) else None
        policy = Policy.build(
            config,
            cfg,
            rates,
            accelerated=model.device.type != "cpu",
            can_stream=slp.streamable(model),
        )
        sched = policy.scheduler()
        sched.add(Entry("generate", len(prompt), args.max_tokens, 0.0))
        plan = sched.next_prefill()
        assert plan is not None  # one request, an empty budget: it is planned at once
        group = None
        runner: slp.StreamPrefill | dslp.Group | None = None
        if plan.where == "slp" and plan.devices > 1:  # DSLP: this process is rank 0
            runner = group = dslp.Group.start(
                model, args.model, args.ranks, ring=args.ring, chunk_tokens=policy.chunk_tokens
            )
        elif plan.where == "slp":
            runner = slp.StreamPrefill(model, ring=args.ring, chunk_tokens=policy.chunk_tokens)
        try:
            g = generate(
                model,
                prompt,
                args.max_tokens,
                params,
                stop_ids=cfg.eos_token_id,
                trace=trace,
                stop_text=args.stop,
                tokenizer=tok,
                prefill=runner,
            )
        finally:
            if group is not None:
                group.close()
        if trace:
            trace.write(args.trace)
    except ValueError as e:
        print(f"refmoe generate: {e}", file=sys.stderr)
        return 2
    text = tok.decode(g.token_ids) if tok is not None else ""
    for s in args.stop or []:  # the stop string itself is not part of the answer
        text = text.split(s)[0] if s in text else text
    result = {
        "token_ids": g.token_ids,
        "text": text,
        "ttft_s": g.ttft_s,
        "decode_tok_s": g.decode_tok_s,
        "prompt_tokens": g.prompt_tokens,
        "finish_reason": g.finish_reason,
        "prefill": ("dslp" if group else "slp") if runner else "cpu",
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(text if tok is not None else " ".join(map(str, g.token_ids)))
        print(
            f"\n[{g.prompt_tokens} prompt tokens, TTFT {g.ttft_s:.3f} s, "
            f"{len(g.token_ids)} generated, {g.decode_tok_s:.2f} tok/s decode]",
            file=sys.stderr,
        )
    return 0


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from refmoe import models, perplexity
    from refmoe.tokenizer import Tokenizer

    show = (lambda it: tqdm(it, desc="windows", unit="window")) if sys.stderr.isatty() else None
    try:
        if args.token_ids is not None:
            ids = args.token_ids
        else:
            tok = Tokenizer.from_dir(args.model)
            if tok is None:
                raise ValueError(f"{args.model}: no tokenizer.json (or tiktoken.model)")
            try:
                text = Path(args.file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{args.file}: cannot be read as UTF-8 text ({e})") from None
            ids = tok.encode(text)
        if args.max_tokens is not None:
            ids = ids[: args.max_tokens]
        _, model = models.load(args.model, args.expert_dtype, device=args.device)
        reference = None
        if args.reference is not None:
            _, reference = models.load(
                args.reference, args.reference_expert_dtype, device=args.device
            )
        runners: list = [None, None]  # each model's own path
        if args.prefill == "slp":
            from refmoe import slp

            runners = [slp.StreamPrefill(m) if m is not None else None for m in (model, reference)]
        s = perplexity.score(model, ids, args.context, args.stride, reference, show, *runners)
    except ValueError as e:
        print(f"refmoe perplexity: {e}", file=sys.stderr)
        return 2
    result = {**s.as_dict(), "context": args.context, "stride": args.stride or args.context}
    if args.json:
        print(json.dumps(result))
    else:
        line = f"perplexity {s.ppl:.4f} over {s.tokens} tokens ({s.windows} windows"
        line += f", {s.tokens / s.seconds:.1f} tok/s)" if s.seconds > 0 else ")"
        if reference is not None:
            line += (
                f"; against the reference: mean KL {result['mean_kld']:.6f}, "
                f"top-1 agreement {result['top1_agreement']:.4f}"
            )
        print(line)
    return 0


def add_family_argument(parser: argparse.ArgumentParser, pre: str) -> None:
    from refmoe.demo import FAMILIES

    parser.add_argument(
        "--family",
        choices=FAMILIES,
        help=f"{pre}the demo model's family and layer shapes: deepseek_v3 (default), "
        "deepseek_v32 (with DeepSeek-V3.2's DSA indexer: 64 heads of 128, top 2,048), "
        "glm4_moe (GLM-4.5-Air's layer), minimax_m2, gpt_oss (gpt-oss-120b's, MXFP4 experts), "
        "qwen3_moe (Qwen3-235B-A22B's), "
        "qwen3_next (Qwen3-Next-80B-A3B's: three Gated DeltaNet layers to one of full attention), "
        "qwen3_5_moe (Qwen3.5-397B-A17B's, as its FP8 release stores them), "
        "deepseek_v4 (DeepSeek-V4-Flash's: CSA / HCA compressed attention, 4 residual streams, "
        "FP4 experts)",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where attention and dense layers run (routed experts: the CPU)",
    )


def _template_kwargs(text: str | None) -> dict | None:
    """--chat-template-kwargs: a JSON object, or a ValueError naming the option."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat-template-kwargs: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError("--chat-template-kwargs: must be a JSON object")
    return value


def _demo_model(args: argparse.Namespace):
    from pathlib import Path

    from tqdm import tqdm

    from refmoe import demo

    layers, experts = demo.size_for_memory(demo.available_memory())
    layers, experts = args.layers or layers, args.experts or experts
    family = getattr(args, "family", None) or "deepseek_v3"
    fmt = getattr(args, "expert_format", None) or (
        "mxfp4" if family in ("gpt_oss", "deepseek_v4") else "fp8"
    )
    name = f"L{layers}-E{experts}" + ("" if fmt == "fp8" else f"-{fmt}")
    name += "" if family == "deepseek_v3" else f"-{family}"
    directory = Path(args.dir) if args.dir else demo.default_dir() / name
    show = (
        (lambda it: tqdm(it, desc="building demo model", unit="shard"))
        if sys.stderr.isatty()
        else None
    )
    return demo.build(directory, layers, experts, progress=show, expert_format=fmt, family=family)


def _cmd_demo(args: argparse.Namespace) -> int:
    from refmoe import demo, kernels

    directory = _demo_model(args)
    trace = None
    if args.trace:
        from refmoe.config import ModelConfig
        from refmoe.trace import for_run

        trace = for_run(
            ModelConfig.from_file(directory), "cpu", expert_dtype=args.expert_format or "fp8"
        )
    show = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        show = lambda it: tqdm(it, desc="loading layers", unit="layer")  # noqa: E731
    r = demo.run(directory, args.prompt_tokens, args.max_tokens, trace=trace, progress=show)
    if trace:
        trace.metadata["result"] = {
            "ttft_s": r.ttft_s,
            "decode_tok_s": r.tok_s,
            "bytes_per_token": r.bytes_per_token,
            "read_gbps": r.read_gbps,
            "bound_tok_s": r.bound_tok_s,
        }
        trace.write(args.trace)
    from refmoe.config import ModelConfig

    shapes = demo.describe(ModelConfig.from_file(directory))
    print(f"refmoe demo: {shapes}, {r.layers} layers, in {directory}")
    print(f"  CPU variant {kernels.variant()}, {kernels._threads(None)} threads")
    print(f"  prompt {r.prompt_tokens} tokens: TTFT {r.ttft_s:.3f} s")
    print(
        f"  decode: {r.tok_s:.2f} tok/s (median step), {r.bytes_per_token / 1e6:.0f} MB of "
        f"weights read per token"
    )
    print(
        f"  bound: {r.read_gbps:.1f} GB/s read (measured now) / {r.bytes_per_token / 1e6:.0f} "
        f"MB = {r.bound_tok_s:.2f} tok/s; achieved {r.ratio:.2f} of it"
    )
    if not args.no_sim:
        from refmoe.config import ModelConfig
        from sim.calibrate import calibrate
        from sim.predict import predict

        print(
            "  calibrating the simulator on this machine (about a minute; --no-predict skips "
            "it) ...",
            flush=True,
        )
        hw = calibrate("this machine, calibrated now", reps=3)
        p = predict(ModelConfig.from_file(directory), hw, r.prompt_tokens, r.new_tokens)
        print(
            f"  refmoe-sim, calibrated from micro-benchmarks just now: TTFT {p.ttft_s:.3f} s "
            f"({(p.ttft_s - r.ttft_s) / r.ttft_s:+.0%}), decode {p.decode_tok_s:.2f} tok/s "
            f"({(p.decode_tok_s - r.tok_s) / r.tok_s:+.0%})"
        )
    print(
        f"\nChat with it (the weights are random, so the text is gibberish; the speed is what "
        f"the demo shows):\n"
        f"  refmoe serve --model {directory}\n"
        f"  curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' "
        f"""-d '{{"messages": [{{"role": "user", "content": "hello"}}], "max_tokens": 16}}'"""
    )
    return 0


def _bench_agents(args: argparse.Namespace, cfg, model, directory) -> int:
    """`refmoe bench serve --scenario agent`: conversations through the real server."""
    from refmoe import bench_serve, routing
    from refmoe.serving_metrics import (
        agent_shape,
        agent_summary,
        agent_workload_of,
        format_agent_summary,
    )
    from refmoe.trace import for_run

    shape = agent_shape(args)
    convos = agent_workload_of(shape)
    shape["scenario"] = "agent"
    trace = for_run(cfg, str(model.device), prefill=args.prefill, workload=shape)
    routing.reset(model)
    engine_kwargs = {
        "prefill": args.prefill,
        "max_batch": args.max_batch,
        "chunked_prefill": args.chunked_prefill,
        "decode_slowdown": args.decode_slowdown,
        "chunk_stall": args.chunk_stall,
        "prefix_cache_gib": args.prefix_cache_gib,
    }
    records, duration = bench_serve.run_agents(
        model, str(directory), convos, trace, args.seed, engine_kwargs
    )
    result = agent_summary(records, duration)
    turns = [
        {
            "conversation": r.conversation,
            "turn": r.turn,
            "prompt_tokens": r.outcome.prompt_tokens,
            "cached_tokens": r.cached_tokens,
            "output_tokens": r.outcome.output_tokens,
            "sent_s": r.sent_s,
            "ttft_s": r.outcome.ttft_s,
            "e2e_s": r.outcome.e2e_s,
            "error": r.outcome.error,
        }
        for r in records
    ]
    if args.trace:
        trace.metadata["result"] = result
        trace.metadata["turns"] = turns
        trace.metadata["routing"] = routing.record(model)
        trace.write(args.trace)
    if args.json:
        print(json.dumps({"op": "serve_agent", **result, "turns": turns}))
    else:
        print(format_agent_summary(result))
        for r in records:
            if not r.outcome.ok:
                print(f"failed: {r.outcome.error}", file=sys.stderr)
    return 0 if result["failed"] == 0 else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    from refmoe.server import serve

    if args.kv_tokens is not None and args.kv_memory is not None:
        print("refmoe serve: give --kv-tokens or --kv-memory, not both", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("REFMOE_API_KEY")
    dual_batch = {"auto": None, "on": True, "off": False}[args.dual_batch]
    return serve(
        args.model,
        args.host,
        args.port,
        served_name=args.served_model_name,
        api_key=api_key,
        device=args.device,
        drain_s=args.drain_s,
        max_body_mb=args.max_body_mb,
        keep_alive_on_load_error=args.keep_alive_on_load_error,
        engine_kwargs={
            "kv_tokens": args.kv_tokens,
            "max_batch": args.max_batch,
            "kv_memory": args.kv_memory * 2**30 if args.kv_memory else None,
            "max_queue": args.max_queue,
            "prefill": args.prefill,
            "ranks": args.ranks,
            "dual_batch": dual_batch,
            "prefix_cache_gib": args.prefix_cache_gib,
            "chunked_prefill": args.chunked_prefill,
            "decode_slowdown": args.decode_slowdown,
            "chunk_stall": args.chunk_stall,
        },
    )


def _cmd_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from refmoe.convert import convert

    show = (lambda it: tqdm(it, desc="converting", unit="shard")) if sys.stderr.isatty() else None
    try:
        out = convert(
            args.model,
            args.out,
            progress=show,
            expert_format=args.expert_format,
            fp8_scales=args.fp8_scales,
        )
    except ValueError as e:
        print(f"refmoe convert: {e}", file=sys.stderr)
        return 2
    what = "an FP8" if args.expert_format == "fp8" else f"a {args.expert_format.upper()}-expert"
    print(f"wrote {what} checkpoint to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refmoe", description=__doc__)
    p.add_argument(
        "--cpu-threads",
        type=int,
        metavar="N",
        help="threads for the CPU kernels (default: all usable cores; the same as "
        "REFMOE_NUM_THREADS)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of an error (default: one line)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="CPU variant, threads and NUMA nodes refmoe will use")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)

    g = sub.add_parser("generate", help="continue a prompt with a Hugging Face model directory")
    g.add_argument("--model", required=True, help="directory with config.json and safetensors")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json or tiktoken.model)")
    src.add_argument("--prompt-ids", type=_id_list, help="prompt token ids, e.g. 1,2,3")
    g.add_argument(
        "--chat",
        action="store_true",
        help="wrap --prompt as a user message in the model's chat template",
    )
    g.add_argument(
        "--chat-template-kwargs",
        metavar="JSON",
        help="with --chat: the template's variables, e.g. '{\"thinking\": true}' (DeepSeek) or "
        "'{\"enable_thinking\": false}' (Qwen3)",
    )
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="stop once the output contains TEXT (repeatable; needs a tokenizer)",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--expert-dtype",
        choices=EXPERT_DTYPES,
        help="routed expert format (default: as stored; BF16/F32 -> bf16); another one is "
        "converted at load",
    )
    add_device_argument(g)
    g.add_argument(
        "--prefill",
        choices=["auto", "cpu", "slp"],
        default="auto",
        help="routed experts of the prompt on the CPU kernels, or streamed to the "
        "device (SLP); auto: the cost model decides from rates it measures",
    )
    g.add_argument(
        "--ring",
        type=int,
        metavar="SLOTS",
        help="SLP ring slots (default: sized to free device memory)",
    )
    g.add_argument("--chunk-tokens", type=int, metavar="N", help="SLP chunk length")
    g.add_argument(
        "--ranks",
        type=int,
        default=1,
        metavar="N",
        help="DSLP: split the prompt's prefill over N ranks (processes; one GPU "
        "each with CUDA), each streaming 1/N of the experts",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--trace", metavar="FILE", help="write a Chrome trace (opens in Perfetto)")
    g.set_defaults(func=_cmd_generate)

    pp = sub.add_parser(
        "perplexity",
        help="perplexity of a model over a text, and its divergence from a reference build",
    )
    pp.add_argument("--model", required=True, help="directory with config.json and safetensors")
    text = pp.add_mutually_exclusive_group(required=True)
    text.add_argument("--file", help="a UTF-8 text, tokenized by the model's tokenizer")
    text.add_argument("--token-ids", type=_id_list, help="the tokens themselves, e.g. 1,2,3")
    pp.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    pp.add_argument(
        "--stride",
        type=int,
        help="tokens between window starts (default: the context, windows back to back)",
    )
    pp.add_argument("--max-tokens", type=int, help="score only the text's first N tokens")
    pp.add_argument(
        "--expert-dtype",
        choices=EXPERT_DTYPES,
        help="routed expert format (default: as stored; another one is converted at load)",
    )
    pp.add_argument(
        "--reference",
        metavar="DIR",
        help="a model to compare against over the same windows: mean KL(reference || model) "
        "and top-1 agreement (the same DIR with another --expert-dtype checks a conversion)",
    )
    pp.add_argument(
        "--reference-expert-dtype",
        choices=EXPERT_DTYPES,
        help="the reference's routed expert format (default: as stored)",
    )
    add_device_argument(pp)
    pp.add_argument(
        "--prefill",
        choices=["cpu", "slp"],
        default="cpu",
        help="each window's path: routed experts on the CPU kernels, or streamed to the "
        "device (SLP: what makes a big model's windows affordable on a GPU box)",
    )
    pp.add_argument("--json", action="store_true", help="print one JSON object")
    pp.set_defaults(func=_cmd_perplexity)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a model directory")
    sv.add_argument("--model", required=True, help="directory with config.json and safetensors")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require Authorization: Bearer KEY (or REFMOE_API_KEY)")
    sv.add_argument(
        "--served-model-name", help="the model's name in the API (default: the directory's name)"
    )
    sv.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    sv.add_argument("--prefill", choices=["auto", "cpu", "slp"], default="auto")
    sv.add_argument("--kv-tokens", type=int, help="KV budget in tokens (default: 4 contexts)")
    sv.add_argument(
        "--kv-memory",
        type=float,
        metavar="GIB",
        help="KV budget as memory: as "
        "many tokens as fit in GIB GiB (the model's cache bytes per token)",
    )
    sv.add_argument("--max-batch", type=int, default=16, help="requests per decode step")
    sv.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    sv.add_argument(
        "--dual-batch",
        choices=["auto", "on", "off"],
        default="auto",
        help="dual-batch overlap (auto: on when attention runs on a GPU)",
    )
    sv.add_argument(
        "--prefix-cache-gib",
        type=float,
        metavar="GIB",
        help="host memory for the prefix cache (default: a tenth of the memory free at start; "
        "0: off)",
    )
    add_chunked_prefill_arguments(sv)
    sv.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="SLP devices (ranks); long prompts use all of them (DSLP) only when "
        "nothing decoded for 5 minutes, else one stays with decode",
    )
    sv.add_argument(
        "--drain-s",
        type=float,
        default=10.0,
        help="on shutdown, seconds running requests get to finish",
    )
    sv.add_argument(
        "--max-body-mb",
        type=float,
        metavar="MB",
        help="largest request body (default: 16 bytes per token of context, at "
        "least 1 MiB); larger ones get 413 before they are read",
    )
    sv.add_argument(
        "--keep-alive-on-load-error",
        action="store_true",
        help="when the model fails to load, keep serving /health 503 instead of exiting non-zero",
    )
    sv.set_defaults(func=_cmd_serve)

    cv = sub.add_parser(
        "convert", help="write a BF16/F32 checkpoint in the FP8 block format or a 4-bit one"
    )
    cv.add_argument("--model", required=True, help="source model directory")
    cv.add_argument("--out", required=True, help="directory for the converted checkpoint")
    cv.add_argument(
        "--expert-format",
        choices=["fp8", "mxfp4", "nvfp4", "int4g"],
        default="fp8",
        help="fp8: every projection in 128x128 FP8 blocks; mxfp4, nvfp4, int4g: the routed "
        "experts as gpt-oss, NVIDIA ModelOpt and compressed-tensors (Kimi K2-Thinking) store them",
    )
    cv.add_argument(
        "--fp8-scales",
        default="128x128",
        metavar="LAYOUT",
        help="FP8: the block one scale covers, RxC (DeepSeek's weight_scale_inv, default "
        "128x128), or as compressed-tensors writes them: channel, tensor, ct-RxC",
    )
    cv.set_defaults(func=_cmd_convert)

    dm = sub.add_parser("demo", help="build (once) and run a DeepSeek-V3-shaped FP8 model")
    dm.add_argument("--layers", type=int, help="layers (default: sized to memory)")
    dm.add_argument(
        "--experts", type=int, help="routed experts per layer (a multiple of 8, at least 16)"
    )
    dm.add_argument("--dir", help="where the model is built (default: ~/.cache/refmoe/demo)")
    dm.add_argument(
        "--expert-format",
        choices=["fp8", "mxfp4", "nvfp4", "int4g"],
        help="routed experts' format: fp8 (default), or as the 4-bit releases store them",
    )
    add_family_argument(dm, "")
    dm.add_argument("--prompt-tokens", type=int, default=16)
    dm.add_argument("--max-tokens", type=int, default=16)
    dm.add_argument("--trace", metavar="FILE", help="write the measured request's Chrome trace")
    dm.add_argument(
        "--no-predict",
        "--no-sim",
        dest="no_sim",
        action="store_true",
        help="skip the simulator's calibration and prediction (about a minute)",
    )
    dm.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="benchmarks that report ratios to same-run limits")
    b.add_argument(
        "what", choices=["kernels", "decode", "prefill", "serve"], help="what to benchmark"
    )
    b.add_argument("--layers", type=int, help="decode, prefill: demo model layers")
    b.add_argument(
        "--experts",
        type=int,
        help="decode, prefill: demo model experts per layer (a multiple of 8, at least 16)",
    )
    b.add_argument("--dir", help="decode, prefill: demo model directory")
    add_family_argument(b, "decode: ")
    b.add_argument(
        "--contexts",
        type=lambda v: [int(x) for x in v.split(",")],
        help="decode: cached tokens to decode after, e.g. 2048,32768 (the caches filled with "
        "synthetic entries: a step's cost, not its tokens, is measured); with --family "
        "deepseek_v32 also dense MLA at each, for comparison",
    )
    b.add_argument("--model", help="prefill, serve: a model directory instead of the demo model")
    b.add_argument(
        "--scenario",
        choices=["poisson", "interference", "dual-batch", "agent"],
        default="poisson",
        help="serve: what to measure",
    )
    add_agent_arguments(b, "serve agent: ")
    add_chunked_prefill_arguments(b)
    b.add_argument(
        "--prefix-cache-gib",
        type=float,
        help="serve agent: the prefix cache's memory (default: a tenth of free memory; 0: off)",
    )
    b.add_argument("--num-prompts", type=int, default=16, help="serve: requests")
    b.add_argument(
        "--request-rate",
        type=float,
        default=1.0,
        help="serve: Poisson arrivals per second (inf: all at once)",
    )
    b.add_argument("--prompt-len", type=parse_range, default=(16, 64), help="serve: N or LO-HI")
    b.add_argument("--output-len", type=parse_range, default=(8, 32), help="serve: N or LO-HI")
    b.add_argument(
        "--prefill-tokens",
        type=int,
        default=512,
        help="serve interference: the long prompt's length",
    )
    b.add_argument(
        "--prefill", choices=["auto", "cpu", "slp"], default="auto", help="serve: the prefill path"
    )
    b.add_argument("--max-batch", type=int, default=16, help="serve: requests per decode step")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--csv", help="serve: write arrived_at,num_prefill_tokens,num_decode_tokens")
    b.add_argument(
        "--prompt-tokens", type=_int_list, help="prefill: prompt lengths, e.g. 1024,4096,16384"
    )
    b.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="prefill: where attention and dense layers run",
    )
    b.add_argument("--slp-device", help="prefill: where SLP computes experts (default: --device)")
    b.add_argument("--ring", type=int, help="prefill: ring slots (default: sized to memory)")
    b.add_argument("--chunk-tokens", type=int, help="prefill: SLP chunk length")
    b.add_argument("--cpu", action="store_true", help="prefill: time the CPU-expert path too")
    b.add_argument(
        "--trace",
        metavar="FILE",
        help="prefill: Chrome trace of the longest prompt; serve: the engine's trace of the run",
    )
    b.add_argument("--json", action="store_true", help="print a JSON list of rows")
    b.add_argument(
        "--threads",
        type=_int_list,
        help="thread counts, e.g. 1,2 (default: 1 and all usable cores)",
    )
    b.add_argument("--variants", help="comma-separated CPU variants (default: the chosen one)")
    b.add_argument("--reps", type=int, default=5, help="timed repetitions per row")
    b.add_argument(
        "--dtypes", help="kernels: only these formats, e.g. mxfp4,nvfp4,int4g (default: all)"
    )
    b.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    b.add_argument("--no-torch", action="store_true", help="skip the torch baseline")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line, before or after the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    if args.cpu_threads is not None:
        if args.cpu_threads < 1:
            print("refmoe: --cpu-threads must be >= 1", file=sys.stderr)
            return 2
        os.environ["REFMOE_NUM_THREADS"] = str(args.cpu_threads)
    if getattr(args, "reps", 1) < 1:
        print("refmoe: --reps must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line naming what failed; --debug for more
        if debug:
            raise
        kind = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "
        print(f"refmoe {args.command}: {kind}{e} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
