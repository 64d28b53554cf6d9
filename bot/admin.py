"""For whoever runs the bot: `/stats` (Manage Server) and the daily retention sweep.

The sweep (engine/coordinator/retention.py) runs once at start-up and then every 24 hours, in a thread: it only
deletes files, and a data dir of many old jobs must not stall the event loop while it does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import statistics
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import tasks
from discord.ext.commands import Cog

from bot import render
from bot.guild_settings import lacks_manage_guild
from bot.outbox import NO_MENTIONS
from engine.coordinator import retention
from engine.coordinator.store import Store, now
from engine.settings import Settings

if TYPE_CHECKING:
    from bot.state import Host

log = logging.getLogger(__name__)

SWEEP_EVERY_H = 24
MEDIAN_OVER = 100  # finished jobs the median job time is taken over
ENDED = ("done", "failed", "cancelled")


async def sweep(bot: Host, at: float | None = None) -> retention.SweepReport:
    """One retention sweep at `at` (default: now; the store's clock, which stamped finished_at), then
    the data dir's size, measured once while the sweep's thread is at it (see `disk_bytes`)."""
    return await asyncio.to_thread(sweep_and_measure, bot.settings, bot.store, now() if at is None else at)


def sweep_and_measure(settings: Settings, store: Store, at: float) -> retention.SweepReport:
    report = retention.sweep(settings, store, at)
    measure_disk(settings, store)
    return report


def measure_disk(settings: Settings, store: Store) -> int:
    """Walk the whole data dir once (daily, in the sweep's thread) and keep the figure as a row."""
    started = now()  # files written during the walk belong to jobs created after this: counted by disk_bytes
    size = retention.dir_size(settings.data_dir)
    store.set_disk_figure(size - _database_bytes(store), started)  # the database is sized at each /stats
    return size


def _database_bytes(store: Store) -> int:
    return sum(retention.file_size(store.path.with_name(store.path.name + end)) for end in ("", "-wal", "-shm"))


def disk_bytes(settings: Settings, store: Store) -> int:
    """/stats' disk use without walking a year of files: the last daily walk's figure plus the folders
    of the jobs created since (a day's jobs at most; an ended job's folder is measured once and then
    read from its row). Files written since the walk for older jobs, or for ended ones already
    measured (an MP4 made on request, in-between cache files), count from the next walk on."""
    figure = store.disk_figure()
    if figure is None:  # no walk yet (the first /stats before the first sweep): walk now
        return measure_disk(settings, store)
    size, walked_at = figure
    from engine.coordinator.worker import job_dir  # the engine is loaded already wherever the bot runs

    recent = 0
    measured: dict[int, int] = {}
    for job_id, status, kept in store.job_bytes_since(walked_at):
        if kept is None:
            kept = retention.dir_size(job_dir(settings, job_id))
            if status in ENDED:  # its folder is complete: measured once, summed from the row after
                measured[job_id] = kept
        recent += kept
    store.keep_job_bytes(measured)
    return size + recent + _database_bytes(store)


def stats_figures(store: Store, settings: Settings, guild_id: int | None, at: float) -> dict[str, Any]:
    """/stats' figures from the store and the data dir (the queue and the GPU come from the bot)."""
    midnight = dt.datetime.fromtimestamp(at, dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    since = midnight.timestamp()
    seconds = store.recent_job_seconds(MEDIAN_OVER)
    return {
        "running": store.count_running(),
        "today": store.jobs_since(since),
        "today_here": store.jobs_since(since, guild_id) if guild_id is not None else 0,
        "median_s": statistics.median(seconds) if seconds else None,
        "timed": len(seconds),
        "disk_bytes": disk_bytes(settings, store),
        "workers": store.workers(),  # cluster mode's renderers (node, GPU, state, job)
    }


def stats_text(bot: Host, guild_id: int | None, at: float) -> str:
    """The /stats answer. Blocking (reads the store): call it in a thread."""
    figures = stats_figures(bot.store, bot.settings, guild_id, at)
    return render.stats(queued=len(bot.queue.pending()), gpu=gpu_text(bot), keep_days=bot.settings.keep_days, **figures)


def gpu_text(bot: Host) -> str:
    """The device the models run on: the CUDA device's name and memory, else "CPU"."""
    import torch

    device = getattr(getattr(bot.engine, "models", None), "device", None)
    kind = getattr(device, "type", "cpu")
    if kind != "cuda" or not torch.cuda.is_available():
        return "CPU" if kind == "cpu" else f"no CUDA GPU (models on {kind})"
    index = device.index if device.index is not None else torch.cuda.current_device()  # type: ignore[union-attr]
    free, total = torch.cuda.mem_get_info(index)
    return (
        f"{torch.cuda.get_device_name(index)} · {(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use "
        f"({torch.cuda.memory_allocated(index) / 2**30:.1f} GiB by emaki)"
    )


class Admin(Cog):
    """/stats, and the daily sweep: started when the Cog loads, stopped when it unloads (at close)."""

    def __init__(self, bot: Host) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.retention_loop.start()

    async def cog_unload(self) -> None:
        self.retention_loop.cancel()

    @app_commands.command(name="stats", description="Queue, jobs today, job time, disk and GPU (Manage Server)")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    async def stats(self, interaction: discord.Interaction) -> None:
        bot = self.bot
        if await lacks_manage_guild(interaction, "stats"):
            return
        await interaction.response.defer(ephemeral=True, thinking=True)  # sizing the data dir takes a moment
        text = await asyncio.to_thread(stats_text, bot, interaction.guild_id, now())
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)

    @tasks.loop(hours=SWEEP_EVERY_H)
    async def retention_loop(self) -> None:
        try:
            await sweep(self.bot)
        except Exception:  # a disk error today must not end tomorrow's sweep
            log.exception("retention sweep failed")
