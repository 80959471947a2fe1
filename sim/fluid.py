"""Fluid, max-min fair sharing of links (DRAM channels, the socket interconnect, PCIe lanes) by
transfers that may cross several of them, as SimPy events.

A FIFO Resource(1) would serialize transfers and get tail latency wrong; here every active flow
progresses at its max-min fair rate (progressive filling: all unfrozen flows rise together
until a link saturates or a flow reaches its own cap, whose flows then freeze), and rates are
recomputed whenever a flow starts or ends. A flow may load each link it crosses with a weight
(link units per unit of the flow's rate): a CPU kernel whose size is its seconds alone loads
each socket's core pool with 1 and each socket's DRAM with the bytes per second it reads, so
flows of different kinds share links in one currency, progress, and max-min fairness becomes
equal slowdown. The SimPy pitfalls are handled explicitly: a timer
scheduled for an earlier set of rates is recognized as stale by a version number and ignored;
remaining bytes are settled with a relative tolerance so float drift can never leave a flow
unfinished, nor a sliver too small to advance the clock; flows that finish at the same instant
complete in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import simpy

EPS_REL = 1e-9  # a flow with remaining <= EPS_REL * size (+ EPS_ABS) is done
EPS_ABS = 1e-6  # bytes


@dataclass(eq=False)
class Link:
    """A shared resource with a capacity in bytes per second."""

    name: str
    capacity: float

    def __post_init__(self) -> None:
        if not self.capacity > 0:
            raise ValueError(f"link {self.name!r}: capacity must be > 0, got {self.capacity}")


@dataclass(eq=False)
class Flow:
    size: float
    links: tuple[Link, ...]
    cap: float
    done: simpy.Event | None  # fires when the flow ends; None for the solver's what-ifs
    remaining: float = 0.0
    rate: float = 0.0
    start: float = 0.0
    tags: dict = field(default_factory=dict)
    weights: tuple[float, ...] = ()  # load on each of links per unit rate (default 1)


class Transfer(simpy.Event):
    """The event of one transfer: it succeeds with its Flow when the last byte arrives, and
    carries the Flow as `.flow` before then."""

    flow: Flow


class FluidNetwork:
    """The links of one machine and the flows crossing them."""

    def __init__(
        self, env: simpy.Environment, links: list[Link] | None = None, record: bool = False
    ):
        """record: keep a timeline of every link's load (share of its capacity) at each rate
        change, for utilization plots; links: the ones to report (all seen, by default)."""
        self.env = env
        self.flows: list[Flow] = []
        self.timeline: list[tuple[float, dict[str, float]]] | None = [] if record else None
        self._watched = list(links or [])
        self._last = env.now  # when remaining bytes were last settled
        self._version = 0  # bumps on every reschedule; older timers are stale
        self.bytes_done: dict[str, float] = {}

    def transfer(
        self,
        nbytes: float,
        links: list[Link] | tuple[Link, ...],
        cap: float = math.inf,
        weights: list[float] | tuple[float, ...] | None = None,
        **tags,
    ) -> Transfer:
        """Start moving nbytes across all of links (at most cap bytes/s; weights: the load on
        each link per byte/s, 1 by default); the returned event succeeds with the Flow when
        the last byte arrives, and carries it as `.flow` before then."""
        if nbytes < 0:
            raise ValueError(f"transfer size must be >= 0, got {nbytes}")
        if not links and cap == math.inf:
            raise ValueError("a transfer needs at least one link or a finite cap")
        weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(links)
        if len(weights) != len(links) or any(not w >= 0 for w in weights):
            raise ValueError("weights: one non-negative number per link")
        done = Transfer(self.env)
        flow = Flow(
            float(nbytes),
            tuple(links),
            cap,
            done,
            float(nbytes),
            start=self.env.now,
            tags=tags,
            weights=weights,
        )
        done.flow = flow
        if nbytes == 0:
            done.succeed(flow)
            return done
        self._settle()
        self.flows.append(flow)
        self._reschedule()
        return done

    def remaining(self, flow: Flow) -> float:
        """A running flow's size left, as of now."""
        self._settle()
        return flow.remaining

    def set_cap(self, flow: Flow, cap: float) -> None:
        """Change a running flow's cap from now on (its bytes so far are settled first)."""
        if not cap > 0:
            raise ValueError(f"cap must be > 0, got {cap}")
        self._settle()
        flow.cap = cap
        if flow in self.flows:
            self._reschedule()

    # -- internals --------------------------------------------------------------------------

    def _settle(self) -> None:
        """Advance every flow's remaining bytes to now at its current rate."""
        dt = self.env.now - self._last
        if dt > 0:
            for f in self.flows:
                moved = f.rate * dt
                f.remaining -= moved
                for link, w in zip(f.links, f.weights):
                    self.bytes_done[link.name] = self.bytes_done.get(link.name, 0.0) + moved * w
        self._last = self.env.now

    def _rates(self) -> None:
        max_min_rates(self.flows)

    def _record(self) -> None:
        if self.timeline is None:
            return
        load: dict[str, float] = {lk.name: 0.0 for lk in self._watched}
        for f in self.flows:
            for link, w in zip(f.links, f.weights):
                load[link.name] = load.get(link.name, 0.0) + f.rate * w / link.capacity
        if self.timeline and self.timeline[-1][0] == self.env.now:
            self.timeline[-1] = (self.env.now, load)
        else:
            self.timeline.append((self.env.now, load))

    def _reschedule(self) -> None:
        self._version += 1
        if not self.flows:
            if self.timeline is not None:
                self._record()
            return
        self._rates()
        if self.timeline is not None:
            self._record()
        finish = min(f.remaining / f.rate if f.rate > 0 else math.inf for f in self.flows)
        if finish == math.inf:
            raise RuntimeError("flows with zero rate: a link or cap of zero capacity")
        version = self._version
        timer = self.env.timeout(max(finish, 0.0))
        timer.callbacks.append(partial(self._on_timer_event, version))

    def _on_timer_event(self, version: int, _event: simpy.Event) -> None:
        self._on_timer(version)

    def _on_timer(self, version: int) -> None:
        if version != self._version:  # scheduled for rates that have since changed
            return
        self._settle()
        # Done: bytes left within tolerance, or so few that the time to move them does not
        # change the clock (now + dt == now in floating point would re-fire forever).
        tick = max(abs(self.env.now), 1.0) * 1e-12
        finished = [
            f
            for f in self.flows
            if f.remaining <= EPS_REL * f.size + EPS_ABS or f.remaining <= f.rate * tick
        ]
        self.flows = [f for f in self.flows if f not in finished]
        for f in finished:
            f.remaining, f.rate = 0.0, 0.0
            if f.done is not None:
                f.done.succeed(f)
        self._reschedule()


def max_min_rates(flows: list[Flow]) -> None:
    """Set each flow's .rate to its weighted max-min fair share, by progressive filling: every
    unfrozen flow's rate rises by the same increment until some link is full (its flows
    freeze) or a flow reaches its cap (it freezes). Also usable on flows not in a network, to
    ask what rates a set of flows would get together."""
    left: dict[int, float] = {}
    for f in flows:
        f.rate = 0.0
        for link in f.links:
            left[id(link)] = link.capacity
    unfrozen = list(flows)
    while unfrozen:
        load: dict[int, float] = {}
        for f in unfrozen:
            for link, w in zip(f.links, f.weights):
                load[id(link)] = load.get(id(link), 0.0) + w
        inc = min((left[lid] / w for lid, w in load.items() if w > 0), default=math.inf)
        inc = min([inc] + [f.cap - f.rate for f in unfrozen])
        if inc == math.inf:
            raise RuntimeError("a flow with no capacity limit (no loaded link, no cap)")
        for f in unfrozen:
            f.rate += inc
            for link, w in zip(f.links, f.weights):
                left[id(link)] -= inc * w
        full = {lid for lid, c in left.items() if c <= 1e-12 * max(1.0, inc)}
        still = [
            f
            for f in unfrozen
            if f.rate < f.cap * (1 - 1e-12)
            and not any(id(lk) in full and w > 0 for lk, w in zip(f.links, f.weights))
        ]
        if len(still) == len(unfrozen):  # numerical corner: freeze everything rather than loop
            still = []
        unfrozen = still
