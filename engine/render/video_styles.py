"""Video styles: LoRA files for the video model (LTX-Video's transformer), registered with `emaki styles add` as
the family `ltx-video` and applied to the video model with diffusers' `load_lora_weights` when a video job names
one as its `video_style` (the keyframes keep their own image `style`: a job may name one of each).

Formats read are those diffusers' `LTXVideoLoraLoaderMixin` loads (diffusers 0.42,
src/diffusers/loaders/lora_pipeline.py and lora_conversion_utils.py):
- diffusers/peft naming: `transformer.<layer>.lora_A.weight` / `.lora_B.weight` (what
  `LTXConditionPipeline.save_lora_weights` writes); a kohya-style `<layer>.alpha` (ComfyUI and many trainers
  write one) is folded into lora_B as alpha/rank when the style is applied, since diffusers' LTX loader
  refuses every key without "lora" in it,
- LTX-Video-Trainer / ComfyUI naming: `diffusion_model.<layer>.lora_A.weight`, which the mixin converts by
  swapping the prefix (`_convert_non_diffusers_ltxv_lora_to_diffusers`).
kohya/musubi-tuner names (`lora_unet_<layer>`) are not converted by diffusers' LTX loader (its conversion only
knows the `diffusion_model.` prefix), so such a file is refused in one line that says so.

A file is checked against the configured video model's transformer before it is registered: built from its
config on the meta device (no weights read), every adapted layer must be one of its Linear layers, with the
LoRA's shapes matching it, so a Flux or SD3 transformer LoRA (same `transformer.` prefix) is refused too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.render.style_files import StyleFileError, load_tensors, locate

if TYPE_CHECKING:
    from engine.settings import Settings

VIDEO_FAMILY = "ltx-video"
VIDEO_FAMILY_TITLE = "LTX-Video"
ADAPTER_NAME = "emaki_video_style"
PREFIXES = {"transformer.": "diffusers", "diffusion_model.": "LTX-Video-Trainer/ComfyUI"}
LORA_PARAM = re.compile(r"^(?P<layer>.+)\.(?P<part>lora_A|lora_B)\.weight$")
KOHYA_VIDEO = re.compile(r"^lora_unet_(transformer_blocks|proj_in|proj_out|time_embed|caption_projection)")


def looks_like_video_lora(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a file's keys are a transformer LoRA (any family's) rather than a UNet style: the hook
    `emaki styles add` asks before reading a file as an image style."""
    keys = list(tensors)
    return any(k.startswith(tuple(PREFIXES)) for k in keys) or any(KOHYA_VIDEO.match(k) for k in keys)


@dataclass(frozen=True)
class VideoStyleFile:
    weights: Path  # the .safetensors file
    source: str  # the naming it was written in
    n_layers: int


def read_video_style(path: Path, settings: Settings) -> VideoStyleFile:
    """Check a video LoRA file against the configured video model's transformer; one line when it cannot be used."""
    weights, _ = locate(path)
    tensors, _ = load_tensors(weights)
    name = weights.name
    if any(KOHYA_VIDEO.match(k) for k in tensors):
        raise StyleFileError(
            f"{name}: kohya/musubi-tuner names (lora_unet_...) are not converted by diffusers' LTX-Video loader; "
            "save it in diffusers naming (transformer.<layer>.lora_A.weight) or LTX-Video-Trainer's (diffusion_model.)"
        )
    prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in tensors)), None)
    if prefix is None:
        raise StyleFileError(f"{name}: a video LoRA's keys all start with transformer. or diffusion_model.")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):
            continue
        match = LORA_PARAM.match(key.removeprefix(prefix))
        if match is None:
            raise StyleFileError(f"{name}: '{key}' is not a LoRA weight (lora_A/lora_B); only LoRA is read for video")
        layers.setdefault(match["layer"], {})[match["part"]] = tensor
    modules = dict(_meta_transformer(settings).named_modules())
    for layer, parts in layers.items():
        module = modules.get(layer)
        if not isinstance(module, torch.nn.Linear):
            raise StyleFileError(
                f"{name}: its layer '{layer}' is not in the video model's transformer (a LoRA for another model?)"
            )
        down, up = parts.get("lora_A"), parts.get("lora_B")
        if down is None or up is None:
            raise StyleFileError(f"{name}: layer '{layer}' lacks its lora_A or lora_B weight")
        if down.shape[1] != module.in_features or up.shape[0] != module.out_features or up.shape[1] != down.shape[0]:
            raise StyleFileError(
                f"{name}: layer '{layer}' has LoRA shapes {tuple(down.shape)}/{tuple(up.shape)} that do not fit the "
                f"video model's {module.in_features}->{module.out_features} (a LoRA for another LTX-Video size?)"
            )
        if not torch.isfinite(down).all() or not torch.isfinite(up).all():
            raise StyleFileError(f"{name}: layer '{layer}' holds NaN or infinite weights")
    if not layers:  # only .alpha keys: nothing would change the model
        raise StyleFileError(f"{name}: the file holds no LoRA layers (lora_A/lora_B weights), only alphas")
    return VideoStyleFile(weights, PREFIXES[prefix], len(layers))


def _meta_transformer(settings: Settings) -> torch.nn.Module:
    """The video model's transformer built from its config on the meta device: its layers, no weights."""
    from diffusers import LTXVideoTransformer3DModel

    from engine.render import model_files

    if not settings.video_model:
        raise StyleFileError("a video style is checked against the video model: set EMAKI_VIDEO_MODEL first")
    folder = model_files.resolve(model_files.video_spec(settings, half=False)).path
    config = json.loads((folder / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        return LTXVideoTransformer3DModel.from_config(config)


@dataclass(frozen=True)
class VideoStyle:
    """A video style as the video model applies it."""

    name: str
    path: str
    weight: float = 1.0
    version: str = ""  # the file's content hash: a replaced file is loaded again


def apply(pipe: Any, current: VideoStyle | None, wanted: VideoStyle | None) -> VideoStyle | None:
    """Make `wanted` the pipeline's video style (None: none) and return it; nothing is reloaded when it is the
    one already applied. Unloading restores the transformer's own weights exactly (peft layers are removed)."""
    if wanted == current:
        return current
    if current is not None:
        pipe.unload_lora_weights()
    if wanted is not None:
        pipe.load_lora_weights(lora_weights(Path(wanted.path)), adapter_name=ADAPTER_NAME)
        pipe.set_adapters([ADAPTER_NAME], [wanted.weight])
    return wanted


def lora_weights(path: Path) -> Path | dict[str, torch.Tensor]:
    """What `load_lora_weights` is given: the file itself, or, when it carries `.alpha` keys, its tensors with
    each layer's alpha/rank folded into lora_B (the scale kohya-style files mean; peft's default is 1)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    alphas = {k.removesuffix(".alpha"): v for k, v in tensors.items() if k.endswith(".alpha")}
    if not alphas:
        return path
    folded = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    for layer, alpha in alphas.items():
        down, up = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        if down in folded and up in folded:
            folded[up] = folded[up] * (float(alpha) / folded[down].shape[0])
    return folded


def check_not_video_style(row: dict[str, Any]) -> None:
    """An image style slot (`style`) given a video style: one line naming the right option."""
    if row.get("family") == VIDEO_FAMILY:
        raise StyleFileError(
            f"'{row['name']}' is an {VIDEO_FAMILY_TITLE} style (for the video model): name it as video_style "
            "(--video-style) with motion video; style takes an image style for the keyframes"
        )


def check_video_style(row: dict[str, Any]) -> None:
    """The `video_style` slot given an image style: one line."""
    if row.get("family") != VIDEO_FAMILY:
        family = row.get("family") or "sd15"
        raise StyleFileError(
            f"'{row['name']}' is an image style ({family}) for the keyframes: name it as style; video_style takes "
            f"an {VIDEO_FAMILY_TITLE} LoRA (emaki styles add NAME FILE registers one)"
        )
