"""Video mode (`--motion video`): the tiny random-weight LTX-Video model loaded from emaki's tiny hub cache
through the user's loading path, the clip it renders through the keyframes (frame count, repeatability,
the keyframes' pull on it, progress and cancel), the MP4 fitted under a cap, every bad combination as
one line, and the CLI end to end with a sidecar that reproduces the video byte for byte."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from emaki.cli import main
from engine.coordinator.requests import build_params
from engine.errors import EmakiError, InvalidRequest, JobCancelled
from engine.params import video_frame_count
from engine.render import model_files
from engine.render.media import fit_mp4
from engine.render.video import ClipPlan, VideoRenderer, condition_frames, joined_prompt, plan_clip
from engine.render.video import clip_paths as video_clip_paths
from engine.settings import Settings, load_settings
from tests.test_cli_jobs import SMALL, tiny_env  # noqa: F401 - the fixture is used by name

VIDEO = ["--motion", "video", "--seconds", "2", "--fps", "8"]  # 16 frames asked: 17 (8k+1), beats at 0, 8, 16
# The same through build_params, small: 3 keyframes of 32 px, 4 steps (2 for frames 2..N).
CLIP = {"frames": 3, "steps": 4, "strength": 0.5, "width": 32, "height": 32, "video_seconds": 2.0, "video_fps": 8}


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(profile="tiny", data_dir=tmp_path_factory.mktemp("video"))


@pytest.fixture(scope="module")
def video_model(tiny_settings: Settings) -> VideoRenderer:
    """The tiny LTX-Video model, built once into the tiny hub cache and loaded as a user's hub id is."""
    return VideoRenderer.load(tiny_settings, torch.device("cpu"), torch.float32)


def keyframes(count: int, seed: int = 0, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def plan(beats: int = 3, seed: int = 11, frames: int = 17, size: int = 32) -> ClipPlan:
    return ClipPlan(
        prompt=joined_prompt(["a fox wakes", "a fox runs", "a fox sleeps"][:beats]),
        negative_prompt="",
        seed=seed,
        num_frames=frames,
        fps=8,
        width=size,
        height=size,
        steps=3,
        guidance=3.0,
        condition_frames=tuple(condition_frames(beats, frames)),
    )


def pixels(frames: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(f, dtype=np.float64) for f in frames])


def probe(path: Path) -> str:
    """What ffmpeg (imageio-ffmpeg's own binary) says about a file's streams."""
    run = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True)
    return run.stderr.decode(errors="replace")


# --- the model and its frames ------------------------------------------------------------------------
def test_the_tiny_video_model_is_a_hub_repo_loaded_through_the_user_path(tiny_settings, video_model) -> None:
    spec = model_files.video_spec(tiny_settings, half=False)
    found = model_files.on_disk(spec)
    assert found.ready and found.kind == "tiny" and "emaki-tiny--ltx-video" in str(model_files.resolve(spec).path)
    assert type(video_model.pipe).__name__ == "LTXConditionPipeline"
    assert video_model.pipe.vae_temporal_compression_ratio == 8  # 8 frames a latent frame, as the real LTX
    # The tokenizer was built in-process and saved: T5's class, ending every prompt with </s>.
    ids = video_model.pipe.tokenizer("A fox").input_ids
    assert type(video_model.pipe.tokenizer).__name__.startswith("T5Tokenizer") and ids[-1] == 1


def test_frame_counts_round_to_8k_plus_1_and_beats_land_on_latent_frames() -> None:
    assert video_frame_count(5, 24) == 121 and video_frame_count(2, 8) == 17 and video_frame_count(1, 4) == 9
    assert condition_frames(3, 17) == [0, 8, 16]
    at = condition_frames(5, 121)
    assert at[0] == 0 and at[-1] == 120 and all(f % 8 == 0 for f in at) and len(set(at)) == 5
    assert joined_prompt(["a fox wakes.", "it runs"]) == "a fox wakes. Then it runs."


def test_a_clip_has_its_frames_at_its_size_and_a_seed_repeats_it(video_model) -> None:
    keys = keyframes(3)
    first = video_model.render(keys, plan())
    again = video_model.render(keys, plan())
    assert len(first) == 17 and {f.size for f in first} == {(32, 32)}
    assert [f.tobytes() for f in first] == [f.tobytes() for f in again]
    other_seed = video_model.render(keys, plan(seed=12))
    assert [f.tobytes() for f in other_seed] != [f.tobytes() for f in first]


def test_the_keyframes_condition_the_clip(video_model) -> None:
    keys = keyframes(3)
    base = pixels(video_model.render(keys, plan()))
    changes = []
    for k in range(3):
        changed = list(keys)
        changed[k] = Image.fromarray(255 - np.asarray(keys[k]))
        changes.append(np.abs(pixels(video_model.render(changed, plan())) - base).mean(axis=(1, 2, 3)))
    # Keyframe 1 is written into the clip's first latent frame: the frames by beat 1 change most.
    assert changes[0][:4].mean() > changes[0][-4:].mean() > 0
    # Later keyframes are conditions at their beats' frames: each changes the clip. (Their pull is local only
    # in a trained model; random attention spreads it over the clip, so locality is not asserted for them.)
    assert changes[1].max() > 0 and changes[2].max() > 0


def test_progress_counts_every_step_and_cancel_stops_at_the_next(video_model) -> None:
    steps: list[tuple[int, int]] = []
    video_model.render(keyframes(3), plan(), on_step=lambda step, total: steps.append((step, total)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    seen: list[int] = []
    with pytest.raises(JobCancelled):
        video_model.render(
            keyframes(3), plan(), on_step=lambda step, total: seen.append(step), cancelled=lambda: bool(seen)
        )
    assert seen == [1]


# --- the MP4 -----------------------------------------------------------------------------------------
def test_the_mp4_fits_a_small_cap_as_h264_yuv420p_with_faststart(tmp_path: Path) -> None:
    noise = keyframes(24, seed=3, size=96)  # noise compresses badly: CRF 18 does not fit 24 KB
    data, fitted = fit_mp4(noise, 8, 24_000)
    assert len(data) <= 24_000 and fitted["kbps"] > 0
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    info = probe(path)
    assert "Video: h264" in info and "yuv420p" in info
    assert data.find(b"moov") < data.find(b"mdat")  # faststart: the index before the media
    assert imageio_ffmpeg.count_frames_and_secs(str(path))[0] == 24
    with pytest.raises(InvalidRequest) as refused:
        fit_mp4(noise, 8, 500)
    assert "\n" not in str(refused.value)


# --- requests ----------------------------------------------------------------------------------------
BAD = {
    "in-betweens": ({"interpolate": 2}, {}, "--interpolate does not apply to --motion video"),
    "depth": ({"motion_depth": True}, {}, "motion depth guidance applies to --motion animatediff only"),
    "beats too dense": ({"frames": 5, "video_seconds": 1.0, "video_fps": 8}, {}, "5 keyframes need a clip of at least"),
    "fps too high": ({"video_fps": 60}, {}, "video_fps must be between 4 and 50"),
    "fps not whole": ({"video_fps": 24.5}, {}, "video_fps must be a whole number"),
    "no seconds": ({"video_seconds": 0}, {}, "video_seconds must be above 0"),
    "one beat": ({"frames": 1}, {}, "at least 2 frames"),
    "too many frames": ({"video_seconds": 30.0, "video_fps": 50}, {}, "make 1497 frames; the limit is 128"),
    "real model on tiny": ({}, {"video_model": "Lightricks/LTX-Video-0.9.5"}, "cannot run with the tiny profile"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_bad_combination_is_one_line(case: str, tmp_path: Path) -> None:
    options, settings_changes, expected = BAD[case]
    settings = Settings(profile="tiny", data_dir=tmp_path, **settings_changes)
    options = {"frames": 3, "steps": 4, "strength": 0.5, "video_seconds": 2.0, "video_fps": 8} | options
    with pytest.raises(EmakiError) as refused:
        build_params(settings, None, "a fox runs", motion="video", **options)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_clip_options_outside_video_mode_and_a_model_of_another_kind_are_one_line(tmp_path: Path) -> None:
    settings = Settings(profile="tiny", data_dir=tmp_path)
    with pytest.raises(InvalidRequest, match="apply to --motion video only"):
        build_params(settings, None, "a fox", video_fps=8)
    # An SD pipeline folder named as the video model: refused for what it is, in one line (not for the
    # transformer/ it lacks).
    sd15 = model_files.resolve(model_files.profile_models(settings, half=False)[0]).path
    sd = Settings(profile="sd15", data_dir=tmp_path, video_model=str(sd15), device="cpu")
    with pytest.raises(EmakiError) as refused:
        build_params(sd, None, "a fox", motion="video", frames=3)
    assert "is a StableDiffusionPipeline; video mode runs LTX-Video" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_request_takes_the_settings_clip_and_plans_the_conditions(tmp_path: Path) -> None:
    settings = load_settings(profile="tiny", data_dir=tmp_path, video_seconds=2.0, video_fps=8)
    params = build_params(settings, None, "a fox runs", motion="video", frames=3, steps=4, strength=0.5, seed=1)
    assert (params.clip_frames, params.clip_frame_ms, params.interpolate) == (17, 125, 0)
    clip = plan_clip(params, ["a", "b", "c"], settings)
    assert clip.condition_frames == (0, 8, 16) and clip.prompt == "a. Then b. Then c." and clip.guidance == 3.0
    distilled = plan_clip(params, ["a", "b", "c"], dataclasses.replace(settings, video_fewstep="distilled"))
    assert distilled.guidance == 1.0 and distilled.steps == len(distilled.timesteps) == 8


# --- end to end --------------------------------------------------------------------------------------
def test_cli_renders_a_video_and_its_sidecar_reproduces_it_byte_for_byte(tiny_env: Path, capsys) -> None:  # noqa: F811
    assert main(["animate", "a fox runs", *VIDEO, "--seed", "3", *SMALL]) == 0
    video = tiny_env / "a-fox-runs.mp4"  # video mode's default result is the MP4
    assert capsys.readouterr().out.strip().endswith("a-fox-runs.mp4")
    info = probe(video)
    assert "Video: h264" in info and "yuv420p" in info and "32x32" in info
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(video))
    assert frames == 17 and seconds == pytest.approx(17 / 8, abs=0.07)
    folder = tiny_env / "a-fox-runs_frames"
    assert len(list(folder.glob("frame_*.png"))) == 3 and len(list((folder / "clip").glob("clip_*.png"))) == 17
    sidecar = json.loads((tiny_env / "a-fox-runs.json").read_text())
    record = sidecar["video"]
    assert record["model"] == "tiny" and record["revision"] == sidecar["models"]["revisions"]["video_model"]
    assert [c["frame"] for c in record["conditions"]] == [0, 8, 16] and record["num_frames"] == 17
    assert sidecar["params"]["video_fps"] == 8 and sidecar["metrics"]["mp4_bytes"] == video.stat().st_size

    assert main(["animate", "--from-sidecar", "a-fox-runs.json", "--out", "again.mp4", "-q"]) == 0
    assert (tiny_env / "again.mp4").read_bytes() == video.read_bytes()
    again = sorted((tiny_env / "again_frames" / "clip").glob("clip_*.png"))
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in sorted((folder / "clip").glob("clip_*.png"))]


def test_cli_clip_options_are_one_line(tiny_env: Path, capsys) -> None:  # noqa: F811
    assert main(["animate", "a fox", *VIDEO, "--duration", "200", *SMALL]) != 0
    assert main(["animate", "a fox", "--motion", "video", "--fps", "24.5", *SMALL]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert any("--duration does not apply to --motion video" in line for line in errors)
    assert any("video_fps must be a whole number" in line for line in errors)


# --- redo and cancel through the engine ----------------------------------------------------------
def run_job(engine, job_id: int, **kw) -> list:
    events = list(engine.run_to_end(job_id, **kw))
    return events


def clip_bytes(engine, job_id: int) -> list[bytes]:
    return [p.read_bytes() for p in video_clip_paths(engine.job_dir(job_id))]


def keyframe_bytes(engine, job_id: int) -> list[bytes]:
    return [Path(row["path"]).read_bytes() for row in engine.store.frames(job_id)]


def test_redo_from_keyframe_k_keeps_the_earlier_ones_and_renders_the_clip_again_through_them(engine) -> None:
    params = build_params(engine.settings, None, "a fox runs", motion="video", seed=8, **CLIP)
    parent = engine.create_job(params)
    assert type(run_job(engine, parent)[-1]).__name__ == "Finished"
    redo = engine.create_regeneration(parent, 2)  # keyframe 3 of 3: 1 and 2 kept
    assert type(run_job(engine, redo)[-1]).__name__ == "Finished"
    before, after = keyframe_bytes(engine, parent), keyframe_bytes(engine, redo)
    assert after[:2] == before[:2] and after[2] != before[2]
    assert clip_bytes(engine, redo) != clip_bytes(engine, parent) and len(clip_bytes(engine, redo)) == 17
    # The same clip noise: the clip changed only through keyframe 3; its first frame is keyframe 1's.
    record = [json.loads((engine.job_dir(j) / "video.json").read_text()) for j in (parent, redo)]
    assert record[0]["seed"] == record[1]["seed"]
    first = [np.asarray(Image.open(video_clip_paths(engine.job_dir(j))[0]), dtype=float) for j in (parent, redo)]
    last = [np.asarray(Image.open(video_clip_paths(engine.job_dir(j))[-1]), dtype=float) for j in (parent, redo)]
    assert np.abs(first[0] - first[1]).mean() < np.abs(last[0] - last[1]).mean()
    # Redo from keyframe 2: keyframe 1 kept, 2 and 3 (chained from it) rendered again.
    from_two = engine.create_regeneration(parent, 1)
    run_job(engine, from_two)
    again = keyframe_bytes(engine, from_two)
    assert again[0] == before[0] and again[1] != before[1] and again[2] != before[2]
    # 🔁: every keyframe and the clip's noise new.
    reroll = engine.create_regeneration(parent, 0, reseed_all=True)
    run_job(engine, reroll)
    rolled = keyframe_bytes(engine, reroll)
    assert all(a != b for a, b in zip(rolled, before, strict=True))
    assert json.loads((engine.job_dir(reroll) / "video.json").read_text())["seed"] != record[0]["seed"]
    assert engine.store.job(reroll)["params"]["clip_seed"] is not None


def test_cancel_during_the_clip_stops_at_the_next_video_step(engine) -> None:
    import threading

    params = build_params(engine.settings, None, "a fox runs", motion="video", seed=9, **CLIP)
    job = engine.create_job(params)
    cancel = threading.Event()
    video_steps: list[int] = []

    def on_step(progress) -> None:
        if progress.frame_index == params.frames:  # the video model's steps: one past the last keyframe
            video_steps.append(progress.step)
            cancel.set()

    events = run_job(engine, job, cancel=cancel, on_step=on_step)
    assert type(events[-1]).__name__ == "Failed" and events[-1].reason == "cancelled"
    assert video_steps == [1] and engine.store.job(job)["status"] == "cancelled"
    # Keyframes 1-2 are on disk; the last rides with the clip, so neither was written.
    assert [bool(r["path"]) for r in engine.store.frames(job)] == [True, True, False]
    assert video_clip_paths(engine.job_dir(job)) == []


def test_cli_redo_of_a_video_keeps_keyframe_1_and_writes_a_new_mp4(tiny_env: Path, capsys) -> None:  # noqa: F811
    assert main(["animate", "a fox runs", *VIDEO, "--seed", "3", *SMALL]) == 0
    first = (tiny_env / "a-fox-runs.mp4").read_bytes()
    keyframes_before = [p.read_bytes() for p in sorted((tiny_env / "a-fox-runs_frames").glob("frame_*.png"))]
    assert main(["redo", "1", "--from", "2", "--out", "redone.mp4", "-q"]) == 0
    assert (tiny_env / "redone.mp4").read_bytes() != first
    keyframes_after = [p.read_bytes() for p in sorted((tiny_env / "redone_frames").glob("frame_*.png"))]
    assert keyframes_after[0] == keyframes_before[0] and keyframes_after[1:] != keyframes_before[1:]


# --- video styles --------------------------------------------------------------------------------
def make_video_lora(video_model: VideoRenderer, folder: Path, seed: int = 3, std: float = 0.5) -> Path:
    """A LoRA for the tiny LTX transformer with random non-zero weights, saved as LTXConditionPipeline saves
    one (diffusers naming: transformer.<layer>.lora_A.weight)."""
    from diffusers import LTXConditionPipeline, LTXVideoTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = LTXVideoTransformer3DModel.from_config(video_model.pipe.transformer.config)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    folder.mkdir(parents=True, exist_ok=True)
    LTXConditionPipeline.save_lora_weights(
        str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True
    )
    return folder / "pytorch_lora_weights.safetensors"


def renamed(source: Path, target: Path, rename) -> Path:
    from safetensors.torch import load_file, save_file

    save_file({rename(k): v for k, v in load_file(str(source)).items()}, str(target))
    return target


def test_a_video_lora_in_diffusers_and_trainer_naming_loads_and_changes_the_clip(
    video_model, tiny_settings, tmp_path: Path
) -> None:
    from engine.render.video_styles import VideoStyle, read_video_style

    diffusers_file = make_video_lora(video_model, tmp_path / "lora")
    trainer_file = renamed(  # LTX-Video-Trainer / ComfyUI naming, which diffusers' LTX loader converts
        diffusers_file, tmp_path / "trainer.safetensors", lambda k: "diffusion_model." + k.removeprefix("transformer.")
    )
    assert read_video_style(diffusers_file, tiny_settings).source == "diffusers"
    assert read_video_style(trainer_file, tiny_settings).source == "LTX-Video-Trainer/ComfyUI"
    keys = keyframes(3)
    base = video_model.render(keys, plan())
    styled = video_model.use_style(VideoStyle("ink", str(diffusers_file), 1.0, "a")).render(keys, plan())
    assert [f.tobytes() for f in styled] != [f.tobytes() for f in base]
    same = video_model.use_style(VideoStyle("ink2", str(trainer_file), 1.0, "b")).render(keys, plan())
    assert [f.tobytes() for f in same] == [f.tobytes() for f in styled]  # the same weights, either naming
    restored = video_model.use_style(None).render(keys, plan())
    assert [f.tobytes() for f in restored] == [f.tobytes() for f in base]  # unloading restores the model


def test_wrong_family_video_styles_are_one_line(video_model, tiny_settings, tmp_path: Path) -> None:
    from engine.coordinator.store import open_store
    from engine.render.style_files import StyleFileError
    from engine.render.video_styles import read_video_style
    from tests.helpers import make_random_lora

    lora = make_video_lora(video_model, tmp_path / "lora")
    store = open_store(tmp_path / "data")
    store.add_style("drift", str(lora), family="ltx-video")
    store.add_style("ink", str(make_random_lora(tmp_path / "image")), family="sd15")
    settings = dataclasses.replace(tiny_settings, data_dir=tmp_path / "data")
    cases = [
        ({"style": "drift", "motion": "video"}, "'drift' is an LTX-Video style (for the video model)"),
        ({"video_style": "ink", "motion": "video"}, "'ink' is an image style (sd15) for the keyframes"),
        ({"video_style": "drift"}, "a video style applies to --motion video only"),
        ({"video_style": "nope", "motion": "video"}, "unknown style 'nope'"),
    ]
    for options, expected in cases:
        with pytest.raises(EmakiError) as refused:
            build_params(settings, store, "a fox", frames=3, **options)
        assert expected in str(refused.value) and "\n" not in str(refused.value)
    ok = build_params(settings, store, "a fox", frames=3, motion="video", style="ink", video_style="drift")
    assert (ok.style, ok.video_style) == ("ink", "drift") and ok.video_style_id
    kohya = renamed(
        lora,
        tmp_path / "kohya.safetensors",
        lambda k: "lora_unet_" + k.removeprefix("transformer.").replace(".", "_", 3),
    )
    other = renamed(lora, tmp_path / "other.safetensors", lambda k: k.replace("attn1", "attn9"))
    for path, expected in ((kohya, "kohya/musubi-tuner names"), (other, "is not in the video model's transformer")):
        with pytest.raises(StyleFileError) as refused:
            read_video_style(path, tiny_settings)
        assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_styles_add_registers_a_video_lora_and_a_video_job_renders_with_it(
    tiny_env: Path,  # noqa: F811
    video_model,
    capsys,
) -> None:
    from engine.coordinator.store import open_store

    lora = make_video_lora(video_model, tiny_env / "lora")
    assert main(["styles", "add", "drift", str(lora)]) == 0
    assert "registered video style drift: LTX-Video LoRA from a diffusers file" in capsys.readouterr().out
    assert open_store(tiny_env / "data").style("drift")["family"] == "ltx-video"
    assert main(["animate", "a fox runs", *VIDEO, "--seed", "3", *SMALL, "--out", "plain.mp4"]) == 0
    assert main(["animate", "a fox runs", *VIDEO, "--seed", "3", *SMALL, "--video-style", "drift"]) == 0
    sidecar = json.loads((tiny_env / "a-fox-runs.json").read_text())
    assert sidecar["video"]["style"]["name"] == "drift" and sidecar["params"]["video_style"] == "drift"
    assert (tiny_env / "a-fox-runs.mp4").read_bytes() != (tiny_env / "plain.mp4").read_bytes()
    # The keyframes are the same: the video style is the video model's only.
    plain = sorted((tiny_env / "plain_frames").glob("frame_*.png"))
    styled = sorted((tiny_env / "a-fox-runs_frames").glob("frame_*.png"))
    assert [p.read_bytes() for p in plain] == [p.read_bytes() for p in styled]
    assert main(["animate", "a fox", "--style", "drift", *SMALL]) != 0
    assert "'drift' is an LTX-Video style" in capsys.readouterr().err
