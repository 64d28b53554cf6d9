"""The `tiny` profile: the same component classes as SD1.5 + depth ControlNet + DPT, built from tiny
configs with seeded random weights, in-process. No download; used by tests and the offline smoke run.

The configs mirror the ones diffusers' and transformers' own test suites use for these classes.
Seeding makes every process build byte-identical weights, so a seed reproduces frames across runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessor,
)

if TYPE_CHECKING:
    from engine.models import Components

WEIGHT_SEED = 0
CROSS_ATTENTION_DIM = 32
BLOCKS = (32, 64)


def tiny_tokenizer() -> CLIPTokenizer:
    """A real byte-level BPE CLIP tokenizer over the 256-symbol byte alphabet (no merges)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    for symbol in alphabet:
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_text_encoder(vocab_size: int, layers: int = 2) -> CLIPTextModel:
    torch.manual_seed(WEIGHT_SEED)
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=77,
    )
    return CLIPTextModel(config).eval()


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(WEIGHT_SEED)
    return UNet2DConditionModel(
        block_out_channels=BLOCKS,
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        norm_num_groups=32,
    ).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(WEIGHT_SEED)
    return AutoencoderKL(
        block_out_channels=list(BLOCKS),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=32,
    ).eval()


def tiny_controlnet() -> ControlNetModel:
    torch.manual_seed(WEIGHT_SEED + 1)
    return ControlNetModel(
        block_out_channels=BLOCKS,
        layers_per_block=2,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        conditioning_embedding_out_channels=(16, 32),
        norm_num_groups=32,
    ).eval()


def tiny_scheduler() -> PNDMScheduler:
    # SD1.5's own scheduler config.
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_depth() -> tuple[DPTForDepthEstimation, DPTImageProcessor]:
    torch.manual_seed(WEIGHT_SEED + 2)
    config = DPTConfig(
        image_size=32,
        patch_size=16,
        hidden_size=32,
        fusion_hidden_size=32,
        num_hidden_layers=2,
        backbone_out_indices=[0, 1, 2, 3],
        num_attention_heads=4,
        intermediate_size=37,
        neck_hidden_sizes=[16, 32],
        is_hybrid=False,
    )
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    return DPTForDepthEstimation(config).eval(), processor


def tiny_clip_config(vocab_size: int) -> Any:
    """A tiny CLIP (text and vision towers) with the tiny tokenizer's vocabulary: for the offline CLIP
    score and the offline safety checker (the same class family the real ones use)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )


def tiny_clip_image_processor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def sd_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_components() -> Components:
    from engine.models import Components

    tokenizer = tiny_tokenizer()
    txt2img = sd_pipeline(tiny_vae(), tiny_text_encoder(len(tokenizer)), tokenizer, tiny_unet())
    return Components(txt2img, tiny_controlnet(), *tiny_depth())
