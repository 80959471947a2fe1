"""A/B of DeepSeek-V4's lightning indexer on the CPU: the scores through one kernel pass over
the keys (kernels.indexer_scores, what the model runs) against the torch form transformers
runs (Indexer.reference: relu(q @ keys.T), weighted, summed over heads), alternating in one
process. Usage:

    python benchmarks/v4_indexer_ab.py DEMO_DIR [CONTEXT ...]

DEMO_DIR: a V4 demo (refmoe demo --family deepseek_v4 --layers 4 --experts 32 --dir DIR).
Prints, as JSON lines: the scores alone for one query of V4-Flash's indexer (64 heads of 128)
against E = CONTEXT / 4 entries, medians of 15 calls per round [the rounds' medians]; those of
a prompt's last 512 queries (contexts up to 32K: the torch form's intermediate is 64 x 512 x E
floats); then the
demo's decode step at each context with either (three rounds, 7 steps each); the load average
and this process's CPU time over wall time around them (2 threads: up to 2.0).
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from refmoe import demo
from refmoe.models import deepseek_v4

KERNEL, REFERENCE = deepseek_v4.Indexer.scores, deepseek_v4.Indexer.reference


def use(name: str) -> None:
    deepseek_v4.Indexer.scores = KERNEL if name == "kernel" else REFERENCE


def alternate(queries: int, contexts: list[int], calls: int, seed: int) -> list[dict]:
    """V4-Flash's indexer (64 heads of 128): the scores of `queries` queries at the last
    positions of each context against its c // 4 entries (each query against the entries
    closed before it), the kernel and the torch form in turn, 3 rounds of `calls` calls each
    (medians)."""
    ix = object.__new__(deepseek_v4.Indexer)
    ix.n, ix.d = 64, 128
    g = torch.Generator().manual_seed(seed)
    q, w = torch.randn(64, queries, 128, generator=g), torch.randn(queries, 64, generator=g)
    rows = []
    for c in contexts:
        keys = torch.randn(c // 4, 128, generator=g)
        closed = (torch.arange(c - queries, c) + 1) // 4
        got: dict[str, list[float]] = {"kernel": [], "reference": []}
        for _ in range(3):
            for name in got:
                use(name)
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    ix.scores(q, w, keys, closed)
                    times.append(time.perf_counter() - t0)
                got[name].append(1e3 * statistics.median(times))
        use("kernel")
        k, r = statistics.median(got["kernel"]), statistics.median(got["reference"])
        rows.append(
            {
                "op": "indexer_scores" if queries == 1 else "indexer_scores_prompt_chunk",
                "queries": queries,
                "entries": c // 4,
                "kernel_ms": k,
                "reference_ms": r,
                "rounds": got,
                "reference_over_kernel": r / k,
            }
        )
    return rows


def main() -> None:
    directory = Path(sys.argv[1])
    contexts = [int(c) for c in sys.argv[2:]] or [8192, 32768, 131072]
    load0, cpu0, wall0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    chunked = [c for c in contexts if c <= 32768]  # the torch form: 64 x 512 x E floats
    for row in alternate(1, contexts, 15, seed=0) + alternate(512, chunked, 3, seed=1):
        print(json.dumps(row))
    got: dict[str, list[list[float]]] = {"kernel": [], "reference": []}
    for _ in range(3):
        for name in got:
            use(name)
            rows = demo.decode_at_contexts(directory, contexts, steps=7)
            got[name].append([r["step_ms"] for r in rows])
    use("kernel")
    for i, c in enumerate(contexts):
        k = statistics.median(r[i] for r in got["kernel"])
        r = statistics.median(r[i] for r in got["reference"])
        print(
            json.dumps(
                {
                    "op": "decode_step",
                    "context": c,
                    "kernel_ms": k,
                    "reference_ms": r,
                    "rounds": {n: [v[i] for v in got[n]] for n in got},
                    "reference_over_kernel": r / k,
                }
            )
        )
    wall = time.perf_counter() - wall0
    print(
        json.dumps(
            {
                "load_before": load0,
                "load_after": os.getloadavg()[0],
                "cpu_over_wall": (time.process_time() - cpu0) / wall,
                "wall_s": wall,
            }
        )
    )


if __name__ == "__main__":
    main()
