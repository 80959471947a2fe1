"""The contamination check of benchmarks and calibration (refmoe/contention.py): another
process's CPU use during a measurement is seen and flagged; an impossible ratio is flagged
whatever the load; flagged measurements are redone a bounded number of times."""

import subprocess
import sys
import time

from refmoe import contention


def test_another_process_on_the_cores_is_seen():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        with contention.Window() as w:
            t = time.perf_counter()
            while time.perf_counter() - t < 0.6:
                time.sleep(0.01)  # this process idles: whatever runs is someone else
    finally:
        hog.kill()
        hog.wait()
    assert w.others_cores > 0.5 and w.contaminated
    assert "other processes used" in contention.suspect(w.others_cores)


def test_impossible_ratios_are_flagged_and_redone():
    class Fake:
        ratio = 1.6

    calls = []

    def run():
        calls.append(1)
        return Fake()

    out, others, why, attempts = contention.measured(run, lambda r: r.ratio)
    assert attempts == contention.RETRIES + 1 == len(calls)
    assert "ratio 1.60 > 1.05" in why
    assert contention.suspect(0.0, 0.93) == ""


def test_more_threads_far_slower_is_flagged():
    from refmoe.bench import Row, flag_thread_inversions

    def row(threads, gbps):
        return Row(
            "gemv",
            "fp8",
            "m",
            1,
            2048,
            7168,
            threads,
            "avx2",
            1.0,
            gbps,
            20.0,
            gbps / 20.0,
            0.0,
            0.0,
            1.0,
        )

    fine = [row(1, 12.0), row(2, 18.0)]
    flag_thread_inversions(fine)
    assert all(r.suspect == "" for r in fine)
    bad = [row(1, 12.0), row(2, 6.0)]
    flag_thread_inversions(bad)
    assert all("more threads far slower" in r.suspect for r in bad)


def test_a_flagged_row_says_why(capsys):
    """A result line carries its SUSPECT reason when there is one, and a JSON row is printed
    whole (reason included) either way."""
    assert contention.flagged("decode 9 tok/s", "") == "decode 9 tok/s"
    assert contention.flagged("decode 9 tok/s", "other processes used 0.30 cores") == (
        "decode 9 tok/s  SUSPECT: other processes used 0.30 cores"
    )
    row = {"gbps": 20.0, "suspect": "ratio 1.10 > 1.05: faster than the plain read"}
    contention.print_row(row, "20.0 GB/s", as_json=False)
    contention.print_row(row, "20.0 GB/s", as_json=True)
    text, json_line = capsys.readouterr().out.splitlines()
    assert text == "20.0 GB/s  SUSPECT: ratio 1.10 > 1.05: faster than the plain read"
    assert __import__("json").loads(json_line) == row
