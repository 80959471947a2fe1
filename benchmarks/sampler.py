"""What choosing a token costs at a real vocabulary size (refmoe.sampling.Sampler).

129,280 logits (DeepSeek-V3's vocabulary): random ones (randn x 3, a flat distribution whose
top-p nucleus is tens of thousands of tokens) and peaked ones (randn x 12, as a trained model's
usually are), for greedy, temperature, top-k and top-p. Prints the median of 30 draws each, in
microseconds, one JSON line per case. A decode step of the demo models takes 30-160 ms here.

Usage: python benchmarks/sampler.py   (check /proc/loadavg first: MEASURING.md)
"""

import json
import statistics
import time

import torch

from refmoe.sampling import Sampler, SamplingParams

CASES = {
    "greedy": SamplingParams(0.0),
    "temperature 0.7": SamplingParams(0.7, seed=1),
    "temperature 0.7, top_p 0.95": SamplingParams(0.7, top_p=0.95, seed=1),
    "temperature 0.7, top_k 50": SamplingParams(0.7, top_k=50, seed=1),
}


def main() -> None:
    g = torch.Generator().manual_seed(0)
    for shape, scale in (("flat", 3.0), ("peaked", 12.0)):
        logits = torch.randn(129280, generator=g) * scale
        for name, params in CASES.items():
            s = Sampler(params)
            for _ in range(3):
                s(logits)
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                s(logits)
                times.append(time.perf_counter() - t0)
            us = round(statistics.median(times) * 1e6)
            print(json.dumps({"logits": shape, "case": name, "median_us": us}))


if __name__ == "__main__":
    main()
