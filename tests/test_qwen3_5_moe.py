"""Qwen3.5-MoE against transformers' Qwen3_5MoeForCausalLM: tiny random configs, saved two ways
(as save_pretrained writes the text model, and as Qwen releases it: config nested under
text_config, tensors under model.language_model. beside a vision tower and an MTP head, experts
stacked in one tensor per projection, shards with an index); logits within 1e-4 in one pass,
token by token and in chunks; 32 greedy tokens through `refmoe generate` with the CPU and SLP
prefills; SLP equal to the CPU path; bad configs named."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import assert_logits_match, cli_generate, hf_greedy, save_random
from test_deepseek_v3 import write_fp8_checkpoint
from test_qwen3_next import BASE as NEXT_BASE
from test_qwen3_next import PROMPT

from refmoe import models, slp
from refmoe.checkpoint import Checkpoint, save_file
from refmoe.config import ModelConfig

transformers = pytest.importorskip("transformers")

# Qwen3-Next's tiny shapes (its layers are these); Qwen3.5 has no dense intermediate_size
BASE = {k: v for k, v in NEXT_BASE.items() if k != "intermediate_size"}
VARIANTS = {
    "base": {},  # linear, linear, linear, full; 2 value heads per key head; rotary 0.25
    "mixed": dict(
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
        linear_num_value_heads=2,
        num_experts_per_tok=3,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5),
    ),
}


def released_layout(saved, to, text_config: dict) -> None:
    """Rewrite a save_pretrained directory the way Qwen publishes Qwen3.5: the config under
    text_config of Qwen3_5MoeForConditionalGeneration, the text model under
    model.language_model., experts stacked, a vision tower and an MTP head beside it, two
    shards and an index."""
    ck = Checkpoint(saved)
    n = text_config["num_experts"]
    tensors: dict = {}
    for name in ck.names():
        a = np.array(ck.get(name))
        if ".mlp.experts." in name:
            continue
        tensors[name.replace("model.", "model.language_model.", 1)] = a
    for layer in range(text_config["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        get = lambda e, w, p=p: np.array(ck.get(f"{p}.{e}.{w}_proj.weight"))  # noqa: E731
        q = f"model.language_model.layers.{layer}.mlp.experts"
        tensors[f"{q}.gate_up_proj"] = np.stack(
            [np.concatenate([get(e, "gate"), get(e, "up")]) for e in range(n)]
        )
        tensors[f"{q}.down_proj"] = np.stack([get(e, "down") for e in range(n)])
    tensors["model.visual.patch_embed.proj.weight"] = np.zeros((4, 3), np.float32)
    tensors["mtp.fc.weight"] = np.zeros((4, 4), np.float32)
    names = sorted(tensors)
    half = {
        n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
        for i, n in enumerate(names)
    }
    # BF16 as released (every value is a BF16 value already: randomize_bf16): the top half
    bf16 = {
        n: (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        for n, a in tensors.items()
    }
    for shard in set(half.values()):
        part = [n for n in names if half[n] == shard]
        save_file({n: bf16[n] for n in part}, to / shard, {n: "BF16" for n in part})
    (to / "model.safetensors.index.json").write_text(json.dumps({"weight_map": half}))
    (to / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["Qwen3_5MoeForConditionalGeneration"],
                "model_type": "qwen3_5_moe",
                "tie_word_embeddings": False,
                "text_config": {**text_config, "model_type": "qwen3_5_moe_text"},
                "vision_config": {"depth": 2, "hidden_size": 4},
            }
        )
    )


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    cfg = transformers.Qwen3_5MoeTextConfig(**{**BASE, **VARIANTS[request.param]})
    d = tmp_path_factory.mktemp(request.param)
    m = save_random(d, transformers.Qwen3_5MoeForCausalLM, cfg, seed=5)
    released = tmp_path_factory.mktemp(request.param + "-released")
    released_layout(d, released, json.loads((d / "config.json").read_text()))
    return m, d, released


def test_logits_match_transformers(saved):
    m, d, released = saved
    with torch.no_grad():
        ref = m(torch.tensor([PROMPT])).logits[0]
    for where in (d, released):
        cfg, mine = models.load(where)
        assert cfg.family == "qwen3_5_moe" and cfg.norm_topk_prob
        assert_logits_match(m, mine, PROMPT, 1e-4)  # one pass, and token by token
        cache = mine.new_cache()  # in chunks: the convolution and the state carried across
        out = torch.cat([mine.forward(torch.tensor(PROMPT[i : i + 4]), cache) for i in (0, 4, 8)])
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), where
        assert not cache.positional and mine.state_bytes() > 0


def test_fp8_release_against_dequantized_transformers(saved, tmp_path):
    """Qwen's FP8 releases (Qwen3.6-35B-A3B-FP8) as published: 128 x 128 FP8 blocks with
    weight_scale_inv, the routed experts one tensor per expert (the BF16 release stacks them),
    the full and linear attention's projections (in_proj_qkv, in_proj_z, out_proj) and the
    shared expert FP8 too, the router, in_proj_a / in_proj_b, norms, embeddings and lm_head as
    they are; the text model under model.language_model., config.json's text model under
    text_config with quantization_config beside it: logits against transformers on the
    dequantized weights, experts and projections run as FP8."""
    m, d, _ = saved
    m = copy.deepcopy(m)
    deq = write_fp8_checkpoint(
        m, tmp_path, rename=lambda k: k.replace("model.", "model.language_model.", 1)
    )
    m.load_state_dict(deq)
    flat = json.loads((tmp_path / "config.json").read_text())
    quantization = flat.pop("quantization_config")
    released = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "tie_word_embeddings": False,
        "text_config": {**flat, "model_type": "qwen3_5_moe_text"},
        "vision_config": {"depth": 2, "hidden_size": 4},
        "quantization_config": quantization,
    }
    (tmp_path / "config.json").write_text(json.dumps(released))
    ck = Checkpoint(tmp_path)
    assert "model.language_model.layers.0.mlp.experts.1.up_proj.weight_scale_inv" in ck
    assert any(n.endswith("linear_attn.in_proj_qkv.weight_scale_inv") for n in ck.names())
    assert any(n.endswith("self_attn.q_proj.weight_scale_inv") for n in ck.names())
    cfg, mine = models.load(tmp_path)
    assert cfg.family == "qwen3_5_moe" and cfg.is_fp8
    assert all(b.ffn.experts.fmt == "fp8" for b in mine.blocks)
    linear = [b.attn for b in mine.blocks if hasattr(b.attn, "qkv")]
    full = [b.attn for b in mine.blocks if hasattr(b.attn, "q")]
    assert linear and all(a.qkv.codes is not None and a.z.codes is not None for a in linear)
    assert all(a.b.codes is None for a in linear)  # left as released
    assert full and all(a.q.codes is not None for a in full)
    assert_logits_match(m, mine, PROMPT, 1e-4)


def test_released_experts_are_views_of_the_file(saved):
    """The stacked experts are read where they lie: a BF16 expert's gate rows are a view of
    the mapped shard, not a copy."""
    _, _, released = saved
    _, mine = models.load(released)
    experts = mine.blocks[0].ffn.experts
    w = experts.gate[0]
    assert isinstance(w, np.ndarray) and w.base is not None and not w.flags.owndata


def test_greedy_32_tokens_via_cli(saved):
    m, _, released = saved
    want = hf_greedy(m, PROMPT, 32)
    ids = ",".join(map(str, PROMPT))
    for prefill in ("cpu", "slp"):
        got = cli_generate(
            released, "--prompt-ids", ids, "--max-tokens", "32", "--prefill", prefill
        )
        assert got["token_ids"] == want, prefill


def test_slp_equals_cpu(saved):
    _, d, _ = saved
    _, mine = models.load(d)
    prompt = torch.tensor((PROMPT * 8)[:80])  # past a delta-rule chunk's 64 tokens
    plain = mine.forward(prompt, mine.new_cache())
    runner = slp.StreamPrefill(mine, ring=2, chunk_tokens=16)
    out = runner.prefill(prompt, mine.new_cache())
    assert (out[-1] - plain[-1]).abs().max() <= 1e-4 * plain.abs().max()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"full_attention_interval": 0, "layer_types": None}, "full_attention_interval"),
        ({"linear_num_key_heads": 3}, "linear_num_value_heads"),
        ({"mlp_only_layers": [1]}, "mlp_only_layers"),
        ({"hidden_size": "64"}, "hidden_size"),
    ],
)
def test_bad_configs_named(change, field, tmp_path):
    text = transformers.Qwen3_5MoeTextConfig(**BASE).to_dict() | change
    d = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "text_config": text}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=field) as e:
        ModelConfig.from_file(tmp_path)
    assert "text_config" in str(e.value)


def test_text_config_must_be_an_object(tmp_path):
    d = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "text_config": [1]}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="text_config"):
        ModelConfig.from_file(tmp_path)


def test_a_tensor_stored_twice_is_refused(saved, tmp_path):
    """A checkpoint holding the same tensor under its plain and its released name is refused,
    naming it (which copy the model read would be a guess)."""
    _, d, _ = saved
    ck = Checkpoint(d)
    tensors = {n: np.array(ck.get(n)) for n in ck.names()}
    tensors["model.language_model.norm.weight"] = tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ValueError, match="model.norm.weight"):
        models.load(tmp_path)
