"""Qwen3-MoE end to end against transformers: logits and 32 greedy tokens."""

import pytest
import torch
from conftest import (
    assert_cache_bytes,
    assert_logits_match,
    cli_generate,
    hf_greedy,
    save_random,
)

from refmoe import models

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=97,
    hidden_size=72,
    intermediate_size=96,
    moe_intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    eos_token_id=None,
)
VARIANTS = {
    "norm_topk": dict(norm_topk_prob=True),
    "raw_topk_tied": dict(
        norm_topk_prob=False, num_experts_per_tok=3, tie_word_embeddings=True, num_key_value_heads=4
    ),
}
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 93]


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    cfg = transformers.Qwen3MoeConfig(**{**BASE, **VARIANTS[request.param]})
    d = tmp_path_factory.mktemp(request.param)
    m = save_random(d, transformers.Qwen3MoeForCausalLM, cfg, seed=1)
    return m, d


def test_logits_match_transformers(saved):
    m, d = saved
    cfg, mine = models.load(d)
    assert cfg.family == "qwen3_moe" and cfg.scoring_func == "softmax"
    assert_logits_match(m, mine, PROMPT, 1e-4)
    # the KV budget's unit: keys and values of every KV head, float32, every layer
    cache = mine.new_cache()
    mine.forward(torch.tensor(PROMPT), cache)
    assert_cache_bytes(mine, cache, len(PROMPT))


def test_greedy_32_tokens_via_cli(saved):
    m, d = saved
    want = hf_greedy(m, PROMPT, 32)
    got = cli_generate(d, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", "32")
    assert len(want) == 32 and got["token_ids"] == want
