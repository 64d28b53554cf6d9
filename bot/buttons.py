"""Buttons under a result: Reroll, a "redo from frame k" select, Delete, Details and MP4.

Persistent across restarts without any state in memory: each component is a discord.py
`DynamicItem` whose custom_id carries the job id (`emaki:reroll:42`), and the `ResultButtons` Cog tells the
bot the templates at start-up, so a click on a result posted by an earlier process is parsed back into
the job and answered. Who may do what is bot/actions.py, shared with the reactions.

Every callback answers inside Discord's 3-second window: refusals, Details and the reroll's "queued"
line are immediate (the regeneration's rows are committed first, as for /animate); MP4 defers and
sends the file as an ephemeral followup.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import discord
from discord.ext.commands import Cog

from bot import actions, render
from bot.commands import refuse
from bot.outbox import NO_MENTIONS
from engine.coordinator.worker import METRICS_FILE, job_record
from engine.errors import EmakiError

if TYPE_CHECKING:
    from bot.state import Host

log = logging.getLogger(__name__)

PRIMARY, SECONDARY, DANGER = discord.ButtonStyle.primary, discord.ButtonStyle.secondary, discord.ButtonStyle.danger
MAX_SELECT_OPTIONS = 25  # Discord's limit; frames after the 25th can still be redone with reactions/CLI


def _bot(interaction: discord.Interaction) -> Host:
    return cast("Host", interaction.client)


async def _job(interaction: discord.Interaction, job_id: int) -> dict[str, Any] | None:
    """The job behind the clicked result, or None after telling the member why not."""
    job = _bot(interaction).store.job(job_id)
    if job is None or job["kind"] != "animate" or job.get("guild_id") != interaction.guild_id:
        await refuse(interaction, f"job #{job_id} is not in this server's records any more")
        return None
    return job


async def _answer(interaction: discord.Interaction, text: str) -> None:
    """An ephemeral line; the work it reports is already stored, so a lost answer loses nothing."""
    try:
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
    except discord.HTTPException as exc:
        log.warning("answering a button failed: %s", exc.status)


async def _regenerate(interaction: discord.Interaction, job_id: int, from_index: int, reseed_all: bool) -> None:
    job = await _job(interaction, job_id)
    if job is None:
        return
    assert interaction.guild_id is not None and interaction.channel_id is not None
    try:
        new_id = await actions.regenerate(
            _bot(interaction),
            job,
            from_index,
            reseed_all=reseed_all,
            user_id=interaction.user.id,
            user_name=interaction.user.display_name,
            guild_id=interaction.guild_id,
            channel=interaction.channel,
        )
    except EmakiError as exc:
        await refuse(interaction, str(exc))
        return
    _bot(interaction).remember_interaction(new_id, interaction)  # a private line if it is flagged
    what = "a reroll" if reseed_all else f"a redo from frame {from_index + 1}"
    await _answer(interaction, f"Queued job #{new_id}, {what} of job #{job_id}: its progress shows in this channel.")


async def _reroll(interaction: discord.Interaction, job_id: int) -> None:
    await _regenerate(interaction, job_id, 0, reseed_all=True)


async def _delete(interaction: discord.Interaction, job_id: int) -> None:
    job = await _job(interaction, job_id)
    if job is None or interaction.message is None or interaction.channel_id is None:
        return
    if not actions.may_delete(job, interaction.user.id, interaction.permissions):
        await refuse(interaction, "only the requester or someone with Manage Messages can delete this result")
        return
    bot = _bot(interaction)
    await interaction.response.defer()  # the answer is the post disappearing
    channel = await bot.channel_for(interaction.channel_id)
    await actions.delete_result(bot, job, channel, interaction.message.id)


async def _details(interaction: discord.Interaction, job_id: int) -> None:
    job = await _job(interaction, job_id)
    if job is None:
        return
    bot = _bot(interaction)
    metrics = job_record(bot.settings, job_id, METRICS_FILE)
    await _answer(interaction, render.details(job, bot.store.frames(job_id), metrics, bot.settings.is_tiny))


async def _mp4(interaction: discord.Interaction, job_id: int) -> None:
    job = await _job(interaction, job_id)
    if job is None:
        return
    bot = _bot(interaction)
    await interaction.response.defer(ephemeral=True, thinking=True)  # encoding takes a while
    answer: dict[str, Any] = {"ephemeral": True, "allowed_mentions": NO_MENTIONS}
    try:
        path = await asyncio.to_thread(actions.mp4_of, bot.settings, job, bot.store.frames(job_id))
    except EmakiError as exc:
        await interaction.followup.send(f"⚠️ {exc}", **answer)
        return
    guild = interaction.guild
    limit = min(bot.settings.upload_limit_bytes, guild.filesize_limit if guild else 1 << 62)
    size = path.stat().st_size
    if size > limit:
        await interaction.followup.send(
            f"⚠️ the MP4 of job #{job_id} is {size / 2**20:.1f} MiB, over this server's upload limit "
            f"({limit / 2**20:.1f} MiB): the GIF above is the shareable version",
            **answer,
        )
        return
    await interaction.followup.send(
        f"Job #{job_id} as MP4:", file=discord.File(path, filename=f"emaki-{job_id}.mp4"), **answer
    )


Handler = Callable[[discord.Interaction, int], Awaitable[None]]
# kind (in the custom_id) -> label, emoji, style, what a click does. The order is the buttons' order.
BUTTONS: dict[str, tuple[str, str | None, discord.ButtonStyle, Handler]] = {
    "reroll": ("Reroll", render.REROLL, PRIMARY, _reroll),
    "details": ("Details", None, SECONDARY, _details),
    "mp4": ("MP4", None, SECONDARY, _mp4),
    "delete": ("Delete", render.DELETE, DANGER, _delete),
}


class ResultButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"emaki:(?P<kind>reroll|details|mp4|delete):(?P<job>[0-9]+)",
):
    """Every button under a result: one template, the kind and the job read back from the custom_id."""

    def __init__(self, kind: str, job_id: int) -> None:
        label, emoji, style, _ = BUTTONS[kind]
        button = discord.ui.Button(label=label, emoji=emoji, style=style, custom_id=f"emaki:{kind}:{job_id}")
        super().__init__(button, row=0)
        self.kind = kind
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ResultButton:
        return cls(match["kind"], int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await BUTTONS[self.kind][3](interaction, self.job_id)


class RedoSelect(discord.ui.DynamicItem[discord.ui.Select[Any]], template=r"emaki:redo:(?P<job>[0-9]+)"):
    def __init__(self, job_id: int, frames: int) -> None:
        options = [
            discord.SelectOption(label=f"Redo from frame {k}", value=str(k))
            for k in range(1, min(frames, MAX_SELECT_OPTIONS) + 1)
        ]
        super().__init__(
            discord.ui.Select(placeholder="Redo from frame…", options=options, custom_id=f"emaki:redo:{job_id}"),
            row=1,
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> RedoSelect:
        options = getattr(item, "options", [])
        return cls(int(match["job"]), max(len(options), 1))

    async def callback(self, interaction: discord.Interaction) -> None:
        values = self.item.values
        if len(values) != 1 or not re.fullmatch(r"[0-9]{1,4}", values[0]):  # not "²": isdigit() takes it
            await refuse(interaction, "pick one frame to redo from")
            return
        await _regenerate(interaction, self.job_id, int(values[0]) - 1, reseed_all=False)


ITEMS = (ResultButton, RedoSelect)


def result_view(job: dict[str, Any]) -> discord.ui.View:
    """The components sent with a result. timeout=None: they never expire (the templates registered
    by `ResultButtons` answer them, whichever process posted the result)."""
    view = discord.ui.View(timeout=None)
    for kind in BUTTONS:
        view.add_item(ResultButton(kind, job["id"]))
    view.add_item(RedoSelect(job["id"], job["params"]["frames"]))
    return view


class ResultButtons(Cog):
    """The buttons and the select under every result: their templates answer clicks on any result,
    also those posted before a restart (the custom_ids carry the job)."""

    def __init__(self, bot: Host) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(*ITEMS)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(*ITEMS)
