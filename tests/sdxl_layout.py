"""The tiny SDXL set's weights in the original (SGM) single-file layout, as Illustrious/NoobAI/Pony checkpoints
are shared, for tests that load a single SDXL file.

diffusers ships only the other direction (single_file_utils: original -> diffusers), so the map is written here,
as the mirror of that converter: `model.diffusion_model.*` with input/middle/output blocks (3 per level: two
resnets and a downsampler / three resnets and an upsampler, attentions at `.1`), SDXL's `label_emb.0.{0,2}` for
the `text_time` embedding, `first_stage_model.*` with the VAE's down/mid/up naming, the first text encoder as
`conditioner.embedders.0.transformer.text_model.*` (CLIP's own names) and the second in OpenCLIP's names under
`conditioner.embedders.1.model.*` (`resblocks`, fused `in_proj`, `text_projection` transposed).
"""

from __future__ import annotations

import re
from typing import Any

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
RESNET |= {"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _unet(unet: Any) -> dict[str, torch.Tensor]:
    per = unet.config.layers_per_block + 1
    up_has_attention = ["CrossAttn" in t for t in unet.config.up_block_types]
    rules = [
        (r"^time_embedding\.linear_1\.", lambda m: "time_embed.0.", False),
        (r"^time_embedding\.linear_2\.", lambda m: "time_embed.2.", False),
        (r"^add_embedding\.linear_1\.", lambda m: "label_emb.0.0.", False),
        (r"^add_embedding\.linear_2\.", lambda m: "label_emb.0.2.", False),
        (r"^conv_in\.", lambda m: "input_blocks.0.0.", False),
        (r"^conv_norm_out\.", lambda m: "out.0.", False),
        (r"^conv_out\.", lambda m: "out.2.", False),
        (
            r"^down_blocks\.(\d)\.downsamplers\.0\.conv\.",
            lambda m: f"input_blocks.{per * int(m[1]) + per}.0.op.",
            False,
        ),
        (r"^down_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"input_blocks.{per * int(m[1]) + int(m[2]) + 1}.0.", True),
        (
            r"^down_blocks\.(\d)\.attentions\.(\d)\.",
            lambda m: f"input_blocks.{per * int(m[1]) + int(m[2]) + 1}.1.",
            False,
        ),
        (r"^mid_block\.attentions\.0\.", lambda m: "middle_block.1.", False),
        (r"^mid_block\.resnets\.(\d)\.", lambda m: f"middle_block.{2 * int(m[1])}.", True),
        (r"^up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"output_blocks.{per * int(m[1]) + int(m[2])}.0.", True),
        (r"^up_blocks\.(\d)\.attentions\.(\d)\.", lambda m: f"output_blocks.{per * int(m[1]) + int(m[2])}.1.", False),
        (
            r"^up_blocks\.(\d)\.upsamplers\.0\.",
            lambda m: f"output_blocks.{per * int(m[1]) + per - 1}.{2 if up_has_attention[int(m[1])] else 1}.",
            False,
        ),
    ]
    out = {}
    for key, value in unet.state_dict().items():
        for pattern, prefix, is_resnet in rules:
            match = re.match(pattern, key)
            if match:
                rest = key[match.end() :]
                if is_resnet:
                    layer, _, tail = rest.partition(".")
                    rest = f"{RESNET[layer]}.{tail}"
                key = prefix(match) + rest
                break
        out["model.diffusion_model." + key] = value
    return out


def _vae(vae: Any) -> dict[str, torch.Tensor]:
    last = len(vae.config.up_block_types) - 1
    rules = [
        (r"^encoder\.down_blocks\.(\d)\.resnets\.(\d)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"decoder.up.{last - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"decoder.up.{last - int(m[1])}.upsample."),
        (r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
        (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
        (r"\.conv_norm_out\.", ".norm_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in vae.state_dict().items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        if ".attn_1." in key:
            for diffusers_name, ldm_name in attention.items():
                key = key.replace(f".attn_1.{diffusers_name}.", f".attn_1.{ldm_name}.")
            if value.ndim == 2:  # the original's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + key] = value
    return out


def _open_clip(text_encoder: Any) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP's names (the inverse of diffusers' convert_open_clip_checkpoint)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    prefix = "conditioner.embedders.1.model."
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
        prefix + "text_projection": state.pop("text_projection.weight").T,
    }
    state.pop("embeddings.position_ids", None)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    names |= {"self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        ours, theirs = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (state.pop(f"{ours}self_attn.{p}_proj.{kind}") for p in "qkv")
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat([q, k, v])
            for diffusers_name, open_clip_name in names.items():
                out[f"{theirs}{open_clip_name}.{kind}"] = state.pop(f"{ours}{diffusers_name}.{kind}")
    assert not state, f"unmapped: {sorted(state)[:3]}"
    return out


def sgm_checkpoint(pipe: Any) -> dict[str, torch.Tensor]:
    """An SDXL pipeline's weights in the original single-file layout."""
    out = _unet(pipe.unet) | _vae(pipe.vae) | _open_clip(pipe.text_encoder_2)
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers 5 names CLIPTextModel's weights without the `text_model.` that checkpoints carry
        key = key if key.startswith("text_model.") else "text_model." + key
        out["conditioner.embedders.0.transformer." + key] = value
    return {k: v.contiguous() for k, v in out.items()}


# --- narrow models with SDXL's real block structure ------------------------------------------------------
# engine/render/tiny.py's SDXL has 2 UNet levels, so its module names are not SDXL's. These have SDXL 1.0's
# classes, block types, nesting and transformer depth per level (1, 2, 10), hence its module names and kohya's
# `input_blocks_4_1_transformer_blocks_1_…` / `input_blocks_7_1_transformer_blocks_9_…` names, with narrow
# widths (SDXL: 320/640/1280 channels, text encoders 768 and 1280 wide).
NARROW_BLOCKS = (32, 64, 64)
NARROW_TEXT_WIDTHS = (32, 48)  # two widths: diffusers' single-file loader tells the encoders apart by width
NARROW_TIME_EMBED_DIM = 8


def narrow_sdxl_unet() -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=NARROW_BLOCKS,
        layers_per_block=2,
        attention_head_dim=(2, 4, 4),  # SDXL's config says (5, 10, 20): head counts, which names do not show
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=NARROW_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * NARROW_TIME_EMBED_DIM + NARROW_TEXT_WIDTHS[1],
        cross_attention_dim=sum(NARROW_TEXT_WIDTHS),
        norm_num_groups=32,
    ).eval()


def narrow_sdxl_pipeline() -> Any:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine.render import tiny
    from tests.sd15_layout import sd15_vae

    tokenizer = tiny.tiny_tokenizer()

    def config(width: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=width,
        )

    torch.manual_seed(1)
    first = CLIPTextModel(config(NARROW_TEXT_WIDTHS[0], "quick_gelu")).eval()
    torch.manual_seed(2)
    second = CLIPTextModelWithProjection(config(NARROW_TEXT_WIDTHS[1], "gelu")).eval()
    pipe = StableDiffusionXLPipeline(
        vae=sd15_vae(),  # SDXL's VAE has SD1.5's structure (4 levels, 2 layers each)
        text_encoder=first,
        text_encoder_2=second,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=narrow_sdxl_unet(),
        scheduler=tiny.tiny_sdxl_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def narrow_sdxl_controlnet(unet: Any) -> Any:
    from diffusers import ControlNetModel

    torch.manual_seed(3)
    # Four conditioning blocks downsample the depth image by 8 to the latents, like SDXL's (16, 32, 96, 256).
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32)).eval()
