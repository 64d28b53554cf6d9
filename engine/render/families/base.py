"""The Family interface and the values every family shares. Its own module so sd15.py and sdxl.py import
the interface without importing the registry (__init__.py), which imports them."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from engine.errors import ModelLoadError
from engine.render import model_files
from engine.render.loading import call_loader

# emaki never runs the safety checker; not loading it (nor its image processor) saves 1.2 GB on SD1.5.
NO_SAFETY_CHECKER: dict[str, Any] = {
    "safety_checker": None,
    "feature_extractor": None,
    "requires_safety_checker": False,
}
GIB = 1024**3


@dataclass(frozen=True)
class Sizes:
    """Frame sizes a family renders well: the default and the accepted range (multiples of 8)."""

    default: int
    min: int
    max: int


@dataclass(frozen=True)
class StyleKeys:
    """The key prefixes a style file made for a family carries, per format."""

    kohya: tuple[str, ...]  # kohya/A1111 LoRA and LyCORIS LoHa/LoKr/IA3 (same names for every kind)
    diffusers: tuple[str, ...]  # diffusers/peft LoRA (`save_lora_weights`)


@dataclass(frozen=True)
class Memory:
    """Computed (not measured) VRAM figures of a family's real base model: parameter counts from its configs
    built on the meta device (`parameter_counts`) times bytes per element of the dtype."""

    parts: dict[str, int]  # parameters per part
    bytes_per_element: int

    def bytes(self, part: str | None = None) -> int:
        count = self.parts[part] if part else sum(self.parts.values())
        return count * self.bytes_per_element


class Family(ABC):
    """One model family. Instances are stateless: one per family, in FAMILIES."""

    name: ClassVar[str]  # "sd15", "sdxl": what sidecars, the store and settings say
    title: ClassVar[str]  # "SD1.5", "SDXL": what people read
    text_encoders: ClassVar[tuple[str, ...]]  # the pipeline attributes holding text encoders
    sizes: ClassVar[Sizes]
    style_keys: ClassVar[StyleKeys]
    # The profile's real models (hub ids) and the tiny set's repos (engine/render/tiny_hub.py), per setting.
    real_models: ClassVar[dict[str, str]]
    tiny_models: ClassVar[dict[str, str]]
    # Activations of one default-size frame with classifier-free guidance: an allowance, not a measurement.
    working_margin: ClassVar[int]

    @abstractmethod
    def txt2img_class(self) -> type: ...

    @abstractmethod
    def img2img_class(self) -> type: ...

    def load_kwargs(self) -> dict[str, Any]:
        """Extra keywords for the base pipeline's loader (SD1.5: no safety checker)."""
        return {}

    def load_base(self, spec: model_files.ModelSpec, found: model_files.Resolved, dtype: torch.dtype) -> Any:
        """The txt2img pipeline from a diffusers folder (or cached hub repo), or from one `.safetensors`/`.ckpt`
        in the original layout described by the configs of `found.config` (a diffusers folder)."""
        pipeline = self.txt2img_class()
        if found.config is not None:
            configured, _ = model_files.base_family(found.config, single_file=False)
            if configured and configured != self.name:  # e.g. an SDXL file described by the sd15 profile's repo
                raise ModelLoadError(
                    f"{spec.role} '{spec.ref}' is one {self.title} file but its config '{found.config}' is of the "
                    f"{model_files.FAMILY_NAMES.get(configured, configured)} family: set EMAKI_BASE_MODEL_CONFIG to "
                    f"a {self.title} diffusers repo or folder (e.g. {self.real_models['base_model']})"
                )
            return call_loader(
                spec,
                pipeline.from_single_file,
                str(found.path),
                config=str(found.config),
                dtype=dtype,
                local_files_only=True,
                **self.load_kwargs(),
            )
        return call_loader(
            spec,
            pipeline.from_pretrained,
            str(found.path),
            dtype=dtype,
            variant=found.variant,
            local_files_only=True,
            **self.load_kwargs(),
        )

    def img2img(self, txt2img: Any, controlnet: Any, dtype: torch.dtype) -> Any:
        """The depth-ControlNet img2img pipeline over txt2img's modules: one copy of the weights. from_pipe casts
        every module it is given to `dtype` (fp32 when not told), on the CPU."""
        return self.img2img_class().from_pipe(txt2img, controlnet=controlnet, dtype=dtype)

    def conditioning(self, height: int, width: int) -> dict[str, Any]:
        """Keywords every txt2img and img2img call of a frame of this size takes besides the prompt."""
        return {}

    def style_models(self, pipe: Any) -> dict[str, torch.nn.Module]:
        """The models a style may adapt, by the names style files use for them."""
        return {"unet": pipe.unet, **{name: getattr(pipe, name) for name in self.text_encoders}}

    @abstractmethod
    def meta_models(self) -> dict[str, torch.nn.Module]:
        """The real base model's UNet, VAE and text encoders built from their configs on the meta device."""

    def memory(self, dtype: torch.dtype) -> Memory:
        """The real base model's weights in `dtype`, computed from parameter counts (see Memory)."""
        return Memory(meta_parameter_counts(self), torch.tensor([], dtype=dtype).element_size())


@functools.lru_cache(maxsize=4)
def meta_parameter_counts(family: Family) -> dict[str, int]:
    """Parameters per part of a family's real base model, counted on the meta device (no weights, no download)."""
    return {part: sum(p.numel() for p in module.parameters()) for part, module in family.meta_models().items()}
