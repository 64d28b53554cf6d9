"""The tiny profile's video model: an LTX-Video pipeline (transformer, causal video VAE, T5 encoder and its
tokenizer) with seeded random weights, the configs diffusers' own LTX tests use (its VAE given a third
spatio-temporal stage, so it packs 8 frames into a latent frame like the real one). No download: the
tokenizer is built here from a `tokenizers` Unigram model and wrapped as the pipeline's T5 tokenizer class.

Written as a hub repo into emaki's tiny cache (engine/render/tiny_hub.py) and loaded from there by the code
that loads a user's video model (engine/render/video.py).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

WEIGHT_SEED = 7
TEXT_DIM = 32  # the T5 encoder's width = the transformer's caption channels


def tiny_t5_tokenizer() -> Any:
    """A real T5 (SentencePiece-style Unigram) tokenizer over lower-case letters and digits: `<pad>` 0,
    `</s>` 1, `<unk>` 2, each prompt ended by `</s>` as T5's own tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    symbols = string.ascii_lowercase + string.digits
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{c}", -2.5) for c in symbols] + [(c, -3.0) for c in symbols]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def tiny_ltx_pipeline() -> Any:
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXConditionPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(WEIGHT_SEED)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_DIM,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    torch.manual_seed(WEIGHT_SEED + 1)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=TEXT_DIM,
    ).eval()
    torch.manual_seed(WEIGHT_SEED + 2)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),  # 8x in time and space, as LTX's 8 frames a latent
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    return LTXConditionPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def save_tiny_video(folder: Path) -> None:
    tiny_ltx_pipeline().save_pretrained(str(folder), safe_serialization=True)
