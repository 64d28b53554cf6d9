"""Slash commands. Each validates through the engine's own checks and answers bad input with an
ephemeral message that says what to change; nothing reaches the engine unvalidated."""

from __future__ import annotations

import json
import logging
import unicodedata
from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.ext.commands import Cog

from bot import guild_settings as server_rules
from bot import render
from bot.guild_settings import lacks_manage_guild
from bot.outbox import NO_MENTIONS
from bot.state import post_state
from engine.coordinator.guild_settings import check_steps, must_screen
from engine.coordinator.requests import build_params
from engine.coordinator.safety import screens
from engine.errors import EmakiError, InvalidRequest

if TYPE_CHECKING:
    from bot.state import Host


log = logging.getLogger(__name__)


async def refuse(interaction: discord.Interaction, message: str) -> None:
    text = render.clip(f"⚠️ {message}")  # one line the member reads, never over Discord's 2,000 characters
    await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)


def visible_text(text: str) -> str:
    """The text without invisible format characters (zero-width space/joiner, BOM, bidi marks):
    an idea made only of those is empty, whatever its length."""
    return "".join(c for c in text if unicodedata.category(c) != "Cf").strip()


def open_jobs_text(bot: Host, owner_id: int, guild_id: int | None = None) -> str:
    """A member's jobs as /queue shows them, including results that are rendered but not posted."""
    mine = bot.store.jobs_where("owner_id = ? and status in ('queued', 'running')", [owner_id])
    unposted = bot.store.unposted_results(owner_id)
    lines = []
    for job in mine:
        position = bot.queue.position(job["id"])
        wait = render.eta(bot.queue.eta_seconds(position))
        where = "rendering now" if position == 0 else f"position {position}, {wait}"
        lines.append(f"`#{job['id']}` **{render.clip(job['idea'], 80)}**: {where}")
    for job in unposted:
        state = post_state(job)
        reason = job.get("post_error") or ""
        if state == "failed":
            where = f"rendered, but it cannot be posted: {reason}"
        elif state == "refused":
            where = (
                f"rendered, but Discord refused the post ({reason}); retried until the channel accepts it, "
                f"or an admin can `/repost job:{job['id']}`"
            )
        else:
            where = "rendered, posting the result" + (f" (Discord: {reason}; retrying)" if reason else "")
        lines.append(f"`#{job['id']}` **{render.clip(job['idea'], 80)}**: {where}")
    if not lines:
        return "You have no jobs waiting."
    total = len(bot.queue.pending())
    stopped = bot.queue.paused or bot.queue.guild_paused(guild_id)
    paused = " The queue is paused by an admin." if stopped else ""
    return render.clip("\n".join([*lines, f"{total} job(s) queued in all.{paused}"]))


class JobCommands(Cog):
    """/animate, /queue, /cancel, /styles, /help, and the admins' /pause, /resume, /repost."""

    def __init__(self, bot: Host) -> None:
        self.bot = bot

    @app_commands.command(name="animate", description="Turn an idea into a short Ghibli-style animation")
    @app_commands.guild_only()
    @app_commands.describe(
        prompt="What happens, in one line",
        frames="Number of frames (default 5)",
        style="A community style",
        seed="Seed for reproducible results",
        strength="How much each frame may change from the previous one (0-1, default 0.15)",
        steps="Denoising steps (default 50)",
        guidance="How closely to follow the prompt (default 8.5)",
        interpolate="Smooth in-between frames per pair of frames (0-8); the clip keeps its length",
        motion="chain: each frame drawn from the one before (default); animatediff: the clip rendered at once; "
        "video: the frames as keyframes of a clip a video model renders",
        seconds="motion:video only: the clip's length in seconds (default 5)",
        fps="motion:video only: the clip's frames per second (default 24)",
        video_style="motion:video only: a video style (LoRA) for the video model; style stays the keyframes'",
    )
    async def animate(
        self,
        interaction: discord.Interaction,
        prompt: str,
        frames: int | None = None,
        style: str | None = None,
        seed: int | None = None,
        strength: float | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        interpolate: int | None = None,
        motion: Literal["chain", "animatediff", "video"] | None = None,
        seconds: float | None = None,
        fps: int | None = None,
        video_style: str | None = None,
    ) -> None:
        bot = self.bot
        assert interaction.guild is not None and interaction.channel is not None
        rules = server_rules.server(bot, interaction.guild.id)
        limits = rules.limits(bot.settings)  # the operator's settings under this server's defaults and limits
        try:
            pointer = server_rules.channel_pointer(rules.animate_channels, interaction.channel, "animate")
            if pointer is not None:
                raise InvalidRequest(pointer)
            if not visible_text(prompt):
                raise InvalidRequest("the idea is empty: describe what happens, in one line")
            blocked = server_rules.blocked_entry(rules, [prompt])
            if blocked is not None:
                raise InvalidRequest(server_rules.blocked_message(blocked, "prompts"))
            bot.queue.check_cap(interaction.user.id)  # the operator's cap, as the queue holds it
            if rules.max_pending_per_member is not None:  # a server may only lower it
                cap = min(rules.max_pending_per_member, bot.queue.max_pending)
                server_rules.check_member_cap(bot, interaction.user.id, cap, interaction.guild.id)
            check_steps(limits, steps)
            for name in (style, video_style):
                if name and name.strip():
                    server_rules.usable_style(bot, interaction.guild.id, name)  # other servers' styles stay unknown
            params = build_params(
                limits,
                bot.store,
                prompt,
                frames=frames,
                style=style,
                seed=seed,
                strength=strength,
                steps=steps,
                guidance=guidance,
                interpolate=interpolate,
                motion=motion,
                video_seconds=seconds,  # refused in one line unless motion is video (build_params)
                video_fps=fps,
                video_style=video_style,
            )
        except EmakiError as exc:
            await refuse(interaction, str(exc))
            return
        # The row is committed before the member is told anything: an acknowledged job is durable.
        job_id = bot.engine.create_job(
            params,
            owner_id=interaction.user.id,
            owner_name=interaction.user.display_name,
            guild_id=interaction.guild.id,
            channel_id=interaction.channel.id,
            # Recorded with the job: regenerations follow it, and a policy changed later does not reach back.
            screen=int(must_screen(server_rules.age_restricted(interaction.channel), limits.nsfw_policy)),
        )
        job = bot.store.job(job_id)
        assert job is not None
        position = max(bot.queue.position(job_id), 1)
        bot._announcing.add(job_id)
        text = render.queued(job, position, bot.queue.eta_seconds(position))
        try:
            await interaction.response.send_message(text, allowed_mentions=NO_MENTIONS)
            bot.remember_interaction(job_id, interaction)  # to tell the member privately if it is flagged
            message = await interaction.original_response()
            bot.store.update_job(job_id, status_message_id=message.id)
            bot._shown[job_id] = text  # what the member sees: no edit until it changes
        except discord.HTTPException as exc:
            # The job is stored and runs; its status message is sent into the channel instead.
            log.warning("answering /animate for job %s failed: %s", job_id, exc.status)
        finally:
            bot._announcing.discard(job_id)
            bot.queue.kick()
            bot.show_positions()

    @animate.autocomplete("style")
    async def style_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        bot = self.bot
        shared = server_rules.server(bot, interaction.guild_id).other_styles
        names = bot.store.style_choices(interaction.guild_id, shared, current, 25, bot.engine.models.family_name)
        return [app_commands.Choice(name=n, value=n) for n in names]

    @animate.autocomplete("video_style")
    async def video_style_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        from engine.render.video_styles import VIDEO_FAMILY

        bot = self.bot
        shared = server_rules.server(bot, interaction.guild_id).other_styles
        names = bot.store.style_choices(interaction.guild_id, shared, current, 25, VIDEO_FAMILY)
        return [app_commands.Choice(name=n, value=n) for n in names]

    @app_commands.command(name="queue", description="Your jobs and their place in line")
    @app_commands.guild_only()
    async def queue(self, interaction: discord.Interaction) -> None:
        bot = self.bot
        await interaction.response.send_message(
            open_jobs_text(bot, interaction.user.id, interaction.guild_id), ephemeral=True, allowed_mentions=NO_MENTIONS
        )

    @app_commands.command(name="cancel", description="Cancel your queued or running job (the latest, or by number)")
    @app_commands.guild_only()
    @app_commands.describe(job="Job number from /queue (default: your latest)")
    async def cancel(self, interaction: discord.Interaction, job: int | None = None) -> None:
        bot = self.bot
        mine = bot.store.jobs_where("owner_id = ? and status in ('queued', 'running')", [interaction.user.id])
        target = next((j for j in mine if j["id"] == job), None) if job is not None else (mine[-1] if mine else None)
        if target is None:
            await refuse(interaction, "you have no queued or running job" + (f" #{job}" if job else ""))
            return
        try:
            state = bot.queue.cancel(target["id"])
        except InvalidRequest as exc:
            await refuse(interaction, str(exc))
            return
        if state == "queued":
            row = bot.store.job(target["id"])
            assert row is not None
            bot.set_status(row["id"], {"content": render.failed(row, "cancelled"), "attachments": []})
            bot.show_positions()
            await interaction.response.send_message(f"Cancelled job #{target['id']}.", ephemeral=True)
        else:
            await interaction.response.send_message(f"Stopping job #{target['id']} at its next step.", ephemeral=True)

    @app_commands.command(name="styles", description="Styles you can use with /animate")
    async def styles(self, interaction: discord.Interaction) -> None:
        bot = self.bot
        # This server's styles, the operator's, and what other servers share (where this one shows them).
        shared = server_rules.server(bot, interaction.guild_id).other_styles
        rows = bot.store.styles_visible_in(interaction.guild_id, shared)
        running = bot.engine.models.family_name  # only what this bot can render: styles of its base's family
        # Video styles (for motion:video's video_style) are listed too, marked.
        rows = [row for row in rows if not running or (row.get("family") or "sd15") in (running, "ltx-video")]
        if not rows:
            await interaction.response.send_message(
                "No styles yet: train one with /train.", ephemeral=True, allowed_mentions=NO_MENTIONS
            )
            return
        lines = []
        for row in rows:
            metrics = json.loads(row["metrics"]) if row.get("metrics") else {}
            score = f" · KID {metrics['kid']:.3f}" if isinstance(metrics.get("kid"), float) else ""
            trigger = f" · trigger `{row['trigger']}`" if row["trigger"] else ""
            owner = row.get("guild_id")
            origin = ""
            if owner is not None and owner != interaction.guild_id:
                origin = " · shared by another server"
            elif owner is not None and row.get("shared"):
                origin = " · shared with other servers"
            video = " · video style (motion:video video_style)" if row.get("family") == "ltx-video" else ""
            lines.append(f"**{row['name']}** ({row['adapter']}){trigger}{score}{origin}{video}")
        await interaction.response.send_message(
            render.clip("\n".join(lines)), ephemeral=True, allowed_mentions=NO_MENTIONS
        )

    @app_commands.command(name="help", description="How to use emaki")
    async def help_command(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"{render.HELP}\n{render.COMMUNITY_HELP}", ephemeral=True)

    @app_commands.command(name="pause", description="Pause the queue (jobs stay queued)")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    async def pause(self, interaction: discord.Interaction) -> None:
        bot = self.bot
        if await lacks_manage_guild(interaction, "pause"):
            return
        assert interaction.guild_id is not None
        # This server's jobs only (stored: a restart keeps it): one server's admin cannot stop the others'.
        bot.queue.pause_guild(interaction.guild_id, True)
        await interaction.response.send_message(
            "Queue paused for this server (also across restarts): its queued jobs wait; a running one "
            "finishes; other servers are not affected.",
            ephemeral=True,
        )

    @app_commands.command(name="resume", description="Resume the queue")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    async def resume(self, interaction: discord.Interaction) -> None:
        bot = self.bot
        if await lacks_manage_guild(interaction, "resume"):
            return
        assert interaction.guild_id is not None
        bot.queue.pause_guild(interaction.guild_id, False)
        bot.queue.kick()
        await interaction.response.send_message("Queue resumed.", ephemeral=True)

    @app_commands.command(
        name="repost", description="Post a finished result again (after fixing the channel permissions)"
    )
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.describe(job="Job number (from the status message or /queue)", here="Post it in this channel instead")
    async def repost(self, interaction: discord.Interaction, job: int, here: bool = False) -> None:
        bot = self.bot
        assert interaction.channel is not None and interaction.guild is not None
        if await lacks_manage_guild(interaction, "repost"):
            return
        row = bot.store.job(job)
        if row is None or row.get("guild_id") != interaction.guild_id:
            await refuse(interaction, f"there is no job #{job} in this server")
            return
        target = interaction.channel if here else bot.get_channel(row["channel_id"] or 0)
        policy = server_rules.limits(bot, interaction.guild.id).nsfw_policy
        if (
            target is not None
            and must_screen(server_rules.age_restricted(target), policy)
            and not screens(bot.store, bot.settings, row)
        ):
            await refuse(
                interaction,
                f"job #{job} was made without the content filter (an age-restricted channel allowed it): "
                "it can only be posted where this server allows unscreened results",
            )
            return
        await interaction.response.defer(ephemeral=True, thinking=True)  # posting can take a while
        answer: dict[str, Any] = {"ephemeral": True, "allowed_mentions": NO_MENTIONS}
        try:
            state = await bot.repost(job, interaction.channel.id if here else None)
        except EmakiError as exc:
            await interaction.followup.send(f"⚠️ {exc}", **answer)
            return
        after = bot.store.job(job) or {}
        if state == "posted":
            await interaction.followup.send(f"Posted job #{job}.", **answer)
        else:
            reason = after.get("post_error") or state
            await interaction.followup.send(f"⚠️ job #{job} is still not posted: {reason}", **answer)
