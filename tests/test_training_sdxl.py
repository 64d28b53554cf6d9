"""Training a style on an SDXL base: emaki's tiny SDXL set (engine/render/tiny.py: the real SDXL classes, two CLIP
text encoders, the `text_time` UNet; what the `tiny-sdxl` profile renders with), also copied into a hub cache under
a hub id, loaded the way users' files load (engine/render/models.py `load_base_model`, as the renderer loads it).

Each kind (LoRA, LoHa, LoKr) is trained once for the module (2 steps, UNet and both text encoders, 32 px) on the
pipeline object the test keeps, so the style *as trained* (peft's adapters still in that pipeline) is the
reference. The export must then be read by two readers emaki did not write, with every key of the file taken:
diffusers' `StableDiffusionXLPipeline.load_lora_weights` (LoRA) and lycoris-lora's kohya loader (every kind), and
each must give what the trained adapters give.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.errors import InvalidRequest
from engine.settings import Settings, load_settings
from tests.sd15_layout import put_in_hub_cache
from tests.test_training import make_folder
from training.dataset import load_dataset
from training.export import sgm_unet_layer
from training.lora import TrainConfig, Trainer, TrainResult, load_training_pipeline
from training.sdxl import SDXLTrainer, base_family, encode_tokens, time_ids

REPO = "emaki-test/tiny-sdxl"
KINDS = ("lora", "loha", "lokr")
# The parameters each layer of a kind may have: a LoKr's second factor is full where rank 4 is not smaller than its
# sides (the tiny set's narrow layers) and low-rank (w2_a @ w2_b) on the wider ones, as LyCORIS decides.
KIND_PARAMS = {
    "lora": ({"lora_down.weight", "lora_up.weight", "alpha"},),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},),
    "lokr": ({"lokr_w1", "lokr_w2", "alpha"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
}
TRAIN = dict(steps=2, rank=4, resolution=32, learning_rate=5e-2, train_text_encoder=True, seed=3, checkpoint_every=1)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """emaki's tiny SDXL repo (its folder in the tiny cache), and a copy in a hub cache under REPO."""
    from engine.render import model_files, tiny_hub

    root = tmp_path_factory.mktemp("sdxl")
    spec = model_files.ModelSpec("base model", "base_model", tiny_hub.SDXL_BASE, pipeline=True, half=False)
    folder = model_files.resolve(spec).path
    put_in_hub_cache(folder, root / "hub", REPO)
    return SimpleNamespace(root=root, folder=folder, cache=root / "hub")


def sdxl_settings(hub: SimpleNamespace, data_dir: Path, **overrides: object) -> Settings:
    values = {"base_model": REPO, "device": "cpu", "min_dataset_images": 2, **overrides}
    return load_settings(profile="tiny-sdxl", data_dir=data_dir, **values)


@pytest.fixture
def settings(hub: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub.cache))
    return sdxl_settings(hub, tmp_path / "data")


def two_images(folder: Path) -> Path:
    """A 2-image captioned dataset (72x80 random images: one bucket, cropped on one side)."""
    return make_folder(folder, n=2)


@pytest.fixture(scope="module")
def trained(hub: SimpleNamespace) -> Iterator[dict[str, SimpleNamespace]]:
    """Each kind trained once on its own pipeline, which keeps the trained adapters."""
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(hub.cache))
        settings = sdxl_settings(hub, hub.root / "data")
        dataset = load_dataset(two_images(hub.root / "dataset"), settings)
        for kind in KINDS:
            pipe = load_training_pipeline(settings)
            pipe.set_progress_bar_config(disable=True)
            config = TrainConfig(adapter=kind, **TRAIN)
            trainer = SDXLTrainer(settings, dataset, "foxstyle", config, hub.root / kind, pipeline=pipe)
            result: TrainResult = trainer.run()
            runs[kind] = SimpleNamespace(result=result, pipe=pipe, trainer=trainer)
        yield runs


def fresh_pipe(hub: SimpleNamespace) -> object:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(hub.folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def forward(pipe: object) -> torch.Tensor:
    """Both text encoders then the UNet on fixed inputs: what a style changes, without a scheduler loop."""
    from training.sdxl import tokenize

    tokens = torch.stack([tokenize(t, ["foxstyle, a fox in a meadow"]) for t in (pipe.tokenizer, pipe.tokenizer_2)])
    with torch.no_grad():
        text, pooled = encode_tokens([pipe.text_encoder, pipe.text_encoder_2], tokens)
        latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        sizes = torch.tensor([[80.0, 72.0, 0.0, 4.0, 32.0, 32.0]])
        added = {"text_embeds": pooled, "time_ids": sizes}
        return pipe.unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample


def image(pipe: object) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(7)
    out = pipe("foxstyle, a fox in a meadow", num_inference_steps=2, height=32, width=32, generator=generator)
    return np.asarray(out.images[0], dtype=np.int16)


def file_layers(path: Path) -> dict[str, set[str]]:
    layers: dict[str, set[str]] = {}
    for key in load_file(str(path)):
        layer, _, param = key.partition(".")
        layers.setdefault(layer, set()).add(param)
    return layers


# --- the family, from the files -----------------------------------------------------------------------------
def test_the_family_is_read_from_the_files_and_picks_the_sdxl_trainer(
    hub: SimpleNamespace, settings: Settings, tmp_path: Path
) -> None:
    from training.service import new_trainer

    assert base_family(settings) == "sdxl"  # a hub id in the cache
    folder = sdxl_settings(hub, tmp_path / "d2", base_model=str(hub.folder))
    assert base_family(folder) == "sdxl"  # a diffusers folder
    tiny = load_settings(profile="tiny", data_dir=tmp_path / "d3")
    assert base_family(tiny) == "sd15"  # the tiny profile's own SD1.5 base
    dataset = load_dataset(two_images(tmp_path / "ds"), settings)
    assert type(new_trainer(settings, dataset, "", TrainConfig(), tmp_path / "o")) is SDXLTrainer
    tiny.min_dataset_images = 2
    assert type(new_trainer(tiny, dataset, "", TrainConfig(), tmp_path / "o2")) is Trainer
    with pytest.raises(InvalidRequest, match="adapter 'ia3' is not offered on an SDXL base: use lora, loha, lokr"):
        SDXLTrainer(settings, dataset, "", TrainConfig(adapter="ia3"), tmp_path / "o3")


def test_size_conditioning_follows_the_crop() -> None:
    # 72x80 into 32x32: scaled to 32x36 (cover), 2 px cut top and bottom; a wide image is cut left and right,
    # and its flipped view is cut from the other side.
    assert time_ids((72, 80), (32, 32), flipped=False) == [80, 72, 2, 0, 32, 32]
    assert time_ids((102, 64), (48, 32), flipped=False) == [64, 102, 0, 1, 32, 48]  # 51 px wide: 3 px cut
    assert time_ids((102, 64), (48, 32), flipped=True) == [64, 102, 0, 2, 32, 48]


def test_sgm_block_names_are_diffusers_own_mapping_inverted(hub: SimpleNamespace) -> None:
    """Every attention layer of the tiny SDXL UNet maps to an sgm name that diffusers maps back to it."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    pipe_unet = UNet2DConditionModel.from_pretrained(str(hub.folder / "unet"), local_files_only=True)
    names = [n for n, m in pipe_unet.named_modules() if n.endswith(".to_q")]
    assert names and any(n.startswith("mid_block.") for n in names) and any(n.startswith("up_blocks.") for n in names)
    sgm = {"lora_unet_" + sgm_unet_layer(n, pipe_unet.config.layers_per_block).replace(".", "_"): n for n in names}
    mapped = _maybe_map_sgm_blocks_to_diffusers({f"{k}.lora_down.weight": k for k in sgm}, pipe_unet.config)
    # diffusers renumbers the blocks there and renames them later (`_convert_unet_lora_key`), as here:
    renames = {"input_blocks": "down_blocks", "output_blocks": "up_blocks", "middle_block": "mid_block"}
    back = {}
    for key, value in mapped.items():
        for sgm_name, diffusers_name in renames.items():
            key = key.replace(sgm_name, diffusers_name)
        back[value] = key.removesuffix(".lora_down.weight")
    assert {k: back[k] for k in sgm} == {k: "lora_unet_" + n.replace(".", "_") for k, n in sgm.items()}


# --- the export ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_saved_in_kohya_sdxl_keys_with_its_family(kind: str, trained: dict) -> None:
    run = trained[kind]
    weights = run.result.weights
    assert run.result.finished and run.result.step == 2 and weights.name == "style.safetensors"
    layers = file_layers(weights)
    prefixes = {layer.split("_", 2)[1] for layer in layers}
    assert prefixes == {"unet", "te1", "te2"}
    unet_layers = [layer for layer in layers if layer.startswith("lora_unet_")]
    for block in ("input_blocks_", "middle_block_1_", "output_blocks_"):
        assert any(layer.startswith(f"lora_unet_{block}") for layer in unet_layers)
    assert not any("down_blocks" in layer or "up_blocks" in layer for layer in unet_layers)
    te = [layer for layer in layers if layer.startswith("lora_te")]
    assert all(layer.split("_", 2)[2].startswith("text_model_encoder_layers_") for layer in te)
    assert all(params in KIND_PARAMS[kind] for params in layers.values()), {tuple(sorted(p)) for p in layers.values()}
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["emaki_family"] == "sdxl" and metadata["emaki_adapter"] == kind
    assert metadata["ss_network_module"] == ("networks.lora" if kind == "lora" else "lycoris.kohya")
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4")
    recorded = json.loads((weights.parent / "training.json").read_text())
    assert recorded["adapter"] == kind and recorded["resolution"] == 32


def test_diffusers_load_lora_weights_takes_every_key_and_gives_the_trained_style(
    trained: dict, hub: SimpleNamespace
) -> None:
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    run = trained["lora"]
    weights = run.result.weights
    layers = file_layers(weights)
    pipe = fresh_pipe(hub)
    plain, plain_image = forward(pipe), image(pipe)
    # every kohya key is converted (diffusers raises on a key it cannot rename) ...
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(weights), unet_config=pipe.unet.config)
    assert len(state) == 2 * len(layers) and len(alphas) == len(layers)
    pipe.load_lora_weights(str(weights), adapter_name="fox")
    # ... and each layer of the file found its module in the model it names
    for model, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        loaded = [m for m in getattr(pipe, model).modules() if isinstance(m, LoraLayer) and "fox" in m.lora_A]
        assert len(loaded) == sum(layer.startswith(prefix) for layer in layers), model
    styled = forward(pipe)
    torch.testing.assert_close(styled, forward(run.pipe), atol=1e-5, rtol=1e-4)  # what was trained
    assert (styled - plain).abs().max() > 1e-2
    assert np.abs(image(pipe) - plain_image).max() > 0  # same seed, with vs without the style
    pipe.unload_lora_weights()
    assert np.array_equal(image(pipe), plain_image)


@pytest.mark.parametrize("kind", KINDS)
def test_lycoris_takes_every_key_and_gives_the_trained_style(
    kind: str, trained: dict, hub: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    run = trained[kind]
    layers = file_layers(run.result.weights)
    # lycoris-lora 4.1.3 builds a default network first, which fails on a diffusers UNet (its TimestepEmbedding
    # target duplicates time_embedding.linear_1; see tests/test_lycoris_interop.py); it plays no part in loading.
    monkeypatch.setattr(
        lycoris_kohya.LycorisNetworkKohya,
        "UNET_TARGET_REPLACE_MODULE",
        [m for m in lycoris_kohya.LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE if m != "TimestepEmbedding"],
    )
    pipe = fresh_pipe(hub)
    plain, plain_image = forward(pipe), image(pipe)
    unet, text_encoders = kohya_named(pipe)
    network, weights_sd = lycoris_kohya.create_network_from_weights(
        1.0, str(run.result.weights), None, text_encoders, unet
    )
    assert {module.lora_name for module in network.unet_loras + network.text_encoder_loras} == set(layers)
    network.apply_to(text_encoders, unet, apply_text_encoder=True, apply_unet=True)
    loaded = network.load_state_dict(weights_sd, strict=False)
    assert loaded.unexpected_keys == [] and loaded.missing_keys == []
    network.to(torch.float32)
    styled = forward(pipe)
    # LyCORIS applies ((W + dW) - W): small dW rounds to W's float32 spacing (~1e-5 here).
    torch.testing.assert_close(styled, forward(run.pipe), atol=1e-4, rtol=1e-3)
    assert (styled - plain).abs().max() > 1e-2
    assert np.abs(image(pipe) - plain_image).max() > 0  # same seed, with vs without the style


def kohya_named(pipe: object) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """The pipeline's UNet and text encoders under the names kohya's SDXL files use (the same module objects):
    the UNet's attention blocks as `input_blocks.N.1` / `middle_block.1` / `output_blocks.N.1` (kohya trains its
    own sgm-layout UNet), each text encoder under `text_model.` (transformers 5 dropped that level from
    CLIPTextModel)."""
    unet = pipe.unet
    sgm = torch.nn.Module()
    for name, module in unet.named_modules():
        if re.fullmatch(r"(down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.0", name):
            path = sgm_unet_layer(f"{name}.x", unet.config.layers_per_block).removesuffix(".x").split(".")
            parent = sgm
            for part in path[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.ModuleDict())
                parent = getattr(parent, part)
            parent.add_module(path[-1], module)
    encoders = []
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        named = any(n.startswith("text_model.") for n, _ in encoder.named_modules())
        encoders.append(encoder if named else torch.nn.ModuleDict({"text_model": encoder}))
    return sgm, encoders


def test_an_interrupted_sdxl_run_resumes_bit_for_bit_with_augmentation(settings: Settings, tmp_path: Path) -> None:
    """Flips (the flipped view's own crop conditioning), caption dropout and shuffling through both encoders, the
    text encoders' adapters in the checkpoint: a run stopped at step 2 and resumed equals one run through."""
    dataset = load_dataset(two_images(tmp_path / "ds"), settings)
    config = dict(TRAIN, steps=4, checkpoint_every=2, flip=True, caption_dropout=0.5, shuffle_caption=True)
    whole = SDXLTrainer(settings, dataset, "fox", TrainConfig(**config), tmp_path / "whole").run()
    first = SDXLTrainer(settings, dataset, "fox", TrainConfig(**config), tmp_path / "split").run(
        should_yield=lambda: True
    )
    assert not first.finished and first.step == 2
    resumed = SDXLTrainer(settings, dataset, "fox", TrainConfig(**config), tmp_path / "split")
    second = resumed.run()
    assert second.finished and np.allclose(second.losses, whole.losses, atol=1e-6)
    a, b = load_file(str(whole.weights)), load_file(str(second.weights))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    pipe = load_training_pipeline(settings)  # the fixed-draw loss conditions the whole bucket the same way
    assert resumed.fixed_draw_loss(pipe, draws=1) > 0


# --- presets ------------------------------------------------------------------------------------------------
def test_sdxl_presets_are_kohyas_defaults_clamped_to_the_profile(tmp_path: Path) -> None:
    from training.presets import preset_config

    tiny, sd15 = (load_settings(profile=p, data_dir=tmp_path / p) for p in ("tiny", "sd15"))
    notes: list[str] = []
    lora = preset_config("sdxl-lora", {}, n_images=4, settings=tiny, notes=notes)
    assert (lora.adapter, lora.rank, lora.network_alpha, lora.learning_rate) == ("lora", 32, 16, 1e-4)
    assert (lora.text_encoder_lr, lora.train_text_encoder, lora.noise_offset, lora.min_snr_gamma) == (
        1e-5,
        False,
        0.0357,
        5.0,
    )
    assert (lora.epochs, lora.save_every, lora.gradient_checkpointing) == (10, 4, "on")  # a save every epoch
    assert lora.resolution == 256 and notes == [
        "preset sdxl-lora: resolution 1024 is outside the tiny profile's sizes (32..256); clamped to 256"
    ]
    assert preset_config("sdxl-lora", {}, n_images=4, settings=sd15).resolution == 1024  # SDXL's own buckets
    for kind in ("loha", "lokr"):
        other = preset_config(f"sdxl-{kind}", {"rank": 8}, n_images=4)
        assert (other.adapter, other.rank, other.network_alpha, other.learning_rate, other.epochs) == (
            kind,
            8,  # the user's option wins
            16,
            2e-4,
            16,
        )


def test_each_sdxl_preset_states_its_computed_vram() -> None:
    """The stated counts are what SDXL's configs give (built on the meta device, the preset's adapter injected)."""
    from training.presets import PRESET_PARAMETERS, SDXL_PRESETS, preset_config, preset_vram
    from training.vram import sdxl_training_memory

    assert set(PRESET_PARAMETERS) == set(SDXL_PRESETS)
    for name in SDXL_PRESETS:
        memory = sdxl_training_memory(preset_config(name, {}, n_images=1))
        assert (memory.frozen_params, memory.trained_params) == PRESET_PARAMETERS[name], name
        line = preset_vram(name)
        assert line.startswith(f"{memory.total_gib:.2f} GiB + activations (computed") and "not measured" in line


# --- the CLI ------------------------------------------------------------------------------------------------
def test_emaki_train_print_shows_the_presets_gpu_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from emaki.cli import main

    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    assert main(["train", "--name", "x", "--preset", "sdxl-loha", "--print", "--profile", "tiny-sdxl"]) == 0
    captured = capsys.readouterr()
    assert "# GPU memory: 7.85 GiB + activations (computed" in captured.out
    assert "resolution = 256" in captured.out and "clamped to 256" in captured.err
    assert "# presets for this base (SDXL base): sdxl-lora, sdxl-loha, sdxl-lokr\n" in captured.out


def test_presets_are_offered_for_the_running_bases_family_and_another_familys_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from emaki.cli import main

    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    assert main(["train", "--name", "x", "--print", "--profile", "tiny"]) == 0
    assert "# presets for this base (SD1.5 base): ghibli-lora, anime-ia3-prodigy\n" in capsys.readouterr().out
    for profile, preset, line in (
        (
            "tiny",
            "sdxl-lora",
            "preset 'sdxl-lora' is for SDXL bases; this bot trains SD1.5: use ghibli-lora, anime-ia3-prodigy",
        ),
        (
            "tiny-sdxl",
            "ghibli-lora",
            "preset 'ghibli-lora' is for SD1.5 bases; this bot trains SDXL: use sdxl-lora, sdxl-loha, sdxl-lokr",
        ),
    ):
        assert main(["train", "--name", "x", "--preset", preset, "--print", "--profile", profile]) == 2
        assert capsys.readouterr().err == f"error: {line}\n"


def test_emaki_train_on_an_sdxl_base_registers_the_style(
    hub: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from emaki.cli import main
    from engine.coordinator.store import open_store

    data = tmp_path / "data"
    for key, value in {
        "HF_HUB_CACHE": str(hub.cache),
        "EMAKI_PROFILE": "tiny-sdxl",  # an SDXL base needs an SDXL profile (its ControlNet, its sizes)
        "EMAKI_BASE_MODEL": REPO,
        "EMAKI_DATA_DIR": str(data),
        "EMAKI_DEVICE": "cpu",
        "EMAKI_MIN_DATASET_IMAGES": "2",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    args = ["train", str(two_images(tmp_path / "ds")), "--name", "foxxl", "--trigger", "foxstyle"]
    assert main([*args, "--adapter", "loha", "--steps", "2", "--rank", "4", "--resolution", "32", "-q"]) == 0
    out = capsys.readouterr().out
    assert "style 'foxxl' registered" in out
    style = open_store(data).style("foxxl")
    assert style is not None and style["adapter"] == "loha" and style["trigger"] == "foxstyle"
    assert style["family"] == "sdxl"  # /animate offers it only while the bot renders SDXL
    weights = Path(style["path"])
    assert weights.name == "style.safetensors" and weights.is_file()
    export = weights.parent / "foxxl.safetensors"  # what A1111/ComfyUI take, named after the style
    assert load_file(str(export)).keys() == load_file(str(weights)).keys()
    with safe_open(str(export), framework="pt") as handle:
        assert handle.metadata()["emaki_family"] == "sdxl"


# --- trained by emaki, rendered by emaki: the user's path, end to end ----------------------------------------
CLI_TRAIN = ["--steps", "2", "--rank", "4", "--resolution", "32", "--lr", "5e-2", "--train-text-encoder", "--seed", "3"]
ANIMATE = ["--frames", "2", "--steps", "2", "--strength", "0.5", "--seed", "5", "-q"]


def use_profile(profile: str, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's shell: the profile, the data folder, the CPU (the tiny repos are in emaki's tiny cache)."""
    for key, value in {
        "EMAKI_PROFILE": profile,
        "EMAKI_DATA_DIR": str(data),
        "EMAKI_DEVICE": "cpu",
        "EMAKI_MIN_DATASET_IMAGES": "2",
    }.items():
        monkeypatch.setenv(key, value)


def animated_frames(main: object, name: str, *style: str) -> list[np.ndarray]:
    from PIL import Image

    assert main(["animate", "a fox in a meadow", "--out", f"{name}.gif", *ANIMATE, *style]) == 0
    frames = sorted(Path(f"{name}_frames").glob("frame_*.png"))
    assert len(frames) == 2
    return [np.asarray(Image.open(frame), dtype=np.int16) for frame in frames]


@pytest.mark.parametrize("kind", KINDS)
def test_a_style_trained_with_emaki_train_on_tiny_sdxl_renders_with_emaki_animate(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`emaki train` on the tiny-sdxl profile, then `emaki animate --style`: the frames differ from the same
    command without the style, and the renderer placed every layer of the trained file in the model it names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from emaki.cli import main
    from engine.coordinator.store import open_store
    from engine.render.models import Models, StyleRef

    data = tmp_path / "data"
    use_profile("tiny-sdxl", data, monkeypatch)
    monkeypatch.chdir(tmp_path)
    name = f"fox-{kind}"
    dataset = str(two_images(tmp_path / "ds"))
    assert main(["train", dataset, "--name", name, "--trigger", "foxstyle", "--adapter", kind, *CLI_TRAIN, "-q"]) == 0
    assert f"style '{name}' registered" in capsys.readouterr().out
    style = open_store(data).style(name)
    assert style is not None and style["family"] == "sdxl" and style["adapter"] == kind
    plain = animated_frames(main, "plain")
    styled = animated_frames(main, "styled", "--style", name)
    for with_style, without in zip(styled, plain, strict=True):
        assert np.abs(with_style - without).max() > 0  # same seed, with vs without the style
    again = animated_frames(main, "again", "--style", name)
    assert all(np.array_equal(a, b) for a, b in zip(again, styled, strict=True))  # repeatable
    # every layer of the file was injected into the model its prefix names, none dropped
    layers = file_layers(Path(style["path"]))
    models = Models(load_settings(data_dir=data)).load()
    models.use_style(StyleRef(name=name, path=style["path"], adapter=kind))
    assert models.family is not None and models.family.name == "sdxl"
    for model, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        injected = [
            m
            for m in getattr(models.txt2img, model).modules()
            if isinstance(m, BaseTunerLayer) and "style_" + name.replace("-", "_") in m.active_adapters
        ]
        expected = sum(layer.startswith(prefix) for layer in layers)
        assert expected > 0 and len(injected) == expected, model


def test_a_style_trained_on_sd15_is_refused_on_tiny_sdxl_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from emaki.cli import main
    from engine.coordinator.store import open_store

    data = tmp_path / "data"
    use_profile("tiny", data, monkeypatch)
    monkeypatch.chdir(tmp_path)
    dataset = str(two_images(tmp_path / "ds"))
    assert main(["train", dataset, "--name", "wash", "--steps", "2", "--rank", "4", "--resolution", "32", "-q"]) == 0
    assert open_store(data).style("wash")["family"] == "sd15"
    capsys.readouterr()
    code = main(["animate", "a fox", "--out", "fox.gif", *ANIMATE, "--profile", "tiny-sdxl", "--style", "wash"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: 'wash' is an SD1.5 style; this bot renders SDXL"), err


def test_the_reader_places_every_layer_kohyas_sdxl_names_give_on_the_real_3_level_sdxl() -> None:
    """On SDXL's own configs (3 levels, 2/10 transformer layers, built on the meta device): every attention layer
    the trainer can adapt, named as training/export.py names it (input_blocks/middle_block/output_blocks, te1/te2),
    is read back by the renderer's reader (engine/render/style_files.py) as that same layer of that same model."""
    from engine.render.families import by_name
    from engine.render.style_files import Architecture, _from_kohya

    meta = by_name("sdxl").meta_models()
    models = {name: meta[name] for name in ("unet", "text_encoder", "text_encoder_2")}
    arch = Architecture.of(models)
    attention = re.compile(r"^(down_blocks\.\d+\.attentions|up_blocks\.\d+\.attentions|mid_block\.attentions)\.")
    unet_layers = [name for name in arch.layers["unet"] if attention.match(name)]
    assert len(unet_layers) > 700 and any(n.startswith("up_blocks.1.attentions.2.") for n in unet_layers)
    wanted = {"unet": {"lora_unet_" + sgm_unet_layer(n, 2).replace(".", "_"): n for n in unet_layers}}
    for model, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        names = [n for n in arch.layers[model] if ".self_attn." in n or ".mlp." in n]
        spelled = {n if n.startswith("text_model.") else f"text_model.{n}": n for n in names}
        wanted[model] = {prefix + k.replace(".", "_"): v for k, v in spelled.items()}
    one = torch.zeros(1, 1)
    tensors = {
        f"{k}.{p}": one for named in wanted.values() for k in named for p in ("lora_down.weight", "lora_up.weight")
    }
    layers = _from_kohya(tensors, arch)
    for model, named in wanted.items():
        assert set(layers.models[model]) == set(named.values()), model
