"""Captions for images that have none (`--autocaption`): BLIP, as the Ghibli paper used."""

from __future__ import annotations

import torch
from PIL import Image

from engine.render.loading import load_model, pick_device
from engine.render.model_files import captioner_spec
from engine.settings import Settings


class Captioner:
    def __init__(self, settings: Settings) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device = pick_device(settings.device)
        # The tiny profile's BLIP is a repo in emaki's tiny cache: the same loader either way, never a download.
        spec = captioner_spec(settings)
        self.model = load_model(spec, BlipForConditionalGeneration.from_pretrained).eval()
        self.processor = load_model(spec, BlipProcessor.from_pretrained)
        self.model.to(self.device)

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> str:
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        tokens = self.model.generate(**inputs, max_new_tokens=30)
        return self.processor.decode(tokens[0], skip_special_tokens=True).strip() or "an image"
