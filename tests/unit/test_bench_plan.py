"""The benchmark's level plan (bench.run --plan) and the peer comparison's ratios (bench.peers)."""

from __future__ import annotations

import pytest
from bench import peers
from bench import run as bench_run


def test_plan_string_gives_workloads_and_levels_in_order() -> None:
    args = bench_run.parse_args(["--model", "default", "--plan", "W3:1x2,4x4 w2:1x1", "--label", "x"])
    assert args.plan == [("W3", [(1, 2), (4, 4)]), ("W2", [(1, 1)])]
    assert args.workloads == ["W3", "W2"]


def test_without_plan_the_level_options_make_one() -> None:
    args = bench_run.parse_args(
        ["--model", "default", "--workloads", "W1,W3", "--concurrency", "1,4", "--requests-per-level", "3,0"]
    )
    assert args.plan == [("W1", [(1, 3), (4, 8)]), ("W3", [(1, 3), (4, 8)])]


@pytest.mark.parametrize("plan", ["W9:1x2", "W1", "W1:1x", "W1:0x2", "W1:1x2x3", "W1:ax2"])
def test_bad_plan_is_a_usage_error(plan: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--model", "default", "--plan", plan])
    assert "--plan" in capsys.readouterr().err


def test_mismatched_requests_per_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--model", "default", "--concurrency", "1,4", "--requests-per-level", "1,2,3"])
    assert "--requests-per-level" in capsys.readouterr().err


def level(workload: str, c: int, ttft: float, decode: float, rps: float, warmup: bool = False) -> dict:
    return {
        "workload": workload,
        "concurrency": c,
        "warmup": warmup,
        "ttft_s": {"p50": ttft},
        "decode_tok_s_per_request": {"p50": decode},
        "requests_per_s": rps,
    }


def test_ratios_compare_against_the_best_peer_in_the_right_direction() -> None:
    reports = {
        "vlmserve": {
            "levels": [
                level("W1", 1, 99.0, 1.0, 9.0, warmup=True),  # warm-up levels are not figures
                level("W1", 1, 6.0, 30.0, 0.05),
                level("W1", 4, 20.0, 10.0, 0.2),
                level("W2", 1, 0.5, 30.0, 1.0),
            ]
        },
        "a": {"levels": [level("W1", 1, 10.0, 20.0, 0.02), level("W1", 4, 40.0, 5.0, 0.05)]},
        "b": {"levels": [level("W1", 1, 12.0, 25.0, 0.03), level("W1", 4, 30.0, 6.0, 0.1)]},
    }
    rows = {row["figure"]: row for row in peers.ratios(reports)}
    cold = rows["cold-image TTFT p50, c=1"]
    assert (cold["best_peer"], cold["ratio"], cold["met"]) == ("a", 0.6, True)  # lowest TTFT is best
    decode = rows["single-stream decode tok/s"]
    assert (decode["best_peer"], decode["ratio"], decode["met"]) == ("b", 1.2, True)  # highest is best
    rps4 = rows["requests/s, c=4"]
    assert (rps4["best_peer"], rps4["ratio"], rps4["met"]) == ("b", 2.0, True)
    ttft4 = rows["TTFT p50, c=4"]
    assert (ttft4["best_peer"], ttft4["ratio"], ttft4["met"]) == ("b", 0.667, False)
    # no peer measured W2 or c=8: no ratio, neither met nor missed
    assert rows["repeated-image TTFT p50, c=1"]["ratio"] is None
    assert rows["requests/s, c=8"]["met"] is None
    table = peers.markdown(list(rows.values()), ["vlmserve", "a", "b"])
    assert "| cold-image TTFT p50, c=1 | 6 | 10 | 12 | a | 0.6x | <= 0.6x | yes |" in table
