"""The prefix cache (refmoe/prefix_cache.py): a restored prefix plus the new tokens gives the
logits a whole prefill gives (MLA and GQA caches, and a hybrid linear-attention cache restored
from state snapshots, taken on the CPU and SLP paths); blocks are shared, evicted least
recently used leaves first within the budget, and a hit survives the eviction of its blocks;
in the engine, a request that starts with a cached prefix runs only its new tokens, reports
them as cached_tokens, and generates what it would have without the cache, under cancels and
evictions, for the hybrid model too."""

import random
import threading

import pytest
import torch
from conftest import save_random
from test_engine import _run
from test_qwen3_next import BASE as QWEN3_NEXT
from test_slp import fp8_dir, save_tiny_qwen3  # noqa: F401 (fixture)

from refmoe import models, slp
from refmoe.engine import Engine
from refmoe.generate import generate
from refmoe.metrics import Metrics
from refmoe.prefix_cache import PrefixCache
from refmoe.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

LONG = [(7 * i + 3) % 61 + 1 for i in range(100)]  # 100 tokens: three 32-token blocks


@pytest.fixture(scope="module")
def mla(fp8_dir):  # noqa: F811
    return models.load(fp8_dir)[1]


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen")
    save_tiny_qwen3(d, seed=1)
    return models.load(d)[1]


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """Qwen3-Next: three Gated DeltaNet layers, then one of full attention."""
    d = tmp_path_factory.mktemp("qwen3_next")
    save_random(d, transformers.Qwen3NextForCausalLM, transformers.Qwen3NextConfig(**QWEN3_NEXT), 5)
    return models.load(d)[1]


@pytest.mark.parametrize("family", ["mla", "gqa"])
@pytest.mark.usefixtures("float32_tiles")
def test_restored_prefix_gives_the_whole_prefill_logits(family, request):
    model = request.getfixturevalue(family)
    whole = model.forward(torch.tensor(LONG), model.new_cache())
    pc = PrefixCache(1 << 30)
    cache = model.new_cache()
    model.forward(torch.tensor(LONG[:70]), cache)
    assert pc.store(LONG[:70], cache) == 2  # two full blocks of 32; the 6 left over are not
    hit = pc.match(LONG)
    assert hit.tokens == 64 and len(hit.blocks) == 2
    fresh = model.new_cache()
    pc.restore(hit, fresh)
    assert fresh.length == 64
    rest = model.forward(torch.tensor(LONG[64:]), fresh)
    tol = 1e-5 * whole.abs().max()
    assert (rest - whole[64:]).abs().max() <= tol
    # the restored positions are the stored ones, bit for bit
    for a, b in zip(fresh.read(0, 64), cache.read(0, 64)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_match_leaves_a_token_to_run_and_checks_tokens(mla):
    pc = PrefixCache(1 << 30, block_tokens=4)
    cache = mla.new_cache()
    mla.forward(torch.tensor(LONG[:8]), cache)
    assert pc.store(LONG[:8], cache) == 2
    assert pc.match(LONG[:8]).tokens == 4  # all 8 cached, but the last token must run
    assert pc.match(LONG[:9]).tokens == 8
    assert pc.match([LONG[0] + 1] + LONG[1:9]).tokens == 0  # a different first block
    assert pc.store(LONG[:8], cache) == 0  # already there: touched, not copied
    s = pc.stats
    assert s.queries == 8 + 9 + 9 and s.hits == 12 and s.hit_rate == pytest.approx(12 / 26)


def test_eviction_is_lru_leaves_first_within_the_budget(mla):
    cache = mla.new_cache()
    mla.forward(torch.tensor(LONG[:64]), cache)
    probe = PrefixCache(1 << 30, block_tokens=8)
    probe.store(LONG[:8], cache)
    per = probe.nbytes  # one block
    pc = PrefixCache(5 * per, block_tokens=8)
    assert pc.store(LONG[:32], cache) == 4  # chain A: blocks a0..a3
    held = pc.match(LONG[:33])  # a hit on all four, held by a "request"
    assert held.tokens == 32
    other = [LONG[0] + 1] + LONG[1:24]
    ocache = mla.new_cache()
    mla.forward(torch.tensor(other), ocache)
    pc.store(other, ocache)  # chain B, three blocks: two of A's must go, leaves first
    assert pc.nbytes <= 5 * per and len(pc) == 5
    assert pc.match(LONG[:33]).tokens == 16  # a0, a1 kept (a2, a3 were the LRU leaves)
    assert pc.stats.evicted_blocks == 2
    # the held hit is whole: its evicted blocks are still its own
    fresh = mla.new_cache()
    pc.restore(held, fresh)
    for a, b in zip(fresh.read(0, 32), cache.read(0, 32)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(-1)


def test_engine_reuses_a_cached_prefix(mla):
    """Turn 2 of a conversation: turn 1's prompt and reply, then new tokens. Its prefill runs
    only the new tokens; its output is what a whole prefill gives."""
    metrics = Metrics("tiny")
    engine = Engine(mla, prefill="cpu", metrics=metrics, prefix_cache_gib=0.5).start()
    try:
        out1, ends1, _ = _run(engine, [LONG[:60]], 8)
        assert ends1[0]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        turn2 = LONG[:60] + out1[0] + LONG[60:90]
        out2, ends2, _ = _run(engine, [turn2], 8)
        cached = ends2[0]["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == 64  # 60 + 8 tokens cached; two full 32-token blocks
        assert out2[0] == generate(mla, turn2, 8).token_ids
        assert engine.prefix.stats.hits == 64
        text = metrics.render().decode()
        assert "refmoe_prefix_cache_hits_total" in text and "refmoe_prefix_cache_bytes" in text
        assert 'refmoe_prompt_tokens_total{model="tiny"} ' + str(60.0 + len(turn2) - 64) in text
    finally:
        engine.shutdown(1)
    off = Engine(mla, prefill="cpu", prefix_cache_gib=0)
    assert off.prefix is None


@pytest.mark.parametrize("family", ["mla", "hybrid"])
def test_cancels_and_evictions_never_corrupt_a_request(family, request):
    """Many requests sharing prefixes through a cache too small to keep them all, a third of
    them cancelled at random moments: every one that finishes has the tokens a lone request
    gets, and the KV budget returns to zero."""
    mla = request.getfixturevalue(family)
    rng = random.Random(0)
    bases = [LONG[:64], [5] + LONG[1:64], LONG[:32] + [9] * 32]
    prompts = [rng.choice(bases) + [rng.randrange(1, 60) for _ in range(rng.randrange(1, 9))]]
    prompts += [rng.choice(bases) + [rng.randrange(1, 60) for _ in range(4)] for _ in range(11)]
    want = {i: generate(mla, p, 4).token_ids for i, p in enumerate(prompts)}
    engine = Engine(mla, prefill="cpu", max_batch=4, prefix_cache_gib=0.0002).start()
    assert engine.prefix is not None and engine.prefix.capacity < 2**30
    got, done, cancelled = {}, {}, set()
    try:
        reqs = {}
        for i, p in enumerate(prompts):
            done[i] = threading.Event()

            def sink(ev, i=i):
                if ev["type"] == "token":
                    got.setdefault(i, []).extend(ev["token_ids"])
                else:
                    done[i].set()

            reqs[i] = engine.submit(p, 4, SamplingParams(), sink)
            if rng.random() < 0.33:
                engine.cancel(reqs[i].id)
                cancelled.add(i)
        for i in done:
            if i not in cancelled:
                assert done[i].wait(120)
        deadline = threading.Event()
        for _ in range(200):
            if not engine.requests:
                break
            deadline.wait(0.05)
    finally:
        engine.shutdown(1)
    finished = [i for i in done if i not in cancelled]
    assert finished and all(got[i] == want[i] for i in finished)
    assert engine.kv_usage == 0
    assert engine.prefix.nbytes <= engine.prefix.capacity and engine.prefix.stats.hits > 0


def test_snapshots_restore_a_hybrid_model_exactly(hybrid):
    """Linear attention keeps no prefix; snapshots of its state at marked positions, with
    the full layers' blocks before them, restore it: a restored prefix plus the rest gives the
    whole prefill's logits, on the path that took them (CPU or SLP) and in chunks."""
    whole = hybrid.forward(torch.tensor(LONG), hybrid.new_cache())
    tol = 1e-4 * whole.abs().max()  # a prompt cut elsewhere sums in another order (float32)
    pc = PrefixCache(1 << 30, block_tokens=32, snapshot_every=32)
    assert pc.marks(80, 0) == [32, 64, 79] and pc.marks(80, 40) == [64, 79]
    cache = hybrid.new_cache()
    cache.mark([40, 70])
    hybrid.forward(torch.tensor(LONG[:70]), cache)
    # a block, a snapshot at 40 (8 tokens past it), the next block, a snapshot at 70
    assert pc.store(LONG[:70], cache) == 4 and pc.stats.stored_snapshots == 2
    assert cache.snapshots() == {}  # taken
    with pytest.raises(ValueError, match="recurrent"):
        cache.extend(cache.read(0, 4))
    for ids, end in [(LONG, 70), (LONG[:60], 40), (LONG[:41], 40), (LONG[:40], 0)]:
        assert pc.match(ids, recurrent=True).tokens == end
    assert pc.match(LONG).tokens == 64  # the positional view: two blocks, no state
    with pytest.raises(ValueError, match="snapshot"):
        pc.restore(pc.match(LONG), hybrid.new_cache())
    went_on = hybrid.forward(torch.tensor(LONG[70:]), cache)  # the cache that took them
    for ids, end in [(LONG, 70), (LONG[:60], 40)]:
        fresh = hybrid.new_cache()
        pc.restore(pc.match(ids, recurrent=True), fresh)
        assert fresh.length == end
        rest = hybrid.forward(torch.tensor(LONG[end:]), fresh)
        assert (rest - whole[end:]).abs().max() <= tol, end
        if end == 70:  # restored bit for bit
            assert torch.equal(rest, went_on)
    # the SLP path and a chunked prompt take the same snapshots as one CPU pass
    marks = [8, 33, 50]
    plain = hybrid.new_cache()
    plain.mark(marks)
    hybrid.forward(torch.tensor(LONG[:60]), plain)
    streamed = hybrid.new_cache()
    streamed.mark(marks)
    slp.StreamPrefill(hybrid, ring=2, chunk_tokens=16).prefill(torch.tensor(LONG[:60]), streamed)
    chunked = hybrid.new_cache()
    chunked.mark(marks)
    for lo in range(0, 60, 7):
        hybrid.forward(torch.tensor(LONG[lo : min(lo + 7, 60)]), chunked)
    want = plain.snapshots()
    assert sorted(want) == marks
    for other in (streamed.snapshots(), chunked.snapshots()):
        assert sorted(other) == marks
        for p in marks:
            for (c1, s1), (c2, s2) in zip(want[p], other[p]):
                for a, b in ((c1, c2), (s1, s2)):  # the layers below summed in other orders
                    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_snapshots_evict_as_leaves_and_count_their_state(hybrid):
    """A snapshot's bytes are its state's plus its tail's entries; snapshots are leaves,
    evicted least recently used first, and the index of them follows."""
    caches = {}
    for p in (10, 20, 40):
        c = caches[p] = hybrid.new_cache()
        c.mark([p])
        hybrid.forward(torch.tensor(LONG[: p + 1]), c)
    state = hybrid.state_bytes()
    full = PrefixCache(1 << 30, block_tokens=32)
    sizes = []
    for c in caches.values():
        before = full.nbytes
        full.store(LONG, c)
        sizes.append(full.nbytes - before)
    per_token = (sizes[1] - sizes[0]) // 10  # the full layer's k and v
    assert sizes[0] == state + 10 * per_token and sizes[2] == state + 40 * per_token
    pc = PrefixCache(full.nbytes - 1, block_tokens=32)  # all but one byte of the three
    for p in (10, 20, 40):
        c = hybrid.new_cache()
        c.mark([p])
        hybrid.forward(torch.tensor(LONG[: p + 1]), c)
        assert pc.store(LONG, c) >= 1
    assert pc.nbytes <= pc.capacity and pc.stats.evicted_blocks == 1
    assert pc.match(LONG[:15], recurrent=True).tokens == 0  # the one at 10 went first
    assert pc.match(LONG[:25], recurrent=True).tokens == 20
    assert pc.match(LONG[:50], recurrent=True).tokens == 40
    held = {k for keys in pc.snaps.values() for k in keys}
    assert held == {k for k, b in pc.blocks.items() if b.states is not None} and len(held) == 2


def agent_turns_reuse_snapshots(model) -> None:
    """An agent's turn 2 restores turn 1's state where turn 1 ended; the same prompt again
    restores it at its last token but one; the tokens are what a whole prefill gives."""
    engine = Engine(model, prefill="cpu", prefix_cache_gib=0.5).start()
    try:
        assert engine.prefix is not None and engine.recurrent
        out1, ends1, _ = _run(engine, [LONG[:60]], 8)
        assert out1[0] == generate(model, LONG[:60], 8).token_ids
        turn2 = LONG[:60] + out1[0] + LONG[60:90]
        out2, ends2, _ = _run(engine, [turn2], 8)
        assert ends2[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == 60 + 8 - 1
        assert out2[0] == generate(model, turn2, 8).token_ids
        again, ends3, _ = _run(engine, [turn2], 8)
        assert ends3[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == len(turn2) - 1
        assert again[0] == out2[0]
    finally:
        engine.shutdown(1)


def test_engine_reuses_a_hybrid_models_snapshots(hybrid):
    agent_turns_reuse_snapshots(hybrid)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """gpt-oss: full attention, a sliding window of 2, full attention (test_families' tiny
    config, the window narrower than every prompt here)."""
    from test_families import build

    d = tmp_path_factory.mktemp("gpt_oss")
    build("gpt_oss", "full_first").save_pretrained(d)
    return models.load(d)[1]


def test_a_cache_counts_the_memory_it_holds():
    """KVCache.nbytes: a growing buffer's whole capacity, each storage once (a window and a
    snapshot view of it are one storage), snapshots not taken yet included."""
    from refmoe.models import gqa
    from refmoe.models.kv_cache import KVCache

    full, window = gqa.LayerCache(), gqa.WindowCache(keep=4)
    full.k.append(torch.zeros(2, 5, 8))
    full.v.append(torch.zeros(2, 5, 8))
    window.set(5, torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))
    cache = KVCache([full, window])
    grown = 2 * (2 * 64 * 8 * 4)  # k and v: capacity max(2 x 5, 64) positions
    assert cache.nbytes() == grown + 2 * (2 * 4 * 8 * 4)
    window.snaps[5] = (window.k, window.v[:, :2])  # the same storages
    assert cache.nbytes() == grown + 2 * (2 * 4 * 8 * 4)
    window.snaps[3] = (torch.zeros(2, 3, 8), torch.zeros(2, 3, 8))
    assert cache.nbytes() == grown + 2 * (2 * 4 * 8 * 4) + 2 * (2 * 3 * 8 * 4)


def test_sliding_layers_keep_their_window_only(windowed):
    """A sliding layer's cache holds its last `window` positions, whatever the length: the
    KV budget counts the full layers per token and the windows as fixed state; chunked and
    token-by-token prefill give the whole prefill's logits."""
    from refmoe.models.gqa import WindowCache

    whole = windowed.forward(torch.tensor(LONG), (cache := windowed.new_cache()))
    windows = [c for c in cache.layers if isinstance(c, WindowCache)]
    assert len(windows) == 1 and windows[0].k.shape[1] == windows[0].keep == 2
    assert windows[0].length == cache.length == len(LONG)
    full = [b.attn for b in windowed.blocks if b.attn.window == 0]
    assert windowed.kv_bytes_per_token() == sum(a.cache_bytes_per_token() for a in full) > 0
    assert windowed.state_bytes() == 2 * 4 * windowed.cfg.num_key_value_heads * 2 * (
        windowed.cfg.head_dim
    )
    tol = 1e-4 * whole.abs().max()
    for step in (1, 3, 7):
        c = windowed.new_cache()
        parts = [windowed.forward(torch.tensor(LONG[i : i + step]), c) for i in range(0, 100, step)]
        assert (torch.cat(parts) - whole).abs().max() <= tol, step


def test_window_snapshots_restore_exactly_and_the_engine_reuses_them(windowed):
    """The prefix cache keeps a sliding layer's window as a snapshot (a linear-attention
    layer's way): a restored prefix plus the rest gives the whole prefill's logits, bit for bit
    the cache that ran on; the engine's next turn restores it and generates what a whole
    prefill gives."""
    whole = windowed.forward(torch.tensor(LONG), windowed.new_cache())
    pc = PrefixCache(1 << 30, block_tokens=32, snapshot_every=32)
    cache = windowed.new_cache()
    cache.mark([40, 70])
    windowed.forward(torch.tensor(LONG[:70]), cache)
    assert pc.store(LONG[:70], cache) == 4 and pc.stats.stored_snapshots == 2
    went_on = windowed.forward(torch.tensor(LONG[70:]), cache)
    for ids, end in [(LONG, 70), (LONG[:60], 40)]:
        fresh = windowed.new_cache()
        pc.restore(pc.match(ids, recurrent=True), fresh)
        assert fresh.length == end
        rest = windowed.forward(torch.tensor(LONG[end:]), fresh)
        assert (rest - whole[end:]).abs().max() <= 1e-4 * whole.abs().max(), end
        if end == 70:
            assert torch.equal(rest, went_on)
    agent_turns_reuse_snapshots(windowed)
