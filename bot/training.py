"""/train in Discord: attachment -> validated dataset -> preview -> moderator ✅/❌ -> a training job
on the same GPU queue (giving way to animations at checkpoints) -> the style, evaluated, in /animate."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from discord import app_commands
from discord.ext.commands import Cog
from discord.http import HTTPClient
from PIL import Image

from bot import guild_settings as server_rules
from bot import render
from bot.guild_settings import is_moderator
from bot.outbox import NO_MENTIONS, only, preview_nonce
from engine.coordinator.guild_settings import must_screen
from engine.coordinator.safety import image_passes, screens
from engine.coordinator.store import now
from engine.coordinator.worker import MAX_WORKER_LOSSES
from engine.errors import EmakiError, InvalidRequest, JobCancelled
from engine.render.media import contact_sheet, png_bytes
from engine.render.renderer import WorkerLost
from training.dataset import DatasetError, check_style_name, load_dataset, style_name
from training.lora import ADAPTERS, SAMPLE_NAME, TrainConfig, TrainProgress
from training.presets import PRESETS, preset_config
from training.service import evaluate_style, prepare_dataset, train_style

if TYPE_CHECKING:
    from bot.state import Host
    from engine.settings import Settings


def name_for_server(bot: Host, name: str, guild_id: int | None) -> str:
    """check_style_name, in words that do not confirm another server's private style or dataset:
    style names are global (one folder each), so a name taken elsewhere is "not available"."""
    try:
        return check_style_name(name, bot.store)
    except DatasetError:
        taken = style_name(name)
        style = bot.store.style(taken)
        waiting = bot.store.datasets_where("style_name = ? and status in ('pending', 'approved')", [taken])
        if (style is not None and style.get("guild_id") not in (None, guild_id)) or any(
            row.get("guild_id") != guild_id for row in waiting
        ):
            raise DatasetError(f"the style name '{taken}' is not available: choose another name") from None
        raise


log = logging.getLogger(__name__)
MAX_STEPS = 20000


def _training_steps(bot: Host, row: dict[str, Any]) -> int:
    """The steps the training will run (the default depends on the dataset size)."""
    return TrainConfig(**json.loads(row["params"] or "{}")).resolved(row["n_images"], bot.settings).steps


def _sheet(ds: Any) -> bytes:
    return png_bytes(contact_sheet([Image.open(item.path).convert("RGB") for item in ds.items[:10]], tile=128))


async def _answer(interaction: discord.Interaction, text: str) -> None:
    try:
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
    except discord.HTTPException as exc:  # an expired interaction: the outcome is in the store/channel
        log.warning("answering /train failed: %s", exc.status)


async def write_capped(chunks: AsyncIterator[bytes], path: Path, cap: int, name: str) -> int:
    """Write a download to `path`, stopping (and removing it) as soon as it passes `cap` bytes:
    the size an attachment declares is not trusted, and nothing is held in memory."""
    written = 0
    try:
        with path.open("wb") as sink:
            async for chunk in chunks:
                written += len(chunk)
                if written > cap:
                    raise DatasetError(f"{name}: larger than the limit of {cap // 2**20} MiB")
                sink.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return written


async def download(bot: Host, attachment: discord.Attachment, path: Path, cap: int) -> int:
    """Stream an attachment to disk with a cap. discord.py's own `Attachment.save` reads the whole
    file into memory first; here it arrives in 64 KiB chunks over the bot's HTTP session. A transport
    that replaces discord.py's CDN fetch (SimCord's simulated CDN) is asked through that fetch."""
    chunk = 1 << 16
    session = getattr(bot.http, "_HTTPClient__session", None)
    if type(bot.http).get_from_cdn is HTTPClient.get_from_cdn and isinstance(session, aiohttp.ClientSession):
        async with session.get(attachment.url, proxy=bot.http.proxy, proxy_auth=bot.http.proxy_auth) as resp:
            if resp.status != 200:
                raise DatasetError(f"{attachment.filename}: Discord did not hand over the file ({resp.status})")
            return await write_capped(resp.content.iter_chunked(chunk), path, cap, attachment.filename)

    async def from_transport() -> AsyncIterator[bytes]:
        data = await attachment.read()
        for start in range(0, len(data), chunk):
            yield data[start : start + chunk]

    return await write_capped(from_transport(), path, cap, attachment.filename)


def _clear_stale(bot: Host, style: str) -> None:
    """A rejected or failed submission of this name left its extracted files (and maybe training
    checkpoints): a new submission must start from its own upload, never from those."""
    from training.service import dataset_dir, style_dir

    for folder in (dataset_dir(bot.settings, style), style_dir(bot.settings, style)):
        if folder.exists() and folder.resolve().is_relative_to(bot.settings.data_dir.resolve()):
            shutil.rmtree(folder)


async def _receive(
    bot: Host,
    interaction: discord.Interaction,
    attachment: discord.Attachment,
    style: str,
    trigger: str,
    recipe: Callable[[int], TrainConfig],
) -> tuple[int, Any]:
    """Download, validate and store one submission; its files live only in its own folders."""
    assert interaction.guild is not None and interaction.channel is not None
    settings = bot.settings
    uploads = settings.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    upload = uploads / f"{interaction.id}.zip"
    try:
        await download(bot, attachment, upload, settings.max_dataset_bytes)
        await asyncio.to_thread(_clear_stale, bot, style)
        rules = server_rules.server(bot, interaction.guild.id)
        dataset_id, ds = await asyncio.to_thread(
            prepare_dataset,
            settings,
            bot.store,
            upload,
            style,
            trigger,
            False,
            "pending",
            recipe(1),
            owner_id=interaction.user.id,
            guild_id=interaction.guild.id,
            channel_id=interaction.channel.id,
        )
        blocked = server_rules.blocked_entry(rules, list(ds.captions))
        if blocked is not None:
            # Captions are known only once the zip is read: the row goes before anything else can see it
            # (no await in between), then the extracted files.
            bot.store.delete_dataset(dataset_id)
            await asyncio.to_thread(_clear_stale, bot, style)
            raise DatasetError(server_rules.blocked_message(blocked, "captions") + "; nothing was stored")
        # Some preset values (save every N epochs) depend on the image count, known only now.
        bot.store.update_dataset(dataset_id, params=json.dumps(asdict(recipe(len(ds.items)))))
        return dataset_id, ds
    finally:
        upload.unlink(missing_ok=True)


def _recipe(
    preset: str | None,
    adapter: str | None,
    steps: int | None,
    checkpoint_every: int,
    save_every: int | None = None,
    settings: Settings | None = None,
    notes: list[str] | None = None,
    family: str = "",
) -> Callable[[int], TrainConfig]:
    """The training config for a dataset of n images: the preset's values (some depend on n, sizes clamped
    to the profile's range with a line in `notes` saying so), then what the member chose."""
    overrides: dict[str, Any] = {"checkpoint_every": checkpoint_every}
    if steps:
        overrides["steps"] = steps
    if save_every:
        overrides["save_every"] = save_every
    if adapter:
        if adapter not in ADAPTERS:
            raise InvalidRequest(f"unknown adapter '{adapter}': use {', '.join(ADAPTERS)}")
        overrides["adapter"] = adapter

    def build(n_images: int) -> TrainConfig:
        said: list[str] = []
        config = preset_config(preset or "", overrides, n_images, settings, said, family)  # another family's: refused
        if notes is not None:
            notes.extend(line for line in said if line not in notes)
        return config

    return build


class StyleTraining(Cog):
    """/train, and the moderators' ✅/❌ on a dataset's preview."""

    def __init__(self, bot: Host) -> None:
        self.bot = bot

    @app_commands.command(name="train", description="Submit a captioned image dataset (zip) to train a community style")
    @app_commands.guild_only()
    @app_commands.describe(
        name="Name of the new style (a-z, 0-9, - and _)",
        dataset="A .zip of images with metadata.csv (file_name,caption)",
        trigger="A word that will call up the style in prompts",
        steps="Training steps (default: from the dataset size)",
        preset="A known recipe: ghibli-lora, anime-ia3-prodigy (SD1.5 bases); sdxl-lora/-loha/-lokr (SDXL bases)",
        adapter="Adapter kind (default: the preset's, else LoRA)",
        save_every="Keep the adapter and a sample every N steps, to pick a step later (default: only the end)",
    )
    @app_commands.choices(
        preset=[app_commands.Choice(name=p, value=p) for p in PRESETS],
        adapter=[app_commands.Choice(name=a, value=a) for a in ADAPTERS],
    )
    async def train(
        self,
        interaction: discord.Interaction,
        name: str,
        dataset: discord.Attachment,
        trigger: str | None = None,
        steps: int | None = None,
        preset: str | None = None,
        adapter: str | None = None,
        save_every: int | None = None,
    ) -> None:
        bot = self.bot
        assert interaction.guild is not None and interaction.channel is not None
        settings = bot.settings
        rules = server_rules.server(bot, interaction.guild.id)
        try:
            pointer = server_rules.channel_pointer(rules.train_channels, interaction.channel, "train")
            if pointer is not None:
                raise InvalidRequest(pointer)
            blocked = server_rules.blocked_entry(rules, [name, trigger or ""])
            if blocked is not None:
                raise InvalidRequest(server_rules.blocked_message(blocked, "style names and triggers"))
            style = name_for_server(bot, name, interaction.guild_id)
            if style in bot.train_names_in_check:  # another submission of this name is being checked
                raise DatasetError(f"a dataset for style '{style}' is being checked right now: choose another name")
            if not dataset.filename.lower().endswith(".zip"):
                raise DatasetError(f"{dataset.filename}: attach a .zip of images with a metadata.csv")
            if dataset.size > settings.max_dataset_bytes:
                raise DatasetError(
                    f"{dataset.filename}: {dataset.size // 2**20} MiB; the limit is "
                    f"{settings.max_dataset_bytes // 2**20} MiB"
                )
            if steps is not None and not 1 <= steps <= MAX_STEPS:
                raise InvalidRequest(f"steps must be between 1 and {MAX_STEPS} (got {steps})")
            if save_every is not None and not 1 <= save_every <= MAX_STEPS:
                raise InvalidRequest(f"save_every must be between 1 and {MAX_STEPS} (got {save_every})")
            notes: list[str] = []  # a preset's value the profile cannot take, and what it became
            family = bot.engine.models.family_name  # the running base's: a preset for another family is one line
            recipe = _recipe(
                preset, adapter, steps, settings.train_checkpoint_every, save_every, settings, notes, family
            )
            recipe(1)  # an unknown preset or adapter is refused before anything is downloaded
        except EmakiError as exc:
            await interaction.response.send_message(f"⚠️ {exc}", ephemeral=True, allowed_mentions=NO_MENTIONS)
            return
        # Claimed until the dataset row exists (or the submission fails): the store cannot yet say
        # that this name is taken, and two submissions must not share one dataset folder.
        bot.train_names_in_check.add(style)
        try:
            await interaction.response.defer(ephemeral=True, thinking=True)
            dataset_id, ds = await _receive(bot, interaction, dataset, style, trigger or "", recipe)
        except EmakiError as exc:
            await _answer(interaction, f"⚠️ {exc}")
            return
        except Exception:  # whatever broke, the member hears back instead of "thinking..." forever
            log.exception("receiving the dataset for style %s failed", style)
            await _answer(interaction, "⚠️ the dataset could not be read (an internal error); nothing was stored")
            return
        finally:
            bot.train_names_in_check.discard(style)
        # The dataset row exists: from here on nothing the member sent can be lost.
        posted = await post_preview(bot, dataset_id, ds)
        note = "" if posted else " The preview could not be posted in the channel yet; it is retried every minute."
        clamped = "".join(f"\n{line}" for line in notes)
        await _answer(
            interaction,
            f"Dataset for **{style}** received: {len(ds.items)} images. A moderator will review it.{note}{clamped}",
        )

    @Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        bot = self.bot
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
        if not approved:  # nothing of a rejected submission may reach a later one
            await asyncio.to_thread(_clear_stale, bot, row["style_name"])
        with contextlib.suppress(discord.HTTPException):  # the decision is already stored
            preview = await channel.fetch_message(payload.message_id)  # type: ignore[attr-defined]
            await preview.edit(
                content=render.dataset_decided(preview.content, approved, payload.user_id),
                allowed_mentions=NO_MENTIONS,
            )
        if approved:
            policy = server_rules.limits(bot, row["guild_id"]).nsfw_policy
            job_id = bot.store.add_job(
                kind="train",
                idea=f"train style {row['style_name']}",
                owner_id=row["owner_id"],
                guild_id=row["guild_id"],
                channel_id=row["channel_id"],
                screen=int(must_screen(server_rules.age_restricted(channel), policy)),  # its samples are posted
                params={"dataset_id": row["id"], "style": row["style_name"]},
            )
            await bot.announce(job_id)


async def post_preview(bot: Host, dataset_id: int, ds: Any | None = None) -> bool:
    """Post a pending dataset's preview for moderators. False (and logged) if Discord did not take
    it: the dataset stays pending and the sweep posts the preview later. The nonce keeps a retry
    from doubling it."""
    row = bot.store.dataset(dataset_id)
    if row is None or row.get("preview_message_id") or row["status"] != "pending":
        return True
    if dataset_id in bot.previewing:  # the submission itself or the sweep is already on it
        return True
    bot.previewing.add(dataset_id)
    try:
        return await _post_preview(bot, row, ds)
    finally:
        bot.previewing.discard(dataset_id)


async def _post_preview(bot: Host, row: dict[str, Any], ds: Any | None) -> bool:
    dataset_id = row["id"]
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


async def post_pending_previews(bot: Host) -> None:
    for row in bot.store.datasets_where("status = 'pending' and preview_message_id is null", []):
        await post_preview(bot, row["id"])


class TrainReporter:
    """Throttled status edits: step and loss; a sample image at each checkpoint."""

    def __init__(self, bot: Host, job: dict[str, Any]) -> None:
        self.bot = bot
        self.job = job
        self.last_edit = float("-inf")
        self.sample: bytes | None = None

    def step(self, progress: TrainProgress) -> None:
        if self.bot.loop.time() - self.last_edit >= self.bot.settings.progress_edit_interval_s:
            self.post(f"Training: step {progress.step}/{progress.total} · loss {progress.loss:.4f}")

    def checkpoint(self, step: int, image: Image.Image | None) -> None:
        """`image` None: the safety checker withheld the sample (the text still reports the step)."""
        self.sample = png_bytes(image) if image is not None else None
        shown = "a sample so far:" if image is not None else "its sample was withheld by the content safety checker"
        self.post(f"Training: step {step} · checkpoint saved; {shown}")

    def saved(self, step: int, folder: Path, sample_passes: bool = True) -> None:
        """A kept save (the trainer's --save-every): its fixed-prompt sample (unless the safety checker
        withheld it), and how to pick it."""
        sample = folder / SAMPLE_NAME
        self.sample = sample.read_bytes() if sample_passes and sample.is_file() else None
        run = self.job["params"]["style"]
        self.post(
            f"Training: step {step} · save kept; the admin can register it: emaki styles add NAME "
            f"--from-run {run} --step {step}"
        )

    def post(self, state: str) -> None:
        self.last_edit = self.bot.loop.time()
        sample = self.sample
        content = render.training(self.job, state)

        async def fields(row: dict[str, Any]) -> dict[str, Any]:
            files = [discord.File(io.BytesIO(sample), filename="sample.png")] if sample else []
            return {"content": content, "attachments": files}

        self.bot.set_status(self.job["id"], fields)


async def run_train_job(bot: Host, job_id: int, cancel: threading.Event) -> None:
    job = bot.store.job(job_id)
    assert job is not None
    loop = asyncio.get_running_loop()
    reporter = TrainReporter(bot, job)
    bot.store.update_job(job_id, status="running", started_at=now(), error=None)
    reporter.post("Training: loading the base model and encoding the dataset…")

    # Training samples are posted too: screened like frames, on the GPU thread, before they reach the loop.
    screening = screens(bot.store, bot.settings, job)

    def passes(image: Image.Image) -> bool:
        return not screening or image_passes(bot.settings, bot.engine.models, image)

    def save_passes(folder: Path) -> bool:
        sample = folder / SAMPLE_NAME
        if not sample.is_file():
            return True
        with Image.open(sample) as image:
            return passes(image.convert("RGB"))

    def work() -> Any:
        return train_style(
            bot.settings,
            bot.store,
            job["params"]["dataset_id"],
            on_step=lambda p: loop.call_soon_threadsafe(reporter.step, p),
            should_yield=bot.queue.animations_waiting,
            on_checkpoint=lambda step, image: loop.call_soon_threadsafe(
                reporter.checkpoint, step, image if passes(image) else None
            ),
            on_save=lambda step, folder: loop.call_soon_threadsafe(reporter.saved, step, folder, save_passes(folder)),
            should_stop=cancel.is_set,
            renderers=bot.engine.renderers,  # cluster mode: on a worker, beside the others' animations
        )

    try:
        result = await loop.run_in_executor(bot.gpu, work)
    except WorkerLost as exc:  # cluster mode: its worker died; not the dataset's fault, the first times
        losses = ((bot.store.job(job_id) or {}).get("worker_losses") or 0) + 1
        if cancel.is_set():
            bot.store.update_job(job_id, status="cancelled", finished_at=now(), error="cancelled")
            reporter.post("🛑 Cancelled.")
        elif losses >= MAX_WORKER_LOSSES:  # a worker that dies at every start must not loop for ever
            reason = f"its worker was lost {losses} times; the last: {exc}"
            bot.store.update_job(job_id, status="failed", finished_at=now(), error=reason, worker_losses=losses)
            bot.store.update_dataset(job["params"]["dataset_id"], status="failed")
            reporter.post(f"⚠️ Failed: {reason}")
        else:
            bot.store.update_job(job_id, status="queued", resume_first=1, worker_losses=losses)
            reporter.post("⏸️ The worker training this style was lost; it starts again from its last saved state.")
        return
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
