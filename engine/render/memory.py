"""How much of the model set lives on the GPU: the `memory` setting (EMAKI_MEMORY).

- `high`: every model resident on the GPU (fastest).
- `medium`: diffusers' model CPU offload: each model moves to the GPU when it runs and back after, so
  at most the UNet and the ControlNet (called together at every step) are resident.
- `low`: diffusers' sequential CPU offload (one layer at a time on the GPU) plus VAE tiling and slicing,
  for 4-6 GB cards; several times slower.
- `auto`: the first mode whose need fits the free VRAM (`torch.cuda.mem_get_info`) when the models load.

A mode's need is the bytes of the weights it keeps resident (parameter counts x bytes per element of
the loaded dtype) plus WORKING_MARGIN for activations. The two pipelines share their modules (`from_pipe`),
so the offload hooks set on one serve the other.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import ResourceError

log = logging.getLogger(__name__)

GIB = 1024**3
# Activations of a 512x512 frame with classifier-free guidance (attention at 64x64 latents, VAE decode):
# an allowance, not a measurement; the low mode tiles the VAE so its peak stays under it.
WORKING_MARGIN = int(1.5 * GIB)
MODES = ("high", "medium", "low")


@dataclass(frozen=True)
class Footprint:
    """Bytes of weights per model, as loaded (dtype included)."""

    unet: int
    vae: int
    text_encoder: int
    controlnet: int
    depth: int
    largest_layer: int  # the most bytes one module holds directly (what sequential offload keeps resident)
    margin: int = WORKING_MARGIN  # activations of one frame: the family's allowance (engine/render/families/)

    def resident(self, mode: str) -> int:
        """Weights on the GPU at the worst moment of a frame in `mode`."""
        if mode == "high":
            return self.unet + self.vae + self.text_encoder + self.controlnet + self.depth
        if mode == "medium":
            return self.unet + self.controlnet
        return self.largest_layer

    def need(self, mode: str) -> int:
        return self.resident(mode) + self.margin


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def largest_layer_bytes(*modules: torch.nn.Module) -> int:
    return max(
        sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        for module in modules
        for m in module.modules()
    )


def footprint(
    txt2img: Any,
    controlnet: torch.nn.Module,
    depth_model: torch.nn.Module,
    dtype: torch.dtype,
    margin: int = WORKING_MARGIN,
) -> Footprint:
    """The footprint of a model set once cast to `dtype` (the depth estimator stays fp32). Text encoders are
    counted together (SDXL has two)."""
    scale = torch.tensor([], dtype=dtype).element_size()

    def cast(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters()) * scale

    encoders = [m for m in (txt2img.text_encoder, getattr(txt2img, "text_encoder_2", None)) if m is not None]
    parts = (txt2img.unet, txt2img.vae, *encoders, controlnet)
    largest = max(
        sum(p.numel() for p in m.parameters(recurse=False)) * scale for module in parts for m in module.modules()
    )
    return Footprint(
        unet=cast(txt2img.unet),
        vae=cast(txt2img.vae),
        text_encoder=sum(cast(m) for m in encoders),
        controlnet=cast(controlnet),
        depth=module_bytes(depth_model),
        largest_layer=max(largest, largest_layer_bytes(depth_model)),
        margin=margin,
    )


def footprint_from_counts(
    base: dict[str, int],
    controlnet: int,
    depth: int,
    largest_tensor: int,
    dtype: torch.dtype,
    margin: int = WORKING_MARGIN,
) -> Footprint:
    """The footprint from parameter counts (`model_files.parameter_counts`), before anything loads."""
    size = torch.tensor([], dtype=dtype).element_size()
    return Footprint(
        unet=base.get("unet", 0) * size,
        vae=base.get("vae", 0) * size,
        text_encoder=(base.get("text_encoder", 0) + base.get("text_encoder_2", 0)) * size,
        controlnet=controlnet * size,
        depth=depth * 4,
        largest_layer=largest_tensor * size,
        margin=margin,
    )


def choose(setting: str, device: torch.device, need: Footprint, free_bytes: int | None = None) -> str:
    """The mode to use. `free_bytes` is the device's free memory (read from CUDA when None)."""
    if device.type != "cuda":
        if setting not in ("auto", "high"):
            log.info("memory mode '%s' has no effect on %s: the models stay in RAM", setting, device)
        return "high"
    if setting != "auto":
        return setting
    if free_bytes is None:
        if not torch.cuda.is_available():
            raise ResourceError(f"device {device} was asked for, but this machine has no usable CUDA GPU")
        free_bytes, _ = torch.cuda.mem_get_info(device)
    for mode in MODES:
        if need.need(mode) <= free_bytes:
            chosen = mode
            break
    else:
        chosen = "low"  # the least that can be done; a card this small may still run out
    log.info(
        "memory auto: %.1f GiB free; high needs %.1f, medium %.1f, low %.1f GiB: using %s",
        free_bytes / GIB,
        need.need("high") / GIB,
        need.need("medium") / GIB,
        need.need("low") / GIB,
        chosen,
    )
    return chosen


def apply(mode: str, txt2img: Any, img2img: Any, depth_model: torch.nn.Module, device: torch.device) -> None:
    """Place the models for `mode`. Call after `from_pipe`, with every model still on the CPU.

    Model offload is enabled on both pipelines: each pipeline re-arms its own hooks at the end of a call
    (`maybe_free_model_hooks`) and the ControlNet, img2img's alone, keeps img2img's. Sequential offload is
    enabled once, on img2img, whose components are a superset of txt2img's: the hooks live on the shared
    modules themselves."""
    from accelerate import cpu_offload

    if mode == "high":
        img2img.to(device)  # txt2img's modules are the same objects
        depth_model.to(device)
        return
    if mode == "medium":
        txt2img.enable_model_cpu_offload(device=device)
        img2img.enable_model_cpu_offload(device=device)
    elif mode == "low":
        img2img.enable_sequential_cpu_offload(device=device)
        img2img.vae.enable_tiling()
        img2img.vae.enable_slicing()
    else:
        raise ValueError(f"unknown memory mode {mode!r}")
    # The depth estimator runs once per frame: its layers visit the GPU only while it runs.
    cpu_offload(depth_model, execution_device=device)


@contextmanager
def suspended(
    mode: str, txt2img: Any, img2img: Any, depth_model: torch.nn.Module, device: torch.device
) -> Iterator[None]:
    """Take the offload hooks off while modules are changed (e.g. adapter layers injected by peft, whose new
    weights the hooks set earlier would not know about), then place everything again for `mode`."""
    if mode == "high":
        yield
        return
    from accelerate.hooks import remove_hook_from_module

    for pipe in (txt2img, img2img):
        pipe.remove_all_hooks()
    remove_hook_from_module(depth_model, recurse=True)
    try:
        yield
    finally:
        apply(mode, txt2img, img2img, depth_model, device)
