"""Video mode as a hostile operator and member use it (review of issue 22): style files the loader would choke
on later, an upload cap no MP4 fits, a redo's default output, a sidecar whose video style changed, a model
folder of another pipeline. Each case is tiny: 32 px keyframes, the shortest clips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emaki.cli import main
from engine.errors import EmakiError
from engine.render.style_files import StyleFileError
from engine.render.video import VideoRenderer
from engine.render.video_styles import VideoStyle, read_video_style
from engine.settings import Settings
from tests.test_cli_jobs import SMALL, tiny_env  # noqa: F401 - the fixture is used by name
from tests.test_video import keyframes, make_video_lora, plan, tiny_settings, video_model  # noqa: F401

# 2 keyframes, a 9-frame clip (1 s at 8 fps: the shortest there is): the cheapest whole video job.
SHORT = ["--motion", "video", "--seconds", "1", "--fps", "8", "--frames", "2", "--steps", "4", "--strength", "0.5"]
SHORT += ["--width", "32", "--height", "32", "-q"]


@pytest.fixture(scope="module")
def lora_file(video_model: VideoRenderer, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return make_video_lora(video_model, tmp_path_factory.mktemp("lora"))  # rank 4, no alpha keys


def with_alphas(source: Path, target: Path, alpha: float) -> Path:
    """The same LoRA with a kohya-style `.alpha` per layer (ComfyUI and many trainers write one)."""
    tensors = load_file(str(source))
    alphas = {k.replace("lora_A.weight", "alpha"): torch.tensor(alpha) for k in tensors if k.endswith("lora_A.weight")}
    save_file(tensors | alphas, str(target))
    return target


def clip_bytes(frames) -> list[bytes]:
    return [f.tobytes() for f in frames]


# --- video styles ----------------------------------------------------------------------------------
def test_a_file_of_alphas_only_is_refused_not_registered_with_no_layers(
    lora_file: Path,
    tiny_settings: Settings,  # noqa: F811
    tmp_path: Path,
) -> None:
    tensors = load_file(str(lora_file))
    only = {k.replace("lora_A.weight", "alpha"): torch.tensor(4.0) for k in tensors if k.endswith("lora_A.weight")}
    save_file(only, str(tmp_path / "alphas.safetensors"))
    with pytest.raises(StyleFileError) as refused:
        read_video_style(tmp_path / "alphas.safetensors", tiny_settings)
    assert "no LoRA layers" in str(refused.value) and "\n" not in str(refused.value)


def test_a_lora_with_alpha_keys_renders_scaled_by_alpha_over_rank(
    video_model: VideoRenderer,  # noqa: F811
    lora_file: Path,
    tiny_settings: Settings,  # noqa: F811
    tmp_path: Path,
) -> None:
    # diffusers' LTX loader refuses any key without "lora" in it: `emaki styles add` took such a file and the
    # job failed after its keyframes ("Invalid LoRA checkpoint").
    same = with_alphas(lora_file, tmp_path / "alpha4.safetensors", 4.0)  # alpha = rank: scale 1
    half = with_alphas(lora_file, tmp_path / "alpha2.safetensors", 2.0)
    assert read_video_style(same, tiny_settings).n_layers == read_video_style(lora_file, tiny_settings).n_layers
    keys, clip = keyframes(2), plan(beats=2, frames=9)
    try:
        plain = video_model.use_style(VideoStyle("p", str(lora_file), 1.0, "p")).render(keys, clip)
        scaled_1 = video_model.use_style(VideoStyle("s", str(same), 1.0, "s")).render(keys, clip)
        scaled_half = video_model.use_style(VideoStyle("h", str(half), 1.0, "h")).render(keys, clip)
    finally:
        video_model.use_style(None)
    assert clip_bytes(scaled_1) == clip_bytes(plain)
    assert clip_bytes(scaled_half) != clip_bytes(plain)


# --- the result ------------------------------------------------------------------------------------
def test_a_cap_no_mp4_fits_leaves_a_finished_job_and_the_clip_not_a_failure(
    tiny_env: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    # The cap is the bot's upload limit: a job that rendered every frame must not fail on it (it could be
    # neither posted nor redone). The CLI writes the clip and says it is over the cap; the bot's post says why.
    monkeypatch.setenv("EMAKI_UPLOAD_LIMIT_BYTES", "1000")
    assert main(["animate", "a fox runs", *SHORT, "--seed", "3", "--out", "big.mp4"]) == 0
    err = capsys.readouterr().err
    assert "over the upload cap of 1000 bytes" in err
    assert (tiny_env / "big.mp4").stat().st_size > 1000
    sidecar = json.loads((tiny_env / "big.json").read_text())
    assert sidecar["metrics"]["mp4_over_cap"] == 1


def test_redo_of_a_video_job_writes_an_mp4_by_default(tiny_env: Path, capsys) -> None:  # noqa: F811
    assert main(["animate", "a fox runs", *SHORT, "--seed", "3"]) == 0
    capsys.readouterr()
    assert main(["redo", "1", "--from", "2", "-q"]) == 0
    assert capsys.readouterr().out.strip().endswith(".mp4")  # as animate's default for a video job


# --- sidecars and models -----------------------------------------------------------------------------
def test_a_sidecar_whose_video_style_file_changed_is_one_line(
    tiny_env: Path,  # noqa: F811
    video_model: VideoRenderer,  # noqa: F811
    capsys,
) -> None:
    lora = make_video_lora(video_model, tiny_env / "lora")
    record = {"video": {"style": {"name": "drift", "sha256": "0" * 64, "weight": 1.0}}}
    assert main(["styles", "add", "drift", str(lora)]) == 0
    from emaki.animate_cmd import _check_sidecar_style
    from engine.coordinator.store import open_store

    with pytest.raises(EmakiError) as refused:
        _check_sidecar_style(open_store(tiny_env / "data"), {"style": None, **record})
    assert "video style 'drift' here is not the file the sidecar used" in str(refused.value)
