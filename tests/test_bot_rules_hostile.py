"""What a hostile review found in the community controls, kept fixed: a regeneration (button or
reaction) meets every rule /animate meets where it is asked for; reposts cannot carry unscreened
results out of age-restricted channels or crash on purged files; a redo racing the retention sweep
leaves nothing behind; a private style's name is not confirmed to another server; long values get
an answer. SimCord end to end, tiny models."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from bot import admin as bot_admin
from tests import test_bot as base
from tests import test_guild_settings as tg
from tests.helpers import make_random_lora
from tests.test_bot import dataset_zip_bytes, last_answer, results

bot_settings = base.bot_settings
simcord_bot = base.simcord_bot
world = base.world
two = tg.two

pytestmark = pytest.mark.simcord(settle_timeout=120)


async def test_reroll_cannot_use_a_style_its_owner_stopped_sharing(two, tmp_path: Path) -> None:
    store = two.env.bot.store
    store.add_style("inkwash", str(make_random_lora(tmp_path / "ink")), trigger="inkwash", guild_id=two.b.id, shared=1)
    await two.alice.slash(two.animations, "animate", prompt="a fox", frames=1, seed=1, style="inkwash")
    [posted] = results(two.animations)
    await two.b_admin.slash(two.art, "style share", name="inkwash", shared=False)
    refused = await two.bob.click(posted, label="Reroll")
    assert refused.ephemeral and "unknown style 'inkwash'" in refused.response.content
    assert store.job(2) is None


async def test_reroll_follows_the_channels_rules_of_today(two) -> None:
    await two.alice.slash(two.general, "animate", prompt="a dragon burns a village", frames=1, seed=1)
    [posted] = results(two.general)
    await two.admin.slash(two.animations, "settings blocklist add", pattern="burns")
    blocked = await two.bob.click(posted, label="Reroll")
    assert blocked.ephemeral and "blocklist does not allow 'burns'" in blocked.response.content
    await two.admin.slash(two.animations, "settings blocklist remove", pattern="burns")
    await two.admin.slash(two.animations, "settings set", key="animate_channels", value=f"<#{two.animations.id}>")
    elsewhere = await two.bob.click(posted, label="Reroll")
    assert elsewhere.ephemeral and f"use /animate in <#{two.animations.id}>" in elsewhere.response.content
    assert two.env.bot.store.job(2) is None


async def test_a_servers_cap_counts_only_that_servers_jobs(two) -> None:
    await two.admin.slash(two.animations, "pause")
    await two.b_admin.slash(two.art, "pause")
    await two.b_admin.slash(two.art, "settings set", key="max_pending_per_member", value="1")
    await two.alice.slash(two.animations, "animate", prompt="a fox")  # waiting in server A
    first_in_b = await two.alice_b.slash(two.art, "animate", prompt="an owl")
    assert "limit" not in first_in_b.response.content
    second_in_b = await two.alice_b.slash(two.art, "animate", prompt="a heron")
    assert second_in_b.ephemeral and "the limit is 1 in this server" in second_in_b.response.content


async def test_train_does_not_confirm_another_servers_private_style(two, tmp_path: Path) -> None:
    two.env.bot.store.add_style("secretink", str(make_random_lora(tmp_path / "ink")), guild_id=two.a.id)
    answer = await two.b_admin.slash(two.art, "train", name="secretink", dataset=("o.zip", dataset_zip_bytes()))
    assert answer.ephemeral and "the style name 'secretink' is not available" in answer.response.content
    assert "exists" not in answer.response.content


async def test_long_and_odd_settings_values_get_one_short_line(two) -> None:
    store = two.env.bot.store
    for value in ("1" * 1990, "٣", "1_0"):
        answer = await two.admin.slash(two.animations, "settings set", key="frames", value=value)
        assert answer.ephemeral and "frames must be a whole number" in answer.response.content
        assert len(answer.response.content) < 300
    too_few = await two.admin.slash(two.animations, "settings set", key="max_steps", value="1")
    assert too_few.ephemeral and "max_steps must be at least" in too_few.response.content
    assert store.guild_settings(two.a.id) == {}


async def test_reroll_in_a_channel_no_longer_age_restricted_is_screened(world, bot_settings) -> None:
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    env.bot.get_channel(channel.id).nsfw = True
    await mod.slash(channel, "settings set", key="nsfw_policy", value="allow")
    await alice.slash(channel, "animate", prompt="a fox at night", frames=2, seed=2)
    [posted] = results(channel)
    assert env.bot.store.job(1)["screen"] == 0
    env.bot.get_channel(channel.id).nsfw = False
    bot_settings.safety_tiny_threshold = -2.0  # the tiny checker now flags every frame
    redo = await world.bob.select(posted, ["2"])  # would keep frame 1, made unscreened
    assert redo.ephemeral and "do not pass this channel's content filter" in redo.response.content
    assert env.bot.store.job(2) is None
    await world.bob.click(posted, label="Reroll")  # nothing kept: rendered, screened, flagged
    job = env.bot.store.job(2)
    assert job["screen"] == 1 and job["status"] == "failed" and len(results(channel)) == 1


async def test_repost_cannot_move_an_unscreened_result_to_a_normal_channel(world) -> None:
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    env.bot.get_channel(channel.id).nsfw = True
    await mod.slash(channel, "settings set", key="nsfw_policy", value="allow")
    await alice.slash(channel, "animate", prompt="a fox at night", frames=1, seed=2)
    [posted] = results(channel)
    await alice.react(posted, "❌")
    normal = world.guild.create_text_channel("general")
    refused = await mod.slash(normal, "repost", job=1, here=True)
    assert refused.ephemeral and "made without the content filter" in refused.response.content
    assert results(normal) == []


async def test_repost_of_a_purged_result_says_so_and_is_not_retried(world) -> None:
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    await alice.slash(channel, "animate", prompt="a kite", frames=1, seed=1)
    [posted] = results(channel)
    await alice.react(posted, "❌")
    report = await bot_admin.sweep(env.bot, at=time.time() + 40 * 86400)
    assert report.jobs == [1]
    answer = await mod.slash(channel, "repost", job=1)
    assert "frames were deleted after" in last_answer(answer)
    assert env.bot.store.job(1)["post_state"] == "posted"  # untouched: nothing for the sweep to retry


async def test_redo_whose_parent_files_vanished_stores_nothing(world, bot_settings) -> None:
    env, channel, alice, bob = world.env, world.channel, world.alice, world.bob
    await alice.slash(channel, "animate", prompt="a kite", frames=3, seed=1)
    [posted] = results(channel)
    shutil.rmtree(bot_settings.data_dir / "jobs" / "1")  # as a sweep mid-way, or an admin by hand
    redo = await bob.select(posted, ["3"])
    assert redo.ephemeral and "frames are no longer on disk" in redo.response.content
    assert [j["id"] for j in env.bot.store.jobs_where("1 = 1", [])] == [1]


async def test_pause_holds_only_the_servers_own_jobs(two) -> None:
    """/pause needs Manage Server in one server; it must not stop every other server's members."""
    store = two.env.bot.store
    await two.admin.slash(two.animations, "pause")
    await two.alice.slash(two.animations, "animate", prompt="a fox", frames=1, seed=1)
    await two.alice_b.slash(two.art, "animate", prompt="an owl", frames=1, seed=2)
    assert store.job(1)["status"] == "queued" and store.job(2)["status"] == "done"
    assert len(results(two.art)) == 1 and results(two.animations) == []
    queue_a = await two.alice.slash(two.animations, "queue")
    assert "The queue is paused" in queue_a.response.content
    await two.admin.slash(two.animations, "resume")
    assert store.job(1)["status"] == "done" and len(results(two.animations)) == 1
