"""Model families: what differs between SD1.5 and SDXL-class bases, behind one interface.

The chain (engine/render/animate.py), the warm model set (engine/render/models.py), style files and memory
ask the family of the loaded base for: how to load it (hub id, diffusers folder, one original-layout file),
the txt2img pipeline and the img2img-with-depth-ControlNet pipeline over the same weights (`from_pipe`), the
per-call conditioning (SDXL's micro-conditioning), its sizes, which models a style file may adapt and the key
prefixes a style file of this family has, its tiny test set, and its memory footprint. The family is read from
the base model's files (engine/render/model_files.py `base_family`), never from a name.

One bot renders one family at a time: the operator picks the base, and everything follows from its files.
"""

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
        return Memory(parameter_counts(self.name), torch.tensor([], dtype=dtype).element_size())


@functools.lru_cache(maxsize=4)
def parameter_counts(family: str) -> dict[str, int]:
    """Parameters per part of a family's real base model, counted on the meta device (no weights, no download)."""
    built = by_name(family).meta_models()
    return {part: sum(p.numel() for p in module.parameters()) for part, module in built.items()}


def _families() -> dict[str, Family]:
    from engine.render.families.sd15 import SD15
    from engine.render.families.sdxl import SDXL

    return {family.name: family for family in (SD15(), SDXL())}


FAMILIES: dict[str, Family] = {}


def by_name(name: str) -> Family:
    if not FAMILIES:
        FAMILIES.update(_families())
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelLoadError(f"unknown model family '{name}': emaki renders {', '.join(FAMILIES)}") from None


def family_of_found(found: model_files.Resolved) -> Family:
    """The family a resolved base model's files show: a folder's model_index.json and UNet config, a single
    file's key names (or, for a `.ckpt` that cannot be read without unpickling, its config folder's). SD1.5
    when nothing says: what emaki rendered before it knew families. Other families were refused at resolve."""
    single = found.config is not None
    name, _ = model_files.base_family(found.path, single_file=single)
    if not name and found.config is not None:
        name, _ = model_files.base_family(found.config, single_file=False)
    return by_name(name if name in model_files.RENDERED_FAMILIES else "sd15")


def running_family(base_model: str, config_ref: str = "") -> Family:
    """The family of a configured base model, read from its files (a tiny repo is built first if need be)."""
    spec = model_files.ModelSpec("base model", "base_model", base_model, pipeline=True, half=False)
    return family_of_found(model_files.resolve(spec, config_ref))


@functools.lru_cache(maxsize=8)
def family_name(base_model: str, config_ref: str = "") -> str:
    """`running_family(...).name`, read once per process (the bot's style autocomplete asks at every keystroke);
    "" when the base model cannot be found (then nothing is filtered by family: loading says what is wrong)."""
    try:
        return running_family(base_model, config_ref).name
    except ModelLoadError:
        return ""
