"""The `sd15` profile end to end on models as a user has them: narrow random-weight models with SD1.5's real
block structure (tests/sd15_layout.py), saved in the Hugging Face hub cache's exact layout under the profile's
real hub ids, loaded by the code that loads a user's models, with the network blocked.

Each CLI run is a real `python -m emaki` process whose sockets refuse to connect (a `sitecustomize` on its
path), with `HF_HUB_OFFLINE` unset: a download attempt anywhere would fail the run, and is recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from bot.client import EmakiBot, create_bot
from engine.render import tiny
from engine.settings import PROFILES, Settings, load_settings
from tests import test_bot as base
from tests.sd15_layout import (  # noqa: F401 - sd15 is a fixture
    SD15Models,
    ldm_checkpoint,
    put_in_hub_cache,
    save_sd15_controlnet,
    save_sd15_pipeline,
    sd15,
)
from tests.test_bot import results

SD15 = PROFILES["sd15"]
SHARED_MODELS = {
    "depth_model": tiny.save_depth,
    "safety_model": tiny.save_safety_checker,
    "captioner_model": tiny.save_captioner,
    "clip_model": tiny.save_clip,
}
ROOT = Path(__file__).resolve().parent.parent
world = base.world

BLOCK_NETWORK = """
import socket

_LOG = {log!r}
_connect = socket.socket.connect


def _refuse(self, address, *args, **kwargs):
    if self.family == socket.AF_UNIX:
        return _connect(self, address, *args, **kwargs)
    with open(_LOG, "a") as log:
        log.write(f"connect {{address}}\\n")
    raise OSError("network blocked by the test")


def _no_lookup(host, *args, **kwargs):
    with open(_LOG, "a") as log:
        log.write(f"lookup {{host}}\\n")
    raise socket.gaierror("network blocked by the test")


socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.getaddrinfo = _no_lookup
"""


@pytest.fixture(scope="module")
def hub(sd15: SD15Models, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:  # noqa: F811
    """The sd15 profile's models in a hub cache under their real ids (and the base as a plain folder and
    as a single file too), plus a network-blocking sitecustomize."""
    root = tmp_path_factory.mktemp("real")
    saved = root / "saved"
    base_folder = save_sd15_pipeline(sd15, saved / "base")
    folders = {
        "base_model": base_folder,
        "controlnet_model": save_sd15_controlnet(sd15, saved / "controlnet"),
        **save_family_independent_models(saved),
    }
    cache = root / "hub"
    for setting, folder in folders.items():
        put_in_hub_cache(folder, cache, SD15[setting])
    single = root / "community-model.safetensors"
    save_file(ldm_checkpoint(sd15), str(single))
    blocker, network_log = network_blocker(root)
    return SimpleNamespace(cache=cache, base_folder=base_folder, single=single, blocker=blocker, log=network_log)


def save_family_independent_models(saved: Path) -> dict[str, Path]:
    """The models every profile shares whatever its base's family (depth estimator, safety checker, captioner,
    CLIP), as folders under `saved`, by setting."""
    folders = {name: saved / name.removesuffix("_model") for name in SHARED_MODELS}
    for name, save in SHARED_MODELS.items():
        save(folders[name])
    return folders


def network_blocker(root: Path) -> tuple[Path, Path]:
    """A folder holding a sitecustomize.py that refuses every connection and name lookup (put it on a child
    process's PYTHONPATH), and the log it writes each attempt to."""
    blocker = root / "blocker"
    blocker.mkdir()
    network_log = root / "network-attempts.log"
    (blocker / "sitecustomize.py").write_text(BLOCK_NETWORK.format(log=str(network_log)))
    return blocker, network_log


def emaki(hub: SimpleNamespace, data: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m emaki ARGS` on the sd15 profile, the hub cache in HF_HUB_CACHE, no socket can connect."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("EMAKI_", "HF_"))}
    environ |= {"EMAKI_TINY_CACHE": os.environ["EMAKI_TINY_CACHE"], "HF_HUB_CACHE": str(hub.cache)}
    environ |= {"EMAKI_PROFILE": "sd15", "EMAKI_DATA_DIR": str(data), "EMAKI_DEVICE": "cpu"}
    environ |= {"PYTHONPATH": os.pathsep.join([str(hub.blocker), str(ROOT)]), **env}
    command = [sys.executable, "-m", "emaki", *args]
    return subprocess.run(command, cwd=data.parent, env=environ, capture_output=True, text=True, timeout=600)


def dataset(folder: Path, count: int = 6) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    rows = ["file_name,caption"]
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        rows.append(f"img{i}.png,a fox in a meadow {i}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


ANIMATE = ["--frames", "2", "--steps", "2", "--strength", "0.5", "--width", "256", "--height", "256", "--seed", "3"]
ANIMATE += ["-q"]
TRAIN = ["--steps", "2", "--rank", "4", "--resolution", "256", "--seed", "1", "-q"]


def test_check_animate_train_and_styles_add_with_the_network_blocked(hub: SimpleNamespace, tmp_path: Path) -> None:
    data = tmp_path / "data"
    check = emaki(hub, data, "models", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("ready,") == 6 and "NOT READY" not in check.stdout
    assert "safety checker (screening)" in check.stdout and SD15["safety_model"] in check.stdout

    # animate, with every frame screened by the checker loaded from the cache
    plain = emaki(hub, data, "animate", "a fox naps, then wakes", "--out", "plain.gif", *ANIMATE, EMAKI_SAFETY_CLI="1")
    assert plain.returncode == 0, plain.stderr
    assert Image.open(tmp_path / "plain.gif").n_frames == 2
    sidecar = json.loads((tmp_path / "plain.json").read_text())
    assert sidecar["models"]["base_model"] == SD15["base_model"]

    # train on the hub id, then use the style: it loads back and changes that base's output
    trained = emaki(hub, data, "train", str(dataset(tmp_path / "ds")), "--name", "fox", "--adapter", "lokr", *TRAIN)
    assert trained.returncode == 0, trained.stderr
    styled = emaki(hub, data, "animate", "a fox naps, then wakes", "--style", "fox", "--out", "fox.gif", *ANIMATE)
    assert styled.returncode == 0, styled.stderr
    plain_frame = np.asarray(Image.open(tmp_path / "plain_frames" / "frame_01.png"), dtype=np.int16)
    styled_frame = np.asarray(Image.open(tmp_path / "fox_frames" / "frame_01.png"), dtype=np.int16)
    assert np.abs(plain_frame - styled_frame).max() > 0

    # the kohya export is what another tool (and emaki on another box) takes in
    exports = sorted(data.rglob("*kohya*.safetensors")) or sorted(data.rglob("*.safetensors"))
    export = next(p for p in exports if "fox" in str(p))
    added = emaki(hub, data, "styles", "add", "fox-again", str(export))
    assert added.returncode == 0, added.stderr
    listed = emaki(hub, data, "styles")
    assert "fox-again" in listed.stdout
    assert not hub.log.exists(), hub.log.read_text()  # not one connection or name lookup was attempted


@pytest.mark.parametrize("adapter", ["lora", "loha", "ia3"])
def test_train_on_a_diffusers_folder_and_a_single_file_base(hub: SimpleNamespace, tmp_path: Path, adapter: str) -> None:
    """The base as a plain folder (lora), as one original-layout file (loha), or the hub id again (ia3):
    with lokr above, every adapter kind on a real-structure base."""
    data = tmp_path / "data"
    if adapter == "lora":
        base = {"EMAKI_BASE_MODEL": str(hub.base_folder)}
    elif adapter == "loha":
        base = {"EMAKI_BASE_MODEL": str(hub.single), "EMAKI_BASE_MODEL_CONFIG": str(hub.base_folder)}
    else:
        base = {}
    args = ["train", str(dataset(tmp_path / "ds")), "--name", "owl", "--adapter", adapter, *TRAIN]
    if adapter == "lora":  # LoRA starts at zero (B = 0): a larger step makes two steps visible in the pixels
        args += ["--lr", "0.01"]
    trained = emaki(hub, data, *args, **base)
    assert trained.returncode == 0, trained.stderr
    assert "owl" in emaki(hub, data, "styles", **base).stdout
    if adapter == "lora":  # the style trained on the folder loads back into that folder's base and changes it
        idea = ["animate", "an owl blinks", "--frames", "1", *ANIMATE[2:]]
        plain = emaki(hub, data, *idea, "--out", "plain.gif", **base)
        styled = emaki(hub, data, *idea, "--style", "owl", "--out", "owl.gif", **base)
        assert plain.returncode == 0 and styled.returncode == 0, plain.stderr + styled.stderr
        before = np.asarray(Image.open(tmp_path / "plain_frames" / "frame_01.png"), dtype=np.int16)
        after = np.asarray(Image.open(tmp_path / "owl_frames" / "frame_01.png"), dtype=np.int16)
        assert np.abs(before - after).max() > 0
    assert not hub.log.exists(), hub.log.read_text()


# --- a bot job with screening on, the models loaded from the hub cache ---------------------------------
@pytest.fixture
def bot_settings(hub: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub.cache))
    return load_settings(
        profile="sd15",
        device="cpu",
        data_dir=tmp_path / "data",
        steps=2,
        strength=0.5,
        width=256,
        height=256,
        progress_edit_interval_s=0.0,
        position_edit_interval_s=0.0,
    )


@pytest.fixture
def simcord_bot(bot_settings: Settings) -> EmakiBot:
    bot = create_bot(bot_settings)  # loads every model from the cache, as `emaki bot` does
    bot.post_retry_delays = (0.01, 0.01)
    bot.outbox.retry_base_s = 0.01
    return bot


@pytest.mark.simcord(settle_timeout=300)
async def test_a_bot_job_on_cached_sd15_models_is_screened_and_posted(world) -> None:
    env, channel, alice = world.env, world.channel, world.alice
    await alice.slash(channel, "animate", prompt="a heron lands on a pond", frames=2, seed=4)
    job = env.bot.store.job(1)
    assert job["screen"] == 1 and job["status"] == "done", job["error"]
    assert len(results(channel)) == 1


@pytest.mark.simcord(settle_timeout=600)
async def test_train_in_discord_on_cached_sd15_models(world, bot_settings: Settings) -> None:
    """/train on a real-structure base: the dataset is approved, trained, registered and usable."""
    env, channel, alice, mod = world.env, world.channel, world.alice, world.mod
    bot_settings.eval_samples = 2
    answer = await alice.slash(channel, "train", name="Heron", dataset=("h.zip", base.dataset_zip_bytes()), steps=2)
    assert answer.ephemeral and "received: 6 images" in answer.response.content + "".join(
        f.content for f in answer.followups
    )
    await mod.react(channel.last_message, "✅")
    store = env.bot.store
    [job] = store.jobs_where("kind = 'train'", [])
    assert job["status"] == "done", job["error"]
    style = store.style("heron")
    assert style is not None and Path(style["path"]).is_file()
    ready = channel.last_message.content
    # FID/KID's Inception weights are not on this disk: said, not downloaded; the style is ready all the same
    assert "the style **heron** is ready" in ready and "not evaluated" in ready and "Inception" in ready
    await alice.slash(channel, "animate", prompt="a heron lands", style="heron", frames=1, seed=4)
    assert store.job(2)["status"] == "done"


def test_the_bot_refuses_to_start_without_its_safety_checker(
    hub: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`emaki bot` checks the files before it accepts any job: the checker is required, the captioner and
    the CLIP model only turn their feature off, each said in one line."""
    from bot.service import models_on_disk
    from engine.errors import ModelLoadError

    monkeypatch.setenv("HF_HUB_CACHE", str(hub.cache))
    assert models_on_disk(load_settings(profile="sd15", data_dir=tmp_path)) == []
    notes = models_on_disk(load_settings(profile="sd15", data_dir=tmp_path, captioner_model="Salesforce/nope"))
    assert len(notes) == 1 and notes[0].startswith("note: --autocaption is off: captioner") and "pull" in notes[0]
    with pytest.raises(ModelLoadError, match=r"safety checker .* is not downloaded .* run `emaki models pull`"):
        models_on_disk(load_settings(profile="sd15", data_dir=tmp_path, safety_model="CompVis/nope"))


def test_the_check_says_what_to_run_when_the_safety_checker_is_missing(hub: SimpleNamespace, tmp_path: Path) -> None:
    check = emaki(hub, tmp_path / "data", "models", "check", EMAKI_SAFETY_MODEL="CompVis/not-downloaded")
    assert check.returncode == 1
    line = next(x for x in check.stdout.splitlines() if "safety checker" in x)
    assert "NOT READY" in line and "emaki models pull" in line
    animate = emaki(
        hub, tmp_path / "data", "animate", "a fox", *ANIMATE, EMAKI_SAFETY_CLI="1", EMAKI_SAFETY_MODEL="CompVis/nope"
    )
    assert animate.returncode == 2 and animate.stderr.count("\n") == 1, animate.stderr
    assert textwrap.shorten(animate.stderr, 400).startswith("error: safety checker")
    assert "emaki models pull" in animate.stderr
