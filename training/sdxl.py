"""Training a style on an SDXL-class base (SDXL, Illustrious, NoobAI, Pony): what differs from SD1.5.

The run itself (data order, augmentation, min-SNR, noise offset, checkpoints, saves, divergence checks) is the
SD1.5 trainer's (training/lora.py); SDXL changes what the UNet is conditioned on and what is saved:
- two text encoders: the prompt's hidden states of the penultimate layer of each (CLIP ViT-L, then OpenCLIP
  ViT-bigG) concatenated, and the pooled, projected output of the second (diffusers' `encode_prompt`, kohya's
  `get_hidden_states_sdxl`); `train_text_encoder` adapts both;
- SDXL's micro-conditioning (`add_time_ids`): each image's original size, the top-left corner of its crop and the
  bucket it was fitted to, (height, width) each, as kohya's `get_size_embeddings` and diffusers' SDXL training
  scripts pass them;
- the style is saved as one file in kohya's SDXL key layout for every kind (training/export.py
  `kohya_sdxl_state_dict`): what A1111, ComfyUI, diffusers' `load_lora_weights` (LoRA) and LyCORIS read.

The base loads as the renderer loads it (`engine.render.models.load_base_model`: the pipeline of the family its
files show), and the family is read from those files (`engine.render.families.running_family`), never guessed
from a name.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.settings import Settings
from training.images import bucket_fit
from training.lora import KOHYA_WEIGHTS_NAME, Trainer, shuffled_caption
from training.options import SDXL_ADAPTERS
from training.presets import check_adapter_family

FAMILY = "sdxl"
ADAPTERS = SDXL_ADAPTERS  # IA3 has no SDXL export that LyCORIS and A1111 agree on
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def base_family(settings: Settings) -> str:
    """The base's family as its files say ("sdxl", "sd15"), read the way the renderer reads it
    (`engine.render.families.settings_family_name`); "" when the files are not there (the loader then says so in
    its one line, when the SD1.5 trainer loads the base); a base of another family than the profile's is one
    line."""
    from engine.render.families import settings_family_name

    return settings_family_name(settings)


def time_ids(original: tuple[int, int], bucket: tuple[int, int], flipped: bool) -> list[int]:
    """SDXL's size conditioning for an image of `original` (width, height) fitted to `bucket` (width, height):
    original (h, w), crop top-left (top, left) in the scaled image, target (h, w). A flipped view's crop starts
    where the unflipped one ends."""
    scaled, (left, top) = bucket_fit(original, bucket)
    if flipped:
        left = scaled[0] - bucket[0] - left
    return [original[1], original[0], top, left, bucket[1], bucket[0]]


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_tokens(encoders: list[torch.nn.Module], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, pooled) for `tokens` [2, batch, length] (one row per tokenizer): the penultimate layer of
    each encoder, concatenated on the feature axis, and the second encoder's projected pooled output."""
    hidden = []
    out = None
    for encoder, ids in zip(encoders, tokens, strict=True):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    assert out is not None
    return torch.cat(hidden, dim=-1), out.text_embeds


class SDXLTrainer(Trainer):
    """The SD1.5 trainer's run with SDXL's conditioning (both text encoders, pooled embeddings, size
    conditioning) and its kohya-format save."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(settings, *args, **kwargs)
        check_adapter_family(self.config.adapter, FAMILY)

    def _text_model(self, pipe: Any) -> torch.nn.Module:
        # One module holding both encoders (the same objects as the pipeline's): adapters, checkpoints and
        # parameter lists treat them as one, with their own names inside.
        return torch.nn.ModuleDict({name: getattr(pipe, name) for name in TEXT_ENCODERS})

    def _cache_key(self) -> str:
        return f"{FAMILY}-{super()._cache_key()}"

    @torch.no_grad()
    def encode_dataset(self, pipe: Any) -> dict[str, Any]:
        data = super().encode_dataset(pipe)
        for key, entry in data["buckets"].items():
            bucket = tuple(int(side) for side in key.split("x"))
            sizes = [tuple(size.tolist()) for size in entry["sizes"]]
            views = range(len(entry["mean"]))  # 2 with flips: the flipped view is cropped from the other side
            per_view = [[time_ids(size, bucket, flipped=view == 1) for size in sizes] for view in views]
            entry["time_ids"] = torch.tensor(per_view, dtype=torch.float32)
        return data

    def _encode_prompts(self, pipe: Any) -> dict[str, torch.Tensor]:
        encoders = [pipe.text_encoder, pipe.text_encoder_2]
        tokens = self._tokens(pipe, self.prompts())
        text, pooled = encode_tokens(encoders, tokens)
        empty_text, empty_pooled = encode_tokens(encoders, self._tokens(pipe, [""]))
        return {
            "tokens": tokens,
            "text": text.float().cpu(),
            "pooled": pooled.float().cpu(),
            "empty_text": empty_text.float().cpu(),
            "empty_pooled": empty_pooled.float().cpu(),
        }

    @staticmethod
    def _tokens(pipe: Any, prompts: list[str]) -> torch.Tensor:
        return torch.stack([tokenize(pipe.tokenizer, prompts), tokenize(pipe.tokenizer_2, prompts)])

    def _sdxl_text(
        self, pipe: Any, trained_text: Any, data: dict[str, Any], indices: list[int], rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, pooled) of a batch's captions, augmented as the SD1.5 trainer augments them."""
        cfg = self.config
        augment = cfg.caption_dropout > 0 or cfg.shuffle_caption
        if not augment and trained_text is None:
            return (
                torch.stack([data["text"][i] for i in indices]),
                torch.stack([data["pooled"][i] for i in indices]),
            )
        prompts = [self._augmented_prompt(index, rng) for index in indices]
        encoders = [pipe.text_encoder, pipe.text_encoder_2]
        if trained_text is None:
            if all(p == "" for p in prompts):
                n = len(prompts)
                return data["empty_text"].expand(n, -1, -1), data["empty_pooled"].expand(n, -1)
            with torch.no_grad():
                return encode_tokens(encoders, self._tokens(pipe, prompts))
        tokens = data["tokens"][:, indices] if not augment else self._tokens(pipe, prompts)
        return encode_tokens(encoders, tokens)

    def _augmented_prompt(self, index: int, rng: np.random.Generator) -> str:
        cfg = self.config
        if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
            return ""
        if cfg.shuffle_caption:
            return shuffled_caption(self.prompts()[index], cfg.keep_tokens, rng)
        return self.prompts()[index]

    def _conditioning(
        self,
        pipe: Any,
        trained_text: Any,
        data: dict[str, Any],
        entry: dict[str, Any],
        views: list[int],
        positions: list[int],
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        indices = [entry["items"][p] for p in positions]
        text, pooled = self._sdxl_text(pipe, trained_text, data, indices, rng)
        sizes = torch.stack([entry["time_ids"][v, p] for v, p in zip(views, positions, strict=True)])
        return self._unet_inputs(text, pooled, sizes)

    def _fixed_conditioning(self, data: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
        items = entry["items"]
        return self._unet_inputs(data["text"][items], data["pooled"][items], entry["time_ids"][0])

    def _unet_inputs(self, text: torch.Tensor, pooled: torch.Tensor, sizes: torch.Tensor) -> dict[str, Any]:
        dtype = self.weight_dtype
        return {
            "encoder_hidden_states": text.to(dtype),
            "added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": sizes.to(dtype)},
        }

    def _save(
        self, dest: Path, unet: Any, trained_text: Any = None, extra: dict[str, Image.Image] | None = None
    ) -> Path:
        """One kohya-format SDXL file (`lora_unet_…`, `lora_te1_…`, `lora_te2_…`, `.alpha`, metadata naming the
        family) for every kind, beside `training.json`. Whole or absent (a temporary folder renamed)."""
        from training.export import kohya_sdxl_state_dict, sdxl_metadata
        from training.safetensors_file import save_file  # metadata in a fixed order: same content, same bytes

        state = kohya_sdxl_state_dict(unet, trained_text, self.config.adapter, unet.config.layers_per_block)
        for tensor in state.values():
            if not torch.isfinite(tensor).all():
                self._diverged(-1, float("nan"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(state, str(tmp / KOHYA_WEIGHTS_NAME), metadata=sdxl_metadata(self.config))
        heldout = [path.relative_to(self.dataset.root).as_posix() for path in self.heldout]
        (tmp / "training.json").write_text(json.dumps({**asdict(self.config), "heldout": heldout}, indent=2) + "\n")
        for filename, image in (extra or {}).items():
            image.save(tmp / filename)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return dest / KOHYA_WEIGHTS_NAME
