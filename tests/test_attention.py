"""The attention every family's layers call (refmoe.models.layers.attend) against float64
numpy: grouped key/value heads (GQA), causal from any start, sliding windows, gpt-oss's sinks,
DSA's allowed keys, in blocks of any size; and a GQA layer hands it the cache's own tensors,
never a copy per query head (a decode step over 4K tokens of Qwen3-Next's demo layer was 3.4x
slower when it copied them)."""

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from test_slp import save_tiny_qwen3

from refmoe import models
from refmoe.models import gqa, layers
from refmoe.models.layers import attend


def naive(q, k, v, start, scale, window=0, sinks=None, allowed=None) -> np.ndarray:
    """Per query head and query, in float64: softmax over the keys it may see."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    n, t, _ = q.shape
    r = n // k.shape[0]
    out = np.zeros((n, t, v.shape[2]))
    for h in range(n):
        kh, vh = k[h // r], v[h // r]
        for i in range(t):
            pos = start + i
            seen = [
                j
                for j in range(k.shape[1])
                if j <= pos
                and (window == 0 or j > pos - window)
                and (allowed is None or allowed[i, j])
            ]
            logits = kh[seen] @ q[h, i] * scale
            extra = [] if sinks is None else [float(sinks[h])]
            top = max([*logits, *extra])
            w = np.exp(logits - top)
            denominator = w.sum() + sum(np.exp(e - top) for e in extra)
            out[h, i] = (w / denominator) @ vh[seen]
    return out


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    groups=st.sampled_from([(1, 1), (4, 4), (4, 2), (8, 2), (6, 1)]),  # (query heads, kv heads)
    t=st.integers(1, 9),
    past=st.integers(0, 12),
    window=st.sampled_from([0, 1, 3, 8]),
    sinks=st.booleans(),
    allow=st.booleans(),
    budget=st.sampled_from([1, 64, 1 << 30]),  # 1: one query a block
    seed=st.integers(0, 2**16),
)
def test_attend_matches_float64(groups, t, past, window, sinks, allow, budget, seed):
    n, g = groups
    rng = np.random.default_rng(seed)
    s = past + t
    q = rng.standard_normal((n, t, 8)).astype(np.float32)
    k = rng.standard_normal((g, s, 8)).astype(np.float32)
    v = rng.standard_normal((g, s, 5)).astype(np.float32)
    sink = rng.standard_normal(n).astype(np.float32) if sinks else None
    allowed = None
    if allow:  # the causal rule aside, each query sees some keys (always its own)
        allowed = rng.random((t, s)) < 0.6
        allowed[np.arange(t), past + np.arange(t)] = True
    got = attend(
        *(torch.from_numpy(x) for x in (q, k, v)),
        past,
        0.3,
        budget_bytes=budget,
        window=window,
        sinks=None if sink is None else torch.from_numpy(sink),
        allowed=None if allowed is None else torch.from_numpy(allowed),
    )
    want = naive(q, k, v, past, 0.3, window, sink, allowed)
    assert got.shape == want.shape
    assert np.abs(got.numpy() - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    groups=st.sampled_from([(4, 4), (8, 2), (6, 1)]),
    t=st.integers(layers.CPU_FLASH_MIN_TOKENS, layers.CPU_FLASH_MIN_TOKENS + 40),
    past=st.sampled_from([0, 1, 37]),
    dims=st.sampled_from([(8, 8), (12, 8)]),  # (query/key, value): MLA's value is narrower
    seed=st.integers(0, 2**16),
)
def test_cpu_flash_path_matches_float64(groups, t, past, dims, seed):
    """From CPU_FLASH_MIN_TOKENS queries on, attention on the CPU runs torch's flash kernel
    (causal from position 0, or masked after a cached past), within float32's tolerance of
    the float64 reference as the grouped product is."""
    n, g = groups
    d, dv = dims
    rng = np.random.default_rng(seed)
    s = past + t
    q = rng.standard_normal((n, t, d)).astype(np.float32)
    k = rng.standard_normal((g, s, d)).astype(np.float32)
    v = rng.standard_normal((g, s, dv)).astype(np.float32)
    calls = []
    fused = layers._fused_attention

    def spy(*args):
        out = fused(*args)
        calls.append(out is not None)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layers, "_fused_attention", spy)
        got = attend(*(torch.from_numpy(x) for x in (q, k, v)), past, 0.3)
    assert calls == [True]  # the flash kernel took it
    want = naive(q, k, v, past, 0.3)
    assert np.abs(got.numpy() - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_heads_that_do_not_group_are_refused():
    with pytest.raises(ValueError, match="query heads"):
        attend(torch.zeros(3, 1, 4), torch.zeros(2, 1, 4), torch.zeros(2, 1, 4), 0, 1.0)


def test_a_gqa_layer_attends_over_the_cache_itself(tmp_path, monkeypatch):
    """The keys and values attend() gets are the cache's own storage, with its g heads."""
    save_tiny_qwen3(tmp_path, seed=2)
    _, model = models.load(tmp_path)
    cache = model.new_cache()
    model.forward(torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]), cache)
    seen = []

    def spy(q, k, v, *args, **kw):
        seen.append((q.shape[0], k, v))
        return attend(q, k, v, *args, **kw)

    monkeypatch.setattr(gqa, "attend", spy)
    model.forward(torch.tensor([5]), cache)
    assert len(seen) == len(model.blocks)
    for layer, (n, k, v) in zip(cache.layers, seen):
        assert k.shape[0] == v.shape[0] == 2 and n == 4
        assert k.data_ptr() == layer.k.buf.data_ptr() and v.data_ptr() == layer.v.buf.data_ptr()


def _linear(n: int, k: int, rng, fp8: bool) -> layers.Linear:
    """A projection as the loader makes one: FP8 codes and scales, or a float32 weight."""
    lin = layers.Linear.__new__(layers.Linear)
    lin.n, lin.k, lin.block = n, k, (128, 128)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if fp8:
        from refmoe.kernels import formats

        lin.weight = None
        lin.codes, lin.scale = formats.fp8_quantize(w, lin.block)
    else:
        lin.weight, lin.codes, lin.scale = torch.from_numpy(w), None, None
    return lin


@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_project_equals_each_projection(lead):
    """layers.project (the attention projections of one input in one kernel call): every
    output bit for bit the projection's own call, FP8 and float32 weights mixed, any leading
    shape; an input without tokens gives empty outputs."""
    rng = np.random.default_rng(0)
    lins = [_linear(n, 200, rng, fp8) for n, fp8 in ((300, True), (64, False), (129, True))]
    x = torch.randn(*lead, 200)
    for lin, y in zip(lins, layers.project(x, lins)):
        assert y.shape == (*lead, lin.n) and torch.equal(y, lin(x))
    empty = layers.project(torch.zeros(0, 200), lins)
    assert [tuple(y.shape) for y in empty] == [(0, 300), (0, 64), (0, 129)]
    with pytest.raises(ValueError, match="every weight must take 200 inputs"):
        layers.project(x, [*lins, _linear(8, 100, rng, True)])
