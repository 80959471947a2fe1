"""Named workloads for `refmoe-sim compare` and `refmoe-sim advise`: what a user of a local
box sends it, as open-loop requests (refmoe.serving_metrics.workload) or, for agents, closed-
loop conversations (refmoe.serving_metrics.agent_workload). Each takes the same SLOs by
default: a first token within `slo_ttft_s` and `slo_tpot_s` per later token."""

from __future__ import annotations

from dataclasses import dataclass, replace

from refmoe.serving_metrics import agent_workload, workload


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    what: str
    num_prompts: int = 0  # open loop: requests (0 for agents)
    request_rate: float = 0.0  # req/s, Poisson
    prompt_len: tuple[int, int] = (0, 0)
    output_len: tuple[int, int] = (0, 0)
    # agents (closed loop): conversations x turns, the first turn's context, each later
    # turn's new tokens, think time between a reply and the next turn
    conversations: int = 0
    turns: int = 0
    context: int = 0
    new_tokens: tuple[int, int] = (0, 0)
    think_s: tuple[float, float] = (0.0, 0.0)
    slo_ttft_s: float = 30.0
    slo_tpot_s: float = 0.1
    seed: int = 0

    @property
    def agents(self) -> bool:
        return self.conversations > 0

    def requests(self) -> list[tuple[float, int, int]]:
        if self.agents:
            return []
        return workload(
            self.num_prompts, self.request_rate, self.prompt_len, self.output_len, self.seed
        )

    def conversation_turns(self) -> list:
        if not self.agents:
            return []
        return agent_workload(
            self.conversations,
            self.turns,
            self.context,
            self.new_tokens,
            self.output_len,
            self.think_s,
            self.seed,
        )

    def scaled(self, num_prompts: int | None = None, request_rate: float | None = None):
        """The same workload with another count (requests, or conversations for agents)
        or arrival rate."""
        kw: dict = {}
        if num_prompts is not None:
            kw["conversations" if self.agents else "num_prompts"] = num_prompts
        if request_rate is not None:
            if self.agents:
                raise ValueError(f"--workload {self.name}: agents have no request rate")
            kw["request_rate"] = request_rate
        return replace(self, **kw)


WORKLOADS = {
    "chat": Workload(
        "chat",
        "chat turns: prompts of 256-4,096 tokens, replies of 128-512, 0.05 req/s",
        num_prompts=48,
        request_rate=0.05,
        prompt_len=(256, 4096),
        output_len=(128, 512),
    ),
    "long-prompt": Workload(
        "long-prompt",
        "documents and codebases: prompts of 8K-32K tokens, replies of 64-256, 0.01 req/s",
        num_prompts=16,
        request_rate=0.01,
        prompt_len=(8192, 32768),
        output_len=(64, 256),
        slo_ttft_s=60.0,
    ),
    "mixed": Workload(
        "mixed",
        "short and long prompts together (256-16K tokens, replies of 128-512, 0.03 req/s): "
        "decode beside long prefills",
        num_prompts=48,
        request_rate=0.03,
        prompt_len=(256, 16384),
        output_len=(128, 512),
    ),
    "agent": Workload(
        "agent",
        "coding agents: 4 conversations of 4 turns from a 4K-token context, 200-400 new tokens "
        "and 64-256 output tokens a turn, 1-5 s between turns",
        conversations=4,
        turns=4,
        context=4096,
        new_tokens=(200, 400),
        output_len=(64, 256),
        think_s=(1.0, 5.0),
        slo_ttft_s=10.0,
        slo_tpot_s=1 / 15,
    ),
}


def get(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"--workload {name}: unknown (known: {', '.join(WORKLOADS)})")
    return WORKLOADS[name]
