"""The trace format, sampling, and the generate command's trace."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_qwen3_moe_config

from refmoe.sampling import Sampler, SamplingParams
from refmoe.trace import Trace


def test_trace_format():
    clock = iter([0.0, 0.5, 0.75, 1.0]).__next__
    t = Trace({"hardware": {"cpu": "x"}}, clock=clock)
    with t.region("cpu", "experts", "moe L0", tokens=3):
        pass
    t.counter("scheduler", "queue", 0.25, depth=2)
    t.request(arrival=0.0, prompt_tokens=3, output_tokens=1, first_token_time=0.1, finish_time=0.2)
    doc = json.loads(json.dumps(t.to_json()))
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert spans == [
        {
            "ph": "X",
            "name": "moe L0",
            "pid": 1,
            "tid": 1,
            "ts": 500000.0,
            "dur": 250000.0,
            "args": {"tokens": 3},
        }
    ]
    names = {(e["name"], e["args"]["name"]) for e in doc["traceEvents"] if e["ph"] == "M"}
    assert ("process_name", "cpu") in names and ("thread_name", "experts") in names
    assert doc["metadata"]["hardware"] == {"cpu": "x"} and len(doc["metadata"]["requests"]) == 1
    assert {"refmoe_version", "commit"} <= doc["metadata"].keys()


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams())(logits) == 1
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    s = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=1))
    assert {s(logits) for _ in range(200)} == {1, 2}  # only the two best survive top-k
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    assert {s(logits) for _ in range(200)} <= {1, 2}  # the nucleus holds the top two
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=1))
    assert {s(logits) for _ in range(50)} == {1}
    # a subnormal temperature (found by the server's schema fuzz) is greedy, not NaN
    s = Sampler(SamplingParams(temperature=5e-324, top_k=3, top_p=0.9, seed=1))
    assert {s(logits) for _ in range(20)} == {1}


def target(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a sampler must draw from, the naive way (float64, a full sort): the
    softmax at the temperature over the top_k best, then the smallest best-first set holding
    top_p of that, renormalized."""
    z = logits.double() / temperature
    order = torch.argsort(z, descending=True)
    keep = torch.zeros_like(z, dtype=torch.bool)
    keep[order[: top_k or len(z)]] = True
    p = torch.where(keep, torch.exp(z - z.max()), torch.zeros_like(z))
    p /= p.sum()
    mass = 0.0
    for i in torch.argsort(p, descending=True).tolist():
        if mass > top_p:
            p[i] = 0.0
        mass += float(p[i])
    return p / p.sum()


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.8, 12, 0.6), (2.0, 0, 0.3)],
)
def test_sampled_draws_follow_the_target_distribution(temperature, top_k, top_p):
    """20,000 draws over 40 tokens: the empirical frequencies within 0.03 of the target's in
    total variation, and never a token the target gives no mass (a chi-square-free check that
    fails for a wrong temperature, a top-k or top-p one off, or a biased draw)."""
    logits = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 2
    want = target(logits, temperature, top_k, top_p)
    s = Sampler(SamplingParams(temperature, top_k, top_p, seed=11))
    counts = torch.bincount(torch.tensor([s(logits) for _ in range(20000)]), minlength=40)
    got = counts.double() / counts.sum()
    assert float((got - want).abs().sum()) / 2 < 0.03
    assert not bool(((want == 0) & (counts > 0)).any())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_generate_writes_trace(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_qwen3_moe_config(50, num_hidden_layers=2)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "m")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "refmoe.cli",
            "generate",
            "--model",
            str(tmp_path / "m"),
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "3",
            "--json",
            "--trace",
            str(tmp_path / "t.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert len(json.loads(out.stdout)["token_ids"]) == 3
    doc = json.loads((tmp_path / "t.json").read_text())
    names = [e["name"] for e in doc["traceEvents"] if e["ph"] == "X"]
    assert names.count("prefill") == 1 and names.count("decode") == 2
    assert "experts L1" in names and "attention L0" in names
    (req,) = doc["metadata"]["requests"]
    assert req["prompt_tokens"] == 3 and req["output_tokens"] == 3
    assert req["arrival"] <= req["first_token_time"] <= req["finish_time"]
    assert doc["metadata"]["model"]["family"] == "qwen3_moe"
