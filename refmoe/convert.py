"""`refmoe convert`: a BF16/F32 checkpoint to a quantized format, once.

fp8 (the default): every projection weight (`*_proj.weight`, `kv_a_proj_with_mqa.weight`,
routed and shared experts included) becomes E4M3 codes plus float32 scales, laid out as
`fp8_scales` says:
  128x128 (the default), or any RxC: `weight_scale_inv` per block, as DeepSeek's own releases
         store them, {"quant_method": "fp8", "weight_block_size": [R, C]}
  channel, tensor, ct-RxC: `weight_scale` [N, 1], [1] or per block, as llm-compressor's FP8
         schemes write them (compressed-tensors "float-quantized", strategy channel, tensor
         or block; activations declared dynamic per token, which refmoe leaves in float)

mxfp4, nvfp4, int4g: the routed experts only (`mlp.experts.N.*_proj.weight`), as the 4-bit
releases ship them (attention, dense layers and shared experts stay as they are):
  mxfp4  `weight_blocks` uint8 [N, K/32, 16] + `weight_scales` uint8 E8M0 [N, K/32] (gpt-oss's
         suffixes), quantization_config {"quant_method": "mxfp4"}
  nvfp4  `weight` uint8 [N, K/2] + `weight_scale` E4M3 [N, K/16] + `weight_scale_2` float32,
         as NVIDIA ModelOpt writes them, {"quant_method": "modelopt", "quant_algo": "NVFP4"}
  int4g  `weight_packed` int32 [N, K/8] + `weight_scale` bf16 [N, K/32] + `weight_shape`, as
         compressed-tensors' pack-quantized format (Kimi K2-Thinking's layout)

Norms, the router, embeddings and lm_head are copied as they are. One shard per layer, an
index, config.json with quantization_config, and the tokenizer files beside them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from refmoe.checkpoint import Checkpoint, save_file
from refmoe.config import ModelConfig
from refmoe.kernels import formats

QUANTIZED = re.compile(r".*(_proj|_proj_with_mqa)\.weight$")
ROUTED = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
FORMATS = ("fp8", "mxfp4", "nvfp4", "int4g")
INT4G_GROUP = 32
ST_DTYPE = {
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "float8_e4m3fn": "F8_E4M3",
    "int64": "I64",
    "int32": "I32",
    "uint8": "U8",
}
COPIED = (
    "tokenizer.json",
    "tiktoken.model",  # Kimi's tokenizer
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
)


def _float(ck: Checkpoint, name: str) -> np.ndarray:
    a, dtype = ck.get(name), ck.dtype(name)
    return formats.bf16_decode(a) if dtype == "bfloat16" else np.asarray(a, np.float64)


def _four_bit(name: str, w: np.ndarray, fmt: str) -> tuple[dict, dict]:
    """One routed expert projection in a 4-bit format: (tensors, safetensors dtypes)."""
    base = name[: -len(".weight")]
    if fmt == "mxfp4":
        blocks, scales = formats.mxfp4_quantize(w)
        t = {f"{base}.weight_blocks": blocks, f"{base}.weight_scales": scales}
        return t, {n: "U8" for n in t}
    if fmt == "nvfp4":
        packed, scales, g = formats.nvfp4_quantize(w)
        t = {
            f"{base}.weight": packed,
            f"{base}.weight_scale": scales,
            f"{base}.weight_scale_2": np.array([g], np.float32),
        }
        return t, {f"{base}.weight": "U8", f"{base}.weight_scale": "F8_E4M3"}
    packed, bits = formats.int4g_quantize(w, INT4G_GROUP)
    t = {
        f"{base}.weight_packed": packed,
        f"{base}.weight_scale": bits,
        f"{base}.weight_shape": np.array(w.shape, np.int64),
    }
    return t, {f"{base}.weight_packed": "I32", f"{base}.weight_scale": "BF16"}


QUANTIZATION_CONFIG: dict[str, dict] = {
    "fp8": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
    "mxfp4": {"quant_method": "mxfp4"},
    "nvfp4": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16},
    "int4g": {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": INT4G_GROUP,
                },
            }
        },
    },
}


def fp8_layout(text: str) -> tuple[str, tuple[int, int]]:
    """--fp8-scales: (layout "deepseek" or "compressed-tensors", the block one scale covers)."""
    layout = "deepseek"
    if text in ("channel", "tensor"):
        whole = formats.WHOLE
        return "compressed-tensors", (1, whole) if text == "channel" else (whole, whole)
    if text.startswith("ct-"):
        layout, text = "compressed-tensors", text[3:]
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m or min(int(m.group(1)), int(m.group(2))) < 1:
        raise ValueError(
            f"--fp8-scales: RxC (a block of R rows and C columns, e.g. 128x128), ct-RxC, "
            f"channel or tensor, got {text!r}"
        )
    return layout, formats.check_block((int(m.group(1)), int(m.group(2))), "--fp8-scales")


def fp8_quantization_config(layout: str, block: tuple[int, int]) -> dict:
    """The quantization_config of FP8 weights in `layout` with scales per `block`."""
    if layout == "deepseek":
        return QUANTIZATION_CONFIG["fp8"] | {"weight_block_size": list(block)}
    whole = formats.WHOLE
    strategy = {(1, whole): "channel", (whole, whole): "tensor"}.get(block, "block")
    weights: dict = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    weights["strategy"] = strategy
    if strategy == "block":
        weights["block_structure"] = list(block)
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True}
    activations["strategy"] = "token"
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": activations,
            }
        },
        "ignore": ["lm_head"],
    }


def convert(
    src: str | Path,
    dst: str | Path,
    progress=None,
    expert_format: str = "fp8",
    fp8_scales: str = "128x128",
) -> Path:
    src, dst = Path(src), Path(dst)
    if expert_format not in FORMATS:
        raise ValueError(
            f"--expert-format must be one of {', '.join(FORMATS)}, got {expert_format!r}"
        )
    layout, block = fp8_layout(fp8_scales)
    cfg_dict = json.loads((src / "config.json").read_text())
    cfg = ModelConfig.from_dict(cfg_dict, str(src / "config.json"))
    if cfg.quantization is not None:
        what = "an FP8" if cfg.is_fp8 else f"a {cfg.expert_format[0]}"
        raise ValueError(f"{src}: already {what} checkpoint")
    ck = Checkpoint(src)
    dst.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[str]] = {}
    for name in ck.names():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        groups.setdefault(f"layer{int(m.group(1)):03d}" if m else "other", []).append(name)
    weight_map = {}
    for group in progress(sorted(groups)) if progress else sorted(groups):
        tensors, dtypes = {}, {}
        for name in groups[group]:
            dtype = ck.dtype(name)
            if expert_format != "fp8":
                if ROUTED.match(name) and dtype in ("float32", "bfloat16", "float16"):
                    t, dt = _four_bit(name, _float(ck, name), expert_format)
                    tensors.update(t)
                    dtypes.update(dt)
                else:
                    tensors[name], dtypes[name] = np.array(ck.get(name)), ST_DTYPE[dtype]
            elif (
                QUANTIZED.match(name)
                and len(ck.shape(name)) == 2
                and dtype in ("float32", "bfloat16", "float16")
            ):
                codes, scale = formats.fp8_quantize(_float(ck, name), block)
                tensors[name], dtypes[name] = codes, "F8_E4M3"
                if layout == "deepseek":
                    tensors[name + "_scale_inv"] = scale
                else:  # compressed-tensors: per channel [N, 1], per tensor [1]
                    per_tensor = block == (formats.WHOLE, formats.WHOLE)
                    tensors[name + "_scale"] = scale.reshape(-1) if per_tensor else scale
            else:
                tensors[name], dtypes[name] = np.array(ck.get(name)), ST_DTYPE[dtype]
        fname = f"model-{group}.safetensors"
        save_file(tensors, dst / fname, dtypes)
        weight_map.update({n: fname for n in tensors})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"converted_from": str(src)}, "weight_map": weight_map})
    )
    for f in COPIED:
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    cfg_dict["quantization_config"] = (
        fp8_quantization_config(layout, block)
        if expert_format == "fp8"
        else QUANTIZATION_CONFIG[expert_format]
    )
    (dst / "config.json").write_text(json.dumps(cfg_dict, indent=2))  # last: marks it complete
    return dst
