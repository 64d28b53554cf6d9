"""/train in Discord: attachment -> validated dataset -> preview -> moderator ✅/❌ -> a training job
on the same GPU queue (giving way to animations at checkpoints) -> the style, evaluated, in /animate."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from PIL import Image

from bot import render
from bot.outbox import NO_MENTIONS, only, preview_nonce
from engine.errors import EmakiError, InvalidRequest, JobCancelled
from engine.media import contact_sheet, png_bytes
from engine.store import now
from training.dataset import DatasetError, check_style_name, load_dataset
from training.lora import TrainConfig, TrainProgress
from training.service import evaluate_style, prepare_dataset, train_style

if TYPE_CHECKING:
    from bot.client import EmakiBot

log = logging.getLogger(__name__)
MAX_STEPS = 20000


def is_moderator(bot: EmakiBot, member: discord.Member | None, channel: Any) -> bool:
    if member is None:
        return False
    if channel.permissions_for(member).manage_guild:
        return True
    role = bot.settings.moderator_role
    return bool(role) and any(r.name == role or str(r.id) == role for r in member.roles)


def _training_steps(bot: EmakiBot, row: dict[str, Any]) -> int:
    """The steps the training will run (the default depends on the dataset size)."""
    return TrainConfig(**json.loads(row["params"] or "{}")).resolved(row["n_images"], bot.settings).steps


def _sheet(ds: Any) -> bytes:
    return png_bytes(contact_sheet([Image.open(item.path).convert("RGB") for item in ds.items[:10]], tile=128))


def register(bot: EmakiBot) -> None:
    @bot.tree.command(name="train", description="Submit a captioned image dataset (zip) to train a community style")
    @app_commands.guild_only()
    @app_commands.describe(
        name="Name of the new style (a-z, 0-9, - and _)",
        dataset="A .zip of images with metadata.csv (file_name,caption)",
        trigger="A word that will call up the style in prompts",
        steps="Training steps (default: from the dataset size)",
    )
    async def train(
        interaction: discord.Interaction,
        name: str,
        dataset: discord.Attachment,
        trigger: str | None = None,
        steps: int | None = None,
    ) -> None:
        assert interaction.guild is not None and interaction.channel is not None
        settings = bot.settings
        try:
            style = check_style_name(name, bot.store)
            if not dataset.filename.lower().endswith(".zip"):
                raise DatasetError(f"{dataset.filename}: attach a .zip of images with a metadata.csv")
            if dataset.size > settings.max_dataset_bytes:
                raise DatasetError(
                    f"{dataset.filename}: {dataset.size // 2**20} MiB; the limit is "
                    f"{settings.max_dataset_bytes // 2**20} MiB"
                )
            if steps is not None and not 1 <= steps <= MAX_STEPS:
                raise InvalidRequest(f"steps must be between 1 and {MAX_STEPS} (got {steps})")
        except EmakiError as exc:
            await interaction.response.send_message(f"⚠️ {exc}", ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        uploads = settings.data_dir / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        upload = uploads / f"{interaction.id}.zip"
        try:
            await dataset.save(upload)
            dataset_id, ds = await asyncio.to_thread(
                prepare_dataset,
                settings,
                bot.store,
                upload,
                style,
                trigger or "",
                False,
                "pending",
                TrainConfig(steps=steps or 0, checkpoint_every=settings.train_checkpoint_every),
                owner_id=interaction.user.id,
                guild_id=interaction.guild.id,
                channel_id=interaction.channel.id,
            )
        except EmakiError as exc:
            await interaction.followup.send(f"⚠️ {exc}", ephemeral=True)
            return
        finally:
            upload.unlink(missing_ok=True)
        # The dataset row exists: from here on nothing the member sent can be lost.
        posted = await post_preview(bot, dataset_id, ds)
        note = "" if posted else " The preview could not be posted in the channel yet; it is retried every minute."
        await interaction.followup.send(
            f"Dataset for **{style}** received: {len(ds.items)} images. A moderator will review it.{note}",
            ephemeral=True,
            allowed_mentions=NO_MENTIONS,
        )

    async def on_raw_reaction_add(payload: discord.RawReactionActionEvent) -> None:
        if bot.user is None or payload.user_id == bot.user.id:
            return
        if payload.member is not None and payload.member.bot:
            return
        rows = bot.store.datasets_where("preview_message_id = ? and status = 'pending'", [payload.message_id])
        emoji = str(payload.emoji)
        if not rows or emoji not in (render.APPROVE, render.DELETE):
            return
        channel = await bot.channel_for(payload.channel_id)
        if not is_moderator(bot, payload.member, channel):
            return  # only moderators decide; others' reactions change nothing
        row = rows[0]
        approved = emoji == render.APPROVE
        bot.store.update_dataset(row["id"], status="approved" if approved else "rejected")
        with contextlib.suppress(discord.HTTPException):  # the decision is already stored
            preview = await channel.fetch_message(payload.message_id)  # type: ignore[attr-defined]
            await preview.edit(
                content=render.dataset_decided(preview.content, approved, payload.user_id),
                allowed_mentions=NO_MENTIONS,
            )
        if approved:
            job_id = bot.store.add_job(
                kind="train",
                idea=f"train style {row['style_name']}",
                owner_id=row["owner_id"],
                guild_id=row["guild_id"],
                channel_id=row["channel_id"],
                params={"dataset_id": row["id"], "style": row["style_name"]},
            )
            await bot.announce(job_id)

    bot.add_listener(on_raw_reaction_add)


async def post_preview(bot: EmakiBot, dataset_id: int, ds: Any | None = None) -> bool:
    """Post a pending dataset's preview for moderators. False (and logged) if Discord did not take
    it: the dataset stays pending and the sweep posts the preview later. The nonce keeps a retry
    from doubling it."""
    row = bot.store.dataset(dataset_id)
    if row is None or row.get("preview_message_id") or row["status"] != "pending":
        return True
    try:
        if ds is None:
            ds = await asyncio.to_thread(load_dataset, Path(row["path"]), bot.settings)
        sheet = await asyncio.to_thread(_sheet, ds)
        channel = await bot.channel_for(row["channel_id"])
        async with bot.outbox.slot(row["channel_id"]):
            preview = await channel.send(
                render.dataset_preview(row, ds.captions, _training_steps(bot, row)),
                file=discord.File(io.BytesIO(sheet), filename="dataset.png"),
                allowed_mentions=NO_MENTIONS,
                nonce=preview_nonce(dataset_id),
            )
    except (discord.HTTPException, EmakiError) as exc:
        log.warning("posting the preview of dataset %s failed: %s", dataset_id, exc)
        return False
    bot.store.update_dataset(dataset_id, preview_message_id=preview.id)
    try:
        for emoji in (render.APPROVE, render.DELETE):
            await preview.add_reaction(emoji)
    except discord.HTTPException as exc:  # moderators can add ✅/❌ themselves
        log.warning("adding reactions to the preview of dataset %s failed: %s", dataset_id, exc.status)
    return True


async def post_pending_previews(bot: EmakiBot) -> None:
    for row in bot.store.datasets_where("status = 'pending' and preview_message_id is null", []):
        await post_preview(bot, row["id"])


class TrainReporter:
    """Throttled status edits: step and loss; a sample image at each checkpoint."""

    def __init__(self, bot: EmakiBot, job: dict[str, Any]) -> None:
        self.bot = bot
        self.job = job
        self.last_edit = float("-inf")
        self.sample: bytes | None = None

    def step(self, progress: TrainProgress) -> None:
        if self.bot.loop.time() - self.last_edit >= self.bot.settings.progress_edit_interval_s:
            self.post(f"Training: step {progress.step}/{progress.total} · loss {progress.loss:.4f}")

    def checkpoint(self, step: int, image: Image.Image) -> None:
        self.sample = png_bytes(image)
        self.post(f"Training: step {step} · checkpoint saved; a sample so far:")

    def post(self, state: str) -> None:
        self.last_edit = self.bot.loop.time()
        sample = self.sample
        content = render.training(self.job, state)

        async def fields(row: dict[str, Any]) -> dict[str, Any]:
            files = [discord.File(io.BytesIO(sample), filename="sample.png")] if sample else []
            return {"content": content, "attachments": files}

        self.bot.set_status(self.job["id"], fields)


async def run_train_job(bot: EmakiBot, job_id: int, cancel: threading.Event) -> None:
    job = bot.store.job(job_id)
    assert job is not None
    loop = asyncio.get_running_loop()
    reporter = TrainReporter(bot, job)
    bot.store.update_job(job_id, status="running", started_at=now(), error=None)
    reporter.post("Training: loading the base model and encoding the dataset…")

    def work() -> Any:
        return train_style(
            bot.settings,
            bot.store,
            job["params"]["dataset_id"],
            on_step=lambda p: loop.call_soon_threadsafe(reporter.step, p),
            should_yield=bot.queue.animations_waiting,
            on_checkpoint=lambda step, image: loop.call_soon_threadsafe(reporter.checkpoint, step, image),
            should_stop=cancel.is_set,
        )

    try:
        result = await loop.run_in_executor(bot.gpu, work)
    except JobCancelled:
        bot.store.update_job(job_id, status="cancelled", finished_at=now(), error="cancelled")
        reporter.post("🛑 Cancelled.")
        return
    except EmakiError as exc:
        bot.store.update_job(job_id, status="failed", finished_at=now(), error=str(exc))
        bot.store.update_dataset(job["params"]["dataset_id"], status="failed")
        reporter.post(f"⚠️ Failed: {exc}")
        return
    if not result.finished:
        bot.store.update_job(job_id, status="queued")  # resumes from its checkpoint after the animations
        reporter.post(f"⏸️ Paused at step {result.step} to let waiting animations through; it continues after them.")
        return
    metrics, note = None, ""
    try:
        samples = min(bot.settings.eval_samples, 100)
        metrics = await loop.run_in_executor(
            bot.gpu,
            lambda: evaluate_style(bot.settings, bot.store, bot.engine.models, job["params"]["style"], samples=samples),
        )
    except EmakiError as exc:
        note = f"(not evaluated: {exc})"
    bot.store.update_job(job_id, status="done", finished_at=now(), posted=1)
    reporter.post(f"✅ Trained in {result.step} steps.")
    try:
        channel = await bot.channel_for(job["channel_id"])
        await channel.send(render.style_ready(job, metrics, note), allowed_mentions=only(job["owner_id"]))
    except discord.HTTPException as exc:
        log.warning("announcing style %s failed: %s", job["params"]["style"], exc.status)
