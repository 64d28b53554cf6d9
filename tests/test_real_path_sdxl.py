"""The `sdxl` profile end to end on models as a user has them: narrow random-weight models with SDXL 1.0's real
block structure (tests/sdxl_layout.py: three UNet levels with 1, 2 and 10 transformer layers, two text
encoders), saved in the Hugging Face hub cache's layout under the profile's real hub ids, and the base also as
one original-layout `.safetensors` (how Illustrious, NoobAI and Pony checkpoints are shared). Every run is a real
`python -m emaki` process whose sockets refuse to connect (tests/test_real_path.py's blocker): a download
attempt anywhere fails the run and is recorded.

Real key names matter here: a kohya SDXL style names `input_blocks_7_1_transformer_blocks_9_…`, which the tiny
SDXL set (two levels, one or two transformer layers) does not have.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from engine.settings import PROFILES
from tests.sd15_layout import put_in_hub_cache
from tests.sdxl_layout import narrow_sdxl_controlnet, narrow_sdxl_pipeline, sgm_checkpoint
from tests.test_real_path import dataset, emaki, network_blocker, save_family_independent_models

SDXL = PROFILES["sdxl"]
# The sdxl profile renders 512..2048 px; these narrow models are tested at 128 px to keep the suite fast.
SMALL = {"EMAKI_PROFILE": "sdxl", "EMAKI_MIN_SIZE": "64"}
ANIMATE = ["--frames", "2", "--steps", "2", "--strength", "0.5", "--width", "128", "--height", "128", "--seed", "5"]
ANIMATE += ["-q"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("real-sdxl")
    saved = root / "saved"
    pipe = narrow_sdxl_pipeline()
    folders = {
        "base_model": saved / "base",
        "controlnet_model": saved / "controlnet",
        **save_family_independent_models(saved),
    }
    pipe.save_pretrained(str(folders["base_model"]), safe_serialization=True)
    narrow_sdxl_controlnet(pipe.unet).save_pretrained(str(folders["controlnet_model"]), safe_serialization=True)
    cache = root / "hub"
    for setting, folder in folders.items():
        put_in_hub_cache(folder, cache, SDXL[setting])
    single = root / "noob-like-xl.safetensors"
    save_file(sgm_checkpoint(pipe), str(single))
    blocker, network_log = network_blocker(root)
    return SimpleNamespace(cache=cache, single=single, blocker=blocker, log=network_log)


def frame(folder: Path) -> np.ndarray:
    return np.asarray(Image.open(folder / "frame_01.png"), dtype=np.int16)


def test_check_and_animate_on_the_hub_id_and_on_one_original_layout_file(hub: SimpleNamespace, tmp_path: Path) -> None:
    data = tmp_path / "data"
    check = emaki(hub, data, "models", "check", **SMALL)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "NOT READY" not in check.stdout and "SDXL" in check.stdout, check.stdout

    plain = emaki(hub, data, "animate", "a fox naps, then wakes", "--out", "hub.gif", *ANIMATE, **SMALL)
    assert plain.returncode == 0, plain.stderr
    assert Image.open(tmp_path / "hub.gif").n_frames == 2
    sidecar = json.loads((tmp_path / "hub.json").read_text())
    assert sidecar["models"]["base_model"] == SDXL["base_model"] and sidecar["models"]["family"] == "sdxl"

    # The same weights as one file in the original SGM layout (its config from the profile's hub repo): the
    # same frames, byte for byte.
    single = {**SMALL, "EMAKI_BASE_MODEL": str(hub.single)}
    again = emaki(hub, data, "animate", "a fox naps, then wakes", "--out", "file.gif", *ANIMATE, **single)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "hub_frames" / "frame_02.png").read_bytes() == (
        tmp_path / "file_frames" / "frame_02.png"
    ).read_bytes()
    assert not hub.log.exists(), hub.log.read_text()


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_train_on_the_real_structure_then_render_the_style_and_add_its_export(
    hub: SimpleNamespace, tmp_path: Path, adapter: str
) -> None:
    """kohya's SDXL key names for every level (input_blocks_7_1_transformer_blocks_9_…, te1/te2) are what the
    trainer writes and what the renderer reads back: the trained style changes the frames, and its export
    registers again as an SDXL style."""
    data = tmp_path / "data"
    train = ["train", str(dataset(tmp_path / "ds")), "--name", "fox", "--adapter", adapter, "--resolution", "128"]
    train += ["--steps", "2", "--rank", "4", "--seed", "1", "--lr", "0.01", "-q"]
    trained = emaki(hub, data, *train, **SMALL)
    assert trained.returncode == 0, trained.stderr
    idea = ["animate", "a fox naps", "--frames", "1", *ANIMATE[2:]]
    plain = emaki(hub, data, *idea, "--out", "plain.gif", **SMALL)
    styled = emaki(hub, data, *idea, "--style", "fox", "--out", "fox.gif", **SMALL)
    assert plain.returncode == 0 and styled.returncode == 0, plain.stderr + styled.stderr
    assert np.abs(frame(tmp_path / "plain_frames") - frame(tmp_path / "fox_frames")).max() > 0

    export = next(p for p in data.rglob("fox.safetensors"))
    added = emaki(hub, data, "styles", "add", "fox-again", str(export), **SMALL)
    assert added.returncode == 0, added.stderr
    assert "SDXL" in added.stdout
    # the same file offered to an SD1.5 bot: one line, nothing registered
    refused = emaki(hub, data, "styles", "add", "fox-sd15", str(export), "--profile", "tiny")
    assert refused.returncode == 2 and refused.stderr.startswith("error: 'fox-sd15' is an SDXL style")
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not hub.log.exists(), hub.log.read_text()
