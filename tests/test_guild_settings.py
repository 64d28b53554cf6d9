"""Per-server settings, channel restrictions, styles per server and the blocklist, end to end: real
discord.py against SimCord with two servers, tiny models. The queue is paused where a test only needs
to see what was accepted, so nothing renders that the test does not look at."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import discord
import pytest

from bot.client import EmakiBot
from engine.coordinator.guild_settings import GuildSettings
from tests import test_bot as base
from tests.helpers import make_random_lora
from tests.test_bot import dataset_zip_bytes, last_answer, results

bot_settings = base.bot_settings
simcord_bot = base.simcord_bot

pytestmark = pytest.mark.simcord(settle_timeout=120)


@pytest.fixture
def two(simcord_env):
    """Server A (two channels, an admin, a moderator by role, members) and server B (its own admin)."""
    env = simcord_env
    a = env.create_guild("ghibli fans")
    animations, general = a.create_text_channel("animations"), a.create_text_channel("general")
    admins = a.create_role("admins", permissions=discord.Permissions(manage_guild=True, manage_messages=True))
    helpers = a.create_role("helpers")
    alice_user, bob_user = env.create_user("alice"), env.create_user("bob")
    alice, bob = a.add_member(alice_user), a.add_member(bob_user)
    admin = a.add_member(env.create_user("admin-a"), roles=[admins])
    helper = a.add_member(env.create_user("helper"), roles=[helpers])
    b = env.create_guild("other server")
    art = b.create_text_channel("art")
    b_admins = b.create_role("admins", permissions=discord.Permissions(manage_guild=True))
    b_admin = b.add_member(env.create_user("admin-b"), roles=[b_admins])
    alice_b = b.add_member(alice_user)
    return SimpleNamespace(
        env=env, a=a, b=b, animations=animations, general=general, art=art, alice=alice, bob=bob,
        admin=admin, helper=helper, helpers=helpers, b_admin=b_admin, alice_b=alice_b,
    )  # fmt: skip


def bot_of(env) -> EmakiBot:
    return env.bot


def jobs(env) -> list[dict]:
    return bot_of(env).store.jobs_where("1 = 1", [])


async def test_settings_change_one_key_and_stay_in_their_server(two) -> None:
    env, admin = two.env, two.admin
    store = bot_of(env).store
    await admin.slash(two.animations, "pause")
    answer = await admin.slash(two.animations, "settings set", key="max_frames", value="4")
    assert answer.ephemeral and "`max_frames` is now 4" in answer.response.content
    answer = await admin.slash(two.animations, "settings set", key="frames", value="2")
    assert answer.ephemeral and "`frames` is now 2" in answer.response.content
    shown = await admin.slash(two.animations, "settings show")
    assert shown.ephemeral and "`max_frames`: 4 · the bot's limit is 16" in shown.response.content
    assert "`steps`: 6 (default)" in shown.response.content
    assert store.guild_settings(two.a.id) == {"max_frames": 4, "frames": 2}
    assert store.guild_settings(two.b.id) == {}

    refused = await two.alice.slash(two.animations, "animate", prompt="a fox", frames=5)
    assert refused.ephemeral and "frames must be between 1 and 4" in refused.response.content
    await two.alice.slash(two.animations, "animate", prompt="a fox")  # server A's default
    await two.alice_b.slash(two.art, "animate", prompt="a fox", frames=5)  # server B keeps the operator's 16
    await two.alice_b.slash(two.art, "animate", prompt="an owl")
    assert [j["params"]["frames"] for j in jobs(env)] == [2, 5, 5]

    # A default a server set above a maximum lowered later follows the maximum.
    await admin.slash(two.animations, "settings set", key="max_frames", value="1")
    await two.bob.slash(two.animations, "animate", prompt="a heron")
    assert jobs(env)[-1]["params"]["frames"] == 1
    reset = await admin.slash(two.animations, "settings set", key="max_frames", value="default")
    assert reset.ephemeral and "`max_frames` is now 16 (default)" in reset.response.content
    assert store.guild_settings(two.a.id) == {"frames": 2}
    # A lower per-member cap: bob has one job waiting.
    await admin.slash(two.animations, "settings set", key="max_pending_per_member", value="1")
    capped = await two.bob.slash(two.animations, "animate", prompt="a second heron")
    assert capped.ephemeral and "the limit is 1 in this server" in capped.response.content
    assert len(jobs(env)) == 4


SETTINGS_BAD = [
    ("frames", "99", "frames must be between 1 and max_frames (16)"),
    ("max_frames", "40", "max_frames must be between 1 and 16, the bot operator's limit"),
    ("max_steps", "many", "max_steps must be a whole number"),
    ("width", "65", "width must be a multiple of 8 between 32 and 256"),
    ("max_size", "512", "max_size must be between 1 and 256, the bot operator's limit"),
    ("nsfw_policy", "maybe", "unknown nsfw_policy 'maybe': use screen, allow"),
    ("other_styles", "perhaps", "other_styles must be on or off"),
    ("colour", "blue", "unknown setting 'colour'"),
    ("animate_channels", "#nowhere", "unknown channel '#nowhere' in this server"),
    ("moderator_role", "ghosts", "unknown role 'ghosts' in this server"),
]


async def test_bad_settings_are_one_ephemeral_line_and_change_nothing(two) -> None:
    env, admin = two.env, two.admin
    store = bot_of(env).store
    await admin.slash(two.animations, "settings set", key="steps", value="10")
    for key, value, message in SETTINGS_BAD:
        answer = await admin.slash(two.animations, "settings set", key=key, value=value)
        assert answer.ephemeral and message in answer.response.content, (key, answer.response.content)
        assert "\n" not in answer.response.content and "nothing was changed" in answer.response.content
    # A channel of the other server is unknown here too.
    answer = await admin.slash(two.animations, "settings set", key="train_channels", value=f"<#{two.art.id}>")
    assert answer.ephemeral and "unknown channel" in answer.response.content
    bad_pattern = await admin.slash(two.animations, "settings blocklist add", pattern="(unclosed")
    assert bad_pattern.ephemeral and "is not a valid pattern" in bad_pattern.response.content
    assert store.guild_settings(two.a.id) == {"steps": 10}

    # Discord hides /settings from members without Manage Server; a server can still grant the command
    # to anyone in its integration settings, and the bot checks the permission itself.
    assert "settings set" not in two.alice.available_commands(two.animations)
    [command] = [c for c in await bot_of(env).tree.fetch_commands() if c.name == "settings"]
    two.a.set_command_permissions(command.id, {two.alice: True})
    answer = await two.alice.slash(two.animations, "settings set", key="steps", value="20")
    assert answer.ephemeral and "needs the Manage Server permission" in answer.response.content
    answer = await two.alice.slash(two.animations, "settings blocklist add", pattern="fox")
    assert answer.ephemeral and "needs the Manage Server permission" in answer.response.content
    assert store.guild_settings(two.a.id) == {"steps": 10}


async def test_channel_restriction_points_to_the_allowed_channels(two) -> None:
    env, admin = two.env, two.admin
    await admin.slash(two.animations, "pause")
    answer = await admin.slash(two.general, "settings set", key="animate_channels", value="#animations")
    assert f"<#{two.animations.id}>" in answer.response.content
    await admin.slash(two.general, "settings set", key="train_channels", value=str(two.animations.id))
    elsewhere = await two.alice.slash(two.general, "animate", prompt="a fox")
    assert elsewhere.ephemeral and f"use /animate in <#{two.animations.id}>" in elsewhere.response.content
    training = await two.alice.slash(two.general, "train", name="fox", dataset=("f.zip", dataset_zip_bytes()))
    assert training.ephemeral and f"use /train in <#{two.animations.id}>" in training.response.content
    assert jobs(env) == [] and bot_of(env).store.datasets_where("1 = 1", []) == []
    assert two.general.history(viewer=two.bob) == []
    ok = await two.alice.slash(two.animations, "animate", prompt="a fox")
    assert not ok.ephemeral
    other = await two.alice_b.slash(two.art, "animate", prompt="a fox")  # server B has no restriction
    assert not other.ephemeral and len(jobs(env)) == 2
    await admin.slash(two.general, "settings set", key="animate_channels", value="everywhere")
    assert not (await two.alice.slash(two.general, "animate", prompt="an owl")).ephemeral


async def test_a_style_belongs_to_its_server_until_shared(two, tmp_path: Path) -> None:
    env, admin = two.env, two.admin
    store = bot_of(env).store
    store.add_style("inkwash", str(make_random_lora(tmp_path / "ink")), trigger="inkwash", guild_id=two.a.id)
    store.add_style("global-pastel", str(make_random_lora(tmp_path / "pastel", seed=3)))  # the operator's
    await admin.slash(two.animations, "pause")

    listed_a = (await two.alice.slash(two.animations, "styles")).response.content
    listed_b = (await two.alice_b.slash(two.art, "styles")).response.content
    assert "**inkwash**" in listed_a and "**global-pastel**" in listed_a
    assert "inkwash" not in listed_b and "**global-pastel**" in listed_b
    assert [
        c["value"] for c in await two.alice.autocomplete(two.animations, "animate", "style", "ink", prompt="x")
    ] == ["inkwash"]
    assert await two.alice_b.autocomplete(two.art, "animate", "style", "ink", prompt="x") == []
    refused = await two.alice_b.slash(two.art, "animate", prompt="a fox", style="inkwash")
    assert refused.ephemeral and refused.response.content == (
        "⚠️ unknown style 'inkwash': known styles are global-pastel"
    )  # not "belongs to another server": the name is not confirmed to exist
    assert not (await two.alice.slash(two.animations, "animate", prompt="a fox", style="inkwash")).ephemeral
    assert len(jobs(env)) == 1

    # A moderator shares it; server B sees it until its admins turn other servers' styles off.
    shared = await two.admin.slash(two.animations, "style share", name="inkwash", shared=True)
    assert shared.ephemeral and "now shared" in shared.response.content
    assert (
        "inkwash** (lora) · trigger `inkwash` · shared by another server"
        in (await two.alice_b.slash(two.art, "styles")).response.content
    )
    assert not (await two.alice_b.slash(two.art, "animate", prompt="a fox", style="inkwash")).ephemeral
    await two.b_admin.slash(two.art, "settings set", key="other_styles", value="off")
    assert "inkwash" not in (await two.alice_b.slash(two.art, "styles")).response.content
    assert (await two.alice_b.slash(two.art, "animate", prompt="a fox", style="inkwash")).ephemeral
    # Server B cannot manage server A's style, shared or not.
    await two.b_admin.slash(two.art, "settings set", key="other_styles", value="on")
    answer = await two.b_admin.slash(two.art, "style remove", name="inkwash")
    assert answer.ephemeral and "belongs to another server" in answer.response.content
    assert store.style("inkwash") is not None


async def test_style_remove_by_a_moderator_only(two, bot_settings) -> None:
    env, admin, helper = two.env, two.admin, two.helper
    store = bot_of(env).store
    weights = make_random_lora(bot_settings.data_dir / "styles" / "inkwash" / "final")
    store.add_style("inkwash", str(weights), guild_id=two.a.id)
    store.add_style("pastel", str(weights))  # the operator's, global
    await admin.slash(two.animations, "pause")
    await two.bob.slash(two.animations, "animate", prompt="a fox", style="inkwash", frames=1)

    refused = await two.alice.slash(two.animations, "style remove", name="inkwash")
    assert refused.ephemeral and "only moderators" in refused.response.content
    refused = await helper.slash(two.animations, "style remove", name="inkwash")  # no moderator role yet
    assert refused.ephemeral and "only moderators" in refused.response.content
    assert store.style("inkwash") is not None and weights.exists()

    await admin.slash(two.animations, "settings set", key="moderator_role", value="helpers")
    operator = await helper.slash(two.animations, "style remove", name="pastel")
    assert operator.ephemeral and "emaki styles remove pastel" in operator.response.content
    removed = await helper.slash(two.animations, "style remove", name="inkwash")
    assert removed.ephemeral and "Removed the style **inkwash**" in removed.response.content
    assert store.style("inkwash") is None and not (bot_settings.data_dir / "styles" / "inkwash").exists()
    await admin.slash(two.animations, "resume")  # the job queued with it fails with the engine's message
    [job] = jobs(env)
    assert job["status"] == "failed" and "removed after the job was queued" in job["error"]


async def test_blocklist_refuses_prompts_and_captions(two, bot_settings) -> None:
    env, admin = two.env, two.admin
    store = bot_of(env).store
    added = await admin.slash(two.animations, "settings blocklist add", pattern="Crème")
    assert added.ephemeral and "added to the blocklist" in added.response.content
    await admin.slash(two.animations, "settings blocklist add", pattern=r"gor[e3]")
    again = await admin.slash(two.animations, "settings blocklist add", pattern="Crème")
    assert again.ephemeral and "already on the blocklist" in again.response.content
    listed = await admin.slash(two.animations, "settings blocklist list")
    assert listed.response.content == "`Crème`\n`gor[e3]`"

    prompt = "a CREME brulee melts slowly in the sun"
    refused = await two.alice.slash(two.animations, "animate", prompt=prompt)
    assert refused.ephemeral and "blocklist does not allow 'Crème' in prompts" in refused.response.content
    assert prompt not in refused.response.content  # the entry is named, the prompt not echoed
    caption_zip = dataset_zip_bytes()  # captions "a fox in the snow i": block "snow"
    await admin.slash(two.animations, "settings blocklist add", pattern="snow")
    training = await two.alice.slash(two.animations, "train", name="snowless", dataset=("s.zip", caption_zip))
    assert training.ephemeral and "does not allow 'snow' in captions" in last_answer(training)
    assert store.datasets_where("1 = 1", []) == [] and jobs(env) == []
    assert not (bot_settings.data_dir / "datasets" / "snowless").exists()
    named = await two.alice.slash(two.animations, "train", name="gore3", dataset=("g.zip", caption_zip))
    assert named.ephemeral and "does not allow 'gor[e3]' in style names" in named.response.content

    # Server B has its own (empty) blocklist; removing the entry in A lets the prompt through.
    assert not (await two.alice_b.slash(two.art, "animate", prompt=prompt, frames=1)).ephemeral
    removed = await admin.slash(two.animations, "settings blocklist remove", pattern="Crème")
    assert removed.ephemeral and "removed from the blocklist" in removed.response.content
    missing = await admin.slash(two.animations, "settings blocklist remove", pattern="Crème")
    assert missing.ephemeral and "is not on the blocklist" in missing.response.content
    assert json.loads(json.dumps(store.guild_settings(two.a.id)))["blocklist"] == ["gor[e3]", "snow"]


def test_server_values_are_clamped_to_the_operator_and_round_trip(settings) -> None:
    server = GuildSettings().changed("max_frames", 12, settings).changed("frames", 10, settings)
    assert GuildSettings.from_values(json.loads(json.dumps(server.values()))) == server
    settings.max_frames = 8  # the operator lowers the limit later: obeyed at once
    limits = server.limits(settings)
    assert (limits.max_frames, limits.frames) == (8, 8)


async def test_a_style_trained_from_a_servers_dataset_is_that_servers(two, bot_settings) -> None:
    env, helper = two.env, two.helper
    bot_settings.eval_samples, bot_settings.train_checkpoint_every = 2, 2
    await two.admin.slash(two.animations, "settings set", key="moderator_role", value=f"<@&{two.helpers.id}>")
    await two.alice.slash(two.animations, "train", name="snowfox", dataset=("s.zip", dataset_zip_bytes()), steps=2)
    await helper.react(two.animations.last_message, "✅")  # this server's moderator role approves
    store = bot_of(env).store
    style = store.style("snowfox")
    assert style is not None and style["guild_id"] == two.a.id and not style["shared"]
    assert "**snowfox**" in (await two.alice.slash(two.animations, "styles")).response.content
    assert "snowfox" not in (await two.alice_b.slash(two.art, "styles")).response.content
    refused = await two.alice_b.slash(two.art, "animate", prompt="a fox", style="snowfox")
    assert refused.ephemeral and "unknown style 'snowfox'" in refused.response.content


def test_cli_lists_each_styles_server(tmp_path: Path, monkeypatch, capsys) -> None:
    from emaki.cli import main
    from engine.coordinator.store import open_store

    monkeypatch.setenv("EMAKI_PROFILE", "tiny")
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    store = open_store(tmp_path / "data")
    store.add_style("inkwash", "ink.safetensors", guild_id=1234)
    store.add_style("pastel", "pastel.safetensors")
    store.add_style("sumi", "sumi.safetensors", guild_id=1234, shared=1)
    assert main(["styles"]) == 0
    out = capsys.readouterr().out
    assert "inkwash\ttrigger=-\tlora\tserver 1234\t" in out and "pastel\ttrigger=-\tlora\tglobal\t" in out
    assert "sumi\ttrigger=-\tlora\tserver 1234 (shared)\t" in out


async def test_a_servers_member_cap_applies_to_reroll_buttons_too(two) -> None:
    env, admin, alice, bob = two.env, two.admin, two.alice, two.bob
    await alice.slash(two.animations, "animate", prompt="a heron waits", frames=1)
    [posted] = results(two.animations)
    await admin.slash(two.animations, "pause")
    await admin.slash(two.animations, "settings set", key="max_pending_per_member", value="1")
    await bob.slash(two.animations, "animate", prompt="bob's first idea", frames=1)
    refused = await bob.click(posted, label="Reroll")
    assert refused.ephemeral and "the limit is 1 in this server" in refused.response.content
    assert bot_of(env).store.jobs_where("parent_job_id is not null", []) == []
