"""A/B of GQA decode at long context: the attention as it is (grouped heads, the cache read in
place) against the earlier one (keys and values copied per query head before every step), on
the same demo model in the same process, alternating. Usage:

    python benchmarks/gqa_copy_ab.py DEMO_DIR [CONTEXT ...]

DEMO_DIR: a GQA demo (refmoe demo --family qwen3_next --layers 4 --experts 32 --dir DIR).
Prints per context the median decode step (ms) of each and their ratio, three rounds each.
"""

import statistics
import sys
from pathlib import Path

from refmoe import demo
from refmoe.models import gqa, layers


def copied(q, k, v, *args, **kw):
    """The earlier path: every key and value head repeated for its query heads."""
    r = q.shape[0] // k.shape[0]
    return layers.attend(q, k.repeat_interleave(r, 0), v.repeat_interleave(r, 0), *args, **kw)


def main() -> None:
    directory = Path(sys.argv[1])
    contexts = [int(c) for c in sys.argv[2:]] or [4096, 16384]
    got: dict[str, list[list[float]]] = {"grouped": [], "copied": []}
    for _ in range(3):
        for name, fn in (("grouped", layers.attend), ("copied", copied)):
            gqa.attend = fn
            rows = demo.decode_at_contexts(directory, contexts, steps=8)
            got[name].append([r["step_ms"] for r in rows])
    gqa.attend = layers.attend
    for i, c in enumerate(contexts):
        a = statistics.median(r[i] for r in got["grouped"])
        b = statistics.median(r[i] for r in got["copied"])
        spread = [round(r[i], 1) for r in got["grouped"]], [round(r[i], 1) for r in got["copied"]]
        print(
            f"context {c}: grouped {a:.1f} ms {spread[0]}, copied {b:.1f} ms {spread[1]}, "
            f"copied / grouped {b / a:.2f}"
        )


if __name__ == "__main__":
    main()
