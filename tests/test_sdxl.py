"""The SDXL family (engine/render/families/sdxl.py) on the tiny SDXL set: real SDXL classes (two CLIP text
encoders, a `text_time` UNet, an SDXL ControlNet), random weights, loaded from disk through the user's path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emaki.cli import main
from engine.coordinator.store import open_store
from engine.errors import InvalidRequest, ModelLoadError
from engine.params import AnimationParams
from engine.render import model_files, tiny_hub
from engine.render.animate import FramePlan, render_frames
from engine.render.families import FAMILIES, by_name, parameter_counts, running_family
from engine.render.models import Models, StyleRef, load_base_model
from engine.settings import PROFILES, Settings
from tests.sdxl_layout import sgm_checkpoint

PROMPT = "a fox in a snowy forest"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """The tiny SDXL set, loaded once for the module (tests that add styles switch back to none)."""
    settings = Settings(profile="tiny-sdxl", data_dir=tmp_path_factory.mktemp("sdxl"))
    return Models(settings).load()


def txt2img(models: Models, seed: int = 0) -> np.ndarray:
    assert models.family is not None
    generator = torch.Generator("cpu").manual_seed(seed)
    image = models.txt2img(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
        **models.family.conditioning(64, 64),
    ).images[0]
    return np.asarray(image)


def base_spec(ref: str) -> model_files.ModelSpec:
    return model_files.ModelSpec("base model", "base_model", ref, pipeline=True, half=False)


# --- loading -----------------------------------------------------------------------------------------------
def test_the_tiny_sdxl_set_loads_as_a_hub_repo_through_the_users_path(sdxl: Models) -> None:
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLPipeline

    found = model_files.resolve(base_spec(tiny_hub.SDXL_BASE))
    assert found.path.parent.parent == tiny_hub.repo_dir(tiny_hub.SDXL_BASE)  # a hub cache snapshot
    assert model_files.base_family(found.path, single_file=False) == (
        "sdxl",
        "model_index.json names StableDiffusionXLPipeline",
    )
    assert sdxl.family is not None and sdxl.family.name == "sdxl" and sdxl.family_name == "sdxl"
    assert isinstance(sdxl.txt2img, StableDiffusionXLPipeline)
    assert isinstance(sdxl.img2img, StableDiffusionXLControlNetImg2ImgPipeline)
    # from_pipe: one copy of the weights, both text encoders included
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(sdxl.img2img, part) is getattr(sdxl.txt2img, part)
    assert sdxl.img2img.controlnet.config.addition_embed_type == "text_time"


def test_a_single_sdxl_file_in_the_original_layout_loads_and_renders_as_the_folder(
    sdxl: Models, tmp_path: Path
) -> None:
    """Illustrious/NoobAI/Pony are shared as one `.safetensors` in the original SGM key layout."""
    single = tmp_path / "illustrious-like.safetensors"
    save_file(sgm_checkpoint(sdxl.txt2img), str(single))
    assert model_files.base_family(single, single_file=True) == ("sdxl", "its keys include conditioner.embedders.*")
    pipe = load_base_model(base_spec(str(single)), tiny_hub.SDXL_BASE, torch.float32)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, folder = getattr(pipe, part).state_dict(), getattr(sdxl.txt2img, part).state_dict()
        mine = {k: v for k, v in mine.items() if not k.endswith("position_ids")}
        folder = {k: v for k, v in folder.items() if not k.endswith("position_ids")}
        assert mine.keys() == folder.keys(), part
        assert all(torch.equal(mine[k], folder[k]) for k in mine), part
    # and it renders the same image as the folder
    pipe.set_progress_bar_config(disable=True)
    from_file = Models(sdxl.settings, components=None)
    from_file.txt2img, from_file.family = pipe, sdxl.family
    assert np.array_equal(txt2img(from_file), txt2img(sdxl))


def test_a_single_sdxl_file_with_an_sd15_config_is_one_line(sdxl: Models, tmp_path: Path) -> None:
    single = tmp_path / "pony-like.safetensors"
    save_file(sgm_checkpoint(sdxl.txt2img), str(single))
    with pytest.raises(
        ModelLoadError, match=r"one SDXL file but its config .* SD1\.5 family: set EMAKI_BASE_MODEL_CONFIG"
    ):
        load_base_model(base_spec(str(single)), "tiny", torch.float32)


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        ({"cond_stage_model.model.transformer.resblocks.0.ln_1.weight": torch.zeros(2)}, "SD2"),
        ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, "Flux"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2, 2)}, "SD3"),
    ],
)
def test_bases_of_other_families_are_still_refused_in_one_line(
    keys: dict[str, torch.Tensor], family: str, tmp_path: Path
) -> None:
    single = tmp_path / "model.safetensors"
    save_file(keys, str(single))
    with pytest.raises(ModelLoadError) as refused:
        model_files.resolve(base_spec(str(single)), "tiny")
    message = str(refused.value)
    assert f"is of the {family} family" in message and "renders SD1.5 and SDXL-class models" in message
    assert "\n" not in message


def test_an_sd15_controlnet_on_an_sdxl_base_is_one_line(tmp_path: Path) -> None:
    settings = Settings(profile="tiny-sdxl", controlnet_model="tiny", data_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="does not fit the base model") as refused:
        Models(settings).load()
    assert "\n" not in str(refused.value)


# --- the chain ---------------------------------------------------------------------------------------------
def test_a_two_frame_sdxl_chain_renders_repeatably(sdxl: Models) -> None:
    params = AnimationParams(
        idea="a fox",
        frames=2,
        width=64,
        height=64,
        steps=2,
        guidance=5.0,
        strength=0.6,
        seed=7,
        style=None,
        negative_prompt="",
        controlnet_scale=0.8,
        color_coherence=True,
        frame_duration_ms=500,
    )
    plans = [FramePlan(i, f"{PROMPT}, frame {i}", 100 + i, 0.6, 2, 5.0) for i in range(2)]

    def run() -> list[str]:
        frames = [image for _, image in render_frames(sdxl, params, plans)]
        assert [f.size for f in frames] == [(64, 64)] * 2
        return [hashlib.sha256(f.tobytes()).hexdigest() for f in frames]

    first = run()
    assert run() == first  # same seed, same bytes
    assert first[0] != first[1]  # the second frame is its own (img2img with depth ControlNet)


def test_the_family_sizes_are_the_profiles() -> None:
    assert set(FAMILIES or {"sd15": 0, "sdxl": 0}) <= set(model_files.RENDERED_FAMILIES)
    assert set(model_files.RENDERED_FAMILIES) == {by_name(n).name for n in model_files.RENDERED_FAMILIES}
    for profile, family in (("sd15", "sd15"), ("sdxl", "sdxl")):
        sizes = by_name(family).sizes
        assert (PROFILES[profile]["width"], PROFILES[profile]["min_size"], PROFILES[profile]["max_size"]) == (
            sizes.default,
            sizes.min,
            sizes.max,
        )
        assert PROFILES[profile]["base_model"] == by_name(family).real_models["base_model"]
        assert PROFILES[profile]["controlnet_model"] == by_name(family).real_models["controlnet_model"]
    assert PROFILES["tiny-sdxl"]["base_model"] == by_name("sdxl").tiny_models["base_model"]
    assert running_family(PROFILES["tiny-sdxl"]["base_model"]).name == "sdxl"
    assert running_family("tiny").name == "sd15"


def test_memory_figures_are_computed_from_the_real_configs() -> None:
    """Parameter counts of the real bases built on the meta device (the published counts: SDXL's UNet has
    2,567,463,684 parameters, SD1.5's 859,520,964), times bytes per element."""
    sdxl, sd15 = parameter_counts("sdxl"), parameter_counts("sd15")
    assert sdxl["unet"] == 2_567_463_684 and sd15["unet"] == 859_520_964
    assert sdxl["text_encoder"] == sd15["text_encoder"] == 123_060_480 and sdxl["text_encoder_2"] == 694_659_840
    assert by_name("sdxl").memory(torch.float16).bytes() == 2 * sum(sdxl.values())


# --- styles --------------------------------------------------------------------------------------------------
# Layers of the tiny SDXL (diffusers names) and their kohya SDXL names (SGM blocks: 3 per level).
UNET_LAYERS = {
    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": "input_blocks_4_1_transformer_blocks_1_attn1_to_q",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k": "input_blocks_5_1_transformer_blocks_0_attn2_to_k",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_v": "middle_block_1_transformer_blocks_0_attn1_to_v",
    "up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2": "output_blocks_1_1_transformer_blocks_1_ff_net_2",
}
TEXT_LAYER = "text_model.encoder.layers.0.self_attn.q_proj"


def shapes(models: Models) -> dict[str, tuple[str, tuple[int, int]]]:
    """(model, (out, in)) of each layer a test style adapts."""
    pipe = models.txt2img
    out = {f"lora_unet_{k}": ("unet", tuple(pipe.unet.get_submodule(d).weight.shape)) for d, k in UNET_LAYERS.items()}
    for prefix, model in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        encoder = getattr(pipe, model)
        layer = encoder.get_submodule(TEXT_LAYER if hasattr(encoder, "text_model") else TEXT_LAYER[11:])
        out[prefix + TEXT_LAYER.replace(".", "_")] = (model, tuple(layer.weight.shape))
    return out


def kohya_lora(models: Models, path: Path, rank: int = 4) -> Path:
    torch.manual_seed(1)
    tensors = {}
    for name, (_, (out, inp)) in shapes(models).items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp) * 0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank) * 0.5
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def kohya_loha(models: Models, path: Path, rank: int = 4) -> Path:
    torch.manual_seed(2)
    tensors = {}
    for name, (_, (out, inp)) in shapes(models).items():
        for w in ("w1", "w2"):
            tensors[f"{name}.hada_{w}_a"] = torch.randn(out, rank) * 0.5
            tensors[f"{name}.hada_{w}_b"] = torch.randn(rank, inp) * 0.5
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def diffusers_lora(models: Models, path: Path, rank: int = 4) -> Path:
    torch.manual_seed(3)
    tensors = {}
    layers = {f"unet.{d}": shapes(models)[f"lora_unet_{k}"][1] for d, k in UNET_LAYERS.items()}
    for model, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        layers[f"{model}.{TEXT_LAYER}"] = shapes(models)[prefix + TEXT_LAYER.replace(".", "_")][1]
    for name, (out, inp) in layers.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, inp) * 0.5
        tensors[f"{name}.lora_B.weight"] = torch.randn(out, rank) * 0.5
    save_file(tensors, str(path))
    return path


STYLE_FILES = {"kohya LoRA": kohya_lora, "diffusers LoRA": diffusers_lora, "LyCORIS LoHa": kohya_loha}


@pytest.mark.parametrize("kind", list(STYLE_FILES))
def test_sdxl_styles_change_the_output_and_switch_off(sdxl: Models, kind: str, tmp_path: Path) -> None:
    path = STYLE_FILES[kind](sdxl, tmp_path / "style.safetensors")
    plain = txt2img(sdxl)
    try:
        sdxl.use_style(StyleRef(name=f"xl-{kind}", path=str(path), version=kind))
        styled = txt2img(sdxl)
        # every adapted model holds the style: the UNet and both text encoders
        for model in ("unet", "text_encoder", "text_encoder_2"):
            assert getattr(sdxl.txt2img, model).peft_config, model
    finally:
        sdxl.use_style(None)
    assert np.abs(styled - plain).max() > 1e-3
    assert np.array_equal(txt2img(sdxl), plain)  # off again: the base model's own output


def test_a_kohya_sdxl_lora_applies_as_diffusers_own_loader_applies_it(sdxl: Models, tmp_path: Path) -> None:
    """diffusers' `load_lora_weights` converts kohya SDXL UNet keys (`_maybe_map_sgm_blocks_to_diffusers`): emaki's
    reading of the same file gives the same image. (UNet layers only: diffusers 0.42's text-encoder path cannot
    load into transformers 5's flattened CLIPTextModel, "Could not automatically infer state dict type".)"""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    full = kohya_lora(sdxl, tmp_path / "full.safetensors")
    path = tmp_path / "kohya.safetensors"
    save_file({k: v for k, v in load_file(str(full)).items() if k.startswith("lora_unet_")}, str(path))
    try:
        sdxl.use_style(StyleRef(name="xl-kohya-vs-diffusers", path=str(path), version="1"))
        ours = txt2img(sdxl)
    finally:
        sdxl.use_style(None)
    folder = model_files.resolve(base_spec(tiny_hub.SDXL_BASE)).path
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    theirs = Models(sdxl.settings)
    theirs.txt2img, theirs.family = pipe, sdxl.family
    assert np.abs(txt2img(theirs) - ours).max() < 1e-4


def test_a_style_of_the_other_family_is_refused_in_one_line(
    sdxl: Models, shared_tiny_models: Models, tmp_path: Path
) -> None:
    from tests.sd15_layout import sd15_models

    xl_style = kohya_lora(sdxl, tmp_path / "xl.safetensors")
    with pytest.raises(InvalidRequest) as refused:
        shared_tiny_models.use_style(StyleRef(name="ink", path=str(xl_style)))
    assert str(refused.value).startswith("'ink' is an SDXL style; this bot renders SD1.5 (xl.safetensors: ")
    assert "\n" not in str(refused.value)
    # an SD1.5 kohya LoRA (SD1.5's real block names) on the SDXL base
    unet = sd15_models().pipe.unet
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    out, inp = unet.get_submodule(layer).weight.shape
    name = "lora_unet_" + layer.replace(".", "_")
    sd15_style = tmp_path / "sd15.safetensors"
    save_file(
        {f"{name}.lora_down.weight": torch.randn(4, inp), f"{name}.lora_up.weight": torch.randn(out, 4)},
        str(sd15_style),
    )
    with pytest.raises(InvalidRequest, match=r"^'wash' is an SD1\.5 style; this bot renders SDXL \(sd15\.safetensors"):
        sdxl.use_style(StyleRef(name="wash", path=str(sd15_style)))
    assert not sdxl.loaded_styles.get("style_wash")


def test_styles_add_records_the_family_and_autocomplete_offers_the_running_familys(
    sdxl: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    xl_style = kohya_lora(sdxl, tmp_path / "xl.safetensors")
    assert main(["styles", "add", "ink", str(xl_style), "--profile", "tiny-sdxl", "--data-dir", str(data)]) == 0
    assert "registered style ink: SDXL LoRA from a kohya LoRA file" in capsys.readouterr().out
    # the same file on an SD1.5 bot: one line, nothing registered
    assert main(["styles", "add", "wash", str(xl_style), "--profile", "tiny", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    refusal = (
        "'wash' is an SDXL style; this bot renders SD1.5 (xl.safetensors: it has layers for a second text encoder)"
    )
    assert err == f"error: {refusal}\n"
    store = open_store(data)
    assert store.style("ink")["family"] == "sdxl" and store.style("wash") is None
    store.add_style("old", str(xl_style))  # a row that does not say (a trainer's): SD1.5, as every style before
    assert store.style_choices(None, True, "", family="sdxl") == ["ink"]
    assert store.style_choices(None, True, "", family="sd15") == ["old"]
    assert store.style_choices(None, True, "") == ["ink", "old"]


def test_the_sidecar_and_models_check_state_the_family(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    monkeypatch.setenv("EMAKI_PROFILE", "tiny-sdxl")
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "fox.gif"
    code = main(
        [
            "animate",
            "a fox",
            "--out",
            str(out),
            "--frames",
            "2",
            "--steps",
            "2",
            "--strength",
            "0.5",
            "-q",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    sidecar = json.loads((tmp_path / "fox.json").read_text())
    assert sidecar["models"]["family"] == "sdxl" and sidecar["models"]["profile"] == "tiny-sdxl"
    capsys.readouterr()
    main(["models", "check", "--device", "cpu"])
    family = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("family"))
    assert family.startswith("family   SDXL (model_index.json names StableDiffusionXLPipeline)")
