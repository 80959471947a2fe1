"""Prediction intervals: a bootstrap over the calibration samples a profile carries.

`refmoe-sim calibrate` keeps every rep of every micro-benchmark in the profile's `samples`
(field path -> values); each field holds their median. One bootstrap replicate draws, for
every field, as many values as it has with replacement and sets the field to their median;
the prediction is rerun on that profile. The interval is the spread of the replicates'
predictions (the 5th and 95th percentiles for a 90% interval). Fields measured in the same
reps (the read and the kernel beside it) are drawn with the same indices, so their
correlation survives. What the interval covers is the calibration's own noise, not the
model's structural error: validation (sim/validate.py) is what measures that.

On a shared machine the speed drifts between calibrations taken minutes apart by more than
the reps of one calibration spread (here 10-30% in a predicted TTFT). That drift is measured
too, never taken from a trace: a profile pooled from several calibrations (`calibrate --runs N
--gap S`, `--merge`) keeps each one's medians in `runs`, and for every pair of consecutive
calibrations the prediction is rerun on both; the ratio of the two, in either direction, is
one draw of how far the machine may have moved by the time the predicted run happens. The
interval is then the spread of every bootstrap replicate times every such ratio. Given
several calibrations as a list instead (`bootstrap(fn, [before, after])`), the replicates of
each are mixed, spanning the drift between them but not beyond.
"""

from __future__ import annotations

import copy
import math
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
    samples come from the first profile. Each calibration's own medians are kept in `runs`,
    in the order given, for the drift between consecutive ones (drift_pairs)."""
    if not profiles:
        raise ValueError("pool: no profiles")
    out = copy.deepcopy(profiles[0])
    out.name = name or out.name
    keys = {k for p in profiles for k in p.samples}
    out.samples = {k: [v for p in profiles for v in p.samples.get(k, [])] for k in sorted(keys)}
    for k, values in out.samples.items():
        out.set(k, statistics.median(values))
    # each calibration's own medians, in order (a pooled one contributes its runs)
    out.runs = [
        run for p in profiles for run in (p.runs or [{k: p.get(k) for k in sorted(p.samples)}])
    ]
    return out


def as_run(hw: Hardware, run: dict) -> Hardware:
    """The profile as one of the calibrations pooled into it measured it."""
    out = copy.deepcopy(hw)
    for key, value in run.items():
        out.set(key, value)
    out.samples, out.runs = {}, []
    return out


def drift_pairs(profiles: list[Hardware]) -> list[tuple[Hardware, Hardware]]:
    """(earlier, later) for every two consecutive calibrations pooled into each profile."""
    return [(as_run(hw, a), as_run(hw, b)) for hw in profiles for a, b in zip(hw.runs, hw.runs[1:])]


def drift_ratios(
    fn: Callable[[Hardware], dict], pairs: list[tuple[Hardware, Hardware]]
) -> list[dict[str, float]]:
    """How far each pair's drift moves this prediction: fn(later) / fn(earlier) per metric,
    and its inverse (the machine is as likely to drift back), so 2 ratios per pair."""
    out = []
    for earlier, later in pairs:
        a, b = fn(earlier), fn(later)
        ok = {
            k: b[k] / a[k] for k in a if a[k] > 0 and b.get(k, 0) > 0 and math.isfinite(a[k] / b[k])
        }
        out += [ok, {k: 1 / r for k, r in ok.items()}]
    return out


def _quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (xs sorted)."""
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def replicates(
    fn: Callable[[Hardware], dict], hw: Hardware, n: int = 200, seed: int = 0
) -> list[dict]:
    """fn(profile) -> {metric: value} on n bootstrap replicates of hw."""
    if not hw.samples:
        raise ValueError(
            f"{hw.name}: the profile carries no calibration samples, so no "
            "interval (profiles from `refmoe-sim calibrate` do)"
        )
    if n < 2:
        raise ValueError("a bootstrap needs n >= 2 replicates")
    rng = random.Random(seed)
    return [fn(resample(hw, rng)) for _ in range(n)]


def bootstrap(
    fn: Callable[[Hardware], dict],
    hw: Hardware | list[Hardware],
    n: int = 200,
    level: float = 0.9,
    seed: int = 0,
    drift: list[tuple[Hardware, Hardware]] | None = None,
) -> dict[str, tuple[float, float]]:
    """fn(profile) -> {metric: value}; returns {metric: (low, high)} at the given level.
    hw may be several calibrations of one machine taken at different times: the replicates
    of each (n apiece) then form one mixture, as if the machine, while the predicted run
    went on, were in any one of the states they measured; its quantiles span the drift
    between them, which pooling their samples into one median (pool) averages away.
    drift: (earlier, later) calibrations of this machine whose disagreement is the drift to
    allow for (default: consecutive runs pooled into hw, drift_pairs); every replicate is
    then multiplied by every ratio drift_ratios gives."""
    if not 0 < level < 1:
        raise ValueError(f"a bootstrap needs a level in (0, 1), got {level}")
    profiles = hw if isinstance(hw, list) else [hw]
    runs = [r for i, p in enumerate(profiles) for r in replicates(fn, p, n, seed + i)]
    ratios = drift_ratios(fn, drift_pairs(profiles) if drift is None else drift) or [{}]
    tail = (1 - level) / 2
    out = {}
    for metric in runs[0]:
        xs = sorted(r[metric] * q.get(metric, 1.0) for r in runs for q in ratios)
        out[metric] = (_quantile(xs, tail), _quantile(xs, 1 - tail))
    return out
