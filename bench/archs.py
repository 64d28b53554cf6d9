"""Full-size architectures with random weights, built from their published configs, no download:
speed and memory do not depend on the weights' values.

Configs are those of `stable-diffusion-v1-5` (UNet, VAE, CLIP ViT-L/14 text encoder),
`lllyasviel/sd-controlnet-depth` and `Intel/dpt-hybrid-midas`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

from engine.render import tiny
from engine.render.models import Components

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
)
SD15_CONTROLNET = dict(
    in_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    conditioning_embedding_out_channels=(16, 32, 96, 256),
    norm_num_groups=32,
)
CLIP_L_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
    projection_dim=768,
)
DPT_HYBRID = dict(
    is_hybrid=True,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    image_size=384,
    patch_size=16,
    backbone_out_indices=[2, 5, 8, 11],
    neck_hidden_sizes=[256, 512, 768, 768],
    reassemble_factors=[1, 1, 1, 0.5],
    readout_type="project",
    backbone_featmap_shape=[1, 1024, 24, 24],
    fusion_hidden_size=256,
)


def sd15_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**SD15_UNET).eval()


def sd15_vae() -> AutoencoderKL:
    return AutoencoderKL(**SD15_VAE).eval()


def sd15_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).eval()


def sd15_controlnet() -> ControlNetModel:
    return ControlNetModel(**SD15_CONTROLNET).eval()


def dpt_hybrid() -> tuple[DPTForDepthEstimation, DPTImageProcessor]:
    processor = DPTImageProcessor(size={"height": 384, "width": 384}, keep_aspect_ratio=False)
    return DPTForDepthEstimation(DPTConfig(**DPT_HYBRID)).eval(), processor


# Per architecture: builders of the base model parts (built twice by the seed baseline, which
# holds two copies) and of the ControlNet and depth estimator (built once by both).
BUILDERS: dict[str, dict[str, Callable[[], Any]]] = {
    "sd15": {
        "unet": sd15_unet,
        "vae": sd15_vae,
        "text_encoder": sd15_text_encoder,
        "controlnet": sd15_controlnet,
        "depth": dpt_hybrid,
    },
    "tiny": {
        "unet": tiny.tiny_unet,
        "vae": tiny.tiny_vae,
        "text_encoder": lambda: tiny.tiny_text_encoder(len(tiny.tiny_tokenizer())),
        "controlnet": tiny.tiny_controlnet,
        "depth": tiny.tiny_depth,
    },
}


def base_pipeline(arch: str) -> StableDiffusionPipeline:
    build = BUILDERS[arch]
    return tiny.sd_pipeline(build["vae"](), build["text_encoder"](), tiny.tiny_tokenizer(), build["unet"]())


def components(arch: str, seed: int = 0) -> Components:
    if arch not in BUILDERS:
        raise SystemExit(f"unknown arch '{arch}': use {' or '.join(BUILDERS)}")
    torch.manual_seed(seed)
    txt2img = base_pipeline(arch)
    return Components(txt2img, BUILDERS[arch]["controlnet"](), *BUILDERS[arch]["depth"]())
