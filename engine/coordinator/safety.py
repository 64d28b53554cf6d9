"""The Stable Diffusion safety checker, loaded once and asked about finished frames.

`sd15` uses `CompVis/stable-diffusion-safety-checker` (diffusers' `StableDiffusionSafetyChecker`, the
model the SD1.5 pipeline ships with) and the CLIP image processor from the same repo (`EMAKI_SAFETY_MODEL`);
`emaki models pull` fetches it and loading never downloads. `tiny` is the same class over a tiny CLIP with
seeded random weights, saved in emaki's tiny cache; its concept thresholds are a parameter, so a test can
place them and know which frames are flagged. The decision rule is the
model's own (a frame is flagged when any concept's cosine score exceeds its threshold); we only read
the verdicts instead of letting the pipeline black out frames silently.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image

from engine.errors import EmakiError

if TYPE_CHECKING:
    from engine.coordinator.store import Store
    from engine.render.models import Models
    from engine.settings import Settings

log = logging.getLogger(__name__)

# What the member reads: neutral, and true (the frames are gone, nothing was posted).
FLAGGED_REASON = (
    "the content safety checker flagged a frame, so nothing was posted and the frames were deleted; "
    "try another prompt or seed"
)


class ContentFlagged(EmakiError):
    """A frame did not pass the safety checker: the job ends and its files are gone."""


class SafetyChecker:
    def __init__(
        self, model: Any, processor: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.model = model.to(device, dtype)
        self.processor = processor
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def load(cls, settings: Settings, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
        """The configured checker (`safety_model`: a hub id in the cache, a folder, or `tiny`) through the
        loader every model uses: never downloads, a missing one is one line naming `emaki models pull`."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        from engine.render.loading import load_complete, load_model
        from engine.render.model_files import safety_spec

        spec = safety_spec(settings)
        model = load_complete(spec, StableDiffusionSafetyChecker.from_pretrained).eval()
        processor = load_model(spec, CLIPImageProcessor.from_pretrained)
        if settings.is_tiny:  # random weights: the concept thresholds are a parameter tests place
            with torch.no_grad():
                model.concept_embeds_weights.fill_(settings.safety_tiny_threshold)
        return cls(model, processor, device=device, dtype=dtype)

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
        return inputs.pixel_values.to(self.device, self.dtype)

    @torch.no_grad()
    def concept_scores(self, images: list[Image.Image]) -> list[float]:
        """Per image, the highest concept score minus its threshold: > 0 means flagged."""
        pooled = self.model.vision_model(self._pixels(images))[1]
        embeds = torch.nn.functional.normalize(self.model.visual_projection(pooled), dim=-1)
        concepts = torch.nn.functional.normalize(self.model.concept_embeds, dim=-1)
        scores = embeds @ concepts.T - self.model.concept_embeds_weights
        return [float(s) for s in scores.float().max(dim=1).values]

    @torch.no_grad()
    def flagged(self, images: list[Image.Image]) -> list[bool]:
        """The model's own verdict per image (its forward pass, as the SD pipeline calls it)."""
        placeholders = [np.zeros((1, 1, 3)) for _ in images]
        _, verdicts = self.model(clip_input=self._pixels(images), images=placeholders)
        return [bool(v) for v in verdicts]


# --- screening a job's frames (the engine's side) ------------------------------------------------
_checkers: dict[tuple[Any, ...], SafetyChecker] = {}
_loading = threading.Lock()


def checker_for(
    settings: Settings, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> SafetyChecker:
    """The process's checker for these settings, loaded the first time a frame needs it (never for
    jobs that are not screened) and kept: one copy however many jobs and engines ask."""
    threshold = settings.safety_tiny_threshold if settings.is_tiny else None
    key = (settings.safety_model, str(device), dtype, threshold)
    with _loading:
        if key not in _checkers:
            # A missing checker is a ModelLoadError line naming `emaki models pull`: the job fails closed
            # (nothing unscreened is posted), and the bot checks for it at start-up (`require`).
            _checkers[key] = SafetyChecker.load(settings, device, dtype)
            log.info("safety checker %s ready on %s", settings.safety_model, device)
        return _checkers[key]


def require(settings: Settings) -> None:
    """The checker is on disk (files only, nothing loaded): what the bot asks before it accepts any job."""
    from engine.render import model_files

    model_files.resolve(model_files.safety_spec(settings))


def image_passes(settings: Settings, models: Models, image: Image.Image) -> bool:
    """The checker's verdict on one image, on the models' device (call it from the GPU thread)."""
    return not checker_for(settings, models.device, models.dtype).flagged([image])[0]


def screens(store: Store, settings: Settings, job: dict[str, Any]) -> bool:
    """Whether a job's frames pass the checker: the decision recorded when the job was created (the bot
    records one for every job it makes). A regeneration made without one follows its parent; a job with
    neither (the command line) follows `safety_cli`."""
    seen: set[int] = set()
    row: dict[str, Any] | None = job
    while row is not None and row["id"] not in seen:
        if row.get("screen") is not None:
            return bool(row["screen"])
        seen.add(row["id"])
        parent = row.get("parent_job_id")
        row = store.job(parent) if parent is not None else None
    return settings.safety_cli


class Screening(Protocol):
    """What screening a frame needs of the engine (engine/coordinator/worker.py's Engine has it): named here
    so this module does not import the worker that calls it."""

    store: Store
    settings: Settings
    models: Models

    def job_dir(self, job_id: int) -> Path: ...


def screen_frame(engine: Screening, job: dict[str, Any], image: Image.Image) -> None:
    """Called by the engine for each newly rendered frame, before anything (a progress thumbnail
    included) can show it. A flagged frame ends the job: the job's folder (its earlier frames too)
    is deleted and ContentFlagged is raised, which the engine records as the job's failure."""
    if not screens(engine.store, engine.settings, job) or image_passes(engine.settings, engine.models, image):
        return
    folder = Path(engine.job_dir(job["id"]))
    log.warning("job %s: a frame was flagged by the safety checker; deleting %s", job["id"], folder)
    shutil.rmtree(folder, ignore_errors=True)
    raise ContentFlagged(FLAGGED_REASON)
