"""Turns one job's engine events into edits of its status message. `handle` never waits for
Discord: it queues the newest state in the bot's outbox, which edits at most once per interval and
skips states that a newer one replaced before they went out. Stage ends are queued without delay."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import TYPE_CHECKING, Any

import discord
from PIL import Image

from bot import render
from engine.coordinator.safety import FLAGGED_REASON
from engine.events import Event, Failed, Finished, FrameDone, Started, StepProgress, StoryReady
from engine.render.media import contact_sheet, png_bytes

if TYPE_CHECKING:
    from bot.state import Host

log = logging.getLogger(__name__)


class ProgressReporter:
    def __init__(self, bot: Host, job_id: int) -> None:
        self.bot = bot
        self.job_id = job_id
        self.prompts: list[str] = []
        self.images: list[Image.Image] = []
        job = bot.store.job(job_id)
        # Video mode: the video model's steps come as frame N's (one past the last keyframe), after every
        # keyframe is done; the status message shows them as the clip's stage. No other step is shown.
        self.video_stage = job["params"]["frames"] if job and job["params"].get("motion") == "video" else None

    def shows_step(self, progress: StepProgress) -> bool:
        """The steps this reporter shows (called on the render thread: reads nothing)."""
        return self.video_stage is not None and progress.frame_index == self.video_stage

    @property
    def job(self) -> dict[str, Any]:
        job = self.bot.store.job(self.job_id)
        assert job is not None
        return job

    def handle(self, event: Event) -> None:
        if isinstance(event, Started):
            self._show(render.progress(self.job, [], 0), force=True)
        elif isinstance(event, StoryReady):
            self.prompts = event.frames
            self._show(render.progress(self.job, self.prompts, 0))
        elif isinstance(event, StepProgress) and self.shows_step(event):
            text = render.progress(self.job, self.prompts, len(self.images), clip_step=(event.step, event.total_steps))
            self._show(text, sheet=True)
        elif isinstance(event, FrameDone):
            self.images.append(event.image)
            self._show(render.progress(self.job, self.prompts, len(self.images)), sheet=True)
        elif isinstance(event, Finished):
            self._show(render.finished(self.job, None), sheet=True, force=True)
        elif isinstance(event, Failed):
            reason = event.reason
            # A flagged job is the member's business: told privately where their interaction still
            # answers, the channel reads only that nothing was posted.
            if reason == FLAGGED_REASON and self.bot.tell_privately(self.job_id, reason):
                reason = "not posted (the requester was told why, privately)"
            self._show(render.failed(self.job, reason), force=True)

    def _show(self, content: str, sheet: bool = False, force: bool = False) -> None:
        images = list(self.images) if sheet else []
        total = self.job["params"]["frames"]

        async def fields(row: dict[str, Any]) -> dict[str, Any]:
            attachments: list[discord.File] = []
            if images:  # built only for the edit that goes out, off the event loop
                png = await asyncio.to_thread(lambda: png_bytes(contact_sheet(images, total=total)))
                attachments = [discord.File(io.BytesIO(png), filename="progress.png")]
            return {"content": content, "attachments": attachments}

        self.bot.set_status(self.job_id, fields, 0.0 if force else self.bot.settings.progress_edit_interval_s)
