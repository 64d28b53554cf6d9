"""The benchmarks run from a clean checkout and print their JSON. No assertion is made on time."""

from __future__ import annotations

import json

import pytest

from bench import engine as bench_engine
from bench import queue as bench_queue


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_bench_engine_prints_side_by_side_json(capsys: pytest.CaptureFixture[str]) -> None:
    bench_engine.main(["--arch", "tiny", "--device", "cpu", "--size", "32", "--frames", "2", "--steps", "7"])
    result = last_json(capsys.readouterr().out)
    for key in (
        "arch",
        "device",
        "baseline_s",
        "emaki_s",
        "speed_ratio",
        "baseline_peak_mb",
        "emaki_peak_mb",
        "memory_ratio",
    ):
        assert key in result
    assert result["arch"] == "tiny" and result["baseline_s"] > 0 and result["emaki_peak_mb"] > 0


def test_bench_queue_prints_busy_fraction(capsys: pytest.CaptureFixture[str]) -> None:
    bench_queue.main(["--jobs", "2", "--steps", "7"])
    result = last_json(capsys.readouterr().out)
    assert result["jobs"] == 2 and set(result) >= {"wall_s", "engine_busy_s", "busy_fraction"}
    assert 0 < result["busy_fraction"] <= 1


def test_bench_levers_measures_each_lever_against_the_plain_model(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import levers as bench_levers

    bench_levers.main(["--arch", "tiny", "--size", "32", "--repeats", "1", "--no-compile"])
    result = last_json(capsys.readouterr().out)
    names = [row["lever"] for row in result["levers"]]
    assert names == [n for n in bench_levers.LEVERS if not n.startswith("torch.compile")]
    for row in result["levers"]:
        assert row["plain_ms"] > 0 and row["lever_ms"] > 0
        # Every lever computes the same UNet: exact layout changes agree to float noise, bf16 to its precision.
        assert row["max_abs_diff"] < (0.1 if row["lever"] == "bf16" else 1e-3)
