"""Many requests through the engine's own scheduler, timed by the simulator.

One policy, two executors: the plans come from refmoe.scheduler.Scheduler, the same object
the engine's workers ask; here a SimPy prefill worker and decode worker execute them on the
machine model of sim.predict instead of on a model. A prefill costs one forward over the
prompt (the CPU path, or SLP when the plan says so); a decode step over B requests costs one
forward over B tokens (attention projections once for the batch, the experts B tokens hit).
The two workers run concurrently and share the CPU as a fluid resource: when both run CPU
kernels, each gets its fair share of the cores (the interference the engine shows). A
forward's cost comes from sim.predict's per-layer model, computed once per token count.

Outputs the same per-request records and summary (refmoe.serving_metrics.summary) as the engine's
serving benchmark, so the two print the same "Serving Benchmark Result" block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import accumulate

import simpy

from refmoe import costmodel
from refmoe.config import ModelConfig
from refmoe.policy import EngineConfig, Policy, fixed_state_tokens
from refmoe.scheduler import Entry, QueueFull
from refmoe.serving_metrics import Outcome
from refmoe.trace import Trace, gauges
from sim import costs
from sim.fluid import Flow, max_min_rates
from sim.forward import _offload_prefill, _slp_prefill, _step
from sim.hardware import Hardware
from sim.machine import Machine


@dataclass(slots=True)
class Part:
    """A stretch of a forward: `seconds` alone, loading each link of `demand` (link -> units
    per second) meanwhile; an empty demand is a plain wait (Python glue, launch gaps)."""

    seconds: float
    demand: dict


class _Costing(Machine):
    """Runs one forward alone and records every operation's seconds and link demand."""

    def __init__(self, env: simpy.Environment, hw: Hardware, reuse: bool = True):
        super().__init__(env, hw)
        self.log: list[Part] = []
        self.spans: list[tuple] = []
        # key -> (seconds, parts, spans from its start) of the first layer of that key;
        # reuse=False runs every layer (the reference the reuse is tested against)
        self.seen: dict | None = {} if reuse else None

    def mark(
        self, process: str, lane: str, name: str, start: float, end: float | None = None, **args
    ) -> None:
        self.spans.append((process, lane, name, start, self.env.now if end is None else end, args))

    def pipeline(self, layers: list, ring: int):
        """Machine.pipeline's times in closed form: alone nothing contends, so a copy starts
        when the one before it has ended and a slot is free (the experts of the layer `ring`
        copies back have ended), a layer's experts when its attention has ended and its copy
        is in, and each step takes its slowest GPU's time. The same parts, spans and end as
        the event-driven run (the reference with reuse=False), without its events."""
        if self.seen is None:
            yield from super().pipeline(layers, ring)
            return
        start = now = self.env.now
        copied: list[float] = []  # when each MoE layer's copy ended
        freed: list[float] = []  # when each MoE layer's experts ended (its slot back)
        for lay in layers:
            t0 = now
            now += self._steps(lay.attention)
            self.mark_slp(lay, "attention", t0, now)
            t0 = now
            if lay.load:
                j = len(copied)
                begin = max(
                    copied[-1] if copied else start, freed[j - ring] if j >= ring else start
                )
                copied.append(begin + self._steps(lay.load))
                now = max(now, copied[j]) + self._steps(lay.experts)
                if lay.exchange:
                    now += self._steps(lay.exchange)
                freed.append(now)
                self.mark_slp(lay, "experts", t0, now)
            else:
                now += self._steps(lay.dense)
                self.mark_slp(lay, "dense", t0, now)
        yield self.env.timeout(now - start)

    def _steps(self, ops: list) -> float:
        """Log one step's operations (one per GPU, at once); its time is the slowest's."""
        for seconds, demand in ops:
            if seconds > 0:
                self.log.append(Part(seconds, demand))
        return max(seconds for seconds, _ in ops)

    def layer(self, i: int, key: tuple, body):
        """The first layer of a key runs; the others of that key (DeepSeek-V3's 58 MoE
        layers without a routing record) take its parts, spans and time: the costs of a
        forward come from one layer of each kind, not from every layer's operations."""
        if self.seen is None:
            yield from body()
            return
        got = self.seen.get(key)
        start = self.env.now
        if got is None:
            logged, marked = len(self.log), len(self.spans)
            yield from body()
            spans = [
                (p, lane, name.rsplit(" L", 1)[0], t0 - start, t1 - start, a)
                for p, lane, name, t0, t1, a in self.spans[marked:]
            ]
            self.seen[key] = (self.env.now - start, self.log[logged:], spans)
            return
        seconds, parts, spans = got
        self.log.extend(parts)
        for p, lane, name, t0, t1, a in spans:
            self.spans.append((p, lane, f"{name} L{i}", start + t0, start + t1, a))
        yield self.env.timeout(seconds)

    def work(self, seconds: float, demand: dict):
        if seconds > 0:
            self.log.append(Part(seconds, demand))
            yield self.env.timeout(seconds)

    def parts(self, total: float) -> list[Part]:
        """The forward as at most three parts: its CPU kernels, its GPU work, the rest (a
        wait), each with the time-averaged demand of what it merges. When operations
        overlapped (SLP: loads beside compute), one part of the forward's whole time."""
        # a part logged n times (a layer taken from the first of its key) counts n times
        times: dict[int, list] = {}
        for p in self.log:
            seen = times.get(id(p))
            if seen is None:
                times[id(p)] = [p, 1]
            else:
                seen[1] += 1
        busy = sum(p.seconds * n for p, n in times.values())
        groups: dict = {}
        if busy > total * (1 + 1e-9):
            groups["all"] = list(times.values())
        else:
            for p, n in times.values():
                key = "cpu" if any(lk in self.cores for lk in p.demand) else "gpu"
                groups.setdefault(key, []).append((p, n))
        out = []
        for group in groups.values():
            secs = (
                total if len(groups) == 1 and busy > total else sum(p.seconds * n for p, n in group)
            )
            demand: dict = {}
            for p, n in group:
                for lk, w in p.demand.items():
                    demand[lk] = demand.get(lk, 0.0) + w * p.seconds * n / secs
            out.append(Part(secs, demand))
        rest = total - sum(p.seconds for p in out)
        if rest > total * 1e-12:
            out.append(Part(rest, {}))
        return out


class Costs:
    """The parts of a forward over `tokens` tokens, computed once per distinct (path, tokens,
    GPUs) with sim.predict's per-layer model, then reused: a simulated thousand requests
    costs a few thousand SimPy events, not a few per layer and step."""

    CONTEXTS_KEPT = 1 << 16  # Costs.context's memo starts over past this many

    def __init__(
        self,
        cfg: ModelConfig,
        hw: Hardware,
        machine: Machine,
        routing_skew: float = 0.0,
        routing: dict | None = None,
        expert_scale: float = 1.0,
        reuse_layers: bool = True,
    ):
        """reuse_layers=False runs every layer of every forward (the reference that taking
        a layer from the first of its kind, _Costing.layer, is tested against)."""
        self.cfg, self.hw = cfg, hw
        self.reuse_layers = reuse_layers
        self.expert_scale = expert_scale  # expert bytes relative to FP8 (a peer's Q8_0)
        self.memo: dict = {}
        self.mixtures: dict = {}
        self.moe_rates: dict = {}
        self.routing_skew, self.routing = routing_skew, routing or {}
        self.machine = machine  # the links the parts load
        self.layers: dict = {}  # key -> the forward's per-layer spans alone (for traces)
        # contexts -> their step's attention (Costs.context): one request decoding at a time
        # asks the same contexts as every other of its prompt length did
        self.contexts: dict[tuple, list[Part]] = {}

    def __call__(self, tokens: int, path: str = "cpu", gpus: tuple = (0,)) -> list[Part]:
        """path: cpu or slp (a prefill of one sequence), decode (one token each of `tokens`
        sequences), offload (a peer's batch with its experts copied to the GPU, whole layers,
        sim.forward._offload_prefill)."""
        key = (path, tokens, gpus)
        if key not in self.memo:
            env = simpy.Environment()
            m = _Costing(env, self.hw, self.reuse_layers)
            m._mixtures = self.mixtures  # the same expert mixtures across forwards
            m._moe_rates = self.moe_rates
            m.gpu_index = gpus[0] if self.hw.gpus else 0
            m.routing_skew, m.routing = self.routing_skew, self.routing
            m.expert_scale = self.expert_scale
            out: dict = {}
            if path == "slp":
                run = _slp_prefill(m, self.cfg, tokens, list(gpus), out)
            elif path == "offload":
                run = _offload_prefill(m, self.cfg, tokens, out)
            else:
                run = _step(m, self.cfg, tokens, out, tokens if path == "decode" else 1)
            env.process(run)
            env.run()
            # the links of the throwaway machine -> the same-named links of the real one
            by_name = {lk.name: lk for lk in self.machine.links()}
            self.memo[key] = [
                Part(p.seconds, {by_name[lk.name]: w for lk, w in p.demand.items()})
                for p in m.parts(env.now)
            ]
            self.layers[key] = m.spans
        return self.memo[key]

    def layer_spans(
        self, tr, start: float, dur: float, tokens: int, path: str = "cpu", gpus: tuple = (0,)
    ) -> None:
        """The forward's per-layer spans (the engine's device / cpu / slp lanes), its alone
        timeline stretched to the `dur` it took in the run."""
        total = self.seconds(tokens, path, gpus)
        f = dur / total if total > 0 else 0.0
        for process, lane, name, t0, t1, args in self.layers[(path, tokens, gpus)]:
            tr.span(process, lane, name, start + t0 * f, (t1 - t0) * f, **args)

    def seconds(self, tokens: int, path: str = "cpu", gpus: tuple = (0,)) -> float:
        return sum(p.seconds for p in self(tokens, path, gpus))

    def context(self, contexts: tuple) -> list[Part]:
        """A decode step's attention over what each of its sequences has cached (`contexts`),
        all layers as one part (Machine.attention_extra): kept out of the memoized forward,
        as it changes every step."""
        got = self.contexts.get(contexts)
        if got is None:
            seconds, demand = self.machine.attention_extra(self.cfg, len(contexts), contexts)
            got = [Part(seconds * self.cfg.num_hidden_layers, demand)] if seconds > 0 else []
            if len(self.contexts) >= self.CONTEXTS_KEPT:
                self.contexts.clear()
            self.contexts[contexts] = got
        return got

    def prefix(self, tokens: int, past: int) -> list[Part]:
        """What `tokens` new tokens of one sequence add by attending to the `past` tokens
        it has cached (a restored prefix, or the chunks run so far), all layers as one part."""
        seconds, demand = self.machine.prefix_attention(self.cfg, tokens, past)
        return [Part(seconds * self.cfg.num_hidden_layers, demand)] if seconds > 0 else []

    def overlapped(self, a: int, b: int) -> list[Part]:
        """A decode step of two micro-batches (of a and b sequences) under dual-batch overlap,
        as the engine pipelines it layer by layer: while one runs layer i's attention on the
        GPU, the other runs its experts on the CPU, then they swap. Each layer is two slots,
        [GPU: A's attention i | CPU: B's experts i-1] then [GPU: B's attention i | CPU: A's
        experts i], each as long as the longer of its two sides; a dense layer has no CPU
        side, so its slots are all GPU. The logits of one micro-batch and its next step's
        first attention share a slot with the other's last experts (steady state). The step
        is one part loading the links with both halves' time-averaged demand. Their
        attention over cached tokens (Costs.context) comes on top, not overlapped: a small
        cost with a GPU, and it keeps this part the same every step. Without a GPU both
        sides are the same cores, so nothing overlaps: the two forwards back to back."""
        key = ("dbo", a, b)
        if key not in self.memo:
            parts = self(a, "decode") + self(b, "decode")
            busy = sum(p.seconds for p in parts)
            total = busy
            if self.hw.gpus:
                ga, ca = self._sides(a)
                gb, cb = self._sides(b)
                total = sum(max(ga[i], cb[i - 1]) + max(gb[i], ca[i]) for i in range(len(ga)))
            demand: dict = {}
            for p in parts:
                for lk, w in p.demand.items():
                    demand[lk] = demand.get(lk, 0.0) + w * p.seconds / total
            self.memo[key] = [Part(total, demand)]
        return self.memo[key]

    def _sides(self, sequences: int) -> tuple[list[float], list[float]]:
        """A decode step's per-layer GPU seconds (attention, a dense MLP; the logits go with
        layer 0, which follows them in the pipeline) and CPU seconds (the routed experts
        with their call's fixed cost), from the forward's own spans."""
        total = self.seconds(sequences, "decode")
        n = self.cfg.num_hidden_layers
        gpu, cpu = [0.0] * n, [0.0] * n
        for _, lane, name, t0, t1, _ in self.layers[("decode", sequences, (0,))]:
            i = int(name.rsplit(" L", 1)[1])
            (cpu if lane == "experts" else gpu)[i] += t1 - t0
        gpu[0] += total - sum(gpu) - sum(cpu)  # the logits (and anything between spans)
        return gpu, cpu


def _beside(parts: list[Part], other: Flow) -> tuple[float, float]:
    """(seconds, other's progress) of running `parts` once while `other` keeps running: each
    part's rate and other's rate together from the max-min solver."""
    period = progress = 0.0
    alone = Flow(other.size, other.links, other.cap, None, weights=other.weights)
    max_min_rates([alone])
    for p in parts:
        if not p.demand:
            period += p.seconds
            progress += alone.rate * p.seconds
            continue
        mine = Flow(p.seconds, tuple(p.demand), 1.0, None, weights=tuple(p.demand.values()))
        theirs = Flow(other.size, other.links, other.cap, None, weights=other.weights)
        max_min_rates([mine, theirs])
        dt = p.seconds / mine.rate
        period += dt
        progress += theirs.rate * dt
    return period, progress


def run_parts(env: simpy.Environment, net, parts: list[Part], publish=None):
    """Each part as one flow over the links it loads (or a wait); publish(flow) hears of each
    flow as it starts and publish(None) as it ends."""
    for p in parts:
        if not p.demand:
            yield env.timeout(p.seconds)
            continue
        ev = net.transfer(p.seconds, list(p.demand), 1.0, list(p.demand.values()))
        if publish:
            publish(ev.flow)
        yield ev
        if publish:
            publish(None)


def makespan(requests: list[tuple[float, int, int]], outcomes: list[Outcome]) -> float:
    """From the first arrival to the last finish of a request that finished."""
    start = min((a for a, _, _ in requests), default=0.0)
    end = max(
        (o.arrived_at + o.e2e_s for o in outcomes if o.ok and o.e2e_s is not None),
        default=start,
    )
    return end - start


def policy_for(
    cfg: ModelConfig, hw: Hardware, config: EngineConfig, rates: costmodel.Rates | None = None
) -> Policy:
    """The engine's policy on a hardware profile: rates read off the profile (one device, as
    the engine measures its own), accelerated where it has GPUs. SLP streams to the GPUs, or
    on a profile without one to the CPU itself, as the engine does (every format a config
    declares is streamable). rates: the engine's own, where a trace recorded them, so that
    "auto" chooses each prompt's path as the engine did (else the profile's)."""
    from sim.predict import rates as profile_rates

    r = (rates or profile_rates(hw, 1, cfg.expert_format[0])) if config.prefill == "auto" else None
    streamable = cfg.n_routed_experts > 0
    return Policy.build(config, cfg, r, accelerated=bool(hw.gpus), can_stream=streamable)


@dataclass(slots=True)
class Run:
    """What one simulated serving run gives: per-request outcomes (times in seconds, as the
    engine's benchmark records them), the makespan, and where asked for the Chrome trace on
    simulated time and the links' load timeline [(time, {link: share of capacity})]."""

    outcomes: list[Outcome]
    duration_s: float
    trace: Trace | None = None
    timeline: list | None = None
    records: list = field(default_factory=list)  # agents: TurnRecords (conversations only)


class Simulation:
    """Many requests through the engine's own policy and scheduler on a simulated machine: an
    arrival process, a prefill worker and a decode worker as SimPy processes, every forward a
    set of flows over the machine's fluid links. Simulation(...).run() -> Run.

    requests: (arrival s, prompt tokens, output tokens). blocks=False takes every decode step
    as its own flows (the reference the block fast-forward is tested against).
    utilization=True (implies blocks=False) records the links' load timeline. dual_batch:
    auto (on when the profile has a GPU, as the engine decides), on or off. trace: a
    refmoe.trace.Trace on simulated time with the engine's lanes (scheduler / prefill worker,
    decode worker), its counter tracks and one record per request; trace_layers: also the
    per-layer spans of every forward (large for long runs; overlapped decode steps have none).
    routing_skew, routing: as sim.predict.predict."""

    def __init__(
        self,
        cfg: ModelConfig,
        hw: Hardware,
        requests: list[tuple[float, int, int]],
        max_batch: int = 16,
        kv_tokens: int | None = None,
        prefill: str = "cpu",
        max_queue: int = 1 << 30,
        trace: bool = False,
        blocks: bool = True,
        utilization: bool = False,
        dual_batch: str = "auto",
        trace_layers: bool = False,
        routing_skew: float = 0.0,
        routing: dict | None = None,
        chunked_prefill: str | bool = "auto",
        conversations: list | None = None,
        prefix_cache_gib: float = 16.0,
        decode_slowdown: float = 1.2,
        chunk_stall: float = 2.0,
        rates: costmodel.Rates | None = None,
    ):
        """requests: (arrival s, prompt tokens, output tokens), open loop. conversations:
        agents instead (refmoe.serving_metrics.agent_workload), closed loop: each turn sent
        think_s after the previous reply, its prompt the whole history plus new tokens, with
        the engine's prefix cache (prefix_cache_gib of host memory) serving what it can.
        rates: the cost model's rates prefill "auto" chooses paths by (policy_for)."""
        from sim.agents import PrefixModel, host_bytes_per_token
        from sim.routing import routing_bins

        self.cfg, self.hw, self.requests = cfg, hw, requests
        self.env = env = simpy.Environment()
        self.tr = None
        if trace:
            from dataclasses import asdict

            from refmoe.trace import Trace

            self.tr = Trace(
                {
                    "simulated": True,
                    "hardware": {"profile": hw.name},
                    "model": asdict(cfg),
                    "engine": {"prefill": prefill, "max_batch": max_batch},
                },
                clock=lambda: env.now,
            )
        self.blocks = blocks and not utilization
        self.utilization, self.trace_layers = utilization, trace_layers
        self.machine = Machine(env, hw, record=utilization)
        self.net = self.machine.net
        routing_bins(cfg.n_routed_experts, cfg.num_experts_per_tok, routing_skew)  # validates
        self.cost = Costs(cfg, hw, self.machine, routing_skew, routing)
        # the engine's policy, built as the engine builds it: every decision is in the plans
        config = EngineConfig(
            prefill=prefill,
            dual_batch=dual_batch,
            ranks=max(1, len(hw.gpus)),
            kv_tokens=kv_tokens,
            max_batch=max_batch,
            max_queue=max_queue,
            chunked_prefill=chunked_prefill,
            decode_slowdown=decode_slowdown,
            chunk_stall=chunk_stall,
        )
        self.policy = policy_for(cfg, hw, config, rates)
        self.conversations = conversations or []
        per_token = costs.kv_bytes_per_token(cfg) * cfg.num_hidden_layers
        state_tokens = fixed_state_tokens(costs.state_bytes(cfg), per_token)
        self.prefix = (
            PrefixModel(
                int(prefix_cache_gib * 2**30),
                host_bytes_per_token(cfg),
                state_bytes=costs.state_bytes(cfg),
                snapshot_every=state_tokens,  # as refmoe.engine spaces them
            )
            if self.conversations and prefix_cache_gib > 0
            else None
        )
        self.sched = self.policy.scheduler(
            clock=lambda: env.now,
            lookup=self.lookup if self.prefix is not None else None,
            state_tokens=state_tokens,
        )
        # without a GPU the caches are in host memory and a hit's full blocks are mapped from
        # the prefix cache, not copied (refmoe/models/pages.py): held once, not reserved
        self.shares = self.prefix is not None and not hw.gpus
        self.sched.shares = self.shares
        self.outcomes = [Outcome(a, p) for a, p, _ in requests]
        self.total = len(requests) + sum(len(c) for c in self.conversations)
        self.turn_of: dict[str, tuple[int, int]] = {}  # request -> (conversation, turn)
        self.cached: dict[str, int] = {}
        self.turn_done: dict[str, simpy.Event] = {}
        self.sends: dict[int, float] = {}  # conversation -> when its next turn is sent
        self.wants: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.wake_event = env.event()
        self.ended = 0
        self.prefilling = False
        self.next_arrival = float("inf")
        self.prefill_flow: Flow | None = None
        # beside the running prefill flow: a step's context-free parts -> their _beside; a
        # context part's links -> its _beside per second alone
        self.base_beside: dict = {"flow": None}

    # -- the run ------------------------------------------------------------------------

    def run(self) -> Run:
        env = self.env
        env.process(self.arrivals())
        for c, turns in enumerate(self.conversations):
            env.process(self.conversation(c, turns))
        env.process(self.prefill_worker())
        env.process(self.decode_worker())
        while env.peek() != float("inf") and self.ended < self.total:
            env.step()
        timeline = self.machine.net.timeline
        if self.tr is not None and timeline:
            # the links' load as counter tracks (process "links", one track per link), where
            # the run kept every step as flows (utilization=True): decode steps taken in
            # blocks have none, and a track would show those links idle
            for t, load in timeline:
                for link, share in load.items():
                    self.tr.counter("links", link, t, load=round(share, 6))
        return Run(
            self.outcomes,
            makespan(self.requests, self.outcomes),
            self.tr,
            self.machine.net.timeline if self.utilization else None,
            self.records(),
        )

    def records(self) -> list:
        """The agents' turns as the agent benchmark records them (conversations only)."""
        from refmoe.serving_metrics import TurnRecord

        out = []
        for rid, (c, k) in self.turn_of.items():
            o = self.outcomes[int(rid)]
            times = []
            if o.ttft_s is not None:
                t = o.arrived_at + o.ttft_s
                times = [t]
                for gap in o.itl_s:
                    t += gap
                    times.append(t)
            out.append(TurnRecord(c, k, o, self.cached.get(rid, 0), o.arrived_at, times))
        return sorted(out, key=lambda r: (r.conversation, r.turn))

    # -- agents ---------------------------------------------------------------------------

    def conversation(self, c: int, turns: list):
        """One agent: each turn sent think_s after the previous reply, resending it all."""
        env, history = self.env, 0
        for k, t in enumerate(turns, 1):
            self.sends[c] = env.now + t.think_s
            yield env.timeout(t.think_s)
            del self.sends[c]
            prompt = history + t.new_tokens
            rid = str(len(self.outcomes))
            self.outcomes.append(Outcome(env.now, prompt))
            self.turn_of[rid] = (c, k)
            done = self.turn_done[rid] = env.event()
            try:
                if prompt + t.output_tokens > self.cfg.max_position_embeddings:
                    raise ValueError(
                        f"prompt ({prompt} tokens) + max_tokens ({t.output_tokens}) exceeds "
                        f"the context of {self.cfg.max_position_embeddings} tokens"
                    )
                self.sched.add(Entry(rid, prompt, t.output_tokens, env.now))
                self.wants[rid] = t.output_tokens
            except (QueueFull, ValueError) as e:
                self.outcomes[int(rid)].error = str(e)
                self.ended += len(turns) - k + 1  # its later turns never come
                return
            self.wake()
            yield done
            history = prompt + t.output_tokens

    def lookup(self, rid: str) -> tuple[int, int]:
        """The scheduler asks how much of a turn's prompt the prefix cache holds, and how much
        of that the turn's cache shares (its full blocks, on a box without a GPU)."""
        c, _ = self.turn_of[rid]
        assert self.prefix is not None
        got = self.cached[rid] = self.prefix.match(c, self.outcomes[int(rid)].prompt_tokens)
        block = self.prefix.block
        return got, (got // block * block if self.shares else 0)

    def prefilled(self, rid: str) -> None:
        """A prompt is in its cache: the engine keeps its blocks."""
        if self.prefix is not None and rid in self.turn_of:
            prompt, cached = self.outcomes[int(rid)].prompt_tokens, self.cached.get(rid, 0)
            self.prefix.store(self.turn_of[rid][0], prompt, cached)

    @property
    def next_send(self) -> float:
        return min([self.next_arrival, *self.sends.values()])

    def forward(self, parts: list, prefill: bool = False):
        """run_parts; the prefill's running flow is published so that decode steps can be
        taken in blocks beside it."""
        yield from run_parts(self.env, self.net, parts, self.publish if prefill else None)

    def publish(self, flow: Flow | None) -> None:
        self.prefill_flow = flow

    def wake(self) -> None:
        if self.tr:  # the scheduler's state as counter tracks, as the engine writes them
            gauges(self.tr, self.env.now, self.sched)
        if not self.wake_event.triggered:
            self.wake_event.succeed()
        self.wake_event = self.env.event()

    def arrivals(self):
        env, cfg, requests = self.env, self.cfg, self.requests
        order = sorted(range(len(requests)), key=lambda i: requests[i][0])
        for i in order:
            a, p, o = requests[i]
            self.next_arrival = a
            yield env.timeout(max(0.0, a - env.now))
            try:
                if p + o > cfg.max_position_embeddings:  # refused, as the engine refuses it
                    raise ValueError(
                        f"prompt ({p} tokens) + max_tokens ({o}) exceeds the context of "
                        f"{cfg.max_position_embeddings} tokens"
                    )
                self.sched.add(Entry(str(i), p, o, env.now))
                self.wants[str(i)] = o
            except (QueueFull, ValueError) as e:
                self.outcomes[i].error = str(e)
                self.ended += 1
            self.wake()
        self.next_arrival = float("inf")

    def token(self, rid: str, at: float | None = None) -> None:
        now = self.env.now if at is None else at
        oc = self.outcomes[int(rid)]
        done = oc.token(now, self.last.get(rid, now), self.wants[rid])
        self.last[rid] = now
        if done:
            if self.tr and oc.ttft_s is not None:
                self.tr.request(
                    id=f"req-{rid}",
                    arrival=oc.arrived_at,
                    prompt_tokens=oc.prompt_tokens,
                    output_tokens=oc.output_tokens,
                    finish_reason="length",
                    first_token_time=oc.arrived_at + oc.ttft_s,
                    finish_time=now,
                )
            self.sched.finish(rid)
            if self.tr:
                gauges(self.tr, self.env.now, self.sched)
            self.ended += 1
            if rid in self.turn_done:
                if self.prefix is not None:  # prompt and reply, for the next turn
                    self.prefix.store(self.turn_of[rid][0], oc.prompt_tokens + oc.output_tokens - 1)
                self.turn_done.pop(rid).succeed()

    def tokens(self, rid: str, times: list[float]) -> None:
        """Tokens of one request at `times` (a block of decode steps): token() for each; a
        block ends no later than the request's last token, so all but the last are gaps
        only."""
        oc = self.outcomes[int(rid)]
        if oc.ttft_s is None or rid not in self.last:
            for at in times:
                self.token(rid, at)
            return
        self.last[rid] = oc.gaps(times[:-1], self.last[rid])
        self.token(rid, times[-1])

    def prefill_worker(self):
        env, sched, tr = self.env, self.sched, self.tr
        while True:
            plan = sched.next_prefill()
            if plan is None:
                yield self.wake_event
                continue
            self.prefilling = True
            start = env.now
            where, gpus = plan.where, plan.device_ids
            run = plan.tokens - plan.cached  # a cached prefix is restored, not run
            parts = self.cost(run, where, gpus) + self.cost.prefix(run, plan.cached)
            yield from self.forward(parts, prefill=True)
            self.prefilling = False
            self.prefilled(plan.request_id)
            if tr:
                tr.span(
                    "scheduler",
                    "prefill worker",
                    "prefill",
                    start,
                    env.now - start,
                    requests=1,
                    tokens=run,
                    path=where,
                )
                if self.trace_layers:
                    self.cost.layer_spans(tr, start, env.now - start, run, where, gpus)
            self.token(plan.request_id)
            if not self.outcomes[int(plan.request_id)].ok:
                sched.prefilled(plan.request_id)
            self.wake()

    def step(self, plan, ahead: int = 0) -> tuple[list[Part], list[Part]]:
        """The decode step `ahead` steps from now (every context one longer per step) as its
        context-free parts (memoized per batch shape) and its attention over the cached
        tokens (Costs.context)."""
        base, contexts = self.shape(plan)
        return base, self.cost.context(tuple(c + ahead for c in contexts))

    def shape(self, plan) -> tuple[list[Part], tuple]:
        """A decode step's context-free parts (memoized per batch shape) and the contexts it
        attends over now: each request has its prompt and its outputs but the newest (which
        the step feeds) cached; one micro-batch's, then the other's, when overlapped."""
        outcomes, cost = self.outcomes, self.cost

        def cached(rids):
            return tuple(
                outcomes[int(r)].prompt_tokens + outcomes[int(r)].output_tokens - 1 for r in rids
            )

        if plan.overlapped:
            a, b = map(cached, plan.micro_batches)
            return cost.overlapped(len(a), len(b)), a + b
        c = cached(plan.request_ids)
        return cost(len(c), "decode"), c

    def beside_cost(self, base: list[Part], contexts: tuple, flow: Flow) -> tuple[float, float]:
        """_beside of a step (its context-free parts and the contexts it attends over), the
        parts' computed once per batch shape (a part's rates beside the flow do not depend on
        its length)."""
        base_beside = self.base_beside
        context = self.cost.context(contexts)
        key = id(base)  # the memoized list itself
        if key not in base_beside:
            base_beside[key] = _beside(base, flow)
        period, progress = base_beside[key]
        for p in context:
            links = tuple(p.demand.items())  # the same links every step: rates per second
            if links not in base_beside:
                base_beside[links] = _beside([Part(1.0, p.demand)], flow)
            dt, got = base_beside[links]
            period, progress = period + dt * p.seconds, progress + got * p.seconds
        return period, progress

    def decode_worker(self):
        env, net, sched, tr = self.env, self.net, self.sched, self.tr
        outcomes, wants = self.outcomes, self.wants
        while True:
            plan = sched.next_decode()
            if plan is None:
                yield self.wake_event
                continue
            if plan.chunk is not None:
                yield from self.chunked_step(plan)
                continue
            b = len(plan.request_ids)
            parts = sum(self.step(plan), [])
            left = min(wants[r] - outcomes[int(r)].output_tokens for r in plan.request_ids)
            # Steps whose outcome is fixed in advance are taken as one block, to the same
            # times: with nothing else running, until an arrival or a finish; beside a running
            # prefill flow (and nothing else), while that flow would not end, the prefill held
            # meanwhile to the average rate it gets beside the steps.
            beside, steps = self.prefill_flow, []
            done = 0.0
            if not self.blocks:
                pass
            elif beside is not None and net.flows == [beside] and left > 2:
                if self.base_beside["flow"] is not beside:
                    self.base_beside.clear()
                    self.base_beside["flow"] = beside
                rem = net.remaining(beside)
                base, contexts = self.shape(plan)
                for i in range(left):
                    ahead = tuple(c + i for c in contexts)
                    period, progress = self.beside_cost(base, ahead, beside)
                    if progress <= 0 or done + 2 * progress > rem:
                        break
                    steps.append(period)
                    done += progress
            elif not self.prefilling and not sched.waiting and not sched.chunking and not net.flows:
                gap, took = self.next_send - env.now, 0.0
                base, contexts = self.shape(plan)
                alone = sum(p.seconds for p in base)
                for i in range(left):
                    ahead = tuple(c + i for c in contexts)
                    period = alone + sum(p.seconds for p in self.cost.context(ahead))
                    if steps and took + period > gap:
                        break
                    steps.append(period)
                    took += period
            k = max(1, len(steps))
            t0 = env.now
            rule = self.policy.chunk_rule
            if k == 1:
                yield from self.forward(parts)
                rule.observe(b, 0, env.now - t0)
                for rid in plan.request_ids:
                    self.token(rid)
            else:
                if beside is not None:
                    net.set_cap(beside, done / sum(steps))
                yield env.timeout(sum(steps))
                if beside is not None:
                    net.set_cap(beside, 1.0)
                rule.observe_steps(b, steps)
                times = list(accumulate(steps, initial=t0))[1:]
                for rid in plan.request_ids:
                    self.tokens(rid, times)
            if tr:  # one span per step, as the engine writes them
                at = t0
                for per in steps or [env.now - t0]:
                    tr.span(
                        "scheduler",
                        "decode worker",
                        "decode",
                        at,
                        per,
                        requests=b,
                        micro_batches=len(plan.micro_batches),
                    )
                    if self.trace_layers and not plan.overlapped:
                        self.cost.layer_spans(tr, at, per, b, "decode")
                    at += per
            self.wake()

    def chunked_step(self, plan):
        """A decode step that carries a chunk of a CPU prefill (chunked prefill): the step's
        parts, then the chunk's, one after the other on the same cores; the step's simulated
        time goes to the policy's chunk rule, as the engine reports its measured one."""
        env, chunk = self.env, plan.chunk
        b = len(plan.request_ids)
        start = env.now
        parts = sum(self.step(plan), []) if b else []
        chunk_parts = self.cost(chunk.tokens, "cpu") + self.cost.prefix(chunk.tokens, chunk.start)
        yield from self.forward(parts + chunk_parts)
        self.policy.chunk_rule.observe(b, chunk.tokens, env.now - start)
        for rid in plan.request_ids:
            self.token(rid)
        self.sched.chunked(chunk.request_id, chunk.tokens)
        if chunk.last:
            self.prefilled(chunk.request_id)
            self.token(chunk.request_id)
            if not self.outcomes[int(chunk.request_id)].ok:
                self.sched.prefilled(chunk.request_id)
        if self.tr:
            self.tr.span(
                "scheduler",
                "decode worker",
                "decode",
                start,
                env.now - start,
                requests=b + 1,
                micro_batches=len(plan.micro_batches),
                prefill_chunk_tokens=chunk.tokens,
            )
            if self.trace_layers:
                self.cost.layer_spans(self.tr, start, env.now - start, b + chunk.tokens, "cpu")
        self.wake()


def simulate(cfg: ModelConfig, hw: Hardware, requests: list[tuple[float, int, int]], *args, **kw):
    """Simulation(...).run() as a tuple: (outcomes, makespan), then the trace where
    trace=True, then the links' load timeline where utilization=True (what callers unpack)."""
    run = Simulation(cfg, hw, requests, *args, **kw).run()
    return (
        (run.outcomes, run.duration_s)
        + ((run.trace,) if run.trace is not None else ())
        + ((run.timeline,) if run.timeline is not None else ())
    )


def plot_utilization(timeline: list, path: str, title: str = "") -> None:
    """Each link's load (share of its capacity) over simulated time, one panel per kind of
    link (DRAM, cores, interconnect, PCIe, GPUs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({n for _, load in timeline for n in load})
    kinds: dict[str, list[str]] = {}
    for n in names:
        kinds.setdefault(re.sub(r"\d+", "", n.split(".")[0]), []).append(n)
    fig, axes = plt.subplots(
        len(kinds),
        1,
        figsize=(11, 1.6 * len(kinds) + 0.6),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    times = [t for t, _ in timeline]
    dashes = ["-", "--", ":", "-."]
    for ax, (kind, members) in zip(axes[:, 0], kinds.items()):
        # each member its own dash and width, drawn widest first, so that socket 0's line stays
        # visible where socket 1's runs on top of it
        for j, n in enumerate(members):
            ax.step(
                times,
                [load.get(n, 0.0) for _, load in timeline],
                where="post",
                label=n,
                lw=2.2 - 0.5 * (j % 3),
                linestyle=dashes[j % len(dashes)],
                alpha=0.8,
            )
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(kind)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    axes[-1, 0].set_xlabel("simulated seconds")
    fig.suptitle(title or "link utilization (share of capacity)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
