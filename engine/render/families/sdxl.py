"""SDXL-class bases (SDXL 1.0 and its fine-tunes: Illustrious, NoobAI, Pony): two CLIP text encoders, a UNet
with `text_time` micro-conditioning, 1024 px. No refiner: the base alone renders every frame.

The chain is the same as SD1.5's: frame 1 `StableDiffusionXLPipeline`, frames 2..N
`StableDiffusionXLControlNetImg2ImgPipeline` made `from_pipe` over the same modules with an SDXL depth ControlNet.
The default ControlNet is `diffusers/controlnet-depth-sdxl-1.0-small`: the same depth conditioning as the full
`-1.0` (both trained by diffusers on the SDXL base) at a fraction of its size, so the chain's second model costs
less memory than the base's own text encoders; set EMAKI_CONTROLNET_MODEL to the full one for more fidelity.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from engine.render.families.base import GIB, Family, Sizes, StyleKeys

# stable-diffusion-xl-base-1.0's configs (a single-file SDXL checkpoint expands to these; the footprint is
# computed from them). The parameter counts they give match the published ones (UNet 2,567,463,684).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
TEXT_CONFIG: dict[str, Any] = {  # CLIP ViT-L/14's text tower
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}
TEXT_2_CONFIG: dict[str, Any] = {  # OpenCLIP ViT-bigG/14's text tower, with its projection
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "hidden_act": "gelu",
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
}
VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,  # SDXL's VAE overflows in fp16: the pipelines decode in fp32
}


class SDXL(Family):
    name = "sdxl"
    title = "SDXL"
    text_encoders = ("text_encoder", "text_encoder_2")
    # SDXL was trained on ~1 megapixel buckets; much below 768 it falls apart.
    sizes = Sizes(default=1024, min=512, max=2048)
    style_keys = StyleKeys(
        kohya=("lora_unet_", "lora_te1_", "lora_te2_"), diffusers=("unet.", "text_encoder.", "text_encoder_2.")
    )
    real_models: ClassVar[dict[str, str]] = {
        "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
        "controlnet_model": "diffusers/controlnet-depth-sdxl-1.0-small",
    }
    tiny_models: ClassVar[dict[str, str]] = {
        "base_model": "emaki-tiny/sdxl",
        "controlnet_model": "emaki-tiny/controlnet-depth-sdxl",
    }
    # 4x the latent pixels of SD1.5's 512x512 frame: an allowance scaled from SD1.5's, not a measurement.
    working_margin = 3 * GIB

    def txt2img_class(self) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def img2img_class(self) -> type:
        from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

        return StableDiffusionXLControlNetImg2ImgPipeline

    def conditioning(self, height: int, width: int) -> dict[str, Any]:
        """SDXL's micro-conditioning: the image is said to be a whole (uncropped) picture of exactly the size
        rendered, which is what the base was trained to draw at its best (the pipelines' defaults, written
        out so every frame of the chain says the same)."""
        return {"original_size": (height, width), "target_size": (height, width), "crops_coords_top_left": (0, 0)}

    def meta_models(self) -> dict[str, torch.nn.Module]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        with torch.device("meta"):
            return {
                "unet": UNet2DConditionModel.from_config(UNET_CONFIG),
                "vae": AutoencoderKL.from_config(VAE_CONFIG),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2_CONFIG)),
            }
