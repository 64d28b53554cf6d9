"""Captions for images that have none (`--autocaption`): BLIP, as the Ghibli paper used."""

from __future__ import annotations

import torch
from PIL import Image

from engine.models import _load, pick_device
from engine.settings import Settings


def tiny_blip() -> tuple[torch.nn.Module, object]:
    """A random-weight BLIP with a small word vocabulary, for the offline `tiny` profile."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "with",
        "fox",
        "cat",
        "forest",
        "meadow",
        "sky",
        "house",
        "red",
        "green",
        "painting",
        "photo",
        "little",
        "girl",
    ]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(words),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=2,
            sep_token_id=3,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    return BlipForConditionalGeneration(config).eval(), processor


class Captioner:
    def __init__(self, settings: Settings) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device = pick_device(settings.device)
        if settings.is_tiny:
            self.model, self.processor = tiny_blip()
        else:
            ref = settings.captioner_model
            self.model = _load("captioner", ref, BlipForConditionalGeneration.from_pretrained).eval()
            self.processor = _load("captioner processor", ref, BlipProcessor.from_pretrained)
        self.model.to(self.device)

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> str:
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        tokens = self.model.generate(**inputs, max_new_tokens=30)
        return self.processor.decode(tokens[0], skip_special_tokens=True).strip() or "an image"
