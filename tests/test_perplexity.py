"""`refmoe perplexity`: a model's perplexity over a text in strided windows, and its divergence
from a reference build (refmoe/perplexity.py). The oracle is transformers run over the same
windows (the negative log-likelihood of each scored token), and torch's own kl_div for the
divergence; the windows are checked to score every token once."""

import json
import math
import subprocess
import sys

import pytest
from conftest import write_random_chat_model

from refmoe import models, perplexity
from refmoe.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Experts are read from memory once per token; "
    "the attention runs on the device. " * 3
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    write_random_chat_model(d)
    (d / "text.txt").write_text(TEXT)
    return d


@pytest.fixture(scope="module")
def ids(model_dir):
    return Tokenizer.from_dir(model_dir).encode(TEXT)


def test_windows_score_each_token_once():
    for n, context, stride in ((10, 4, 4), (10, 4, 2), (10, 4, 1), (37, 8, 3), (5, 16, 16)):
        seen = []
        for start, end, first in perplexity.windows(n, context, stride):
            assert 0 <= start < first <= end <= n and end - start <= context
            seen += range(first, end)
        assert len(seen) == len(set(seen))  # once at most
        if stride < context:  # overlapping: every token but the first
            assert sorted(seen) == list(range(1, n))
        else:  # back to back: all but each window's first
            assert sorted(seen) == [i for i in range(1, n) if i % context]
    for bad in ((10, 1, 1), (10, 4, 5), (10, 4, 0)):
        with pytest.raises(ValueError, match="context|stride"):
            perplexity.windows(*bad)


def transformers_nll(model_dir, ids, context, stride) -> tuple[float, int]:
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for start, end, first in perplexity.windows(len(ids), context, stride):
        with torch.no_grad():
            logits = m(torch.tensor([ids[start:end]])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        for pos in range(first, end):
            nll -= float(lp[pos - start - 1, ids[pos]])
            n += 1
    return nll, n


@pytest.mark.parametrize("context,stride", [(16, 16), (16, 5)])
def test_perplexity_against_transformers(model_dir, ids, context, stride):
    _, model = models.load(model_dir, "bf16")
    s = perplexity.score(model, ids, context, stride)
    nll, n = transformers_nll(model_dir, ids, context, stride)
    assert s.tokens == n and s.windows == len(perplexity.windows(len(ids), context, stride))
    # bf16 experts against transformers' float32: the same perplexity to a part in a thousand
    assert s.ppl == pytest.approx(math.exp(nll / n), rel=1e-3)


def test_divergence_from_a_reference(model_dir, ids):
    _, bf16 = models.load(model_dir, "bf16")
    _, fp8 = models.load(model_dir, "fp8")
    same = perplexity.score(bf16, ids, 16, 8, reference=bf16)
    assert same.as_dict()["mean_kld"] == pytest.approx(0.0, abs=1e-12)
    assert same.as_dict()["top1_agreement"] == 1.0
    s = perplexity.score(fp8, ids, 16, 8, reference=bf16)
    kld = 0.0
    for start, end, first in perplexity.windows(len(ids), 16, 8):
        rows = slice(first - start - 1, end - start - 1)
        mine = perplexity.log_probs(fp8, ids[start:end])[rows]
        ref = perplexity.log_probs(bf16, ids[start:end])[rows]
        kld += float(torch.nn.functional.kl_div(mine, ref, log_target=True, reduction="sum"))
    d = s.as_dict()
    assert d["mean_kld"] == pytest.approx(kld / s.tokens, rel=1e-9) and d["mean_kld"] > 0
    assert 0.5 < d["top1_agreement"] <= 1.0


def test_slp_windows_agree_with_the_cpu_path(model_dir, ids):
    """--prefill slp: each window through StreamPrefill (experts streamed to the device, here
    the CPU) scores as the model's own path does."""
    from refmoe import slp

    _, model = models.load(model_dir, "bf16")
    cpu = perplexity.score(model, ids, 16, 5)
    streamed = perplexity.score(model, ids, 16, 5, prefill=slp.StreamPrefill(model))
    assert streamed.tokens == cpu.tokens and streamed.ppl == pytest.approx(cpu.ppl, rel=1e-4)
    both = perplexity.score(model, ids, 16, 5, reference=model, prefill=slp.StreamPrefill(model))
    assert both.as_dict()["mean_kld"] == pytest.approx(0.0, abs=1e-6)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "refmoe.cli", "perplexity", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli(model_dir, ids):
    r = run_cli(
        "--model",
        str(model_dir),
        "--file",
        str(model_dir / "text.txt"),
        "--context",
        "16",
        "--stride",
        "5",
        "--expert-dtype",
        "bf16",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    _, model = models.load(model_dir, "bf16")
    want = perplexity.score(model, ids, 16, 5)
    assert got["ppl"] == pytest.approx(want.ppl, rel=1e-12) and got["tokens"] == want.tokens
    r = run_cli(
        "--model",
        str(model_dir),
        "--token-ids",
        ",".join(map(str, ids[:40])),
        "--context",
        "16",
        "--expert-dtype",
        "fp8",
        "--reference",
        str(model_dir),
        "--reference-expert-dtype",
        "bf16",
        "--prefill",
        "slp",
    )
    assert r.returncode == 0 and "top-1 agreement" in r.stdout, r.stderr
    for bad, needle in (
        (["--token-ids", "5"], "nothing to score"),
        (["--token-ids", "5,6,7", "--stride", "600"], "--stride"),
        (["--token-ids", "5,6,99999"], "token ids must lie"),
        (["--file", str(model_dir / "missing.txt")], "missing.txt"),
    ):
        r = run_cli("--model", str(model_dir), *bad)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
