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
from pathlib import Path

from engine.errors import ModelLoadError
from engine.render import model_files
from engine.render.families.base import (
    GIB,
    NO_SAFETY_CHECKER,
    Family,
    Memory,
    Sizes,
    StyleKeys,
    meta_parameter_counts,
)
from engine.render.families.sd15 import SD15
from engine.render.families.sdxl import SDXL
from engine.settings import PROFILE_FAMILIES, Settings

__all__ = ["FAMILIES", "GIB", "NO_SAFETY_CHECKER", "Family", "Memory", "Sizes", "StyleKeys", "by_name"]

FAMILIES: dict[str, Family] = {family.name: family for family in (SD15(), SDXL())}


def parameter_counts(family: str) -> dict[str, int]:
    """Parameters per part of the named family's real base model (see meta_parameter_counts)."""
    return meta_parameter_counts(by_name(family))


def by_name(name: str) -> Family:
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


def check_profile(family: Family, settings: Settings, evidence: str = "") -> None:
    """A base model of another family than the profile's would load and then fail on the profile's ControlNet
    (a tensor-size line) or render at the other family's size: one line naming the profile to use instead."""
    expected = PROFILE_FAMILIES.get(settings.profile, family.name)
    if expected == family.name:
        return
    wanted = next(
        name
        for name, of in PROFILE_FAMILIES.items()
        if of == family.name and (name in ("tiny", "tiny-sdxl")) == settings.is_tiny
    )
    because = f" ({evidence})" if evidence else ""
    size = by_name(expected).sizes.default if not settings.is_tiny else settings.width
    raise ModelLoadError(
        f"base model '{settings.base_model}' is {family.title}{because}, but the {settings.profile} profile is made "
        f"for {by_name(expected).title} (its depth ControlNet, {size} px frames): set EMAKI_PROFILE={wanted}"
    )


def configured_base(
    settings: Settings, spec: model_files.ModelSpec | None = None
) -> tuple[Family, model_files.Resolved]:
    """The configured base model's family and files, refused in one line when the family is not the profile's.
    `spec`: the base's, as the loader asks for it (its `half` picks the fp16 weight variant)."""
    spec = spec or _base_spec(settings)
    check_single_file(settings)
    found = model_files.resolve(spec, settings.base_model_config)
    return _checked_family(found, settings), found


def settings_family(settings: Settings) -> Family:
    """`configured_base(settings)`'s family: what styles and training check against."""
    return configured_base(settings)[0]


def settings_family_name(settings: Settings) -> str:
    """`settings_family(settings).name`, or "" when the base model is not on disk (loading says what is missing);
    a base of another family than the profile's is still its one line."""
    check_single_file(settings)
    try:
        found = model_files.resolve(_base_spec(settings), settings.base_model_config)
    except ModelLoadError:
        return ""
    return _checked_family(found, settings).name


def _base_spec(settings: Settings) -> model_files.ModelSpec:
    return model_files.ModelSpec("base model", "base_model", settings.base_model, pipeline=True, half=False)


def check_single_file(settings: Settings) -> None:
    """A single file's own keys, read before its config is looked for: an SDXL file on the sd15 profile is told to
    use the sdxl profile, not to download the sd15 profile's config repo."""
    path = Path(settings.base_model).expanduser()
    if model_files.kind_of(settings.base_model) == "file" and path.is_file():
        name, evidence = model_files.base_family(path, single_file=True)
        if name in FAMILIES:
            check_profile(FAMILIES[name], settings, evidence)


def _checked_family(found: model_files.Resolved, settings: Settings) -> Family:
    family = family_of_found(found)
    _, evidence = model_files.base_family(found.path, single_file=found.config is not None)
    check_profile(family, settings, evidence)
    return family
