"""Many requests through the engine's own scheduler, timed by the simulator.

One policy, two executors: the plans come from refmoe.scheduler.Scheduler, the same object
the engine's workers ask; here a SimPy prefill worker and decode worker execute them on the
machine model of sim.predict instead of on a model. A prefill costs one forward over the
prompt (the CPU path, or SLP when the plan says so); a decode step over B requests costs one
forward over B tokens (attention projections once for the batch, the experts B tokens hit).
The two workers run concurrently and share the CPU as a fluid resource: when both run CPU
kernels, each gets its fair share of the cores (the interference the engine shows). A
forward's cost comes from sim.predict's per-layer model, computed once per token count.

Outputs the same per-request records and summary (refmoe.bench_serve.summary) as the engine's
serving benchmark, so the two print the same "Serving Benchmark Result" block.
"""

from __future__ import annotations

import simpy

from refmoe.bench_serve import Outcome
from refmoe.config import ModelConfig
from refmoe.scheduler import Entry, QueueFull, Scheduler
from sim.fluid import FluidNetwork, Link
from sim.hardware import Hardware
from sim.predict import Machine, _slp_prefill, _step


class _Costing(Machine):
    """Times one forward alone, splitting off the seconds its CPU kernels take."""

    def __init__(self, env: simpy.Environment, hw: Hardware):
        super().__init__(env, hw)
        self.cpu_s = 0.0

    def cpu_fp8(self, nbytes: float, tokens: float = 1.0):
        dt = nbytes / (self.rate_gbps(tokens) * 1e9)
        self.cpu_s += dt
        yield self.env.timeout(dt)

    def cpu_fp8_mixed(self, one: float, experts: int, tokens: int, p: float):
        _, dt = self.mixture(one, experts, tokens, p)
        self.cpu_s += dt
        yield self.env.timeout(dt)


class Costs:
    """(CPU-kernel seconds, other seconds) of a forward over `tokens` tokens, computed once per
    distinct (path, tokens) with sim.predict's per-layer model, then reused: a simulated
    thousand requests costs a few thousand SimPy events, not a few per layer and step."""

    def __init__(self, cfg: ModelConfig, hw: Hardware):
        self.cfg, self.hw, self.memo, self.mixtures = cfg, hw, {}, {}

    def __call__(self, tokens: int, path: str = "cpu") -> tuple[float, float]:
        key = (path, tokens)
        if key not in self.memo:
            env = simpy.Environment()
            m = _Costing(env, self.hw)
            m._mixtures = self.mixtures          # the same expert mixtures across forwards
            out: dict = {}
            run = _slp_prefill(m, self.cfg, tokens, 1, out) if path == "slp" else \
                _step(m, self.cfg, tokens, out)
            env.process(run)
            env.run()
            self.memo[key] = (m.cpu_s, max(0.0, env.now - m.cpu_s))
        return self.memo[key]


def simulate(cfg: ModelConfig, hw: Hardware, requests: list[tuple[float, int, int]],
             max_batch: int = 16, kv_tokens: int | None = None, prefill: str = "cpu",
             max_queue: int = 1 << 30, trace: bool = False):
    """requests: (arrival s, prompt tokens, output tokens). Returns per-request outcomes (times
    in seconds, as the engine's benchmark records them) and the makespan; with trace=True a
    third value, a refmoe.trace.Trace on simulated time with the engine's lanes
    (scheduler / prefill worker, decode worker) and one record per request, so a measured
    and a predicted run open side by side in Perfetto."""
    env = simpy.Environment()
    tr = None
    if trace:
        from dataclasses import asdict

        from refmoe.trace import Trace

        tr = Trace({"simulated": True, "hardware": {"profile": hw.name},
                    "model": asdict(cfg), "engine": {"prefill": prefill,
                                                     "max_batch": max_batch}},
                   clock=lambda: env.now)
    net = FluidNetwork(env)
    cores = Link("cpu cores", 1e9)   # CPU-kernel work in core-pool nanoseconds
    cost = Costs(cfg, hw)

    def forward(tokens: int, path: str = "cpu"):
        """The two workers' CPU kernels share the cores fairly; the rest runs beside."""
        cpu_s, other_s = cost(tokens, path)
        if cpu_s > 0:
            yield net.transfer(cpu_s * cores.capacity, [cores])
        yield env.timeout(other_s)

    from refmoe import costmodel
    from sim.predict import rates

    r = rates(hw, 1) if hw.gpus and prefill == "auto" else None

    def path(tokens: int) -> str:
        """Per request, as the engine decides: the shared cost model for auto."""
        if prefill != "auto":
            return prefill
        return costmodel.choose_prefill(cfg, tokens, r).path if r else "cpu"

    sched = Scheduler(kv_tokens or 1 << 40, max_batch, max_queue, path)
    outcomes = [Outcome(a, p) for a, p, _ in requests]
    wants = {}
    last = {}
    state = {"wake": env.event(), "ended": 0, "prefilling": False,
             "next_arrival": float("inf")}

    def wake():
        if not state["wake"].triggered:
            state["wake"].succeed()
        state["wake"] = env.event()

    def arrivals():
        order = sorted(range(len(requests)), key=lambda i: requests[i][0])
        for i in order:
            a, p, o = requests[i]
            state["next_arrival"] = a
            yield env.timeout(max(0.0, a - env.now))
            try:
                sched.add(Entry(str(i), p, o, env.now))
                wants[str(i)] = o
            except (QueueFull, ValueError) as e:
                outcomes[i].error = str(e)
                state["ended"] += 1
            wake()
        state["next_arrival"] = float("inf")

    def token(rid: str, at: float | None = None) -> None:
        i = int(rid)
        now = env.now if at is None else at
        oc = outcomes[i]
        if oc.ttft_s is None:
            oc.ttft_s = now - oc.arrived_at
        else:
            oc.itl_s.append(now - last[rid])
        last[rid] = now
        oc.output_tokens += 1
        if oc.output_tokens >= wants[rid]:
            oc.e2e_s, oc.ok = now - oc.arrived_at, True
            if tr:
                tr.request(id=f"req-{rid}", arrival=oc.arrived_at,
                           prompt_tokens=oc.prompt_tokens, output_tokens=oc.output_tokens,
                           finish_reason="length", first_token_time=oc.arrived_at + oc.ttft_s,
                           finish_time=now)
            sched.finish(rid)
            state["ended"] += 1

    def prefill_worker():
        while True:
            plan = sched.next_prefill()
            if plan is None:
                yield state["wake"]
                continue
            state["prefilling"] = True
            start = env.now
            where = "slp" if plan.where == "slp" and hw.gpus else "cpu"
            yield from forward(plan.tokens, where)
            state["prefilling"] = False
            if tr:
                tr.span("scheduler", "prefill worker", "prefill", start, env.now - start,
                        requests=1, tokens=plan.tokens, path=where)
            token(plan.request_id)
            if not outcomes[int(plan.request_id)].ok:
                sched.prefilled(plan.request_id)
            wake()

    def decode_worker():
        while True:
            plan = sched.next_decode()
            if plan is None:
                yield state["wake"]
                continue
            b = len(plan.request_ids)
            cpu_s, other_s = cost(b)
            step = cpu_s + other_s
            # nothing else can happen for k steps (no prefill running or startable, no
            # arrival, nobody finishing before the k-th): take them as one, to the same times
            k = 1
            if not state["prefilling"] and not sched.waiting and step > 0:
                left = min(wants[r] - outcomes[int(r)].output_tokens for r in plan.request_ids)
                gap = state["next_arrival"] - env.now
                k = max(1, left if gap == float("inf") else min(left, int(gap / step)))
            t0 = env.now
            if k == 1:
                yield from forward(b)
                for rid in plan.request_ids:
                    token(rid)
            else:
                yield env.timeout(k * step)
                for i in range(1, k + 1):
                    for rid in plan.request_ids:
                        token(rid, t0 + i * step)
            if tr:   # one span per step, as the engine writes them
                per = (env.now - t0) / k
                for i in range(k):
                    tr.span("scheduler", "decode worker", "decode", t0 + i * per, per,
                            requests=b, micro_batches=1)
            wake()

    env.process(arrivals())
    env.process(prefill_worker())
    env.process(decode_worker())
    while env.peek() != float("inf") and state["ended"] < len(requests):
        env.step()
    start = min((a for a, _, _ in requests), default=0.0)
    end = max((o.arrived_at + o.e2e_s for o in outcomes if o.ok), default=start)
    if trace:
        return outcomes, end - start, tr
    return outcomes, end - start
