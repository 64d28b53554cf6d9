"""Reactions on a result: 🔁 reroll, 1️⃣..🔟 redo from that frame, ❌ delete.

Raw events, so results posted before a restart (not in discord.py's message cache) still work:
the store maps result message ids to jobs. What each reaction does is bot/actions.py, shared with the
result's buttons.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import discord
from discord.ext.commands import Cog

from bot import actions, render
from bot.outbox import only
from engine.errors import EmakiError

if TYPE_CHECKING:
    from bot.state import Host

log = logging.getLogger(__name__)


class ReactionControls(Cog):
    """🔁, the digits and ❌ under a posted result."""

    def __init__(self, bot: Host) -> None:
        self.bot = bot

    @Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        bot = self.bot
        if bot.user is None or payload.user_id == bot.user.id or payload.guild_id is None:
            return
        if payload.member is not None and payload.member.bot:
            return  # other bots' reactions start nothing (and cannot loop with another bot)
        job = bot.store.job_by_result_message(payload.message_id)
        if job is None:
            return
        emoji = str(payload.emoji)
        channel = await bot.channel_for(payload.channel_id)
        if emoji == render.DELETE:
            member = payload.member
            permissions = channel.permissions_for(member) if member is not None else None  # type: ignore[attr-defined]
            if actions.may_delete(job, payload.user_id, permissions):
                await actions.delete_result(bot, job, channel, payload.message_id)
            return
        if emoji == render.REROLL:
            from_index, reseed_all = 0, True
        elif emoji in render.DIGITS:
            from_index, reseed_all = render.DIGITS.index(emoji), False
            if from_index >= job["params"]["frames"]:
                return
        else:
            return
        name = payload.member.display_name if payload.member else str(payload.user_id)
        try:
            await actions.regenerate(
                bot,
                job,
                from_index,
                reseed_all=reseed_all,
                user_id=payload.user_id,
                user_name=name,
                guild_id=payload.guild_id,
                channel=channel,
            )
        except EmakiError as exc:
            # Reactions have no ephemeral reply: a short mention tells the member why nothing happens.
            with contextlib.suppress(discord.HTTPException):  # nothing was stored; nothing to lose
                await channel.send(f"<@{payload.user_id}> ⚠️ {exc}", allowed_mentions=only(payload.user_id))
