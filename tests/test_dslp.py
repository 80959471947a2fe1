"""Distributed SLP with SmallEP: two real processes over torch.distributed (gloo on the CPU),
against the plain single-process prefill: the same logits at every position, the same greedy
tokens, each rank streaming only its half of the experts; for MLA and for GQA."""

import pytest
import torch
from test_slp import PROMPT, fp8_dir, plain, save_tiny_qwen3  # noqa: F401 (fixtures)

from refmoe import dslp, models
from refmoe.generate import generate

# SLP and DSLP held to the CPU path at float32's tolerance: its GEMMs on the float32 tiles
pytestmark = pytest.mark.usefixtures("float32_tiles")

transformers = pytest.importorskip("transformers")


def test_split_and_offsets():
    assert dslp.ContextParallel.split(55, 2) == [28, 27]
    assert dslp.ContextParallel.split(7, 3) == [3, 2, 2]
    assert dslp.ContextParallel([3, 2, 2], 2).offset == 5


def test_split_balances_causal_attention(fp8_dir):  # noqa: F811
    """With the model's config the slices are sized so that each rank's attention costs the
    same (the projections per token, plus the causal scores over every earlier key): on
    DeepSeek-V3 a fresh 32K prompt gives the first of two ranks two thirds of the tokens;
    after a long cached past, the slices come out nearly even. The test model's 55-token
    prompt is split unevenly too, which the prefill tests above then run through gloo."""
    from refmoe import costmodel
    from refmoe.config import ModelConfig
    from sim.paper import V3

    v3 = ModelConfig.from_dict(V3)
    weights = sum(n * k for n, k in costmodel.attention_shapes(v3))
    per_key = v3.num_attention_heads * costmodel.score_dims(v3)

    def cost(lo, size, past):  # in units of one attended key
        return sum(weights / per_key + past + p + 1 for p in range(lo, lo + size))

    for tokens, ranks, past in ((32768, 2, 0), (32768, 3, 0), (12232, 2, 32768), (1000, 4, 7)):
        sizes = costmodel.context_split(v3, tokens, ranks, past)
        assert sum(sizes) == tokens and len(sizes) == ranks
        assert sizes == sorted(sizes, reverse=True)  # later tokens are dearer
        costs = [cost(sum(sizes[:r]), sizes[r], past) for r in range(ranks)]
        one = weights / per_key + past + tokens  # the dearest single token
        assert max(costs) - min(costs) <= 2 * one  # each bound rounded to a token
    assert costmodel.context_split(v3, 32768, 2) == [22029, 10739]
    near = costmodel.context_split(v3, 12232, 2, 32768)
    assert abs(near[0] - near[1]) < 0.15 * 12232
    assert costmodel.context_split(v3, 2, 3).count(0) == 1  # fewer tokens than ranks
    with pytest.raises(ValueError, match="ranks"):
        costmodel.context_split(v3, 10, 0)
    _, model = models.load(fp8_dir)
    tiny = costmodel.context_split(model.cfg, len(PROMPT), 2)
    assert tiny[0] > tiny[1] and dslp.ContextParallel.split(len(PROMPT), 2, cfg=model.cfg) == tiny
    assert dslp.ContextParallel.split(len(PROMPT), 3, True, model.cfg) == [0] + tiny


@pytest.mark.parametrize(
    "name", ["deepseek-v4-flash", "gpt-oss-120b", "qwen3-next-80b-a3b", "deepseek-v3"]
)
def test_split_balances_each_kind_of_attention(name):
    """The slices balance what each token's attention costs in that family (keys_scored), the
    slices' costs within two of the dearest token's: V4's window and compressed entries cost
    nearly the same at any position, so a fresh 32K prompt splits nearly evenly there; where
    full-attention layers remain (dense MLA, gpt-oss's every other layer, Qwen3-Next's one in
    four) their causal scores still give the first rank more."""
    import numpy as np

    from refmoe import costmodel
    from sim import catalog

    cfg = catalog.load(name)
    a = sum(n * k for n, k in costmodel.attention_shapes(cfg)) / (
        cfg.num_attention_heads * costmodel.score_dims(cfg)
    )
    for tokens, ranks, past in ((32768, 2, 0), (32768, 3, 0), (4096, 2, 65536)):
        sizes = costmodel.context_split(cfg, tokens, ranks, past)
        assert sum(sizes) == tokens and len(sizes) == ranks
        cost = a + costmodel.keys_scored(cfg, past + np.arange(tokens))
        bounds = np.cumsum([0, *sizes])
        costs = [cost[lo:hi].sum() for lo, hi in zip(bounds, bounds[1:])]
        assert max(costs) - min(costs) <= 2 * cost.max()
    first = costmodel.context_split(cfg, 32768, 2)[0] / 32768
    if name == "deepseek-v4-flash":
        assert first < 0.56, first
    else:
        assert first > 0.6, first


@pytest.mark.parametrize("chunk", [None, 16])
def test_two_ranks_match_plain_prefill(fp8_dir, plain, chunk):  # noqa: F811
    _, model = models.load(fp8_dir)
    want = generate(model, PROMPT, 8).token_ids
    with dslp.Group.start(
        model, fp8_dir, world=2, threads_per_rank=1, ring=2, chunk_tokens=chunk
    ) as group:
        out = group.prefill(torch.tensor(PROMPT), model.new_cache(), all_logits=True)
        assert out.shape == plain.shape
        assert (out - plain).abs().max() <= 1e-5 * plain.abs().max()
        chunks = -(-len(PROMPT) // (chunk or 8192))
        # rank 0 owns the even expert slots: routed 0, 2, 4, 6 and the shared one (slot 8)
        assert group.stats.experts_loaded == chunks * 2 * 5
        got = generate(model, PROMPT, 8, prefill=group)
        assert got.token_ids == want


def test_two_ranks_gqa(tmp_path):
    save_tiny_qwen3(tmp_path, seed=2)
    _, model = models.load(tmp_path)
    want = model.forward(torch.tensor(PROMPT[:23]), model.new_cache())
    with dslp.Group.start(model, tmp_path, world=2, threads_per_rank=1) as group:
        cache = model.new_cache()
        last = group.prefill(torch.tensor(PROMPT[:23]), cache)
        assert cache.length == 23
        assert (last[-1] - want[-1]).abs().max() <= 1e-5 * want.abs().max()


def test_generate_cli_with_two_ranks(fp8_dir):  # noqa: F811
    from conftest import cli_generate

    ids = ",".join(map(str, PROMPT))
    plain_run = cli_generate(fp8_dir, "--prompt-ids", ids, "--max-tokens", "6", "--prefill", "cpu")
    # --prefill slp: with auto the cost model decides (test_policy.py), and on a CPU it keeps
    # this prompt on the CPU kernels
    dslp_run = cli_generate(
        fp8_dir, "--prompt-ids", ids, "--max-tokens", "6", "--ranks", "2", "--prefill", "slp"
    )
    assert dslp_run["prefill"] == "dslp"
    assert dslp_run["token_ids"] == plain_run["token_ids"]


def test_split_host_only():
    assert dslp.ContextParallel.split(55, 3, host_only=True) == [0, 28, 27]
    assert dslp.ContextParallel.split(5, 2, host_only=True) == [0, 5]


@pytest.mark.parametrize("world", [2, 3])
def test_host_only_prefill_leaves_rank0_idle(fp8_dir, plain, world):  # noqa: F811
    """Decode running on rank 0's device: the prefill runs on ranks 1..N-1 (with two ranks,
    plain SLP on the second device) and rank 0 only receives the cache; the logits and the
    greedy continuation are the plain path's, and rank 0 streams no expert."""
    _, model = models.load(fp8_dir)
    want = generate(model, PROMPT, 6).token_ids
    with dslp.Group.start(model, fp8_dir, world=world, threads_per_rank=1, ring=2) as group:
        cache = model.new_cache()
        out = group.prefill(torch.tensor(PROMPT), cache, all_logits=True, host_only=True)
        assert cache.length == len(PROMPT)
        assert (out - plain).abs().max() <= 1e-5 * plain.abs().max()
        assert group.stats.experts_loaded == 0
        last = group.prefill(torch.tensor(PROMPT), model.new_cache(), host_only=True)
        assert (last[-1] - plain[-1]).abs().max() <= 1e-5 * plain.abs().max()

        class HostOnly:
            trace = None

            def prefill(self, ids, c, all_logits=False):
                return group.prefill(ids, c, all_logits=all_logits, host_only=True)

        got = generate(model, PROMPT, 6, prefill=HostOnly())
        assert got.token_ids == want
        # the full group still works after host-only prefills
        full = group.prefill(torch.tensor(PROMPT), model.new_cache(), all_logits=True)
        assert (full - plain).abs().max() <= 1e-5 * plain.abs().max()
