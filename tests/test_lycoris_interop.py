"""emaki's kohya/A1111 exports read by LyCORIS' own loader (`lycoris-lora`, a reader emaki did not write).

A style is trained (two steps, UNet and text encoder) on the narrow SD1.5-structure models of
tests/sd15_layout.py, so the export carries SD1.5's real layer names, and written by the product's export
(`training.export.write_kohya_file`). `lycoris.kohya.create_network_from_weights` then builds its modules
from the file on a fresh copy of the models: every key of the file must be consumed (loaded into one of its
modules: `load_state_dict` reports none unexpected, and every layer of the file found its module), and the
network must change the text encoder + UNet output as emaki's own loader of the same file does, which in turn
gives what the style gives as trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.render.models import _activate
from engine.render.style_files import base_architecture, load_into, read_style
from engine.settings import load_settings
from tests.sd15_layout import SD15Models, sd15, sd15_folder, sd15_models  # noqa: F401 - fixtures
from tests.test_training import make_folder
from training.dataset import load_dataset
from training.export import write_kohya_file
from training.lora import TrainConfig, Trainer

lycoris_kohya = pytest.importorskip("lycoris.kohya")  # the dev extra has it; a bare install skips


def forward(models: SD15Models) -> torch.Tensor:
    """Text encoder then UNet on fixed inputs: what a style changes, without a scheduler loop."""
    pipe = models.pipe
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer("a fox in a meadow", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


def kohya_export(kind: str, rank: int, base: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two training steps of `kind` at `rank` on the SD1.5-structure models: (the trained style as emaki keeps
    it, its export by the product)."""
    settings = load_settings(profile="sd15", data_dir=tmp_path / "data", base_model=str(base))
    dataset = load_dataset(make_folder(tmp_path / "ds", n=5), settings)
    config = TrainConfig(
        adapter=kind,
        rank=rank,
        network_alpha=rank / 2,  # alpha != rank: the scale must survive the trip
        steps=2,
        learning_rate=5e-2,
        resolution=64,
        checkpoint_every=100,
        train_text_encoder=True,
    )
    trainer = Trainer(settings, dataset, "foxstyle", config, tmp_path / "run", pipeline=sd15_models().pipe)
    result = trainer.run()
    assert result.finished and result.weights is not None
    return result.weights, write_kohya_file(result.weights, str(base), tmp_path / f"{kind}.safetensors")


# rank 16 on these widths (32/64 channels, cross-attention 32): LoKr's factors are both full matrices on every
# layer (the case that lacked `.alpha`); rank 2 keeps its second factor low-rank (`lokr_w2_a/_b` + alpha).
CASES = [("lora", 16), ("loha", 16), ("lokr", 16), ("lokr", 2)]


@pytest.mark.parametrize(("kind", "rank"), CASES, ids=[f"{k}-r{r}" for k, r in CASES])
def test_lycoris_loads_every_key_of_the_export_and_changes_output_as_emaki_does(
    kind: str,
    rank: int,
    sd15_folder: Path,  # noqa: F811 - the fixture
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safetensors.torch import load_file

    trained, exported = kohya_export(kind, rank, sd15_folder, tmp_path)
    file_keys = set(load_file(str(exported)))
    file_layers = {key.split(".", 1)[0] for key in file_keys}
    assert any(k.startswith("lora_te_") for k in file_layers) and any(k.startswith("lora_unet_") for k in file_layers)
    assert all(f"{layer}.alpha" in file_keys for layer in file_layers)
    if kind == "lokr":
        full = rank == 16
        assert all((f"{layer}.lokr_w2" in file_keys) == full for layer in file_layers), "the shapes assumed above"

    # LyCORIS' kohya loader on a fresh copy: it silently skips file layers whose module it cannot find, and
    # `load_state_dict` reports the keys no module took, so both are checked.
    # lycoris-lora 4.1.3 builds a default network before it loads the file's, and on a diffusers UNet that one
    # fails ("duplicated lora name: lora_unet_time_embedding_linear_1": `TimestepEmbedding`, added for Anima,
    # and `time_embedding.linear_1` are both among its default targets). Its default targets play no part in
    # loading a file (that network's modules are dropped), so the class is left without the duplicate here.
    monkeypatch.setattr(
        lycoris_kohya.LycorisNetworkKohya,
        "UNET_TARGET_REPLACE_MODULE",
        [m for m in lycoris_kohya.LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE if m != "TimestepEmbedding"],
    )
    lyco_models = sd15_models()
    unet, text_encoder = lyco_models.pipe.unet, lyco_models.pipe.text_encoder
    if not any(name.startswith("text_model.") for name, _ in text_encoder.named_modules()):
        # transformers 5 dropped CLIP's `text_model.` level; A1111, ComfyUI and kohya's trainer (and so the
        # export) name its layers `lora_te_text_model_encoder_…`, as transformers 4 did. LyCORIS matches names
        # against the module it is given: give it the encoder under that level (the same layer objects).
        text_encoder = torch.nn.ModuleDict({"text_model": text_encoder})
    network, weights_sd = lycoris_kohya.create_network_from_weights(1.0, str(exported), None, text_encoder, unet)
    built = {module.lora_name for module in network.unet_loras + network.text_encoder_loras}
    assert built == file_layers
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    loaded = network.load_state_dict(weights_sd, strict=False)
    assert loaded.unexpected_keys == [] and loaded.missing_keys == []
    network.to(torch.float32)
    lycoris_output = forward(lyco_models)

    # LyCORIS' generic loader (one model, its own `lycoris_` prefix) builds the same UNet modules from the layers.
    from lycoris import create_lycoris_from_weights

    unet_part = {
        "lycoris_" + k.removeprefix("lora_unet_"): v for k, v in weights_sd.items() if k.startswith("lora_unet_")
    }
    generic, _ = create_lycoris_from_weights(1.0, "", sd15_models().pipe.unet, weights_sd=unet_part)
    assert {m.lora_name for m in generic.loras} == {key.split(".", 1)[0] for key in unet_part}

    # emaki's own loader, on fresh copies: of the export, and of the style as trained (its diffusers or peft file).
    def emaki_loaded(path: Path) -> torch.Tensor:
        fresh = sd15_models()
        layers = read_style(path, base_architecture(str(sd15_folder)))
        assert layers.kind == kind
        models = {"unet": fresh.pipe.unet, "text_encoder": fresh.pipe.text_encoder}
        load_into(layers, models, "style")
        _activate(list(models.values()), "style", 1.0)
        return forward(fresh)

    emaki_output = emaki_loaded(exported)
    torch.testing.assert_close(emaki_output, emaki_loaded(trained), atol=1e-6, rtol=1e-5)  # read back identically
    base_output = forward(sd15_models())
    assert (emaki_output - base_output).abs().max() > 1e-2  # the style changes the output, far past the tolerance
    # Per layer LyCORIS' weight change equals peft's exactly; its forward then applies ((W + dW) - W), which
    # rounds a small dW to W's float32 spacing: ~1e-5 here, where peft's (W x + dW x) gives ~1e-6.
    torch.testing.assert_close(lycoris_output, emaki_output, atol=1e-4, rtol=1e-3)
