"""The bot end to end: real discord.py against SimCord's simulated Discord, tiny models, no network."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import discord
import pytest
from PIL import Image

from bot.client import EmakiBot, create_bot
from engine.events import FrameDone
from engine.models import Models
from engine.settings import Settings, load_settings

pytestmark = pytest.mark.simcord(settle_timeout=120)


@pytest.fixture
def bot_settings(tmp_path: Path) -> Settings:
    return load_settings(
        profile="tiny", data_dir=tmp_path / "data", steps=6, strength=0.5, progress_edit_interval_s=0.0
    )


@pytest.fixture
def simcord_bot(bot_settings: Settings, shared_tiny_models: Models) -> EmakiBot:
    shared_tiny_models.use_style(None)
    bot = create_bot(bot_settings, models=shared_tiny_models)
    bot.post_retry_delays = (0.01, 0.01)
    return bot


@pytest.fixture
def world(simcord_env):
    guild = simcord_env.create_guild("ghibli fans")
    channel = guild.create_text_channel("animations")
    alice = guild.add_member(simcord_env.create_user("alice"))
    bob = guild.add_member(simcord_env.create_user("bob"))
    mods = guild.create_role("mods", permissions=discord.Permissions(manage_messages=True, manage_guild=True))
    mod = guild.add_member(simcord_env.create_user("mod"), roles=[mods])
    return SimpleNamespace(env=simcord_env, guild=guild, channel=channel, alice=alice, bob=bob, mod=mod)


async def gif_frames(message: discord.Message) -> int:
    assert len(message.attachments) == 1 and message.attachments[0].filename.endswith(".gif")
    return Image.open(io.BytesIO(await message.attachments[0].read())).n_frames


def bot_of(env) -> EmakiBot:
    return env.bot


def results(channel) -> list[discord.Message]:
    return [m for m in channel.history() if m.attachments and m.attachments[0].filename.endswith(".gif")]


async def test_animate_queues_progresses_and_posts_gif(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    result = await alice.slash(channel, "animate", prompt="a ghibli dragon glides over a town", frames=3, seed=5)
    assert not result.ephemeral
    first_answer = next(r.json for r in env.http_requests if r.path.endswith("/callback"))
    assert "Queued: next up" in first_answer["data"]["content"]  # what the member saw at once
    status_id = result.response.id
    patches = [r.json for r in env.http_requests if r.method == "PATCH" and str(status_id) in r.path]
    assert any(
        "Rendering" in p["content"] and p["attachments"] == [{"id": 0, "filename": "progress.png"}] for p in patches
    )  # a progress contact sheet as frames landed
    assert "1. " in next(p["content"] for p in patches if "Rendering: 0/3" in p["content"])  # frame prompts shown
    [posted] = results(channel)
    assert await gif_frames(posted) == 3
    assert "seed `5`" in posted.content and posted.content.count("\n1. ") == 1
    assert [str(r.emoji) for r in posted.reactions] == ["🔁", "1️⃣", "2️⃣", "3️⃣", "❌"]
    status = next(m for m in channel.history() if m.id == status_id)
    assert status.content.startswith("✅") and posted.jump_url in status.content
    job = bot_of(env).store.job(1)
    assert job["status"] == "done" and job["posted"] == 1 and job["result_message_id"] == posted.id


async def test_digit_reaction_regenerates_from_that_frame(world) -> None:
    env, channel, alice, bob = world.env, world.channel, world.alice, world.bob
    await alice.slash(channel, "animate", prompt="a cat chases a butterfly", frames=3, seed=8)
    [first] = results(channel)
    await alice.react(first, "2️⃣")
    second = results(channel)[-1]
    assert second.id != first.id and await gif_frames(second) == 3
    store = bot_of(env).store
    child = store.job_by_result_message(second.id)
    assert child["parent_job_id"] == 1 and child["regen_from"] == 1 and child["owner_id"] == alice.id
    parent_frames, child_frames = store.frames(1), store.frames(child["id"])
    assert Path(child_frames[0]["path"]).read_bytes() == Path(parent_frames[0]["path"]).read_bytes()
    assert Path(child_frames[1]["path"]).read_bytes() != Path(parent_frames[1]["path"]).read_bytes()
    # Someone else's reroll is their own job.
    await bob.react(first, "🔁")
    third = store.job_by_result_message(results(channel)[-1].id)
    assert third["owner_id"] == bob.id and third["parent_job_id"] == 1
    assert all(a["seed"] != b["seed"] for a, b in zip(store.frames(third["id"]), parent_frames, strict=True))


async def test_delete_only_by_owner_or_moderator(world) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await alice.slash(channel, "animate", prompt="a kite over a field", frames=1, seed=1)
    await alice.slash(channel, "animate", prompt="a kite over a sea", frames=1, seed=1)
    first, second = results(channel)
    await bob.react(first, "❌")
    assert [m.id for m in results(channel)] == [first.id, second.id]
    await alice.react(first, "❌")
    assert [m.id for m in results(channel)] == [second.id]
    await mod.react(second, "❌")
    assert results(channel) == []
    assert bot_of(env).store.job(1)["status"] == "done"  # the job and its files stay in the store


async def test_restart_finishes_queued_job_and_old_results_still_react(world, bot_settings, shared_tiny_models) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await alice.slash(channel, "animate", prompt="a train crosses a bridge", frames=2, seed=3)
    [old] = results(channel)
    await mod.slash(channel, "pause")
    queued = await alice.slash(channel, "animate", prompt="a boat drifts at dusk", frames=2, seed=4)
    assert "Queued" in queued.response.content  # paused: still the first answer
    interrupted = await alice.slash(channel, "animate", prompt="a lantern floats up", frames=3, seed=6)
    engine = bot_of(env).engine
    for event in engine.run(3):  # the process dies while rendering job 3, after its first frame
        if isinstance(event, FrameDone):
            break
    first_frame = Path(engine.store.frames(3)[0]["path"]).read_bytes()
    assert engine.store.job(2)["status"] == "queued" and engine.store.job(3)["status"] == "running"
    messages_before = len(channel.history())

    await env.restart_bot(create_bot(bot_settings, models=shared_tiny_models))  # a fresh process's bot

    store = bot_of(env).store
    for job_id, answer in ((2, queued), (3, interrupted)):
        assert store.job(job_id)["status"] == "done" and store.job(job_id)["posted"] == 1
        status = next(m for m in channel.history() if m.id == answer.response.id)
        assert status.content.startswith("✅")  # the same status message was edited...
    assert len(channel.history()) == messages_before + 2  # ...and only the two results were added
    assert Path(store.frames(3)[0]["path"]).read_bytes() == first_frame  # resumed, not restarted
    await bob.react(old, "1️⃣")  # a result posted before the restart
    assert store.jobs_where("parent_job_id = 1", [])[0]["owner_id"] == bob.id
    assert len(results(channel)) == 4


async def test_round_robin_between_members(world) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await mod.slash(channel, "pause")
    for i in range(3):
        await alice.slash(channel, "animate", prompt=f"alice idea {i}", frames=1, seed=i)
    await bob.slash(channel, "animate", prompt="bob idea", frames=1, seed=9)
    queue = await bob.slash(channel, "queue")
    assert queue.ephemeral and "position 2" in queue.response.content  # bob goes second, not fourth
    await mod.slash(channel, "resume")
    rows = sorted(bot_of(env).store.jobs_where("status = 'done'", []), key=lambda j: j["started_at"])
    assert [r["idea"] for r in rows] == ["alice idea 0", "bob idea", "alice idea 1", "alice idea 2"]


async def test_per_member_cap(world) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await mod.slash(channel, "pause")
    for i in range(3):
        await alice.slash(channel, "animate", prompt=f"idea {i}", frames=1)
    refused = await alice.slash(channel, "animate", prompt="one too many", frames=1)
    assert refused.ephemeral and "limit is 3" in refused.response.content
    assert len(bot_of(env).store.jobs_where("owner_id = ?", [alice.id])) == 3
    ok = await bob.slash(channel, "animate", prompt="bob is fine", frames=1)
    assert not ok.ephemeral


async def test_cancel_queued_job(world) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await mod.slash(channel, "pause")
    first = await alice.slash(channel, "animate", prompt="first", frames=1)
    second = await alice.slash(channel, "animate", prompt="second", frames=1)
    answer = await alice.slash(channel, "cancel")
    assert answer.ephemeral and "Cancelled job #2" in answer.response.content
    status = next(m for m in channel.history() if m.id == second.response.id)
    assert status.content.startswith("🛑")
    nothing = await bob.slash(channel, "cancel")
    assert nothing.ephemeral and "no queued or running job" in nothing.response.content
    await mod.slash(channel, "resume")
    store = bot_of(env).store
    assert store.job(1)["status"] == "done" and store.job(2)["status"] == "cancelled"
    assert next(m for m in channel.history() if m.id == first.response.id).content.startswith("✅")


async def test_server_error_on_post_is_retried(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    env.inject_error("POST", "/channels/*/messages", status=500, times=1)
    await alice.slash(channel, "animate", prompt="a windmill turns", frames=1)
    posts = [r for r in env.http_requests if r.method == "POST" and r.path.endswith("/messages")]
    assert len(posts) == 2  # the 500, then the retry
    assert len(results(channel)) == 1 and bot_of(env).store.job(1)["posted"] == 1


async def test_result_posted_when_discord_answers_again(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    env.inject_error("POST", "/channels/*/messages", status=503, times=None)
    await alice.slash(channel, "animate", prompt="rain on a pond", frames=1)
    store = bot_of(env).store
    assert store.job(1)["status"] == "done" and store.job(1)["posted"] == 0 and results(channel) == []
    env.backend.faults.clear()  # Discord recovers
    await env.advance_time(61)  # the repost sweep runs
    assert store.job(1)["posted"] == 1 and len(results(channel)) == 1


BAD = [
    (dict(prompt="   "), "the idea is empty"),
    (dict(prompt="x" * 501), "the limit is 500"),
    (dict(prompt="a fox", frames=0), "frames must be between 1 and 16"),
    (dict(prompt="a fox", frames=17), "frames must be between 1 and 16"),
    (dict(prompt="a fox", strength=1.5), "strength must be above 0 and at most 1"),
    (dict(prompt="a fox", steps=0), "steps must be between 1 and 150"),
    (dict(prompt="a fox", guidance=99.0), "guidance must be between 0 and 30"),
    (dict(prompt="a fox", seed=-1), "seed must be between 0 and"),
    (dict(prompt="a fox", style="nope"), "unknown style 'nope'"),
]


@pytest.mark.parametrize(("options", "message"), BAD, ids=[m for _, m in BAD])
async def test_bad_input_is_ephemeral_and_stores_nothing(world, options, message) -> None:
    env, channel, alice, bob = world.env, world.channel, world.alice, world.bob
    answer = await alice.slash(channel, "animate", **options)
    assert answer.ephemeral and message in answer.response.content
    assert bot_of(env).store.jobs_where("1 = 1", []) == []
    assert channel.history(viewer=bob) == []


async def test_commands_are_guild_only_and_admin_ones_need_manage_server(world) -> None:
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    assert set(env.create_user("dm-user").available_commands()) == {"help", "styles"}
    assert "pause" not in alice.available_commands(channel) and "pause" in mod.available_commands(channel)


async def test_styles_help_and_autocomplete(world, tmp_path) -> None:
    from tests.helpers import make_random_lora

    env, channel, alice = world.env, world.channel, world.alice
    store = bot_of(env).store
    store.add_style("inkwash", str(make_random_lora(tmp_path / "ink")), trigger="inkwash", metrics={"kid": 0.012})
    store.add_style("pastel", str(make_random_lora(tmp_path / "pastel", seed=3)))
    listed = await alice.slash(channel, "styles")
    assert listed.ephemeral and "**inkwash** (lora) · trigger `inkwash` · KID 0.012" in listed.response.content
    choices = await alice.autocomplete(channel, "animate", "style", "ink", prompt="a fox")
    assert [c["value"] for c in choices] == ["inkwash"]
    helped = await alice.slash(channel, "help")
    assert helped.ephemeral and "/animate" in helped.response.content
    await alice.slash(channel, "animate", prompt="a fox", style="inkwash", frames=1)
    assert store.frames(1)[0]["prompt"].startswith("inkwash")
