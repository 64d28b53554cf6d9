"""Compiled UNet with hot-swapped LoRA styles: switching styles causes no recompile, and the compiled
output matches eager. One inductor compile of the tiny UNet on the CPU (the slow part of this file)."""

from __future__ import annotations

import pytest
import torch

from engine.render import tiny
from engine.render.compiled import SLOT, CompiledUNet, NotHotSwappable, neutral_lora


def _pipe():
    """A fresh copy of the tiny base, loaded from its files as the trainer loads a base."""
    from engine.settings import Settings
    from training.lora import load_training_pipeline

    return load_training_pipeline(Settings(profile="tiny"))


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


def _save_lora(path, unet, rank: int, seed: int, with_text: bool = False):
    """A diffusers-format LoRA file (the keys `load_lora_weights` reads) over the attention projections."""
    from safetensors.torch import save_file

    state = _style(unet, rank, seed)
    if with_text:
        state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(rank, 32)
        state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(32, rank)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_models_in_compiled_mode_render_styles_like_eager_without_recompiling(tmp_path) -> None:
    """The engine's own compiled mode (EMAKI_COMPILE) on the tiny profile: warmed up at load, two LoRA
    styles (one with text-encoder layers) switched back and forth with no new graph, and the frames
    within float tolerance of the eager engine; a LoHa style is refused with one line."""
    import numpy as np
    from torch._dynamo.utils import counters

    from engine.errors import InvalidRequest
    from engine.render.models import Models, StyleRef
    from engine.settings import load_settings

    torch._dynamo.reset()
    compiled = Models(load_settings(profile="tiny", data_dir=tmp_path / "c", compile="default", compile_max_rank=8))
    eager = Models(load_settings(profile="tiny", data_dir=tmp_path / "e"))
    compiled.load()
    eager.load()
    assert compiled.compiled is not None and (tmp_path / "c" / "compile-cache").is_dir()
    a = StyleRef("a", str(_save_lora(tmp_path / "a.safetensors", eager.txt2img.unet, 4, 1)), weight=1.0)
    b = StyleRef("b", str(_save_lora(tmp_path / "b.safetensors", eager.txt2img.unet, 8, 2, with_text=True)), weight=0.7)

    def frame(models: Models, style: StyleRef | None) -> np.ndarray:
        models.use_style(style)
        image = models.txt2img(
            "a fox", num_inference_steps=2, width=64, height=64, generator=torch.Generator().manual_seed(3)
        ).images[0]
        return np.asarray(image, dtype=np.float32)

    frame(compiled, None)  # the warm-up compiled this size (the profile's default) already
    graphs = counters["stats"]["unique_graphs"]
    for style in (a, b, None, a, b):
        got, want = frame(compiled, style), frame(eager, style)
        assert np.abs(got - want).max() <= 2.0, style  # 8-bit pixels: float-order noise only
    assert counters["stats"]["unique_graphs"] == graphs, "a style switch recompiled"
    assert np.abs(frame(compiled, a) - frame(compiled, None)).mean() > 0.5  # the style does something

    from peft import LoHaConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    donor = tiny.tiny_unet()
    inject_adapter_in_model(LoHaConfig(r=4, target_modules=["to_q"], init_weights=False), donor, adapter_name="x")
    folder = tmp_path / "loha"  # emaki's own peft layout: adapter_config.json + adapter_model.safetensors
    donor.peft_config["x"].save_pretrained(str(folder))
    save_file(get_peft_model_state_dict(donor, adapter_name="x"), str(folder / "adapter_model.safetensors"))
    with pytest.raises(InvalidRequest, match="only LoRA styles") as caught:
        compiled.use_style(StyleRef("h", str(folder / "adapter_model.safetensors"), adapter="loha"))
    assert "\n" not in str(caught.value)
