"""Serving metrics, shared by the serving benchmark (refmoe/bench_serve.py) and the simulator
(sim/serve.py), so that a measured and a predicted run are summarized by the same code: one
request's Outcome, vLLM's "Serving Benchmark Result" figures and block, Poisson workloads, the
request CSV (Vidur's `arrived_at,num_prefill_tokens,num_decode_tokens`).

Definitions (times from the request's arrival): TTFT = first token - arrival; TPOT = (last
token - first token) / (output tokens - 1); ITL = the gaps between consecutive tokens;
decode speed per user = 1 / TPOT of each request (tok/s); throughputs over the run's
duration. Times in the summary are in ms, under vLLM's field names.
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Outcome:
    arrived_at: float
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    ok: bool = False
    error: str = ""

    def token(self, now: float, last: float, wanted: int) -> bool:
        """A token came at `now` (the previous one at `last`; ignored for the first): its
        TTFT or gap; True when that was the `wanted`-th, which ends the request."""
        if self.ttft_s is None:
            self.ttft_s = now - self.arrived_at
        else:
            self.itl_s.append(now - last)
        self.output_tokens += 1
        if self.output_tokens >= wanted:
            self.e2e_s, self.ok = now - self.arrived_at, True
            return True
        return False

    def gaps(self, times: list[float], last: float) -> float:
        """Tokens after the first at `times`, the previous one at `last`, none of them the
        request's last (token() for each, in one call); returns when the last of them came."""
        for now in times:
            self.itl_s.append(now - last)
            last = now
        self.output_tokens += len(times)
        return last


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summary(outcomes: list[Outcome], duration_s: float) -> dict:
    """The figures of vLLM's benchmark, in its field names (times in ms)."""
    ok = [o for o in outcomes if o.ok]
    ttft = [o.ttft_s * 1e3 for o in ok if o.ttft_s is not None]
    tpot = [
        (o.e2e_s - o.ttft_s) / (o.output_tokens - 1) * 1e3
        for o in ok
        if o.output_tokens > 1 and o.e2e_s is not None and o.ttft_s is not None
    ]
    itl = [x * 1e3 for o in ok for x in o.itl_s]
    inp = sum(o.prompt_tokens for o in ok)
    out = sum(o.output_tokens for o in ok)
    res = {
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "duration": duration_s,
        "total_input_tokens": inp,
        "total_output_tokens": out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out / duration_s,
        "total_token_throughput": (inp + out) / duration_s,
    }
    for name, vals in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        res[f"mean_{name}_ms"] = statistics.fmean(vals) if vals else float("nan")
        res[f"median_{name}_ms"] = statistics.median(vals) if vals else float("nan")
        res[f"p99_{name}_ms"] = _pct(vals, 99)
    # what a user watching the stream sees: each request's decode speed (1 / its TPOT); the
    # slowest 1% of users (p1) is the tail, as p99 is for the times
    speed = [1e3 / t for t in tpot if t > 0]
    res["mean_decode_tok_s_per_user"] = statistics.fmean(speed) if speed else float("nan")
    res["median_decode_tok_s_per_user"] = statistics.median(speed) if speed else float("nan")
    res["p1_decode_tok_s_per_user"] = _pct(speed, 1)
    return res


def format_summary(r: dict) -> str:
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    rows = [
        ("Successful requests:", r["completed"]),
        ("Failed requests:", r["failed"]),
        ("Benchmark duration (s):", f"{r['duration']:.2f}"),
        ("Total input tokens:", r["total_input_tokens"]),
        ("Total generated tokens:", r["total_output_tokens"]),
        ("Request throughput (req/s):", f"{r['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{r['output_throughput']:.2f}"),
        ("Total Token throughput (tok/s):", f"{r['total_token_throughput']:.2f}"),
    ]
    lines += [f"{k:<40}{v:<10}" for k, v in rows]
    for title, key, label in (
        ("Time to First Token", "ttft", "TTFT"),
        ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
        ("Inter-token Latency", "itl", "ITL"),
    ):
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        for stat in ("mean", "median", "p99"):
            name = {"mean": "Mean", "median": "Median", "p99": "P99"}[stat]
            lines.append(f"{f'{name} {label} (ms):':<40}{r[f'{stat}_{key}_ms']:<10.2f}")
    if "median_decode_tok_s_per_user" in r:
        lines.append("{s:{c}^50}".format(s="Decode Speed per User", c="-"))
        for stat, name in (("mean", "Mean"), ("median", "Median"), ("p1", "P1 (slowest)")):
            v = r[f"{stat}_decode_tok_s_per_user"]
            lines.append(f"{f'{name} decode (tok/s):':<40}{v:<10.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)


def workload(
    n: int,
    rate: float,
    prompt_tokens: tuple[int, int],
    output_tokens: tuple[int, int],
    seed: int = 0,
) -> list[tuple[float, int, int]]:
    """(arrival s, prompt tokens, output tokens) with Poisson arrivals (rate req/s; inf: all at
    once) and lengths uniform in the given ranges."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append((t, rng.randint(*prompt_tokens), rng.randint(*output_tokens)))
        t += rng.expovariate(rate) if rate != float("inf") else 0.0
    return out


def write_csv(path: str, outcomes: list[Outcome]) -> None:
    with open(path, "w") as f:
        f.write("arrived_at,num_prefill_tokens,num_decode_tokens\n")
        for o in outcomes:
            f.write(f"{o.arrived_at:.6f},{o.prompt_tokens},{o.output_tokens}\n")


def as_rows(outcomes: list[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]


def _pair(text: str, kind, least, what: str):
    first, _, second = text.partition("-")
    try:
        lo, hi = kind(first), kind(second or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} or LO-HI, got {text!r}") from None
    if not least <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected {least} <= LO <= HI, got {text!r}")
    return lo, hi


def parse_float_range(text: str) -> tuple[float, float]:
    return _pair(text, float, 0, "X")


def parse_range(text: str) -> tuple[int, int]:
    return _pair(text, int, 1, "N")


def add_agent_arguments(p: argparse.ArgumentParser, prefix: str) -> None:
    """The agent workload's flags, for the benchmark and the simulator alike (prefix: how
    their help names the scenario)."""
    p.add_argument("--conversations", type=int, default=2, help=f"{prefix}conversations")
    p.add_argument("--turns", type=int, default=3, help=f"{prefix}turns per conversation")
    p.add_argument(
        "--context", type=int, default=4096, help=f"{prefix}the first turn's prompt tokens"
    )
    p.add_argument(
        "--new-tokens",
        type=parse_range,
        default=(200, 400),
        help=f"{prefix}tokens each later turn appends (N or LO-HI)",
    )
    p.add_argument(
        "--think-s",
        type=parse_float_range,
        default=(0.5, 2.0),
        help=f"{prefix}seconds between a reply and the next turn (X or LO-HI)",
    )


def add_chunked_prefill_arguments(p: argparse.ArgumentParser) -> None:
    """Chunked prefill's flags, as `refmoe serve`, its benchmark and the simulator take them
    (refmoe/chunking.py)."""
    p.add_argument(
        "--chunked-prefill",
        choices=["auto", "on", "off"],
        default="auto",
        help="CPU prompts in chunks along the decode steps (on) or whole beside them (off); "
        "auto: on where the CPU alone runs the model",
    )
    p.add_argument(
        "--decode-slowdown",
        type=float,
        default=1.2,
        help="chunked prefill: the most a prefilling prompt may slow the decoding requests' "
        "mean time per token (1.2: by 20%%)",
    )
    p.add_argument(
        "--chunk-stall",
        type=float,
        default=2.0,
        help="chunked prefill: the most one chunk may add to one decode step, in decode steps "
        "(larger: bigger chunks, a faster prefill, longer pauses in the others' streams)",
    )


# ---------------------------------------------------------------------------------------------
# Agents: multi-turn conversations that resend their whole history every turn
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Turn:
    new_tokens: int  # appended to the conversation so far (turn 1: the whole first context)
    output_tokens: int
    think_s: float  # before this turn is sent, after the previous one finished (a tool runs)


@dataclass(slots=True)
class TurnRecord:
    """One turn as it ran: which conversation, its prompt, what the prefix cache held, and
    the times of its tokens (seconds from the run's start)."""

    conversation: int
    turn: int
    outcome: Outcome
    cached_tokens: int = 0
    sent_s: float = 0.0
    token_times: list[float] = field(default_factory=list)


def agent_workload(
    conversations: int,
    turns: int,
    context: int,
    new_tokens: tuple[int, int],
    output_len: tuple[int, int],
    think_s: tuple[float, float],
    seed: int = 0,
) -> list[list[Turn]]:
    """Per conversation, its turns: the first sends `context` tokens, each later one appends
    the previous reply and new_tokens (a tool's result, a user's message) and is sent think_s
    after the previous reply ends. Conversations start staggered by one think time."""
    rng = random.Random(seed)
    out = []
    for _ in range(conversations):
        convo = [Turn(context, rng.randint(*output_len), rng.uniform(*think_s))]
        convo += [
            Turn(rng.randint(*new_tokens), rng.randint(*output_len), rng.uniform(*think_s))
            for _ in range(turns - 1)
        ]
        out.append(convo)
    return out


AGENT_SHAPE = ("conversations", "turns", "context", "new_tokens", "output_len", "think_s", "seed")


def agent_shape(args: argparse.Namespace) -> dict:
    """The agent workload's shape from the parsed flags: what a trace records (and the
    simulator replays through agent_workload_of)."""
    return {k: getattr(args, k) for k in AGENT_SHAPE}


def agent_workload_of(shape: dict) -> list[list[Turn]]:
    """agent_workload of a shape as agent_shape gives it, or as a trace's JSON holds it."""
    kw: dict[str, Any] = {
        k: tuple(shape[k]) if isinstance(shape[k], list) else shape[k] for k in AGENT_SHAPE
    }
    return agent_workload(**kw)


def agent_summary(records: list[TurnRecord], duration_s: float) -> dict:
    """The usual summary over every turn, plus: mean TTFT by turn, the prefix cache's hit rate
    by tokens, and the decode of other requests while a prompt prefills (mean gap between
    their tokens inside a prefill's window, over the mean gap outside every window)."""
    res = summary([r.outcome for r in records], duration_s)
    ok = [r for r in records if r.outcome.ok and r.outcome.ttft_s is not None]
    by_turn: dict[int, list[float]] = {}
    for r in ok:
        by_turn.setdefault(r.turn, []).append(r.outcome.ttft_s * 1e3)  # type: ignore[operator]
    res["mean_ttft_ms_by_turn"] = {t: statistics.fmean(v) for t, v in sorted(by_turn.items())}
    first = res["mean_ttft_ms_by_turn"].get(1)
    later = [x for t, v in by_turn.items() if t > 1 for x in v]
    res["later_over_first_ttft"] = (
        statistics.fmean(later) / first if first and later else float("nan")
    )
    prompt = sum(r.outcome.prompt_tokens for r in ok)
    res["prefix_hit_rate"] = sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0
    windows = [(r.sent_s, r.sent_s + r.outcome.ttft_s) for r in ok]  # type: ignore[operator]
    inside: list[float] = []
    outside: list[float] = []
    for i, r in enumerate(ok):
        for a, b in zip(r.token_times, r.token_times[1:]):
            during = any(lo < b and a < hi for j, (lo, hi) in enumerate(windows) if j != i)
            (inside if during else outside).append(b - a)
    res["itl_during_other_prefill_ms"] = statistics.fmean(inside) * 1e3 if inside else float("nan")
    res["itl_otherwise_ms"] = statistics.fmean(outside) * 1e3 if outside else float("nan")
    res["itl_during_prefill_ratio"] = (
        statistics.fmean(inside) / statistics.fmean(outside) if inside and outside else float("nan")
    )
    return res


def format_agent_summary(r: dict) -> str:
    lines = [format_summary(r).rsplit("\n", 1)[0]]
    lines.append("{s:{c}^50}".format(s="Agents", c="-"))
    for t, v in r["mean_ttft_ms_by_turn"].items():
        lines.append(f"{f'Mean TTFT, turn {t} (ms):':<40}{v:<10.2f}")
    lines.append(f"{'Later turns TTFT / turn 1:':<40}{r['later_over_first_ttft']:<10.3f}")
    lines.append(f"{'Prefix cache hit rate (tokens):':<40}{r['prefix_hit_rate']:<10.3f}")
    lines.append(
        f"{'ITL during others prefill (ms):':<40}{r['itl_during_other_prefill_ms']:<10.2f}"
    )
    lines.append(f"{'ITL otherwise (ms):':<40}{r['itl_otherwise_ms']:<10.2f}")
    lines.append(f"{'ITL during / otherwise:':<40}{r['itl_during_prefill_ratio']:<10.3f}")
    lines.append("=" * 50)
    return "\n".join(lines)
