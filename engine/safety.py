"""The Stable Diffusion safety checker, loaded once and asked about finished frames.

`sd15` uses `CompVis/stable-diffusion-safety-checker` (diffusers' `StableDiffusionSafetyChecker`, the
model the SD1.5 pipeline ships with) and the CLIP image processor from the same repo. `tiny` builds
the same class from a tiny CLIP config with seeded random weights; its concept thresholds are
parameters, so a test can place them and know which frames are flagged. The decision rule is the
model's own (a frame is flagged when any concept's cosine score exceeds its threshold); we only read
the verdicts instead of letting the pipeline black out frames silently.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

SD_SAFETY_CHECKER = "CompVis/stable-diffusion-safety-checker"


def tiny_safety_checker(threshold: float = 0.0) -> tuple[Any, Any]:
    """A random-weight checker over a tiny CLIP vision tower, every concept threshold at `threshold`."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from engine.tiny import tiny_clip_config, tiny_clip_image_processor, tiny_tokenizer

    torch.manual_seed(4)
    config = tiny_clip_config(len(tiny_tokenizer()))
    model = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        model.concept_embeds.copy_(torch.randn(model.concept_embeds.shape))
        model.special_care_embeds.copy_(torch.randn(model.special_care_embeds.shape))
        model.concept_embeds_weights.fill_(threshold)
        model.special_care_embeds_weights.fill_(10.0)  # the 'special care' boost stays out of the tiny model
    return model, tiny_clip_image_processor()


class SafetyChecker:
    def __init__(self, model: Any, processor: Any, device: torch.device | str = "cpu") -> None:
        self.model = model.to(device)
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def load(cls, profile: str, device: torch.device | str = "cpu", token: str | None = None) -> SafetyChecker:
        if profile == "tiny":
            return cls(*tiny_safety_checker(), device=device)
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        model = StableDiffusionSafetyChecker.from_pretrained(SD_SAFETY_CHECKER, token=token).eval()
        processor = CLIPImageProcessor.from_pretrained(SD_SAFETY_CHECKER, token=token)
        return cls(model, processor, device=device)

    @torch.no_grad()
    def concept_scores(self, images: list[Image.Image]) -> list[float]:
        """Per image, the highest concept score minus its threshold: > 0 means flagged."""
        inputs = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt").to(self.device)
        pooled = self.model.vision_model(inputs.pixel_values)[1]
        embeds = torch.nn.functional.normalize(self.model.visual_projection(pooled), dim=-1)
        concepts = torch.nn.functional.normalize(self.model.concept_embeds, dim=-1)
        scores = embeds @ concepts.T - self.model.concept_embeds_weights
        return [float(s) for s in scores.max(dim=1).values]

    @torch.no_grad()
    def flagged(self, images: list[Image.Image]) -> list[bool]:
        """The model's own verdict per image (its forward pass, as the SD pipeline calls it)."""
        inputs = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt").to(self.device)
        placeholders = [np.zeros((1, 1, 3)) for _ in images]
        _, verdicts = self.model(clip_input=inputs.pixel_values, images=placeholders)
        return [bool(v) for v in verdicts]
