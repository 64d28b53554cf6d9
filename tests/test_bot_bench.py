"""bench.queue's Discord mode: the bot's job path against a simulated rate-limited Discord."""

from __future__ import annotations

import json

import pytest

from bench import queue as bench_queue


def test_bench_queue_discord_mode_prints_gpu_idle_share(capsys: pytest.CaptureFixture[str]) -> None:
    bench_queue.main(["--discord", "--jobs", "3", "--members", "2", "--steps", "2", "--rate", "20"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["mode"] == "discord" and result["jobs"] == 3
    for key in ("gpu_idle_share", "baseline_gpu_idle_share", "instant_gpu_idle_share", "max_gap_s"):
        assert 0 <= result[key] < 1 or key == "max_gap_s"
    assert any(line.startswith("rate-limited") for line in out)  # the table, side by side
