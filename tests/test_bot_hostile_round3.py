"""Issue 24, hostile inputs round 3, in Discord: each bad input is one ephemeral line that changes
nothing. SimCord end to end, tiny models."""

from __future__ import annotations

import pytest

from tests import test_bot as base
from tests import test_guild_settings as tg

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
