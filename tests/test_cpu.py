"""CPU facts and the band partition, with faked topologies."""

import pytest

from refmoe import cpu
from refmoe.cpu import BAND, Topology, partition_bands


def owners(lo, hi):
    out = {}
    for t, (a, b) in enumerate(zip(lo, hi)):
        for band in range(a, b):
            assert band not in out, f"band {band} owned twice"
            out[band] = t
    return out


@pytest.mark.parametrize("rows", [1, 127, 128, 2048, 7168, 7169, 100_000])
@pytest.mark.parametrize("threads", [1, 2, 3, 7, 64])
def test_every_band_has_one_owner(rows, threads):
    lo, hi = partition_bands(rows, threads)
    assert len(lo) == len(hi) == threads
    assert sorted(owners(lo, hi)) == list(range(-(-rows // BAND)))
    sizes = [b - a for a, b in zip(lo, hi)]
    assert max(sizes) - min(sizes) <= 1  # balanced on one node


def test_two_nodes_keep_their_bands_together():
    topo = Topology(((0, 1, 2, 3), (4, 5, 6, 7)))
    lo, hi = partition_bands(7168, 8, topo)  # 56 bands
    per_thread = [b - a for a, b in zip(lo, hi)]
    assert per_thread == [7] * 8
    # node 0's threads (0-3) own bands 0..27, node 1's (4-7) own 28..55: one contiguous range
    assert (lo[0], hi[3], lo[4], hi[7]) == (0, 28, 28, 56)
    assert topo.thread_cpus(8) == [(0, 1, 2, 3)] * 4 + [(4, 5, 6, 7)] * 4


def test_uneven_nodes_split_in_proportion():
    topo = Topology(((0, 1, 2, 3, 4, 5), (6, 7)))
    assert topo.threads_per_node(8) == [6, 2]
    assert topo.threads_per_node(3) == [2, 1]
    lo, hi = partition_bands(16 * BAND, 8, topo)
    node0 = sum(hi[t] - lo[t] for t in range(6))
    assert node0 == 12 and hi[5] == lo[6]


def test_more_threads_than_bands():
    lo, hi = partition_bands(200, 5)  # two bands
    assert sum(b - a for a, b in zip(lo, hi)) == 2


def test_topology_read_from_fake_sysfs(tmp_path, monkeypatch):
    for node, cpus in (("node0", "0-1,4"), ("node1", "2-3,5-6")):
        (tmp_path / node).mkdir()
        (tmp_path / node / "cpulist").write_text(cpus + "\n")
    monkeypatch.setattr(cpu, "usable_cpus", lambda: [0, 1, 2, 3, 4, 5])
    topo = Topology.read(tmp_path)
    assert topo.nodes == ((0, 1, 4), (2, 3, 5))


def test_topology_without_sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "usable_cpus", lambda: [0, 1])
    assert Topology.read(tmp_path / "missing").nodes == ((0, 1),)


def test_thread_count_from_env_and_cgroup(tmp_path, monkeypatch):
    monkeypatch.setenv("REFMOE_NUM_THREADS", "3")
    assert cpu.default_threads() == 3
    monkeypatch.setenv("REFMOE_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="REFMOE_NUM_THREADS must be >= 1"):
        cpu.default_threads()
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu._cgroup_cpu_limit(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu._cgroup_cpu_limit(tmp_path) is None


def test_cpu_flags_parse():
    info = "processor: 0\nflags\t\t: fpu avx2 fma f16c avx512f\n"
    assert {"avx2", "fma", "avx512f"} <= cpu.cpu_flags(info)
    assert cpu.cpu_flags("processor: 0\n") == set()


PIN_SCRIPT = """
import os, sys
from refmoe import kernels
from refmoe.cpu import Topology
cpus = sorted(os.sched_getaffinity(0))[:2]
kernels.pin_threads(2, Topology(((cpus[0],), (cpus[1],))))   # a faked two-node machine
print(kernels.thread_cpus(2) == cpus)
"""


@pytest.mark.skipif(len(cpu.usable_cpus()) < 2, reason="needs two CPUs")
def test_threads_pinned_to_their_node():
    """Thread t lands on the node that owns its bands (in a subprocess: pinning also moves the
    calling thread)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", PIN_SCRIPT], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip() == "True"


DEFAULT_AFTER_PIN_SCRIPT = """
import os
from refmoe import kernels
from refmoe.cpu import Topology
os.environ.pop("REFMOE_NUM_THREADS", None)
cpus = sorted(os.sched_getaffinity(0))[:2]
os.sched_setaffinity(0, cpus)
before = kernels._threads(None)
kernels.pin_threads(2, Topology(((cpus[0],), (cpus[1],))))   # the caller now runs on one CPU
print(before, kernels._threads(None), len(os.sched_getaffinity(0)))
"""


@pytest.mark.skipif(len(cpu.usable_cpus()) < 2, reason="needs two CPUs")
def test_default_threads_survive_pinning():
    """Pinning narrows the calling thread's affinity to its node; the default pool size must
    stay what the process was given (it halved on a two-node machine after the first call)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", DEFAULT_AFTER_PIN_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert out == ["2", "2", "1"], out


def test_gemv_runs_no_thread_without_rows(monkeypatch):
    """On one node a GEMV of fewer bands than threads runs on as many threads as it has bands
    (every range non-empty, the first on the calling thread); on several nodes the partition
    keeps every thread, as the pool was pinned and the weights placed for them. The products
    are the same either way."""
    import numpy as np

    from refmoe import kernels
    from refmoe.kernels import formats

    one = Topology(((0, 1, 2, 3),))
    monkeypatch.setattr(kernels, "_topology", lambda: one)
    for rows, threads, want in ((8, 4, 1), (200, 4, 2), (BAND * 4, 4, 4), (BAND * 9, 4, 4)):
        lo, hi = kernels._gemm_bands(rows, threads)
        assert len(lo) == want and all(b > a for a, b in zip(lo, hi)), (rows, threads)
        assert sorted(owners(lo, hi)) == list(range(-(-rows // BAND)))
    two = Topology(((0, 1), (2, 3)))
    monkeypatch.setattr(kernels, "_topology", lambda: two)
    assert len(kernels._gemm_bands(8, 4)[0]) == 4

    monkeypatch.setattr(kernels, "_topology", lambda: one)
    rng = np.random.default_rng(0)
    w, s = formats.fp8_quantize(rng.standard_normal((200, 256)).astype(np.float32), (128, 128))
    x = rng.standard_normal((1, 256)).astype(np.float32)
    alone = kernels.fp8_gemm(x, w, s, num_threads=1)
    np.testing.assert_array_equal(kernels.fp8_gemm(x, w, s, num_threads=4), alone)
