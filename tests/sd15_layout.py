"""Narrow models with SD1.5's real block structure, for tests that need its real key names.

`engine/render/tiny.py` keeps the tiny profile as small as possible (2 UNet blocks), so its module names are not
SD1.5's: a style file written for SD1.5 does not fit it. These models have the same classes, block types,
nesting and therefore the same module names as `stable-diffusion-v1-5/stable-diffusion-v1-5` (UNet with
`CrossAttnDownBlock2D x3 + DownBlock2D`, mirrored up blocks, 2 layers per block, 8 attention heads; a CLIP
text encoder; a 4-block AutoencoderKL; a depth ControlNet made `from_unet`), only with narrow widths
(32/32/64/64 channels, cross-attention dim 32) and fewer text-encoder layers. Weights are seeded random.

`save_sd15_pipeline` writes them as a pipeline folder in the hub's layout (`model_index.json`, `unet/`,
`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, ...), optionally as a weight variant (`fp16`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from engine.render import tiny

WEIGHT_SEED = 0
BLOCKS = (32, 32, 64, 64)  # SD1.5: (320, 640, 1280, 1280)
CROSS_ATTENTION_DIM = 32  # SD1.5: 768
TEXT_LAYERS = 2  # SD1.5: 12; names are `text_model.encoder.layers.N...` either way


def sd15_unet() -> UNet2DConditionModel:
    torch.manual_seed(WEIGHT_SEED)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=BLOCKS,
        layers_per_block=2,
        attention_head_dim=8,  # SD1.5's config value, which diffusers reads as a head count
        cross_attention_dim=CROSS_ATTENTION_DIM,
        norm_num_groups=32,
    ).eval()


def sd15_text_encoder(vocab_size: int) -> CLIPTextModel:
    # CLIP's module names do not depend on its width or depth, and its default activation (quick_gelu)
    # is SD1.5's: the tiny builder with this module's layer count.
    return tiny.tiny_text_encoder(vocab_size, layers=TEXT_LAYERS)


def sd15_vae() -> AutoencoderKL:
    torch.manual_seed(WEIGHT_SEED)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=list(BLOCKS),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    ).eval()


def sd15_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    torch.manual_seed(WEIGHT_SEED + 1)
    # Four conditioning blocks downsample the depth image by 8, like SD1.5's (16, 32, 96, 256).
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32)).eval()


@dataclass
class SD15Models:
    pipe: StableDiffusionPipeline
    controlnet: ControlNetModel


def sd15_models() -> SD15Models:
    """A fresh set (random, seeded: every call gives the same weights)."""
    tokenizer: CLIPTokenizer = tiny.tiny_tokenizer()
    unet = sd15_unet()
    pipe = tiny.sd_pipeline(sd15_vae(), sd15_text_encoder(len(tokenizer)), tokenizer, unet)
    pipe.set_progress_bar_config(disable=True)
    return SD15Models(pipe, sd15_controlnet(unet))


def save_sd15_pipeline(models: SD15Models, folder: Path, variant: str | None = None) -> Path:
    """The pipeline as a hub-layout folder (what `from_pretrained` and `huggingface-cli download` give).
    With `variant="fp16"` the weights are saved in half precision as `*.fp16.safetensors`, as the hub's
    fp16 variant is."""
    pipe = models.pipe
    if variant == "fp16":
        pipe = copy.deepcopy(pipe).to(torch.float16)  # a copy: the caller's models stay fp32
    pipe.save_pretrained(str(folder), safe_serialization=True, variant=variant)
    return folder


def save_sd15_controlnet(models: SD15Models, folder: Path) -> Path:
    models.controlnet.save_pretrained(str(folder), safe_serialization=True)
    return folder


def put_in_hub_cache(folder: Path, cache: Path, repo_id: str, only: tuple[str, ...] = ()) -> Path:
    """Copy a saved model into `cache` the way huggingface_hub stores a download: content-addressed blobs,
    a snapshot of relative links to them, and `refs/main` naming the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        if only and not relative.endswith(only):
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo


def ldm_checkpoint(models: SD15Models) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original LDM single-file layout (how community SD1.5 checkpoints
    are shared): `model.diffusion_model.*` with input/middle/output blocks, `first_stage_model.*` with
    the VAE's down/mid/up naming, `cond_stage_model.transformer.text_model.*` (CLIP's own names)."""
    pipe = models.pipe
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
    resnet |= {"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    # (pattern, LDM prefix, whether the matched block is a resnet, whose layer names LDM spells differently)
    unet_rules = [
        (r"^time_embedding\.linear_1\.", "time_embed.0.", False),
        (r"^time_embedding\.linear_2\.", "time_embed.2.", False),
        (r"^conv_in\.", "input_blocks.0.0.", False),
        (r"^conv_norm_out\.", "out.0.", False),
        (r"^conv_out\.", "out.2.", False),
        (r"^down_blocks\.(\d)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{3 * int(m[1]) + 3}.0.op.", False),
        (r"^down_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.0.", True),
        (
            r"^down_blocks\.(\d)\.attentions\.(\d)\.",
            lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.",
            False,
        ),
        (r"^mid_block\.attentions\.0\.", "middle_block.1.", False),
        (r"^mid_block\.resnets\.(\d)\.", lambda m: f"middle_block.{2 * int(m[1])}.", True),
        (r"^up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.0.", True),
        (r"^up_blocks\.(\d)\.attentions\.(\d)\.", lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.", False),
        (
            r"^up_blocks\.(\d)\.upsamplers\.0\.",
            lambda m: f"output_blocks.{3 * int(m[1]) + 2}.{1 if m[1] == '0' else 2}.",
            False,
        ),
    ]
    out: dict[str, torch.Tensor] = {}
    for key, value in pipe.unet.state_dict().items():
        for pattern, prefix, is_resnet in unet_rules:
            match = re.match(pattern, key)
            if match:
                rest = key[match.end() :]
                if is_resnet:
                    layer, _, tail = rest.partition(".")
                    rest = f"{resnet[layer]}.{tail}"
                key = (prefix(match) if callable(prefix) else prefix) + rest
                break
        out["model.diffusion_model." + key] = value
    vae_rules = [
        (r"^encoder\.down_blocks\.(\d)\.resnets\.(\d)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"decoder.up.{3 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"decoder.up.{3 - int(m[1])}.upsample."),
        (r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
        (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
        (r"\.conv_norm_out\.", ".norm_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in pipe.vae.state_dict().items():
        for pattern, replacement in vae_rules:
            key = re.sub(pattern, replacement, key)
        if ".attn_1." in key:
            for diffusers_name, ldm_name in attention.items():
                key = key.replace(f".attn_1.{diffusers_name}.", f".attn_1.{ldm_name}.")
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + key] = value
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers 5 names CLIPTextModel's weights without the `text_model.` that checkpoints carry
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="session")
def sd15() -> SD15Models:
    """Built once per session; import this fixture into a test module (`from tests.sd15_layout import sd15`).
    Tests that add adapters must remove them (or use `sd15_models()` for a private copy)."""
    return sd15_models()


@pytest.fixture(scope="session")
def sd15_folder(sd15: SD15Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline saved once in the hub's layout, and its ControlNet beside it in `controlnet/`."""
    root = tmp_path_factory.mktemp("sd15")
    save_sd15_controlnet(sd15, root / "controlnet")
    return save_sd15_pipeline(sd15, root / "stable-diffusion-v1-5")
