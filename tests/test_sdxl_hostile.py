"""The SDXL family tried the way a hostile (or just hurried) operator and member would: a base of the other family
than the profile's, a single file that is a `.ckpt` or a damaged `.safetensors`, an SD3/Flux folder, a ControlNet
of the other family, motion mode and IA3 on SDXL, a style checked against a single-file base. Each bad input is
ONE line (exit 2) and writes nothing; each good one works. Tiny models only, built once per module."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from emaki.cli import main
from engine.coordinator.store import open_store
from engine.errors import InvalidRequest, ModelLoadError
from engine.render import model_files, motion, tiny_hub
from engine.render.models import Models, load_base_model
from engine.settings import Settings
from tests.sdxl_layout import sgm_checkpoint
from tests.test_sdxl import kohya_lora

IDEA = ["animate", "a fox", "--frames", "2", "--steps", "2", "--strength", "0.5", "-q", "--device", "cpu"]


def base_spec(ref: str) -> model_files.ModelSpec:
    return model_files.ModelSpec("base model", "base_model", ref, pipeline=True, half=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The tiny SDXL base as one original-layout `.safetensors` and as a `.ckpt`, and a kohya SDXL LoRA for it."""
    root = tmp_path_factory.mktemp("sdxl-hostile")
    pipe = load_base_model(base_spec(tiny_hub.SDXL_BASE), "", torch.float32)
    state = sgm_checkpoint(pipe)
    single = root / "noob-like.safetensors"
    save_file(state, str(single))
    ckpt = root / "pony-like.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, str(ckpt))  # how SGM/LDM trainers save
    style = kohya_lora(SimpleNamespace(txt2img=pipe), root / "xl-style.safetensors")  # type: ignore[arg-type]
    return SimpleNamespace(single=single, ckpt=ckpt, style=style, root=root)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    monkeypatch.setenv("EMAKI_DATA_DIR", str(data))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))  # nothing of the real profiles is downloaded
    monkeypatch.chdir(tmp_path)
    return data


# --- a base of the other family than the profile's ---------------------------------------------------------
@pytest.mark.parametrize(
    ("profile", "base", "wanted"),
    [("tiny", tiny_hub.SDXL_BASE, "tiny-sdxl"), ("tiny-sdxl", "tiny", "tiny")],
)
def test_a_base_of_the_other_family_names_the_profile_to_use(
    profile: str, base: str, wanted: str, cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Not the ControlNet's tensor sizes, nor the other family's frame size: the profile, in one line."""
    monkeypatch.setenv("EMAKI_PROFILE", profile)
    monkeypatch.setenv("EMAKI_BASE_MODEL", base)
    assert main([*IDEA, "--out", "fox.gif"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith(f"set EMAKI_PROFILE={wanted}") and "ControlNet" in line, line
    assert not Path("fox.gif").exists() and not Path("fox.json").exists()
    # `models check` says it on the family line and fails
    assert main(["models", "check", "--device", "cpu"]) == 1
    family = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("family"))
    assert "NOT READY" in family and family.endswith(f"set EMAKI_PROFILE={wanted}")


def test_an_sdxl_file_on_the_sd15_profile_is_told_the_profile_not_to_download_sd15s_config(
    files: SimpleNamespace, cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The sd15 profile's config repo is not downloaded: the file's own keys answer first."""
    monkeypatch.setenv("EMAKI_PROFILE", "sd15")
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(files.single))
    assert main([*IDEA, "--out", "fox.gif"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is SDXL (its keys include conditioner.embedders.*)" in line and line.endswith("set EMAKI_PROFILE=sdxl")
    assert main(["models", "check", "--device", "cpu"]) == 1
    assert "family   NOT READY:" in capsys.readouterr().out


def test_styles_and_training_on_a_base_of_the_other_family_write_nothing(
    files: SimpleNamespace,
    cli_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from tests.test_real_path import dataset

    args = ["--profile", "tiny"]
    monkeypatch.setenv("EMAKI_BASE_MODEL", tiny_hub.SDXL_BASE)
    assert main(["styles", "add", "ink", str(files.style), *args]) == 2
    assert one_error_line(capsys.readouterr().err).endswith("set EMAKI_PROFILE=tiny-sdxl")
    train = ["train", str(dataset(tmp_path / "ds")), "--name", "ink", "--steps", "1", "--resolution", "32", *args]
    assert main(train) == 2
    assert one_error_line(capsys.readouterr().err).endswith("set EMAKI_PROFILE=tiny-sdxl")
    assert not (cli_env / "styles").exists()
    assert not cli_env.exists() or open_store(cli_env).style("ink") is None


# --- single files ---------------------------------------------------------------------------------------------
def test_an_sdxl_ckpt_is_read_for_its_family_without_running_its_pickle(files: SimpleNamespace) -> None:
    assert model_files.base_family(files.ckpt, single_file=True) == ("sdxl", "its keys include conditioner.embedders.*")
    # on the tiny (SD1.5) profile: the profile line, not a state_dict size error from the SD1.5 loader
    settings = Settings(profile="tiny", base_model=str(files.ckpt))
    with pytest.raises(ModelLoadError, match=r"set EMAKI_PROFILE=tiny-sdxl$"):
        Models(settings).load()
    # a pickle that is not only tensors is not run: the family is then not known, nothing is raised here
    evil = files.root / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": SimpleNamespace(a=1)}, str(evil))
    assert model_files.base_family(evil, single_file=True) == ("", "")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_styles_on_a_single_file_base_are_checked_against_the_config_it_loads_with(
    files: SimpleNamespace, suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The file loads with EMAKI_BASE_MODEL_CONFIG's configs; a style made for that model registers (it was checked
    against SD1.5's real configs for a `.ckpt`, and SDXL 1.0's for any file, whatever the file was)."""
    base = files.single if suffix == ".safetensors" else files.ckpt
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(base))
    monkeypatch.setenv("EMAKI_BASE_MODEL_CONFIG", tiny_hub.SDXL_BASE)
    data = tmp_path / "data"
    code = main(["styles", "add", "ink", str(files.style), "--profile", "tiny-sdxl", "--data-dir", str(data)])
    assert code == 0, capsys.readouterr().err
    assert "registered style ink: SDXL LoRA" in capsys.readouterr().out
    assert open_store(data).style("ink")["family"] == "sdxl"


def test_a_damaged_single_file_is_one_line_saying_so(files: SimpleNamespace, tmp_path: Path) -> None:
    whole = files.single.read_bytes()
    header = int.from_bytes(whole[:8], "little")
    for name, content in (("header", whole[:4000]), ("body", whole[: 8 + header + 100]), ("empty", b"")):
        damaged = tmp_path / f"{name}.safetensors"
        damaged.write_bytes(content)
        with pytest.raises(ModelLoadError) as refused:
            model_files.resolve(base_spec(str(damaged)), tiny_hub.SDXL_BASE)
        message = str(refused.value)
        assert "is not a readable .safetensors" in message and "download it again" in message, message
        assert "\n" not in message


@pytest.mark.parametrize(("pipeline", "family"), [("StableDiffusion3Pipeline", "SD3"), ("FluxPipeline", "Flux")])
def test_an_sd3_or_flux_folder_is_named_by_its_family_not_by_its_missing_unet(
    pipeline: str, family: str, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text("{}")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    index = {
        "_class_name": pipeline,
        "transformer": ["diffusers", "Transformer"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=f"is of the {family} family") as refused:
        model_files.resolve(base_spec(str(folder)))
    assert "no weights" not in str(refused.value)


# --- the rest of the model set ---------------------------------------------------------------------------------
def test_a_controlnet_of_the_other_family_names_both_families_and_the_one_to_use(tmp_path: Path) -> None:
    settings = Settings(profile="tiny-sdxl", controlnet_model="tiny", data_dir=tmp_path)
    with pytest.raises(ModelLoadError) as refused:
        Models(settings).load()
    assert str(refused.value) == (
        "the depth ControlNet 'tiny' is made for SD1.5: it does not fit the base model 'emaki-tiny/sdxl', which is "
        "SDXL; set EMAKI_CONTROLNET_MODEL to an SDXL depth ControlNet (e.g. diffusers/controlnet-depth-sdxl-1.0-small)"
    )


def test_motion_mode_on_sdxl_says_so_before_asking_for_an_adapter(cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    """Not "set EMAKI_MOTION_ADAPTER (e.g. an SD1.5 adapter)", which would then be refused for its family."""
    with pytest.raises(InvalidRequest, match=r"the tiny-sdxl profile renders SDXL; use the frame chain"):
        motion.check_request(Settings(profile="tiny-sdxl"))
    assert main([*IDEA, "--profile", "tiny-sdxl", "--motion", "animatediff", "--out", "fox.gif"]) == 2
    assert "renders SDXL; use the frame chain" in one_error_line(capsys.readouterr().err)
    assert not Path("fox.gif").exists()


def test_ia3_on_sdxl_is_refused_where_the_options_are_checked(cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    """`emaki train --print` and the bot's /train recipe (preset_config, before a dataset is downloaded) refuse
    it as the trainer would, not after a moderator approved the dataset."""
    from training.presets import preset_config

    assert main(["train", "--name", "fox", "--adapter", "ia3", "--print", "--profile", "tiny-sdxl"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: adapter 'ia3' is not offered on an SDXL base: use lora, loha, lokr"
    )
    with pytest.raises(InvalidRequest, match="not offered on an SDXL base"):
        preset_config("", {"adapter": "ia3"}, 5, family="sdxl")
    assert preset_config("", {"adapter": "ia3"}, 5, family="sd15").adapter == "ia3"


# --- training on a GPU without bf16 (fp16 frozen weights) ---------------------------------------------------------
def test_training_encodes_the_dataset_with_sdxls_vae_upcast_as_diffusers_does(tmp_path: Path) -> None:
    """SDXL's VAE overflows in fp16 (its config says `force_upcast`); a GPU without bf16 trains over fp16 weights,
    so every cached latent was NaN and the run stopped as 'diverged'. An encoder whose activations pass fp16's
    range (65504) stands for it here, on the CPU: the latents must be finite and the VAE fp16 again after."""
    from tests.test_training import make_folder
    from training.dataset import load_dataset
    from training.lora import TrainConfig, load_training_pipeline
    from training.sdxl import SDXLTrainer

    settings = Settings(profile="tiny-sdxl", data_dir=tmp_path / "data", min_dataset_images=2, device="cpu")
    dataset = load_dataset(make_folder(tmp_path / "ds", n=2), settings)
    pipe = load_training_pipeline(settings)
    assert pipe.vae.config.force_upcast
    pipe.vae.to(torch.float16)
    with torch.no_grad():
        pipe.vae.encoder.conv_in.weight.mul_(3e5)
    config = TrainConfig(steps=1, rank=4, resolution=32)
    data = SDXLTrainer(settings, dataset, "", config, tmp_path / "out", pipeline=pipe).encode_dataset(pipe)
    for entry in data["buckets"].values():
        assert torch.isfinite(entry["mean"]).all() and torch.isfinite(entry["std"]).all()
    assert pipe.vae.dtype == torch.float16


def test_the_sdxl_refiner_given_as_the_base_is_named_as_such(tmp_path: Path) -> None:
    """stabilityai/stable-diffusion-xl-refiner-1.0 is img2img only, without the first text encoder: not 'no weights
    in text_encoder/', and as one file not an SDXL base with half its encoders."""
    folder = tmp_path / "refiner"
    for part in ("unet", "vae", "text_encoder_2"):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text("{}")
        (folder / part / "model.safetensors").write_bytes(b"")
    (folder / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "requires_aesthetics_score": True,
        "text_encoder": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    single = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight": torch.zeros(2)}, str(single))
    for ref in (folder, single):
        with pytest.raises(ModelLoadError, match="is of the SDXL refiner family") as refused:
            model_files.resolve(base_spec(str(ref)), tiny_hub.SDXL_BASE)
        assert "set EMAKI_BASE_MODEL to" in str(refused.value)
