"""What CPU we run on: instruction-set flags, usable cores, NUMA nodes, and the band partition.

Everything here is plain data read from /proc and /sys, so the partition logic is unit-tested
with a faked topology (tests/test_cpu.py) and the kernels only ever see integer band ranges.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BAND = 128  # rows per band: one row of DeepSeek-V3 128x128 scale blocks


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags line of /proc/cpuinfo as a set (empty where there is none, e.g. ARM)."""
    return set(_cpuinfo_field("flags", cpuinfo).split())


def _cpuinfo_field(name: str, cpuinfo: str | None) -> str:
    """The first `name : value` line's value in /proc/cpuinfo ("" where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return ""


def cpu_vendor(cpuinfo: str | None = None) -> str:
    """The vendor_id line of /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"; "" where none)."""
    return _cpuinfo_field("vendor_id", cpuinfo)


def cpu_family(cpuinfo: str | None = None) -> int | None:
    """The `cpu family` line of /proc/cpuinfo (AMD: 25 Zen 3 and Zen 4, 26 Zen 5; None where
    there is none or it is not a number)."""
    value = _cpuinfo_field("cpu family", cpuinfo)
    return int(value) if value.isdigit() else None


def _parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole CPUs allowed by a cgroup v2 cpu.max quota, or None when unlimited/unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(int(quota) // int(period)))


def usable_cpus() -> list[int]:
    """CPU ids this process may run on (affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_threads() -> int:
    """REFMOE_NUM_THREADS, else the affinity mask's size capped by the cgroup quota."""
    env = os.environ.get("REFMOE_NUM_THREADS")
    if env:
        n = int(env)
        if n < 1:
            raise ValueError(f"REFMOE_NUM_THREADS must be >= 1, got {env!r}")
        return n
    n = len(usable_cpus())
    limit = _cgroup_cpu_limit()
    return min(n, limit) if limit else n


@dataclass(slots=True, frozen=True)
class Topology:
    """NUMA nodes as lists of CPU ids (one node on an ordinary machine)."""

    nodes: tuple[tuple[int, ...], ...]

    @classmethod
    def read(cls, root: Path = Path("/sys/devices/system/node")) -> Topology:
        """The machine's nodes restricted to the usable CPUs; one node when /sys says nothing."""
        usable = set(usable_cpus())
        nodes = []
        for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
            try:
                cpus = [c for c in _parse_cpulist((d / "cpulist").read_text()) if c in usable]
            except OSError:
                continue
            if cpus:
                nodes.append(tuple(cpus))
        return cls(tuple(nodes) or (tuple(sorted(usable)),))

    def threads_per_node(self, num_threads: int) -> list[int]:
        """Split num_threads over nodes: one each while threads last (largest nodes first),
        the rest in proportion to CPU counts by largest remainder, so node i runs threads
        [sum(prev), sum(prev) + count_i)."""
        sizes = [len(n) for n in self.nodes]
        by_size = sorted(range(len(sizes)), key=lambda i: -sizes[i])
        counts = [0] * len(sizes)
        for i in by_size[:num_threads]:
            counts[i] = 1
        rest = num_threads - sum(counts)
        quotas = [rest * s / sum(sizes) for s in sizes]
        for i, q in enumerate(quotas):
            counts[i] += int(q)
        left = num_threads - sum(counts)
        for i in sorted(by_size, key=lambda i: -(quotas[i] - int(quotas[i])))[:left]:
            counts[i] += 1
        return counts

    def thread_cpus(self, num_threads: int) -> list[tuple[int, ...]]:
        """For each thread, the CPUs of the node it belongs to (for pinning)."""
        out: list[tuple[int, ...]] = []
        for node, count in zip(self.nodes, self.threads_per_node(num_threads)):
            out.extend([node] * count)
        return out


def partition_bands(
    num_rows: int,
    num_threads: int,
    topology: Topology | None = None,
) -> tuple[list[int], list[int]]:
    """A fixed partition of 128-row bands over threads: thread t owns bands [lo[t], hi[t]).

    Bands are first split over NUMA nodes in proportion to their thread counts, then evenly
    over each node's threads, so a node's threads own one contiguous range of bands (the pages
    a first touch puts on that node). Every band has exactly one owner; ranges may be empty.
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    topology = topology or Topology(((0,),))
    num_bands = -(-num_rows // BAND)
    per_node = topology.threads_per_node(num_threads)
    lo: list[int] = []
    hi: list[int] = []
    start, threads_before = 0, 0
    for count in per_node:
        threads_before += count
        node_end = num_bands * threads_before // num_threads
        node_bands = node_end - start
        for i in range(count):
            lo.append(start + node_bands * i // count)
            hi.append(start + node_bands * (i + 1) // count)
        start = node_end
    return lo, hi
