"""`/animate motion:video` end to end: real discord.py against SimCord, the tiny profile's models (its video model
is the tiny LTX-Video, loaded from disk through the user path), no network."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import imageio_ffmpeg
import pytest

from bot.client import _fit_result
from engine.coordinator.job_files import job_dir
from engine.coordinator.worker import MP4_FILE
from engine.settings import Settings, load_settings
from tests import test_bot as base

pytestmark = pytest.mark.simcord(settle_timeout=180)
# test_bot's SimCord bot and server, over this module's bot_settings (smaller frames, fewer steps)
simcord_bot, world = base.simcord_bot, base.world

# 2 s at 8 fps: 17 clip frames, the 3 keyframes conditioning frames 0, 8 and 16.
VIDEO = {"motion": "video", "seconds": 2.0, "fps": 8, "frames": 3}


@pytest.fixture
def bot_settings(tmp_path: Path) -> Settings:
    return load_settings(
        profile="tiny",
        data_dir=tmp_path / "data",
        steps=3,
        strength=0.5,
        width=32,
        height=32,
        progress_edit_interval_s=0.0,
        position_edit_interval_s=0.0,
    )


def posts(channel) -> list:
    return [m for m in channel.history() if m.attachments]


def frame_count(data: bytes) -> int:
    with tempfile.NamedTemporaryFile(suffix=".mp4") as handle:
        handle.write(data)
        handle.flush()
        return imageio_ffmpeg.count_frames_and_secs(handle.name)[0]


async def test_a_video_job_posts_its_mp4_and_gif_once_and_shows_the_video_stage(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    answer = await alice.slash(channel, "animate", prompt="a paper boat drifts", seed=4, **VIDEO)
    assert not answer.ephemeral
    [posted] = posts(channel)  # exactly once
    names = [a.filename for a in posted.attachments]
    assert names == ["emaki-1.mp4", "emaki-1.gif"]  # the MP4 is the result; the GIF fits beside it
    mp4 = await posted.attachments[0].read()
    assert mp4 == (job_dir(env.bot.settings, 1) / MP4_FILE).read_bytes() and frame_count(mp4) == 17
    assert "redo from that keyframe" in posted.content and "video 2 s at 8 fps" in posted.content
    # Progress: the keyframes, then the video model's steps as the clip's own stage.
    status_id = answer.response.id
    edits = [r.json["content"] for r in env.http_requests if r.method == "PATCH" and str(status_id) in r.path]
    assert any("keyframes done, then the clip" in text for text in edits)
    stage = [text for text in edits if "the video model renders the clip: step" in text]
    assert stage and all("/3" in text for text in stage)  # 3 steps, as asked
    job = env.bot.store.job(1)
    assert job["params"]["motion"] == "video" and job["params"]["video_fps"] == 8


async def test_a_lower_server_limit_refits_the_mp4_and_leaves_the_gif_out(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    await alice.slash(channel, "animate", prompt="a paper boat drifts", seed=5, **VIDEO)
    bot = env.bot
    job, frames = bot.store.job(1), bot.store.frames(1)
    kept = (job_dir(bot.settings, 1) / MP4_FILE).read_bytes()
    files, fitted = _fit_result(bot.settings, job, frames, len(kept) + 10)  # the MP4 fits, the GIF no longer
    assert [name for name, _ in files] == ["emaki-1.mp4"] and files[0][1] == kept and fitted["gif_left_out"]
    limit = len(kept) - 1  # a server whose limit the worker's MP4 is over: fitted again (bitrate, then size)
    files, fitted = _fit_result(bot.settings, job, frames, limit)
    [(name, data)] = files
    assert name == "emaki-1.mp4" and len(data) <= limit and fitted["kbps"] > 0 and frame_count(data) == 17
    probe = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", "-"], input=data, capture_output=True
    )
    assert b"h264" in probe.stderr and b"yuv420p" in probe.stderr


BAD = {
    "clip options without video mode": ({"seconds": 2.0}, {}, "apply to --motion video only"),
    "fps without video mode": ({"fps": 8, "motion": "chain"}, {}, "apply to --motion video only"),
    # The tiny profile fills an empty video model with its own: a real model's id is what it cannot run.
    "no usable video model": ({**VIDEO}, {"video_model": "Lightricks/LTX-Video-0.9.5"}, "cannot run with the tiny"),
    "beats too dense": ({**VIDEO, "frames": 4}, {}, "4 keyframes need a clip of at least 25 frames"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_a_bad_video_combination_is_one_ephemeral_line_and_queues_nothing(world, monkeypatch, case) -> None:
    options, settings_changes, expected = BAD[case]
    for name, value in settings_changes.items():
        monkeypatch.setattr(world.env.bot.settings, name, value)
    answer = await world.alice.slash(world.channel, "animate", prompt="a paper boat drifts", **options)
    text = answer.response.content
    assert answer.ephemeral and expected in text and "\n" not in text
    assert world.env.bot.store.jobs_where("1 = 1", []) == [] and posts(world.channel) == []


async def test_help_names_the_video_mode(world) -> None:
    helped = await world.alice.slash(world.channel, "help")
    assert "motion:video" in helped.response.content and len(helped.response.content) <= 2000


async def test_a_digit_on_a_video_result_redoes_from_that_keyframe_and_posts_a_new_clip(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    await alice.slash(channel, "animate", prompt="a paper boat drifts", seed=6, **VIDEO)
    [posted] = posts(channel)
    await alice.react(posted, "3️⃣")  # keyframe 3: 1 and 2 kept byte for byte, the clip rendered again
    store = env.bot.store
    [_, redone] = posts(channel)
    child = store.job_by_result_message(redone.id)
    assert child["parent_job_id"] == 1 and child["regen_from"] == 2
    kept = [Path(r["path"]).read_bytes() for r in store.frames(1)]
    again = [Path(r["path"]).read_bytes() for r in store.frames(child["id"])]
    assert again[:2] == kept[:2] and again[2] != kept[2]
    assert redone.attachments[0].filename == f"emaki-{child['id']}.mp4"
    assert await redone.attachments[0].read() != await posted.attachments[0].read()
