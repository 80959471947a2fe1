"""Checkpoints whose routed experts are stored in the 4-bit formats (MXFP4, NVFP4,
compressed-tensors INT4), end to end against transformers on the dequantized weights.

Each tiny random model (DeepSeek-V3 and Qwen3-MoE, saved with save_pretrained) is converted by
`refmoe convert --expert-format F`, loaded by refmoe as stored, and compared with transformers
running the same model with every routed expert replaced by its exact dequantized values.

The 4-bit kernels run the experts on activations quantized to int8 per chunk of 32 (as ggml's
q8_0 and KTransformers do): at these toy widths (K = 40-72, two chunks) that moves one expert's
output by about 1%, and through the routers of later layers the logits by up to 15%. So the
oracle applies the same quantization to its expert inputs: transformers' own expert code runs,
with torch.nn.functional.linear given formats.q8_quantize(x) where its weight is an expert's.
What remains is float32 rounding, held to the bound every family test uses.
"""

import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import cli_generate, hf_greedy
from test_deepseek_v3 import PROMPT, random_model, write_fp8_checkpoint
from test_slp import save_tiny_qwen3

from refmoe import kernels, models
from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.kernels import formats
from refmoe.models.experts import read_projection

transformers = pytest.importorskip("transformers")
TOL = 1e-4


@contextlib.contextmanager
def q8_expert_inputs(m):
    """transformers' F.linear sees int8-per-32 quantized inputs where the weight is a routed
    expert's (the gate_up_proj / down_proj parameters of its fused expert modules)."""
    ptrs = {
        p.untyped_storage().data_ptr()
        for n, p in m.named_parameters()
        if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
    }
    real = torch.nn.functional.linear
    seen = []

    def linear(x, w, b=None):
        if w.untyped_storage().data_ptr() in ptrs:
            seen.append(1)
            flat = x.detach().reshape(-1, x.shape[-1]).float().numpy()
            x = torch.from_numpy(formats.q8_quantize(flat)[1]).reshape(x.shape).to(x.dtype)
        return real(x, w, b)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = real
    assert seen, "the oracle's experts never called F.linear"


def convert(src, dst, fmt):
    return subprocess.run(
        [sys.executable, "-m", "refmoe.cli", "convert", "--model", str(src), "--out", str(dst)]
        + ["--expert-format", fmt],
        capture_output=True,
        text=True,
        timeout=300,
    )


def dequantized_oracle(m, converted) -> None:
    """Replace m's routed experts (transformers 5 holds them fused: gate_up_proj [E, 2I, H],
    down_proj [E, H, I]) by the exact values of the converted checkpoint's."""
    cfg = ModelConfig.from_file(converted)
    ck, (_, group) = Checkpoint(converted), cfg.expert_format
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    state = m.state_dict()
    for name in list(state):
        if not name.endswith("experts.gate_up_proj"):
            continue
        prefix = name[: -len("gate_up_proj")]
        gate_up, down = [], []
        for e in range(state[name].shape[0]):
            base = f"{prefix}{e}"
            g = read_projection(ck, f"{base}.gate_proj", (i, h), group).dense(h)
            u = read_projection(ck, f"{base}.up_proj", (i, h), group).dense(h)
            gate_up.append(np.concatenate([g, u]))
            down.append(read_projection(ck, f"{base}.down_proj", (h, i), group).dense(i))
        state[name] = torch.from_numpy(np.stack(gate_up)).float()
        state[prefix + "down_proj"] = torch.from_numpy(np.stack(down)).float()
    m.load_state_dict(state)


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def source(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "deepseek_v3":
        random_model({}).save_pretrained(d)
    else:
        save_tiny_qwen3(d, seed=3)
    return d


@pytest.mark.parametrize("fmt", kernels.LUT4_FORMATS)
def test_logits_and_greedy_against_dequantized_transformers(source, fmt, tmp_path):
    out = tmp_path / fmt
    done = convert(source, out, fmt)
    assert done.returncode == 0, done.stderr
    cfg, mine = models.load(out)
    assert cfg.expert_format[0] == fmt
    ffn = next(b.ffn for b in mine.blocks if hasattr(b.ffn, "experts"))
    assert ffn.experts.fmt == fmt
    # the routed experts are views of the mapped checkpoint, not copies
    assert not ffn.experts.gate[0].flags.owndata
    m = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    dequantized_oracle(m, out)
    m.config._experts_implementation = "eager"  # the loop over experts that calls F.linear
    with torch.no_grad(), q8_expert_inputs(m):
        ref = m(torch.tensor([PROMPT])).logits[0]
        want = hf_greedy(m, PROMPT, 32)
    got = mine.forward(torch.tensor(PROMPT), mine.new_cache())
    assert (got - ref).abs().max() <= TOL * ref.abs().max()
    # the CPU kernels all the way (auto may stream the prompt through SLP, which runs the
    # experts in float on its device: test_slp_streams_the_packed_bytes)
    gen = cli_generate(
        out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", "32", "--prefill", "cpu"
    )
    assert len(want) == 32 and gen["token_ids"] == want


def test_contradictory_or_unknown_quantization_refused(source, tmp_path):
    out = tmp_path / "mx"
    assert convert(source, out, "mxfp4").returncode == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="stored as mxfp4, but config.json's .* says nvfp4"):
        models.load(out)
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization_config.quant_method: refmoe reads"):
        models.load(out)
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8"}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization_config.quant_algo"):
        models.load(out)
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (out / "config.json").write_text(json.dumps(cfg))
    again = convert(out, tmp_path / "again", "int4g")
    assert again.returncode == 2 and "already a" in again.stderr


def test_compressed_tensors_fields_checked(source, tmp_path):
    out = tmp_path / "ct"
    assert convert(source, out, "int4g").returncode == 0
    cfg = json.loads((out / "config.json").read_text())
    weights = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    for key, bad, match in (
        ("symmetric", False, "weights.symmetric: expected True"),
        ("num_bits", 8, "weights.num_bits: expected 4"),
        ("group_size", 48, "weights.group_size: a multiple of 32"),
    ):
        broken = json.loads(json.dumps(cfg))
        broken["quantization_config"]["config_groups"]["group_0"]["weights"][key] = bad
        (out / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            models.load(out)
    assert weights["group_size"] == 32


def test_nan_scale_in_a_checkpoint_named(source, tmp_path):
    out = tmp_path / "mx"
    assert convert(source, out, "mxfp4").returncode == 0
    ck = Checkpoint(out)
    name = next(n for n in ck.names() if n.endswith("experts.2.up_proj.weight_scales"))
    shard = ck._shard(name)
    raw = bytearray(shard.path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    raw[8 + header_len + header[name]["data_offsets"][0] + 3] = 0xFF
    shard.path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"experts\.2\.up_proj\.weight_scales?: NaN scale"):
        models.load(out)


def test_load_converts_to_a_4bit_format_on_request(source):
    cfg, mine = models.load(source, "int4g")
    ffn = next(b.ffn for b in mine.blocks if hasattr(b.ffn, "experts"))
    assert ffn.experts.fmt == "int4g" and ffn.experts.group_size == 32


@pytest.mark.parametrize("fmt", kernels.LUT4_FORMATS)
@pytest.mark.parametrize("packed", [False, True])
def test_slp_streams_the_packed_bytes(source, fmt, packed, tmp_path):
    """Stream-loading prefill moves the 4-bit bytes as stored (a slot holds the packed codes
    and the scales, not a conversion) and dequantizes them on its device, in float: its logits
    match transformers on the dequantized weights without any activation quantization."""
    from refmoe import expert_store, slp

    out = tmp_path / fmt
    assert convert(source, out, fmt).returncode == 0
    _, mine = models.load(out)
    if packed:  # the one host copy, packed at load (as on CUDA): 4-bit views into it
        expert_store.pack_model(mine, pin=False)
    runner = slp.StreamPrefill(mine, ring=2, pin=packed)
    experts = runner.moe[0][1].experts
    assert runner.layout.fmt == fmt
    stored = sum(experts.nbytes(0) for _ in [0])
    assert stored <= runner.layout.nbytes < stored + 12 * expert_store.ALIGN
    fp8_like = 3 * experts.hidden * experts.intermediate  # one byte a weight
    assert runner.layout.nbytes < 0.75 * fp8_like + 12 * expert_store.ALIGN
    m = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    dequantized_oracle(m, out)
    with torch.no_grad():
        ref = m(torch.tensor([PROMPT])).logits[0]
    got = runner.prefill(torch.tensor(PROMPT), mine.new_cache())
    assert (got - ref).abs().max() <= TOL * ref.abs().max()
    assert runner.stats.experts_loaded > 0


# ---------------------------------------------------------------------------------------------
# FP8 with other block sizes and E8M0 (power-of-two) scales
# ---------------------------------------------------------------------------------------------


def write_fp8_blocks(m, d, block: tuple[int, int], e8m0: bool) -> dict:
    """m's projections as FP8 with one scale per block (bn x bk), each a power of two stored as
    E8M0 codes (F8_E8M0) or float32; returns the exactly dequantized state for transformers."""
    bn, bk = block

    def fp8(name, a, tensors, dtypes):
        n, k = a.shape
        nb, kb = -(-n // bn), -(-k // bk)
        pad = np.zeros((nb * bn, kb * bk))
        pad[:n, :k] = np.abs(a)
        amax = pad.reshape(nb, bn, kb, bk).max(axis=(1, 3))
        e = np.ceil(np.log2(np.maximum(amax, 1e-30) / 448.0)).astype(np.int64)  # 2^e >= amax/448
        full = np.repeat(np.repeat(np.ldexp(1.0, e), bn, 0), bk, 1)[:n, :k]
        codes = formats.fp8_encode(a / full)
        tensors[name], dtypes[name] = codes, "F8_E4M3"
        if e8m0:
            tensors[name + "_scale_inv"] = (e + 127).astype(np.uint8)
            dtypes[name + "_scale_inv"] = "F8_E8M0"
        else:
            tensors[name + "_scale_inv"] = np.ldexp(1.0, e).astype(np.float32)
        return (formats.fp8_decode(codes) * full).astype(np.float32)

    quantization = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "scale_fmt": "ue8m0",
    }
    return write_fp8_checkpoint(m, d, fp8, quantization)


@pytest.mark.parametrize(
    "block, e8m0", [((256, 128), True), ((128, 256), False), ((256, 384), True)]
)
def test_fp8_other_blocks_and_e8m0_scales(tmp_path, block, e8m0):
    """DeepSeek-V3.1-style FP8 (power-of-two scales, E8M0 codes or float32) with blocks larger
    than 128x128, at widths that span several blocks: logits against transformers on the
    dequantized weights."""
    m = random_model(dict(hidden_size=272, moe_intermediate_size=160, intermediate_size=288))
    deq = write_fp8_blocks(m, tmp_path, block, e8m0)
    m.load_state_dict(deq)
    with torch.no_grad():
        ref = m(torch.tensor([PROMPT])).logits[0]
    cfg, mine = models.load(tmp_path)
    assert cfg.fp8_block == block and mine.blocks[1].ffn.experts.fmt == "fp8"
    got = mine.forward(torch.tensor(PROMPT), mine.new_cache())
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_fp8_block_and_e8m0_errors(tmp_path):
    m = random_model({})
    write_fp8_blocks(m, tmp_path, (128, 128), True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 0]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weight_block_size: two positive block sizes"):
        models.load(tmp_path)
    # any block is read, but the stored scales must be the ones it gives
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weight_scale_inv' has shape \[1, 1\], the config needs"):
        models.load(tmp_path)
    cfg["quantization_config"]["weight_block_size"] = [128, 128]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ck = Checkpoint(tmp_path)
    name = "model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"
    shard = ck._shard(name)
    raw = bytearray(shard.path.read_bytes())
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    raw[8 + int.from_bytes(raw[:8], "little") + header[name]["data_offsets"][0]] = 0xFF
    shard.path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"experts.0.up_proj.weight_scale_inv'?: NaN E8M0"):
        models.load(tmp_path)
