"""In-betweens and motion mode through the whole CLI path: clip length kept, timing options, the
sidecar's story and smoothness records, a redone keyframe reusing untouched in-betweens, every bad timing
value, and motion mode end to end with a sidecar that reproduces it."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

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
    from engine.render import interpolate

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


# --- motion mode (AnimateDiff) through the CLI -------------------------------------------------------
@pytest.fixture(scope="module")
def motion_models(tmp_path_factory: pytest.TempPathFactory):
    from engine.render.models import Models
    from engine.settings import load_settings

    settings = load_settings(profile="tiny", motion_adapter="tiny", data_dir=tmp_path_factory.mktemp("m"))
    return Models(settings).load()


@pytest.fixture
def motion_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, motion_models) -> Path:
    motion_models.use_style(None)
    monkeypatch.setattr("emaki.animate_cmd.load_models", lambda settings: motion_models)
    monkeypatch.setenv("EMAKI_PROFILE", "tiny")
    monkeypatch.setenv("EMAKI_MOTION_ADAPTER", "tiny")
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


MOTION = ["--motion", "animatediff", "--frames", "3", "--interpolate", "2", "--steps", "2", "--width", "32"]


def test_motion_mode_end_to_end_and_its_sidecar_reproduces_it(motion_env: Path) -> None:
    from tests.helpers import sha

    assert main(["animate", "a fox runs", "--out", "m.gif", "--seed", "7", *MOTION, "--height", "32", "-q"]) == 0
    count, durations = _gif_frames(motion_env / "m.gif")
    assert count == 3 + 2 * 2 and abs(sum(durations) - 300) <= 5 * count  # the clip keeps its length
    sidecar = json.loads((motion_env / "m.json").read_text())
    assert sidecar["params"]["motion"] == "animatediff" and sidecar["params"]["interpolate"] == 2
    assert sidecar["models"]["motion_adapter"] == "tiny" and sidecar["models"]["motion_fewstep"] == "none"
    assert len(sidecar["frames"]) == 3  # one row per beat, each with its own seed
    assert main(["animate", "--from-sidecar", "m.json", "--out", "again.gif", "-q"]) == 0
    assert sha(motion_env / "again.gif") == sha(motion_env / "m.gif")
    assert [sha(p) for p in sorted((motion_env / "again_frames").iterdir())] == [
        sha(p) for p in sorted((motion_env / "m_frames").iterdir())
    ]


def test_motion_defaults_render_more_frames_than_the_adapter_context(motion_env: Path) -> None:
    # 5 beats and the default 3 frames between them: 17 frames, so FreeNoise slides its 16-frame window.
    assert main(["animate", "a fox", "--out", "d.gif", "--motion", "animatediff", "--steps", "1", "-q",
                 "--width", "32", "--height", "32"]) == 0  # fmt: skip
    assert _gif_frames(motion_env / "d.gif")[0] == 17


def test_motion_help_names_the_mode_and_its_settings(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["animate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "--motion {chain,animatediff,video}" in out
        and "EMAKI_MOTION_ADAPTER" in out
        and "EMAKI_VIDEO_MODEL" in out
        and "--motion-depth" in out
    )


def test_a_motion_adapter_whose_weights_are_broken_is_one_line(tmp_path: Path) -> None:
    from engine.errors import ModelLoadError
    from engine.render import motion
    from engine.settings import load_settings

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "MotionAdapter"}')
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    settings = load_settings(profile="sd15", motion_adapter=str(folder), data_dir=tmp_path / "data")
    motion.check_request(settings)  # the files are there: the request passes, loading fails
    with pytest.raises(ModelLoadError) as failed:
        motion.load_adapter(settings, torch.device("cpu"), torch.float32)
    assert str(failed.value).startswith(f"cannot load motion adapter from '{folder}': ")
    assert "\n" not in str(failed.value)
