"""Convert a refmoe demo checkpoint to GGUF with llama.cpp's own converter (convert_hf_to_gguf.py
from the llama.cpp sources; it dequantizes the FP8 blocks itself), for llama.cpp's side of
benchmarks/peer_decode.py.

    python benchmarks/peer/to_gguf.py LLAMA_CPP_DIR MODEL_DIR OUT.gguf [--outtype q8_0]

One thing is set from outside: the demo's tokenizer (refmoe/demo_tokenizer.py, byte-level BPE
with DeepSeek-V3's special tokens) is not one of the pre-tokenizers the converter recognizes by
hash, so it is declared "deepseek-v3" (DeepSeek-V3's own split). llama-bench feeds token ids,
never text, so the pre-tokenizer does not enter any figure.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("llama_cpp", type=Path, help="llama.cpp source directory")
    ap.add_argument("model", type=Path, help="refmoe demo model directory")
    ap.add_argument("out", type=Path, help="GGUF file to write")
    ap.add_argument("--outtype", default="q8_0", choices=["q8_0", "bf16", "f16"])
    args = ap.parse_args()
    src = args.llama_cpp.resolve()
    sys.path[:0] = [str(src / "gguf-py"), str(src)]
    from conversion import base  # llama.cpp's converter package

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "deepseek-v3"
    sys.argv = [
        "convert_hf_to_gguf.py",
        str(args.model),
        "--outtype",
        args.outtype,
        "--outfile",
        str(args.out),
    ]
    runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
