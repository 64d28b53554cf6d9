"""Stable Diffusion 1.5 (and its fine-tunes): one CLIP text encoder, 512 px, the family emaki started with."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from engine.render.families.base import GIB, NO_SAFETY_CHECKER, Family, Sizes, StyleKeys

# stable-diffusion-v1-5's configs (what a single-file SD1.5 checkpoint expands to, and what its footprint is
# computed from).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}
VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}


class SD15(Family):
    name = "sd15"
    title = "SD1.5"
    text_encoders = ("text_encoder",)
    sizes = Sizes(default=512, min=256, max=1024)
    style_keys = StyleKeys(kohya=("lora_unet_", "lora_te_"), diffusers=("unet.", "text_encoder."))
    real_models: ClassVar[dict[str, str]] = {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "controlnet_model": "lllyasviel/sd-controlnet-depth",
    }
    tiny_models: ClassVar[dict[str, str]] = {
        "base_model": "emaki-tiny/sd15",
        "controlnet_model": "emaki-tiny/sd15-controlnet-depth",
    }
    # Activations of a 512x512 frame with classifier-free guidance (attention at 64x64 latents, VAE decode).
    working_margin = int(1.5 * GIB)

    def txt2img_class(self) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def img2img_class(self) -> type:
        from diffusers import StableDiffusionControlNetImg2ImgPipeline

        return StableDiffusionControlNetImg2ImgPipeline

    def load_kwargs(self) -> dict[str, Any]:
        return dict(NO_SAFETY_CHECKER)

    def meta_models(self) -> dict[str, torch.nn.Module]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            return {
                "unet": UNet2DConditionModel.from_config(UNET_CONFIG),
                "vae": AutoencoderKL.from_config(VAE_CONFIG),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
            }
