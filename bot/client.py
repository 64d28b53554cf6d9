"""The Discord adapter: one bot object, built the same way by `emaki bot` and by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import discord
from discord.ext import commands, tasks

from bot import render
from bot.admin import Admin
from bot.buttons import ResultButtons, result_view
from bot.commands import JobCommands
from bot.endpoints import use_endpoints
from bot.guild_settings import ServerSettings, StyleAdmin
from bot.outbox import NO_MENTIONS, Outbox, only, result_nonce, retryable, status_nonce
from bot.progress import ProgressReporter
from bot.reactions import ReactionControls
from bot.state import StatusFields, post_state
from bot.training import StyleTraining, post_pending_previews, run_train_job
from engine.coordinator.job_files import job_dir
from engine.coordinator.jobs import JobQueue
from engine.coordinator.retention import purged_reason
from engine.coordinator.store import Store, open_store
from engine.coordinator.worker import METRICS_FILE, MP4_FILE, Engine, clip_images, job_record, stream_job
from engine.errors import EmakiError, InvalidRequest
from engine.events import Failed, Requeued
from engine.render.media import fit_mp4, fit_to_bytes
from engine.render.models import Models
from engine.render.renderer import Renderers
from engine.settings import Settings, load_settings

log = logging.getLogger(__name__)


# A result Discord refused (403 missing permissions, 404 unknown channel) is tried again by the
# minutely sweep after these delays, the last one repeating: it is posted once the channel accepts
# it again. (30 s: the next sweep; the sweep runs every 60 s.)
REFUSED_RETRY_S = (30.0, 300.0, 900.0, 3600.0)
INTERACTION_TOKEN_S = 14 * 60.0  # Discord's interaction tokens last 15 minutes; a margin for the send
UNANSWERED_RETRY_S = 30.0  # Discord kept failing (5xx/429): the next sweep tries again


class EmakiBot(commands.Bot):
    """The client: Discord I/O, the queue's jobs and their messages. Each concern's commands and
    listeners are a Cog (bot/commands.py, guild_settings.py, reactions.py, buttons.py, training.py,
    admin.py) that reaches the bot through bot/state.py's `Host`, never by importing this module."""

    # Seconds between attempts to post a finished result; afterwards the periodic sweep retries.
    post_retry_delays: tuple[float, ...] = (1.0, 3.0, 9.0)

    def __init__(self, settings: Settings, models: Models | None = None, renderers: Renderers | None = None) -> None:
        intents = discord.Intents.default()  # guilds + reactions; no privileged intents needed
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            allowed_mentions=NO_MENTIONS,  # the default for every write; pings are opted into per message
        )
        self.settings = settings
        self.store: Store = open_store(settings.data_dir)
        self.engine = Engine(settings, self.store, models=models, renderers=renderers)
        slots = self.engine.slots  # 1 in-process; one per renderer actor in cluster mode
        self.queue = JobQueue(self.store, self.run_job, settings.max_pending_per_member, workers=slots)
        # One thread per renderer: a renderer never runs two jobs at once, and the event loop stays free.
        self.gpu = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="emaki-gpu")
        self.outbox = Outbox(self.spawn)
        self._posting: set[int] = set()  # jobs whose result is being posted right now
        self._announcing: set[int] = set()  # jobs whose first status message is being sent
        self._shown: dict[int, str] = {}  # queued job -> the position text last queued for it
        self.train_names_in_check: set[str] = set()  # /train names whose upload is being checked
        self.previewing: set[int] = set()  # datasets whose preview is being posted
        self._background: set[asyncio.Task[Any]] = set()
        # job -> the followup webhook of the interaction that asked for it, and when: a way to tell the
        # member something only they see (its token lasts 15 minutes; memory only, lost on restart).
        self._private_replies: dict[int, tuple[discord.Webhook, float]] = {}

    # --- lifecycle ---------------------------------------------------------------------------
    async def setup_hook(self) -> None:
        # In this order: the slash commands are synced as they were added.
        await self.add_cog(JobCommands(self))
        await self.add_cog(ServerSettings(self))  # /settings
        await self.add_cog(StyleAdmin(self))  # /style remove|share
        await self.add_cog(ReactionControls(self))
        await self.add_cog(ResultButtons(self))  # the result buttons' templates: clicks on older posts are answered too
        await self.add_cog(StyleTraining(self))
        await self.add_cog(Admin(self))  # /stats and the daily retention sweep (cancelled when the Cog unloads)
        await self.tree.sync()
        interrupted = self.queue.recover()
        if interrupted:
            log.info("resuming %d interrupted job(s)", len(interrupted))

    async def on_ready(self) -> None:
        log.info("connected as %s to %d guild(s)", self.user, len(self.guilds))
        self.queue.kick()
        self.show_positions()  # also sends the status messages that a crash or a failed write left out
        self.spawn(self.post_pending_results())
        self.finish_status_messages()
        if not self.repost_sweep.is_running():
            self.repost_sweep.start()

    def begin_stop(self) -> None:
        """The process is stopping: no job starts any more, and the running one stops at its next step
        with its row left `running` (resumed at the next start, as after a crash). Returns at once."""
        self.engine.stopping.set()
        self.queue.workers = 0  # no free slot: kick() starts nothing, not even when the running job ends

    async def shutdown(self, grace_s: float) -> None:
        """A clean stop (SIGTERM): the running job ends at its next step, results being posted get
        `grace_s` to land, then Discord is closed. Whatever is still in flight after that is left as a
        crash leaves it (a post marked `sending` is looked for in the channel at the next start)."""
        self.begin_stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.idle(), grace_s)
        pending = {task for task in self._background if not task.done()}
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()
        await self.close()

    async def close(self) -> None:
        if self.repost_sweep.is_running():
            self.repost_sweep.cancel()
        await super().close()  # unloads the Cogs first: admin's daily sweep stops there
        self.gpu.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @staticmethod
    def clock() -> float:
        """Wall-clock seconds for scheduling retries (Discord's clock under SimCord)."""
        return discord.utils.utcnow().timestamp()

    @tasks.loop(seconds=60)
    async def repost_sweep(self) -> None:
        await self.post_pending_results()
        await post_pending_previews(self)

    # --- jobs --------------------------------------------------------------------------------
    async def run_job(self, job_id: int, cancel: threading.Event) -> None:
        """Render one job in the GPU thread. Returns as soon as the render ends: status edits, the
        GIF, the upload and the reactions go beside the next job (the outbox and a task of their
        own), so the GPU never waits for Discord."""
        self.show_positions()  # everyone behind this job moved up
        job = self.store.job(job_id)
        if job is not None and job["kind"] == "train":
            await run_train_job(self, job_id, cancel)
            return
        reporter = ProgressReporter(self, job_id)
        failed = requeued = False
        async for event in stream_job(self.engine, self.gpu, job_id, cancel, steps=reporter.shows_step):
            failed = failed or isinstance(event, Failed)
            requeued = requeued or isinstance(event, Requeued)
            reporter.handle(event)
        if failed:
            self.outbox.forget(("status", job_id))
        elif not requeued:  # a requeued job is picked again by the queue and completes then, once
            self.spawn(self.complete(job_id, reporter))

    def remember_interaction(self, job_id: int, interaction: discord.Interaction) -> None:
        """Keep the interaction that asked for a job, to answer privately about it later."""
        cutoff = time.monotonic() - INTERACTION_TOKEN_S
        for stale in [j for j, (_, at) in self._private_replies.items() if at < cutoff]:
            del self._private_replies[stale]
        self._private_replies[job_id] = (interaction.followup, time.monotonic())

    def tell_privately(self, job_id: int, text: str) -> bool:
        """Send `text` only to the member who asked for the job, when their interaction is still
        answerable; False when it is not (a reaction, a restart, over 15 minutes). If Discord refuses
        the private message, the job's status message says it instead."""
        entry = self._private_replies.pop(job_id, None)
        if entry is None or time.monotonic() - entry[1] > INTERACTION_TOKEN_S:
            return False
        webhook = entry[0]

        async def send() -> None:
            try:
                await webhook.send(f"⚠️ {render.clip(text, 1900)}", ephemeral=True, allowed_mentions=NO_MENTIONS)
            except discord.HTTPException as exc:
                log.warning("private reply for job %s failed (%s); saying it in the status message", job_id, exc.status)
                job = self.store.job(job_id)
                if job is not None:
                    self.set_status(job_id, {"content": render.failed(job, text), "attachments": []})

        self.spawn(send())
        return True

    async def complete(self, job_id: int, reporter: ProgressReporter) -> None:
        self._private_replies.pop(job_id, None)
        reporter.handle(await asyncio.to_thread(self.engine.finish, job_id))
        self.outbox.forget(("status", job_id))
        await self.post_result(job_id)

    def show_positions(self) -> None:
        """Queue a position edit for every waiting member whose text changed; each message is
        edited at most every `position_edit_interval_s`. Returns at once."""
        # A job whose first message is on its way (_announcing) gets positions after that.
        gone, changed = render.position_changes(
            self.queue.pending(), self._shown, self.queue.eta_seconds, self._announcing
        )
        for job_id in gone:
            self.outbox.forget(("status", job_id))
        for job, text in changed:

            async def still_queued(row: dict[str, Any], text: str = text) -> dict[str, Any] | None:
                return {"content": text} if row["status"] == "queued" else None  # else: it has moved on

            self.set_status(job["id"], still_queued, self.settings.position_edit_interval_s, job=job)

    # --- Discord I/O -------------------------------------------------------------------------
    async def channel_for(self, channel_id: int) -> discord.abc.Messageable:
        channel = self.get_channel(channel_id)
        if channel is None:
            channel = await self.fetch_channel(channel_id)
        return channel  # type: ignore[return-value]

    def set_status(
        self,
        job_id: int,
        fields: StatusFields | dict[str, Any],
        min_interval: float = 0.0,
        final: bool = False,
        job: dict[str, Any] | None = None,
    ) -> None:
        """Queue an edit of the job's status message (coalesced, beside the GPU). `fields` may be a
        function of the job's row at the moment the edit goes out, returning None to skip it.
        `final`: the edit that links the posted result; recorded once it lands, so a restart that
        finds it missing sends it again. `job`: its row where the caller has just read it (position
        edits: no second read per waiting job)."""
        job = job or self.store.job(job_id)
        if job is None or not job.get("channel_id"):
            return

        async def write() -> None:
            row = self.store.job(job_id)
            if row is None:
                return
            values = await fields(row) if callable(fields) else dict(fields)
            if values is not None:
                await self.write_status(row, values)
                if final:
                    self.store.update_job(job_id, status_final=1)

        self.outbox.edit(job["channel_id"], ("status", job_id), write, min_interval)

    async def write_status(self, job: dict[str, Any], fields: dict[str, Any]) -> None:
        """Edit the job's status message now; where it has none (a failed announce, a crash before
        it was recorded) or it was deleted, send one, with a nonce so a retry does not double it."""
        fields.setdefault("allowed_mentions", NO_MENTIONS)
        channel = await self.channel_for(job["channel_id"])
        if job.get("status_message_id"):
            try:
                await channel.get_partial_message(job["status_message_id"]).edit(**fields)  # type: ignore[attr-defined]
                return
            except discord.NotFound:
                log.info("status message of job %s is gone; sending a new one", job["id"])
        sends = job.get("status_sends") or 0
        message = await channel.send(
            fields["content"],
            files=fields.get("attachments") or [],
            allowed_mentions=fields["allowed_mentions"],
            nonce=status_nonce(job["id"], sends),
        )
        self.store.update_job(job["id"], status_message_id=message.id, status_sends=sends + 1)

    def finish_status_messages(self) -> None:
        """Posted results whose status message never got its final edit (the bot stopped with the
        edit still queued): send it now, so no member is left reading "posting..."."""
        rows = self.store.status_edits_owed()

        async def final_fields(row: dict[str, Any]) -> dict[str, Any]:
            channel = await self.channel_for(row["channel_id"])
            url = channel.get_partial_message(row["result_message_id"]).jump_url  # type: ignore[attr-defined]
            return {"content": render.finished(row, url), "attachments": []}

        for job in rows:
            self.set_status(job["id"], final_fields, final=True)

    async def post_pending_results(self) -> None:
        """Results not yet posted: never tried, interrupted mid-post, or refused and due again."""
        rows = self.store.results_due(self.clock())
        for job in rows:
            self.spawn(self.post_result(job["id"]))

    async def post_result(self, job_id: int) -> str:
        """Post a finished job's GIF with its reactions; returns the job's post state afterwards.
        One job's retries (1+3+9 s by default) wait only for that job: each attempt holds a slot of
        its channel's bound, never one lock for every result."""
        if job_id in self._posting:
            return "busy"
        self._posting.add(job_id)
        try:
            return await self._post_result(job_id)
        finally:
            self._posting.discard(job_id)

    async def _post_result(self, job_id: int) -> str:
        job = self.store.job(job_id)
        if job is None or job["status"] != "done" or job["kind"] != "animate" or not job.get("channel_id"):
            return "none"
        state = post_state(job)
        if state in ("posted", "failed"):
            return state
        try:
            channel = await self.channel_for(job["channel_id"])
            if state == "sending":  # a send may have reached Discord before a crash
                earlier = await self._find_result(channel, job_id)
                if earlier is not None:
                    self._record_posted(job, earlier)
                    return "posted"
        except discord.HTTPException as exc:
            return self._post_not_taken(job, exc)
        guild = getattr(channel, "guild", None)
        limit = min(self.settings.upload_limit_bytes, guild.filesize_limit if guild else 1 << 62)
        frames = self.store.frames(job_id)
        try:
            files, fitted = await asyncio.to_thread(_fit_result, self.settings, job, frames, limit)
        except (EmakiError, OSError) as exc:  # OSError: frames gone (purged, deleted by hand) since it rendered
            reason = purged_reason(job) or (str(exc) if isinstance(exc, EmakiError) else f"its files are gone ({exc})")
            self.store.update_job(job_id, posted=-1, post_state="failed", error=reason, post_error=reason)
            self.set_status(job_id, {"content": render.failed(job, reason), "attachments": []})
            return "failed"
        content = render.result(job, frames, fitted)
        nonce = result_nonce(job_id, job.get("post_generation") or 0)
        self.store.update_job(job_id, post_state="sending")  # from here a crash may leave a post behind
        error: discord.HTTPException | None = None
        for delay in (0.0, *self.post_retry_delays):
            if delay:
                await asyncio.sleep(delay)
            try:
                async with self.outbox.slot(job["channel_id"]):
                    message = await channel.send(
                        content,
                        files=[discord.File(io.BytesIO(data), filename=name) for name, data in files],
                        allowed_mentions=only(job["owner_id"]),
                        nonce=nonce,  # the same on every retry and restart: Discord keeps one post
                        view=result_view(job),  # Reroll, redo, Delete, Details, MP4 (bot/buttons.py)
                    )
            except discord.HTTPException as exc:
                if not retryable(exc):
                    return self._post_not_taken(job, exc)
                log.warning("posting job %s failed with %s; retrying", job_id, exc.status)
                error = exc
                continue
            self._record_posted(job, message)
            return "posted"
        assert error is not None
        return self._post_not_taken(job, error)

    def _record_posted(self, job: dict[str, Any], message: discord.Message) -> None:
        self.store.update_job(
            job["id"], posted=1, post_state="posted", result_message_id=message.id, post_error=None, next_post_at=None
        )
        self.spawn(self._decorate(job, message))

    async def _decorate(self, job: dict[str, Any], message: discord.Message) -> None:
        """The reactions members use, and the status message's link to the result. Both only help:
        the result is posted and recorded whatever happens here."""
        self.set_status(job["id"], {"content": render.finished(job, message.jump_url), "attachments": []}, final=True)
        n_frames = min(job["params"]["frames"], len(render.DIGITS))
        try:
            for emoji in (render.REROLL, *render.DIGITS[:n_frames], render.DELETE):
                async with self.outbox.slot(job["channel_id"]):
                    await message.add_reaction(emoji)
        except discord.HTTPException as exc:
            log.warning("adding reactions to the result of job %s failed: %s", job["id"], exc.status)

    async def _find_result(self, channel: discord.abc.Messageable, job_id: int) -> discord.Message | None:
        """The result of a send interrupted before it was recorded, if it reached the channel."""
        assert self.user is not None
        names = {result_filename(job_id), result_filename(job_id, ".mp4")}
        async for message in channel.history(limit=100):
            if message.author.id == self.user.id and any(a.filename in names for a in message.attachments):
                return message
        return None

    def _post_not_taken(self, job: dict[str, Any], exc: discord.HTTPException) -> str:
        """Discord did not take the result: keep it, tell the member, and try again later."""
        attempts = (job.get("post_attempts") or 0) + 1
        reason = describe_http_error(exc)
        if retryable(exc):
            state, delay = "pending", UNANSWERED_RETRY_S
        else:
            state, delay = "refused", REFUSED_RETRY_S[min(attempts, len(REFUSED_RETRY_S)) - 1]
        log.warning("result of job %s not posted (%s): %s", job["id"], state, reason)
        self.store.update_job(
            job["id"],
            posted=-1 if state == "refused" else 0,
            post_state=state,
            post_error=reason,
            post_attempts=attempts,
            next_post_at=self.clock() + delay,
        )
        self.set_status(job["id"], {"content": render.post_waiting(job, reason, state), "attachments": []})
        return state

    async def repost(self, job_id: int, channel_id: int | None = None) -> str:
        """An admin's repost: now, with a new nonce (the old post may have been deleted), optionally
        into another channel."""
        job = self.store.job(job_id)
        if job is None or job["kind"] != "animate" or job["status"] != "done":
            raise InvalidRequest(f"job #{job_id} has no finished animation to post")
        purged = purged_reason(job)
        if purged:
            raise InvalidRequest(purged)
        if post_state(job) == "posted" and job.get("result_message_id"):
            raise InvalidRequest(f"job #{job_id} is already posted; delete the post with ❌ first to post it again")
        fields: dict[str, Any] = {
            "post_state": "pending",
            "posted": 0,
            "next_post_at": None,
            "post_generation": (job.get("post_generation") or 0) + 1,
        }
        if channel_id is not None:
            fields["channel_id"] = channel_id
        self.store.update_job(job_id, **fields)
        return await self.post_result(job_id)

    async def announce(self, job_id: int) -> None:
        """For jobs started from a reaction or a moderator's approval: the queue runs the job whether
        or not Discord takes the message; the message is sent beside it (and re-sent later if it
        fails, see show_positions)."""
        self.queue.kick()
        self.show_positions()


def result_filename(job_id: int, suffix: str = ".gif") -> str:
    return f"emaki-{job_id}{suffix}"


def describe_http_error(exc: discord.HTTPException) -> str:
    text = (exc.text or "").strip() or getattr(exc.response, "reason", "") or "error"
    return f"{exc.status} {render.clip(text, 200)}"


def _fit_result(
    settings: Settings, job: dict[str, Any], frames: list[dict[str, Any]], limit: int
) -> tuple[list[tuple[str, bytes]], dict[str, float]]:
    """The files to post (name, bytes) and how they were fitted under `limit` (this channel's upload cap).
    Blocking (encoders): call it in a thread."""
    if job["params"].get("motion") == "video":
        return _fit_video_result(settings, job, frames, limit)
    images, frame_ms = clip_images(settings, job, frames)  # in-betweens included
    data, fitted = fit_to_bytes(images, limit, frame_ms)
    return [(result_filename(job["id"]), data)], fitted


def _fit_video_result(
    settings: Settings, job: dict[str, Any], frames: list[dict[str, Any]], limit: int
) -> tuple[list[tuple[str, bytes]], dict[str, float]]:
    """Video mode posts the MP4 the worker fitted under the operator's cap, fitted again (fit_mp4) where this
    server's own limit is lower, and the GIF beside it only when both fit together: Discord counts every file
    of a message against the limit, and the MP4 is the result."""
    folder = job_dir(settings, job["id"])
    mp4 = (folder / MP4_FILE).read_bytes()
    recorded = job_record(settings, job["id"], METRICS_FILE)
    fitted: dict[str, float] = {"scale": recorded.get("mp4_scale", 1.0), "kbps": recorded.get("mp4_kbps", 0)}
    if len(mp4) > limit:
        images, _ = clip_images(settings, job, frames)
        mp4, fitted = fit_mp4(images, job["params"]["video_fps"], limit)
    files = [(result_filename(job["id"], ".mp4"), mp4)]
    gif = Path(job.get("gif_path") or folder / "animation.gif").read_bytes()
    if len(mp4) + len(gif) <= limit:
        files.append((result_filename(job["id"]), gif))
    else:
        fitted = {**fitted, "gif_left_out": 1.0}
    return files, fitted


def create_bot(
    settings: Settings | None = None, *, models: Models | None = None, renderers: Renderers | None = None
) -> EmakiBot:
    """The bot, with settings from the environment when none are given. `models` lets a process
    that already holds warm models (tests, a restart in-process) hand them over; `renderers` a pool
    of renderers already started (tests: one Ray pool for the whole session)."""
    settings = settings or load_settings()
    use_endpoints(settings)  # a REST proxy / gateway in front of Discord, when set
    return EmakiBot(settings, models=models, renderers=renderers)
