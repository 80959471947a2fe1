"""Shared fixtures: every variant that is built and runs here, and quiet BLAS threads."""

import os
from contextlib import contextmanager

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's own pool must not spin beside ours
# SLP on the CPU computes in float32 here, whatever the CPU: the tests hold it to the CPU path
# at float32's tolerance (and DSLP's tokens equal); its bf16 lane, the default where the CPU
# has bf16 dot products, has its own tests (test_slp.py)
os.environ.setdefault("REFMOE_SLP_DTYPE", "f32")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from refmoe import kernels  # noqa: E402

VARIANTS = kernels.available_variants()


@pytest.fixture(params=VARIANTS)
def variant(request) -> str:
    return request.param


def randomize_bf16(model, bias_buffers=()) -> None:
    """Fill a transformers model with N(0, 0.2) weights (norms around 1), rounded to bf16 values
    so refmoe's bf16 expert kernels see exactly the weights transformers uses; buffers whose
    name contains one of bias_buffers get N(0, 0.1)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            v = torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0)
            p.copy_(v.to(torch.bfloat16).float())
        for name, b in model.named_buffers():
            if any(key in name for key in bias_buffers):
                b.copy_(torch.randn_like(b) * 0.1)


def save_random(directory, model_cls, config, seed: int):
    """A tiny random transformers model: built after torch.manual_seed(seed), its weights
    randomize_bf16'd, saved with save_pretrained into directory; returns it (in eval mode)."""
    import torch

    torch.manual_seed(seed)
    m = model_cls(config).eval()
    randomize_bf16(m)
    m.save_pretrained(directory)
    return m


def cli_generate(model_dir, *args) -> dict:
    """`refmoe generate --model DIR --json ARGS...` as a user runs it; the parsed JSON."""
    import json
    import subprocess
    import sys

    return json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "refmoe.cli",
                "generate",
                "--model",
                str(model_dir),
                "--json",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
    )


def hf_greedy(m, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation of prompt, n tokens."""
    import torch

    with torch.no_grad():
        out = m.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def assert_logits_match(m, mine, prompt: list[int], tol: float) -> None:
    """refmoe's logits within tol * max|logit| of transformers', in one forward and token by
    token through the cache."""
    import torch

    with torch.no_grad():
        ref = m(torch.tensor([prompt])).logits[0]
    out = mine.forward(torch.tensor(prompt), mine.new_cache())
    assert (out - ref).abs().max() <= tol * ref.abs().max()
    cache = mine.new_cache()
    steps = torch.cat([mine.forward(torch.tensor([t]), cache) for t in prompt])
    assert (steps - ref).abs().max() <= tol * ref.abs().max()


def tiny_qwen3_moe_config(vocab_size: int, **changes):
    """The tests' smallest Qwen3-MoE (hidden 32, 1 layer, 2 heads over 1 KV head, 4 experts,
    top-2, no EOS): transformers' config, with `changes` applied."""
    import transformers

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        eos_token_id=None,
    )
    return transformers.Qwen3MoeConfig(**{**fields, **changes})


def write_random_chat_model(d, vocab_size: int = 600) -> None:
    """The tests' smallest Qwen3-MoE with random weights (seeded) and the demo's byte-level BPE
    tokenizer and chat template: what it writes is noise, in real tokens."""
    import torch
    import transformers

    from refmoe import demo_tokenizer

    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(tiny_qwen3_moe_config(vocab_size)).save_pretrained(d)
    demo_tokenizer.write(d, vocab_size)


def write_scripted_model(d, words, chain, template, eos, specials, bos=None, fuse=False) -> None:
    """A scripted model in d: a one-layer Qwen3-MoE whose layer adds nothing and whose lm_head
    maps each token to its successor in `chain`, so that greedy decoding after a prompt ending
    in chain[0] writes chain[1:]; real safetensors, a word-level tokenizer over `words` (the
    first `specials` of them special tokens) and tokenizer_config.json with `template`. fuse:
    decoded tokens are joined as they are (words may then carry their own newlines), not with
    spaces."""
    import json

    import torch
    import transformers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    ids = {w: i for i, w in enumerate(words)}
    h = 32
    cfg = tiny_qwen3_moe_config(
        len(words),
        hidden_size=h,
        max_position_embeddings=256,
        eos_token_id=ids[eos],
        tie_word_embeddings=False,
    )
    m = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()  # the layer adds nothing: the last hidden state is the embedding
        m.model.embed_tokens.weight.copy_(torch.eye(len(words), h))
        head = torch.zeros(len(words), h)
        for a, b in zip(chain, chain[1:]):
            head[ids[b], ids[a]] = 10.0  # token a's one-hot picks b
        m.lm_head.weight.copy_(head)
    m.save_pretrained(d)
    tok = HFTokenizer(models.WordLevel(ids, unk_token="ok"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(words[:specials]))
    if fuse:
        tok.decoder = decoders.Fuse()
    tok.save(str(d / "tokenizer.json"))
    config = {"bos_token": bos or words[0], "eos_token": eos, "chat_template": template}
    (d / "tokenizer_config.json").write_text(json.dumps(config))


def assert_cache_bytes(mine, cache, tokens: int) -> None:
    """The KV budget's unit: what the cache's growing tensors hold after `tokens` tokens
    (every layer's keys and values, latents, indexer keys) is kv_bytes_per_token each."""
    held = sum(g.buf.element_size() * g.view().numel() for layer in cache.parts() for g in layer)
    assert mine.kv_bytes_per_token() * tokens == held


@contextmanager
def fp8_route_as(route: str):
    """The FP8 GEMV on `route` inside the block, the process's setting restored after."""
    before = kernels.set_fp8_gemv_route(route)
    try:
        yield route
    finally:
        kernels.set_fp8_gemv_route(before)


def amx_slack(variant: str, x, w, mag):
    """What the AMX tiles may add to the float32 bound where the variant's GEMM of these tokens
    takes them (kernels.AMX_EXTRA_ERROR relative to |x| |w|; and the bf16 parts AMX flushes to
    zero below 2^-126: at most 2^-125 (|x| + |w|) a product); 0 elsewhere."""
    if x.shape[0] < kernels.AMX_MIN_TOKENS or not kernels.amx_tiles(variant):
        return 0.0
    ax, aw = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(w, np.float64))
    return kernels.AMX_EXTRA_ERROR * mag + 2.0**-125 * (ax.sum(1)[:, None] + aw.sum(1)[None, :])


@contextmanager
def float32_tiles_only():
    """Many-token GEMMs on the float32 tiles, not AMX's, inside the block: for tests that hold
    two ways of computing the same thing (SLP against the CPU prefill, chunks against one
    prefill, a restored cache against a fresh one) to float32's tolerance. AMX's bf16x3
    products (kernels.AMX_EXTRA_ERROR) have their own tests (test_kernels.py, test_lut4.py) and
    run in the families' tests against transformers."""
    before, env = kernels.set_amx_tiles(False), os.environ.get("REFMOE_AMX")
    os.environ["REFMOE_AMX"] = "0"  # and in the processes it starts (DSLP's ranks)
    try:
        yield
    finally:
        kernels.set_amx_tiles(before)
        if env is None:
            os.environ.pop("REFMOE_AMX", None)
        else:
            os.environ["REFMOE_AMX"] = env


@pytest.fixture
def float32_tiles():
    """float32_tiles_only for the whole test."""
    with float32_tiles_only():
        yield


@pytest.fixture(params=kernels.FP8_GEMV_ROUTES)
def fp8_route(request, variant):
    """Each FP8 GEMV route where the variant has two (avx512_bf16 builds); the fp32 one alone
    elsewhere."""
    with fp8_route_as(request.param):
        if kernels.fp8_gemv_route(variant) != request.param:
            pytest.skip(f"{variant} has one FP8 GEMV route")
        yield request.param
