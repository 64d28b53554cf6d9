"""Content safety end to end: the tiny random-weight checker with a threshold the test places (-2 flags
every frame: cosine scores lie in -1..1), in a normal channel, in an age-restricted one under each
policy, and for the command line (off unless turned on)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.client import EmakiBot
from engine.coordinator.requests import build_params
from engine.coordinator.safety import FLAGGED_REASON, screens
from engine.coordinator.store import Store
from engine.coordinator.worker import Engine
from engine.events import Failed, FrameDone
from engine.settings import Settings
from tests import test_bot as base
from tests.test_bot import results

bot_settings = base.bot_settings
simcord_bot = base.simcord_bot
world = base.world

FLAG_EVERYTHING = -2.0


def bot_of(env) -> EmakiBot:
    return env.bot


def age_restrict(env, channel) -> None:
    # SimCord does not model Discord's age-restricted flag (its channel payloads carry no `nsfw`), so
    # the flag is set on discord.py's own cached channel, which is where interactions read it from.
    bot_of(env).get_channel(channel.id).nsfw = True


@pytest.mark.simcord(settle_timeout=120)
async def test_flagged_frame_is_not_posted_and_its_files_go(world, bot_settings: Settings) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    bot_settings.safety_tiny_threshold = FLAG_EVERYTHING
    answer = await alice.slash(channel, "animate", prompt="a fox in the rain", frames=2, seed=1)
    store = bot_of(env).store
    job = store.job(1)
    assert job["screen"] == 1 and job["status"] == "failed" and job["error"] == FLAGGED_REASON
    assert results(channel) == []
    assert not (bot_settings.data_dir / "jobs" / "1").exists()  # the job's folder, every frame in it
    # No progress thumbnail of the flagged frame ever went out; the member's status message says what
    # happened, without an image.
    assert not any("progress.png" in str(r.json) for r in env.http_requests if r.method in ("PATCH", "POST") and r.json)
    # The member is told why privately; the channel reads only that nothing was posted.
    assert answer.followups and answer.followups[-1].ephemeral
    assert "content safety checker flagged a frame" in answer.followups[-1].content
    status = next(m for m in channel.history() if m.id == answer.response.id)
    assert "not posted (the requester was told why, privately)" in status.content and not status.attachments
    assert "safety checker" not in status.content


@pytest.mark.simcord(settle_timeout=120)
async def test_a_flagged_job_whose_private_reply_fails_says_why_in_its_status(world, bot_settings: Settings) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    bot_settings.safety_tiny_threshold = FLAG_EVERYTHING
    env.inject_error("POST", "/webhooks/*", status=500, times=None)  # every followup fails
    answer = await alice.slash(channel, "animate", prompt="a fox in the rain", frames=1, seed=1)
    assert bot_of(env).store.job(1)["status"] == "failed" and results(channel) == []
    status = next(m for m in channel.history() if m.id == answer.response.id)
    assert "content safety checker flagged a frame" in status.content and not status.attachments


@pytest.mark.simcord(settle_timeout=120)
async def test_age_restricted_channel_follows_the_server_policy(world, bot_settings: Settings) -> None:
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    bot_settings.safety_tiny_threshold = FLAG_EVERYTHING
    age_restrict(env, channel)
    store = bot_of(env).store
    await alice.slash(channel, "animate", prompt="a fox at night", frames=1, seed=2)  # default policy: screen
    assert store.job(1)["status"] == "failed" and results(channel) == []
    changed = await mod.slash(channel, "settings set", key="nsfw_policy", value="allow")
    assert changed.ephemeral and "`nsfw_policy` is now allow" in changed.response.content
    await alice.slash(channel, "animate", prompt="a fox at night", frames=1, seed=2)
    job = store.job(2)
    assert job["screen"] == 0 and job["status"] == "done" and len(results(channel)) == 1
    # A reroll of that result is screened as its parent was: not at all.
    await alice.react(results(channel)[0], "🔁")
    assert store.job(3)["status"] == "done" and len(results(channel)) == 2
    other = world.guild.create_text_channel("everyone")  # not age-restricted: screened whatever the policy
    await alice.slash(other, "animate", prompt="a fox at night", frames=1, seed=2)
    assert store.job(4)["screen"] == 1 and store.job(4)["status"] == "failed" and results(other) == []


def test_command_line_screens_only_when_told(settings: Settings, store: Store, engine: Engine) -> None:
    settings.safety_tiny_threshold = FLAG_EVERYTHING
    params = build_params(settings, store, "a heron wades", frames=1, seed=3, steps=4)
    plain = engine.create_job(params)
    assert not screens(store, settings, store.job(plain))
    assert any(isinstance(e, FrameDone) for e in list(engine.run_to_end(plain)))
    assert store.job(plain)["status"] == "done"

    settings.safety_cli = True
    screened = engine.create_job(params)
    events = list(engine.run_to_end(screened))
    assert isinstance(events[-1], Failed) and events[-1].reason == FLAGGED_REASON
    assert not any(isinstance(e, FrameDone) for e in events)
    assert store.job(screened)["status"] == "failed" and not Path(engine.job_dir(screened)).exists()


def test_a_regeneration_follows_its_parents_decision(settings: Settings, store: Store) -> None:
    parent = store.add_job(idea="x", params={}, screen=0)
    child = store.add_job(idea="x", params={}, parent_job_id=parent)
    grandchild = store.add_job(idea="x", params={}, parent_job_id=child)
    assert not screens(store, settings, store.job(grandchild))
    store.update_job(parent, screen=1)
    assert screens(store, settings, store.job(grandchild))


def test_bench_prints_the_checkers_cost_per_frame(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from bench import safety as bench_safety

    bench_safety.main(["--arch", "tiny", "--frames", "2"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["arch"] == "tiny" and result["frames"] == 2 and result["ms_per_frame_median"] > 0


@pytest.mark.simcord(settle_timeout=120)
async def test_training_samples_are_screened_too(world, bot_settings: Settings) -> None:
    from tests.test_bot import dataset_zip_bytes

    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    bot_settings.eval_samples, bot_settings.train_checkpoint_every = 2, 2
    bot_settings.safety_tiny_threshold = FLAG_EVERYTHING
    await alice.slash(channel, "train", name="owl", dataset=("o.zip", dataset_zip_bytes()), steps=4, save_every=2)
    await mod.react(channel.last_message, "✅")
    store = bot_of(env).store
    [job] = store.jobs_where("kind = 'train'", [])
    assert job["screen"] == 1 and job["status"] == "done"  # the style is trained; only its samples are held back
    assert not any("sample.png" in str(r.json) for r in env.http_requests if r.json)
