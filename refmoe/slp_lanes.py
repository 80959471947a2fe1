"""SLP's three lanes (loader, compute, unloader), ordered only by events: CUDA streams and
events (CudaLanes), or on a machine without CUDA threads over a host-side ring (CpuLanes),
with the same requests, order, ring reuse and trace lanes."""

from __future__ import annotations

import threading
from typing import Any

import torch


class _Spans:
    """Trace spans per lane: on the CPU from the clock, on CUDA from timing events resolved
    once the prefill has synchronized."""

    def __init__(self, trace, process: str):
        self.trace, self.process = trace, process
        self.pending: list[tuple[str, str, Any, Any, dict]] = []  # CUDA events, resolved at close
        self.lock = threading.Lock()

    def add(self, lane: str, name: str, start: float, end: float, **args) -> None:
        if self.trace is not None:
            with self.lock:
                self.trace.span(self.process, lane, name, start, end - start, **args)


class _Closed(Exception):
    pass


class CpuLanes:
    """Loader and unloader threads beside the calling (compute) thread. Request j's stages run
    in order on each lane; progress is three counters under one condition variable, so every
    wait is a sleep, never a spin."""

    def __init__(self, slots: int, spans: _Spans):
        self.slots, self.spans = slots, spans
        self.done = {"loaded": -1, "computed": -1, "unloaded": -1}
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.queues: dict[str, list] = {"load": [], "unload": []}
        self.threads = [
            threading.Thread(target=self._worker, args=(lane,), daemon=True, name=f"slp-{lane}")
            for lane in ("load", "unload")
        ]
        self.closed = False
        for t in self.threads:
            t.start()

    def _wait(self, stage: str, j: int) -> None:
        with self.cond:
            while self.done[stage] < j and self.error is None and not self.closed:
                self.cond.wait(0.5)
            if self.error is not None:
                raise RuntimeError(f"SLP {stage} lane failed") from self.error
            if self.done[stage] < j:
                raise _Closed

    def _mark(self, stage: str, j: int) -> None:
        with self.cond:
            self.done[stage] = j
            self.cond.notify_all()

    def _worker(self, lane: str) -> None:
        q = self.queues[lane]
        while True:
            with self.cond:
                while not q and not self.closed and self.error is None:
                    self.cond.wait(0.5)
                if not q:
                    return
                j, fn, label = q.pop(0)
            try:
                if not label:  # a skipped request
                    self._mark("unloaded", j)
                    continue
                if lane == "load":
                    self._wait("computed", j - self.slots)  # slot j % n is free again
                else:
                    self._wait("computed", j)
                start = self.spans.trace.now() if self.spans.trace else 0.0
                fn()
                if self.spans.trace:
                    self.spans.add(
                        "loader" if lane == "load" else "unloader",
                        label,
                        start,
                        self.spans.trace.now(),
                    )
                self._mark("loaded" if lane == "load" else "unloaded", j)
            except _Closed:  # abandoned: the forward pass ended early
                return
            except BaseException as e:  # noqa: BLE001 - handed to the compute thread
                with self.cond:
                    self.error = e
                    self.cond.notify_all()
                return

    def load(self, j: int, fn, label: str) -> None:
        with self.cond:
            self.queues["load"].append((j, fn, label))
            self.cond.notify_all()

    def compute(self, j: int, fn, label: str) -> None:
        self._wait("loaded", j)
        self._wait("unloaded", j - 2)  # output buffer j % 2 free
        start = self.spans.trace.now() if self.spans.trace else 0.0
        fn()
        if self.spans.trace:
            self.spans.add("compute", label, start, self.spans.trace.now())
        self._mark("computed", j)

    def skip(self, j: int) -> None:
        """Request j was loaded but routes no token: release its slot (and pass the unloader,
        which keeps its own count of requests in order)."""
        self._wait("loaded", j)
        self._mark("computed", j)
        self.unload(j, lambda: None, "")

    def unload(self, j: int, fn, label: str) -> None:
        with self.cond:
            self.queues["unload"].append((j, fn, label))
            self.cond.notify_all()

    def finish_layer(self, last: int) -> None:
        self._wait("unloaded", last)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise RuntimeError("SLP lane failed") from self.error


class CudaLanes:
    """Loader and unloader streams beside the compute (current) stream; slot and buffer reuse
    ordered by per-slot events. The host issues everything ahead; it waits only for routing."""

    def __init__(self, slots: int, spans: _Spans, device: torch.device):
        self.slots, self.spans, self.device = slots, spans, device
        self.compute_stream = torch.cuda.current_stream(device)
        self.load_stream = torch.cuda.Stream(device)
        self.unload_stream = torch.cuda.Stream(device)
        ev = lambda: torch.cuda.Event()  # noqa: E731
        self.loaded = [ev() for _ in range(slots)]
        self.computed = [ev() for _ in range(slots)]
        self.unloaded = [ev() for _ in range(2)]
        self.issued = {"computed": -1}
        self.timing = spans.trace is not None
        if self.timing:
            self.base = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            self.base_s = spans.trace.now()
            self.base.record(self.compute_stream)

    def _timed(self, stream, lane: str, label: str, fn) -> None:
        if not self.timing:
            fn()
            return
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        fn()
        b.record(stream)
        self.spans.pending.append((lane, label, a, b, {}))

    def load(self, j: int, fn, label: str) -> None:
        slot = j % self.slots
        with torch.cuda.stream(self.load_stream):
            if j >= self.slots:
                assert self.issued["computed"] >= j - self.slots, "load issued before its slot"
                self.load_stream.wait_event(self.computed[slot])
            self._timed(self.load_stream, "loader", label, fn)
            self.loaded[slot].record(self.load_stream)

    def compute(self, j: int, fn, label: str) -> None:
        slot = j % self.slots
        self.compute_stream.wait_event(self.loaded[slot])
        if j >= 2:
            self.compute_stream.wait_event(self.unloaded[j % 2])
        self._timed(self.compute_stream, "compute", label, fn)
        self.computed[slot].record(self.compute_stream)
        self.issued["computed"] = j

    def skip(self, j: int) -> None:
        slot = j % self.slots
        self.compute_stream.wait_event(self.loaded[slot])
        self.computed[slot].record(self.compute_stream)
        self.issued["computed"] = j

    def unload(self, j: int, fn, label: str) -> None:
        with torch.cuda.stream(self.unload_stream):
            self.unload_stream.wait_event(self.computed[j % self.slots])
            self._timed(self.unload_stream, "unloader", label, fn)
            self.unloaded[j % 2].record(self.unload_stream)

    def finish_layer(self, last: int) -> None:
        self.compute_stream.wait_stream(self.unload_stream)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        if self.timing:
            for lane, label, a, b, args in self.spans.pending:
                start = self.base_s + self.base.elapsed_time(a) / 1e3
                self.spans.add(
                    lane, label, start, self.base_s + self.base.elapsed_time(b) / 1e3, **args
                )
            self.spans.pending.clear()
