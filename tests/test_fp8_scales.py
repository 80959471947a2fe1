"""FP8 checkpoints whose scales are not DeepSeek's 128 x 128: any weight_block_size, and the
compressed-tensors "float-quantized" layouts llm-compressor writes (per output channel, per
tensor, per block; `weight_scale` in float32 or bfloat16). Each is read as stored and run by
the FP8 kernels with its own block, end to end against transformers on the exact dequantized
weights (tiny random DeepSeek-V3: its attention projections, MLA's kv_b split per head, and
the routed and shared experts are all FP8)."""

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import cli_generate, hf_greedy
from test_deepseek_v3 import LOGIT_TOL, PROMPT, random_model, write_fp8_checkpoint

from refmoe import models
from refmoe.config import ModelConfig
from refmoe.convert import fp8_quantization_config
from refmoe.kernels import formats

transformers = pytest.importorskip("transformers")
WHOLE = formats.WHOLE

# name -> (layout, block, scale dtype). The tiny model's kv_b has 4 heads of 16 + 12 rows: (4,
# 16) and (1, WHOLE) split per head, (WHOLE, WHOLE) is one block for all, (64, 48) cuts across
# heads (kv_b then runs in float32 per head; everything else in FP8 with that block)
CASES = {
    "deepseek-64x48": ("deepseek", (64, 48), "F32"),
    "deepseek-4x16": ("deepseek", (4, 16), "F32"),
    "ct-channel": ("compressed-tensors", (1, WHOLE), "F32"),
    "ct-channel-bf16": ("compressed-tensors", (1, WHOLE), "BF16"),
    "ct-tensor": ("compressed-tensors", (WHOLE, WHOLE), "F32"),
    "ct-block-32x24": ("compressed-tensors", (32, 24), "F32"),
}


def writer(layout, block, scale_dtype):
    """A write_fp8_checkpoint rule: the tensors of one FP8 weight in this layout, and its exact
    dequantized values."""

    def rule(name, a, tensors, dtypes):
        codes, s = formats.fp8_quantize(a, block)
        if scale_dtype == "BF16":  # scales rounded to bf16 first: stored exactly
            s = s.astype(ml_dtypes.bfloat16).astype(np.float32)
        tensors[name], dtypes[name] = codes, "F8_E4M3"
        if layout == "deepseek":
            tensors[name + "_scale_inv"] = s
        else:
            stored = s.reshape(-1) if block == (WHOLE, WHOLE) else s
            if scale_dtype == "BF16":
                stored, dtypes[name + "_scale"] = formats.bf16_encode(stored), "BF16"
            tensors[name + "_scale"] = stored
        return formats.fp8_dequantize(codes, s, block).astype(np.float32)

    return rule


@pytest.fixture(scope="module", params=list(CASES))
def written(request, tmp_path_factory):
    layout, block, scale_dtype = CASES[request.param]
    m = random_model({})
    d = tmp_path_factory.mktemp(request.param)
    deq = write_fp8_checkpoint(
        m,
        d,
        fp8=writer(layout, block, scale_dtype),
        quantization=fp8_quantization_config(layout, block),
    )
    m.load_state_dict(deq)
    return request.param, m, d


def test_logits_against_dequantized_transformers(written):
    case, m, d = written
    layout, block, _ = CASES[case]
    with torch.no_grad():
        ref = m(torch.tensor([PROMPT])).logits[0]
    cfg, mine = models.load(d)
    assert cfg.is_fp8 and cfg.fp8_block == block
    ffn = mine.blocks[1].ffn
    assert ffn.experts.fmt == "fp8" and ffn.experts.fp8_block == block
    assert not ffn.experts.gate[0].flags.owndata  # the codes are views of the mapped file
    attn = mine.blocks[0].attn
    assert attn.kv_b.block == block and attn.kv_b.codes is not None
    out = mine.forward(torch.tensor(PROMPT), mine.new_cache())
    assert (out - ref).abs().max() <= LOGIT_TOL * ref.abs().max()


def test_absorbed_heads_take_the_block(written):
    """MLA's kv_b runs per head through the FP8 kernels where each head's rows are whole row
    blocks (or one block holds them all), and decode gives the expanded path's logits."""
    case, m, d = written
    _, block, _ = CASES[case]
    from refmoe.models.deepseek_v3 import Absorbed

    cfg, mine = models.load(d)
    kv_b = mine.blocks[0].attn.kv_b
    heads = Absorbed(kv_b, cfg)
    assert heads.fp8 == (block[0] in (1, 4) or block == (WHOLE, WHOLE))
    rng = np.random.default_rng(0)
    n, nope, v, lora = 4, 16, 12, 24
    w = kv_b.dense().numpy().reshape(n, nope + v, lora).astype(np.float64)
    q = rng.standard_normal((n, 3, nope)).astype(np.float32)
    o = rng.standard_normal((n, 3, lora)).astype(np.float32)
    keys = heads.keys(torch.from_numpy(q)).numpy()
    values = heads.values(torch.from_numpy(o)).numpy()
    want_k = np.einsum("htd,hdl->htl", q.astype(np.float64), w[:, :nope])
    want_v = np.einsum("htl,hvl->htv", o.astype(np.float64), w[:, nope:])
    assert np.abs(keys - want_k).max() <= 1e-5 * np.abs(want_k).max()
    assert np.abs(values - want_v).max() <= 1e-5 * np.abs(want_v).max()


def test_greedy_32_tokens_via_cli(written):
    case, m, d = written
    if case not in ("ct-channel", "deepseek-64x48"):
        pytest.skip("two layouts through the CLI are enough")
    want = hf_greedy(m, PROMPT, 32)
    got = cli_generate(
        d, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", "32", "--prefill", "cpu"
    )
    assert len(want) == 32 and got["token_ids"] == want


@pytest.mark.parametrize("scales", ["channel", "tensor", "ct-32x16", "64x32"])
def test_convert_writes_each_layout(scales, tmp_path):
    """`refmoe convert --fp8-scales` writes the layout its config declares, and refmoe runs it
    as transformers runs the weights it stands for."""
    src = tmp_path / "src"
    m = random_model({}, seed=1)
    m.save_pretrained(src)
    tokenizer_files = {"tiktoken.model": "IQ== 0\n", "chat_template.jinja": "{{ messages }}"}
    for f, text in tokenizer_files.items():  # Kimi's tokenizer, transformers 5's template
        (src / f).write_text(text)
    out = tmp_path / scales
    done = subprocess.run(
        [sys.executable, "-m", "refmoe.cli", "convert", "--model", str(src), "--out", str(out)]
        + ["--fp8-scales", scales],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert {f: (out / f).read_text() for f in tokenizer_files} == tokenizer_files
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    cfg = ModelConfig.from_file(out)
    if scales in ("channel", "tensor") or scales.startswith("ct-"):
        assert q["format"] == "float-quantized"
    else:
        assert q["weight_block_size"] == [64, 32]
    cfg, mine = models.load(out)
    state = m.state_dict()
    from refmoe.checkpoint import Checkpoint

    ck = Checkpoint(out)  # reads its FP8 block from config.json itself
    assert (ck.fp8_block, ck.fp8_block_default) == (cfg.fp8_block, cfg.fp8_block_default)
    deq = {}
    for name, p in state.items():  # attention and dense projections: dequantized as stored
        if name in ck and ck.dtype(name) == "float8_e4m3fn":
            s, block = ck.fp8_scales(name, tuple(p.shape))
            deq[name] = torch.from_numpy(formats.fp8_dequantize(ck.get(name), s, block)).float()
    from test_expert_formats import dequantized_oracle

    m.load_state_dict({**state, **deq})
    dequantized_oracle(m, out)
    with torch.no_grad():
        ref = m(torch.tensor([PROMPT])).logits[0]
    got = mine.forward(torch.tensor(PROMPT), mine.new_cache())
    assert (got - ref).abs().max() <= LOGIT_TOL * ref.abs().max()


def _config(tmp_path, quantization):
    m = random_model({})
    m.config.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = quantization
    return cfg


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda q: q | {"weight_block_size": [128, 0]}, r"weight_block_size: two positive"),
        (lambda q: q | {"weight_block_size": [128]}, r"weight_block_size: two positive"),
    ],
)
def test_fp8_block_size_checked(change, match, tmp_path):
    cfg = _config(tmp_path, change(fp8_quantization_config("deepseek", (128, 128))))
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(cfg)


def _ct_weights(q):
    return q["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda w: w.update(strategy="group"), r"weights\.strategy: refmoe reads FP8 by block"),
        (lambda w: w.update(num_bits=4), r"weights\.num_bits: expected 8"),
        (lambda w: w.update(type="int"), r"weights\.type: expected 'float'"),
        (lambda w: w.update(symmetric=False), r"weights\.symmetric: expected True"),
        (lambda w: w.update(dynamic=True), r"weights\.dynamic: FP8 weights carry"),
        (
            lambda w: w.update(strategy="block", block_structure=[0, 128]),
            r"weights\.block_structure: two positive",
        ),
        (lambda w: w.update(strategy="block"), r"weights\.block_structure: two positive"),
    ],
)
def test_compressed_tensors_fp8_fields_checked(change, match, tmp_path):
    q = fp8_quantization_config("compressed-tensors", (1, WHOLE))
    change(_ct_weights(q))
    cfg = _config(tmp_path, q)
    with pytest.raises(ValueError, match="config.json: quantization_config.config_groups.group_0"):
        ModelConfig.from_dict(cfg, "config.json")
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(cfg, "config.json")


def test_two_fp8_schemes_refused(tmp_path):
    q = fp8_quantization_config("compressed-tensors", (1, WHOLE))
    other = json.loads(json.dumps(q["config_groups"]["group_0"]))
    other["weights"]["strategy"] = "tensor"
    q["config_groups"]["group_1"] = other
    with pytest.raises(ValueError, match="config_groups: one FP8 weight scheme, got 2"):
        ModelConfig.from_dict(_config(tmp_path, q), "config.json")


def test_scales_that_do_not_fit_the_block_are_named(tmp_path):
    """A checkpoint whose stored scales do not have the shape its config's block gives is
    refused naming the tensor and both shapes; a NaN bf16 scale names its index."""
    m = random_model({})
    write_fp8_checkpoint(
        m,
        tmp_path,
        fp8=writer("compressed-tensors", (1, WHOLE), "F32"),
        quantization=fp8_quantization_config("compressed-tensors", (32, 24)),
    )
    with pytest.raises(ValueError, match=r"tensor '.*_proj\.weight_scale' has shape \[\d+, 1\]"):
        models.load(tmp_path)
    write_fp8_checkpoint(
        m,
        tmp_path,
        fp8=writer("compressed-tensors", (1, WHOLE), "BF16"),
        quantization=fp8_quantization_config("compressed-tensors", (1, WHOLE)),
    )
    from refmoe.checkpoint import Checkpoint, save_file

    ck = Checkpoint(tmp_path)
    tensors = {n: np.array(ck.get(n)) for n in ck.names()}
    dtypes = {n: {"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3"}.get(ck.dtype(n)) for n in tensors}
    name = next(n for n in tensors if n.endswith("q_a_proj.weight_scale"))
    tensors[name][5] = 0x7FC0  # a bf16 NaN
    save_file(tensors, tmp_path / "model.safetensors", {k: v for k, v in dtypes.items() if v})
    with pytest.raises(ValueError, match=rf"tensor '{name}': nan at index \(5, 0\)"):
        models.load(tmp_path)


@pytest.mark.parametrize("packed", [False, True])
def test_slp_streams_each_layout_as_stored(written, packed):
    """Stream-loading prefill moves the FP8 codes and the scales as stored (a slot holds
    exactly their bytes, whatever the block) and dequantizes them with their block on its
    device: the logits match transformers on the dequantized weights."""
    from refmoe import expert_store, slp

    case, m, d = written
    _, block, _ = CASES[case]
    _, mine = models.load(d)
    if packed:
        expert_store.pack_model(mine, pin=False)
    runner = slp.StreamPrefill(mine, ring=2, pin=packed)
    experts = runner.moe[0][1].experts
    assert runner.layout.fmt == "fp8" and experts.fp8_block == block
    assert experts.nbytes(0) <= runner.layout.nbytes < experts.nbytes(0) + 6 * expert_store.ALIGN
    with torch.no_grad():
        ref = m(torch.tensor([PROMPT])).logits[0]
    got = runner.prefill(torch.tensor(PROMPT), mine.new_cache())
    assert (got - ref).abs().max() <= LOGIT_TOL * ref.abs().max()
    assert runner.stats.experts_loaded > 0


@pytest.mark.parametrize(
    "block", [(128, 128), (1, WHOLE), (WHOLE, WHOLE), (64, 48), (32, 96), (200, 7)]
)
@pytest.mark.parametrize("shape", [(256, 384), (130, 75)])
def test_device_dequant_takes_the_block(block, shape):
    """The device side of SLP (torch on a GPU, the kernels' table on the CPU) dequantizes every
    block layout exactly: code times its block's scale in float32, the broadcast path where the
    blocks tile the matrix and the repeated one where they do not."""
    from refmoe.device_matmul import block_dequant, torch_block_dequant

    rng = np.random.default_rng(9)
    codes, s = formats.fp8_quantize(rng.standard_normal(shape), block)
    want = formats.fp8_dequantize(codes, s, block).astype(np.float32)
    c = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    for run in (torch_block_dequant, block_dequant):
        got = run(c, torch.from_numpy(s), torch.float32, block).numpy()
        assert np.array_equal(got, want), run.__name__
