"""Styles that go out: every style emaki trains is also written as one `.safetensors` in kohya/A1111 key format,
the format A1111 and ComfyUI read for SD1.5 (and diffusers' `load_lora_weights`, through its kohya conversion).

Names: `lora_unet_<layer>` / `lora_te_<layer>`, the diffusers layer name with every `.` as `_` (what ComfyUI's
`model_lora_keys_unet` / `model_lora_keys_clip` map for SD1.5). Per kind:
- LoRA: `.lora_down.weight`, `.lora_up.weight`, `.alpha` (alpha / rank is the layer's scale);
- LoHa (LyCORIS): `.hada_w1_a/.hada_w1_b/.hada_w2_a/.hada_w2_b`, `.alpha`;
- LoKr (LyCORIS): `.lokr_w1` or `.lokr_w1_a/_b`, `.lokr_w2` or `.lokr_w2_a/_b`, `.alpha`. Readers apply
  alpha / rank only where a factor is low-rank; with both factors full they apply no scale (A1111, ComfyUI, and
  LyCORIS, which forces alpha = its dim of 1), so the scale is folded into `lokr_w1` and `.alpha` is 1. It is
  written all the same: LyCORIS' own loaders (`create_lycoris_from_weights`, `kohya.create_network_from_weights`)
  call `float(alpha)` on every layer and crash on a layer without it;
- IA3 (LyCORIS/A1111): `.weight` = factor - 1 and `.on_input` (A1111 adds weight * w to the weight; peft
  keeps the factor itself).

SDXL (what kohya's `sdxl_train_network.py` writes, and so what A1111, ComfyUI, diffusers' `load_lora_weights` and
LyCORIS read for SDXL): `lora_unet_<layer>` with the UNet's layers under the original (sgm) block names
(`input_blocks_4_1_…`, `middle_block_1_…`, `output_blocks_0_1_…`: kohya trains its own UNet, which has those
names), `lora_te1_<layer>` / `lora_te2_<layer>` for the two text encoders (CLIP's `text_model.` names), and the
metadata kohya writes (`ss_base_model_version: sdxl_base_v1-0`, `ss_network_module`, dim, alpha) plus emaki's
own `emaki_family` / `emaki_adapter`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.render.style_files import (
    FAMILY_METADATA_KEY,
    PEFT_PARAM,
    LayerWeights,
    StyleLayers,
    base_architecture,
    read_style,
    text_encoder_alias,
)
from engine.settings import Settings

if TYPE_CHECKING:
    from training.lora import TrainConfig

log = logging.getLogger(__name__)

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SDXL_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
FAMILY_KEY = FAMILY_METADATA_KEY  # safetensors metadata: the family a style was trained on
SDXL_BASE_VERSION = "sdxl_base_v1-0"  # kohya's MODEL_VERSION_SDXL_BASE_V1_0 (library/sdxl_model_util.py)


def kohya_state_dict(layers: StyleLayers, prefixes: dict[str, str] = PREFIXES) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for model, named in layers.models.items():
        for name, weights in named.items():
            if model.startswith("text_encoder") and not name.startswith("text_model."):
                name = text_encoder_alias(name)  # A1111/ComfyUI know CLIP's layers as text_model.encoder...
            key = prefixes[model] + name.replace(".", "_")
            p = {k: v.detach().float().cpu().contiguous() for k, v in weights.params.items()}
            if layers.kind == "lora":
                rank = p["lora_A.weight"].shape[0]
                out[f"{key}.lora_down.weight"] = p["lora_A.weight"]
                out[f"{key}.lora_up.weight"] = p["lora_B.weight"]
                out[f"{key}.alpha"] = torch.tensor(weights.scale * rank)
            elif layers.kind == "loha":
                out.update({f"{key}.{param}": tensor for param, tensor in p.items()})
                out[f"{key}.alpha"] = torch.tensor(weights.scale * p["hada_w1_b"].shape[0])
            elif layers.kind == "lokr":
                low_rank = p.get("lokr_w2_b", p.get("lokr_w1_b"))
                if low_rank is None:  # both factors full: readers apply no alpha, so fold the scale in
                    p["lokr_w1"] = p["lokr_w1"] * weights.scale
                    out[f"{key}.alpha"] = torch.tensor(1.0)  # what LyCORIS itself keeps for such a layer
                else:
                    out[f"{key}.alpha"] = torch.tensor(weights.scale * low_rank.shape[0])
                out.update({f"{key}.{param}": tensor for param, tensor in p.items()})
            else:
                factor = p["ia3_l"]
                out[f"{key}.weight"] = (factor - 1).reshape(-1).contiguous()
                out[f"{key}.on_input"] = torch.tensor(factor.shape[0] == 1 and factor.shape[1] > 1)
    return out


# --- SDXL ---------------------------------------------------------------------------------------------------
SGM_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")
SGM_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$")


def sgm_unet_layer(name: str, layers_per_block: int) -> str:
    """A diffusers SDXL UNet attention layer under the original (sgm) block names kohya's files use: the inverse
    of diffusers' `_maybe_map_sgm_blocks_to_diffusers` (each down block holds `layers_per_block` layers and a
    downsampler, each up block one layer more)."""
    per_block = layers_per_block + 1
    if match := SGM_DOWN.match(name):
        return f"input_blocks.{per_block * int(match[1]) + int(match[2]) + 1}.1.{match[3]}"
    if match := SGM_UP.match(name):
        return f"output_blocks.{per_block * int(match[1]) + int(match[2])}.1.{match[3]}"
    if name.startswith("mid_block.attentions.0."):
        return "middle_block.1." + name.removeprefix("mid_block.attentions.0.")
    raise ValueError(f"no kohya SDXL name for UNet layer '{name}' (only attention blocks are trained)")


def trained_layers(model: torch.nn.Module, adapter: str = "style") -> dict[str, LayerWeights]:
    """The adapter `adapter` of a peft-injected model: per layer, its tensors under peft's names and its scale
    (peft's `scaling`, alpha / rank)."""
    from peft.utils import get_peft_model_state_dict

    layers: dict[str, LayerWeights] = {}
    for key, tensor in get_peft_model_state_dict(model, adapter_name=adapter).items():
        match = PEFT_PARAM.search(key)
        if match is None:
            raise ValueError(f"unexpected adapter tensor '{key}'")
        layer = key[: match.start()]
        if layer not in layers:
            layers[layer] = LayerWeights({}, float(model.get_submodule(layer).scaling[adapter]))
        layers[layer].params[match[1]] = tensor
    return layers


def kohya_sdxl_state_dict(
    unet: torch.nn.Module, text_encoders: torch.nn.Module | None, kind: str, layers_per_block: int
) -> dict[str, Any]:
    """kohya SDXL keys for a trained `unet` and, when they were trained, `text_encoders` (one module holding
    `text_encoder` and `text_encoder_2`, the adapter injected through it)."""
    layers = StyleLayers(kind=kind, source="emaki")
    layers.models["unet"] = {sgm_unet_layer(name, layers_per_block): w for name, w in trained_layers(unet).items()}
    for name, weights in (trained_layers(text_encoders) if text_encoders is not None else {}).items():
        model, _, layer = name.partition(".")
        layers.models.setdefault(model, {})[layer] = weights
    return kohya_state_dict(layers, SDXL_PREFIXES)


def sdxl_metadata(config: TrainConfig) -> dict[str, str]:
    """What kohya writes about a network (train_util's `ss_*` keys), and emaki's own family and kind."""
    alpha = config.network_alpha or config.rank
    lycoris = config.adapter != "lora"
    return {
        "format": "pt",
        "ss_base_model_version": SDXL_BASE_VERSION,
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"algo": config.adapter} if lycoris else {}),
        FAMILY_KEY: "sdxl",
        "emaki_adapter": config.adapter,
    }


def style_family(weights: Path) -> str:
    """The family an emaki-written style file names in its metadata ("" when it names none)."""
    from safetensors import safe_open

    if weights.suffix != ".safetensors":
        return ""
    with safe_open(str(weights), framework="pt") as handle:
        return (handle.metadata() or {}).get(FAMILY_KEY, "")


def write_kohya_file(weights: Path, base_model: str, out: Path, config_ref: str = "") -> Path:
    """Convert a style file (any format emaki reads) into one kohya-format file at `out` (`config_ref`: a
    single-file base model's config folder)."""
    from training.safetensors_file import save_file  # metadata in a fixed order: same content, same bytes

    layers = read_style(weights, base_architecture(base_model, config_ref), check=False)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(kohya_state_dict(layers), str(tmp), metadata={"format": "pt", "emaki_adapter": layers.kind})
    os.replace(tmp, out)
    return out


def export_trained_style(settings: Settings, weights: Path, name: str) -> Path | None:
    """`<style folder>/final/<name>.safetensors` beside the trained weights (A1111 takes a LoRA's name from its
    file name). The trained style is already saved and usable in emaki, so a failure here is logged, not raised."""
    out = weights.parent / f"{name}.safetensors"
    if out == weights:  # a style named like its own weights file (adapter_model): never overwrite them
        out = weights.parent / f"{name}.kohya.safetensors"
    try:
        if style_family(weights) == "sdxl":  # trained on SDXL: already saved in kohya's layout
            tmp = out.with_name(f".{out.name}.tmp")
            shutil.copyfile(weights, tmp)
            os.replace(tmp, out)
            return out
        return write_kohya_file(weights, settings.base_model, out, settings.base_model_config)
    except Exception:
        log.exception("style '%s' trained, but its kohya-format export %s failed", name, out)
        return None
