"""Fluid, max-min fair sharing of links (DRAM channels, the socket interconnect, PCIe lanes) by
transfers that may cross several of them, as SimPy events.

A FIFO Resource(1) would serialize transfers and get tail latency wrong; here every active flow
progresses at its max-min fair rate (progressive filling: all unfrozen flows rise together
until a link saturates or a flow reaches its own cap, whose flows then freeze), and rates are
recomputed whenever a flow starts or ends. The SimPy pitfalls are handled explicitly: a timer
scheduled for an earlier set of rates is recognized as stale by a version number and ignored;
remaining bytes are settled with a relative tolerance so float drift can never leave a flow
unfinished, nor a sliver too small to advance the clock; flows that finish at the same instant
complete in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import simpy

EPS_REL = 1e-9   # a flow with remaining <= EPS_REL * size (+ EPS_ABS) is done
EPS_ABS = 1e-6   # bytes


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
    done: simpy.Event
    remaining: float = 0.0
    rate: float = 0.0
    start: float = 0.0
    tags: dict = field(default_factory=dict)


class FluidNetwork:
    """The links of one machine and the flows crossing them."""

    def __init__(self, env: simpy.Environment):
        self.env = env
        self.flows: list[Flow] = []
        self._last = env.now      # when remaining bytes were last settled
        self._version = 0         # bumps on every reschedule; older timers are stale
        self.bytes_done: dict[str, float] = {}

    def transfer(self, nbytes: float, links: list[Link] | tuple[Link, ...],
                 cap: float = math.inf, **tags) -> simpy.Event:
        """Start moving nbytes across all of links (at most cap bytes/s); the returned event
        succeeds with the Flow when the last byte arrives."""
        if nbytes < 0:
            raise ValueError(f"transfer size must be >= 0, got {nbytes}")
        if not links and cap == math.inf:
            raise ValueError("a transfer needs at least one link or a finite cap")
        flow = Flow(float(nbytes), tuple(links), cap, self.env.event(), float(nbytes),
                    start=self.env.now, tags=tags)
        if nbytes == 0:
            flow.done.succeed(flow)
            return flow.done
        self._settle()
        self.flows.append(flow)
        self._reschedule()
        return flow.done

    # -- internals --------------------------------------------------------------------------

    def _settle(self) -> None:
        """Advance every flow's remaining bytes to now at its current rate."""
        dt = self.env.now - self._last
        if dt > 0:
            for f in self.flows:
                moved = f.rate * dt
                f.remaining -= moved
                for link in f.links:
                    self.bytes_done[link.name] = self.bytes_done.get(link.name, 0.0) + moved
        self._last = self.env.now

    def _rates(self) -> None:
        """Max-min fair rates by progressive filling."""
        active = [f for f in self.flows]
        for f in active:
            f.rate = 0.0
        left = {id(link): link.capacity for f in active for link in f.links}
        unfrozen = set(map(id, active))
        by_id = {id(f): f for f in active}
        while unfrozen:
            # the largest equal increment before some link saturates or some flow hits its cap
            inc = math.inf
            for link_id, cap_left in left.items():
                n = sum(1 for fid in unfrozen if any(id(lk) == link_id for lk in by_id[fid].links))
                if n:
                    inc = min(inc, cap_left / n)
            for fid in unfrozen:
                inc = min(inc, by_id[fid].cap - by_id[fid].rate)
            for fid in unfrozen:
                f = by_id[fid]
                f.rate += inc
                for link in f.links:
                    left[id(link)] -= inc
            saturated = {lid for lid, c in left.items() if c <= 1e-12 * max(1.0, inc)}
            frozen = {fid for fid in unfrozen
                      if by_id[fid].rate >= by_id[fid].cap * (1 - 1e-12)
                      or any(id(lk) in saturated for lk in by_id[fid].links)}
            if not frozen:  # numerical corner: freeze everything rather than loop
                frozen = set(unfrozen)
            unfrozen -= frozen

    def _reschedule(self) -> None:
        self._version += 1
        if not self.flows:
            return
        self._rates()
        finish = min(f.remaining / f.rate if f.rate > 0 else math.inf for f in self.flows)
        if finish == math.inf:
            raise RuntimeError("flows with zero rate: a link or cap of zero capacity")
        version = self._version
        timer = self.env.timeout(max(finish, 0.0))
        timer.callbacks.append(lambda _ev, v=version: self._on_timer(v))

    def _on_timer(self, version: int) -> None:
        if version != self._version:  # scheduled for rates that have since changed
            return
        self._settle()
        # Done: bytes left within tolerance, or so few that the time to move them does not
        # change the clock (now + dt == now in floating point would re-fire forever).
        tick = max(abs(self.env.now), 1.0) * 1e-12
        finished = [f for f in self.flows
                    if f.remaining <= EPS_REL * f.size + EPS_ABS or f.remaining <= f.rate * tick]
        self.flows = [f for f in self.flows if f not in finished]
        for f in finished:
            f.remaining, f.rate = 0.0, 0.0
            f.done.succeed(f)
        self._reschedule()
