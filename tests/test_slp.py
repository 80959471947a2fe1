"""Stream-loading prefill against the plain prefill path: same logits (within the device's
precision) and same greedy tokens, for every ring size, mode and chunking; the lanes' order and
ring reuse read back from the trace; selective streaming; errors; the cost model.

Runs on the CPU everywhere (the ring in host memory, loader and unloader threads); the CUDA
cases run where a GPU is present."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import cli_generate, float32_tiles_only
from test_deepseek_v3 import random_model, write_fp8_checkpoint

from refmoe import models, slp
from refmoe.policy import EngineConfig
from refmoe.trace import Trace

# SLP and DSLP held to the CPU path at float32's tolerance: its GEMMs on the float32 tiles
pytestmark = pytest.mark.usefixtures("float32_tiles")

transformers = pytest.importorskip("transformers")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 93] * 5  # 55 tokens: every expert is hit
TOL = {"cpu": 1e-5, "cuda": 3e-2}  # x max |logit|; CUDA computes in bf16


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    write_fp8_checkpoint(random_model({}), d)
    return d


@pytest.fixture(scope="module")
def plain(fp8_dir):
    """Logits of the plain path (routed experts on the CPU kernels, float32 tiles)."""
    _, model = models.load(fp8_dir)
    with float32_tiles_only():
        return model.forward(torch.tensor(PROMPT), model.new_cache())


def _load(d, device):
    return models.load(d, device=device)[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "ring,mode,chunk",
    [(2, "prefetch", None), (3, "selective", None), (None, "auto", 16), (5, "prefetch", 7)],
)
def test_matches_plain_prefill(fp8_dir, plain, device, ring, mode, chunk):
    model = _load(fp8_dir, device)
    runner = slp.StreamPrefill(model, ring=ring, mode=mode, chunk_tokens=chunk)
    out = runner.prefill(torch.tensor(PROMPT), model.new_cache()).cpu()
    assert (out - plain).abs().max() <= TOL[device] * plain.abs().max()
    n_chunks = -(-len(PROMPT) // (chunk or 8192))
    assert runner.stats.chunks == n_chunks and runner.stats.experts_loaded > 0
    # prefetch streams every slot (8 routed + 1 shared) of both MoE layers, once per chunk
    if mode == "prefetch":
        assert runner.stats.experts_loaded == n_chunks * 2 * 9
        assert runner.stats.bytes_streamed == n_chunks * 2 * 9 * runner.layout.nbytes


def test_cache_carries_on_after_slp(fp8_dir, plain):
    """Decode after an SLP prefill (chunked) continues the same cache as the plain path."""
    model = _load(fp8_dir, "cpu")
    runner = slp.StreamPrefill(model, ring=2, chunk_tokens=20)
    cache = model.new_cache()
    runner.prefill(torch.tensor(PROMPT[:-1]), cache)
    last = model.forward(torch.tensor(PROMPT[-1:]), cache)[-1]
    assert cache.length == len(PROMPT)
    assert (last - plain[-1]).abs().max() <= 1e-5 * plain.abs().max()


def test_plain_path_reads_the_packed_copy(fp8_dir, plain):
    """Packing (what CUDA does, pinned) moves the experts into one buffer per layer; the CPU
    kernels then read it and give the same logits, bit for bit, and SLP streams from it."""
    model = _load(fp8_dir, "cpu")
    with pytest.raises(ValueError, match="not packed.*pack_model"):  # never behind its back
        slp.StreamPrefill(model, pin=True, ring=3)
    slp.pack_model(model, pin=False)  # as the loader does on CUDA (pinned there)
    runner = slp.StreamPrefill(model, pin=True, ring=3)
    moe = model.blocks[1].ffn
    assert moe.packed is not None and moe.experts.gate[0].base is not None
    assert torch.equal(model.forward(torch.tensor(PROMPT), model.new_cache()), plain)
    out = runner.prefill(torch.tensor(PROMPT), model.new_cache())
    assert (out - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_cpu_streams_from_the_mapped_checkpoint(fp8_dir):
    """On the CPU nothing is copied at load: the experts stay views of the mapped shard."""
    model = _load(fp8_dir, "cpu")
    before = model.blocks[1].ffn.experts.gate[0]
    slp.StreamPrefill(model)
    assert model.blocks[1].ffn.packed is None and model.blocks[1].ffn.experts.gate[0] is before
    assert not before.flags.writeable  # a read-only view of the mmap


def test_greedy_tokens_equal_via_cli(fp8_dir):
    ids = ",".join(map(str, PROMPT))
    cpu = cli_generate(fp8_dir, "--prompt-ids", ids, "--max-tokens", "12", "--prefill", "cpu")
    streamed = cli_generate(
        fp8_dir,
        "--prompt-ids",
        ids,
        "--max-tokens",
        "12",
        "--prefill",
        "slp",
        "--ring",
        "2",
        "--chunk-tokens",
        "16",
    )
    assert cpu["prefill"] == "cpu" and streamed["prefill"] == "slp"
    assert streamed["token_ids"] == cpu["token_ids"] and len(cpu["token_ids"]) == 12


def save_tiny_qwen3(d, seed: int) -> None:
    """A 2-layer Qwen3-MoE with 8 BF16 experts (top-2), random weights, saved to d."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=97,
        hidden_size=72,
        intermediate_size=96,
        moe_intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    transformers.Qwen3MoeForCausalLM(cfg).eval().save_pretrained(d)


def test_qwen3_bf16_experts(tmp_path):
    save_tiny_qwen3(tmp_path, seed=1)
    _, model = models.load(tmp_path)
    assert model.blocks[0].ffn.experts.fmt == "bf16"
    want = model.forward(torch.tensor(PROMPT), model.new_cache())
    runner = slp.StreamPrefill(model, ring=2)
    got = runner.prefill(torch.tensor(PROMPT), model.new_cache())
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert runner.layout.fmt == "bf16" and runner.stats.experts_loaded == 2 * 8


def _spans(trace: Trace) -> dict[str, dict[str, tuple[float, float]]]:
    """lane -> (layer, expert) key -> (start, end) in microseconds."""
    lanes = {
        e["tid"]: e["args"]["name"]
        for e in trace.events
        if e["ph"] == "M" and e["name"] == "thread_name"
    }
    out: dict = {}
    for e in trace.events:
        if e["ph"] == "X":
            key = re.search(r"L(\d+) E(\d+)", e["name"]).group(0)
            out.setdefault(lanes[e["tid"]], {})[key] = (e["ts"], e["ts"] + e["dur"])
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_lanes_order_and_ring_reuse(fp8_dir, device):
    """From the trace: expert j computes after its load, is added after its compute, and the
    load that reuses its slot (j + n) starts only after it computed."""
    model = _load(fp8_dir, device)
    trace = Trace()
    runner = slp.StreamPrefill(model, ring=2, mode="prefetch", trace=trace)
    runner.prefill(torch.tensor(PROMPT), model.new_cache())
    spans = _spans(trace)
    assert set(spans) == {"loader", "compute", "unloader"}
    order = [f"L{layer} E{e}" for layer in (1, 2) for e in range(9)]
    load, comp, add = spans["loader"], spans["compute"], spans["unloader"]
    assert list(load) == order and list(comp) == order and list(add) == order
    slack = 0.5 if device == "cpu" else 2.0  # microseconds: clock rounding, event resolution
    for j, key in enumerate(order):
        assert comp[key][0] >= load[key][1] - slack
        assert add[key][0] >= comp[key][1] - slack
        if j >= 2:
            assert load[key][0] >= comp[order[j - 2]][1] - slack
            assert comp[key][0] >= add[order[j - 2]][1] - slack  # output buffer j % 2
    doc = trace.to_json()
    json.dumps(doc)
    # the link's load as a counter track: the chunk's bytes over its time, then idle
    h2d = [e for e in doc["traceEvents"] if e["ph"] == "C" and e["name"] == "h2d GB/s"]
    assert len(h2d) == 2 and h2d[0]["args"]["gbps"] > 0 and h2d[1]["args"]["gbps"] == 0.0
    seconds = (h2d[1]["ts"] - h2d[0]["ts"]) / 1e6
    assert h2d[0]["args"]["gbps"] == pytest.approx(
        runner.stats.bytes_streamed / seconds / 1e9, rel=0.05
    )


def test_selective_streams_only_routed_experts(fp8_dir):
    model = _load(fp8_dir, "cpu")
    routed = []
    for block in model.blocks[1:]:
        gate = block.ffn.gate

        def recording(x, gate=gate):
            w, ids = type(gate).__call__(gate, x)
            routed.append(set(ids.reshape(-1).tolist()))
            return w, ids

        block.ffn.gate = recording
    runner = slp.StreamPrefill(model, ring=2, mode="auto")
    runner.prefill(torch.tensor(PROMPT[:2]), model.new_cache())
    assert runner.stats.mode == "selective"
    want = sum(len(r) + 1 for r in routed)  # routed experts plus the shared one per layer
    assert runner.stats.experts_loaded == want < 2 * 9


def test_int4_experts_are_refused(fp8_dir):
    _, model = models.load(fp8_dir, expert_dtype="int4")
    with pytest.raises(ValueError, match="int4"):
        slp.StreamPrefill(model)


def test_a_failing_lane_raises_and_ends(fp8_dir):
    model = _load(fp8_dir, "cpu")
    slp.pack_model(model, pin=False)
    runner = slp.StreamPrefill(model, ring=2, pin=True)
    moe = model.blocks[2].ffn
    moe.packed = moe.packed[:, :16]  # a slot's copy now fails on the loader thread
    with pytest.raises(RuntimeError, match="SLP"):
        runner.prefill(torch.tensor(PROMPT), model.new_cache())
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("slp-")]


def test_bad_arguments(fp8_dir):
    model = _load(fp8_dir, "cpu")
    with pytest.raises(ValueError, match="mode"):
        slp.StreamPrefill(model, mode="sometimes")
    with pytest.raises(ValueError, match="prefill must be"):  # the policy's own check
        EngineConfig(prefill="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            slp.StreamPrefill(model, device="cuda")


def test_ring_sizing():
    layout = slp.SlotLayout("fp8", (), 44 * 2**20)
    assert slp.ring_slots(layout, 257, 64 * 2**30, 2**30) == 2 * 257  # two layers fit
    assert slp.ring_slots(layout, 257, 10 * 2**30, 2**30) == (9 * 2**30) // (44 * 2**20)
    assert slp.ring_slots(layout, 257, 2**30, 2**30) == 2  # ping-pong at least


# ---------------------------------------------------------------------------------------------
# The cost model that picks the path (shared with the simulator)
# ---------------------------------------------------------------------------------------------


def test_scaled_mm_is_checked_per_weight_shape(monkeypatch):
    """The FP8 tensor-core path is used for a weight shape only once its first product agrees
    with the dequantized one; a shape torch refuses or gets wrong falls back to dequant alone."""
    mm = slp.Matmul(torch.device("cpu"), torch.float32)
    assert mm.kind == "dequant" and mm.used == "dequant"
    mm.kind, mm.why_not = "scaled_mm", ""  # as on a CUDA device with torch._scaled_mm
    calls = []

    def fake(x, w, scale, layout):
        calls.append((tuple(w.shape), layout))
        if w.shape[1] == 256:
            raise RuntimeError("Invalid scaling configuration.")
        exact = x.float() @ slp._block_dequant(w, scale, torch.float32).T
        return exact * (1.5 if layout == slp.Matmul.LAYOUTS[0] else 1.0)  # first one wrong

    monkeypatch.setattr(mm, "_scaled", fake)
    g = torch.Generator().manual_seed(0)
    for n, k in ((256, 256), (128, 384)):
        x = torch.randn(8, k, generator=g)
        w = (torch.randn(n, k, generator=g) * 0.1).to(torch.float8_e4m3fn)
        s = torch.rand(n // 128, k // 128, generator=g) + 0.5
        want = x @ slp._block_dequant(w, s, torch.float32).T
        for _ in range(2):
            assert torch.allclose(mm(x, w, s), want, rtol=1e-4, atol=1e-4)
    assert mm.layouts == {(256, 256): None, (128, 384): slp.Matmul.LAYOUTS[1]}
    assert mm.used == "scaled_mm (dequant for 256x256)" and "256x256" in mm.why_not
    assert calls.count(((128, 384), slp.Matmul.LAYOUTS[1])) == 2  # checked once, then used


def test_bf16_compute_lane_on_the_cpu(fp8_dir, plain, monkeypatch):
    """Where the CPU has bf16 dot products (AVX512_BF16, AMX) SLP on the CPU computes in bf16,
    as on CUDA (torch's bf16 matmul about 3x its float32 on a Zen 4), within CUDA's tolerance
    of the plain path; elsewhere float32; REFMOE_SLP_DTYPE forces either, and the cost model
    times the lane in the dtype it will run."""
    from refmoe.device_matmul import compute_dtype

    cpu = torch.device("cpu")
    monkeypatch.delenv("REFMOE_SLP_DTYPE")
    assert compute_dtype(cpu, {"avx2", "avx512f", "avx512_bf16"}) == torch.bfloat16
    assert compute_dtype(cpu, {"avx2", "amx_bf16"}) == torch.bfloat16
    assert compute_dtype(cpu, {"avx2", "fma", "avx512f"}) == torch.float32
    assert compute_dtype(torch.device("cuda"), set()) == torch.bfloat16
    monkeypatch.setenv("REFMOE_SLP_DTYPE", "fp16")
    with pytest.raises(ValueError, match="REFMOE_SLP_DTYPE"):
        compute_dtype(cpu, set())
    monkeypatch.setenv("REFMOE_SLP_DTYPE", "bf16")
    assert compute_dtype(cpu, {"avx2"}) == torch.bfloat16
    model = _load(fp8_dir, "cpu")
    runner = slp.StreamPrefill(model, ring=2, mode="prefetch")
    assert runner.dtype == torch.bfloat16
    out = runner.prefill(torch.tensor(PROMPT), model.new_cache())
    err = (out - plain).abs().max()
    assert 0 < err <= TOL["cuda"] * plain.abs().max()  # bf16: close, not equal
    monkeypatch.setenv("REFMOE_SLP_DTYPE", "f32")
    assert slp.StreamPrefill(model, ring=2).dtype == torch.float32


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_packing_keeps_every_expert_field(fmt):
    """The packed host copy differs from the experts it packs in where the bytes lie only: the
    activation (gpt-oss's clamped SwiGLU with its alpha and limit), the biases and the FP8
    block carry over, so the CPU kernels reading it compute what they computed before (packing
    once dropped them all: a gpt-oss model on CUDA ran SiLU without biases on the CPU)."""
    from refmoe import expert_store, kernels
    from refmoe.kernels import formats

    rng = np.random.default_rng(5)
    h, i, e = 64, 96, 3
    block = (1, formats.WHOLE)
    mats: dict = {"gate": [], "up": [], "down": []}
    scales: dict = {"gate": [], "up": [], "down": []}
    for kind, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
        for _ in range(e):
            w = rng.standard_normal(shape).astype(np.float32)
            c, s, _ = (
                (*formats.fp8_quantize(w, block), 1.0) if fmt == "fp8" else formats.encode(w, fmt)
            )
            mats[kind].append(c)
            scales[kind].append(s)
    experts = kernels.ExpertWeights(
        fmt,
        h,
        i,
        *(mats[k] for k in ("gate", "up", "down")),
        *(scales[k] for k in ("gate", "up", "down")),
        fp8_block=block if fmt == "fp8" else (128, 128),
        activation="swiglu_oai",
        alpha=1.5,
        limit=3.0,
        gate_bias=[rng.standard_normal(i).astype(np.float32) for _ in range(e)],
        up_bias=[rng.standard_normal(i).astype(np.float32) for _ in range(e)],
        down_bias=[rng.standard_normal(h).astype(np.float32) for _ in range(e)],
    )
    packed, _ = expert_store.pack_host(experts, pin=False)
    for f in ("activation", "alpha", "limit", "fp8_block", "group_size"):
        assert getattr(packed, f) == getattr(experts, f), f
    x = rng.standard_normal((4, h)).astype(np.float32)
    tok, exp = np.repeat(np.arange(4), 2), np.tile([0, 2], 4)
    rw = np.ones(8, np.float32)
    want = kernels.fused_moe(x, tok, exp, rw, experts)
    assert np.array_equal(kernels.fused_moe(x, tok, exp, rw, packed), want)
