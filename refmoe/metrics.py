"""Prometheus metrics of the server, labelled by model, in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)


class Metrics:
    def __init__(self, model: str):
        self.registry = r = CollectorRegistry()
        labels = {"model": model}

        def hist(name, doc):
            return Histogram(name, doc, ["model"], registry=r, buckets=LATENCY_BUCKETS).labels(
                **labels
            )

        def count(name, doc):
            return Counter(name, doc, ["model"], registry=r).labels(**labels)

        def gauge(name, doc):
            return Gauge(name, doc, ["model"], registry=r).labels(**labels)

        self.ttft = hist("refmoe_time_to_first_token_seconds", "Arrival to first generated token")
        self.itl = hist("refmoe_inter_token_latency_seconds", "Between consecutive tokens")
        self.e2e = hist("refmoe_e2e_request_latency_seconds", "Arrival to the last token")
        self.waiting = gauge("refmoe_num_requests_waiting", "Requests in the admission queue")
        self.running = gauge("refmoe_num_requests_running", "Requests prefilling or decoding")
        self.kv_usage = gauge("refmoe_kv_cache_usage_ratio", "Reserved share of the KV budget")
        self.prompt_tokens = count("refmoe_prompt_tokens", "Prompt tokens prefilled")
        self.generation_tokens = count("refmoe_generation_tokens", "Tokens generated")
        self.expert_seconds = count(
            "refmoe_cpu_expert_seconds", "Time in the CPU routed-expert kernels"
        )
        # the prefix cache, counted in tokens as vLLM counts its prefix_cache_queries / hits
        self.prefix_queries = count(
            "refmoe_prefix_cache_queries", "Prompt tokens looked up in the prefix cache"
        )
        self.prefix_hits = count(
            "refmoe_prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled)"
        )
        self.prefix_hit_rate = gauge(
            "refmoe_prefix_cache_hit_rate", "Prefix cache hits over queries, by tokens, since start"
        )
        self.prefix_bytes = gauge("refmoe_prefix_cache_bytes", "Host memory the prefix cache holds")
        self.requests = Counter(
            "refmoe_requests", "Requests by outcome", ["model", "outcome"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
