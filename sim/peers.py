"""Other engines' published serving mechanisms as policies over the same machine model, so
that `refmoe-sim compare` can put them beside refmoe's own (sim/serve.py) on one box.

A peer here is its scheduling and placement, not its kernels: the same per-layer costs
(sim.forward), the same links (sim.machine), the same CPU kernel rates as the profile gives
refmoe's (times `cpu_efficiency`, 1.0 by default: no measured figure of a peer's kernels on
a profile's box is assumed), its weight bytes as its users store the model (llama.cpp has no
FP8: an FP8 checkpoint is converted to Q8_0, 34 bytes per 32 weights). What differs is what
the published code does with a prompt and with decode beside it:

- llama.cpp (llama-server with the experts kept in host memory, `-ot exps=CPU`):
  attention on the GPU, experts on the CPU for small batches. Each scheduler step puts every
  generating slot's next token first and then prompt tokens, up to n_batch (2,048), and runs
  them in micro-batches of n_ubatch (512) tokens (tools/server/server.cpp, update_slots); a
  micro-batch of 32 tokens or more runs its CPU-resident weights on the GPU by copying each
  layer's whole expert tensors there first (ggml/src/ggml-cuda/ggml-cuda.cu,
  ggml_backend_cuda_device_offload_op: min_batch_size 32), with no overlap of copy and
  compute. Decode tokens wait for the whole step they ride in.
- KTransformers (kt-kernel inside SGLang): attention and shared experts on the GPU, routed
  experts on the CPU; a prompt of more tokens than --kt-gpu-prefill-token-threshold runs
  "layerwise prefill", chunk by chunk and layer by layer, each layer's experts copied to the
  GPU and computed there (ktransformers.net/en/docs/optimization-techniques/layerwise-prefill);
  here the copy and the compute of a layer do not overlap. SGLang's scheduler runs a prefill
  batch whenever one can be formed, the running chunked prompt first, and decode only when
  none can (python/sglang/srt/managers/scheduler.py, get_next_batch_to_run, without
  --enable-mixed-chunk); chunks are chunked_prefill_size tokens, 2,048 on GPUs of less than
  35 GB and 8,192 up to 160 GB (server_args.py). The threshold's default is not documented
  where we looked: 4,096 here, our choice, set with ktransformers:offload_above=N.

Neither peer keeps a second GPU for decode while the first prefills, overlaps two decode
batches, or streams experts into a ring ahead of the compute. Both cache prompt prefixes
(llama.cpp's slot cache, SGLang's radix cache), which open-loop workloads of unrelated
prompts never hit; agent workloads are refmoe's only here.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

import simpy

from refmoe.config import ModelConfig
from refmoe.serving_metrics import Outcome
from sim.hardware import Hardware
from sim.machine import Machine
from sim.serve import Costs, Part, Run, makespan, run_parts


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    source: str  # where each mechanism modelled is published
    weight_scale: float  # routed-expert bytes over the checkpoint's FP8 ones
    cpu_efficiency: float  # its CPU kernels' rate over refmoe's on the same profile
    offload_above: int  # more tokens than this: experts copied to the GPU and run there
    offload_by_prompt: bool  # counted per prompt (KTransformers), else per forward (llama.cpp)
    forward_tokens: int  # prompt tokens of one forward (0: SGLang's default by GPU memory)
    step_tokens: int  # tokens a scheduler step takes, run as forwards of forward_tokens
    mixed: bool  # decode tokens ride in the prompt's step (else: prefill first, decode waits)

    def chunk(self, hw: Hardware) -> int:
        if self.forward_tokens:
            return self.forward_tokens
        mem = hw.gpus[0].memory_gb if hw.gpus else 0.0
        if not mem:
            return 4096
        return 2048 if mem < 35 else 8192 if mem < 160 else 16384


PEERS = {
    "llama.cpp": Peer(
        "llama.cpp",
        "tools/server/server.cpp update_slots (decode tokens first, then prompt tokens up to "
        "n_batch 2048, run in n_ubatch 512); ggml-cuda.cu ggml_backend_cuda_device_offload_op "
        "(min_batch_size 32: the weights copied to the GPU per micro-batch); Q8_0 weights",
        weight_scale=34 / 32,
        cpu_efficiency=1.0,
        offload_above=31,
        offload_by_prompt=False,
        forward_tokens=512,
        step_tokens=2048,
        mixed=True,
    ),
    "ktransformers": Peer(
        "ktransformers",
        "ktransformers.net docs, layerwise prefill (--kt-gpu-prefill-token-threshold); SGLang "
        "scheduler.py get_next_batch_to_run (prefill first) and server_args.py "
        "(chunked_prefill_size by GPU memory); native FP8 weights",
        weight_scale=1.0,
        cpu_efficiency=1.0,
        offload_above=4096,
        offload_by_prompt=True,
        forward_tokens=0,
        step_tokens=0,
        mixed=False,
    ),
}

ENGINES = ("refmoe", *PEERS)


def peer(name: str, overrides: dict | None = None) -> Peer:
    """A peer by name, with some of its parameters replaced (field -> value)."""
    if name not in PEERS:
        raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})")
    p = PEERS[name]
    if overrides:
        known = {f.name for f in dataclasses.fields(Peer)} - {"name", "source"}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"{name}: no parameter {', '.join(bad)} (known: {sorted(known)})")
        p = dataclasses.replace(p, **overrides)
    if p.cpu_efficiency <= 0 or p.weight_scale <= 0 or p.offload_above < 0:
        raise ValueError(f"{name}: cpu_efficiency and weight_scale must be > 0, offload_above >= 0")
    return p


def derated(hw: Hardware, factor: float) -> Hardware:
    """The profile with its CPU kernels' rates times `factor` (a peer's kernels)."""
    if factor == 1.0:
        return hw
    out = dataclasses.replace(hw, cpu=dataclasses.replace(hw.cpu))
    c = out.cpu
    c.fp8_gemv_efficiency = min(1.0, c.fp8_gemv_efficiency * factor)
    c.fp8_gemv_gbps_per_core *= factor
    c.fma_gflops_per_core *= factor
    c.gemm_gbps_by_m = {k: v * factor for k, v in c.gemm_gbps_by_m.items()}
    c.moe_gbps_by_m = {k: v * factor for k, v in c.moe_gbps_by_m.items()}
    c.gemv_efficiency_by_format = {k: v * factor for k, v in c.gemv_efficiency_by_format.items()}
    return out


@dataclass(slots=True)
class _Prompt:
    rid: int
    done: int = 0  # prompt tokens run so far


class PeerSimulation:
    """Requests through one peer's scheduler on the simulated machine: one worker, each step
    a set of forwards over the machine's links; the same Outcome records as refmoe's
    Simulation. requests: (arrival s, prompt tokens, output tokens); max_batch: sequences
    served at once (llama.cpp's slots, SGLang's running requests)."""

    def __init__(
        self,
        cfg: ModelConfig,
        hw: Hardware,
        requests: list[tuple[float, int, int]],
        engine: Peer,
        max_batch: int = 16,
    ):
        self.cfg, self.hw, self.peer = cfg, derated(hw, engine.cpu_efficiency), engine
        self.requests = requests
        self.env = simpy.Environment()
        self.machine = Machine(self.env, self.hw)
        self.cost = Costs(cfg, self.hw, self.machine, expert_scale=engine.weight_scale)
        self.max_batch = max_batch
        self.chunk = engine.chunk(self.hw)
        self.step_tokens = engine.step_tokens or self.chunk
        self.outcomes = [Outcome(a, p) for a, p, _ in requests]
        self.wants = [o for _, _, o in requests]
        self.last: dict[int, float] = {}
        self.waiting: deque[int] = deque()
        self.prompts: deque[_Prompt] = deque()  # admitted, prompt not finished
        self.running: list[int] = []  # decoding
        self.ended = 0
        self.wake_event = self.env.event()

    def run(self) -> Run:
        env = self.env
        env.process(self.arrivals())
        env.process(self.worker())
        while env.peek() != float("inf") and self.ended < len(self.requests):
            env.step()
        return Run(self.outcomes, makespan(self.requests, self.outcomes))

    def arrivals(self):
        env, cfg = self.env, self.cfg
        for i in sorted(range(len(self.requests)), key=lambda i: self.requests[i][0]):
            a, p, o = self.requests[i]
            yield env.timeout(max(0.0, a - env.now))
            if p + o > cfg.max_position_embeddings:
                self.outcomes[i].error = (
                    f"prompt ({p} tokens) + max_tokens ({o}) exceeds the context of "
                    f"{cfg.max_position_embeddings} tokens"
                )
                self.ended += 1
                continue
            self.waiting.append(i)
            if not self.wake_event.triggered:
                self.wake_event.succeed()

    def token(self, rid: int) -> None:
        now = self.env.now
        done = self.outcomes[rid].token(now, self.last.get(rid, now), self.wants[rid])
        self.last[rid] = now
        if done:
            self.ended += 1
            if rid in self.running:
                self.running.remove(rid)

    def admit(self) -> None:
        while self.waiting and len(self.running) + len(self.prompts) < self.max_batch:
            self.prompts.append(_Prompt(self.waiting.popleft()))

    def forward(self, tokens: int, prompt: int = 0) -> list[Part]:
        """One forward over `tokens` tokens, `prompt` of them the longest prompt in it (0: a
        decode step): the experts copied to the GPU past the peer's threshold, else on the
        CPU (attention on the GPU where the profile has one)."""
        if not prompt:
            return self.cost(tokens, "decode")
        size = prompt if self.peer.offload_by_prompt else tokens
        if self.hw.gpus and size > self.peer.offload_above:
            return self.cost(tokens, "offload")
        return self.cost(tokens, "cpu")

    def contexts(self) -> tuple:
        o = self.outcomes
        return tuple(o[r].prompt_tokens + o[r].output_tokens - 1 for r in self.running)

    def take(self, budget: int) -> tuple[list[tuple[_Prompt, int]], list[Part]]:
        """Prompt chunks up to `budget` tokens, oldest prompt first, and what they cost
        beyond their forward: each chunk attending to its own earlier chunks."""
        chunks, extra = [], []
        for p in self.prompts:
            if budget <= 0:
                break
            n = min(self.outcomes[p.rid].prompt_tokens - p.done, budget)
            chunks.append((p, n))
            extra += self.cost.prefix(n, p.done)
            budget -= n
        return chunks, extra

    def finish_chunks(self, chunks: list[tuple[_Prompt, int]]) -> None:
        for p, n in chunks:
            p.done += n
            if p.done >= self.outcomes[p.rid].prompt_tokens:
                self.prompts.remove(p)
                self.running.append(p.rid)
                self.token(p.rid)

    def worker(self):
        while True:
            self.admit()
            if not self.prompts and not self.running:
                self.wake_event = self.env.event()
                yield self.wake_event
                continue
            decoding = list(self.running)
            if self.peer.mixed or not self.prompts:
                # llama.cpp's n_batch counts the decode tokens it carries
                chunks, extra = self.take(
                    self.step_tokens - len(decoding) if self.peer.mixed else 0
                )
            else:  # a prefill batch first; decode waits
                decoding = []
                chunks, extra = self.take(self.chunk)
            prompt = sum(n for _, n in chunks)
            parts: list[Part] = []
            if decoding:
                parts += self.cost.context(self.contexts())
            if not prompt:
                parts += self.forward(len(decoding))
            else:
                total = len(decoding) + prompt
                longest = max(self.outcomes[p.rid].prompt_tokens for p, _ in chunks)
                for lo in range(0, total, self.chunk):
                    parts += self.forward(min(self.chunk, total - lo), longest)
            yield from run_parts(self.env, self.machine.net, parts + extra)
            for rid in decoding:
                self.token(rid)
            self.finish_chunks(chunks)


def simulate_peer(
    cfg: ModelConfig,
    hw: Hardware,
    requests: list[tuple[float, int, int]],
    engine: Peer,
    max_batch: int = 16,
) -> Run:
    return PeerSimulation(cfg, hw, requests, engine, max_batch).run()
