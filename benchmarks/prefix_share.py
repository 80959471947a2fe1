"""What sharing a cached prefix copy-free saves (refmoe/models/pages.py), on DeepSeek-V3's cache
shape: 61 layers of a float32 latent and rope key ([S, 576] per layer, 141 KB a token).

A prefix of `tokens` tokens is stored once in the prefix cache; then `readers` requests
restore it, as the engine does for agents whose next turns (or sub-agents) share a long
history, either mapped (the default on the CPU) or copied (as before: the pool's mapping
refused). Reported per way: the restore's time per request (median), the memory the readers
added (the process's private memory plus the system's shared memory, /proc), and the time of
one decode step's attention scores over the restored latent of one layer (16 heads, absorbed:
[16, 576] x [576, S]) on a mapped and on a private buffer, alternating, to show that reading
mapped pages costs nothing extra. One JSON line.

Usage: OPENBLAS_NUM_THREADS=1 python benchmarks/prefix_share.py [tokens] [readers]
(check /proc/loadavg first: MEASURING.md)
"""

import gc
import json
import statistics
import sys
import time

import torch

from refmoe.models import pages
from refmoe.models.deepseek_v3 import LayerCache
from refmoe.models.kv_cache import KVCache
from refmoe.prefix_cache import PrefixCache

LAYERS, WIDTH = 61, 576


def _kib(field: str, path: str) -> int:
    for line in open(path):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_bytes() -> int:
    """This process's private memory and the system's shared memory (memfd pages)."""
    return 1024 * (_kib("RssAnon", "/proc/self/status") + _kib("Shmem", "/proc/meminfo"))


def new_cache() -> KVCache:
    return KVCache([LayerCache() for _ in range(LAYERS)])


def restore_all(pc: PrefixCache, ids: list[int], readers: int) -> tuple[list, list[float], int]:
    gc.collect()
    before = memory_bytes()
    caches, times = [], []
    for _ in range(readers):
        hit = pc.match(ids)
        cache = new_cache()
        t0 = time.perf_counter()
        pc.restore(hit, cache)
        times.append(time.perf_counter() - t0)
        caches.append(cache)
    return caches, times, memory_bytes() - before


def scores_ms(latent: torch.Tensor, rounds: int = 30) -> list[float]:
    q = torch.randn(16, WIDTH)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        q @ latent.T  # [16, S]
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(tokens: int = 4096, readers: int = 4) -> None:
    torch.set_num_threads(1)
    ids = [(7 * i + 3) % 50_000 for i in range(tokens + 1)]
    src = new_cache()
    src.extend([[torch.randn(tokens, WIDTH)] for _ in range(LAYERS)])
    pc = PrefixCache(2 * LAYERS * WIDTH * 4 * tokens)
    pc.store(ids, src)
    del src
    assert pc.pool is not None and pc.pool.aliases
    mapped, t_map, mem_map = restore_all(pc, ids, readers)
    shared = mapped[0].parts()[0][0].view()
    refuse = pages.Pool.mapped

    def no_mapping(*args, **kwargs):
        raise OSError("mapping refused for the benchmark")

    pages.Pool.mapped = no_mapping  # type: ignore[method-assign]
    try:
        copied, t_copy, mem_copy = restore_all(pc, ids, readers)
    finally:
        pages.Pool.mapped = refuse  # type: ignore[method-assign]
    private = copied[0].parts()[0][0].view()
    assert torch.equal(shared, private)
    step_map, step_copy = [], []
    for _ in range(10):  # alternating, so drift hits both
        step_map += scores_ms(shared)
        step_copy += scores_ms(private)
    print(
        json.dumps(
            {
                "tokens": tokens,
                "readers": readers,
                "prefix_mb": round(LAYERS * WIDTH * 4 * tokens / 1e6, 1),
                "restore_ms_mapped": round(statistics.median(t_map) * 1e3, 2),
                "restore_ms_copied": round(statistics.median(t_copy) * 1e3, 2),
                "readers_added_mb_mapped": round(mem_map / 1e6, 1),
                "readers_added_mb_copied": round(mem_copy / 1e6, 1),
                "scores_ms_mapped": round(statistics.median(step_map), 3),
                "scores_ms_private": round(statistics.median(step_copy), 3),
                "scores_spread_mapped": [round(min(step_map), 3), round(max(step_map), 3)],
                "scores_spread_private": [round(min(step_copy), 3), round(max(step_copy), 3)],
            }
        )
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
