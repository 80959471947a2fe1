"""One Chrome Trace Event writer for the engine and the simulator (opens in Perfetto).

Timestamps in microseconds from the trace's start; one process per hardware unit ("cpu",
"gpu0", "pcie0.h2d", "scheduler", ...), lanes (threads) per stream or role; complete events
("X") for spans, counter events ("C") for queue depths and bandwidth; a top-level "metadata"
object with the hardware, the model config, the engine config, refmoe's version and commit, and
one record per request (arrival, prompt tokens, output tokens, first-token time, finish time,
all in seconds from the start).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from refmoe import __version__


def _commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> dict:
    """What the trace ran on, as far as this process can see."""
    from refmoe import cpu

    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    info = {
        "cpu": model,
        "usable_cpus": len(cpu.usable_cpus()),
        "numa_nodes": len(cpu.Topology.read().nodes),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "machine": platform.machine(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


class Trace:
    def __init__(self, metadata: dict | None = None, clock=time.perf_counter):
        self.clock = clock
        self.t0 = clock()
        self.events: list[dict] = []
        self.metadata = {
            "refmoe_version": __version__,
            "commit": _commit(),
            "requests": [],
            **(metadata or {}),
        }
        self._pids: dict[str, int] = {}
        self._tids: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # workers of the engine write from several threads

    def now(self) -> float:
        """Seconds since the trace started."""
        return self.clock() - self.t0

    def _pid(self, process: str) -> int:
        if process not in self._pids:
            self._pids[process] = pid = len(self._pids) + 1
            self.events.append(
                {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": process}}
            )
        return self._pids[process]

    def _ids(self, process: str, lane: str) -> tuple[int, int]:
        pid = self._pid(process)
        if (process, lane) not in self._tids:
            self._tids[(process, lane)] = tid = len(self._tids) + 1
            self.events.append(
                {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": lane}}
            )
        return pid, self._tids[(process, lane)]

    def span(
        self, process: str, lane: str, name: str, start_s: float, dur_s: float, **args
    ) -> None:
        with self._lock:
            pid, tid = self._ids(process, lane)
        self.events.append(
            {
                "ph": "X",
                "name": name,
                "pid": pid,
                "tid": tid,
                "ts": start_s * 1e6,
                "dur": max(dur_s, 0.0) * 1e6,
                **({"args": args} if args else {}),
            }
        )

    def counter(self, process: str, name: str, t_s: float, **values: float) -> None:
        with self._lock:
            pid = self._pid(process)  # a counter is a track of the process, not a lane
            self.events.append(
                {"ph": "C", "name": name, "pid": pid, "ts": t_s * 1e6, "args": values}
            )

    @contextmanager
    def region(self, process: str, lane: str, name: str, **args):
        """Time the with-block as one span."""
        start = self.now()
        try:
            yield
        finally:
            self.span(process, lane, name, start, self.now() - start, **args)

    def request(self, **record) -> None:
        """arrival, prompt_tokens, output_tokens, first_token_time, finish_time (seconds)."""
        self.metadata["requests"].append(record)

    def to_json(self) -> dict:
        return {"traceEvents": self.events, "displayTimeUnit": "ms", "metadata": self.metadata}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))


def for_run(cfg, device: str, **engine) -> Trace:
    """A measured run's trace: this machine's hardware, the model's config, and the engine's
    settings (CPU variant and threads, the device, and whatever else the command sets)."""
    from dataclasses import asdict

    from refmoe import kernels

    return Trace(
        {
            "hardware": hardware(),
            "model": asdict(cfg),
            "engine": {
                "variant": kernels.variant(),
                "threads": kernels._threads(None),
                "device": device,
                **engine,
            },
        }
    )


@contextmanager
def maybe(trace: Trace | None, process: str, lane: str, name: str, **args):
    """trace.region when there is a trace, nothing otherwise."""
    if trace is None:
        yield
    else:
        with trace.region(process, lane, name, **args):
            yield


def gauges(trace, t_s: float, scheduler) -> None:
    """The scheduler's state as counter tracks (Perfetto draws them): requests waiting and
    running, and the share of the KV budget reserved. The simulator writes the same."""
    trace.counter(
        "scheduler", "requests", t_s, waiting=scheduler.queue_depth, running=scheduler.running
    )
    trace.counter("scheduler", "kv cache usage", t_s, reserved=round(scheduler.kv.usage, 6))
