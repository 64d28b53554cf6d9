"""/settings (Manage Server) and /style remove|share (moderators): a server's own rules, stored per
guild (engine/coordinator/guild_settings.py), and the helpers /animate and /train use to follow them.

Every refusal is one ephemeral line and changes nothing: a value is parsed, validated against the
operator's bounds and only then written, one key per command."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import shutil
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext.commands import Cog

from bot import render
from bot.outbox import NO_MENTIONS
from engine.coordinator import guild_settings as gs
from engine.errors import EmakiError, InvalidRequest
from engine.settings import Settings

if TYPE_CHECKING:
    from bot.state import Host

log = logging.getLogger(__name__)

EVERYWHERE_WORDS = ("everywhere", "none", "all", "any")
MENTION = re.compile(r"^<(#|@&)([0-9]{1,20})>$")
# An id typed bare: ASCII digits only. str.isdigit() also takes "²" and "٣", which int() then refuses.
SNOWFLAKE = re.compile(r"[0-9]{1,20}")


# --- what /animate and /train ask --------------------------------------------------------------
def server(bot: Host, guild_id: int | None) -> gs.GuildSettings:
    return gs.load(bot.store, guild_id)


def limits(bot: Host, guild_id: int | None) -> Settings:
    """The operator's settings with the server's defaults and limits applied."""
    return server(bot, guild_id).limits(bot.settings)


def channel_pointer(channels: tuple[int, ...], channel: Any, command: str) -> str | None:
    """Where to go instead, when `command` is not allowed in `channel` (a thread follows its parent)."""
    if gs.allowed_in(channels, channel.id, getattr(channel, "parent_id", None)):
        return None
    return f"use /{command} in {' '.join(f'<#{c}>' for c in channels)}: this server allows it only there"


def age_restricted(channel: Any) -> bool:
    """Discord's age-restricted flag (a thread follows its parent channel)."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def blocked_entry(server_settings: gs.GuildSettings, texts: list[str]) -> str | None:
    blocklist = server_settings.blocked
    return next((hit for text in texts if (hit := blocklist.first_match(text)) is not None), None)


def blocked_message(entry: str, what: str) -> str:
    # The entry, never the whole text: the member knows what they wrote, and the channel need not see it.
    return f"this server's blocklist does not allow '{render.clip(entry, 60)}' in {what}: change it and try again"


def is_moderator(bot: Host, member: discord.Member | None, channel: Any) -> bool:
    if member is None:
        return False
    if channel.permissions_for(member).manage_guild:
        return True
    role = limits(bot, member.guild.id).moderator_role  # the server's own, else the operator's
    return bool(role) and any(r.name == role or str(r.id) == role for r in member.roles)


def check_member_cap(bot: Host, owner_id: int, cap: int, guild_id: int) -> None:
    """A server's own cap counts the member's jobs in that server only (the operator's cap, checked
    by the queue, counts them everywhere)."""
    open_jobs = bot.store.jobs_where(
        "owner_id = ? and guild_id = ? and status in ('queued', 'running')", [owner_id, guild_id]
    )
    if len(open_jobs) >= cap:
        raise InvalidRequest(
            f"you already have {len(open_jobs)} jobs waiting (the limit is {cap} in this server); "
            "wait for one to finish or /cancel one"
        )


def unknown_style(bot: Host, guild_id: int | None, name: str) -> InvalidRequest:
    """The same words for a name that does not exist and one that belongs to another server."""
    shared = server(bot, guild_id).other_styles
    known = ", ".join(s["name"] for s in bot.store.styles_visible_in(guild_id, shared))
    hint = f"known styles are {known}" if known else "no styles are registered yet"
    return InvalidRequest(f"unknown style '{render.clip(name, 40)}': {hint}")


def usable_style(bot: Host, guild_id: int | None, name: str) -> dict[str, Any]:
    row = gs.visible_style(bot.store, guild_id, name.strip(), server(bot, guild_id).other_styles)
    if row is None:
        raise unknown_style(bot, guild_id, name)
    return row


# --- /settings ----------------------------------------------------------------------------------
def _resolve_channels(guild: discord.Guild, text: str) -> tuple[int, ...]:
    if text.strip().lower() in EVERYWHERE_WORDS:
        return ()
    found: list[int] = []
    for token in re.split(r"[\s,]+", text.strip()):
        if not token:
            continue
        match = MENTION.match(token)
        channel: Any = None
        if match and match.group(1) == "#":
            channel = guild.get_channel_or_thread(int(match.group(2)))
        elif SNOWFLAKE.fullmatch(token):
            channel = guild.get_channel_or_thread(int(token))
        else:
            name = token.lstrip("#").lower()
            channel = next((c for c in guild.channels if c.name.lower() == name), None)
        if channel is None or isinstance(channel, discord.CategoryChannel):
            raise InvalidRequest(
                f"unknown channel '{render.clip(token, 40)}' in this server: mention it (#name) or give its name"
            )
        found.append(channel.id)
    if not found:
        raise InvalidRequest("name at least one channel, or 'everywhere'")
    return tuple(found)


def _resolve_role(guild: discord.Guild, text: str) -> str:
    token = text.strip()
    if token.lower() == "none":
        return ""  # no moderator role here, even if the operator names one
    match = MENTION.match(token)
    role = None
    if match and match.group(1) == "@&":
        role = guild.get_role(int(match.group(2)))
    elif SNOWFLAKE.fullmatch(token):
        role = guild.get_role(int(token))
    else:
        role = next((r for r in guild.roles if r.name.lower() == token.lstrip("@").lower()), None)
    if role is None or role.is_default():
        raise InvalidRequest(f"unknown role '{render.clip(token, 40)}' in this server: mention it or give its name")
    return str(role.id)


def _typed(guild: discord.Guild, key: str, raw: str) -> Any:
    """The value as the key holds it; None resets the key to the operator's default."""
    if key not in gs.KEYS:
        raise InvalidRequest(f"unknown setting '{render.clip(key, 40)}': use one of {', '.join(gs.KEYS)}")
    if raw.strip().lower() in gs.RESET_WORDS:
        return None
    kind = gs.KEYS[key].kind
    if kind == "channels":
        return _resolve_channels(guild, raw)
    if kind == "role":
        return _resolve_role(guild, raw)
    return gs.parse_scalar(key, raw)


def _shown(key: str, server_settings: gs.GuildSettings, effective: Settings) -> str:
    own = getattr(server_settings, key)
    kind = gs.KEYS[key].kind
    if kind == "channels":
        return " ".join(f"<#{c}>" for c in own) if own else "everywhere"
    if kind == "role":
        role = effective.moderator_role
        text = (f"<@&{role}>" if SNOWFLAKE.fullmatch(role) else f"@{role}") if role else "none (Manage Server only)"
        return text + ("" if own is not None else " (default)")
    if kind == "bool":
        return ("on" if own else "off") + ("" if own != gs.GuildSettings().other_styles else " (default)")
    value = getattr(effective, key)
    return f"{value}" + ("" if own is not None else " (default)")


def settings_text(server_settings: gs.GuildSettings, operator: Settings) -> str:
    effective = server_settings.limits(operator)
    lines = ["**emaki settings for this server** (change one: `/settings set key value`; `default` resets it)"]
    for key, spec in gs.KEYS.items():
        bound = f" · the bot's limit is {getattr(operator, spec.bound)}" if spec.bound else ""
        lines.append(f"`{key}`: {_shown(key, server_settings, effective)}{bound}")
    entries = len(server_settings.blocklist)
    lines.append(f"`blocklist`: {entries} entr{'y' if entries == 1 else 'ies'} (`/settings blocklist list`)")
    return render.clip("\n".join(lines))


async def _answer(interaction: discord.Interaction, text: str) -> None:
    await interaction.response.send_message(render.clip(text), ephemeral=True, allowed_mentions=NO_MENTIONS)


async def lacks_manage_guild(interaction: discord.Interaction, command: str) -> bool:
    """Discord hides admin commands from members without Manage Server, but a server can grant a
    command to anyone in its integration settings: the permission is checked again here."""
    if interaction.guild is not None and interaction.permissions.manage_guild:
        return False
    await _answer(interaction, f"⚠️ /{command} needs the Manage Server permission")
    return True


class ServerSettings(Cog):
    """/settings show|set and /settings blocklist add|remove|list (Manage Server)."""

    def __init__(self, bot: Host) -> None:
        self.bot = bot

    settings_group = app_commands.Group(
        name="settings",
        description="This server's emaki settings (Manage Server)",
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )
    blocklist_group = app_commands.Group(
        name="blocklist", description="Words and patterns refused in prompts and captions", parent=settings_group
    )

    @settings_group.command(name="show", description="Every setting of this server")
    async def show(self, interaction: discord.Interaction) -> None:
        bot = self.bot
        if not await lacks_manage_guild(interaction, "settings"):
            await _answer(interaction, settings_text(server(bot, interaction.guild_id), bot.settings))

    @settings_group.command(name="set", description="Change one setting (value 'default' resets it)")
    @app_commands.describe(key="Which setting", value="The new value, or 'default'")
    async def set_value(self, interaction: discord.Interaction, key: str, value: str) -> None:
        bot = self.bot
        if await lacks_manage_guild(interaction, "settings"):
            return
        assert interaction.guild is not None
        before = server(bot, interaction.guild.id)
        try:
            after = before.changed(key, _typed(interaction.guild, key, value), bot.settings)
        except EmakiError as exc:
            await _answer(interaction, f"⚠️ {exc}: nothing was changed")
            return
        gs.save(bot.store, interaction.guild.id, before, after)
        await _answer(interaction, f"`{key}` is now {_shown(key, after, after.limits(bot.settings))} in this server.")

    @set_value.autocomplete("key")
    async def key_autocomplete(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        needle = current.lower()
        return [app_commands.Choice(name=f"{k}: {s.help}"[:100], value=k) for k, s in gs.KEYS.items() if needle in k]

    @blocklist_group.command(name="add", description="Refuse prompts and captions that match (a word or a regex)")
    @app_commands.describe(pattern="A word (matched whole) or a regular expression; case and accents are ignored")
    async def block_add(self, interaction: discord.Interaction, pattern: str) -> None:
        await self._change_blocklist(interaction, pattern, adding=True)

    @blocklist_group.command(name="remove", description="Take an entry off the blocklist")
    @app_commands.describe(pattern="The entry, as listed")
    async def block_remove(self, interaction: discord.Interaction, pattern: str) -> None:
        await self._change_blocklist(interaction, pattern, adding=False)

    @blocklist_group.command(name="list", description="This server's blocklist")
    async def block_list(self, interaction: discord.Interaction) -> None:
        bot = self.bot
        if await lacks_manage_guild(interaction, "settings"):
            return
        entries = server(bot, interaction.guild_id).blocklist
        text = "\n".join(f"`{e}`" for e in entries) if entries else "The blocklist is empty."
        if len(text) <= render.MAX_CONTENT:
            await _answer(interaction, text)
            return
        # 200 entries of up to 200 characters do not fit a message: an admin must see every entry to
        # remove one, so the whole list goes as a text file.
        listing = discord.File(io.BytesIO("\n".join(entries).encode()), filename="blocklist.txt")
        await interaction.response.send_message(
            f"{len(entries)} entries, one per line:", file=listing, ephemeral=True, allowed_mentions=NO_MENTIONS
        )

    async def _change_blocklist(self, interaction: discord.Interaction, pattern: str, adding: bool) -> None:
        bot = self.bot
        if await lacks_manage_guild(interaction, "settings"):
            return
        assert interaction.guild is not None
        before = server(bot, interaction.guild.id)
        try:
            after = before.with_pattern(pattern) if adding else before.without_pattern(pattern)
        except EmakiError as exc:
            await _answer(interaction, f"⚠️ {exc}: nothing was changed")
            return
        gs.save(bot.store, interaction.guild.id, before, after)
        verb = "added to" if adding else "removed from"
        await _answer(interaction, f"`{render.clip(pattern.strip(), 200)}` {verb} the blocklist.")


# --- /style remove | share ------------------------------------------------------------------------
def _own_style(bot: Host, guild_id: int, name: str) -> dict[str, Any]:
    """A style this server trained; operator styles and other servers' are refused with a line each."""
    row = usable_style(bot, guild_id, name)
    if row.get("guild_id") is None:
        raise InvalidRequest(
            f"the style '{row['name']}' was added by the bot's operator for every server: "
            f"the operator removes it with `emaki styles remove {row['name']}`"
        )
    if row["guild_id"] != guild_id:
        raise InvalidRequest(f"the style '{row['name']}' belongs to another server that shares it")
    return row


def remove_style_files(settings: Settings, name: str) -> None:
    """The style's weights and its dataset, both under the data dir (nothing outside it is touched)."""
    from training.service import dataset_dir, style_dir

    root = settings.data_dir.resolve()
    for folder in (style_dir(settings, name), dataset_dir(settings, name)):
        if folder.exists() and folder.resolve().is_relative_to(root) and folder.resolve() != root:
            shutil.rmtree(folder)


class StyleAdmin(Cog):
    """/style remove|share: moderators manage the styles their server trained."""

    def __init__(self, bot: Host) -> None:
        self.bot = bot

    group = app_commands.Group(name="style", description="Manage this server's styles (moderators)", guild_only=True)

    async def moderated_style(self, interaction: discord.Interaction, name: str) -> dict[str, Any] | None:
        """This server's style `name`, when a moderator asks; otherwise None, the member told why."""
        bot = self.bot
        member = interaction.user if isinstance(interaction.user, discord.Member) else None
        if interaction.channel is None or not is_moderator(bot, member, interaction.channel):
            await _answer(interaction, "⚠️ only moderators (Manage Server or the moderator role) manage styles")
            return None
        assert interaction.guild_id is not None
        try:
            return _own_style(bot, interaction.guild_id, name)
        except EmakiError as exc:
            await _answer(interaction, f"⚠️ {exc}")
            return None

    @group.command(name="remove", description="Remove one of this server's styles and its files")
    @app_commands.describe(name="The style")
    async def remove(self, interaction: discord.Interaction, name: str) -> None:
        bot = self.bot
        row = await self.moderated_style(interaction, name)
        if row is None:
            return
        # The row first: from now on no new job can pick the style, and queued ones fail with the
        # engine's "it was removed after the job was queued".
        bot.store.delete_style(row["name"])
        for dataset in bot.store.datasets_where("style_name = ?", [row["name"]]):
            bot.store.update_dataset(dataset["id"], status="removed")
        await asyncio.to_thread(remove_style_files, bot.settings, row["name"])
        await _answer(interaction, f"Removed the style **{row['name']}** and its files.")

    @group.command(name="share", description="Let other servers use one of this server's styles (or stop)")
    @app_commands.describe(name="The style", shared="True: other servers can list and use it")
    async def share(self, interaction: discord.Interaction, name: str, shared: bool) -> None:
        bot = self.bot
        row = await self.moderated_style(interaction, name)
        if row is None:
            return
        bot.store.update_style(row["name"], shared=int(shared))
        state = "now shared with other servers" if shared else "now used only in this server"
        await _answer(interaction, f"The style **{row['name']}** is {state}.")

    @remove.autocomplete("name")
    @share.autocomplete("name")
    async def own_styles(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        bot = self.bot
        rows = bot.store.styles_visible_in(interaction.guild_id, False)
        names = [r["name"] for r in rows if r.get("guild_id") == interaction.guild_id and current.lower() in r["name"]]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]
