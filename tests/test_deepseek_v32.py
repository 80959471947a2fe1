"""DeepSeek-V3.2 and GLM-5 (DSA: MLA plus the lightning indexer; GLM-5 with its interleaved
indexer rope and layers sharing the previous full layer's selection) against transformers:
tiny random configs with index_topk below the prompt's length so that the selection is
exercised (in the prompt's expanded attention, in absorbed decode, and in chunks after a cached
past), logits within 1e-4, 32 greedy tokens through `refmoe generate` with the CPU and SLP
prefills, an FP8 checkpoint, and a check that the selection changes the result (sparse is not
dense)."""

import copy

import pytest
import torch
from conftest import (
    assert_cache_bytes,
    assert_logits_match,
    cli_generate,
    hf_greedy,
    randomize_bf16,
)
from test_deepseek_v3 import BASE as V3_BASE
from test_deepseek_v3 import write_fp8_checkpoint

from refmoe import models, slp
from refmoe.config import ModelConfig

transformers = pytest.importorskip("transformers")

# DeepSeek-V3's test model with the indexer; 16 indexer heads: ties in the index (all heads'
# ReLUs zero) are rare enough not to make the top-k ambiguous
BASE = {**V3_BASE, "index_n_heads": 16, "index_head_dim": 16, "index_topk": 4}
VARIANTS = {
    "topk4": {},
    "topk7_wide": dict(index_topk=7, index_head_dim=24),
    "glm5_FSF": dict(index_topk_pattern="FSF", index_topk=5),  # GLM-5: layer 1 shares layer 0's
}
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 93]


def build(variant="topk4", seed=2, **change):
    glm = variant.startswith("glm5")
    kind = "GlmMoeDsa" if glm else "DeepseekV32"
    cfg = getattr(transformers, f"{kind}Config")(**{**BASE, **VARIANTS[variant], **change})
    torch.manual_seed(seed)
    m = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    randomize_bf16(m, bias_buffers=("e_score_correction_bias",))
    return m


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    m = build(request.param)
    d = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(d)
    return m, d


def test_logits_match_transformers(saved):
    m, d = saved
    cfg, mine = models.load(d)
    assert cfg.is_dsa and cfg.index_topk < len(PROMPT)
    assert_logits_match(m, mine, PROMPT, 1e-4)  # one forward, and token by token
    # a chunk after a cached past (prefix cache, chunked prefill): the same logits
    with torch.no_grad():
        ref = m(torch.tensor([PROMPT])).logits[0]
    cache = mine.new_cache()
    mine.forward(torch.tensor(PROMPT[:5]), cache)
    out = mine.forward(torch.tensor(PROMPT[5:]), cache)
    assert (out - ref[5:]).abs().max() <= 1e-4 * ref.abs().max()
    # the cache: latent + roped key + the indexer's key per token and layer
    assert_cache_bytes(mine, cache, len(PROMPT))


def test_greedy_32_tokens_via_cli(saved):
    m, d = saved
    want = hf_greedy(m, PROMPT, 32)
    ids = ",".join(map(str, PROMPT))
    for prefill in ("cpu", "slp"):
        got = cli_generate(d, "--prompt-ids", ids, "--max-tokens", "32", "--prefill", prefill)
        assert got["token_ids"] == want, prefill


def test_selection_matters(saved, tmp_path):
    """The same weights with index_topk past the context (dense MLA) give other logits: the
    sparse path is exercised, not dense under another name."""
    m, d = saved
    _, mine = models.load(d)
    sparse = mine.forward(torch.tensor(PROMPT), mine.new_cache())
    dense = copy.deepcopy(m)
    for layer in dense.model.layers:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.index_topk = 1000
    with torch.no_grad():
        ref_dense = dense(torch.tensor([PROMPT])).logits[0]
    assert (sparse[-1] - ref_dense[-1]).abs().max() > 1e-2 * ref_dense.abs().max()


def test_slp_equals_cpu(saved):
    _, d = saved
    _, mine = models.load(d)
    plain = mine.forward(torch.tensor(PROMPT), mine.new_cache())
    out = slp.StreamPrefill(mine, ring=2, chunk_tokens=4).prefill(
        torch.tensor(PROMPT), mine.new_cache()
    )
    assert (out[-1] - plain[-1]).abs().max() <= 1e-4 * plain.abs().max()


def test_fp8_checkpoint(tmp_path):
    m = build()
    deq = write_fp8_checkpoint(m, tmp_path)
    m.load_state_dict(deq)
    cfg, mine = models.load(tmp_path)
    assert cfg.is_fp8 and mine.blocks[1].attn.indexer.wq_b.codes is not None
    assert_logits_match(m, mine, PROMPT, 1e-4)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"index_topk": 0}, "index_topk"),
        ({"index_head_dim": 4}, "index_head_dim"),
        ({"q_lora_rank": None}, "q_lora_rank"),
        ({"index_n_heads": None}, "index_n_heads"),
    ],
)
def test_bad_configs_named(change, field):
    d = build().config.to_dict()
    d.update(change)
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(d)


def test_decode_at_contexts_measures_sparse_and_dense(saved):
    """`refmoe bench decode --contexts` on a DSA model: each context's caches (latents and
    indexer keys) filled, single-token steps timed, with the indexer and with dense MLA."""
    from refmoe import demo

    _, d = saved
    rows = demo.decode_at_contexts(d, [8, 40], steps=2)
    assert [(r["attention"], r["context"]) for r in rows] == [
        ("sparse", 8),
        ("sparse", 40),
        ("dense", 8),
        ("dense", 40),
    ]
    assert all(r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"] for r in rows)
    assert rows[0]["over_first"] == 1.0
    cfg = ModelConfig.from_dict(demo.demo_config(1, 16, family="deepseek_v32"))
    assert cfg.family == "deepseek_v32" and (cfg.index_n_heads, cfg.index_topk) == (64, 2048)
    with pytest.raises(ValueError, match="--family"):
        demo.demo_config(1, 16, family="mixtral")


def test_glm5_shared_layers(saved):
    """GLM-5: a shared layer runs no indexer, keeps no indexer cache, and attends to the
    positions the full layer before it picked."""
    m, d = saved
    cfg, mine = models.load(d)
    if cfg.family != "glm_moe_dsa":
        pytest.skip("GLM-5 only")
    assert cfg.indexer_types == ["full", "shared", "full"] and cfg.index_rope_interleave
    assert mine.blocks[1].attn.indexer is None and mine.blocks[2].attn.indexer is not None
    cache = mine.new_cache()
    mine.forward(torch.tensor(PROMPT), cache)
    assert cache.layers[1].source is cache.layers[0] and not hasattr(cache.layers[1], "keys")
    assert cache.layers[0].picked is not None and cache.layers[0].picked.shape[1] == 5
    with pytest.raises(ValueError, match="index_topk_pattern"):
        ModelConfig.from_dict(
            m.config.to_dict() | {"indexer_types": None, "index_topk_pattern": "FX"}
        )
    with pytest.raises(ValueError, match="indexer_types"):
        ModelConfig.from_dict(m.config.to_dict() | {"indexer_types": ["shared", "full", "full"]})
    with pytest.raises(ValueError, match="mlp_layer_types"):
        ModelConfig.from_dict(
            m.config.to_dict() | {"mlp_layer_types": ["sparse", "dense", "sparse"]}
        )
