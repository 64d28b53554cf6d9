"""The GPU memory an SDXL preset's weights and training state take, computed (no GPU was available to measure).

The SDXL base is built from its published configs (stabilityai/stable-diffusion-xl-base-1.0: `unet/`, `vae/`,
`text_encoder/` (CLIP ViT-L), `text_encoder_2/` (OpenCLIP ViT-bigG) `config.json`) on the meta device, so
parameters are counted, never read or allocated; the preset's adapter is injected there by peft the way the trainer
injects it. What is counted:
- the frozen base (UNet, both text encoders and the VAE stay on the GPU during a run) at 2 bytes (bf16/fp16);
- every trained parameter at 16 bytes: fp32 weight, fp32 gradient, AdamW's two fp32 moments.
Activations are NOT in these figures: they depend on the resolution, batch and gradient checkpointing, and were not
measured. kohya documents SDXL LoRA training in 8 GB of GPU memory (10 GB recommended) with U-Net only, gradient
checkpointing, cached latents and text-encoder outputs, an 8-bit optimizer or Adafactor and dim 4-8
(kohya-ss/sd-scripts docs/train_SDXL-en.md, "Tips for SDXL training").

`python -m training.vram` prints the counts PRESET_PARAMETERS in training/presets.py holds (a test recomputes them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from training.presets import FROZEN_BYTES, TRAINED_BYTES  # bf16 base; fp32 weight, gradient and 2 AdamW moments

GIB = 1024**3

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
}
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_BIGG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


@dataclass(frozen=True)
class TrainingMemory:
    frozen_params: int
    trained_params: int

    @property
    def frozen_bytes(self) -> int:
        return self.frozen_params * FROZEN_BYTES

    @property
    def trained_bytes(self) -> int:
        return self.trained_params * TRAINED_BYTES

    @property
    def total_gib(self) -> float:
        return (self.frozen_bytes + self.trained_bytes) / GIB


def sdxl_models() -> dict[str, torch.nn.Module]:
    """The SDXL base's models, on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "vae": AutoencoderKL(**SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
        }


def sdxl_training_memory(config: Any) -> TrainingMemory:
    """Weights and training state of a run of `config` (a TrainConfig) on the SDXL base."""
    from peft import inject_adapter_in_model

    from training.lora import adapter_config

    models = sdxl_models()
    frozen = sum(p.numel() for model in models.values() for p in model.parameters())
    models["unet"].add_adapter(adapter_config(config.adapter, config), adapter_name="style")
    trained_models = [models["unet"]]
    if config.train_text_encoder:
        text = torch.nn.ModuleDict({k: models[k] for k in ("text_encoder", "text_encoder_2")})
        inject_adapter_in_model(adapter_config(config.adapter, config, text=True), text, adapter_name="style")
        trained_models.append(text)
    trained = sum(p.numel() for m in trained_models for n, p in m.named_parameters() if "style" in n.split("."))
    return TrainingMemory(frozen, trained)


def main() -> None:
    from training.presets import SDXL_PRESETS, preset_config, preset_vram

    for name in SDXL_PRESETS:
        memory = sdxl_training_memory(preset_config(name, {}, n_images=1))
        print(
            f"{name}: frozen {memory.frozen_params} params ({memory.frozen_bytes / GIB:.2f} GiB), "
            f"trained {memory.trained_params} params ({memory.trained_bytes / GIB:.2f} GiB), "
            f"total {memory.total_gib:.2f} GiB before activations"
        )
        print(f"  {preset_vram(name)}")


if __name__ == "__main__":
    main()
