"""`refmoe bench serve` end to end on the tiny model: the result block with vLLM's labels,
the request CSV, the trace with the workers' lanes and one record per request; and the
interference and dual-batch scenarios report their ratios."""

import json
import subprocess
import sys

import pytest
from test_slp import fp8_dir  # noqa: F401 (fixture)

LABELS = [
    "Successful requests:",
    "Benchmark duration (s):",
    "Total input tokens:",
    "Total generated tokens:",
    "Request throughput (req/s):",
    "Output token throughput (tok/s):",
    "Total Token throughput (tok/s):",
    "Mean TTFT (ms):",
    "Median TTFT (ms):",
    "P99 TTFT (ms):",
    "Mean TPOT (ms):",
    "Median TPOT (ms):",
    "P99 TPOT (ms):",
    "Mean ITL (ms):",
    "Median ITL (ms):",
    "P99 ITL (ms):",
]


def _bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "refmoe.cli", "bench", "serve", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_poisson_run_writes_block_csv_and_trace(fp8_dir, tmp_path):  # noqa: F811
    csv, trace = tmp_path / "req.csv", tmp_path / "serve.json"
    r = _bench(
        "--model",
        str(fp8_dir),
        "--num-prompts",
        "6",
        "--request-rate",
        "30",
        "--prompt-len",
        "3-20",
        "--output-len",
        "2-6",
        "--csv",
        str(csv),
        "--trace",
        str(trace),
        "--prefill",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    assert "Serving Benchmark Result" in r.stdout
    for label in LABELS:
        assert label in r.stdout, label
    assert "Successful requests:                    6" in r.stdout
    lines = csv.read_text().splitlines()
    assert lines[0] == "arrived_at,num_prefill_tokens,num_decode_tokens" and len(lines) == 7
    arrivals = [float(x.split(",")[0]) for x in lines[1:]]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    t = json.loads(trace.read_text())
    lanes = {e["args"]["name"] for e in t["traceEvents"] if e.get("name") == "thread_name"}
    # CPU only: the prompts ran in chunks on the decode worker (chunked prefill, auto)
    assert {"decode worker", "attention", "experts"} <= lanes
    chunks = [e for e in t["traceEvents"] if "prefill_chunk_tokens" in e.get("args", {})]
    assert t["metadata"]["engine"]["chunked_prefill"] is True and chunks
    reqs = t["metadata"]["requests"]
    assert len(reqs) == 6 and all(q["first_token_time"] <= q["finish_time"] for q in reqs)
    assert sorted(q["output_tokens"] for q in reqs) == sorted(
        int(x.split(",")[2]) for x in lines[1:]
    )
    # the routing served: every prompt token and every fed-back output token, k experts each
    fed = sum(q["prompt_tokens"] + q["output_tokens"] - 1 for q in reqs)
    rec = t["metadata"]["routing"]
    assert rec["layers"] and all(
        layer["tokens"] == fed and sum(layer["experts"]) == fed * rec["num_experts_per_tok"]
        for layer in rec["layers"].values()
    )


def test_interference_and_dual_batch_report_ratios(fp8_dir):  # noqa: F811
    for scenario in ("interference", "dual-batch"):
        r = _bench(
            "--model", str(fp8_dir), "--scenario", scenario, "--prefill-tokens", "100", "--json"
        )
        assert r.returncode == 0, r.stderr
        row = json.loads(r.stdout)[0]
        # the ratio is what the figures beside it say, measured in the same run
        if scenario == "interference":
            assert row["ratio"] == pytest.approx(
                row["tpot_during_prefill_ms"] / row["tpot_alone_ms"]
            )
            assert row["worst_itl_during_prefill_ms"] >= row["tpot_during_prefill_ms"]
            assert 0 < row["prefill_s"] and row["prefill_tokens"] == 100
        else:
            assert row["ratio"] == pytest.approx(row["tok_s_two"] / row["tok_s_one"])
            assert row["ratio_four"] == pytest.approx(row["tok_s_four"] / row["tok_s_one"])
            assert row["overlap"] is False  # a CPU-only model: dual-batch overlap stays off


def test_agent_scenario_through_the_server(fp8_dir, tmp_path):  # noqa: F811
    """Two conversations of three turns through the real server: every turn resends the
    history, later turns find it cached, and the trace carries the turns and the workload's
    shape (what `refmoe-sim validate` replays)."""
    trace = tmp_path / "agents.json"
    r = _bench(
        *("--model", str(fp8_dir), "--scenario", "agent", "--conversations", "2"),
        *("--turns", "3", "--context", "70", "--new-tokens", "10-20", "--output-len", "4-8"),
        *("--think-s", "0.05-0.2", "--prefill", "cpu", "--trace", str(trace), "--json"),
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["op"] == "serve_agent" and got["completed"] == 6 and got["failed"] == 0
    assert set(got["mean_ttft_ms_by_turn"]) == {"1", "2", "3"}
    turns = got["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3, 1, 2, 3]
    for prev, t in zip(turns, turns[1:]):
        if t["turn"] > 1:  # the whole history again, and its full 32-token blocks cached
            assert t["prompt_tokens"] > prev["prompt_tokens"] + prev["output_tokens"]
            assert (
                t["cached_tokens"] == (prev["prompt_tokens"] + prev["output_tokens"] - 1) // 32 * 32
            )
    assert 0 < got["prefix_hit_rate"] < 1
    meta = json.loads(trace.read_text())["metadata"]
    assert meta["engine"]["workload"]["scenario"] == "agent" and len(meta["turns"]) == 6
