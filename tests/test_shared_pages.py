"""Copy-free prefix sharing (refmoe/models/pages.py): a prefix restored on the CPU is the
prefix cache's own pages mapped into the request's cache, read-only; two requests read the
same memory; the cache grows past it without copying it; a pinned block is never evicted or
rewritten and is evicted once nothing reads it; the KV budget leaves a shared prefix out; a
restore that cannot map copies instead. The logits oracle is a whole prefill."""

import gc
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch
from test_prefix_cache import LONG, mla  # noqa: F401 (fixture)
from test_slp import fp8_dir  # noqa: F401 (fixture)

from refmoe.models import pages
from refmoe.models.gqa import LayerCache
from refmoe.models.kv_cache import Growing, KVCache
from refmoe.prefix_cache import PrefixCache
from refmoe.scheduler import Entry, Scheduler

G, D = 2, 32  # key heads, head size: 32 positions of a head are one 4 KiB page (float32)


def gqa_cache(tokens: int, seed: int, layers: int = 2) -> KVCache:
    """A GQA-shaped cache ([g, S, d] keys and values per layer) of random entries."""
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache([LayerCache() for _ in range(layers)])
    cache.extend([[torch.randn(G, tokens, D, generator=gen) for _ in range(2)]] * layers)
    return cache


@pytest.mark.usefixtures("float32_tiles")
def test_a_restore_maps_the_cache_pages_into_each_request(mla):  # noqa: F811
    whole = mla.forward(torch.tensor(LONG), mla.new_cache())
    pc = PrefixCache(1 << 30)
    cache = mla.new_cache()
    mla.forward(torch.tensor(LONG[:70]), cache)
    assert pc.store(LONG[:70], cache) == 2
    assert pc.pool is not None and pc.pool.aliases
    readers = []
    for _ in range(2):
        hit = pc.match(LONG)
        assert pc.shared_tokens(hit) == 64
        fresh = mla.new_cache()
        pc.restore(hit, fresh)
        assert all(g.shared is not None and g.n == 64 for gs in fresh.parts() for g in gs)
        for a, b in zip(fresh.read(0, 64), cache.read(0, 64)):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        readers.append(fresh)
    # a restored cache counts only its own memory: the prefix is the prefix cache's
    parts = [g for gs in readers[0].parts() for g in gs]
    own = sum(g.buf.untyped_storage().nbytes() - g.shared.nbytes for g in parts)
    assert readers[0].nbytes() == own < cache.nbytes()
    # the same physical pages: a write to the pool (tests only) shows in both readers
    part = pc.pool.parts[1][0]
    block = pc.pool.view(0, part)
    before = block[5, 3].item()
    block[5, 3] = 1234.5
    assert [r.parts()[1][0].view()[5, 3].item() for r in readers] == [1234.5, 1234.5]
    block[5, 3] = before
    # past the first buffer (64 rows more than it holds): the prefix is mapped again, not
    # copied, and the rows of its own are carried over
    first = readers[0].parts()[1][0].buf
    rest = mla.forward(torch.tensor(LONG[64:]), readers[0])
    assert readers[0].parts()[1][0].buf.data_ptr() == first.data_ptr()  # still fits
    more = [(5 * i + 1) % 61 + 1 for i in range(200)]
    grown = mla.forward(torch.tensor(more), readers[0])
    assert readers[0].parts()[1][0].buf.data_ptr() != first.data_ptr()
    block[0, 0] = 77.0
    assert readers[0].parts()[1][0].view()[0, 0].item() == 77.0  # mapped, not a copy
    block[0, 0] = cache.read(0, 1)[1][0][0, 0]
    want = mla.forward(torch.tensor(LONG + more), mla.new_cache())
    tol = 1e-5 * want.abs().max()
    assert (rest - whole[64:]).abs().max() <= tol
    assert (grown - want[100:]).abs().max() <= tol


def test_the_shared_prefix_is_read_only():
    """A write into a mapped prefix faults (the pages are mapped read-only): a bug that wrote
    there would crash its test rather than change another request's cache."""
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        from test_shared_pages import gqa_cache
        from refmoe.prefix_cache import PrefixCache
        ids = list(range(1, 66))
        pc = PrefixCache(1 << 26)
        pc.store(ids, gqa_cache(65, 0))
        fresh = gqa_cache(0, 1)
        pc.restore(pc.match(ids), fresh)
        k = fresh.parts()[0][0].buf  # [g, 128, d]: 64 rows mapped, then its own
        k[1, 100, 0] = 1.0  # own memory: fine
        print("own ok", flush=True)
        k[0, 3, 0] = 1.0  # the prefix cache's page
        print("wrote a shared page", flush=True)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "own ok" in run.stdout and "wrote a shared page" not in run.stdout
    assert run.returncode != 0


def test_gqa_stripes_restore_and_grow_exactly():
    """[g, S, d] parts: a stripe per key head, each mapped; positions past the prefix
    append into the request's own memory."""
    ids = list(range(1, 200))
    src = gqa_cache(150, seed=3)
    pc = PrefixCache(1 << 26)
    assert pc.store(ids, src) == 4
    hit = pc.match(ids[:150])
    assert hit.tokens == 128 and pc.shared_tokens(hit) == 128
    fresh = KVCache([LayerCache() for _ in range(2)])
    pc.restore(hit, fresh)
    assert fresh.length == 128
    for a, b in zip(fresh.read(0, 128), src.read(0, 128)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    tail = src.read(128, 150)
    fresh.extend(tail)
    extra = [[torch.randn(G, 300, D) for _ in range(2)] for _ in range(2)]
    fresh.extend(extra)  # grows past its buffer: the prefix mapped again
    for layer in range(2):
        for j in range(2):
            got = fresh.parts()[layer][j].view()
            want = torch.cat([src.read(0, 150)[layer][j], extra[layer][j]], dim=1)
            assert torch.equal(got, want)


def test_pinned_blocks_stay_until_nothing_reads_them():
    ids_a, ids_b = list(range(1, 66)), list(range(100, 166))
    block = 2 * 2 * G * 32 * D * 4  # two layers' keys and values, 32 positions
    pc = PrefixCache(2 * block)  # room for two blocks
    assert pc.store(ids_a, gqa_cache(65, 0)) == 2
    reader = KVCache([LayerCache() for _ in range(2)])
    pc.restore(pc.match(ids_a + [0]), reader)
    # every block is pinned by the reader: b's cannot evict them
    assert pc.store(ids_b, gqa_cache(65, 1)) == 0
    assert pc.match(ids_a + [0]).tokens == 64
    a_rows = [t.clone() for t in reader.read(0, 64)[0]]
    del reader
    gc.collect()
    assert pc.store(ids_b, gqa_cache(65, 1)) == 2  # now a's blocks go, their slots reused
    assert pc.match(ids_a + [0]).tokens == 0 and pc.match(ids_b + [0]).tokens == 64
    assert sorted(b.slot for b in pc.blocks.values()) == [0, 1]
    assert pc.nbytes == 2 * block
    # a reader of a's blocks taken before they were evicted read them whole (checked above
    # by value; a's values are not b's)
    assert not torch.equal(a_rows[0], pc.match(ids_b + [0]).blocks[0].tensors[0][0])


def test_a_restore_that_cannot_map_copies(monkeypatch):
    ids = list(range(1, 66))
    src = gqa_cache(65, seed=4)
    pc = PrefixCache(1 << 26)
    pc.store(ids, src)

    def refuse(*args, **kwargs):
        raise OSError(12, "out of mappings")

    monkeypatch.setattr(pages.Pool, "mapped", refuse)
    fresh = KVCache([LayerCache() for _ in range(2)])
    pc.restore(pc.match(ids), fresh)
    assert fresh.length == 64
    assert all(g.shared is None for gs in fresh.parts() for g in gs)
    for a, b in zip(fresh.read(0, 64), src.read(0, 64)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_parts_whose_blocks_are_not_whole_pages_are_copied():
    """head size 16: 32 positions are 2 KiB, not a page: kept as the block's own tensors."""
    cache = KVCache([LayerCache()])
    cache.extend([[torch.randn(G, 40, 16) for _ in range(2)]])
    pc = PrefixCache(1 << 26)
    assert pc.store(list(range(40)), cache) == 1
    assert not pc.pool.aliases and pc.pool.block_bytes == 0
    hit = pc.match(list(range(41)))
    assert hit.tokens == 32 and pc.shared_tokens(hit) == 0
    fresh = KVCache([LayerCache()])
    pc.restore(hit, fresh)
    assert torch.equal(fresh.read(0, 32)[0][0], cache.read(0, 32)[0][0])


@dataclass(slots=True)
class Mixed:
    """A layer with a part whose blocks are pages ([g, S, 32]) and one whose are not: a row
    per 4 positions of 16 floats (512 bytes a block), as DeepSeek-V4's compressed parts."""

    k: Growing = field(default_factory=lambda: Growing(1))
    e: Growing = field(default_factory=lambda: Growing(0, 4))

    @property
    def length(self) -> int:
        return self.k.n


def test_a_cache_with_parts_of_both_kinds_maps_one_and_copies_the_other():
    gen = torch.Generator().manual_seed(5)
    src = KVCache([Mixed()])
    src.extend([[torch.randn(G, 70, D, generator=gen), torch.randn(70 // 4, 16, generator=gen)]])
    pc = PrefixCache(1 << 26)
    assert pc.store(list(range(70)), src) == 2
    k_bytes, e_bytes = G * D * 4, 16 * 4 / 4  # a position's
    assert pc.pool.mapped_share == pytest.approx(k_bytes / (k_bytes + e_bytes))
    hit = pc.match(list(range(71)))
    assert pc.shared_tokens(hit) == int(64 * pc.pool.mapped_share) < 64
    fresh = KVCache([Mixed()])
    pc.restore(hit, fresh)
    k, e = fresh.parts()[0]
    assert k.shared is not None and e.shared is None
    for a, b in zip(fresh.read(0, 64)[0], src.read(0, 64)[0]):
        assert torch.equal(a, b)


def test_the_kv_budget_leaves_a_shared_prefix_out():
    """A request reserves its prompt less what it shares, plus max_tokens: with 90 of 150
    tokens free, a 90-token prompt that shares 64 and asks for 20 is admitted (46 reserved),
    the same prompt copying its prefix waits."""
    for shared, admitted in ((64, True), (0, False)):
        found = {"a": (0, 0), "b": (64, shared)}
        s = Scheduler(kv_tokens=150, lookup=found.__getitem__)
        s.shares = True
        s.add(Entry("a", prompt_tokens=40, max_tokens=20, arrival=0.0))
        assert s.next_prefill() is not None and s.kv.used == 60
        s.add(Entry("b", prompt_tokens=90, max_tokens=20, arrival=0.0))
        plan = s.next_prefill()
        assert (plan is not None) == admitted
        if admitted:
            assert plan.cached == 64 and s.kv.used == 60 + 90 - 64 + 20
            s.finish("b")
        s.finish("a")
        assert s.kv.used == 0


def test_the_engine_reserves_what_a_turn_does_not_share(mla):  # noqa: F811
    """Turn 2 through the engine: its lookup says 64 tokens cached, all 64 mapped; its cache
    holds them shared; its output is a whole prefill's."""
    from test_engine import _run

    from refmoe.engine import Engine
    from refmoe.generate import generate

    engine = Engine(mla, prefill="cpu", prefix_cache_gib=0.25).start()
    found, restored = [], []
    lookup, restore = engine.scheduler.lookup, engine.prefix.restore

    def spy_lookup(rid):
        found.append(lookup(rid))
        return found[-1]

    def spy_restore(hit, cache, device="cpu"):
        restore(hit, cache, device)
        restored.append([g.shared is not None for gs in cache.parts() for g in gs])

    engine.scheduler.lookup = spy_lookup
    engine.prefix.restore = spy_restore
    try:
        out1, _, _ = _run(engine, [LONG[:60]], 8)
        turn2 = LONG[:60] + out1[0] + LONG[60:90]
        out2, ends2, _ = _run(engine, [turn2], 8)
        assert engine.scheduler.kv.used == 0
    finally:
        engine.shutdown(1)
    assert found == [(0, 0), (64, 64)]
    assert restored == [[True] * len(restored[0])] and restored[0]
    assert ends2[0]["usage"]["prompt_tokens_details"] == {"cached_tokens": 64}
    assert out2[0] == generate(mla, turn2, 8).token_ids


@pytest.mark.parametrize("n", [1, 3, 7])
def test_runs_group_consecutive_slots(n):
    slots = list(range(10, 10 + n)) + [40, 41, 3]
    assert pages._runs(slots) == [(0, 10, n), (n, 40, 2), (n + 2, 3, 1)]
