"""Motion mode on the tiny profile: a random-weight motion adapter through diffusers' AnimateDiff
pipelines, reached from the engine's own job path (rows per beat, clip frames beside them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.coordinator.requests import build_params
from engine.coordinator.store import open_store
from engine.coordinator.worker import Engine, clip_images
from engine.render import motion
from engine.render.models import Models, StyleRef
from engine.render.motion import MotionRenderer, beat_starts, prompt_schedule, window_noise
from engine.settings import load_settings
from tests.helpers import make_random_lora

BEATS = ["a fox wakes", "the fox runs", "the fox leaps"]
SIZE = dict(width=32, height=32)


def test_beats_land_on_every_k_plus_first_frame_and_reach_the_last() -> None:
    assert beat_starts(3, 3 + 2 * 4) == [0, 5, 10]  # K = 4 frames between beats
    assert prompt_schedule(BEATS, 11) == {0: BEATS[0], 5: BEATS[1], 10: BEATS[2]}
    assert prompt_schedule(BEATS, 2) == {0: BEATS[0], 1: BEATS[2]}  # more beats than frames: the first and last
    assert prompt_schedule(["one"], 4) == {0: "one"}


def test_each_beat_seed_draws_only_its_own_window() -> None:
    base = window_noise([1, 2, 3], 7, (4, 4, 4))  # K = 2: windows 0-2, 3-5, 6
    redo = window_noise([1, 9, 3], 7, (4, 4, 4))
    assert base.shape == (1, 4, 7, 4, 4)
    assert torch.equal(base[:, :, :3], redo[:, :, :3]) and torch.equal(base[:, :, 6:], redo[:, :, 6:])
    assert not torch.equal(base[:, :, 3:6], redo[:, :, 3:6])


@pytest.fixture(scope="module")
def motion_models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    # Own models: the session's shared ones carry other tests' style layers and no motion adapter.
    settings = load_settings(profile="tiny", motion_adapter="tiny", data_dir=tmp_path_factory.mktemp("m"))
    return Models(settings).load()


class Spy:
    """Records what the AnimateDiff pipeline was called with (prompt schedule, latents, ...)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pipe: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        real = type(pipe).__call__

        def spy(this: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(kwargs)
            return real(this, *args, **kwargs)

        monkeypatch.setattr(type(pipe), "__call__", spy)


def _render(renderer: MotionRenderer, seeds: list[int], beats: list[str] = BEATS, frames: int = 5, **kw) -> list:
    steps_seen: list[tuple[int, int]] = []
    out = renderer.render(
        beats, seeds, frames, steps=2, guidance=7.5, on_step=lambda s, t: steps_seen.append((s, t)), **SIZE, **kw
    )
    total = steps_seen[-1][1]
    assert [s for s, _ in steps_seen] == list(range(1, total + 1)) and total >= 2
    return [np.asarray(image) for image in out]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_motion_mode_renders_the_clip_seeded_and_shares_weights(motion_models: Models, monkeypatch) -> None:
    renderer = motion_models.motion_renderer()
    spy = Spy(monkeypatch, renderer.pipe)
    first = _render(renderer, [3, 4, 5])
    assert len(first) == 5 and first[0].shape == (32, 32, 3)
    assert _same(first, _render(renderer, [3, 4, 5]))  # bitwise repeatable
    assert not _same(first, _render(renderer, [6, 4, 5]))
    # The schedule reached the pipeline, with the per-beat noise as its latents.
    assert spy.calls[0]["prompt"] == {0: BEATS[0], 2: BEATS[1], 4: BEATS[2]}
    assert spy.calls[0]["num_frames"] == 5
    assert torch.equal(spy.calls[0]["latents"], window_noise([3, 4, 5], 5, (4, 16, 16)))  # tiny VAE: /2
    # One copy of the base weights: VAE and text encoder are the chain's; the motion UNet's 2D blocks
    # are the 2D UNet's own modules; only the adapter's motion modules are new.
    chain = motion_models.txt2img
    assert renderer.pipe.vae is chain.vae and renderer.pipe.text_encoder is chain.text_encoder
    assert renderer.motion_unet.down_blocks[1].attentions is chain.unet.down_blocks[1].attentions
    own = {id(p) for p in renderer.motion_unet.parameters()} - {id(p) for p in chain.unet.parameters()}
    assert own == {id(p) for p in renderer.adapter.parameters()}


def test_different_later_beats_change_the_clip(motion_models: Models) -> None:
    renderer = motion_models.motion_renderer()
    base = _render(renderer, [5, 6, 7])
    changed = _render(renderer, [5, 6, 7], beats=[BEATS[0], "a whale sings", "a city at night"])
    assert not np.array_equal(base[-1], changed[-1])


@pytest.mark.parametrize("fewstep", ["lcm", "lightning"])
def test_few_step_options_run_their_model_cards_schedulers(motion_models: Models, fewstep: str) -> None:
    adapter = motion.load_adapter(motion_models.settings, torch.device("cpu"), torch.float32)
    renderer = MotionRenderer(motion_models.txt2img, adapter, fewstep)
    expected = {"lcm": "LCMScheduler", "lightning": "EulerDiscreteScheduler"}[fewstep]
    assert type(renderer.pipe.scheduler).__name__ == expected
    assert renderer.pipe.scheduler.config.beta_schedule == "linear"
    if fewstep == "lightning":
        assert renderer.pipe.scheduler.config.timestep_spacing == "trailing"
    assert motion_models.txt2img.scheduler.config.beta_schedule == "scaled_linear"  # the chain's is untouched
    frames = renderer.render(BEATS, [1, 2, 3], 5, steps=2, guidance=1.0, **SIZE)
    assert len(frames) == 5
    # The params a few-step job records: the card's steps and guidance unless asked otherwise.
    settings = load_settings(profile="tiny", motion_adapter="tiny", motion_fewstep=fewstep, data_dir=Path("unused"))
    params = build_params(settings, None, "a fox", motion="animatediff", seed=1)
    assert (params.steps, params.guidance) == (motion.FEWSTEP[fewstep].steps, motion.FEWSTEP[fewstep].guidance)


def test_a_style_changes_the_motion_clip_and_removing_it_restores_it(motion_models: Models, tmp_path) -> None:
    renderer = motion_models.motion_renderer()
    plain = _render(renderer, [8, 9, 10])
    lora = make_random_lora(tmp_path / "style", seed=3)
    motion_models.use_style(StyleRef(name="ink", path=str(lora)))
    try:
        styled = _render(renderer, [8, 9, 10])
    finally:
        motion_models.use_style(None)
    assert not _same(plain, styled)
    assert _same(plain, _render(renderer, [8, 9, 10]))  # bit-exact without it


def test_depth_guidance_runs_the_controlnet_pipeline_on_shared_weights(motion_models: Models, monkeypatch) -> None:
    from PIL import Image

    renderer = motion_models.motion_renderer()
    assert type(renderer.depth_pipe).__name__ == "AnimateDiffControlNetPipeline"
    assert renderer.depth_pipe.unet is renderer.pipe.unet and renderer.depth_pipe.vae is renderer.pipe.vae
    assert renderer.depth_pipe.controlnet is motion_models.img2img.controlnet
    spy = Spy(monkeypatch, renderer.depth_pipe)
    depth = motion_models.depth_map(Image.new("RGB", (32, 32), (90, 120, 200)))
    seen: list[tuple[int, ...]] = []
    hook = renderer.depth_pipe.controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["controlnet_cond"].shape)), with_kwargs=True
    )
    try:
        guided = _render(renderer, [1, 2, 3], depth=depth)
    finally:
        hook.remove()
    assert len(guided) == 5 and len(spy.calls) == 1 and len(spy.calls[0]["conditioning_frames"]) == 5
    # The depth map reached the ControlNet for every frame (x2 for guidance), at every step. Its output
    # is not compared: a ControlNet's zero-initialised output layers make random weights add nothing.
    assert seen and all(shape == (2 * 5, 3, 32, 32) for shape in seen)


# --- through the engine: rows per beat, clip frames beside them, redo beat k ----------------------
@pytest.fixture
def motion_engine(motion_models: Models, tmp_path: Path) -> Engine:
    settings = load_settings(profile="tiny", motion_adapter="tiny", data_dir=tmp_path / "data")
    motion_models.use_style(None)
    return Engine(settings, open_store(settings.data_dir), models=motion_models)


def _run(engine: Engine, job_id: int) -> None:
    events = list(engine.run_to_end(job_id))
    assert type(events[-1]).__name__ == "Finished", events[-1]


def test_a_motion_job_keeps_one_row_per_beat_and_shows_every_clip_frame(motion_engine: Engine) -> None:
    params = build_params(motion_engine.settings, None, "a fox runs", frames=3, steps=2, seed=4, motion="animatediff")
    assert (params.interpolate, params.clip_frames) == (3, 9)  # motion_inbetweens' default K
    job = motion_engine.create_job(params)
    _run(motion_engine, job)
    rows = motion_engine.store.frames(job)
    assert len(rows) == 3 and len({r["seed"] for r in rows}) == 3
    images, frame_ms = clip_images(motion_engine.settings, motion_engine.store.job(job), rows)
    assert len(images) == 9 and frame_ms == round(3 * 100 / 9)
    assert np.array_equal(np.asarray(images[4]), np.asarray(Image_open(rows[1]["path"])))  # beat 2 at frame 4


def Image_open(path: str) -> Any:
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_redo_beat_k_changes_only_its_noise_window_and_a_reroll_all(motion_engine: Engine, monkeypatch) -> None:
    renderer = motion_engine.models.motion_renderer()
    spy = Spy(monkeypatch, renderer.pipe)
    params = build_params(
        motion_engine.settings, None, "a fox", frames=3, interpolate=1, steps=2, seed=5, motion="animatediff"
    )
    parent = motion_engine.create_job(params)
    _run(motion_engine, parent)
    redo = motion_engine.create_regeneration(parent, 1)  # beat 2: frames 2-3 of 5
    _run(motion_engine, redo)
    reroll = motion_engine.create_regeneration(parent, 0, reseed_all=True)
    _run(motion_engine, reroll)
    first, second, third = (call["latents"] for call in spy.calls)
    # What is asserted: the initial noise outside beat 2's window is bit-identical, inside it differs;
    # a reroll draws every window anew. (The frames outside the window may still change: the motion
    # layers attend across the clip.)
    assert torch.equal(first[:, :, :2], second[:, :, :2]) and torch.equal(first[:, :, 4:], second[:, :, 4:])
    assert not torch.equal(first[:, :, 2:4], second[:, :, 2:4])
    assert all(not torch.equal(first[:, :, a:b], third[:, :, a:b]) for a, b in ((0, 2), (2, 4), (4, 5)))
    rows = [motion_engine.store.frames(j) for j in (parent, redo)]
    assert [r["seed"] for r in rows[0]][::2] == [r["seed"] for r in rows[1]][::2]
    assert rows[0][1]["seed"] != rows[1][1]["seed"]
    # Every beat's file of the redo is the redo's own render, in-betweens included.
    images, _ = clip_images(motion_engine.settings, motion_engine.store.job(redo), rows[1])
    assert len(images) == 5 and all(str(redo) in Path(r["path"]).parent.name for r in rows[1])


# --- the bot: /animate motion:animatediff on SimCord ---------------------------------------------------
@pytest.fixture
def simcord_bot(tmp_path: Path, motion_models: Models):
    from bot.client import create_bot

    settings = load_settings(
        profile="tiny",
        motion_adapter="tiny",
        data_dir=tmp_path / "data",
        steps=2,
        progress_edit_interval_s=0.0,
        position_edit_interval_s=0.0,
    )
    motion_models.use_style(None)
    bot = create_bot(settings, models=motion_models)
    bot.post_retry_delays = (0.01, 0.01)
    bot.outbox.retry_base_s = 0.01
    return bot


@pytest.mark.simcord(settle_timeout=120)
async def test_the_bot_renders_a_motion_clip_and_redoes_a_beat(simcord_env) -> None:
    import io

    from PIL import Image

    guild = simcord_env.create_guild("ghibli fans")
    channel = guild.create_text_channel("animations")
    alice = guild.add_member(simcord_env.create_user("alice"))
    answer = await alice.slash(channel, "animate", prompt="a leaf falls", frames=2, seed=2, motion="animatediff")
    assert not answer.ephemeral
    gifs = [m for m in channel.history() if m.attachments and m.attachments[0].filename.endswith(".gif")]
    [posted] = gifs
    clip = Image.open(io.BytesIO(await posted.attachments[0].read()))
    assert clip.n_frames == 2 + 3  # two beats and the default 3 motion frames between them
    store = simcord_env.bot.store
    assert store.job(1)["params"]["motion"] == "animatediff"
    await alice.react(posted, "2️⃣")  # redo beat 2: a new seed for its row, the whole clip re-rendered
    child = store.job_by_result_message(
        [m for m in channel.history() if m.attachments and m.attachments[0].filename.endswith(".gif")][-1].id
    )
    assert child["parent_job_id"] == 1 and child["regen_from"] == 1
    parent_rows, child_rows = store.frames(1), store.frames(child["id"])
    assert parent_rows[0]["seed"] == child_rows[0]["seed"] and parent_rows[1]["seed"] != child_rows[1]["seed"]
    helped = await alice.slash(channel, "help")
    assert "motion:animatediff" in helped.response.content and "redo that beat" in helped.response.content


@pytest.mark.simcord(settle_timeout=120)
async def test_the_bot_refuses_motion_without_an_adapter_ephemerally(simcord_env, monkeypatch) -> None:
    guild = simcord_env.create_guild("ghibli fans")
    channel = guild.create_text_channel("animations")
    alice = guild.add_member(simcord_env.create_user("alice"))
    monkeypatch.setattr(simcord_env.bot.settings, "motion_adapter", "")
    answer = await alice.slash(channel, "animate", prompt="a leaf falls", motion="animatediff")
    assert answer.ephemeral and "motion mode needs a motion adapter" in answer.response.content
    assert simcord_env.bot.store.jobs_where("1 = 1", []) == []


def test_every_clip_frame_of_a_motion_job_is_screened(motion_engine: Engine, monkeypatch) -> None:
    import engine.coordinator.worker

    screened: list[tuple[int, int]] = []
    real = engine.coordinator.worker.screen_frame
    monkeypatch.setattr(
        engine.coordinator.worker,
        "screen_frame",
        lambda eng, job, image: screened.append(image.size) or real(eng, job, image),
    )
    params = build_params(
        motion_engine.settings, None, "a fox", frames=2, interpolate=2, steps=1, seed=6, motion="animatediff"
    )
    _run(motion_engine, motion_engine.create_job(params))
    assert len(screened) == 2 + 2  # both beats' frames and the two the motion model rendered between them
