"""Routing as the simulator sees it: how often each routed expert is picked, as groups of
(experts, probability a token picks each) (uniform, Zipf-skewed, or replayed from what the
engine recorded)."""

from __future__ import annotations

from refmoe.config import ModelConfig


def routing_bins(
    n_experts: int, k: int, skew: float = 0.0, bins: int = 16
) -> list[tuple[int, float]]:
    """The routing distribution as (experts, probability a token picks each of them) groups.
    skew 0: uniform, every expert k/E. skew s > 0: Zipf-like popularity, expert e weighted
    (e + 1)^-s, scaled so the probabilities sum to k and none exceeds 1 (a token picks k
    distinct experts), then grouped into `bins` groups of neighbours by popularity."""
    if skew < 0:
        raise ValueError(f"routing skew must be >= 0, got {skew}")
    if skew == 0:
        return [(n_experts, k / n_experts)]
    w = [(e + 1) ** -skew for e in range(n_experts)]
    capped: set[int] = set()
    while True:  # water-filling: the most popular are capped at 1, the rest share the rest
        free = [e for e in range(n_experts) if e not in capped]
        scale = (k - len(capped)) / sum(w[e] for e in free)
        over = {e for e in free if w[e] * scale > 1}
        if not over:
            break
        capped |= over
    return _neighbours([1.0 if e in capped else w[e] * scale for e in range(n_experts)], bins)


def _neighbours(p: list[float], bins: int) -> list[tuple[int, float]]:
    """Probabilities in popularity order as `bins` groups of neighbours: (size, mean)."""
    size = -(-len(p) // bins)
    return [
        (len(p[i : i + size]), sum(p[i : i + size]) / len(p[i : i + size]))
        for i in range(0, len(p), size)
    ]


def recorded_bins(
    popularity: dict, cfg: ModelConfig, source: str = "routing", bins: int = 16
) -> dict[int, list[tuple[int, float]]]:
    """Routing recorded by the engine (refmoe.routing.popularity: per layer, the probability a
    token picks each expert) as routing_bins groups per layer: the experts sorted by
    popularity, `bins` groups of neighbours, each at its mean probability."""
    out = {}
    for layer, p in sorted(popularity.items()):
        if len(p) != cfg.n_routed_experts or round(float(sum(p))) != cfg.num_experts_per_tok:
            raise ValueError(
                f"{source}: routing recorded over {len(p)} experts, top-"
                f"{round(float(sum(p)))}; the model routes to "
                f"{cfg.num_experts_per_tok} of {cfg.n_routed_experts}"
            )
        out[layer] = _neighbours(sorted((float(x) for x in p), reverse=True), bins)
    return out


def load_routing(path: str, cfg: ModelConfig) -> dict[int, list[tuple[int, float]]]:
    """A routing record (refmoe.routing) from its own JSON file or from the metadata of an
    engine trace that carries one, as recorded_bins groups per layer."""
    import json

    from refmoe import routing

    try:
        doc = json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read a routing record ({e})") from None
    if isinstance(doc, dict) and "metadata" in doc:
        if "routing" not in doc["metadata"]:
            raise ValueError(f"{path}: this trace carries no routing record")
        doc = doc["metadata"]["routing"]
    return recorded_bins(routing.popularity(doc, path), cfg, path)
