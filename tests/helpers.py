"""Test helpers: tiny LoRA files made with peft, small datasets, loopback LLM servers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from engine.render import tiny


def make_random_lora(path: Path, seed: int = 7, rank: int = 4, std: float = 0.5) -> Path:
    """A LoRA for the tiny UNet with non-zero random weights, saved as diffusers-format safetensors."""
    unet = tiny.tiny_unet()
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    path.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=layers, safe_serialization=True)
    return path / "pytorch_lora_weights.safetensors"


def sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
