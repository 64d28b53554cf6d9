"""Compiled UNet with hot-swapped LoRA styles: switching styles causes no recompile, and the compiled
output matches eager. One inductor compile of the tiny UNet on the CPU (the slow part of this file)."""

from __future__ import annotations

import pytest
import torch

from engine import tiny
from engine.compiled import SLOT, CompiledUNet, NotHotSwappable, neutral_lora


def _pipe():
    tokenizer = tiny.tiny_tokenizer()
    return tiny.sd_pipeline(tiny.tiny_vae(), tiny.tiny_text_encoder(len(tokenizer)), tokenizer, tiny.tiny_unet())


def _style(unet: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A real LoRA state dict of a given rank over the attention projections, with non-zero B."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in neutral_lora(unet, rank).items():
        if any(f".{t}.lora_" in key for t in ("to_q", "to_k", "to_v", "to_out.0")):
            state[key] = torch.randn(value.shape, generator=generator) * 0.2
    return state


def _unet_out(pipe, latents, text) -> torch.Tensor:
    with torch.inference_mode():
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


def test_style_switches_under_compile_never_recompile_and_match_eager() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled_pipe, eager_pipe = _pipe(), _pipe()
    style_a = _style(compiled_pipe.unet, rank=4, seed=1)
    style_b = _style(compiled_pipe.unet, rank=8, seed=2)  # another rank: padded to the slot's
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, tiny.CROSS_ATTENTION_DIM, generator=torch.Generator().manual_seed(1))

    engine = CompiledUNet(compiled_pipe, target_rank=8)
    base = _unet_out(compiled_pipe, latents, text)  # the compile happens here, once
    frames_after_first_compile = counters["stats"]["unique_graphs"]
    outputs = {}
    for name, state, weight in (("a", style_a, 1.0), ("b", style_b, 0.5), ("none", None, 1.0), ("a2", style_a, 1.0)):
        engine.use(state, weight, key=name.rstrip("2"))
        outputs[name] = _unet_out(compiled_pipe, latents, text)
    assert counters["stats"]["unique_graphs"] == frames_after_first_compile, "a style switch recompiled"
    assert counters["recompiles"] == {} or sum(counters["recompiles"].values()) == 0

    # Same numbers as eager: the base model, and each style loaded the ordinary (non-compiled) way.
    assert torch.allclose(base, _unet_out(eager_pipe, latents, text), atol=1e-4)
    assert torch.allclose(outputs["none"], base, atol=1e-5)
    assert torch.equal(outputs["a"], outputs["a2"])
    assert not torch.allclose(outputs["a"], base, atol=1e-3)
    for name, state, weight in (("a", style_a, 1.0), ("b", style_b, 0.5)):
        eager_pipe.load_lora_weights(dict(state), adapter_name=name)
        eager_pipe.set_adapters([name], [weight])
        assert torch.allclose(outputs[name], _unet_out(eager_pipe, latents, text), atol=1e-4), name
    assert SLOT in compiled_pipe.unet._orig_mod.peft_config


def test_a_style_outside_the_slot_is_refused_and_leaves_the_slot_as_it_was() -> None:
    pipe = _pipe()
    engine = CompiledUNet(pipe, target_rank=4)
    bad = {
        "unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3),
        "unet.conv_in.lora_B.weight": torch.zeros(32, 4, 1, 1),
    }
    with pytest.raises(NotHotSwappable):
        engine.use(bad, 1.0, key="bad")
    with pytest.raises(NotHotSwappable, match="text-encoder"):
        engine.use({"text_encoder.x.lora_A.weight": torch.zeros(1)}, 1.0, key="te")
    assert engine.active is None
    with pytest.raises(ValueError, match="compile mode"):
        CompiledUNet(_pipe(), mode="fastest")
