"""Whether anything else ran while we measured (../shared/MEASURING.md's method): the machine's
busy CPU time from /proc/stat (steal included: a hypervisor's other guests) minus this
process's own CPU time, over the wall time of the block, is the cores other processes used.
A block where they used more than OTHERS_LIMIT cores on average is contaminated: benchmarks
redo it a bounded number of times and flag it if it stays so; figures that are impossible
whatever the load (a kernel faster than the plain read of the same bytes by more than 5%)
are flagged as suspect."""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass

OTHERS_LIMIT = 0.15  # cores other processes may use before a measurement is contaminated
RATIO_LIMIT = 1.05  # a kernel over the plain read of the same bytes: above, impossible
RETRIES = 2  # redos of a contaminated measurement before it is kept, flagged


def _busy_seconds() -> float | None:
    """The machine's busy CPU seconds (all cores), or None where /proc/stat is not there."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
    v = [int(x) for x in parts[1:9]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


@dataclass(slots=True)
class Window:
    """with Window() as w: ...; then w.others_cores, w.contaminated."""

    others_cores: float = 0.0
    wall_s: float = 0.0
    _start: tuple = ()

    def __enter__(self) -> Window:
        self._start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, t0 = self._start
        busy1, own1, t1 = _busy_seconds(), _own_seconds(), time.perf_counter()
        self.wall_s = t1 - t0
        if busy0 is None or busy1 is None or self.wall_s <= 0:
            return
        # jiffies are coarse (10 ms): a short block can read slightly negative
        self.others_cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / self.wall_s)

    @property
    def contaminated(self) -> bool:
        return self.others_cores > OTHERS_LIMIT


def suspect(others_cores: float, ratio: float | None = None) -> str:
    """Why a figure should not be trusted, or ""."""
    why = []
    if others_cores > OTHERS_LIMIT:
        why.append(f"other processes used {others_cores:.2f} cores")
    if ratio is not None and ratio > RATIO_LIMIT:
        why.append(f"ratio {ratio:.2f} > {RATIO_LIMIT}: faster than the plain read")
    return "; ".join(why)


def flagged(line: str, why: str) -> str:
    """A printed result with its reason not to be trusted after it, where there is one."""
    return line + (f"  SUSPECT: {why}" if why else "")


def print_row(row: dict, line: str, as_json: bool) -> None:
    """One benchmark row: as a JSON line, or as `line` flagged with row["suspect"]."""
    print(json.dumps(row) if as_json else flagged(line, row["suspect"]), flush=True)


def measured(run, ratio_of=None):
    """run() in a Window, redone up to RETRIES times while contaminated or impossible;
    returns (result, others_cores, suspect reason of the kept attempt, attempts)."""
    for attempt in range(RETRIES + 1):
        with Window() as w:
            out = run()
        why = suspect(w.others_cores, ratio_of(out) if ratio_of else None)
        if not why:
            return out, w.others_cores, "", attempt + 1
    return out, w.others_cores, why, RETRIES + 1
