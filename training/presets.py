"""Named training setups, value by value from their sources. A preset fills in TrainConfig fields;
options given on the command line win over it.

- `ghibli-lora`: the Ghibli paper's run with diffusers' `examples/text_to_image/train_text_to_image_lora.py`
  at its defaults (rank 4, lora_alpha = rank, gaussian init, AdamW lr 1e-4, weight decay 1e-2,
  eps 1e-8, max_grad_norm 1, constant LR - the script's 500 warmup steps do nothing under
  "constant" -, no SNR weighting, no noise offset, no flip), 3000 steps at batch size 1, 512 px.
- `anime-ia3-prodigy`: the anime paper's bmaltais/kohya_ss preset `presets/lora/iA3-Prodigy-sd15.json`:
  LyCORIS/iA3, Prodigy (lr 1.0 for UNet and text encoder, d_coef 1, weight_decay 0.01,
  safeguard_warmup False, use_bias_correction False), constant LR without warmup, min-SNR gamma 5,
  noise offset 0.05 (original type) with adaptive noise scale 0.005, caption dropout 0.5, shuffled
  captions keeping 1 token, network dim/alpha 1024 (iA3 has no rank: recorded only), network dropout
  0.3 (peft's IA3 has no dropout: recorded only), max-norm regularisation 1, batch 1, 300 epochs,
  a save every 10 epochs, seed 31337, gradient checkpointing, text encoder trained.
- `sdxl-lora`, `sdxl-loha`, `sdxl-lokr`: kohya's SDXL defaults (kohya-ss/sd-scripts). LoRA from the example of
  `docs/sdxl_train_network.md`: network dim 32, alpha 16, U-Net lr 1e-4, text encoder lr 1e-5 (text_encoder_lr1
  and lr2 alike), constant LR, 10 epochs with a save every epoch, gradient checkpointing, bf16. LoHa and LoKr from
  `docs/loha_lokr.md`: dim 32, alpha 16, lr 2e-4, 16 epochs with a save every epoch, gradient checkpointing. All
  three: 1024 px buckets ("The default resolution of SDXL is 1024x1024", `docs/train_SDXL-en.md`), the U-Net only
  (`--network_train_unet_only` "is highly recommended for SDXL LoRA", ibid.), noise offset 0.0357 ("Recommended
  to enable as SDXL base models are trained with this (e.g., 0.0357)", `docs/train_network_advanced.md`; also
  `DEFAULT_NOISE_OFFSET` in `library/sdxl_train_util.py`), min-SNR gamma 5 ("`N=5` etc. are used", ibid.).
  kohya's examples use AdamW8bit: emaki's AdamW keeps fp32 moments (the VRAM below counts them). The VRAM each
  needs is in PRESET_PARAMETERS / `preset_vram`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequest
from training.options import SDXL_ADAPTERS

if TYPE_CHECKING:
    from engine.settings import Settings
    from training.lora import TrainConfig

PRESETS: dict[str, dict[str, Any]] = {
    "ghibli-lora": {
        "adapter": "lora",
        "optimizer": "adamw",
        "rank": 4,
        "network_alpha": 4,
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "weight_decay": 1e-2,
        "max_grad_norm": 1.0,
        "min_snr_gamma": 0.0,
        "noise_offset": 0.0,
        "flip": False,
        "steps": 3000,
        "batch_size": 1,
        "resolution": 512,
        "train_text_encoder": False,
        "holdout": 0,  # the script trains on every image
    },
    "anime-ia3-prodigy": {
        "adapter": "ia3",
        "optimizer": "prodigy",
        "rank": 1024,
        "network_alpha": 1024,
        "network_dropout": 0.3,
        "learning_rate": 1.0,
        "text_encoder_lr": 1.0,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "weight_decay": 0.01,
        "prodigy_d_coef": 1.0,
        "prodigy_safeguard_warmup": False,
        "prodigy_use_bias_correction": False,
        "min_snr_gamma": 5.0,
        "noise_offset": 0.05,
        "adaptive_noise_scale": 0.005,
        "caption_dropout": 0.5,
        "shuffle_caption": True,
        "keep_tokens": 1,
        "scale_weight_norms": 1.0,
        "batch_size": 1,
        "epochs": 300,
        "save_limit": 30,  # kohya keeps every save: all 30 of them
        "seed": 31337,
        "gradient_checkpointing": "on",
        "train_text_encoder": True,
        "holdout": 0,  # the paper trains on all 28 images
    },
}
_SDXL_COMMON: dict[str, Any] = {
    "optimizer": "adamw",
    "rank": 32,
    "network_alpha": 16,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "min_snr_gamma": 5.0,
    "noise_offset": 0.0357,
    "resolution": 1024,
    "batch_size": 1,
    "gradient_checkpointing": "on",
    "train_text_encoder": False,
    "text_encoder_lr": 1e-5,  # when --train-text-encoder turns it on (docs/sdxl_train_network.md)
    "holdout": 0,
}
PRESETS["sdxl-lora"] = {**_SDXL_COMMON, "adapter": "lora", "learning_rate": 1e-4, "epochs": 10, "save_limit": 10}
PRESETS["sdxl-loha"] = {**_SDXL_COMMON, "adapter": "loha", "learning_rate": 2e-4, "epochs": 16, "save_limit": 16}
PRESETS["sdxl-lokr"] = {**_SDXL_COMMON, "adapter": "lokr", "learning_rate": 2e-4, "epochs": 16, "save_limit": 16}
# kohya saves every 10 of the 300 epochs; an epoch's length depends on the dataset, so this
# is resolved against it (see `preset_config`).
SAVE_EVERY_EPOCHS = {"anime-ia3-prodigy": 10, "sdxl-lora": 1, "sdxl-loha": 1, "sdxl-lokr": 1}
# What the SDXL presets need on the GPU, computed by `python -m training.vram` (training/vram.py: parameter counts of
# SDXL's published configs, the frozen base in bf16, every trained parameter with its fp32 gradient and AdamW
# moments). Activations come on top and were not measured; kohya documents 8 GB (10 GB recommended) in all for SDXL
# LoRA at dim 4-8 with an 8-bit optimizer and cached text-encoder outputs (docs/train_SDXL-en.md).
SDXL_PRESETS = ("sdxl-lora", "sdxl-loha", "sdxl-lokr")
# (frozen base parameters, trained parameters), as `python -m training.vram` printed them:
PRESET_PARAMETERS: dict[str, tuple[int, int]] = {
    "sdxl-lora": (3_468_837_867, 46_448_640),
    "sdxl-loha": (3_468_837_867, 92_897_280),
    "sdxl-lokr": (3_468_837_867, 1_513_920),
}
# The model family each preset is for: the SDXL presets train an SDXL-class base, the others SD1.5. A preset is
# offered (and taken) only where the running base is of its family (`presets_for`, `preset_config(family=)`).
FAMILY_TITLES = {"sd15": "SD1.5", "sdxl": "SDXL"}  # engine/render/families/ `title`s
PRESET_FAMILIES: dict[str, str] = {name: "sdxl" if name in SDXL_PRESETS else "sd15" for name in PRESETS}


def presets_for(family: str) -> list[str]:
    """The presets for a base of `family` ("sd15", "sdxl"); every preset when the family is not known ("")."""
    return [name for name in PRESETS if not family or PRESET_FAMILIES[name] == family]


def check_adapter_family(adapter: str, family: str) -> None:
    """One line when the adapter kind cannot be trained on the running base's family (IA3 on SDXL)."""
    if family == "sdxl" and adapter not in SDXL_ADAPTERS:
        raise InvalidRequest(f"adapter '{adapter}' is not offered on an SDXL base: use {', '.join(SDXL_ADAPTERS)}")


def check_preset_family(name: str, family: str) -> None:
    """One line when preset `name` is for another family than the running base's (`family`; "" checks nothing)."""
    wanted = PRESET_FAMILIES.get(name, "")
    if name and family and wanted and wanted != family:
        ours = FAMILY_TITLES.get(family, family)
        raise InvalidRequest(
            f"preset '{name}' is for {FAMILY_TITLES[wanted]} bases; this bot trains {ours}: "
            f"use {', '.join(presets_for(family))}"
        )


FROZEN_BYTES, TRAINED_BYTES = 2, 16  # bf16; fp32 weight + gradient + two AdamW moments (training/vram.py)


def preset_vram(name: str) -> str:
    """One line: what preset `name` needs on the GPU, or "" for a preset without a computed figure."""
    if name not in PRESET_PARAMETERS:
        return ""
    frozen, trained = PRESET_PARAMETERS[name]
    gib = 1024**3
    total = (frozen * FROZEN_BYTES + trained * TRAINED_BYTES) / gib
    return (
        f"{total:.2f} GiB + activations (computed for the SDXL base: {frozen / 1e9:.2f}B frozen parameters in "
        f"bf16 = {frozen * FROZEN_BYTES / gib:.2f} GiB, {trained / 1e6:.1f}M trained parameters with fp32 gradients "
        f"and AdamW moments = {trained * TRAINED_BYTES / gib:.2f} GiB; activations not measured: kohya documents "
        "8 GB, 10 GB recommended, for SDXL LoRA with gradient checkpointing and an 8-bit optimizer)"
    )


# Preset values that are image sizes: a preset states the paper's (512 px), which a profile may not allow.
SIZE_VALUES = ("resolution",)


def clamped_to_profile(name: str, values: dict[str, Any], settings: Settings) -> list[str]:
    """Clamp the preset's size values in `values` to the profile's size range (`min_size`..`max_size`), in
    place; one line per value clamped, naming the preset, the value and the range."""
    notes = []
    for key in SIZE_VALUES:
        value = values.get(key)
        if not value:  # 0: the profile's own size, always in range
            continue
        clamped = min(max(int(value), settings.min_size), settings.max_size)
        if clamped != value:
            values[key] = clamped
            notes.append(
                f"preset {name}: {key} {value} is outside the {settings.profile} profile's sizes "
                f"({settings.min_size}..{settings.max_size}); clamped to {clamped}"
            )
    return notes


def preset_config(
    name: str,
    overrides: dict[str, Any],
    n_images: int,
    settings: Settings | None = None,
    notes: list[str] | None = None,
    family: str = "",
) -> TrainConfig:
    """The preset's values, then `overrides` (only what the user actually gave) on top. With `settings`, the
    preset's sizes are clamped to the profile's range (an override is the user's own: never clamped), and a
    line saying so is appended to `notes` for each. With `family` (the running base's), a preset for another
    family is refused in one line."""
    from training.lora import TrainConfig  # torch and diffusers: only when a config is built

    if name and name not in PRESETS:
        raise InvalidRequest(f"unknown preset '{name}': use {', '.join(presets_for(family))}")
    check_preset_family(name, family)
    values = {k: v for k, v in PRESETS.get(name, {}).items() if k not in overrides}
    if settings is not None:
        said = clamped_to_profile(name, values, settings)
        if notes is not None:
            notes.extend(said)
    if name in SAVE_EVERY_EPOCHS:
        batch = int(overrides.get("batch_size", values.get("batch_size", 1)))
        values["save_every"] = SAVE_EVERY_EPOCHS[name] * max(1, -(-n_images // batch))
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise InvalidRequest(f"unknown training option(s): {', '.join(sorted(unknown))}")
    values.update(overrides)
    check_adapter_family(str(values.get("adapter", "lora")), family)  # before a dataset is taken or a model loads
    return TrainConfig(**values)
