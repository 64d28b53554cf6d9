"""Issue 24, hostile inputs round 3, in Discord: each bad input is one ephemeral line that changes
nothing. SimCord end to end, tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import test_bot as base
from tests import test_guild_settings as tg
from tests.helpers import make_random_lora
from tests.test_bot import results

bot_settings = base.bot_settings
simcord_bot = base.simcord_bot
world = base.world
two = tg.two

pytestmark = pytest.mark.simcord(settle_timeout=120)


@pytest.mark.parametrize("key", ["animate_channels", "train_channels", "moderator_role"])
async def test_superscript_digits_as_a_channel_or_role_are_one_line(two, key: str) -> None:
    for value in ("²", "<#²>", "١٢٣"):
        answer = await two.admin.slash(two.animations, "settings set", key=key, value=value)
        assert answer.ephemeral and "nothing was changed" in answer.response.content
        assert answer.response.content.count("\n") == 0
    assert two.env.bot.store.guild_settings(two.a.id) == {}


async def test_a_blocklist_entry_is_removed_by_its_folded_name(two) -> None:
    await two.admin.slash(two.animations, "settings blocklist add", pattern="Ogre")
    removed = await two.admin.slash(two.animations, "settings blocklist remove", pattern="ogre")
    assert removed.ephemeral and "removed from the blocklist" in removed.response.content
    assert two.env.bot.store.guild_settings(two.a.id) == {}


async def test_a_style_registered_folded_is_found_by_its_capitals(two, tmp_path: Path) -> None:
    """/train name:Snowfox registers `snowfox` (training/dataset.py folds it): every command finds it by Snowfox."""
    store = two.env.bot.store
    store.add_style("snowfox", str(make_random_lora(tmp_path / "snow")), trigger="snowfox", guild_id=two.a.id)
    queued = await two.alice.slash(two.animations, "animate", prompt="a fox", frames=1, seed=1, style="Snowfox")
    assert not queued.ephemeral
    assert store.job(1)["params"]["style"] == "snowfox"
    shared = await two.admin.slash(two.animations, "style share", name="Snowfox", shared=True)
    assert shared.ephemeral and "now shared" in shared.response.content
    removed = await two.admin.slash(two.animations, "style remove", name=" SNOWFOX ")
    assert removed.ephemeral and "Removed the style **snowfox**" in removed.response.content
    assert store.style("snowfox") is None


async def test_a_queued_job_never_renders_with_another_servers_style_of_its_name(two, tmp_path: Path) -> None:
    """Server A queues with its `ink`, removes it; server B registers its own private `ink`: A's job
    fails with one line (it held A's ink by identity), and nothing is posted in A."""
    store = two.env.bot.store
    store.add_style("ink", str(make_random_lora(tmp_path / "a-ink")), trigger="ink", guild_id=two.a.id)
    await two.admin.slash(two.animations, "pause")
    queued = await two.alice.slash(two.animations, "animate", prompt="a fox", frames=1, seed=1, style="ink")
    assert not queued.ephemeral
    await two.admin.slash(two.animations, "style remove", name="ink")
    store.add_style("ink", str(make_random_lora(tmp_path / "b-ink", seed=9)), trigger="ink", guild_id=two.b.id)
    await two.admin.slash(two.animations, "resume")
    job = store.job(1)
    assert job["status"] == "failed" and "'ink' was removed or replaced after the job was queued" in job["error"]
    assert results(two.animations) == [] and store.frames(1) == []  # nothing rendered with B's weights


async def test_a_reroll_of_a_style_replaced_since_is_refused(two, tmp_path: Path) -> None:
    store = two.env.bot.store
    store.add_style("ink", str(make_random_lora(tmp_path / "ink")), trigger="ink", guild_id=two.a.id)
    await two.alice.slash(two.animations, "animate", prompt="a fox", frames=1, seed=1, style="ink")
    [posted] = results(two.animations)
    await two.admin.slash(two.animations, "style remove", name="ink")
    store.add_style("ink", str(make_random_lora(tmp_path / "ink2", seed=4)), trigger="ink", guild_id=two.a.id)
    refused = await two.bob.click(posted, label="Reroll")
    assert refused.ephemeral and "the style 'ink' was replaced since" in refused.response.content
    assert store.job(2) is None


async def test_a_blocked_word_the_story_llm_writes_is_never_rendered(two, monkeypatch) -> None:
    """The member's idea passes the blocklist; the LLM's frame prompts do not: the job fails with one
    line, nothing is rendered, posted or listed (the status message never shows the prompts)."""
    from engine.coordinator.story import Story

    await two.admin.slash(two.animations, "settings blocklist add", pattern="ogre")
    story = two.env.bot.engine.story
    monkeypatch.setattr(story, "tell", lambda idea, n, trigger="": Story(["a fox", "a fox meets an \u043egre"], "fake"))
    queued = await two.alice.slash(two.animations, "animate", prompt="a fox in a forest", frames=2, seed=1)
    assert not queued.ephemeral
    job = two.env.bot.store.job(1)
    assert job["status"] == "failed" and "blocklist does not allow" in job["error"]
    assert results(two.animations) == []
    assert all(not row["path"] for row in two.env.bot.store.frames(1))
    shown = [m.content for m in two.animations.history()]
    assert not any("gre" in text for text in shown) and any("blocklist does not allow" in text for text in shown)
