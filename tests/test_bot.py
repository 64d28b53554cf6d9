"""The bot end to end: real discord.py against SimCord's simulated Discord, tiny models, no network."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import discord
import pytest
from PIL import Image

from bot.client import EmakiBot, create_bot
from engine.events import FrameDone
from engine.render.models import Models
from engine.settings import Settings, load_settings

pytestmark = pytest.mark.simcord(settle_timeout=120)


@pytest.fixture
def bot_settings(tmp_path: Path) -> Settings:
    return load_settings(
        profile="tiny",
        data_dir=tmp_path / "data",
        steps=6,
        strength=0.5,
        progress_edit_interval_s=0.0,
        position_edit_interval_s=0.0,
    )


@pytest.fixture
def simcord_bot(bot_settings: Settings, shared_tiny_models: Models) -> EmakiBot:
    shared_tiny_models.use_style(None)
    bot = create_bot(bot_settings, models=shared_tiny_models)
    bot.post_retry_delays = (0.01, 0.01)
    bot.outbox.retry_base_s = 0.01
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
    assert store.job(2)["status"] == "queued" and store.job(3)["status"] == "queued"  # still paused
    await mod.slash(channel, "resume")
    assert [j["id"] for j in sorted(store.jobs_where("id in (2, 3)", []), key=lambda j: j["started_at"])] == [3, 2]
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


async def test_members_are_offered_only_styles_of_the_running_family(world, tmp_path) -> None:
    # A tiny (SD1.5) bot whose store also holds an SDXL style (registered by an SDXL bot on the same data dir,
    # or before the operator switched bases): autocomplete and /styles leave it out, and asking for it by
    # name is one ephemeral line before anything is queued.
    from tests.helpers import make_random_lora

    env, channel, alice = world.env, world.channel, world.alice
    store = bot_of(env).store
    store.add_style("inkwash", str(make_random_lora(tmp_path / "ink")), family="sd15")
    store.add_style("inkxl", str(make_random_lora(tmp_path / "inkxl", seed=2)), family="sdxl")
    choices = await alice.autocomplete(channel, "animate", "style", "ink", prompt="a fox")
    assert [c["value"] for c in choices] == ["inkwash"]
    listed = await alice.slash(channel, "styles")
    assert "inkwash" in listed.response.content and "inkxl" not in listed.response.content
    answer = await alice.slash(channel, "animate", prompt="a fox", style="inkxl", frames=1)
    assert answer.ephemeral
    assert answer.response.content == (
        "⚠️ 'inkxl' is an SDXL style; this bot renders SD1.5: pick a style made for it (/styles lists them)"
    )
    assert store.jobs_where("1 = 1", []) == []


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


# --- /train ---------------------------------------------------------------------------------------
def dataset_zip_bytes(n: int = 6, broken: bool = False) -> bytes:
    import zipfile

    import numpy as np

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        rows = ["file_name,caption"]
        for i in range(n):
            image = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(image, format="PNG")
            archive.writestr(f"img{i}.png", image.getvalue())
            rows.append(f"img{i}.png,a fox in the snow {i}")
        if broken:
            archive.writestr("../escape.png", b"x")
        archive.writestr("metadata.csv", "\n".join(rows) + "\n")
    return buffer.getvalue()


def last_answer(result) -> str:
    """The text a member last saw from an interaction (after a 'thinking' defer, the first followup
    takes the deferred message's place)."""
    return result.followups[-1].content if result.followups else result.response.content


@pytest.fixture
def train_settings(bot_settings: Settings) -> Settings:
    bot_settings.eval_samples = 2
    bot_settings.train_checkpoint_every = 2
    return bot_settings


async def test_train_flow_preview_moderation_training_and_listing(world, train_settings) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    answer = await alice.slash(
        channel, "train", name="Snowfox", dataset=("snowfox.zip", dataset_zip_bytes()), trigger="snowfox", steps=4
    )
    assert answer.ephemeral and "received: 6 images" in last_answer(answer)
    store = bot_of(env).store
    [row] = store.datasets_where("1 = 1", [])
    assert row["status"] == "pending" and row["style_name"] == "snowfox"  # stored before the answer
    preview = channel.last_message
    assert "dataset for the style **snowfox**" in preview.content and "4 training steps" in preview.content
    assert preview.attachments[0].filename == "dataset.png"
    assert [str(r.emoji) for r in preview.reactions] == ["✅", "❌"]

    await bob.react(preview, "✅")  # not a moderator: nothing happens
    assert store.dataset(row["id"])["status"] == "pending" and store.jobs_where("kind = 'train'", []) == []

    await mod.react(preview, "✅")
    assert store.dataset(row["id"])["status"] == "trained"
    style = store.style("snowfox")
    assert style is not None and style["trigger"] == "snowfox" and style["steps"] == 4
    metrics = json.loads(style["metrics"])
    assert metrics["n_generated"] == 2 and "kid" in metrics and "temporal_ssim" in metrics
    ready = channel.last_message
    assert "the style **snowfox** is ready" in ready.content and "KID" in ready.content
    assert "approved by" in next(m for m in channel.history() if m.id == preview.id).content
    listed = await alice.slash(channel, "styles")
    assert "**snowfox** (lora) · trigger `snowfox`" in listed.response.content
    choices = await alice.autocomplete(channel, "animate", "style", "snow", prompt="a fox")
    assert [c["value"] for c in choices] == ["snowfox"]
    await alice.slash(channel, "animate", prompt="a fox jumps", style="snowfox", frames=1)
    assert store.frames(store.jobs_where("kind = 'animate'", [])[0]["id"])[0]["prompt"].startswith("snowfox")


async def test_a_preset_is_clamped_to_the_profile_and_the_member_is_told(world, train_settings) -> None:
    """ghibli-lora trains at 512 px; the tiny profile takes 32..256: the stored recipe says 256, and the
    member's answer says so in one line."""
    env, channel, alice = world.env, world.channel, world.alice
    answer = await alice.slash(
        channel, "train", name="kite", dataset=("k.zip", dataset_zip_bytes()), preset="ghibli-lora", steps=2
    )
    text = last_answer(answer)
    assert answer.ephemeral and "received: 6 images" in text
    assert "preset ghibli-lora: resolution 512 is outside the tiny profile's sizes (32..256); clamped to 256" in text
    [row] = bot_of(env).store.datasets_where("1 = 1", [])
    assert json.loads(row["params"])["resolution"] == 256


async def test_a_preset_for_another_family_is_refused_in_one_line(world, train_settings) -> None:
    """The tiny bot renders SD1.5: an SDXL preset is refused before the dataset is read; nothing is stored."""
    env, channel, alice = world.env, world.channel, world.alice
    answer = await alice.slash(
        channel, "train", name="kite", dataset=("k.zip", dataset_zip_bytes()), preset="sdxl-lora", steps=2
    )
    assert answer.ephemeral and answer.response.content == (
        "⚠️ preset 'sdxl-lora' is for SDXL bases; this bot trains SD1.5: use ghibli-lora, anime-ia3-prodigy"
    )
    assert bot_of(env).store.datasets_where("1 = 1", []) == []


async def test_rejected_dataset_is_not_trained(world, train_settings) -> None:
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    await alice.slash(channel, "train", name="owl", dataset=("owl.zip", dataset_zip_bytes()), steps=2)
    await mod.react(channel.last_message, "❌")
    store = bot_of(env).store
    assert store.datasets_where("1 = 1", [])[0]["status"] == "rejected" and store.style("owl") is None
    assert "rejected by" in channel.last_message.content


async def test_training_gives_way_to_animations_and_resumes(world, train_settings) -> None:
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    bot = bot_of(env)
    waits = iter([True])  # an animation is waiting at the first checkpoint only
    answers: list[bool] = []
    bot.queue.animations_waiting = lambda: answers.append(next(waits, False)) or answers[-1]
    await alice.slash(channel, "train", name="heron", dataset=("heron.zip", dataset_zip_bytes()), steps=4)
    await mod.react(channel.last_message, "✅")
    store = bot.store
    job = store.jobs_where("kind = 'train'", [])[0]
    assert job["status"] == "done" and store.style("heron")["steps"] == 4
    # It gave way at its first checkpoint, then finished. (Its "paused" status is replaced at once
    # by the resumed run's, so the coalescing outbox may never send it: asserted on the queue.)
    assert answers[0] is True and store.dataset(job["params"]["dataset_id"])["status"] == "trained"


async def test_animations_run_before_a_queued_training(world, train_settings) -> None:
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await mod.slash(channel, "pause")
    await alice.slash(channel, "train", name="crane", dataset=("crane.zip", dataset_zip_bytes()), steps=2)
    await mod.react(channel.last_message, "✅")
    await bob.slash(channel, "animate", prompt="a crane lands", frames=1)
    await mod.slash(channel, "resume")
    jobs = sorted(bot_of(env).store.jobs_where("status = 'done'", []), key=lambda j: j["started_at"])
    assert [j["kind"] for j in jobs] == ["animate", "train"]


TRAIN_BAD = [
    (dict(name="", dataset=("a.zip", b"")), "the style name is empty"),
    (dict(name="fox", dataset=("a.rar", b"x")), "a.rar: attach a .zip"),
    (dict(name="fox", dataset=("a.zip", dataset_zip_bytes()), steps=0), "steps must be between 1 and 20000"),
]


@pytest.mark.parametrize(("options", "message"), TRAIN_BAD, ids=[m for _, m in TRAIN_BAD])
async def test_train_bad_input_is_ephemeral(world, train_settings, options, message) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    answer = await alice.slash(channel, "train", **options)
    assert answer.ephemeral and message in answer.response.content
    assert bot_of(env).store.datasets_where("1 = 1", []) == []


async def test_train_unsafe_or_oversize_zip_is_refused(world, train_settings) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    answer = await alice.slash(channel, "train", name="fox", dataset=("fox.zip", dataset_zip_bytes(broken=True)))
    assert answer.ephemeral and "'..' path components are not allowed" in last_answer(answer)
    train_settings.max_dataset_bytes = 1000
    answer = await alice.slash(channel, "train", name="fox", dataset=("fox.zip", dataset_zip_bytes()))
    assert answer.ephemeral and "the limit is 0 MiB" in answer.response.content
    store = bot_of(env).store
    assert store.datasets_where("1 = 1", []) == [] and channel.history(viewer=world.bob) == []
    assert not list((train_settings.data_dir / "uploads").glob("*"))  # the upload was not kept


async def test_one_failing_job_does_not_stop_the_queue(world, tmp_path) -> None:
    from tests.helpers import make_random_lora

    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    store = bot_of(env).store
    weights = make_random_lora(tmp_path / "doomed")
    store.add_style("doomed", str(weights))
    await mod.slash(channel, "pause")
    await alice.slash(channel, "animate", prompt="a doomed fox", style="doomed", frames=1)
    await bob.slash(channel, "animate", prompt="a lucky fox", frames=1)
    weights.unlink()  # the style's file disappears while the job waits
    await mod.slash(channel, "resume")
    failed, done = store.job(1), store.job(2)
    assert failed["status"] == "failed" and "weights file" in failed["error"]
    assert done["status"] == "done" and done["posted"] == 1
    status = next(m for m in channel.history() if "a doomed fox" in m.content)
    assert status.content.startswith("⚠️") and "weights file" in status.content


def test_rest_proxy_settings_reach_discord_py(bot_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import yarl

    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(
        discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    )
    bot_settings.discord_api_base = "http://proxy.local:8080/api/v10/"
    bot_settings.discord_gateway = "ws://proxy.local:8081/"
    create_bot(bot_settings)
    assert discord.http.Route("GET", "/gateway/bot").url == "http://proxy.local:8080/api/v10/gateway/bot"
    assert yarl.URL("ws://proxy.local:8081/") == discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY


async def test_animate_with_in_betweens_posts_the_smooth_clip(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    await alice.slash(channel, "animate", prompt="a leaf falls", frames=2, seed=2, interpolate=2)
    [posted] = results(channel)
    assert await gif_frames(posted) == 2 + 2  # two keyframes, two in-betweens
    assert bot_of(env).store.job(1)["params"]["interpolate"] == 2
    refused = await alice.slash(channel, "animate", prompt="a leaf falls", frames=2, interpolate=9)
    assert refused.ephemeral and "interpolate must be between 0 and 8" in refused.response.content
    assert len(bot_of(env).store.recent_jobs(10, "animate")) == 1  # nothing queued for the bad one


async def test_train_takes_a_preset_and_an_adapter(world, train_settings) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    answer = await alice.slash(
        channel, "train", name="Inkwash", dataset=("ink.zip", dataset_zip_bytes()), preset="anime-ia3-prodigy", steps=4
    )
    assert "received: 6 images" in last_answer(answer)
    [row] = bot_of(env).store.datasets_where("1 = 1", [])
    params = json.loads(row["params"])
    # The anime paper's kohya_ss preset, with the member's step count on top; its "save every 10
    # epochs" is counted on the 6 images actually received.
    assert (params["adapter"], params["optimizer"], params["steps"]) == ("ia3", "prodigy", 4)
    assert params["save_every"] == 10 * 6
    chosen = await alice.slash(
        channel, "train", name="Heron", dataset=("h.zip", dataset_zip_bytes()), adapter="loha", steps=4, save_every=2
    )
    assert "received: 6 images" in last_answer(chosen)
    heron = bot_of(env).store.datasets_where("style_name = ?", ["heron"])[0]
    assert (json.loads(heron["params"])["adapter"], json.loads(heron["params"])["save_every"]) == ("loha", 2)
    await world.mod.react(channel.last_message, "✅")  # approve Heron: trains, keeps saves at steps 2 and 4
    job = bot_of(env).store.jobs_where("kind = 'train'", [])[0]
    edits = [r.json for r in env.http_requests if r.method == "PATCH" and str(job["status_message_id"]) in r.path]
    kept = [e for e in edits if "save kept" in (e.get("content") or "")]
    assert kept and "--from-run heron --step 2" in kept[0]["content"]
    assert kept[0]["attachments"] == [{"id": 0, "filename": "sample.png"}]
    # Discord itself offers only the listed presets and adapters (SimCord enforces choices as Discord does).
    with pytest.raises(Exception, match="only allows"):
        await alice.slash(channel, "train", name="Crane", dataset=("c.zip", dataset_zip_bytes()), adapter="dora")
    assert bot_of(env).store.datasets_where("style_name = ?", ["crane"]) == []
