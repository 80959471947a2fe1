"""The scheduler: which request prefills next and where, which requests decode together, and
how a decode batch is split. It returns plain plan objects (no torch, no threads) that the
engine executes and that the simulator can replay with its own executor.

Policy, as the paper's technique 3 describes it:
- admission: a request waits until the KV budget holds its prompt plus max_tokens; the
  waiting queue has a bound (the server answers 429 beyond it);
- prefix cache: a request's cached prefix is looked up once, when it reaches the head of the
  queue (`lookup`); the path is chosen for the tokens left to run, not the whole prompt; the
  part of the prefix a request shares with the cache rather than copies is held once, by the
  cache, so its reservation leaves it out;
- prefill and decode are separate workers: prefill takes the oldest admitted request, whole
  (chunked by SLP when it runs there), on the path the cost model picks (`where`);
- chunked CPU prefill (`chunk_tokens` given): a prompt on the CPU path is never run whole
  beside decoding requests (both would share the same cores, and every decode step would wait
  on it); its tokens ride along decode steps instead, a chunk per step as the rule allows
  (refmoe/chunking.py), so a decode step waits for at most one chunk. Several prompts may be
  part-way (up to MAX_CHUNKING); each step's chunk goes to the one with the fewest tokens
  left, so an agent's short next turn is not stuck behind another's long first one, unless
  one has been passed over MAX_PASSED times (a stream of short prompts never starves it);
- a request that wants every prompt position's logits (`whole`: an echo with log-probabilities)
  runs whole on the prefill worker from its first token: no chunks, no cached prefix;
- decode batches every running request up to max_batch (continuous batching: a request
  joins at the next step after its prefill, leaves at the step it finishes);
- dual-batch overlap splits a decode batch of two or more into two halves when it pays (on
  when attention runs on a GPU; off where both halves would share the same cores);
- with N devices, an SLP prefill takes all N (DSLP) only when nothing has decoded for
  decode_quiet_s (5 minutes by default, the paper's rule); otherwise N - 1, one device
  staying with decode.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class PrefillPlan:
    """Everything an executor needs to run one prefill; it decides none of it."""

    request_id: str
    tokens: int
    where: str = "cpu"  # "cpu" (routed experts on the CPU kernels) or "slp"
    devices: int = 1  # SLP devices (ranks); more than one is DSLP
    device_ids: tuple[int, ...] = (0,)  # which: the last `devices` (device 0 decodes)
    chunks: int = 1  # SLP chunks (each a full pass over the experts)
    streaming: tuple[str, ...] = ()  # per chunk: "prefetch" or "selective"
    cached: int = 0  # leading prompt tokens restored from the prefix cache, not run


@dataclass(slots=True)
class Chunk:
    """Prompt tokens start .. start + tokens of a CPU-path prefill, run within a decode step."""

    request_id: str
    start: int
    tokens: int
    last: bool  # the prompt's last chunk: its logits give the first token


@dataclass(slots=True)
class DecodePlan:
    request_ids: list[str]
    micro_batches: list[list[str]] = field(default_factory=list)  # two with dual-batch overlap
    chunk: Chunk | None = None  # a prefill chunk that rides along this step

    @property
    def overlapped(self) -> bool:
        return len(self.micro_batches) > 1


@dataclass(slots=True)
class Entry:
    """What the scheduler knows of a request."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrival: float
    state: str = "waiting"  # waiting -> prefilling -> decoding -> finished
    where: str | None = None  # the prefill path, once looked at
    cached: int = 0  # leading prompt tokens the prefix cache holds
    shared: int = 0  # of those, the ones its cache maps from the prefix cache's (held there)
    done: int = 0  # prompt tokens run so far by chunks
    passed: int = 0  # chunks given to shorter prompts since this one's last
    state_tokens: int = 0  # the fixed state a sequence keeps, in tokens' worth of cache
    whole: bool = False  # every prompt position's logits wanted (echo): no chunks, no cache

    @property
    def reserve(self) -> int:
        return self.prompt_tokens - self.shared + self.max_tokens + self.state_tokens


class QueueFull(Exception):
    """The admission queue is at its bound; retry later."""


class KVBudget:
    """Token slots of KV cache: reserved whole (prompt + max_tokens, and a model with linear
    attention layers its fixed state per sequence as so many tokens' worth) at admission,
    returned on finish, error or cancel."""

    def __init__(self, tokens: int):
        if tokens < 1:
            raise ValueError(f"KV budget must be >= 1 token, got {tokens}")
        self.capacity, self.used = tokens, 0

    def fits(self, n: int) -> bool:
        return self.used + n <= self.capacity

    def take(self, n: int) -> None:
        if not self.fits(n):
            raise ValueError(f"KV budget: {n} tokens do not fit ({self.used}/{self.capacity})")
        self.used += n

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)

    @property
    def usage(self) -> float:
        return self.used / self.capacity


MAX_CHUNKING = 4  # prompts part-way through a chunked prefill at once
MAX_PASSED = 16  # a prompt passed over this many times runs the next chunk (no starving)


class Scheduler:
    def __init__(
        self,
        kv_tokens: int,
        max_batch: int = 16,
        max_queue: int = 256,
        choose_path=None,
        dual_batch: bool = False,
        devices: int = 1,
        decode_quiet_s: float = 300.0,
        clock=None,
        details=None,
        lookup=None,
        chunk_tokens=None,
        state_tokens: int = 0,
        estimate=None,
    ):
        self.kv = KVBudget(kv_tokens)
        # the fixed state each sequence keeps beside its growing cache (linear attention's
        # recurrent state: Qwen3-Next, Qwen3.5), counted in tokens of the budget
        self.state_tokens = state_tokens
        self.max_batch, self.max_queue = max_batch, max_queue
        # (tokens, busy: requests are decoding, wait_s: how long the prefill worker stays
        # busy) -> "cpu" or "slp"
        self.choose_path = choose_path or (lambda tokens, busy, wait_s: "cpu")
        # the prompt on the prefill worker (request, start, tokens it runs, path), and per
        # path what its last prompt there took over what `estimate` (tokens, where) ->
        # seconds said (the cost model's, from the policy: its fixed costs, such as SLP's
        # stream, do not grow with the tokens; default: the tokens, so a rate per token), as
        # this scheduler's clock saw it (the engine's and the simulator's alike): how long
        # a waiting prompt would wait for the worker
        self.worker: tuple[str, float, int, str] | None = None
        self.estimate = estimate or (lambda tokens, where: float(tokens))
        self.observed: dict[str, float] = {}
        # (tokens, where) -> (chunks, streaming per chunk): refmoe.policy.Policy.details
        self.details = details or (lambda tokens, where: (1, ()))
        # request_id -> leading prompt tokens cached (the engine's prefix cache), or (cached,
        # shared): the cached tokens and how many of them its cache will share, not copy
        self.lookup = lookup or (lambda request_id: 0)
        # (decoding requests, prompt tokens left) -> tokens of the next chunk (0: none this
        # step); None: CPU prefills run whole on the prefill worker
        self.chunk_tokens = chunk_tokens
        # whether a lookup may share a prefix (then it runs before the reservation is known
        # to fit: what fits depends on it); else only once it fits, as it always did
        self.shares = False
        self.chunking: list[str] = []  # requests whose prompts ride along decode steps
        self.dual_batch = dual_batch
        self.entries: dict[str, Entry] = {}
        self.waiting: deque[str] = deque()
        self.decoding: list[str] = []
        # Two or more devices: a long prompt may take them all (DSLP) only when no request
        # has decoded for decode_quiet_s; otherwise one stays with decode (the paper's rule)
        self.devices, self.decode_quiet_s = devices, decode_quiet_s
        import time as _time

        self.clock = clock or _time.monotonic
        self.last_decode = -float("inf")

    # -- requests in and out ------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        entry.state_tokens = self.state_tokens
        if entry.reserve > self.kv.capacity:
            state = f" + its fixed state ({self.state_tokens})" if self.state_tokens else ""
            raise ValueError(
                f"request {entry.request_id}: prompt + max_tokens{state} = {entry.reserve}"
                f" tokens exceeds the KV budget of {self.kv.capacity}"
            )
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound)")
        self.entries[entry.request_id] = entry
        self.waiting.append(entry.request_id)

    def finish(self, request_id: str) -> None:
        """Finished, failed or cancelled: its KV reservation returns at once."""
        e = self.entries.pop(request_id, None)
        if e is None:
            return
        if e.state in ("prefilling", "decoding"):
            self.kv.give(e.reserve)
        if request_id in self.decoding:
            self.decoding.remove(request_id)
        if request_id in self.waiting:
            self.waiting.remove(request_id)
        if request_id in self.chunking:
            self.chunking.remove(request_id)
        if self.worker is not None and self.worker[0] == request_id:
            self.worker = None  # cancelled or failed: its time says nothing
        e.state = "finished"

    def prefilled(self, request_id: str) -> None:
        if self.worker is not None and self.worker[0] == request_id:
            _, start, tokens, where = self.worker
            self.observed[where] = (self.clock() - start) / max(self.estimate(tokens, where), 1e-9)
            self.worker = None
        e = self.entries.get(request_id)
        if e is not None and e.state == "prefilling":
            e.state = "decoding"
            self.decoding.append(request_id)
        if request_id in self.chunking:
            self.chunking.remove(request_id)

    def chunked(self, request_id: str, tokens: int) -> None:
        """A chunk of the chunking request ran (its last one: call prefilled too)."""
        e = self.entries.get(request_id)
        if e is not None:
            e.done += tokens

    def state(self, request_id: str) -> str | None:
        """waiting, prefilling or decoding; None once finished (or never added)."""
        e = self.entries.get(request_id)
        return None if e is None else e.state

    # -- plans ----------------------------------------------------------------------------

    def next_prefill(self) -> PrefillPlan | None:
        """The oldest waiting request whose reservation fits (first come, first served: a
        large request at the head waits rather than being overtaken forever)."""
        e = self._head()
        if e is None:
            return None
        where = e.where or "cpu"
        if where == "cpu" and self.chunk_tokens is not None and not e.whole:
            return None  # it runs in chunks on the decode worker (next_decode)
        self.waiting.popleft()
        self.kv.take(e.reserve)
        e.state = "prefilling"
        devices = 1
        if where == "slp" and self.devices > 1:
            quiet = not self.decoding and self.clock() - self.last_decode >= self.decode_quiet_s
            devices = self.devices if quiet else max(1, self.devices - 1)
        # the last `devices` devices: device 0 stays with decode unless DSLP takes them all
        ids = (
            tuple(range(self.devices - devices, self.devices))
            if where == "slp"
            else (self.devices - 1,)
        )
        chunks, streaming = self.details(e.prompt_tokens - e.cached, where)
        self.worker = (e.request_id, self.clock(), e.prompt_tokens - e.cached, where)
        return PrefillPlan(
            e.request_id, e.prompt_tokens, where, devices, ids, chunks, streaming, e.cached
        )

    def _head(self) -> Entry | None:
        """The oldest waiting request if its reservation fits, its cached prefix and path
        decided (once, at the head: the lookup pins what it found for the executor, and what
        it shares is not reserved)."""
        if not self.waiting:
            return None
        e = self.entries[self.waiting[0]]
        if e.where is None and (self.kv.fits(e.reserve) or self.shares):
            found = 0 if e.whole else self.lookup(e.request_id)
            cached, shared = found if isinstance(found, tuple) else (found, 0)
            e.cached = min(cached, e.prompt_tokens - 1)
            e.shared = min(shared, e.cached)
            e.where = self.choose_path(
                e.prompt_tokens - e.cached, bool(self.decoding), self.worker_wait()
            )
        if not self.kv.fits(e.reserve):
            return None
        return e

    def worker_wait(self) -> float:
        """Seconds until the prefill worker is free: its prompt's estimate, scaled as the last
        prompt of that path there came out against its own, less the time it has run (0:
        idle, or no such prompt has finished yet)."""
        if self.worker is None:
            return 0.0
        _, start, tokens, where = self.worker
        ratio = self.observed.get(where)
        if ratio is None:
            return 0.0
        return max(0.0, ratio * self.estimate(tokens, where) - (self.clock() - start))

    def next_decode(self) -> DecodePlan | None:
        chunk = self._next_chunk()
        if not self.decoding and chunk is None:
            return None
        if self.decoding:
            self.last_decode = self.clock()
        ids = self.decoding[: self.max_batch]
        split = (
            [ids[: (len(ids) + 1) // 2], ids[(len(ids) + 1) // 2 :]]
            if self.dual_batch and len(ids) >= 2 and chunk is None
            else [ids]
        )
        return DecodePlan(ids, split, chunk)

    def _next_chunk(self) -> Chunk | None:
        """The chunk that rides along this decode step, if any: a CPU-path prompt at the head
        of the queue joins the prompts part-way; the one with the fewest tokens left runs the
        chunk; the rule sizes it."""
        if self.chunk_tokens is None:
            return None
        while len(self.chunking) < MAX_CHUNKING:
            e = self._head()
            if e is None or e.where != "cpu" or e.whole:  # a whole one: the prefill worker's
                break
            self.waiting.popleft()
            self.kv.take(e.reserve)
            e.state = "prefilling"
            self.chunking.append(e.request_id)
        if not self.chunking:
            return None

        def left_of(rid: str) -> int:
            e = self.entries[rid]
            return e.prompt_tokens - e.cached - e.done

        starved = [r for r in self.chunking if self.entries[r].passed >= MAX_PASSED]
        e = self.entries[starved[0] if starved else min(self.chunking, key=left_of)]
        start = e.cached + e.done
        left = e.prompt_tokens - start
        n = min(left, self.chunk_tokens(len(self.decoding[: self.max_batch]), left))
        if n <= 0:
            return None
        for rid in self.chunking:
            other = self.entries[rid]
            other.passed = 0 if other is e else other.passed + 1
        return Chunk(e.request_id, start, n, n == left)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return sum(1 for e in self.entries.values() if e.state in ("prefilling", "decoding"))
