"""In-betweens through the whole CLI path: clip length kept, timing options, the sidecar's story and
smoothness records, a redone keyframe reusing untouched in-betweens, and every bad timing value."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import pytest

from emaki.cli import main
from tests.test_cli_jobs import SMALL, tiny_env  # noqa: F401 - the fixture is used by name


def _gif_frames(path: Path) -> tuple[int, list[int]]:
    meta = [iio.immeta(path, index=i) for i in range(iio.improps(path, index=None).shape[0])]
    return len(meta), [m["duration"] for m in meta]


def test_in_betweens_keep_the_clip_length_and_are_recorded(tiny_env: Path, capsys) -> None:  # noqa: F811
    assert main(["animate", "a fox runs", "--out", "plain.gif", "--seed", "3", *SMALL]) == 0
    assert main(["animate", "a fox runs", "--out", "smooth.gif", "--seed", "3", "--interpolate", "3", *SMALL]) == 0
    plain_count, plain_ms = _gif_frames(tiny_env / "plain.gif")
    smooth_count, smooth_ms = _gif_frames(tiny_env / "smooth.gif")
    assert (plain_count, smooth_count) == (3, 3 + 2 * 3)
    # Same length, up to GIF's 10 ms steps (33 ms frames are stored as 30).
    assert sum(plain_ms) == 300 and abs(sum(smooth_ms) - 300) <= 5 * smooth_count
    sidecar = json.loads((tiny_env / "smooth.json").read_text())
    assert sidecar["params"]["interpolate"] == 3
    assert sidecar["metrics"]["clip_frames"] == 9 and sidecar["metrics"]["warping_error"] >= 0
    assert sidecar["story"]["source"] == "fallback" and sidecar["story"]["answers"] == []
    # The keyframes on disk are the same job's frames: in-betweens never replace them.
    assert len(list((tiny_env / "smooth_frames").glob("frame_*.png"))) == 3


def test_gif_steps_are_spread_so_the_clip_keeps_its_length(tiny_env: Path) -> None:  # noqa: F811
    assert main(["animate", "a fox", "--out", "d.gif", "--duration", "333", "--interpolate", "2", *SMALL]) == 0
    count, durations = _gif_frames(tiny_env / "d.gif")  # 7 frames of 142.7 ms: GIF keeps 10 ms steps
    assert count == 7 and set(durations) <= {140, 150} and abs(sum(durations) - 999) <= 10


def test_seconds_and_fps_set_the_timing(tiny_env: Path) -> None:  # noqa: F811
    assert main(["animate", "a fox", "--out", "s.gif", "--seconds", "1.5", "--interpolate", "1", *SMALL]) == 0
    count, durations = _gif_frames(tiny_env / "s.gif")
    assert count == 5 and abs(sum(durations) - 1500) <= 5 * count
    assert main(["animate", "a fox", "--out", "f.gif", "--fps", "10", "--interpolate", "2", *SMALL]) == 0
    count, durations = _gif_frames(tiny_env / "f.gif")
    assert count == 7 and all(d == 100 for d in durations)


def test_a_redone_keyframe_reuses_the_untouched_in_betweens(tiny_env: Path, capsys) -> None:  # noqa: F811
    from engine import interpolate

    assert main(["animate", "a fox", "--out", "a.gif", "--seed", "4", "--interpolate", "2", *SMALL]) == 0
    computed: list[int] = []
    real = interpolate.inbetweens
    interpolate.inbetweens = lambda a, b, n: computed.append(n) or real(a, b, n)
    try:
        job = json.loads((tiny_env / "a.json").read_text())["job_id"]
        assert main(["redo", str(job), "--from", "3", "--out", "b.gif", "-q"]) == 0
    finally:
        interpolate.inbetweens = real
    assert computed == [2]  # frames 1-2 kept: only the pair that touches the redone frame 3


BAD_TIMING = [
    (["--interpolate", "9"], "interpolate must be between 0 and 8"),
    (["--interpolate", "-1"], "interpolate must be between 0 and 8"),
    (["--seconds", "0"], "--seconds must be a number above 0"),
    (["--fps", "nan"], "--fps must be a number above 0"),
    (["--fps", "10", "--seconds", "2"], "give one of --seconds, --fps"),
    (["--seconds", "1e308"], "--seconds 1e+308 gives each of the 3 keyframes"),
    (["--fps", "5e-324"], "--fps 4.94066e-324 gives each"),
    (["--fps", "1e9"], "it must come to 20..5000 ms a keyframe"),
    (["--interpolate", "8", "--duration", "100"], "each frame would show 16 ms"),
    (["--interpolate", "8", "--frames", "16"], "the limit is 128"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_TIMING, ids=[" ".join(c[0]) for c in BAD_TIMING])
def test_bad_timing_is_one_line_and_nothing_is_written(tiny_env: Path, capsys, extra, message) -> None:  # noqa: F811
    small = [a for a in SMALL if a != "-q"]
    if "--frames" in extra:
        small = small[2:]
    assert main(["animate", "a fox", "--out", "x.gif", *small, *extra, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tiny_env / "x.gif").exists() and not (tiny_env / "data").exists()
