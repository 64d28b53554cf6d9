"""The `tiny` profiles' models: the same classes as SD1.5 + depth ControlNet + DPT (and the safety checker,
captioner, motion adapter and story LLM), and as SDXL + its depth ControlNet (`tiny-sdxl`), built from tiny
configs with seeded random weights. No download.

Nothing renders from these objects directly: `save_*` writes each as a hub repo into emaki's tiny cache
(engine/render/tiny_hub.py), and the tiny profile loads them from there through the code that loads a user's files.

The configs mirror the ones diffusers' and transformers' own test suites use for these classes.
Seeding makes every process build byte-identical weights, so a seed reproduces frames across runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


# --- the tiny set as files ----------------------------------------------------------------------------
# Each tiny model is saved once as a hub repo in emaki's own cache (engine/render/tiny_hub.py) and loaded from
# there by the code that loads a user's models: these functions write one repo's files into a folder.
def save_sd15(folder: Path) -> None:
    tokenizer = tiny_tokenizer()
    pipe = sd_pipeline(tiny_vae(), tiny_text_encoder(len(tokenizer)), tokenizer, tiny_unet())
    pipe.save_pretrained(str(folder), safe_serialization=True)


def save_controlnet(folder: Path) -> None:
    tiny_controlnet().save_pretrained(str(folder), safe_serialization=True)


# --- SDXL (engine/render/families/sdxl.py) ---------------------------------------------------------------
# SDXL's shape in miniature: two CLIP text encoders (the second with a projection, whose pooled output and the
# six micro-conditioning numbers feed the UNet's `text_time` embedding), cross-attention over both encoders'
# hidden states side by side, linear attention projections, one transformer layer in the first attention
# block and two in the next (so, as in SDXL, `transformer_blocks.1` exists). The two encoders have different
# widths, as SDXL's (768 and 1280) do: diffusers' single-file loader tells the encoders apart by width.
SDXL_TEXT_WIDTHS = (32, 48)
SDXL_CROSS_ATTENTION_DIM = sum(SDXL_TEXT_WIDTHS)  # SDXL: 768 + 1280 = 2048
SDXL_TIME_EMBED_DIM = 8  # SDXL: 256
SDXL_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": BLOCKS,
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
    "transformer_layers_per_block": (1, 2),
    # 6 micro-conditioning numbers (original size, crop corner, target size) + the pooled text embedding
    "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + SDXL_TEXT_WIDTHS[1],
    "cross_attention_dim": SDXL_CROSS_ATTENTION_DIM,
    "norm_num_groups": 32,
}


def tiny_sdxl_unet() -> UNet2DConditionModel:
    torch.manual_seed(WEIGHT_SEED)
    return UNet2DConditionModel(**SDXL_UNET_CONFIG).eval()


def tiny_sdxl_text_encoders(vocab_size: int) -> tuple[CLIPTextModel, Any]:
    from transformers import CLIPTextModelWithProjection

    def config(width: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=width,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=width,
        )

    torch.manual_seed(WEIGHT_SEED)
    first = CLIPTextModel(config(SDXL_TEXT_WIDTHS[0], "quick_gelu")).eval()  # SDXL's CLIP ViT-L: quick_gelu
    torch.manual_seed(WEIGHT_SEED + 7)
    second = CLIPTextModelWithProjection(config(SDXL_TEXT_WIDTHS[1], "gelu")).eval()  # OpenCLIP bigG: gelu
    return first, second


def tiny_sdxl_controlnet() -> ControlNetModel:
    """An SDXL ControlNet made from the tiny SDXL UNet (its blocks, micro-conditioning and cross-attention)."""
    torch.manual_seed(WEIGHT_SEED + 8)
    return ControlNetModel.from_unet(tiny_sdxl_unet(), conditioning_embedding_out_channels=(16, 32)).eval()


def tiny_sdxl_scheduler() -> Any:
    # SDXL's own scheduler config (stable-diffusion-xl-base-1.0/scheduler).
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def sdxl_pipeline() -> Any:
    from diffusers import StableDiffusionXLPipeline

    tokenizer = tiny_tokenizer()
    first, second = tiny_sdxl_text_encoders(len(tokenizer))
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=first,
        text_encoder_2=second,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_sdxl_unet(),
        scheduler=tiny_sdxl_scheduler(),
    )


def save_sdxl(folder: Path) -> None:
    sdxl_pipeline().save_pretrained(str(folder), safe_serialization=True)


def save_sdxl_controlnet(folder: Path) -> None:
    tiny_sdxl_controlnet().save_pretrained(str(folder), safe_serialization=True)


def save_depth(folder: Path) -> None:
    model, processor = tiny_depth()
    model.save_pretrained(str(folder), safe_serialization=True)
    processor.save_pretrained(str(folder))


def save_safety_checker(folder: Path) -> None:
    """SD's checker class over a tiny CLIP; its concept thresholds are 2.0 (cosine scores lie in -1..1, so
    it never flags) until the tiny profile's `safety_tiny_threshold` places them (engine/coordinator/safety.py)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(WEIGHT_SEED + 4)
    model = StableDiffusionSafetyChecker(tiny_clip_config(len(tiny_tokenizer()))).eval()
    with torch.no_grad():
        model.concept_embeds.copy_(torch.randn(model.concept_embeds.shape))
        model.special_care_embeds.copy_(torch.randn(model.special_care_embeds.shape))
        model.concept_embeds_weights.fill_(2.0)
        model.special_care_embeds_weights.fill_(10.0)  # the 'special care' boost stays out of the tiny model
    model.save_pretrained(str(folder), safe_serialization=True)
    tiny_clip_image_processor().save_pretrained(str(folder))


def save_clip(folder: Path) -> None:
    """A seeded random CLIP with the tiny tokenizer: the CLIP score's code runs offline, its number means nothing."""
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(WEIGHT_SEED)
    tokenizer = tiny_tokenizer()
    CLIPModel(tiny_clip_config(len(tokenizer))).eval().save_pretrained(str(folder), safe_serialization=True)
    CLIPProcessor(image_processor=tiny_clip_image_processor(), tokenizer=tokenizer).save_pretrained(str(folder))


CAPTION_WORDS = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "in", "on", "with", "fox", "cat",
    "forest", "meadow", "sky", "house", "red", "green", "painting", "photo", "little", "girl",
)  # fmt: skip


def save_captioner(folder: Path) -> None:
    """A random-weight BLIP with a small word vocabulary (the class the real captioner uses)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(CAPTION_WORDS)})
    torch.manual_seed(WEIGHT_SEED + 5)
    text = {"vocab_size": len(CAPTION_WORDS), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 4, "max_position_embeddings": 64, "bos_token_id": 2, "sep_token_id": 3}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = BlipConfig(
        text_config={**text, "pad_token_id": 0},
        vision_config={**vision, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).eval().save_pretrained(str(folder), safe_serialization=True)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))


def save_motion_adapter(folder: Path) -> None:
    """A random-weight motion adapter for the tiny UNet (the configuration diffusers' own tests use)."""
    from diffusers import MotionAdapter

    torch.manual_seed(WEIGHT_SEED + 3)
    adapter = MotionAdapter(
        block_out_channels=BLOCKS, motion_layers_per_block=2, motion_norm_num_groups=2, motion_num_attention_heads=4
    )
    adapter.eval().save_pretrained(str(folder), safe_serialization=True)


# A chat template of the plainest kind: the story backend talks to every model through `apply_chat_template`.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_llm(folder: Path) -> None:
    """A tiny random Llama-architecture causal LM with a real byte-level BPE tokenizer and chat template:
    the story's `transformers` backend runs end to end on it (what it writes is noise, which the story
    parser refuses, so the fallback story is used, as with any unusable answer)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|begin|>", "<|end|>", "<|pad|>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin|>", eos_token="<|end|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(WEIGHT_SEED + 6)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    LlamaForCausalLM(config).eval().save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
