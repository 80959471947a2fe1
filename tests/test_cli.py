"""The command line as a user runs it: a real subprocess, JSON out."""

import json
import subprocess
import sys

import pytest

from refmoe import kernels

REQUIRED = {
    "op",
    "dtype",
    "m",
    "n",
    "k",
    "threads",
    "variant",
    "gbps",
    "limit_gbps",
    "ratio",
    "gflops",
    "time_us",
}


def run(*args, check=True):
    return subprocess.run(
        [sys.executable, "-m", "refmoe.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=check,
    )


def test_bench_kernels_json():
    rows = json.loads(
        run("bench", "kernels", "--quick", "--reps", "1", "--threads", "1", "--json").stdout
    )
    assert {r["op"] for r in rows} == {"gemv", "gemm", "moe_decode_layer"}
    dtypes = {"fp8", "fp8-channel", "int4", "bf16", "mxfp4", "nvfp4", "int4g"}
    assert {r["dtype"] for r in rows} == dtypes
    assert {r["dtype"] for r in rows if r["op"] == "moe_decode_layer"} == {
        "fp8",
        "fp8-channel",
        "mxfp4",
        "nvfp4",
        "int4g",
    }
    for r in rows:
        assert REQUIRED <= r.keys()
        assert {"others_cores", "suspect", "attempts"} <= r.keys()
        assert 1 <= r["attempts"] <= 3
        if r["suspect"]:  # kept flagged only after every redo
            assert r["attempts"] == 3
        assert r["gbps"] > 0 and r["limit_gbps"] > 0
        assert r["ratio"] == pytest.approx(r["gbps"] / r["limit_gbps"], rel=0.5)
    gemm = next(r for r in rows if r["op"] == "gemm")
    assert 0 < gemm["fma_ratio"] <= 1.5 and gemm["fma_peak_gflops"] > 0
    fp8_gemv = next(r for r in rows if r["op"] == "gemv" and r["dtype"] == "fp8")
    assert fp8_gemv["torch_us"] > 0


def test_bench_human_block():
    out = run("bench", "kernels", "--quick", "--reps", "1", "--threads", "1", "--no-torch").stdout
    assert "ratio" in out.splitlines()[0] and "moe_decode_layer" in out


def test_info_json():
    info = json.loads(run("info", "--json").stdout)
    assert info["variant"] in info["available_variants"] and info["threads"] >= 1
    pf = info["prefetch"]
    assert {pf["hint"], pf["hint_4bit"]} <= set(kernels.PREFETCH_HINTS) and pf["bytes"] >= 0
    assert json.loads(run("--cpu-threads", "3", "info", "--json").stdout)["threads"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (("bench", "kernels", "--threads", "0"), "expected integers >= 1"),
        (("bench", "kernels", "--variants", "avx9"), "variant 'avx9' is not available"),
        (("bench", "everything"), "invalid choice"),
        (("bench", "serve", "--prompt-len", "5-2"), "expected 1 <= LO <= HI"),
        (
            ("generate", "--model", "/nonexistent", "--prompt-ids", "1", "--prefill", "gpu"),
            "invalid choice",
        ),
        (("--cpu-threads", "0", "info"), "--cpu-threads must be >= 1"),
        (("serve", "--model", "/nonexistent", "--kv-tokens", "10", "--kv-memory", "1"), "not both"),
    ],
)
def test_bad_arguments(args, message):
    r = run(*args, check=False)
    assert r.returncode == 2 and message in r.stderr
