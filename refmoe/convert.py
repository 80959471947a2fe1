"""`refmoe convert`: a BF16/F32 checkpoint to DeepSeek's FP8 block format, once.

Every projection weight (`*_proj.weight`, `kv_a_proj_with_mqa.weight`, routed and shared
experts included) becomes E4M3 codes plus a float32 `weight_scale_inv` per 128x128 block, as
DeepSeek's own releases store them; norms, the router, embeddings and lm_head are copied as
they are. One shard per layer, an index, config.json with quantization_config, and the
tokenizer files beside them.
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
ST_DTYPE = {
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "float8_e4m3fn": "F8_E4M3",
    "int64": "I64",
    "int32": "I32",
}
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
)


def _float(ck: Checkpoint, name: str) -> np.ndarray:
    a, dtype = ck.get(name), ck.dtype(name)
    return formats.bf16_decode(a) if dtype == "bfloat16" else np.asarray(a, np.float64)


def convert(src: str | Path, dst: str | Path, progress=None) -> Path:
    src, dst = Path(src), Path(dst)
    cfg_dict = json.loads((src / "config.json").read_text())
    cfg = ModelConfig.from_dict(cfg_dict, str(src / "config.json"))
    if cfg.is_fp8:
        raise ValueError(f"{src}: already an FP8 checkpoint")
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
            if (
                QUANTIZED.match(name)
                and len(ck._shard(name).shape(name)) == 2
                and dtype in ("float32", "bfloat16", "float16")
            ):
                codes, scale = formats.fp8_quantize(_float(ck, name))
                tensors[name], dtypes[name] = codes, "F8_E4M3"
                tensors[name + "_scale_inv"] = scale
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
    cfg_dict["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (dst / "config.json").write_text(json.dumps(cfg_dict, indent=2))  # last: marks it complete
    return dst
