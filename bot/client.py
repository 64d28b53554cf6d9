"""The Discord adapter: one bot object, built the same way by `emaki bot` and by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import discord
import yarl
from discord.ext import commands, tasks
from PIL import Image

from bot import render
from bot.progress import ProgressReporter
from engine.errors import EmakiError
from engine.events import Event, Failed
from engine.jobs import JobQueue
from engine.media import fit_to_bytes
from engine.models import Models
from engine.settings import Settings, load_settings
from engine.store import Store, open_store
from engine.worker import Engine, stream_job

log = logging.getLogger(__name__)


class EmakiBot(commands.Bot):
    # Seconds between attempts to post a finished result; afterwards the periodic sweep retries.
    post_retry_delays: tuple[float, ...] = (1.0, 3.0, 9.0)

    def __init__(self, settings: Settings, models: Models | None = None) -> None:
        intents = discord.Intents.default()  # guilds + reactions; no privileged intents needed
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, help_command=None)
        self.settings = settings
        self.store: Store = open_store(settings.data_dir)
        self.engine = Engine(settings, self.store, models=models)
        self.queue = JobQueue(self.store, self.run_job, settings.max_pending_per_member)
        # One GPU thread: jobs never overlap on the device, and the event loop stays free.
        self.gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emaki-gpu")
        self._post_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()

    # --- lifecycle ---------------------------------------------------------------------------
    async def setup_hook(self) -> None:
        from bot import commands as slash
        from bot import reactions, training

        slash.register(self)
        reactions.register(self)
        training.register(self)
        await self.tree.sync()
        interrupted = self.queue.recover()
        if interrupted:
            log.info("resuming %d interrupted job(s)", len(interrupted))

    async def on_ready(self) -> None:
        log.info("connected as %s to %d guild(s)", self.user, len(self.guilds))
        self.queue.kick()
        self.spawn(self.post_pending_results())
        if not self.repost_sweep.is_running():
            self.repost_sweep.start()

    async def close(self) -> None:
        if self.repost_sweep.is_running():
            self.repost_sweep.cancel()
        await super().close()
        self.gpu.shutdown(wait=False, cancel_futures=True)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @tasks.loop(seconds=60)
    async def repost_sweep(self) -> None:
        await self.post_pending_results()

    # --- jobs --------------------------------------------------------------------------------
    async def run_job(self, job_id: int, cancel: threading.Event) -> None:
        """Render one job in the GPU thread, editing its status message as events arrive. The GIF,
        the upload and the reactions happen in a task of their own, overlapping the next job."""
        job = self.store.job(job_id)
        if job is not None and job["kind"] == "train":
            from bot.training import run_train_job

            await run_train_job(self, job_id, cancel)
            return
        reporter = ProgressReporter(self, job_id)
        failed = False
        async for event in stream_job(self.engine, self.gpu, job_id, cancel):
            failed = failed or isinstance(event, Failed)
            await self._report(reporter, event)
        if not failed:
            self.spawn(self.complete(job_id, reporter))
        await self.refresh_queue_positions()

    async def complete(self, job_id: int, reporter: ProgressReporter) -> None:
        await self._report(reporter, await asyncio.to_thread(self.engine.finish, job_id))
        await self.post_result(job_id)

    @staticmethod
    async def _report(reporter: ProgressReporter, event: Event) -> None:
        try:
            await reporter.handle(event)
        except discord.HTTPException as exc:  # a failed progress edit must not lose the job
            log.warning("progress edit for job %s failed: %s", reporter.job_id, exc.status)

    async def refresh_queue_positions(self) -> None:
        for position, job in enumerate(self.queue.pending(), start=1):
            if job.get("status_message_id"):
                with contextlib.suppress(discord.HTTPException):  # a stale position is cosmetic
                    await self.edit_status(job, content=render.queued(job, position, self.queue.eta_seconds(position)))

    # --- Discord I/O -------------------------------------------------------------------------
    async def channel_for(self, channel_id: int) -> discord.abc.Messageable:
        channel = self.get_channel(channel_id)
        if channel is None:
            channel = await self.fetch_channel(channel_id)
        return channel  # type: ignore[return-value]

    async def edit_status(self, job: dict[str, Any], **fields: Any) -> None:
        if not job.get("status_message_id") or not job.get("channel_id"):
            return
        channel = await self.channel_for(job["channel_id"])
        await channel.get_partial_message(job["status_message_id"]).edit(**fields)  # type: ignore[attr-defined]

    async def post_pending_results(self) -> None:
        for job in self.store.jobs_where(
            "kind = 'animate' and status = 'done' and posted = 0 and channel_id is not null", []
        ):
            await self.post_result(job["id"])

    async def post_result(self, job_id: int) -> bool:
        """Post a finished job's GIF with its reactions. Retries 5xx; a result that still cannot be
        posted stays `posted = 0` in the store and is retried by the sweep and at start-up."""
        async with self._post_lock:
            job = self.store.job(job_id)
            if job is None or job["status"] != "done" or job["posted"] or not job.get("channel_id"):
                return False
            channel = await self.channel_for(job["channel_id"])
            guild = getattr(channel, "guild", None)
            limit = min(self.settings.upload_limit_bytes, guild.filesize_limit if guild else 1 << 62)
            frames = self.store.frames(job_id)
            images = [Image.open(f["path"]).convert("RGB") for f in frames]
            try:
                data, fitted = await asyncio.to_thread(fit_to_bytes, images, limit, job["params"]["frame_duration_ms"])
            except EmakiError as exc:
                self.store.update_job(job_id, posted=-1, error=str(exc))
                await self.edit_status(job, content=render.failed(job, str(exc)))
                return False
            content = render.result(job, frames, fitted)
            message = None
            for delay in (0.0, *self.post_retry_delays):
                if delay:
                    await asyncio.sleep(delay)
                try:
                    message = await channel.send(
                        content,
                        file=discord.File(io.BytesIO(data), filename=f"emaki-{job_id}.gif"),
                        allowed_mentions=discord.AllowedMentions(users=[discord.Object(job["owner_id"])]),
                    )
                    break
                except discord.HTTPException as exc:
                    if exc.status < 500 and exc.status != 429:
                        log.error("posting job %s was refused (%s): %s", job_id, exc.status, exc.text)
                        self.store.update_job(job_id, posted=-1, error=f"Discord refused the post: {exc.text}")
                        return False
                    log.warning("posting job %s failed with %s; retrying", job_id, exc.status)
            if message is None:
                return False
            self.store.update_job(job_id, posted=1, result_message_id=message.id)
        n_frames = min(len(frames), len(render.DIGITS))
        try:
            for emoji in (render.REROLL, *render.DIGITS[:n_frames], render.DELETE):
                await message.add_reaction(emoji)
            await self.edit_status(job, content=render.finished(job, message.jump_url), attachments=[])
        except discord.HTTPException as exc:
            log.warning("decorating result of job %s failed: %s", job_id, exc.status)
        return True

    async def announce(self, job_id: int, channel: discord.abc.Messageable) -> None:
        """For jobs started from a reaction: a status message of their own, then the queue."""
        job = self.store.job(job_id)
        assert job is not None
        position = max(self.queue.position(job_id), 1)
        message = await channel.send(
            render.queued(job, position, self.queue.eta_seconds(position)),
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.store.update_job(job_id, status_message_id=message.id)
        self.queue.kick()


def create_bot(settings: Settings | None = None, *, models: Models | None = None) -> EmakiBot:
    """The bot, with settings from the environment when none are given. `models` lets a process
    that already holds warm models (tests, a restart in-process) hand them over."""
    settings = settings or load_settings()
    if settings.discord_api_base:  # a REST proxy in front of Discord
        discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    if settings.discord_gateway:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway)
    return EmakiBot(settings, models=models)


def run_bot(settings: Settings) -> None:
    if not settings.discord_token:
        raise EmakiError(
            "DISCORD_TOKEN is not set: create a bot at https://discord.com/developers and export its token"
        )
    bot = create_bot(settings)
    bot.engine.models.load()  # warm before connecting: the first job should not wait for loading
    bot.run(settings.discord_token, log_handler=logging.StreamHandler(), log_level=logging.INFO, root_logger=True)
