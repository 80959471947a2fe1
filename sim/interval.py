"""Prediction intervals: a bootstrap over the calibration samples a profile carries.

`refmoe-sim calibrate` keeps every rep of every micro-benchmark in the profile's `samples`
(field path -> values); each field holds their median. One bootstrap replicate draws, for
every field, as many values as it has with replacement and sets the field to their median;
the prediction is rerun on that profile. The interval is the spread of the replicates'
predictions (the 5th and 95th percentiles for a 90% interval). Fields measured in the same
reps (the read and the kernel beside it) are drawn with the same indices, so their
correlation survives. What the interval covers is the calibration's own noise, not the
model's structural error: validation (sim/validate.py) is what measures that. Given several
calibrations (one before and one after a trace), the replicates of each are mixed, so the
interval also spans the machine's drift between them.
"""

from __future__ import annotations

import copy
import random
import statistics
from collections.abc import Callable

from sim.hardware import Hardware


def resample(hw: Hardware, rng: random.Random) -> Hardware:
    """One bootstrap replicate of a calibrated profile."""
    out = copy.deepcopy(hw)
    draws: dict[int, list[int]] = {}
    for key, values in hw.samples.items():
        n = len(values)
        if n not in draws:
            draws[n] = [rng.randrange(n) for _ in range(n)]
        out.set(key, statistics.median(values[i] for i in draws[n]))
    return out


def pool(profiles: list[Hardware], name: str | None = None) -> Hardware:
    """Calibrations of one machine taken at different times, as one profile: every field with
    samples is the median of all of them together, so that intervals drawn from it carry the
    drift between runs (on a shared machine, larger than the noise within one). Fields without
    samples come from the first profile."""
    if not profiles:
        raise ValueError("pool: no profiles")
    out = copy.deepcopy(profiles[0])
    out.name = name or out.name
    keys = {k for p in profiles for k in p.samples}
    out.samples = {k: [v for p in profiles for v in p.samples.get(k, [])] for k in sorted(keys)}
    for k, values in out.samples.items():
        out.set(k, statistics.median(values))
    return out


def _quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (xs sorted)."""
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def replicates(fn: Callable[[Hardware], dict], hw: Hardware, n: int = 200,
               seed: int = 0) -> list[dict]:
    """fn(profile) -> {metric: value} on n bootstrap replicates of hw."""
    if not hw.samples:
        raise ValueError(f"{hw.name}: the profile carries no calibration samples, so no "
                         "interval (profiles from `refmoe-sim calibrate` do)")
    if n < 2:
        raise ValueError("a bootstrap needs n >= 2 replicates")
    rng = random.Random(seed)
    return [fn(resample(hw, rng)) for _ in range(n)]


def bootstrap(fn: Callable[[Hardware], dict], hw: Hardware | list[Hardware], n: int = 200,
              level: float = 0.9, seed: int = 0) -> dict[str, tuple[float, float]]:
    """fn(profile) -> {metric: value}; returns {metric: (low, high)} at the given level.
    hw may be several calibrations of one machine taken at different times: the replicates
    of each (n apiece) then form one mixture, as if the machine, while the predicted run
    went on, were in any one of the states they measured; its quantiles span the drift
    between them, which pooling their samples into one median (pool) averages away."""
    if not 0 < level < 1:
        raise ValueError(f"a bootstrap needs a level in (0, 1), got {level}")
    runs = [r for i, p in enumerate(hw if isinstance(hw, list) else [hw])
            for r in replicates(fn, p, n, seed + i)]
    tail = (1 - level) / 2
    out = {}
    for metric in runs[0]:
        xs = sorted(r[metric] for r in runs)
        out[metric] = (_quantile(xs, tail), _quantile(xs, 1 - tail))
    return out
