"""Turns one job's engine events into edits of its status message, throttled for rate limits."""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Any

import discord
from PIL import Image

from bot import render
from engine.events import Event, Failed, Finished, FrameDone, Started, StoryReady
from engine.media import contact_sheet, png_bytes

if TYPE_CHECKING:
    from bot.client import EmakiBot

log = logging.getLogger(__name__)


class ProgressReporter:
    def __init__(self, bot: EmakiBot, job_id: int) -> None:
        self.bot = bot
        self.job_id = job_id
        self.prompts: list[str] = []
        self.images: list[Image.Image] = []
        self.last_edit = float("-inf")

    @property
    def job(self) -> dict[str, Any]:
        job = self.bot.store.job(self.job_id)
        assert job is not None
        return job

    async def handle(self, event: Event) -> None:
        if isinstance(event, Started):
            await self._edit(render.progress(self.job, [], 0), force=True)
        elif isinstance(event, StoryReady):
            self.prompts = event.frames
            await self._edit(render.progress(self.job, self.prompts, 0))
        elif isinstance(event, FrameDone):
            self.images.append(event.image)
            await self._edit(render.progress(self.job, self.prompts, len(self.images)), sheet=True)
        elif isinstance(event, Finished):
            await self._edit(render.finished(self.job, None), sheet=True, force=True)
        elif isinstance(event, Failed):
            await self._edit(render.failed(self.job, event.reason), force=True)

    async def _edit(self, content: str, sheet: bool = False, force: bool = False) -> None:
        """Edit the status message at most once per interval; transitions that end a stage force it.
        A skipped edit loses nothing: the next one carries the latest state, and the end is forced."""
        loop_time = self.bot.loop.time()
        if not force and loop_time - self.last_edit < self.bot.settings.progress_edit_interval_s:
            return
        self.last_edit = loop_time
        attachments: list[discord.File] = []
        if sheet and self.images:
            image = contact_sheet(self.images, total=self.job["params"]["frames"])
            attachments = [discord.File(io.BytesIO(png_bytes(image)), filename="progress.png")]
        await self.bot.edit_status(self.job, content=content, attachments=attachments)
