"""Distributed SLP with SmallEP: two real processes over torch.distributed (gloo on the CPU),
against the plain single-process prefill: the same logits at every position, the same greedy
tokens, each rank streaming only its half of the experts; for MLA and for GQA."""

import pytest
import torch

from refmoe import dslp, models
from refmoe.generate import generate
from test_slp import PROMPT, fp8_dir, plain, save_tiny_qwen3  # noqa: F401 (fixtures)

transformers = pytest.importorskip("transformers")


def test_split_and_offsets():
    assert dslp.ContextParallel.split(55, 2) == [28, 27]
    assert dslp.ContextParallel.split(7, 3) == [3, 2, 2]
    assert dslp.ContextParallel([3, 2, 2], 2).offset == 5


@pytest.mark.parametrize("chunk", [None, 16])
def test_two_ranks_match_plain_prefill(fp8_dir, plain, chunk):  # noqa: F811
    _, model = models.load(fp8_dir)
    want = generate(model, PROMPT, 8).token_ids
    with dslp.Group.start(model, fp8_dir, world=2, threads_per_rank=1, ring=2,
                          chunk_tokens=chunk) as group:
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
    plain_run = cli_generate(fp8_dir, "--prompt-ids", ids, "--max-tokens", "6", "--prefill",
                             "cpu")
    dslp_run = cli_generate(fp8_dir, "--prompt-ids", ids, "--max-tokens", "6", "--ranks", "2")
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

            def prefill(self, ids, c):
                return group.prefill(ids, c, host_only=True)

        got = generate(model, PROMPT, 6, prefill=HostOnly())
        assert got.token_ids == want
        # the full group still works after host-only prefills
        full = group.prefill(torch.tensor(PROMPT), model.new_cache(), all_logits=True)
        assert (full - plain).abs().max() <= 1e-5 * plain.abs().max()
