"""The serving metrics the benchmark and the simulator share, pinned on a hand computation."""

import math

from refmoe.serving_metrics import Outcome, format_summary, parse_range, summary


def test_summary_by_hand():
    # request a: first token at 0.5 s, 10 more over 1.0 s (TPOT 100 ms, 10 tok/s)
    # request b: first token at 0.2 s, 5 more over 0.25 s (TPOT 50 ms, 20 tok/s)
    a = Outcome(0.0, 10, 11, 0.5, [0.1] * 10, 1.5, True)
    b = Outcome(0.0, 10, 6, 0.2, [0.05] * 5, 0.45, True)
    failed = Outcome(0.0, 7, error="boom")
    r = summary([a, b, failed], 2.0)
    assert (r["completed"], r["failed"], r["total_input_tokens"]) == (2, 1, 20)
    assert r["output_throughput"] == 17 / 2.0
    assert math.isclose(r["mean_ttft_ms"], 350.0) and math.isclose(r["p99_ttft_ms"], 500.0)
    assert math.isclose(r["mean_tpot_ms"], 75.0)
    assert math.isclose(r["mean_itl_ms"], (10 * 100 + 5 * 50) / 15)
    assert math.isclose(r["mean_decode_tok_s_per_user"], 15.0)
    assert math.isclose(r["p1_decode_tok_s_per_user"], 10.0)
    block = format_summary(r)
    assert "Median decode (tok/s):                  15.00" in block
    assert parse_range("16-64") == (16, 64) and parse_range("8") == (8, 8)


def test_gaps_are_tokens_one_by_one():
    """Outcome.gaps (a block of decode tokens at once) records what token() does for each."""
    one, block = Outcome(0.0, 10), Outcome(0.0, 10)
    for o in (one, block):
        o.token(1.5, 1.5, 5)  # the first token
    times = [1.6, 1.75, 1.9]
    last = 1.5
    for now in times:
        assert not one.token(now, last, 5)
        last = now
    assert block.gaps(times, 1.5) == 1.9
    assert (
        (one.itl_s, one.output_tokens)
        == (block.itl_s, block.output_tokens)
        == (
            [1.6 - 1.5, 1.75 - 1.6, 1.9 - 1.75],
            4,
        )
    )
