"""Style files people bring (`emaki styles add`) and styles that go out (the kohya-format export).

Every file is made from the narrow SD1.5-layout models (tests/sd15_layout.py), so its keys are SD1.5's real
layer names: peft creates the adapter with random weights on one copy of the model, its output is the
reference, and the state is written under each tool's key naming. emaki then registers the file through the
CLI and loads it into another copy; its output must equal the reference (the conversion is exact, scales
included) and differ from the base model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from emaki.cli import main
from engine.coordinator.store import open_store
from engine.render.models import Models, StyleRef, _activate
from engine.render.style_files import MESSAGE_CAP, unload_all
from engine.settings import load_settings
from tests.sd15_layout import SD15Models, sd15, sd15_folder, sd15_models  # noqa: F401 - fixtures
from training.lora import load_training_pipeline

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
State = dict[str, dict[str, torch.Tensor]]  # model -> peft state dict (no adapter name)


# --- models and references -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source() -> SD15Models:
    """The copy adapters are created on (and removed from again after each file is written)."""
    return sd15_models()


@pytest.fixture(scope="module")
def target(sd15_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Models:  # noqa: F811
    """emaki's warm models over another copy of the same (seeded) weights, loaded from their hub-layout
    folders the way a user's base model is."""
    settings = load_settings(
        profile="sd15",
        base_model=str(sd15_folder),
        controlnet_model=str(sd15_folder.parent / "controlnet"),
        depth_model="tiny",
        data_dir=tmp_path_factory.mktemp("target"),
    )
    return Models(settings).load()


def forward(pipe) -> torch.Tensor:
    """Text encoder then UNet on fixed inputs: what a style changes, without a scheduler loop."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    ids = pipe.tokenizer("a fox in a meadow", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


def make_adapter(source: SD15Models, configs: dict[str, PeftConfig], seed: int = 1, std: float = 0.3):
    """Random non-zero adapter weights on the source copy; returns (peft state per model, reference output)."""
    pipe = source.pipe
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for key, config in configs.items():
        inject_adapter_in_model(config, models[key], adapter_name="src")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in configs:
            for name, param in models[key].named_parameters():
                if ".src" in name or name.endswith("src"):
                    base = 1.0 if "ia3_l" in name else 0.0
                    param.copy_(base + torch.randn(param.shape, generator=generator) * std)
    try:
        _activate(list(models.values()), "src", 1.0)
        reference = forward(pipe)
        state = {key: get_peft_model_state_dict(models[key], adapter_name="src") for key in configs}
    finally:
        unload_all(list(models.values()))  # the source copy is plain again for the next file
    return state, reference


# --- writers: each tool's key naming ----------------------------------------------------------------
def kohya_name(model: str, layer: str) -> str:
    return ("lora_unet_" if model == "unet" else "lora_te_") + layer.replace(".", "_")


def split(key: str) -> tuple[str, str]:
    for marker in (".lora_A.", ".lora_B.", ".hada_", ".lokr_", ".ia3_l"):
        if marker in key:
            at = key.index(marker)
            return key[:at], key[at + 1 :]
    raise AssertionError(key)


def write_kohya(state: State, path: Path, alpha: float | None) -> Path:
    """kohya/LyCORIS naming: `lora_unet_<layer>.lora_down.weight`, `.hada_w1_a`, `.lokr_w1`, `.alpha`."""
    out: dict[str, torch.Tensor] = {}
    for model, params in state.items():
        for key, tensor in params.items():
            layer, param = split(key)
            name = kohya_name(model, layer)
            param = param.replace("lora_A.weight", "lora_down.weight").replace("lora_B.weight", "lora_up.weight")
            out[f"{name}.{param}"] = tensor.contiguous()
            if alpha is not None:
                out[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(out, str(path))
    return path


def write_diffusers(state: State, folder: Path, metadata: dict | None = None) -> Path:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=convert_state_dict_to_diffusers(state["unet"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(state["text_encoder"])
        if "text_encoder" in state
        else None,
        unet_lora_adapter_metadata=metadata,
        safe_serialization=True,
    )
    return folder / "pytorch_lora_weights.safetensors"


def write_attention_processors(state: State, path: Path) -> Path:
    """What `unet.save_attn_procs` wrote: `<block>.attn1.processor.to_q_lora.down.weight`, no prefix."""
    out = {}
    for key, tensor in state["unet"].items():
        layer, param = split(key)
        block, _, projection = layer.rpartition(".attn")
        attn, _, proj = projection.partition(".")
        proj = "to_out" if proj == "to_out.0" else proj
        part = "down" if "lora_A" in param else "up"
        out[f"{block}.attn{attn}.processor.{proj}_lora.{part}.weight"] = tensor.contiguous()
    save_file(out, str(path))
    return path


def write_peft_folder(state: State, config: PeftConfig, folder: Path, prefix: str = "base_model.model.") -> Path:
    """peft's own layout (PeftModel.save_pretrained; emaki's trained LoHa/LoKr/IA3)."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({prefix + k: v.contiguous() for k, v in state["unet"].items()}, str(folder / "adapter_model.safetensors"))
    return folder


# --- formats that load --------------------------------------------------------------------------------
def lora(r: int = 4, alpha: float | None = None, modules: list[str] | None = None) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha or r, target_modules=modules or ATTENTION)


Case = Callable[[SD15Models, Path], tuple[Path, torch.Tensor]]


def diffusers_unet_and_text(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    state, ref = make_adapter(source, {"unet": lora(alpha=2), "text_encoder": lora(modules=TEXT_ATTENTION)}, seed=2)
    return write_diffusers(state, tmp, metadata={"r": 4, "lora_alpha": 2}), ref


def peft_lora_folder(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    config = lora(alpha=8)
    state, ref = make_adapter(source, {"unet": config}, seed=3)
    return write_peft_folder(state, config, tmp / "peft"), ref


def peft_lora_bare_file(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    state, ref = make_adapter(source, {"unet": lora()}, seed=4)
    path = tmp / "peft_lora.safetensors"
    save_file({"base_model.model." + k: v.contiguous() for k, v in state["unet"].items()}, str(path))
    return path, ref


def attention_processor_lora(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    state, ref = make_adapter(source, {"unet": lora()}, seed=5)
    return write_attention_processors(state, tmp / "attn_procs.safetensors"), ref


def kohya_lora_with_conv_and_text(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    # LoCon: 3x3 resnet convs and 1x1 proj_in convs too; alpha 2 on rank 4 halves every layer.
    unet = lora(modules=[*ATTENTION, "proj_in", "conv1", "ff.net.2"], alpha=2)
    state, ref = make_adapter(source, {"unet": unet, "text_encoder": lora(modules=TEXT_ATTENTION, alpha=2)}, seed=6)
    return write_kohya(state, tmp / "kohya_lora.safetensors", alpha=2.0), ref


def kohya_loha(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    state, ref = make_adapter(source, {"unet": LoHaConfig(r=4, alpha=2, target_modules=[*ATTENTION, "conv1"])}, 7)
    return write_kohya(state, tmp / "kohya_loha.safetensors", alpha=2.0), ref


def kohya_lokr(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    state, ref = make_adapter(source, {"unet": LoKrConfig(r=2, alpha=1, target_modules=ATTENTION)}, 8)
    assert any("lokr_w2_a" in k for k in state["unet"])  # low-rank second factor: alpha applies
    return write_kohya(state, tmp / "kohya_lokr.safetensors", alpha=1.0), ref


def emaki_peft_loha(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    from training.lora import TrainConfig, adapter_config

    config = adapter_config("loha", TrainConfig(adapter="loha", rank=4))
    state, ref = make_adapter(source, {"unet": config}, 9)
    return write_peft_folder(state, config, tmp / "loha", prefix=""), ref


def emaki_peft_lokr(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    from training.lora import TrainConfig, adapter_config

    config = adapter_config("lokr", TrainConfig(adapter="lokr", rank=4))
    state, ref = make_adapter(source, {"unet": config}, 10)
    return write_peft_folder(state, config, tmp / "lokr", prefix="") / "adapter_model.safetensors", ref


def emaki_peft_ia3(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    from training.lora import TrainConfig, adapter_config

    config = adapter_config("ia3", TrainConfig(adapter="ia3", rank=4))
    state, ref = make_adapter(source, {"unet": config}, 11, std=0.5)
    return write_peft_folder(state, config, tmp / "ia3", prefix=""), ref


def kohya_ia3(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    """LyCORIS/A1111 IA3: `weight` is the factor minus 1, `on_input` says it scales input columns."""
    config = IA3Config(target_modules=["to_k", "to_v", "ff.net.2"], feedforward_modules=["ff.net.2"])
    state, ref = make_adapter(source, {"unet": config}, 14, std=0.5)
    out = {}
    for key, factor in state["unet"].items():
        layer, _ = split(key)
        out[f"{kohya_name('unet', layer)}.weight"] = (factor - 1).reshape(-1).contiguous()
        out[f"{kohya_name('unet', layer)}.on_input"] = torch.tensor(factor.shape[0] == 1)
    save_file(out, str(tmp / "kohya_ia3.safetensors"))
    return tmp / "kohya_ia3.safetensors", ref


def ldm_name(layer: str) -> str:
    """SD1.5's LDM (original checkpoint) block names, as some kohya files spell layers."""
    inner = {"attentions": 1, "resnets": 0}
    if match := re.match(r"(down|up)_blocks\.(\d)\.(attentions|resnets)\.(\d)\.(.*)", layer):
        side, block, kind, index, rest = match.groups()
        number = 3 * int(block) + int(index) + (1 if side == "down" else 0)
        blocks = f"{'input' if side == 'down' else 'output'}_blocks_{number}_{inner[kind]}"
    else:
        kind, index, rest = re.match(r"mid_block\.(attentions|resnets)\.(\d)\.(.*)", layer).groups()
        blocks = f"middle_block_{1 if kind == 'attentions' else 2 * int(index)}"
    rest = rest.replace("conv1", "in_layers.2")
    return f"lora_unet_{blocks}_{rest.replace('.', '_')}"


def kohya_lora_ldm_names(source: SD15Models, tmp: Path) -> tuple[Path, torch.Tensor]:
    state, ref = make_adapter(source, {"unet": lora(modules=[*ATTENTION, "conv1"], alpha=2)}, seed=15)
    out = {}
    for key, tensor in state["unet"].items():
        layer, param = split(key)
        out[f"{ldm_name(layer)}.{'lora_down' if 'lora_A' in param else 'lora_up'}.weight"] = tensor.contiguous()
        out[f"{ldm_name(layer)}.alpha"] = torch.tensor(2.0)
    assert any("input_blocks_1_0_in_layers_2" in k for k in out) and any("middle_block_1_" in k for k in out)
    save_file(out, str(tmp / "kohya_ldm.safetensors"))
    return tmp / "kohya_ldm.safetensors", ref


LOADS: list[tuple[Case, str]] = [
    (diffusers_unet_and_text, "lora"),
    (peft_lora_folder, "lora"),
    (peft_lora_bare_file, "lora"),
    (attention_processor_lora, "lora"),
    (kohya_lora_with_conv_and_text, "lora"),
    (kohya_loha, "loha"),
    (kohya_lokr, "lokr"),
    (kohya_ia3, "ia3"),
    (kohya_lora_ldm_names, "lora"),
    (emaki_peft_loha, "loha"),
    (emaki_peft_lokr, "lokr"),
    (emaki_peft_ia3, "ia3"),
]


@pytest.fixture
def sd15_env(tmp_path: Path, sd15_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811
    monkeypatch.setenv("EMAKI_PROFILE", "sd15")
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(sd15_folder))
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


@pytest.mark.parametrize(("make", "kind"), LOADS, ids=[make.__name__ for make, _ in LOADS])
def test_each_format_registers_its_kind_and_loads_exactly(
    make: Case, kind: str, source: SD15Models, target: Models, sd15_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, reference = make(source, sd15_env)
    assert main(["styles", "add", make.__name__, str(path), "--trigger", "ink"]) == 0, capsys.readouterr().err
    row = open_store(sd15_env / "data").style(make.__name__)
    assert row is not None and row["adapter"] == kind and row["trigger"] == "ink"
    base = forward(target.txt2img)
    target.use_style(StyleRef(row["name"], row["path"], row["trigger"], row["weight"], row["adapter"]))
    try:
        styled = forward(target.txt2img)
    finally:
        target.use_style(None)
    assert (styled - base).abs().max() > 1e-2  # the style changes the output...
    torch.testing.assert_close(styled, reference, atol=1e-4, rtol=1e-4)  # ...exactly as its source model did
    torch.testing.assert_close(forward(target.txt2img), base)  # and switching it off restores the base


def test_a_registered_style_changes_rendered_frames(
    source: SD15Models, target: Models, sd15_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole txt2img render (scheduler loop, VAE), not only one UNet step, comes out different."""
    path, _ = kohya_loha(source, sd15_env)
    assert main(["styles", "add", "loha", str(path)]) == 0, capsys.readouterr().err
    row = open_store(sd15_env / "data").style("loha")
    assert row is not None

    def render() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        return target.txt2img("a fox", num_inference_steps=2, height=64, width=64, generator=generator).images[0]

    plain = np.asarray(render(), dtype=np.float32)
    target.use_style(StyleRef("loha", row["path"], adapter=row["adapter"]))
    try:
        styled = np.asarray(render(), dtype=np.float32)
    finally:
        target.use_style(None)
    assert np.abs(plain - styled).mean() > 0.5


def test_switching_between_styles_of_different_kinds_stays_exact(
    source: SD15Models, target: Models, sd15_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A LoHa on convs, then a LoRA on the same convs, then the LoHa again: kinds are never stacked on one
    layer (peft cannot wrap one kind in another), and each comes back exactly."""
    loha_path, loha_ref = kohya_loha(source, sd15_env)
    lora_path, lora_ref = kohya_lora_with_conv_and_text(source, sd15_env)
    for name, path in (("a", loha_path), ("b", lora_path)):
        assert main(["styles", "add", name, str(path)]) == 0, capsys.readouterr().err
    store = open_store(sd15_env / "data")
    refs = {"a": loha_ref, "b": lora_ref}
    try:
        for name in ("a", "b", "a"):
            row = store.style(name)
            target.use_style(StyleRef(name, row["path"], adapter=row["adapter"]))
            torch.testing.assert_close(forward(target.txt2img), refs[name], atol=1e-4, rtol=1e-4)
    finally:
        target.use_style(None)


# --- refusals: one line, exit 2, nothing registered ---------------------------------------------------
def tensors(**named: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k.replace("__", "."): v for k, v in named.items()}


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1.5: 32 -> 32 here
K2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # cross-attention: 32 -> 32 here


def kohya_file(path: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], **extra: torch.Tensor) -> Path:
    out = {}
    for name, (down, up) in layers.items():
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(4.0)
    out.update(extra)
    save_file(out, str(path))
    return path


def good() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 32) * 0.1, torch.randn(32, 4) * 0.1


def refusal_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "plain_folder").mkdir()
    (tmp / "plain_folder" / "notes.txt").write_text("hi")
    (tmp / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    nan = torch.full((4, 32), float("nan"))
    inf = torch.full((32, 4), float("inf"))
    many_unknown = {f"model.layers.{i}.something_very_long_{i}.weight": torch.zeros(1) for i in range(3000)}
    save_file(many_unknown, str(tmp / "unknown.safetensors"))
    sdxl = {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1280, 4),
    }
    save_file(sdxl, str(tmp / "sdxl.safetensors"))
    return {
        "random bytes": (tmp / "random.safetensors", "not a safetensors file"),
        "a folder": (tmp / "plain_folder", "a folder is only read as a peft adapter"),
        "unknown keys": (tmp / "unknown.safetensors", "unknown keys"),
        "sdxl": (tmp / "sdxl.safetensors", "is an SDXL style"),
        "wrong shapes": (
            kohya_file(tmp / "wide.safetensors", {K2: (torch.randn(4, 768) * 0.1, torch.randn(32, 4) * 0.1)}),
            "shapes do not fit the base model",
        ),
        "zero layers": (
            kohya_file(tmp / "flux.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": good()}),
            "zero layers match the base model",
        ),
        "some layers missing": (
            kohya_file(tmp / "half.safetensors", {Q: good(), "lora_unet_single_blocks_0_linear1": good()}),
            "1 of 2 layers are not in the base model",
        ),
        "nan": (kohya_file(tmp / "nan.safetensors", {Q: (nan, torch.randn(32, 4))}), "not finite"),
        "inf": (kohya_file(tmp / "inf.safetensors", {Q: (torch.randn(4, 32), inf)}), "not finite"),
        "huge": (
            kohya_file(tmp / "huge.safetensors", {Q: (torch.randn(4, 32) * 1e6, torch.randn(32, 4))}),
            "outside a sane range",
        ),
        "all zero": (
            kohya_file(tmp / "zero.safetensors", {Q: (torch.zeros(4, 32), torch.zeros(32, 4))}),
            "would change nothing",
        ),
        "dora": (
            kohya_file(tmp / "dora.safetensors", {Q: good()}, **{f"{Q}.dora_scale": torch.ones(1, 32)}),
            "DoRA",
        ),
    }


REFUSALS = [
    "random bytes",
    "a folder",
    "unknown keys",
    "sdxl",
    "wrong shapes",
    "zero layers",
    "some layers missing",
    "nan",
    "inf",
    "huge",
    "all zero",
    "dora",
]


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_style_files_are_refused_with_one_line(
    case: str, sd15_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, reason = refusal_cases(sd15_env)[case]
    assert main(["styles", "add", "bad", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err[:400]
    assert len(err) <= len("error: ") + MESSAGE_CAP + 1
    assert path.name in err and reason in err, err
    assert open_store(sd15_env / "data").styles() == []


@pytest.mark.parametrize("weight", ["nan", "inf", "-5", "0", "3"])
def test_weight_must_be_finite_and_sane(weight: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import make_random_lora

    path = make_random_lora(tmp_path / "lora")
    code = main(["styles", "add", "x", str(path), "--weight", weight, "--profile", "tiny", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "--weight must be a number above 0 and at most 2" in capsys.readouterr().err
    assert open_store(tmp_path).styles() == []


def test_replacing_a_trained_style_needs_replace_and_drops_its_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.helpers import make_random_lora

    store = open_store(tmp_path)
    trained = make_random_lora(tmp_path / "trained", seed=1)
    store.add_style("ink", str(trained), adapter="lora", dataset_id=3, steps=500, metrics={"fid": 12.0})
    other = make_random_lora(tmp_path / "other", seed=2)
    args = ["styles", "add", "ink", str(other), "--profile", "tiny", "--data-dir", str(tmp_path)]
    assert main(args) == 2
    assert "already exists (trained here, with its metrics); add --replace" in capsys.readouterr().err
    assert store.style("ink")["path"] == str(trained) and json.loads(store.style("ink")["metrics"]) == {"fid": 12.0}
    assert main([*args, "--replace", "--weight", "0.5"]) == 0
    row = store.style("ink")
    assert row["path"] == str(other) and row["weight"] == 0.5
    assert row["metrics"] is None and row["dataset_id"] is None and row["steps"] is None


def test_loading_a_broken_registered_file_is_one_line(target: Models, tmp_path: Path) -> None:
    """A file registered before these checks (or changed since) fails at render time with one short line."""
    from engine.errors import ModelLoadError

    path = tmp_path / "loha.safetensors"
    names = [f"lora_unet_made_up_{i}" for i in range(2000)]
    save_file({f"{n}.hada_w1_a": torch.ones(2, 2) for n in names}, str(path))
    with pytest.raises(ModelLoadError) as error:
        target.use_style(StyleRef("old", str(path), adapter="loha"))
    message = str(error.value)
    assert "\n" not in message and len(message) <= MESSAGE_CAP and "style 'old' could not be loaded" in message


# --- styles that go out: the kohya-format export ---------------------------------------------------------
def test_trained_style_is_exported_and_diffusers_kohya_loader_gives_emakis_output(
    tmp_path: Path, shared_tiny_models: Models
) -> None:
    """A style trained through the service (LoRA on the UNet and the text encoder) is also written in kohya
    format; diffusers' `load_lora_weights` (its kohya conversion: a reader emaki did not write) loads it into
    a fresh pipeline, and text encoder + UNet give what the style gives inside emaki."""
    from safetensors.torch import load_file

    from tests.test_training import make_folder
    from training.lora import TrainConfig
    from training.service import prepare_dataset, style_dir, train_style

    settings = load_settings(profile="tiny", data_dir=tmp_path / "data")
    store = open_store(settings.data_dir)
    config = TrainConfig(
        steps=3, rank=4, learning_rate=5e-2, resolution=32, checkpoint_every=100, train_text_encoder=True
    )
    dataset_id, _ = prepare_dataset(settings, store, make_folder(tmp_path / "ds", n=5), "fox", config=config)
    assert train_style(settings, store, dataset_id).finished
    exported = style_dir(settings, "fox") / "final" / "fox.safetensors"
    keys = set(load_file(str(exported)))
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(k.startswith("lora_te_") for k in keys) and any(k.endswith(".alpha") for k in keys)

    row = store.style("fox")
    shared_tiny_models.use_style(StyleRef("fox", row["path"], adapter=row["adapter"]))
    try:
        emaki_output = forward(shared_tiny_models.txt2img)
    finally:
        shared_tiny_models.use_style(None)
    base = forward(shared_tiny_models.txt2img)
    fresh = load_training_pipeline(shared_tiny_models.settings)  # a second copy of the base, from its files
    fresh.load_lora_weights(str(exported), adapter_name="kohya")
    assert (emaki_output - base).abs().max() > 1e-3
    torch.testing.assert_close(forward(fresh), emaki_output, atol=1e-5, rtol=1e-4)


def test_sd15_lora_with_conv_and_alpha_round_trips_through_diffusers(source: SD15Models, tmp_path: Path) -> None:
    """On SD1.5's real layer names: attention, 3x3 resnet convs, 1x1 proj_in, feed-forward and text encoder,
    alpha != rank; emaki's own diffusers-format file -> kohya export -> diffusers' kohya loader."""
    from training.export import write_kohya_file

    unet = lora(modules=[*ATTENTION, "proj_in", "conv1", "ff.net.2"], alpha=2)
    state, reference = make_adapter(source, {"unet": unet, "text_encoder": lora(modules=TEXT_ATTENTION)}, seed=12)
    weights = write_diffusers(state, tmp_path / "lora", metadata={"r": 4, "lora_alpha": 2})
    base_model = str(save_folder(source, tmp_path))
    exported = write_kohya_file(weights, base_model, tmp_path / "style.safetensors")
    settings = load_settings(profile="sd15", base_model=base_model, data_dir=tmp_path / "data")
    fresh = load_training_pipeline(settings)  # the base from its folder, as the product loads it
    fresh.load_lora_weights(str(exported), adapter_name="kohya")
    torch.testing.assert_close(forward(fresh), reference, atol=1e-4, rtol=1e-4)


def save_folder(models: SD15Models, tmp_path: Path) -> Path:
    from tests.sd15_layout import save_sd15_pipeline

    return save_sd15_pipeline(models, tmp_path / "base")


def reader_delta(kind: str, t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight change A1111 (extensions-builtin/Lora network_hada/network_lokr/network_ia3) and ComfyUI
    (comfy/weight_adapter/lokr.py) compute from one kohya-format layer, written from their code: the product,
    times alpha / rank where the file has a low-rank part and an alpha."""
    alpha = float(t["alpha"]) if "alpha" in t else None
    if kind == "ia3":
        w = t["weight"]
        return weight * (w if bool(t["on_input"]) else w.reshape(-1, 1))
    if kind == "loha":
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        dim = t["hada_w1_b"].shape[0]
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        diff = torch.kron(w1, w2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return (diff * scale).reshape(weight.shape)


LYCORIS_EXPORTS = {
    "loha": lambda: LoHaConfig(r=4, alpha=2, target_modules=ATTENTION),
    "lokr-full": lambda: LoKrConfig(r=4, alpha=2, target_modules=ATTENTION),  # both factors full: scale folded
    "lokr-low-rank": lambda: LoKrConfig(r=2, alpha=1, target_modules=ATTENTION),
    "ia3": lambda: IA3Config(target_modules=["to_k", "to_v", "ff.net.2"], feedforward_modules=["ff.net.2"]),
}


@pytest.mark.parametrize("case", list(LYCORIS_EXPORTS))
def test_lycoris_and_ia3_exports_give_the_same_weight_change_as_peft(
    case: str,
    source: SD15Models,
    sd15_folder: Path,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """emaki's peft LoHa/LoKr/IA3 folders exported in LyCORIS naming: per layer, the change A1111/ComfyUI
    would apply equals the change peft applies inside emaki."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    from training.export import write_kohya_file

    kind = case.split("-")[0]
    config = LYCORIS_EXPORTS[case]()
    unet = source.pipe.unet
    inject_adapter_in_model(config, unet, adapter_name="src")
    generator = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".src" in name or name.endswith("src"):
                param.copy_((1.0 if kind == "ia3" else 0.0) + torch.randn(param.shape, generator=generator) * 0.3)
    changes = {}
    for name, module in unet.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        weight = module.get_base_layer().weight.detach()
        if kind == "ia3" and "src" in getattr(module, "ia3_l", {}):  # peft: W * factor (rows, or input columns)
            changes[name] = weight, weight * (module.ia3_l["src"].detach() - 1)
        elif kind != "ia3" and "src" in getattr(module, "scaling", {}):
            changes[name] = weight, module.get_delta_weight("src").detach()
    state = {"unet": get_peft_model_state_dict(unet, adapter_name="src")}
    unload_all([unet])
    folder = write_peft_folder(state, config, tmp_path / case, prefix="")
    exported = load_file(str(write_kohya_file(folder, str(sd15_folder), tmp_path / "out.safetensors")))
    assert len(changes) >= 16
    for name, (weight, change) in changes.items():
        key = "lora_unet_" + name.replace(".", "_")
        layer = {k[len(key) + 1 :]: v for k, v in exported.items() if k.startswith(key + ".")}
        torch.testing.assert_close(reader_delta(kind, layer, weight), change, atol=1e-5, rtol=1e-4)
