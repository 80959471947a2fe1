"""refmoe against llama.cpp on the same model: decode (batch 1) and CPU prefill, alternating.

The model is refmoe's demo (DeepSeek-V3 layer shapes, FP8 blocks; built if missing), and for
llama.cpp the same weights converted by llama.cpp's own converter to GGUF Q8_0 (it dequantizes
the FP8 blocks, then quantizes; benchmarks/peer/to_gguf.py). Each round runs, back to back:

    refmoe: a prompt of --prompt tokens (prefill tok/s; where its GEMMs run on AMX tiles, the
            same prompt again on the float32 tiles), then --tokens decode steps (median step)
    llama.cpp: llama-bench -p PROMPT -n TOKENS on the GGUF (its pp and tg tok/s)
    the plain read of 512 MiB with the kernel threads (the bandwidth bound of this round)

and records the machine's busy CPU time beside the two engines' own (this process's and its
children's): a round where other processes took more than --max-others of a core is void and
run again (MEASURING.md). Each engine's decode is set against its own bound: bytes one token
reads (refmoe: demo.bytes_per_token; llama.cpp: the GGUF's tensors, experts at top-k over
their count, one row of the embedding) over the round's read.

Usage (a few minutes to build and convert once, then about a minute a round):
    bash benchmarks/peer/build_ggml.sh --tools
    python benchmarks/peer_decode.py [--layers 4 --experts 32] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from refmoe import cpu, demo, kernels, models
from refmoe.generate import generate

HERE = Path(__file__).resolve().parent


def busy_jiffies() -> int:
    """CPU time all processes spent on this machine (user + nice + system + irq + softirq +
    steal, in clock ticks), from /proc/stat."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f[:8])
    return user + nice + system + irq + softirq + steal


def own_cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime + c.ru_utime + c.ru_stime


def gguf_bytes_per_token(path: Path, llama_src: Path) -> tuple[int, int]:
    """(bytes one decoded token reads, file's tensor bytes) from a GGUF's tensor list: expert
    tensors (`*_exps`) at top-k of their experts, the token embedding's one row, the rest whole.
    Read with gguf-py from the llama.cpp sources."""
    sys.path.insert(0, str(llama_src / "gguf-py"))
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    fields = {f.name: f for f in r.fields.values()}

    def scalar(suffix: str) -> int:
        f = next(v for k, v in fields.items() if k.endswith(suffix))
        return int(f.parts[f.data[0]][0])

    n_exp, top_k = scalar(".expert_count"), scalar(".expert_used_count")
    total = per_token = 0
    for t in r.tensors:
        nb = int(t.n_bytes)
        total += nb
        if "_exps" in t.name:
            per_token += nb * top_k // n_exp
        elif t.name.startswith("token_embd"):
            per_token += nb // int(t.shape[-1])  # ggml shape: [n_embd, n_vocab]
        else:
            per_token += nb
    return per_token, total


def llama_bench(
    exe: Path, gguf: Path, prompt: int, tokens: int, threads: int, more: list[str]
) -> dict:
    cmd = [str(exe), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json", *more]
    runs = []
    if prompt:
        runs.append(("pp", ["-p", str(prompt), "-n", "0"]))
    runs.append(("tg", ["-p", "0", "-n", str(tokens)]))
    out = {}
    for key, extra in runs:
        res = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=1800)
        if res.returncode:
            raise RuntimeError(f"llama-bench failed: {res.stderr.strip()[-2000:]}")
        rows = json.loads(res.stdout)
        out[key] = float(rows[0]["avg_ts"])
    return out


def refmoe_round(model, cfg, prompt: int, tokens: int, rng) -> dict:
    out = {}
    if prompt:
        ids = rng.integers(2, cfg.vocab_size, prompt).tolist()
        g = generate(model, ids, 1)
        out["pp"] = prompt / g.ttft_s
        if kernels.amx_tiles():  # the same prompt on the float32 tiles too (pp_f32)
            before = kernels.set_amx_tiles(False)
            try:
                out["pp_f32"] = prompt / generate(model, ids, 1).ttft_s
            finally:
                kernels.set_amx_tiles(before)
    ids = rng.integers(2, cfg.vocab_size, 16).tolist()
    g = generate(model, ids, tokens)
    out["tg"] = 1.0 / statistics.median(g.step_s)
    return out


def ensure_model(args) -> tuple[Path, Path]:
    directory = args.model or demo.default_dir() / f"L{args.layers}-E{args.experts}"
    if not (directory / "config.json").exists():
        print(f"building the demo model in {directory}", file=sys.stderr)
        demo.build(directory, args.layers, args.experts)
    gguf = args.gguf or args.llama_cpp.parents[2] / f"demo-{directory.name}-q8_0.gguf"
    if not gguf.exists():
        src = args.llama_cpp
        print(f"converting to {gguf} with llama.cpp's converter", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                str(HERE / "peer" / "to_gguf.py"),
                str(src),
                str(directory),
                str(gguf),
            ],
            check=True,
        )
    return directory, gguf


def spread(v: list[float]) -> str:
    return f"{statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="refmoe demo model (default: build one)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--gguf", type=Path, help="the same model as GGUF (default: convert)")
    ap.add_argument(
        "--llama-bench", type=Path, default=Path("build/peer/llama-build/bin/llama-bench")
    )
    ap.add_argument(
        "--llama-cpp",
        type=Path,
        default=Path("build/peer/llama_cpp_python-0.3.36/vendor/llama.cpp"),
        help="llama.cpp sources (its converter and gguf-py)",
    )
    ap.add_argument("--threads", type=int, default=cpu.default_threads())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps a round")
    ap.add_argument("--prompt", type=int, default=512, help="prefill tokens a round (0: none)")
    ap.add_argument("--max-others", type=float, default=0.15, help="cores, before a round is void")
    ap.add_argument(
        "--llama-args",
        default="",
        help="more llama-bench arguments, e.g. '--repack 0' (on the Xeon VM, 2026-12-07, its "
        "repacked AMX / CPU buffers failed on this model: GGML_ASSERT(*cur_backend_id != -1))",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    more = args.llama_args.split()
    if not args.llama_bench.exists():
        sys.exit(f"{args.llama_bench}: not built (bash benchmarks/peer/build_ggml.sh --tools)")
    os.environ.setdefault("REFMOE_NUM_THREADS", str(args.threads))
    directory, gguf = ensure_model(args)
    cfg, model = models.load(directory)
    ours_bpt = demo.bytes_per_token(model)
    theirs_bpt, gguf_total = gguf_bytes_per_token(gguf, args.llama_cpp)
    rng = np.random.default_rng(0)
    generate(model, [2, 3, 4, 5], 2)  # warm-up: pages, pools
    llama_bench(args.llama_bench, gguf, 0, 4, args.threads, more)  # its pages into the cache
    rounds: list[dict[str, Any]] = []
    attempts = 0
    while len(rounds) < args.rounds and attempts < 3 * args.rounds:
        attempts += 1
        j0, c0, w0 = busy_jiffies(), own_cpu_s(), time.time()
        ours = refmoe_round(model, cfg, args.prompt, args.tokens, rng)
        theirs = llama_bench(args.llama_bench, gguf, args.prompt, args.tokens, args.threads, more)
        read = demo.read_gbps()
        wall = time.time() - w0
        others = ((busy_jiffies() - j0) / os.sysconf("SC_CLK_TCK") - (own_cpu_s() - c0)) / wall
        row = {
            "refmoe": ours,
            "llama_cpp": theirs,
            "read_gbps": read,
            "others_cores": others,
            "loadavg": os.getloadavg()[0],
        }
        void = others > args.max_others
        print(
            f"round {attempts}: refmoe tg {ours['tg']:.2f} pp {ours.get('pp', 0):.1f} | "
            f"llama.cpp tg {theirs['tg']:.2f} pp {theirs.get('pp', 0):.1f} | read {read:.1f} "
            f"GB/s | others {others:.2f} cores{' VOID' if void else ''}",
            file=sys.stderr,
        )
        if not void:
            rounds.append(row)
    if not rounds:
        sys.exit("every round was void: other processes kept the cores busy")

    def col(engine: str, key: str) -> list[float]:
        return [r[engine][key] for r in rounds]

    ratio_tg = [r["refmoe"]["tg"] / r["llama_cpp"]["tg"] for r in rounds]
    bound_ours = [r["read_gbps"] * 1e9 / ours_bpt for r in rounds]
    bound_theirs = [r["read_gbps"] * 1e9 / theirs_bpt for r in rounds]
    frac_ours = [r["refmoe"]["tg"] / b for r, b in zip(rounds, bound_ours)]
    frac_theirs = [r["llama_cpp"]["tg"] / b for r, b in zip(rounds, bound_theirs)]
    print(
        f"\n{cfg.num_hidden_layers} layers x {cfg.n_routed_experts} experts, {args.threads} "
        f"threads, {len(rounds)} clean rounds of {attempts}"
    )
    print(
        f"  bytes a token reads: refmoe (FP8) {ours_bpt / 1e9:.3f} GB, llama.cpp (Q8_0) "
        f"{theirs_bpt / 1e9:.3f} GB"
    )
    print(
        f"  decode tok/s  refmoe {spread(col('refmoe', 'tg'))}   llama.cpp "
        f"{spread(col('llama_cpp', 'tg'))}   refmoe/llama.cpp {spread(ratio_tg)}"
    )
    print(f"  of the read bound  refmoe {spread(frac_ours)}   llama.cpp {spread(frac_theirs)}")
    summary: dict[str, Any] = {
        "tg_ratio": statistics.median(ratio_tg),
        "refmoe_of_bound": statistics.median(frac_ours),
        "llama_cpp_of_bound": statistics.median(frac_theirs),
    }
    if args.prompt:
        ratio_pp = [r["refmoe"]["pp"] / r["llama_cpp"]["pp"] for r in rounds]
        print(
            f"  prefill {args.prompt} tok/s  refmoe {spread(col('refmoe', 'pp'))}   llama.cpp "
            f"{spread(col('llama_cpp', 'pp'))}   refmoe/llama.cpp {spread(ratio_pp)}"
        )
        summary["pp_ratio"] = statistics.median(ratio_pp)
        if all("pp_f32" in r["refmoe"] for r in rounds):  # AMX on: its float32-tile prefill
            ratio_f32 = [r["refmoe"]["pp_f32"] / r["llama_cpp"]["pp"] for r in rounds]
            amx_gain = [r["refmoe"]["pp"] / r["refmoe"]["pp_f32"] for r in rounds]
            print(
                f"  (AMX tiles; on the float32 tiles refmoe {spread(col('refmoe', 'pp_f32'))}, "
                f"refmoe/llama.cpp {spread(ratio_f32)}; AMX / float32 {spread(amx_gain)})"
            )
            summary["pp_f32_ratio"] = statistics.median(ratio_f32)
    if args.json:
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "model": str(directory),
            "gguf": str(gguf),
            "gguf_tensor_bytes": gguf_total,
            "refmoe_bytes_per_token": ours_bpt,
            "llama_cpp_bytes_per_token": theirs_bpt,
            "threads": args.threads,
            "tokens": args.tokens,
            "prompt": args.prompt,
            "attempts": attempts,
            "command": " ".join(sys.argv),
        }
        args.json.write_text(
            json.dumps({"meta": meta, "summary": summary, "rounds": rounds}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
