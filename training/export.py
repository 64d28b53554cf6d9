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
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from engine.render.style_files import StyleLayers, base_architecture, read_style, text_encoder_alias
from engine.settings import Settings

log = logging.getLogger(__name__)

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def kohya_state_dict(layers: StyleLayers) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for model, named in layers.models.items():
        for name, weights in named.items():
            if model == "text_encoder" and not name.startswith("text_model."):
                name = text_encoder_alias(name)  # A1111/ComfyUI know CLIP's layers as text_model.encoder...
            key = PREFIXES[model] + name.replace(".", "_")
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


def write_kohya_file(weights: Path, base_model: str, out: Path) -> Path:
    """Convert a style file (any format emaki reads) into one kohya-format file at `out`."""
    from safetensors.torch import save_file

    layers = read_style(weights, base_architecture(base_model), check=False)
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
        return write_kohya_file(weights, settings.base_model, out)
    except Exception:
        log.exception("style '%s' trained, but its kohya-format export %s failed", name, out)
        return None
