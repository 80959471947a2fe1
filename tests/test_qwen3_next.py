"""Qwen3-Next (Gated DeltaNet linear attention, gated full attention, (1 + w) norms, a
sigmoid-gated shared expert) against transformers: tiny random configs saved with
save_pretrained, logits within 1e-4 in one pass, token by token (the recurrent state carried)
and in chunks; 32 greedy tokens through `refmoe generate` with the CPU and SLP prefills; the
serving engine with a prefix cache of state snapshots for it (its state cannot be cut at a
prefix); a prompt refused across DSLP ranks; bad configs named."""

import json

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from conftest import assert_logits_match, cli_generate, hf_greedy, save_random

from refmoe import models, slp
from refmoe.config import ModelConfig
from refmoe.engine import Engine
from refmoe.models import qwen3_next

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    max_position_embeddings=256,
    eos_token_id=None,
)
VARIANTS = {
    "base": {},  # layers linear, linear, linear, full; 2 value heads per key head
    "mixed": dict(
        layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"],
        linear_num_value_heads=2,
        norm_topk_prob=False,
        num_experts_per_tok=3,
        partial_rotary_factor=0.5,
    ),
}
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 93]


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    cfg = transformers.Qwen3NextConfig(**{**BASE, **VARIANTS[request.param]})
    d = tmp_path_factory.mktemp(request.param)
    m = save_random(d, transformers.Qwen3NextForCausalLM, cfg, seed=3)
    return m, d


def test_logits_match_transformers(saved):
    m, d = saved
    cfg, mine = models.load(d)
    assert cfg.family == "qwen3_next" and "linear_attention" in cfg.layer_types
    assert_logits_match(m, mine, PROMPT, 1e-4)  # one pass, and token by token
    with torch.no_grad():
        ref = m(torch.tensor([PROMPT])).logits[0]
    cache = mine.new_cache()  # in chunks: the convolution and the state carried across
    out = torch.cat([mine.forward(torch.tensor(PROMPT[i : i + 4]), cache) for i in (0, 4, 8)])
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert cache.length == len(PROMPT) and not cache.positional
    # the fixed state a sequence keeps: conv inputs and the recurrent state, per linear layer
    linear = [b.attn for b in mine.blocks if isinstance(b.attn, qwen3_next.GatedDeltaNet)]
    c = linear[0]
    per = 4 * (c.channels * 3 + c.hv * c.dk * c.dv)
    assert mine.state_bytes() == per * len(linear)
    # no prefix can be cut out of it: its linear layers hold no entries per position
    assert [len(layer) for layer in cache.read(0, 4)] == [
        0 if isinstance(c, qwen3_next.LinearCache) else 2 for c in cache.layers
    ]
    with pytest.raises(ValueError, match="recurrent"):
        cache.extend(cache.read(0, 4))


def test_greedy_32_tokens_via_cli(saved):
    m, d = saved
    want = hf_greedy(m, PROMPT, 32)
    ids = ",".join(map(str, PROMPT))
    for prefill in ("cpu", "slp"):
        got = cli_generate(d, "--prompt-ids", ids, "--max-tokens", "32", "--prefill", prefill)
        assert got["token_ids"] == want, prefill


def test_slp_equals_cpu(saved):
    _, d = saved
    _, mine = models.load(d)
    plain = mine.forward(torch.tensor(PROMPT), mine.new_cache())
    runner = slp.StreamPrefill(mine, ring=2, chunk_tokens=4)
    out = runner.prefill(torch.tensor(PROMPT), mine.new_cache())
    assert (out[-1] - plain[-1]).abs().max() <= 1e-4 * plain.abs().max()


def test_engine_caches_snapshots_and_dslp_is_refused(saved):
    """The engine's prefix cache keeps state snapshots for it (tested in test_prefix_cache),
    and a prompt split across DSLP ranks is refused by the layer, naming why."""
    _, d = saved
    _, mine = models.load(d)
    eng = Engine(mine, prefix_cache_gib=1.0)
    assert eng.prefix is not None and eng.recurrent

    class Split:  # what a DSLP rank passes: its slice of a prompt
        offset = 0

    block = next(b for b in mine.blocks if isinstance(b.attn, qwen3_next.GatedDeltaNet))
    with pytest.raises(ValueError, match="DSLP"):
        block.attn(torch.zeros(2, 64), None, None, 1.0, block.attn.new_cache(), Split())


@pytest.mark.parametrize(
    "change, field",
    [
        ({"linear_num_key_heads": 3}, "linear_num_value_heads"),
        ({"linear_conv_kernel_dim": 0}, "linear_"),
        ({"layer_types": ["linear_attention"] * 3}, "layer_types"),
        ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ],
)
def test_bad_configs_named(change, field, tmp_path):
    d = transformers.Qwen3NextConfig(**BASE).to_dict()
    d.update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_file(tmp_path)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    t=st.integers(1, 150),
    heads=st.integers(1, 3),
    dk=st.sampled_from([4, 8, 16]),
    dv=st.sampled_from([4, 8]),
    chunk=st.sampled_from([1, 7, 16, 64]),
    decay_scale=st.sampled_from([0.01, 1.0, 20.0]),
    seed=st.integers(0, 2**16),
)
# found by CI: with the running log decay in float32, Gi - Gj over a chunk of strong decays
# lost ~1e-4 to rounding, and this case's outputs were 2.06e-5 off (worst of 300 random cases
# 1.2e-5); with it in float64, 9.4e-8 (worst of 2,000: 5.7e-7)
@hypothesis.example(t=64, heads=3, dk=4, dv=4, chunk=64, decay_scale=20.0, seed=0)
def test_chunked_delta_rule_matches_float64_recurrence(t, heads, dk, dv, chunk, decay_scale, seed):
    """The chunked form (prompts) against the token-by-token recurrence run in float64, from
    a nonzero state, over lengths that are and are not multiples of the chunk; decays from
    nearly none to nearly total: within 4e-6 of the largest output (float32 products and a
    float32 triangular solve; the decays themselves are formed in float64)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = qwen3_next.l2_normalize(rand(t, heads, dk)) * dk**-0.5
    k = qwen3_next.l2_normalize(rand(t, heads, dk))
    v = rand(t, heads, dv)
    beta = torch.rand(t, heads, generator=gen, dtype=torch.float64)
    g = -decay_scale * torch.rand(t, heads, generator=gen, dtype=torch.float64)
    s0 = rand(heads, dk, dv)
    want_out, want_s = qwen3_next.delta_rule_recurrent(q, k, v, beta, g, s0)
    f32 = [x.float() for x in (q, k, v, beta, g, s0)]
    out, s = qwen3_next.delta_rule_chunked(*f32, chunk=chunk)
    assert out.dtype == torch.float32 and out.shape == (t, heads, dv)
    scale = want_out.abs().max().item() + 1e-30
    assert (out.double() - want_out).abs().max().item() <= 4e-6 * max(scale, 1.0)
    assert (s.double() - want_s).abs().max().item() <= 4e-6 * max(want_s.abs().max().item(), 1.0)


@pytest.mark.parametrize("t, heads, dk, dv", [(1, 1, 4, 4), (3, 4, 16, 8), (5, 2, 8, 16)])
def test_recurrent_delta_rule_against_its_definition(t, heads, dk, dv):
    """The token-by-token rule (each head's products batched, the update in place on the
    decayed copy) against the rule written out head by head in float64 numpy; the state
    passed in is left as it was (a cache's snapshot may hold it)."""
    rng = np.random.default_rng(t * 100 + heads)
    q, k = rng.standard_normal((t, heads, dk)), rng.standard_normal((t, heads, dk))
    v, s0 = rng.standard_normal((t, heads, dv)), rng.standard_normal((heads, dk, dv))
    beta, g = rng.uniform(0, 1, (t, heads)), -rng.uniform(0, 2, (t, heads))
    want_s, want_out = s0.copy(), np.zeros((t, heads, dv))
    for i in range(t):
        for h in range(heads):
            st = want_s[h] * np.exp(g[i, h])
            u = (v[i, h] - st.T @ k[i, h]) * beta[i, h]
            want_s[h] = st + np.outer(k[i, h], u)
            want_out[i, h] = want_s[h].T @ q[i, h]
    args = [torch.from_numpy(a).float() for a in (q, k, v, beta, g, s0)]
    before = args[-1].clone()
    out, s = qwen3_next.delta_rule_recurrent(*args)
    assert torch.equal(args[-1], before)
    scale = max(np.abs(want_out).max(), 1.0)
    assert np.abs(out.double().numpy() - want_out).max() <= 1e-5 * scale
    assert np.abs(s.double().numpy() - want_s).max() <= 1e-5 * max(np.abs(want_s).max(), 1.0)


def test_prompt_takes_the_chunked_rule_and_decode_the_recurrent(saved, monkeypatch):
    """A long prompt runs the chunked form, a decode step the recurrence; both give
    transformers' logits (test_logits_match_transformers) and agree with each other here."""
    _, d = saved
    _, mine = models.load(d)
    calls = []
    for name in ("delta_rule_chunked", "delta_rule_recurrent"):
        real = getattr(qwen3_next, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls.append((_name, a[0].shape[0]))
            return _real(*a, **kw)

        monkeypatch.setattr(qwen3_next, name, spy)
    prompt = torch.tensor((PROMPT * 3)[:30])
    cache = mine.new_cache()
    mine.forward(prompt, cache)
    mine.forward(torch.tensor([4]), cache)
    assert ("delta_rule_chunked", 30) in calls and ("delta_rule_recurrent", 1) in calls
    assert not [c for c in calls if c[0] == "delta_rule_recurrent" and c[1] > 8]


def test_engine_budget_counts_the_fixed_state(saved):
    """The engine's KV budget holds each sequence's recurrent state as tokens' worth of its
    cache: a KV memory of 100 tokens plus one state admits one such request, not two."""
    from refmoe.policy import fixed_state_tokens

    _, d = saved
    _, mine = models.load(d)
    per, state = mine.kv_bytes_per_token(), mine.state_bytes()
    eng = Engine(mine, kv_memory=per * 100 + state)
    want = fixed_state_tokens(state, per)
    assert want > 0 and eng.scheduler.state_tokens == want
    assert eng.scheduler.kv.capacity == 100 + state // per
    with pytest.raises(ValueError, match="fixed state"):
        from refmoe.scheduler import Entry

        eng.scheduler.add(Entry("r", 90, 20, 0.0))
