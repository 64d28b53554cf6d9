"""What a member can do to a posted result, whichever way they ask: a reaction (bot/reactions.py) or
a button (bot/buttons.py). One implementation, so the two ways never disagree on who may do what.

- Reroll / redo from frame k: anyone in the server may; the new job is theirs (their cap, their ping).
- Delete: the requester, or someone with Manage Messages in the channel. The job's rows and files
  stay (the retention sweep removes files later).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord

from bot import guild_settings as server_rules
from engine.coordinator.guild_settings import must_screen
from engine.coordinator.retention import purged_reason
from engine.coordinator.safety import image_passes, screens
from engine.coordinator.worker import clip_images, job_dir
from engine.errors import InvalidRequest
from engine.render.media import write_mp4

if TYPE_CHECKING:
    from bot.state import Host
    from engine.settings import Settings

log = logging.getLogger(__name__)

MP4_FILE = "animation.mp4"  # in the job folder, made on the first request and reused after
MP4_MISSING = 'MP4 needs imageio-ffmpeg on the bot\'s machine (pip install "emaki[mp4]"); the GIF has the same frames'


def may_delete(job: dict[str, Any], user_id: int, permissions: discord.Permissions | None) -> bool:
    return user_id == job["owner_id"] or (permissions is not None and permissions.manage_messages)


async def regenerate(
    bot: Host,
    job: dict[str, Any],
    from_index: int,
    *,
    reseed_all: bool,
    user_id: int,
    user_name: str,
    guild_id: int,
    channel: Any,
) -> int:
    """Queue a reroll (`reseed_all`, from frame 0) or a redo from `from_index` as the member's own
    job; returns its id once its rows are committed. A regeneration is a new job in `channel`, so it
    meets every rule /animate meets there today (not when the parent was made): the server's channels,
    cap, blocklist, style visibility and content screening. Raises EmakiError with nothing stored."""
    if job.get("guild_id") is not None and job["guild_id"] != guild_id:
        raise InvalidRequest(f"job {job['id']} belongs to another server")
    rules = server_rules.server(bot, guild_id)
    limits = rules.limits(bot.settings)
    pointer = server_rules.channel_pointer(rules.animate_channels, channel, "animate")
    if pointer is not None:
        raise InvalidRequest(pointer)
    bot.queue.check_cap(user_id)
    if rules.max_pending_per_member is not None:  # the server's cap applies to rerolls as to /animate
        cap = min(rules.max_pending_per_member, bot.queue.max_pending)
        server_rules.check_member_cap(bot, user_id, cap, guild_id)
    blocked = server_rules.blocked_entry(rules, [job["idea"]])
    if blocked is not None:
        raise InvalidRequest(server_rules.blocked_message(blocked, "prompts"))
    style = (job["params"].get("style") or "").strip()
    if style:  # unshared or removed since: other servers' styles stay unknown here
        row = server_rules.usable_style(bot, guild_id, style)
        held = job["params"].get("style_id")
        if held and row.get("uid") != held:  # the job holds its style by identity (engine/params.py)
            raise InvalidRequest(f"the style '{row['name']}' was replaced since: use /animate to animate with it again")
    screen = must_screen(server_rules.age_restricted(channel), limits.nsfw_policy)
    if screen and not screens(bot.store, bot.settings, job) and from_index > 0:
        # The kept frames were made unscreened (an age-restricted channel that allowed it): they are
        # screened now, before they could be shown here.
        kept = [row["path"] for row in bot.store.frames(job["id"])[:from_index]]
        if not await asyncio.to_thread(frames_pass, bot, kept):
            raise InvalidRequest("the frames this redo would keep do not pass this channel's content filter")
    new_id = bot.engine.create_regeneration(
        job["id"],
        from_index,
        reseed_all=reseed_all,
        owner_id=user_id,
        owner_name=user_name,
        guild_id=guild_id,
        channel_id=channel.id,
        screen=int(screen),  # recorded, as /animate records it: decided by where it is asked for
    )
    await bot.announce(new_id)
    return new_id


def frames_pass(bot: Host, paths: list[str]) -> bool:
    """Whether every frame file passes the safety checker (blocking: call it in a thread)."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as image:
                if not image_passes(bot.settings, bot.engine.models, image.convert("RGB")):
                    return False
        except OSError:
            return False  # a kept frame that cannot be read cannot be shown either
    return True


async def delete_result(bot: Host, job: dict[str, Any], channel: Any, message_id: int) -> None:
    """Delete the result post; the job stays in the store. Safe to call twice."""
    with contextlib.suppress(discord.NotFound):  # a second ❌ (or click) on a post already deleted
        await channel.get_partial_message(message_id).delete()
    if job.get("result_message_id") == message_id:
        bot.store.update_job(job["id"], result_message_id=None)


def mp4_of(settings: Settings, job: dict[str, Any], frames: list[dict[str, Any]]) -> Path:
    """The job's clip (the GIF's frames, in-betweens included, at the GIF's timing) as MP4, made
    once and kept in the job folder. Blocking (CPU, ffmpeg): call it in a thread. Raises
    InvalidRequest with one clear line when the frames are gone or imageio-ffmpeg is missing."""
    purged = purged_reason(job)
    if purged:
        raise InvalidRequest(purged)
    folder = job_dir(settings, job["id"])
    target = folder / MP4_FILE
    if target.is_file():
        return target
    if not frames or not all(r["path"] and Path(r["path"]).is_file() for r in frames):
        raise InvalidRequest(f"job {job['id']}'s frames are no longer on disk: there is nothing to make an MP4 from")
    if not ffmpeg_available():
        raise InvalidRequest(MP4_MISSING)
    images, frame_ms = clip_images(settings, job, frames)
    # A unique temporary name (two clicks at once each write their own), ".mp4" so ffmpeg picks
    # the container; renamed into place whole.
    handle, tmp_name = tempfile.mkstemp(prefix=".mp4-", suffix=".mp4", dir=folder)
    tmp = Path(tmp_name)
    os.close(handle)
    try:
        try:
            write_mp4(images, tmp, duration_ms=frame_ms)
        except InvalidRequest as exc:  # ffmpeg's own complaint is many lines: the log keeps it
            log.warning("MP4 of job %s failed: %s", job["id"], exc)
            reason = f"the MP4 of job {job['id']} could not be made; an admin can find why in the bot's log"
            raise InvalidRequest(reason) from exc
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def ffmpeg_available() -> bool:
    """Whether imageio can find its ffmpeg (the imageio-ffmpeg package and its binary)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return False
    return True
