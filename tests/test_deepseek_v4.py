"""DeepSeek-V4 end to end against transformers' DeepseekV4ForCausalLM (the oracle): tiny random
configs with every attention kind (sliding only, CSA with its indexer, HCA), hash-routed and
learned MoE layers, hyper-connections of 2 and 3 streams, the compressed rope with and
without YaRN, saved with save_pretrained (which writes DeepSeek's release names), loaded by
refmoe, compared on logits (one prefill, token by token, in chunks) and 32 greedy tokens
through `refmoe generate`.

The indexer's top-k meets exact ties where every head's relu(q . k) is 0 (few indexer heads
make that common at these sizes); torch.topk breaks them by position among the entries the
call holds, so a prefill of the whole prompt and a prefill of part of it may pick different
(equally scored) entries for the same query: transformers does so itself. Each refmoe run is
therefore compared with transformers run the same way (the same calls over the cache)."""

import json

import numpy as np
import pytest
import torch
from conftest import cli_generate, hf_greedy, randomize_bf16
from hypothesis import given, settings
from hypothesis import strategies as st

from refmoe import models
from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.models import deepseek_v4

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    q_lora_rank=24,
    num_experts_per_tok=2,
    n_routed_experts=8,
    n_shared_experts=1,
    hc_mult=2,
    sliding_window=8,
    o_groups=2,
    o_lora_rank=16,
    index_n_heads=4,
    index_head_dim=16,
    index_topk=3,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    layer_types=[
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ],
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
    partial_rotary_factor=0.25,
    max_position_embeddings=256,
    swiglu_limit=1.0,  # the clamps bite at these weights
    eos_token_id=None,
)
VARIANTS = {
    "base": {},
    "yarn_three_streams": dict(
        hc_mult=3,
        hc_sinkhorn_iters=5,
        o_groups=4,
        index_topk=2,
        num_experts_per_tok=3,
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        layer_types=[
            "compressed_sparse_attention",
            "heavily_compressed_attention",
            "sliding_attention",
            "compressed_sparse_attention",
        ],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        partial_rotary_factor=0.5,
    ),
}
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 93, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
TOL = 1e-4


def random_model(overrides: dict, seed: int = 0):
    cfg = transformers.DeepseekV4Config(**{**BASE, **overrides})
    torch.manual_seed(seed)
    m = transformers.DeepseekV4ForCausalLM(cfg).eval()
    randomize_bf16(m, bias_buffers=("e_score_correction_bias",))
    with torch.no_grad():
        for layer in m.model.layers:
            if layer.mlp.is_hash:
                table = layer.mlp.gate.tid2eid
                table.copy_(
                    torch.stack(
                        [
                            torch.randperm(cfg.n_routed_experts)[: table.shape[1]]
                            for _ in range(table.shape[0])
                        ]
                    )
                )
    return m


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    m = random_model(VARIANTS[request.param])
    d = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(d)
    return m, d


def hf_run(m, ids: list[int], splits: list[int]) -> torch.Tensor:
    """transformers' logits for ids fed as the chunks that splits cut, over one cache."""
    from transformers import DynamicCache

    cache, outs, lo = DynamicCache(config=m.config), [], 0
    with torch.no_grad():
        for hi in [*splits, len(ids)]:
            outs.append(m(torch.tensor([ids[lo:hi]]), cache=cache, use_cache=True).logits[0])
            lo = hi
    return torch.cat(outs)


def mine_run(mine, ids: list[int], splits: list[int]) -> torch.Tensor:
    cache, outs, lo = mine.new_cache(), [], 0
    for hi in [*splits, len(ids)]:
        outs.append(mine.forward(torch.tensor(ids[lo:hi]), cache))
        lo = hi
    assert cache.length == len(ids)
    return torch.cat(outs)


@pytest.mark.parametrize(
    "splits",
    [[], [13], [7, 8, 16], list(range(1, len(PROMPT)))],  # whole, 2 chunks, 4, token by token
    ids=["prefill", "two_chunks", "four_chunks", "token_by_token"],
)
def test_logits_match_transformers(saved, splits):
    m, d = saved
    cfg, mine = models.load(d)
    assert cfg.family == "deepseek_v4" and len(mine.blocks) == 4
    ref = hf_run(m, PROMPT, splits)
    got = mine_run(mine, PROMPT, splits)
    assert (got - ref).abs().max() <= TOL * ref.abs().max()


def test_greedy_32_tokens_via_cli(saved):
    m, d = saved
    want = hf_greedy(m, PROMPT, 32)
    got = cli_generate(d, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", "32")
    assert len(want) == 32 and got["token_ids"] == want


def test_batched_decode_is_each_sequence_alone(saved):
    """forward_batch (several sequences, the MoE layers over all their tokens at once) gives
    each sequence the logits it gets alone."""
    _, d = saved
    _, mine = models.load(d)
    prompts = [PROMPT[:9], PROMPT[4:21], PROMPT[2:5]]
    caches = [mine.new_cache() for _ in prompts]
    for p, c in zip(prompts, caches):
        mine.forward(torch.tensor(p[:-1]), c)
    got = mine.forward_batch([torch.tensor(p[-1:]) for p in prompts], caches)
    for p, row in zip(prompts, got):
        alone = mine_run(mine, p, [len(p) - 1])[-1]
        assert (row - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_release_names_read_as_transformers_names():
    """DeepSeek's release names (what save_pretrained writes back) map onto transformers' own,
    one by one; transformers' names pass unchanged."""
    pairs = {
        "embed.weight": "model.embed_tokens.weight",
        "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight",
        "hc_head_fn": "model.hc_head.hc_fn",
        "layers.3.attn.wq_a.weight": "model.layers.3.self_attn.q_a_proj.weight",
        "model.layers.3.attn.wq_b.weight": "model.layers.3.self_attn.q_b_proj.weight",
        "layers.3.attn.norm.weight": "model.layers.3.self_attn.kv_norm.weight",
        "layers.3.attn.attn_sink": "model.layers.3.self_attn.sinks",
        "layers.3.attn.compressor.ape": "model.layers.3.self_attn.compressor.position_bias",
        "layers.3.attn.indexer.compressor.wkv.weight": (
            "model.layers.3.self_attn.compressor.indexer.kv_proj.weight"
        ),
        "layers.3.attn.indexer.wq_b.weight": (
            "model.layers.3.self_attn.compressor.indexer.q_b_proj.weight"
        ),
        "layers.3.attn.indexer.weights_proj.weight": (
            "model.layers.3.self_attn.compressor.indexer.scorer.weights_proj.weight"
        ),
        "layers.3.hc_attn_fn": "model.layers.3.attn_hc.fn",
        "layers.3.hc_ffn_scale": "model.layers.3.ffn_hc.scale",
        "layers.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
        "layers.3.ffn_norm.weight": "model.layers.3.post_attention_layernorm.weight",
        "layers.3.ffn.gate.bias": "model.layers.3.mlp.gate.e_score_correction_bias",
        "layers.0.ffn.gate.tid2eid": "model.layers.0.mlp.gate.tid2eid",
        "layers.3.ffn.experts.17.w1.weight": "model.layers.3.mlp.experts.17.gate_proj.weight",
        "layers.3.ffn.experts.17.w2.weight_scale_inv": (
            "model.layers.3.mlp.experts.17.down_proj.weight_scale_inv"
        ),
        "layers.3.ffn.shared_experts.w3.weight": "model.layers.3.mlp.shared_experts.up_proj.weight",
    }
    for release, hf in pairs.items():
        assert deepseek_v4.hf_name(release) == hf, release
        assert deepseek_v4.hf_name(hf) == hf, hf


def test_one_tensor_under_two_names_refused(saved, tmp_path):
    _, d = saved
    ck = Checkpoint(d)
    from refmoe.checkpoint import save_file

    tensors = {n: np.array(ck.get(n)) for n in ck.names()}
    tensors["model.layers.0.self_attn.q_a_proj.weight"] = tensors["model.layers.0.attn.wq_a.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ValueError, match=r"q_a_proj.weight' is stored both as itself"):
        models.load(tmp_path)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_key_value_heads=2), "num_key_value_heads: DeepSeek-V4 shares one KV head"),
        (dict(o_groups=3), "o_groups must divide num_attention_heads"),
        (dict(layer_types=["full_attention"] * 4), "layer_types: each one of"),
        (dict(mlp_layer_types=["dense"] * 4), "mlp_layer_types: hash_moe or moe per layer"),
        (dict(index_topk=0), "index_n_heads, index_head_dim and index_topk must be positive"),
        (dict(scoring_func="tanh"), "field 'scoring_func'"),
        (dict(compress_ratios=[0, 4, 7, 4], layer_types=None), "field 'compress_ratios'"),
    ],
)
def test_bad_configs_named(change, match, tmp_path):
    m = random_model({})
    m.config.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(cfg, "config.json")


def test_release_config_fields(tmp_path):
    """The release's own config names (compress_ratios per layer, num_hash_layers,
    qk_rope_head_dim, a flat YaRN rope_scaling) read as transformers reads them."""
    m = random_model(VARIANTS["yarn_three_streams"])
    m.config.save_pretrained(tmp_path)
    mine = ModelConfig.from_file(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    rates = raw["compress_rates"]
    release = {k: v for k, v in raw.items() if k not in ("layer_types", "mlp_layer_types")}
    release |= {
        "compress_ratios": [rates.get(t, 0) for t in raw["layer_types"]],
        "num_hash_layers": 2,
        "qk_rope_head_dim": 16,
        "rope_scaling": raw["rope_parameters"]["compress"] | {"rope_theta": None},
        "rope_parameters": None,
        "partial_rotary_factor": None,
    }
    release = {k: v for k, v in release.items() if v is not None}
    release["rope_scaling"] = {k: v for k, v in release["rope_scaling"].items() if v is not None}
    theirs = ModelConfig.from_dict(release, "config.json")
    for f in ("layer_types", "mlp_layer_types", "rotary_dim", "compress_rope_scaling"):
        assert getattr(theirs, f) == getattr(mine, f), f


def test_slp_matches_the_cpu_path(saved):
    """Stream-loading prefill (the routed experts streamed to its device, here the CPU lane,
    hash layers routed by the prompt's token ids) gives the CPU path's logits."""
    from refmoe import slp

    _, d = saved
    _, mine = models.load(d)
    want = mine.forward(torch.tensor(PROMPT), mine.new_cache())
    runner = slp.StreamPrefill(mine, ring=2, pin=False)
    got = runner.prefill(torch.tensor(PROMPT), mine.new_cache())
    assert runner.stats.experts_loaded > 0
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("mark", [3, 8, 13, 17])
@pytest.mark.usefixtures("float32_tiles")
def test_a_snapshot_restores_and_continues(saved, mark):
    """The prefix cache's path: marks taken as a prompt passes them (inside a call, or at its
    end), the entries read by position and the window and open windows restored from the
    snapshot, continue exactly as a cache that ran that prefix itself; each closed window's
    entry is held once."""
    _, d = saved
    _, mine = models.load(d)
    whole = mine.new_cache()
    whole.mark([mark, 20])
    mine.forward(torch.tensor(PROMPT[:11]), whole)
    mine.forward(torch.tensor(PROMPT[11:20]), whole)
    snaps = whole.snapshots()
    assert sorted(snaps) == [mark, 20]
    cut = mine.new_cache()
    cut.restore(whole.read(0, mark), snaps[mark], mark)
    got = mine.forward(torch.tensor(PROMPT[mark:]), cut)
    again = mine.new_cache()
    mine.forward(torch.tensor(PROMPT[:mark]), again)
    want = mine.forward(torch.tensor(PROMPT[mark:]), again)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    for block, layer in zip(mine.blocks, cut.layers):
        if block.attn.rate:
            assert layer.entries.n == len(PROMPT) // block.attn.rate
            mine_, theirs = layer.entries.view(), again.layers[block.layer].entries.view()
            assert torch.allclose(mine_, theirs, atol=1e-5)  # computed in other chunks


def test_a_snapshot_of_the_wrong_size_is_refused(saved):
    """A snapshot whose window or open windows do not fit its position is named, not
    restored: a later step would pool the wrong positions."""
    _, d = saved
    _, mine = models.load(d)
    whole = mine.new_cache()
    whole.mark([13])
    mine.forward(torch.tensor(PROMPT[:15]), whole)
    states = whole.snapshots()[13]
    compressed = next(i for i, b in enumerate(mine.blocks) if b.attn.rate)
    window, *open_ = states[compressed]
    bad = list(states)
    bad[compressed] = (window, *(t[1:] for t in open_))
    with pytest.raises(ValueError, match="open-window"):
        mine.new_cache().restore(whole.read(0, 13), bad, 13)
    bad[compressed] = (window,)
    with pytest.raises(ValueError, match="snapshot is 5 tensors"):
        mine.new_cache().restore(whole.read(0, 13), bad, 13)


def test_the_cache_stays_bounded(saved):
    """After a prompt many windows long, each layer holds the last sliding_window key-values,
    the projections of at most one open window (two with overlap) and one entry per closed
    window; its bytes stay within state_bytes plus cache_bytes_per_token a position, and a
    decode step after it gives the logits of a whole prefill."""
    _, d = saved
    cfg, mine = models.load(d)
    ids = (PROMPT * 5)[:121]
    cache = mine.new_cache()
    mine.forward(torch.tensor(ids[:100]), cache)
    for token in ids[100:]:
        step = mine.forward(torch.tensor([token]), cache)
    want = mine.forward(torch.tensor(ids), mine.new_cache())[-1]
    assert (step[-1] - want).abs().max() <= 1e-4 * want.abs().max()
    n = len(ids)
    for block, layer in zip(mine.blocks, cache.layers):
        attn = block.attn
        assert layer.kv.shape[0] == cfg.sliding_window
        if attn.rate:
            open_ = n % attn.rate + (attn.rate if layer.overlap else 0)
            assert layer.ckv.shape[0] == layer.cgate.shape[0] == open_
            assert layer.entries.n == n // attn.rate
        held = sum(t.numel() * 4 for t in layer.now())
        assert held <= attn.state_bytes()
        grown = sum(g.n * g.buf[0].numel() * 4 for g in (layer.entries, layer.index_keys) if g)
        assert grown <= attn.cache_bytes_per_token() * n


def write_release_checkpoint(m, d) -> dict:
    """m as DeepSeek-V4-Flash ships: every projection FP8 E4M3 with a power-of-two scale per
    128 x 128 block stored as E8M0 under `.scale`, the routed experts FP4 (E2M1 pairs in int8,
    an E8M0 scale per 32 under `.scale`); norms, routers, hyper-connections, embeddings and the
    head as they were. Returns transformers' state with every quantized weight dequantized."""
    import ml_dtypes  # noqa: F401  (float8_e8m0fnu bytes are written as uint8)

    from refmoe.checkpoint import save_file
    from refmoe.kernels import formats

    m.save_pretrained(d)
    ck = Checkpoint(d)
    tensors, dtypes, deq = {}, {}, {}
    for name in ck.names():
        a = np.array(ck.get(name))
        hf = deepseek_v4.hf_name(name)
        quantize = (
            a.ndim == 2
            and name.endswith(".weight")
            and not any(k in name for k in ("norm", "gate.weight", "embed", "head"))
        )
        if not quantize:
            tensors[name] = a
            continue
        base = name[: -len(".weight")]
        if ".experts." in name and ".shared_experts." not in name:
            blocks, scales = formats.mxfp4_quantize(a)
            tensors[name], dtypes[name] = blocks.reshape(a.shape[0], -1).view(np.int8), "I8"
            tensors[base + ".scale"], dtypes[base + ".scale"] = scales, "F8_E8M0"
            deq[hf] = formats.mxfp4_dequantize(blocks, scales, a.shape[1])
            continue
        n, k = a.shape
        amax = (
            np.abs(np.pad(a, ((0, -n % 128), (0, -k % 128))))
            .reshape(-(-n // 128), 128, -(-k // 128), 128)
            .max(axis=(1, 3))
        )
        e = np.ceil(np.log2(np.maximum(amax, 1e-30) / 448.0)).astype(np.int64)
        full = np.repeat(np.repeat(np.ldexp(1.0, e), 128, 0), 128, 1)[:n, :k]
        codes = formats.fp8_encode(a / full)
        tensors[name], dtypes[name] = codes, "F8_E4M3"
        tensors[base + ".scale"], dtypes[base + ".scale"] = (e + 127).astype(np.uint8), "F8_E8M0"
        deq[hf] = formats.fp8_decode(codes) * full
    (d / "model.safetensors").unlink()
    save_file(tensors, d / "model.safetensors", dtypes)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0",
    }
    cfg["expert_dtype"] = "fp4"  # V4 writes it beside quantization_config, V4.1 inside
    (d / "config.json").write_text(json.dumps(cfg))
    state = m.state_dict()
    for name, value in deq.items():
        m_ = __import__("re").match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if m_:
            prefix, e, kind = m_.group(1), int(m_.group(2)), m_.group(3)
            inter = value.shape[0] if kind != "down" else None
            if kind == "down":
                state[f"{prefix}.down_proj"][e] = torch.from_numpy(value).float()
            else:
                rows = slice(0, inter) if kind == "gate" else slice(inter, 2 * inter)
                state[f"{prefix}.gate_up_proj"][e, rows] = torch.from_numpy(value).float()
        else:
            state[name] = torch.from_numpy(value).float()
    return state


def test_release_quantization_against_dequantized_transformers(tmp_path):
    """DeepSeek-V4's own quantization, read as stored: FP8 projections with E8M0 block scales
    and the routed experts' FP4 bytes run by the MXFP4 kernels (no conversion: views of the
    file). Against transformers on the exact dequantized weights: with the experts converted
    to bf16 at load (E2M1 x 2^e is exact in bf16) the logits agree to float rounding; as
    stored, the 4-bit kernels run the experts on int8-per-32 activations, and the oracle is fed
    the same (q8_expert_inputs); the intermediate is requantized from each side's own float32
    value, so an element on a rounding boundary may land one int8 step apart (1/127 of its
    chunk's largest), which the following layers carry: held to 2% of the largest logit."""
    from test_expert_formats import q8_expert_inputs

    m = random_model({})
    state = write_release_checkpoint(m, tmp_path)
    m.load_state_dict(state)
    m.config._experts_implementation = "eager"
    ref = hf_run(m, PROMPT, [])
    _, exact = models.load(tmp_path, expert_dtype="bf16")
    got = mine_run(exact, PROMPT, [])
    assert (got - ref).abs().max() <= TOL * ref.abs().max()
    cfg, mine = models.load(tmp_path)
    assert cfg.expert_format == ("mxfp4", 32) and cfg.is_fp8
    moe = mine.blocks[1].ffn
    assert moe.experts.fmt == "mxfp4" and not moe.experts.gate[0].flags.owndata
    assert mine.blocks[1].attn.q_a.codes is not None  # FP8 as stored
    with q8_expert_inputs(m):
        ref = hf_run(m, PROMPT, [])
    got = mine_run(mine, PROMPT, [])
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


def test_engine_batches_and_reuses_prefixes(saved):
    """The serving engine runs it as any family: requests batched in decode (dual batch too)
    generate what each generates alone, and a second turn that resends the first one's prompt
    reuses the cached prefix up to the snapshot at the first prompt's last token but one (its
    entries restored by position, the window and open windows from the snapshot)."""
    from test_engine import _run

    from refmoe.engine import Engine
    from refmoe.generate import generate

    _, d = saved
    _, mine = models.load(d)
    prompts = [PROMPT[:11], PROMPT[3:9], PROMPT[:4], PROMPT[2:25]]
    want = [generate(mine, p, 8).token_ids for p in prompts]
    for dual in (False, True):
        engine = Engine(mine, max_batch=4, prefill="cpu", dual_batch=dual).start()
        try:
            out, _, _ = _run(engine, prompts, 8)
            assert [out[i] for i in range(4)] == want
        finally:
            engine.shutdown(1)
    engine = Engine(mine, prefill="cpu", prefix_cache_gib=0.5).start()
    try:
        first = (PROMPT * 2)[:40]  # more than one 32-token block of the prefix cache
        _run(engine, [first], 4)
        second = first + PROMPT[20:25]
        out, ends, _ = _run(engine, [second], 6)
        assert out[0] == generate(mine, second, 6).token_ids
        assert ends[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == len(first) - 1
    finally:
        engine.shutdown(1)


def test_generate_cli_with_two_ranks(saved):
    """`refmoe generate --ranks 2 --prefill slp` (DSLP over two processes) gives the CPU
    path's tokens."""
    _, d = saved
    ids = ",".join(map(str, PROMPT))
    plain_run = cli_generate(d, "--prompt-ids", ids, "--max-tokens", "6", "--prefill", "cpu")
    run = cli_generate(
        d, "--prompt-ids", ids, "--max-tokens", "6", "--ranks", "2", "--prefill", "slp"
    )
    assert run["prefill"] == "dslp" and run["token_ids"] == plain_run["token_ids"]


def test_the_mtp_layer_is_left_unread(saved, tmp_path):
    """A release's multi-token-prediction layer (mtp.0.*, which transformers ignores on load)
    sits in the checkpoint unread: the model loads and gives the same logits (no speculative
    decoding uses it yet)."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, d = saved
    shutil.copytree(d, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(path)
    tensors["mtp.0.attn.wq_a.weight"] = torch.zeros(24, 64)
    tensors["mtp.0.ffn.experts.0.w1.weight"] = torch.zeros(32, 64)
    tensors["mtp.0.hc_head_fn"] = torch.zeros(2, 128)
    save_file(tensors, path, metadata={"format": "pt"})
    _, plain = models.load(d)
    _, with_mtp = models.load(tmp_path / "m")
    want = plain.forward(torch.tensor(PROMPT), plain.new_cache())
    got = with_mtp.forward(torch.tensor(PROMPT), with_mtp.new_cache())
    assert torch.equal(got, want)


@pytest.mark.parametrize("host_only, chunk", [(False, None), (True, None), (False, 9)])
def test_dslp_matches_the_cpu_path(saved, host_only, chunk):
    """Distributed SLP over two gloo processes: each rank's slice of the prompt attends with
    every rank's key-values and compressor inputs gathered (its cache takes the whole prompt
    and pools the same entries), the hash layers route every rank's tokens; the logits at
    every position, a decode step after it and the greedy continuation equal the plain path's.
    Host-only (decode on rank 0's device): rank 0 takes no tokens and only receives the
    cache."""
    from refmoe import dslp
    from refmoe.generate import generate

    _, d = saved
    _, mine = models.load(d)
    plain_cache = mine.new_cache()
    want = mine.forward(torch.tensor(PROMPT), plain_cache)
    step = mine.forward(torch.tensor([7]), plain_cache)
    with dslp.Group.start(
        mine, d, world=2, threads_per_rank=1, ring=2, chunk_tokens=chunk
    ) as group:
        cache = mine.new_cache()
        got = group.prefill(torch.tensor(PROMPT), cache, all_logits=True, host_only=host_only)
        assert cache.length == len(PROMPT) and got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        after = mine.forward(torch.tensor([7]), cache)
        assert (after - step).abs().max() <= 1e-4 * step.abs().max()
        if host_only:
            assert group.stats.experts_loaded == 0
        else:

            class Group:
                trace = None

                def prefill(self, ids, c, all_logits=False):
                    return group.prefill(ids, c, all_logits=all_logits)

            assert generate(mine, PROMPT, 6, prefill=Group()).token_ids == (
                generate(mine, PROMPT, 6).token_ids
            )


def _sinkhorn_numpy(a: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """The naive loop beside the kernel: numpy's float32 sums and divisions."""
    eps = np.float32(eps)
    a = a / (a.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        a = a / (a.sum(-1, keepdims=True) + eps)
        a = a / (a.sum(-2, keepdims=True) + eps)
    return a


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 4),
    c=st.integers(1, 8),
    iters=st.integers(1, 24),
    scale=st.floats(-3, 3),
    seed=st.integers(0, 2**31),
)
def test_sinkhorn_kernel_against_numpy(t, c, iters, scale, seed):
    """kernels.sinkhorn (the hyper-connections' mixing matrices) against the numpy loop:
    bit for bit up to 7 streams (numpy adds fewer than 8 numbers in index order, as the kernel
    does; from 8 on it sums in pairs), within float32 rounding at 8; in every CPU variant."""
    from refmoe import kernels

    a = np.random.default_rng(seed).random((t, c, c)).astype(np.float32) * np.float32(10.0**scale)
    want = _sinkhorn_numpy(a, iters, 1e-6)
    before = a.copy()
    for variant in kernels.available_variants():
        got = kernels.sinkhorn(a, iters, 1e-6, variant=variant)
        if c < 8:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(a, before)  # the input is not touched


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 7),
    n=st.integers(1, 9),
    d=st.integers(1, 70),
    e=st.integers(1, 300),
    threads=st.integers(1, 3),
    limited=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_indexer_kernel_against_float64(t, n, d, e, threads, limited, seed):
    """kernels.indexer_scores (the lightning indexer's sum_h w_h relu(q_h . k)) against float64
    numpy, in every CPU variant: odd heads, widths that are not whole vectors, key counts that
    split unevenly over the threads, queries split over threads or keys; within float32
    rounding of the sum of |w| |q . k|; with limits, exactly -inf past each query's."""
    _indexer_against_float64(t, n, d, e, threads, limited, seed)


@pytest.mark.parametrize(
    "t, n, d, e", [(1, 64, 128, 37), (5, 7, 32, 9), (2, 2, 16, 4), (1, 3, 64, 130)]
)
def test_indexer_kernel_whole_vectors(t, n, d, e):
    """Widths that are whole vectors (V4-Flash's 128 among them): the x86 path that sums eight
    dots across lanes at once, with odd and even head counts."""
    for threads in (1, 2):
        _indexer_against_float64(t, n, d, e, threads, t > 1, seed=t * 1000 + n)


def _indexer_against_float64(t, n, d, e, threads, limited, seed):
    from refmoe import kernels

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((t, n, d)).astype(np.float32)
    w = rng.standard_normal((t, n)).astype(np.float32)
    keys = rng.standard_normal((e, d)).astype(np.float32)
    limits = rng.integers(-1, e + 2, t).astype(np.int32) if limited else None
    dots = np.einsum("thd,ed->the", q.astype(np.float64), keys.astype(np.float64))
    want = np.einsum("th,the->te", w.astype(np.float64), np.maximum(dots, 0.0))
    bound = np.einsum(
        "th,the->te",
        np.abs(w).astype(np.float64),
        np.einsum("thd,ed->the", np.abs(q).astype(np.float64), np.abs(keys).astype(np.float64)),
    )
    seen = np.ones((t, e), bool) if limits is None else np.arange(e)[None] < limits[:, None]
    for variant in kernels.available_variants():
        got = kernels.indexer_scores(q, w, keys, limits, num_threads=threads, variant=variant)
        assert got.shape == (t, e) and got.dtype == np.float32
        assert np.all(np.abs(got - want)[seen] <= 1e-5 * bound[seen] + 1e-30), variant
        assert np.all(got[~seen] == -np.inf), variant


def test_indexer_kernel_is_the_models_reference():
    """The indexer's scores through the kernel equal the torch form transformers runs
    (Indexer.reference: an n x T x E intermediate, the entries not closed masked) within
    float32 rounding, -inf where that is; keys of another width are refused by name."""
    from refmoe import kernels

    ix = object.__new__(deepseek_v4.Indexer)
    ix.n, ix.d = 6, 40
    g = torch.Generator().manual_seed(3)
    q, w = torch.randn(6, 5, 40, generator=g), torch.randn(5, 6, generator=g)
    keys = torch.randn(77, 40, generator=g)
    closed = torch.tensor([0, 3, 40, 77, 77])
    want = ix.reference(q, w, keys, closed)
    got = ix.scores(q, w, keys, closed)
    finite = want.isfinite()
    assert torch.equal(finite, got.isfinite())
    assert (got - want)[finite].abs().max() <= 1e-5 * want[finite].abs().max()
    with pytest.raises(ValueError, match="keys are 39 wide"):
        kernels.indexer_scores(
            np.ones((1, 2, 40), np.float32),
            np.ones((1, 2), np.float32),
            np.ones((3, 39), np.float32),
        )


def test_indexer_scores_queries_in_blocks():
    """Indexer.allowed scores a block of queries at a time under its budget: blocks of 1 and
    3 queries pick exactly the entries one pass over all of them picks."""
    ix = object.__new__(deepseek_v4.Indexer)
    ix.n, ix.d, ix.topk, ix.rate = 4, 16, 3, 4
    g = torch.Generator().manual_seed(5)
    wq, ww = torch.randn(4 * 16, 8, generator=g), torch.randn(4, 12, generator=g)
    ix.q, ix.weights = (lambda r: r @ wq.T), (lambda x: x @ ww.T)

    plain = torch.ones(10, 4), torch.zeros(10, 4)  # no rope: angles of zero
    x, q_res = torch.randn(10, 12, generator=g), torch.randn(10, 8, generator=g)
    keys, positions = torch.randn(9, 16, generator=g), torch.arange(27, 37)
    whole = ix.allowed(x, q_res, positions, keys, plain)
    for budget in (4 * 9, 3 * 4 * 9):
        assert torch.equal(ix.allowed(x, q_res, positions, keys, plain, budget), whole)
    assert whole.sum(1).tolist() == [3] * 10


def test_sinkhorn_kernel_rejects_bad_shapes():
    from refmoe import kernels

    with pytest.raises(ValueError, match=r"\[T, c, c\]"):
        kernels.sinkhorn(np.ones((2, 3, 4), np.float32), 20, 1e-6)
    with pytest.raises(ValueError, match="iters"):
        kernels.sinkhorn(np.ones((1, 4, 4), np.float32), 0, 1e-6)


@pytest.mark.parametrize("streams, hidden, tokens", [(2, 64, 1), (4, 96, 3), (3, 40, 5)])
def test_hyper_collapse_kernel_against_torch(streams, hidden, tokens):
    """kernels.hyper_collapse (the whole hyper-connection ahead of a block in one call) against
    the torch operations transformers runs (HyperConnection.reference), in every CPU variant,
    on weights scaled as trained ones are (mixes of a few units)."""
    from refmoe import kernels

    rng = np.random.default_rng(streams * 1000 + hidden)
    hc = object.__new__(deepseek_v4.HyperConnection)
    hc.c, hc.eps, hc.iters, hc.norm_eps = streams, 1e-6, 20, 1e-6
    m = (2 + streams) * streams
    hc.fn = torch.from_numpy(rng.standard_normal((m, streams * hidden)).astype(np.float32) * 0.1)
    hc.base = torch.from_numpy(rng.standard_normal(m).astype(np.float32))
    hc.scale = torch.from_numpy(rng.uniform(0.5, 2.0, 3).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((tokens, streams, hidden)).astype(np.float32))
    want = hc.reference(x)
    for variant in kernels.available_variants():
        got = kernels.hyper_collapse(
            x.numpy(),
            hc.fn.numpy(),
            hc.base.numpy(),
            hc.scale.numpy(),
            1e-6,
            1e-6,
            20,
            variant=variant,
            num_threads=2,
        )
        for g, w, name in zip(got, want, ("post", "comb", "collapsed")):
            np.testing.assert_allclose(g, w.numpy(), rtol=2e-5, atol=2e-6, err_msg=name)
    with pytest.raises(ValueError, match="fn: expected shape"):
        kernels.hyper_collapse(
            x.numpy(), hc.fn.numpy()[1:], hc.base.numpy(), hc.scale.numpy(), 1e-6, 1e-6, 20
        )
