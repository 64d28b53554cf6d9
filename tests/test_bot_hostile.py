"""The bot under hostile members and a failing Discord, end to end: real discord.py against SimCord,
tiny models. Discord failures are SimCord's injected HTTP errors; a crash is a task cancelled at the
chosen instant followed by a fresh bot on the same data dir (SimCord cannot kill a process)."""

from __future__ import annotations

import asyncio
import io
import zipfile
from typing import Any

import discord
import pytest

from bot.client import EmakiBot, create_bot
from tests import test_bot as base
from tests.test_bot import last_answer, results

# The same fixtures as tests/test_bot.py: one way to build the bot and its world.
bot_settings = base.bot_settings
simcord_bot = base.simcord_bot
world = base.world

pytestmark = pytest.mark.simcord(settle_timeout=120)


def bot_of(env) -> EmakiBot:
    return env.bot


def payloads(env) -> list[dict[str, Any]]:
    """Every message body the bot sent or edited (channel messages, interaction answers)."""
    found = []
    for request in env.http_requests:
        body = request.json
        if isinstance(body, dict) and isinstance(body.get("data"), dict):
            body = body["data"]
        if isinstance(body, dict) and "content" in body:
            found.append(body)
    return found


def assert_pings_at_most(env, requester_id: int) -> None:
    """Discord parses nothing but what allowed_mentions lets through: never everyone/here or roles,
    users only the requester."""
    bodies = payloads(env)
    assert bodies
    for body in bodies:
        allowed = body.get("allowed_mentions")
        assert allowed is not None, body["content"]
        assert "everyone" not in allowed.get("parse", []) and "roles" not in allowed.get("parse", [])
        assert "users" not in allowed.get("parse", []) and not allowed.get("roles")
        assert set(map(int, allowed.get("users", []))) <= {requester_id}, body["content"]


# --- mention injection --------------------------------------------------------------------------
async def test_prompt_cannot_ping_everyone_roles_or_others(world) -> None:
    env, channel, alice, bob = world.env, world.channel, world.alice, world.bob
    role = world.guild.create_role("everybody-role", mentionable=True)
    hostile = f"@everyone @here <@&{role.id}> <@{bob.id}> a fox"
    await alice.slash(channel, "animate", prompt=hostile, frames=1)
    [posted] = results(channel)
    assert hostile in posted.content  # echoed as written...
    assert not posted.mention_everyone  # ...but nobody was pinged
    assert_pings_at_most(env, alice.id)
    result_body = next(b for b in payloads(env) if b["content"] == posted.content)
    assert [int(u) for u in result_body["allowed_mentions"]["users"]] == [alice.id]  # the requester is
    refused = await alice.slash(channel, "animate", prompt="a fox", style="@everyone")  # echoed in the error
    assert refused.ephemeral and "@everyone" in refused.response.content
    assert_pings_at_most(env, alice.id)


async def test_trigger_and_captions_cannot_ping(world, train_settings) -> None:
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    role = world.guild.create_role("everybody-role", mentionable=True)
    captions = [f"@everyone <@&{role.id}> fox {i}" for i in range(6)]
    answer = await alice.slash(
        channel, "train", name="fox", dataset=("fox.zip", zip_with(captions)), trigger=f"@here <@&{role.id}>"
    )
    assert "received: 6 images" in last_answer(answer)
    preview = channel.last_message
    assert "@everyone" in preview.content and not preview.mention_everyone
    await mod.react(preview, "❌")  # the decision edit echoes the preview too
    assert "rejected by" in channel.last_message.content
    assert_pings_at_most(env, alice.id)


# --- results Discord refuses, jobs a failed write would strand ----------------------------------
async def test_refused_post_is_told_queued_honestly_and_posted_when_channel_accepts(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    env.inject_error("POST", "/channels/*/messages", status=403, code=50013, message="Missing Permissions", times=None)
    answer = await alice.slash(channel, "animate", prompt="a heron in the rain", frames=1)
    store = bot_of(env).store
    job = store.job(1)
    assert job["status"] == "done" and job["post_state"] == "refused" and results(channel) == []
    status = next(m for m in channel.history() if m.id == answer.response.id)
    assert status.content.startswith("⏳") and "Missing Permissions" in status.content
    assert "/repost job:1" in status.content
    queue = await alice.slash(channel, "queue")
    assert "Discord refused the post" in queue.response.content and "#1" in queue.response.content
    env.backend.faults.clear()  # the admin fixes the channel's permissions
    await env.advance_time(61)  # the sweep tries again
    [posted] = results(channel)
    assert store.job(1)["posted"] == 1 and store.job(1)["result_message_id"] == posted.id
    await env.advance_time(61)
    assert len(results(channel)) == 1  # posted exactly once
    queue = await alice.slash(channel, "queue")
    assert "no jobs waiting" in queue.response.content


async def test_admin_repost(world) -> None:
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    env.inject_error("POST", "/channels/*/messages", status=404, code=10003, message="Unknown Channel", times=None)
    await alice.slash(channel, "animate", prompt="a paper boat", frames=1)
    assert "repost" not in alice.available_commands(channel) and "repost" in mod.available_commands(channel)
    env.backend.faults.clear()
    answer = await mod.slash(channel, "repost", job=1)
    assert answer.ephemeral and "Posted job #1" in last_answer(answer)
    [posted] = results(channel)
    again = await mod.slash(channel, "repost", job=1)
    assert "already posted" in last_answer(again) and len(results(channel)) == 1
    nonces = [r.json.get("nonce") for r in env.http_requests if r.method == "POST" and r.path.endswith("/messages")]
    assert nonces[-1] == "emaki-r1.1" and posted.id == bot_of(env).store.job(1)["result_message_id"]


async def test_server_errors_and_rate_limits_on_sends_and_edits(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    env.inject_error("POST", "/channels/*/messages", status=429, message="You are being rate limited.", times=1)
    env.inject_error("POST", "/channels/*/messages", status=502, times=1)
    env.inject_error("PATCH", "/channels/*/messages/*", status=429, message="rate limited", times=2)
    env.inject_error("PATCH", "/channels/*/messages/*", status=500, times=1)
    answer = await alice.slash(channel, "animate", prompt="a windmill in a storm", frames=2)
    await env.advance_time(5)  # the outbox's retries of the failed edits
    [posted] = results(channel)
    sends = [r.json for r in env.http_requests if r.method == "POST" and r.path.endswith("/messages")]
    assert len(sends) == 3 and {s["nonce"] for s in sends} == {"emaki-r1.0"}  # one nonce: one post
    assert all(s["enforce_nonce"] for s in sends)
    status = next(m for m in channel.history() if m.id == answer.response.id)
    assert status.content.startswith("✅") and posted.jump_url in status.content


async def test_failed_announce_does_not_strand_the_job(world) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await alice.slash(channel, "animate", prompt="a lantern festival", frames=1)
    [first] = results(channel)
    await mod.slash(channel, "pause")
    env.inject_error("POST", "/channels/*/messages", status=403, code=50013, message="Missing Permissions", times=1)
    await bob.react(first, "🔁")  # the job row is written, then Discord refuses its announcement
    store = bot_of(env).store
    job = store.jobs_where("owner_id = ?", [bob.id])[0]
    assert job["status"] == "queued" and job["status_message_id"] is None
    queue = await bob.slash(channel, "queue")
    assert "position 1" in queue.response.content
    await mod.slash(channel, "resume")  # nothing else needs to kick the queue
    job = store.job(job["id"])
    assert job["status"] == "done" and job["posted"] == 1 and job["status_message_id"] is not None
    assert next(m for m in channel.history() if m.id == job["status_message_id"]).content.startswith("✅")


async def test_failed_interaction_answer_does_not_strand_the_job(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    env.inject_error("POST", "/interactions/*/callback", status=404, code=10062, message="Unknown interaction")
    await alice.slash(channel, "animate", prompt="a kite in the wind", frames=1)
    job = bot_of(env).store.job(1)
    assert job["status"] == "done" and job["posted"] == 1
    status = next(m for m in channel.history() if m.id == job["status_message_id"])  # sent into the channel
    assert status.content.startswith("✅")


# --- crashes at each instant ---------------------------------------------------------------------
class Crash(asyncio.CancelledError):
    """The process dies here: the running task stops dead, nothing after this line runs."""


async def test_crash_between_send_and_record_posts_once(world, bot_settings, shared_tiny_models) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    bot = bot_of(env)

    def die(*_: Any) -> None:
        raise Crash

    bot._record_posted = die  # type: ignore[method-assign]
    await alice.slash(channel, "animate", prompt="a crane over the sea", frames=1)
    assert len(results(channel)) == 1 and bot.store.job(1)["post_state"] == "sending"  # sent, not recorded
    await env.restart_bot(create_bot(bot_settings, models=shared_tiny_models))
    store = bot_of(env).store
    [posted] = results(channel)  # found in the channel, not posted again
    assert store.job(1)["posted"] == 1 and store.job(1)["result_message_id"] == posted.id


async def test_crash_during_the_send_posts_once_after_restart(world, bot_settings, shared_tiny_models) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    bot = bot_of(env)
    request = bot.http.request

    async def dies_posting_gifs(route: Any, **kwargs: Any) -> Any:
        if route.method == "POST" and kwargs.get("files"):  # the result upload: the process dies mid-send
            raise Crash
        return await request(route, **kwargs)

    bot.http.request = dies_posting_gifs  # type: ignore[method-assign]
    await alice.slash(channel, "animate", prompt="a moth at a lamp", frames=1)
    assert results(channel) == [] and bot.store.job(1)["post_state"] == "sending"
    await env.restart_bot(create_bot(bot_settings, models=shared_tiny_models))
    [posted] = results(channel)  # not in the channel, so sent (with the same nonce), once
    assert bot_of(env).store.job(1)["result_message_id"] == posted.id


async def test_crash_after_job_row_before_announce(world, bot_settings, shared_tiny_models) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await alice.slash(channel, "animate", prompt="a fox in the snow", frames=1)
    [first] = results(channel)
    await mod.slash(channel, "pause")

    async def die(*_: Any) -> None:
        raise Crash

    bot_of(env).announce = die  # type: ignore[method-assign]
    await bob.react(first, "1️⃣")  # the row is committed, then the process dies
    await env.restart_bot(create_bot(bot_settings, models=shared_tiny_models))
    store = bot_of(env).store
    [job] = store.jobs_where("owner_id = ?", [bob.id])
    assert job["status"] == "queued"  # still paused after the restart
    await mod.slash(channel, "resume")
    job = store.job(job["id"])
    assert job["status"] == "done" and job["posted"] == 1 and len(results(channel)) == 2
    assert next(m for m in channel.history() if m.id == job["status_message_id"]).content.startswith("✅")


async def test_pause_and_fairness_survive_a_restart(world, bot_settings, shared_tiny_models) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await alice.slash(channel, "animate", prompt="alice was served last", frames=1)
    await mod.slash(channel, "pause")
    await alice.slash(channel, "animate", prompt="alice again", frames=1)
    await bob.slash(channel, "animate", prompt="bob's first", frames=1)
    await env.restart_bot(create_bot(bot_settings, models=shared_tiny_models))
    store = bot_of(env).store
    assert [store.job(i)["status"] for i in (2, 3)] == ["queued", "queued"]  # still paused
    queue = await bob.slash(channel, "queue")
    assert "The queue is paused" in queue.response.content and "position 1" in queue.response.content
    await mod.slash(channel, "resume")
    done = sorted(store.jobs_where("id in (2, 3)", []), key=lambda j: j["started_at"])
    assert [j["id"] for j in done] == [3, 2]  # bob before alice, as before the restart


# --- the GPU never waits for Discord -------------------------------------------------------------
async def test_next_job_renders_while_discord_edits_hang(world) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    bot = bot_of(env)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    request = bot.http.request

    async def slow_edits(route: Any, **kwargs: Any) -> Any:
        if route.method == "PATCH":  # Discord sits on every edit until the gate opens
            await env.external_wait(asyncio.shield(gate), reason="a rate-limited Discord")
        return await request(route, **kwargs)

    bot.http.request = slow_edits  # type: ignore[method-assign]
    await mod.slash(channel, "pause")
    await alice.slash(channel, "animate", prompt="one", frames=1)
    await bob.slash(channel, "animate", prompt="two", frames=1)
    await mod.slash(channel, "resume")
    store = bot.store
    assert [store.job(i)["status"] for i in (1, 2)] == ["done", "done"]  # both rendered, edits still waiting
    assert len(results(channel)) == 2
    gate.set_result(None)
    await env.settle()
    for job_id in (1, 2):
        status = next(m for m in channel.history() if m.id == store.job(job_id)["status_message_id"])
        assert status.content.startswith("✅")


async def test_fifty_jobs_ten_members_round_robin(world, bot_settings) -> None:
    # About the queue, not rendering: a stub stands in for the renderer (the job is marked done),
    # everything else (slash commands, the store, the queue, fairness) is the real bot's.
    env, channel, mod = world.env, world.channel, world.mod
    bot = bot_of(env)
    bot.queue.max_pending = 5
    members = [world.guild.add_member(env.create_user(f"m{i}")) for i in range(10)]
    await mod.slash(channel, "pause")
    for member in members:
        for n in range(5):
            await member.slash(channel, "animate", prompt=f"{member.name} idea {n}", frames=1)
    order: list[int] = []

    async def stub_render(job_id: int, cancel: Any) -> None:
        order.append(job_id)
        bot.store.update_job(job_id, status="done", post_state="posted", posted=1)

    bot.queue.run_job = stub_render
    queue = await members[9].slash(channel, "queue")
    assert "position 10," in queue.response.content  # the 10th member's first job runs 10th, not 46th
    await mod.slash(channel, "resume")
    owners = [bot.store.job(j)["owner_id"] for j in order]
    assert len(order) == 50
    for round_ in range(5):  # every member once per round, in the order they first asked
        assert owners[round_ * 10 : round_ * 10 + 10] == [m.id for m in members]
    for member in members:
        mine = [j for j in order if bot.store.job(j)["owner_id"] == member.id]
        assert mine == sorted(mine)  # oldest first within a member


# --- /train edges --------------------------------------------------------------------------------
@pytest.fixture
def train_settings(bot_settings):
    bot_settings.eval_samples = 2
    bot_settings.train_checkpoint_every = 2
    return bot_settings


def zip_with(captions: list[str]) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(len(captions))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        rows = ["file_name,caption"]
        for i, caption in enumerate(captions):
            image = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(image, format="PNG")
            archive.writestr(f"img{i}.png", image.getvalue())
            rows.append(f'img{i}.png,"{caption}"')
        archive.writestr("metadata.csv", "\n".join(rows) + "\n")
    return buffer.getvalue()


def lying_zip() -> bytes:
    """img0.png's local and central headers declare 10 bytes; the data holds the whole image."""
    data = bytearray(zip_with([f"a fox {i}" for i in range(6)]))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("img0.png")
    local = info.header_offset
    data[local + 22 : local + 26] = (10).to_bytes(4, "little")
    central = data.find(b"PK\x01\x02")  # the first central record is img0.png's
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")
    return bytes(data)


def damaged_zip() -> bytes:
    """img0.png's compressed bytes are overwritten in the middle."""
    data = bytearray(zip_with([f"a fox {i}" for i in range(6)]))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("img0.png")
    start = info.header_offset + 30 + len(info.filename) + 20
    data[start : start + 64] = bytes(range(64))
    return bytes(data)


@pytest.mark.parametrize("payload", [lying_zip, damaged_zip], ids=["lying", "damaged"])
async def test_lying_or_damaged_zip_is_answered_and_leaves_nothing(world, train_settings, payload) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    answer = await alice.slash(channel, "train", name="fox", dataset=("fox.zip", payload()))
    assert answer.ephemeral and "img0.png: damaged or unreadable in the zip" in last_answer(answer)
    assert bot_of(env).store.datasets_where("1 = 1", []) == []
    data_dir = train_settings.data_dir
    assert not list((data_dir / "uploads").glob("*")) and not (data_dir / "datasets" / "fox").exists()


async def test_name_reuse_after_rejection_uses_only_the_new_upload(world, train_settings) -> None:
    channel, alice, mod = world.channel, world.alice, world.mod
    await alice.slash(channel, "train", name="owl", dataset=("owl.zip", zip_with([f"old owl {i}" for i in range(6)])))
    await mod.react(channel.last_message, "❌")
    again = await alice.slash(
        channel, "train", name="owl", dataset=("owl.zip", zip_with([f"new owl {i}" for i in range(7)]))
    )
    assert "received: 7 images" in last_answer(again)
    preview = channel.last_message
    assert "new owl" in preview.content and "old owl" not in preview.content and "7 images" in preview.content


async def test_concurrent_submissions_of_one_name(world, train_settings) -> None:
    env, channel, alice, bob = world.env, world.channel, world.alice, world.bob
    bot = bot_of(env)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fetch = bot.http.get_from_cdn

    async def slow_cdn(url: str) -> bytes:  # alice's upload is still arriving when bob submits
        await env.external_wait(asyncio.shield(gate), reason="a slow upload")
        return await fetch(url)

    bot.http.get_from_cdn = slow_cdn  # type: ignore[method-assign]
    first = await alice.slash(channel, "train", name="crow", dataset=("a.zip", zip_with([f"a {i}" for i in range(6)])))
    bot.http.get_from_cdn = fetch  # type: ignore[method-assign]
    second = await bob.slash(channel, "train", name="crow", dataset=("b.zip", zip_with([f"b {i}" for i in range(7)])))
    assert second.ephemeral and "being checked right now" in second.response.content
    gate.set_result(None)
    await env.settle()
    assert "received: 6 images" in last_answer(first)
    [row] = bot.store.datasets_where("1 = 1", [])
    assert row["owner_id"] == alice.id and row["n_images"] == 6


async def test_failed_preview_is_posted_by_the_sweep(world, train_settings) -> None:
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    env.inject_error("POST", "/channels/*/messages", status=403, code=50013, message="Missing Permissions", times=1)
    answer = await alice.slash(channel, "train", name="wren", dataset=("w.zip", zip_with([f"w {i}" for i in range(6)])))
    assert "received: 6 images" in last_answer(answer) and "retried every minute" in last_answer(answer)
    store = bot_of(env).store
    [row] = store.datasets_where("1 = 1", [])
    assert row["status"] == "pending" and row["preview_message_id"] is None  # stored, not lost
    await env.advance_time(61)
    preview = channel.last_message
    assert store.dataset(row["id"])["preview_message_id"] == preview.id and "**wren**" in preview.content
    await mod.react(preview, "❌")  # moderators can decide on it as usual
    assert store.dataset(row["id"])["status"] == "rejected"


async def test_upload_larger_than_declared_is_cut_off(world, train_settings) -> None:
    from bot.training import write_capped

    async def chunks():
        for _ in range(4):
            yield b"x" * 1000

    target = train_settings.data_dir / "upload.zip"
    target.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(Exception, match="larger than the limit"):
        await write_capped(chunks(), target, 2500, "big.zip")
    assert not target.exists()


# --- small ones -----------------------------------------------------------------------------------
async def test_other_bots_reactions_and_a_second_delete(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    other_bot = world.guild.add_member(env.create_user("otherbot", bot=True))
    await alice.slash(channel, "animate", prompt="a tea kettle", frames=1)
    [posted] = results(channel)
    await other_bot.react(posted, "🔁")
    assert len(bot_of(env).store.jobs_where("1 = 1", [])) == 1  # nothing queued for a bot
    env.inject_error("DELETE", "/channels/*/messages/*", status=404, code=10008, message="Unknown Message")
    await alice.react(posted, "❌")  # someone deleted it first: no error, the row forgets it
    assert bot_of(env).store.job(1)["result_message_id"] is None


async def test_zero_width_prompt_is_empty(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    answer = await alice.slash(channel, "animate", prompt="\u200b\u200c\u200d\ufeff")
    assert answer.ephemeral and "the idea is empty" in answer.response.content
    assert bot_of(env).store.jobs_where("1 = 1", []) == []


def test_create_bot_is_importable_from_the_package() -> None:
    from bot import create_bot as factory

    assert factory is create_bot and issubclass(EmakiBot, discord.Client)


def test_the_requester_only_policy_stands_on_its_own() -> None:
    # Not relying on the client's default: AllowedMentions(users=[x]) alone would still parse
    # everyone and roles.
    from bot.outbox import NO_MENTIONS, only

    assert only(5).to_dict() == {"parse": [], "users": [5]}
    assert NO_MENTIONS.to_dict() == {"parse": []}


async def test_final_status_edit_lost_in_a_crash_is_sent_after_restart(world, bot_settings, shared_tiny_models) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    bot = bot_of(env)
    real_set_status = bot.set_status

    def dies_before_final_edit(job_id: int, fields: Any, min_interval: float = 0.0, final: bool = False) -> None:
        if not final:  # the result is posted and recorded; the process stops before its last edit
            real_set_status(job_id, fields, min_interval, final)

    bot.set_status = dies_before_final_edit  # type: ignore[method-assign]
    await alice.slash(channel, "animate", prompt="a kettle steams", frames=1)
    [posted] = results(channel)
    job = bot.store.job(1)
    status = next(m for m in channel.history() if m.id == job["status_message_id"])
    assert "posting the result" in status.content and posted.jump_url not in status.content
    assert not job.get("status_final")
    await env.restart_bot(create_bot(bot_settings, models=shared_tiny_models))
    status = next(m for m in channel.history() if m.id == job["status_message_id"])
    assert posted.jump_url in status.content and "posting the result" not in status.content
    assert bot_of(env).store.job(1)["status_final"] == 1 and results(channel) == [posted]
