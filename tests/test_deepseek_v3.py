"""DeepSeek-V3 end to end against Hugging Face transformers (the oracle nobody here wrote):
tiny random configs saved with save_pretrained, loaded by refmoe, compared on logits and on
32 greedy tokens through the `refmoe generate` command."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_logits_match, cli_generate, hf_greedy, randomize_bf16

from refmoe import models
from refmoe.checkpoint import Checkpoint, save_file
from refmoe.kernels import formats

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=97,
    hidden_size=72,
    intermediate_size=96,
    moe_intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    kv_lora_rank=24,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    v_head_dim=12,
    qk_nope_head_dim=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=None,
)  # 32 full steps
VARIANTS = {
    "base": {},
    "no_q_lora_ungrouped": dict(
        q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0
    ),
    "all_moe_yarn": dict(
        first_k_dense_replace=0,
        hidden_size=136,
        rope_scaling=dict(
            type="yarn",
            factor=4.0,
            original_max_position_embeddings=64,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
    ),
}
PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 93]
LOGIT_TOL = 1e-4  # |refmoe - transformers| <= LOGIT_TOL * max |logit|, fp32 math on both sides


def random_model(overrides: dict, seed: int = 0):
    cfg = transformers.DeepseekV3Config(**{**BASE, **overrides})
    torch.manual_seed(seed)
    m = transformers.DeepseekV3ForCausalLM(cfg).eval()
    randomize_bf16(m, bias_buffers=("e_score_correction_bias",))
    return m


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    m = random_model(VARIANTS[request.param])
    d = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(d)
    return m, d


def test_logits_match_transformers(saved):
    m, d = saved
    _, mine = models.load(d)
    assert_logits_match(m, mine, PROMPT, LOGIT_TOL)


def test_greedy_32_tokens_via_cli(saved):
    m, d = saved
    want = hf_greedy(m, PROMPT, 32)
    got = cli_generate(d, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", "32")
    assert {"token_ids", "text", "ttft_s", "decode_tok_s"} <= got.keys()
    assert len(want) == 32 and got["token_ids"] == want


def quantize_state(m, fp8, projections=("gate_proj", "up_proj", "down_proj")) -> dict:
    """Walk m's state: fp8(name, array) writes each linear's checkpoint tensors (every linear
    except the router; routed experts per expert, as checkpoints hold them though transformers
    5 fuses them in memory, under the family's projection names) and returns its dequantized
    values; the rest is kept. Returns the dequantized state for transformers; the caller keeps
    what fp8 wrote."""
    gate, up, down = projections
    deq = {}
    for name, p in m.state_dict().items():
        a = p.detach().float().numpy()
        if name.endswith("experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], a.shape[1] // 2
            deq[name] = torch.from_numpy(
                np.stack(
                    [
                        np.concatenate(
                            [
                                fp8(f"{prefix}{e}.{gate}.weight", a[e, :inter]),
                                fp8(f"{prefix}{e}.{up}.weight", a[e, inter:]),
                            ]
                        )
                        for e in range(a.shape[0])
                    ]
                )
            )
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            deq[name] = torch.from_numpy(
                np.stack([fp8(f"{prefix}{e}.{down}.weight", a[e]) for e in range(a.shape[0])])
            )
        elif name.endswith(
            (
                "proj.weight",
                "proj_with_mqa.weight",
                "indexer.wq_b.weight",
                "indexer.wk.weight",
                "in_proj_qkv.weight",  # Qwen3.5's linear attention (its _a and _b stay)
                "in_proj_z.weight",
            )
        ):
            deq[name] = torch.from_numpy(fp8(name, a))
        else:
            deq[name] = None  # kept as it is
    return deq


def write_fp8_checkpoint(
    m,
    d,
    fp8=None,
    quantization: dict | None = None,
    projections=("gate_proj", "up_proj", "down_proj"),
    rename=None,
):
    """The model's weights as a DeepSeek FP8 checkpoint (weight + weight_scale_inv for every
    linear except gate, norms, embeddings and lm_head); returns the dequantized state.
    fp8(name, array, tensors, dtypes) -> dequantized: another block rule (default 128x128,
    scale amax / 448); quantization: the config's quantization_config; projections: the
    routed experts' names (MiniMax: w1, w3, w2); rename(name) -> the name a tensor is saved
    under where the family's checkpoints differ from transformers' names in memory."""
    tensors, dtypes = {}, {}

    def default(name, a, tensors, dtypes):
        codes, s = formats.fp8_quantize(a)
        tensors[name], dtypes[name] = codes, "F8_E4M3"
        tensors[name + "_scale_inv"] = s
        return formats.fp8_dequantize(codes, s).astype(np.float32)

    rule = fp8 or default
    deq = quantize_state(m, lambda name, a: rule(name, a, tensors, dtypes), projections)
    for name, p in m.state_dict().items():
        if deq[name] is None:
            tensors[name] = p.detach().float().numpy()
            deq[name] = p.detach().clone()
    if rename is not None:
        tensors = {rename(k): v for k, v in tensors.items()}
        dtypes = {rename(k): v for k, v in dtypes.items()}
    save_file(tensors, d / "model.safetensors", dtypes)
    cfg = json.loads(json.dumps(m.config.to_dict()))
    cfg["architectures"] = [type(m).__name__]
    cfg["quantization_config"] = quantization or {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return deq


def test_fp8_checkpoint_against_dequantized_transformers(tmp_path):
    m = random_model({})
    deq = write_fp8_checkpoint(m, tmp_path)
    m.load_state_dict(deq)
    with torch.no_grad():
        ref = m(torch.tensor([PROMPT])).logits[0]
    cfg, mine = models.load(tmp_path)
    assert cfg.is_fp8 and mine.blocks[1].ffn.experts.fmt == "fp8"
    out = mine.forward(torch.tensor(PROMPT), mine.new_cache())
    assert (out - ref).abs().max() <= LOGIT_TOL * ref.abs().max()


def _decode_modes(mine, cfg, ids, past, monkeypatch):
    """The logits of ids[past:] after ids[:past], with attention absorbed (ABSORB_MAX_TOKENS
    at least the new tokens) and with every cached latent expanded afresh (nothing absorbed);
    the cache holds the latent alone."""
    from refmoe.models import deepseek_v3

    got = {}
    new = len(ids) - past
    for mode, absorb, room in (("absorbed", max(8, new), 1 << 40), ("expanded", 0, 0)):
        monkeypatch.setattr(deepseek_v3, "ABSORB_MAX_TOKENS", absorb)
        monkeypatch.setattr(deepseek_v3, "ABSORB_BYTES", room)
        cache = mine.new_cache()
        if past:
            mine.forward(ids[:past], cache)
        got[mode] = mine.forward(ids[past:], cache)
        assert cache.length == len(ids)
        assert all(
            layer.kv.view().shape == (len(ids), cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            for layer in cache.layers
        )
    return got


@pytest.mark.parametrize(
    "past, new", [(0, 1), (11, 1), (11, 3), (40, 8), (5, 2), (23, 2), (60, 20), (33, 40)]
)
def test_absorbed_decode_equals_expanded(saved, monkeypatch, past, new):
    """Decode attention with kv_b absorbed into the query and output (the latent cache read
    as it is) gives the logits of expanding every cached latent into keys and values afresh;
    the latent cache holds kv_lora_rank + rope_dim floats per token and layer."""
    _, d = saved
    cfg, mine = models.load(d)
    got = _decode_modes(mine, cfg, torch.tensor((PROMPT * 10)[: past + new]), past, monkeypatch)
    assert not mine.blocks[0].attn._absorb_weights().fp8  # float weights: float32 halves
    ref = got["expanded"]
    assert (got["absorbed"] - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.fixture(scope="module")
def fp8_heads(tmp_path_factory):
    """An FP8 checkpoint whose heads are whole 128-row scale blocks (DeepSeek-V3's own head
    dims, two heads), so absorbed decode runs kv_b's FP8 codes per head."""
    m = random_model(
        dict(qk_nope_head_dim=128, v_head_dim=128, num_attention_heads=2, num_key_value_heads=2)
    )
    d = tmp_path_factory.mktemp("fp8_heads")
    m.load_state_dict(write_fp8_checkpoint(m, d))
    return m, d


@pytest.mark.parametrize("past, new", [(0, 1), (11, 1), (30, 3), (40, 8), (60, 20)])
@pytest.mark.usefixtures("float32_tiles")
def test_fp8_absorbed_decode(fp8_heads, monkeypatch, past, new):
    """Absorbed decode through the FP8 per-head kernel (kv_b's value halves read in place, its
    key halves transposed) equals fresh expansion, and transformers on the dequantized
    weights; no float32 copy of kv_b is made."""
    m, d = fp8_heads
    cfg, mine = models.load(d)
    ids = torch.tensor((PROMPT * 10)[: past + new])
    got = _decode_modes(mine, cfg, ids, past, monkeypatch)
    w = mine.blocks[0].attn._absorb_weights()
    assert w.fp8 and not hasattr(w, "w_uk")
    assert np.shares_memory(w.wv, mine.blocks[0].attn.kv_b.codes)
    ref = got["expanded"]
    assert (got["absorbed"] - ref).abs().max() <= 1e-5 * ref.abs().max()
    with torch.no_grad():
        hf = m(ids[None]).logits[0, past:]
    assert (got["absorbed"] - hf).abs().max() <= LOGIT_TOL * hf.abs().max()


class TestBadCheckpoints:
    def test_truncated_shard(self, saved, tmp_path):
        _, d = saved
        data = (d / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
        (tmp_path / "config.json").write_text((d / "config.json").read_text())
        with pytest.raises(ValueError, match=r"model\.safetensors: truncated: tensor"):
            models.load(tmp_path)

    def test_shape_mismatch_names_tensor(self, saved, tmp_path):
        _, d = saved
        cfg = json.loads((d / "config.json").read_text())
        cfg["moe_intermediate_size"] += 8
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        (tmp_path / "model.safetensors").symlink_to(d / "model.safetensors")
        with pytest.raises(
            ValueError,
            match=r"tensor 'model\.layers\.\d\.mlp\.(shared_)?experts"
            r".* has shape \[\d+, \d+\], the config needs",
        ):
            models.load(tmp_path)

    def test_nan_fp8_code_names_tensor(self, tmp_path):
        m = random_model({})
        write_fp8_checkpoint(m, tmp_path)
        ck = Checkpoint(tmp_path)
        name = "model.layers.2.mlp.experts.5.down_proj.weight"
        tensors = {n: np.array(ck._shard(n).array(n)) for n in ck.names()}
        tensors[name][4, 2] = 0xFF
        dtypes = {n: "F8_E4M3" for n in ck.names() if ck.dtype(n) == "float8_e4m3fn"}
        save_file(tensors, tmp_path / "model.safetensors", dtypes)
        with pytest.raises(
            ValueError,
            match=r"experts\.5\.down_proj\.weight'?: NaN FP8 code at "
            r"index \(4, 2\)",
        ):
            models.load(tmp_path)

    def test_unknown_architecture(self, saved, tmp_path):
        _, d = saved
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["LlamaForCausalLM"]
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="unknown architecture"):
            models.load(tmp_path)

    def test_model_larger_than_memory(self, saved):
        _, d = saved
        ck = Checkpoint(d)
        with pytest.raises(
            ValueError,
            match=r"the weights take .* GiB, more than this "
            r"machine's .* GiB of memory",
        ):
            ck.check_fits(ck.nbytes - 1)
        ck.check_fits(ck.nbytes)

    def test_missing_shard_in_index(self, saved, tmp_path):
        _, d = saved
        (tmp_path / "config.json").write_text((d / "config.json").read_text())
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
        )
        with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors: shard not found"):
            models.load(tmp_path)


def test_generate_rejects_bad_requests(saved):
    from refmoe.generate import generate

    _, d = saved
    _, mine = models.load(d)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(mine, [], 4)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        generate(mine, [5, 200], 4)
    with pytest.raises(ValueError, match="exceeds the context of 256 tokens"):
        generate(mine, [5] * 250, 10)


def test_generate_stops_at_a_stop_id(saved):
    from refmoe.generate import generate

    _, d = saved
    _, mine = models.load(d)
    free = generate(mine, PROMPT, 12)
    stop = free.token_ids[5]
    first = free.token_ids.index(stop)
    g = generate(mine, PROMPT, 12, stop_ids=[stop])
    assert g.token_ids == free.token_ids[: first + 1] and g.finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.token_ids) == 12


def test_device_seam(saved):
    _, d = saved
    _, on_cpu = models.load(d, device="cpu")
    _, auto = models.load(d, device="auto")
    ids = torch.tensor(PROMPT)
    assert torch.equal(on_cpu.forward(ids, on_cpu.new_cache()), auto.forward(ids, auto.new_cache()))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.load(d, device="cuda")
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        models.load(d, device="tpu")


def test_convert_to_fp8(saved, tmp_path):
    m, d = saved
    out = tmp_path / "fp8"
    subprocess.run(
        [sys.executable, "-m", "refmoe.cli", "convert", "--model", str(d), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    src, dst = Checkpoint(d), Checkpoint(out)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    codes, scale = formats.fp8_quantize(np.array(src.get(name), np.float64))
    assert dst.dtype(name) == "float8_e4m3fn"
    np.testing.assert_array_equal(dst.get(name), codes)
    np.testing.assert_array_equal(dst.get(name + "_scale_inv"), scale)
    np.testing.assert_array_equal(dst.get("model.norm.weight"), src.get("model.norm.weight"))
    cfg, mine = models.load(out)
    assert cfg.is_fp8 and mine.blocks[-1].ffn.experts.fmt == "fp8"
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "refmoe.cli",
            "convert",
            "--model",
            str(out),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "already an FP8 checkpoint" in again.stderr


def test_fp8_absorbed_batch_reads_kv_b_once(fp8_heads, monkeypatch):
    """Several sequences decoding together (1, 1 and 3 new tokens after 5, 17 and 30 cached):
    each gets the logits it gets alone, and each layer runs kv_b's two absorbed products once
    for the whole batch (two kernel calls per layer, not two per sequence)."""
    from refmoe import kernels

    _, d = fp8_heads
    cfg, mine = models.load(d)
    ids = torch.tensor(PROMPT * 4)
    plan = [(5, 1), (17, 1), (30, 3)]
    alone, caches = [], []
    for past, new in plan:
        cache = mine.new_cache()
        mine.forward(ids[:past], cache)
        alone.append(mine.forward(ids[past : past + new], cache)[-1])
        caches.append(mine.new_cache())
        mine.forward(ids[:past], caches[-1])
    calls = []
    real = kernels.fp8_gemm_heads
    monkeypatch.setattr(
        kernels, "fp8_gemm_heads", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k)
    )
    got = mine.forward_batch([ids[p : p + n] for p, n in plan], caches)
    assert len(calls) == 2 * cfg.num_hidden_layers
    assert all(shape[1] == 5 for shape in calls)  # 1 + 1 + 3 tokens at once
    for row, ref in zip(got, alone):
        assert (row - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_absorbed_attention_where_it_costs_less():
    """A chunk of a prompt after a long past runs absorbed when that takes fewer FLOPs than
    expanding the whole cache through kv_b (measured: 18-token chunks after 2K tokens,
    expanded, made a chunked prefill 17x slower than alone), within a bound on its scores."""
    from sim_common import V3

    from refmoe.config import ModelConfig
    from refmoe.models.deepseek_v3 import MLA

    cfg = ModelConfig.from_dict(V3)  # DeepSeek-V3's attention dimensions, 128 heads
    mla = MLA.__new__(MLA)  # the rule reads the dimensions only
    mla.cfg, mla.n = cfg, 128
    assert mla._absorb_pays(1, 1) and mla._absorb_pays(8, 100_000)  # decode: always
    assert mla._absorb_pays(20, 2048) and mla._absorb_pays(100, 4096)
    assert not mla._absorb_pays(2048, 2048)  # a prompt from position 0: expanded
    assert not mla._absorb_pays(330, 4400)  # a turn after a cached prefix: expanded is cheaper
    assert not mla._absorb_pays(150, 100_000)  # 7.7 GB of scores: over ABSORB_BYTES
    assert not mla._absorb_pays(0, 10)


def test_prefill_runs_the_lm_head_on_the_last_position_only(saved):
    """A prefill samples one token: generate, the engine's CPU prefill and SLP give the LM
    head one row, not the prompt's T rows (the simulator charges no head over the prompt)."""
    from refmoe import slp
    from refmoe.generate import generate

    _, d = saved
    _, mine = models.load(d)
    ids = torch.tensor(PROMPT)
    full = mine.forward(ids, mine.new_cache())
    last = mine.forward(ids, mine.new_cache(), logits="last")
    assert last.shape == (1, full.shape[1])
    torch.testing.assert_close(last, full[-1:])
    rows = []
    head = mine.head

    def counting(x):
        rows.append(x.shape[0])
        return head(x)

    mine.head = counting
    g = generate(mine, PROMPT, 3)
    assert rows == [1, 1, 1] and len(g.token_ids) == 3
    rows.clear()
    runner = slp.StreamPrefill(mine, ring=2, chunk_tokens=4)
    out = runner.prefill(ids, mine.new_cache(), all_logits=False)
    torch.testing.assert_close(out, full[-1:])
    assert rows == [1]
