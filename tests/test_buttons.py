"""The buttons under a result, end to end: real discord.py against SimCord, tiny models.

Each button is clicked as a member would (SimCord checks the component exists and is enabled),
including on a result posted by a bot object that has since been replaced (a restart)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

from bot.client import EmakiBot, create_bot
from tests import test_bot as base
from tests.test_bot import gif_frames, last_answer, results

# The same fixtures as tests/test_bot.py: one way to build the bot and its world.
bot_settings = base.bot_settings
simcord_bot = base.simcord_bot
world = base.world

pytestmark = pytest.mark.simcord(settle_timeout=120)


def bot_of(env) -> EmakiBot:
    return env.bot


def component_labels(message) -> list[str]:
    labels = []
    for row in message.components:
        for item in row.children:
            labels.append(getattr(item, "label", None) or getattr(item, "placeholder", None))
    return labels


async def test_result_carries_buttons_and_reactions(world) -> None:
    channel, alice = world.channel, world.alice
    await alice.slash(channel, "animate", prompt="a paper boat on a stream", frames=3, seed=5)
    [posted] = results(channel)
    assert [str(r.emoji) for r in posted.reactions] == ["🔁", "1️⃣", "2️⃣", "3️⃣", "❌"]  # reactions stay
    assert component_labels(posted) == ["Reroll", "Details", "MP4", "Delete", "Redo from frame…"]
    select = posted.components[1].children[0]
    assert [o.value for o in select.options] == ["1", "2", "3"]
    helped = await alice.slash(channel, "help")
    assert "**Reroll**" in helped.response.content and "**MP4**" in helped.response.content


async def test_button_answers_ping_nobody(world) -> None:
    from tests.test_bot_hostile import assert_pings_at_most

    env, channel, alice, bob = world.env, world.channel, world.alice, world.bob
    role = world.guild.create_role("everybody-role", mentionable=True)
    hostile = f"@everyone @here <@&{role.id}> <@{bob.id}> a fox"
    await alice.slash(channel, "animate", prompt=hostile, frames=1)
    [posted] = results(channel)
    details = await bob.click(posted, label="Details")
    assert hostile in details.response.content  # echoed as written, pinging no one
    await bob.click(posted, label="Delete")  # refused, ephemerally
    await bob.click(posted, label="MP4")
    assert_pings_at_most(env, alice.id)


async def test_reroll_and_redo_buttons_queue_regenerations_that_render(world) -> None:
    env, channel, alice, bob = world.env, world.channel, world.alice, world.bob
    await alice.slash(channel, "animate", prompt="a cat chases a butterfly", frames=3, seed=8)
    [first] = results(channel)
    store = bot_of(env).store
    parent_frames = store.frames(1)

    clicked = await bob.click(first, label="Reroll")  # someone else's reroll is their own job
    assert clicked.ephemeral and "Queued job #2, a reroll of job #1" in clicked.response.content
    reroll = store.job(2)
    assert reroll["owner_id"] == bob.id and reroll["parent_job_id"] == 1 and reroll["status"] == "done"
    assert all(a["seed"] != b["seed"] for a, b in zip(store.frames(2), parent_frames, strict=True))

    picked = await alice.select(first, ["2"])
    assert picked.ephemeral and "a redo from frame 2 of job #1" in picked.response.content
    redo = store.job(3)
    assert redo["owner_id"] == alice.id and redo["parent_job_id"] == 1 and redo["regen_from"] == 1
    kept, redone = store.frames(3)[0], store.frames(3)[1]
    assert Path(kept["path"]).read_bytes() == Path(parent_frames[0]["path"]).read_bytes()
    assert redone["seed"] != parent_frames[1]["seed"] and store.frames(3)[2]["seed"] == parent_frames[2]["seed"]
    posted = results(channel)
    assert len(posted) == 3 and all([await gif_frames(m) == 3 for m in posted])
    assert store.job_by_result_message(posted[-1].id)["id"] in (2, 3)


async def test_reroll_button_past_the_cap_is_refused_and_stores_nothing(world) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await alice.slash(channel, "animate", prompt="a heron waits", frames=1)
    [posted] = results(channel)
    await mod.slash(channel, "pause")
    for i in range(3):
        await bob.slash(channel, "animate", prompt=f"bob idea {i}", frames=1)
    refused = await bob.click(posted, label="Reroll")
    assert refused.ephemeral and "limit is 3" in refused.response.content
    assert bot_of(env).store.jobs_where("parent_job_id is not null", []) == []


async def test_delete_button_for_the_requester_and_moderators_only(world) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await alice.slash(channel, "animate", prompt="a kite over a field", frames=1, seed=1)
    await alice.slash(channel, "animate", prompt="a kite over a sea", frames=1, seed=1)
    first, second = results(channel)
    refused = await bob.click(first, label="Delete")
    assert refused.ephemeral and "only the requester or someone with Manage Messages" in refused.response.content
    assert [m.id for m in results(channel)] == [first.id, second.id]
    await alice.click(first, label="Delete")
    assert [m.id for m in results(channel)] == [second.id]
    await mod.click(second, label="Delete")
    assert results(channel) == []
    store = bot_of(env).store
    assert store.job(1)["status"] == "done" and store.job(1)["result_message_id"] is None  # rows stay
    assert Path(store.frames(2)[0]["path"]).is_file()  # and so do the files


async def test_details_is_ephemeral_with_prompts_seeds_and_the_warping_error(world) -> None:
    env, channel, alice, bob = world.env, world.channel, world.alice, world.bob
    await alice.slash(channel, "animate", prompt="lanterns drift on a river", frames=2, seed=11)
    [posted] = results(channel)
    shown = await bob.click(posted, label="Details")
    assert shown.ephemeral
    text = shown.response.content
    for row in bot_of(env).store.frames(1):
        assert f"{row['idx'] + 1}. seed `{row['seed']}`" in text and row["prompt"][:40] in text
    assert "6 steps" in text and "strength 0.5" in text and "seed `11`" in text and "no style" in text
    assert "Warping error" in text and "only tests the tooling" in text  # the tiny profile says so
    assert len(channel.history(viewer=world.mod)) == 2  # status + result: nothing public was added


async def test_mp4_button_sends_the_clip_as_a_playable_file(world) -> None:
    channel, alice, bob = world.channel, world.alice, world.bob
    await alice.slash(channel, "animate", prompt="a leaf falls", frames=2, seed=2, interpolate=1)
    [posted] = results(channel)
    sent = await bob.click(posted, label="MP4")
    assert sent.ephemeral
    answer = sent.followups[-1] if sent.followups else sent.response
    [attachment] = answer.attachments
    assert attachment.filename == "emaki-1.mp4"
    data = await attachment.read()
    frames = iio.imread(io.BytesIO(data), extension=".mp4")  # decoded by ffmpeg: a playable file
    assert frames.shape[0] == 2 + 1  # the GIF's clip: two keyframes and the in-between
    assert frames.shape[1:3] == (64, 64)
    assert await gif_frames(posted) == 3
    assert len(channel.history(viewer=world.mod)) == 2  # the file went only to bob


async def test_mp4_button_without_imageio_ffmpeg_says_so(world, monkeypatch: pytest.MonkeyPatch) -> None:
    channel, alice = world.channel, world.alice
    await alice.slash(channel, "animate", prompt="snow on a roof", frames=1)
    [posted] = results(channel)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # the optional package is not installed
    sent = await alice.click(posted, label="MP4")
    text = last_answer(sent)
    assert sent.ephemeral and "MP4 needs imageio-ffmpeg" in text and "\n" not in text


async def test_buttons_work_after_a_restart(world, bot_settings, shared_tiny_models) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await alice.slash(channel, "animate", prompt="a train crosses a bridge", frames=2, seed=3)
    [old] = results(channel)
    await env.restart_bot(create_bot(bot_settings, models=shared_tiny_models))  # a fresh process's bot

    store = bot_of(env).store
    details = await bob.click(old, label="Details")
    assert details.ephemeral and "**Job #1**" in details.response.content
    await bob.click(old, label="Reroll")
    await alice.select(old, ["2"])
    assert [(j["owner_id"], j["regen_from"]) for j in store.jobs_where("parent_job_id = 1", [])] == [
        (bob.id, 0),
        (alice.id, 1),
    ]
    assert len(results(channel)) == 3
    refused = await bob.click(old, label="Delete")
    assert refused.ephemeral and len(results(channel)) == 3
    await mod.click(old, label="Delete")
    assert old.id not in [m.id for m in results(channel)]
