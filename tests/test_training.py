"""Dataset intake, training every adapter kind, resume, evaluation: tiny profile, offline."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from engine.coordinator.store import open_store
from engine.settings import Settings, load_settings
from training.dataset import DatasetError, check_style_name, load_dataset, open_dataset
from training.evaluate import TinyFeatures, fid_kid, temporal_ssim, to_uint8_batch
from training.lora import TrainConfig, Trainer


def png(seed: int, size: tuple[int, int] = (72, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root: Path, n: int = 6, captions: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = ["file_name,caption"]
    for i in range(n):
        (root / f"img{i}.png").write_bytes(png(i))
        rows.append(f"img{i}.png,a fox in a meadow {i}" if captions or i else f"img{i}.png,")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def make_zip(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, target)
    return path


def good_entries(n: int = 6) -> dict[str, bytes]:
    entries = {f"img{i}.png": png(i) for i in range(n)}
    entries["metadata.csv"] = ("file_name,caption\n" + "".join(f"img{i}.png,a fox {i}\n" for i in range(n))).encode()
    return entries


@pytest.fixture
def tiny(tmp_path: Path) -> Settings:
    return load_settings(profile="tiny", data_dir=tmp_path / "data")


def test_good_zip_and_jsonl_folder(tmp_path: Path, tiny: Settings) -> None:
    dataset = open_dataset(make_zip(tmp_path / "ds.zip", good_entries()), tmp_path / "x", tiny)
    assert len(dataset.items) == 6 and dataset.items[0].caption == "a fox 0"
    folder = tmp_path / "hf"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(png(i))
    (folder / "metadata.jsonl").write_text(
        "".join(f'{{"file_name": "{i}.jpg", "text": "owl {i}"}}\n' for i in range(5))
    )
    assert load_dataset(folder, tiny).captions == [f"owl {i}" for i in range(5)]


BAD_ZIPS = [
    ("traversal", {"../evil.png": png(1)}, None, "'..' path components are not allowed"),
    ("absolute", {"/etc/evil.png": png(1)}, None, "absolute paths are not allowed"),
    ("link", {}, {"img9.png": "/etc/passwd"}, "img9.png: links are not allowed"),
    ("not an image", {"notes.exe": b"MZ"}, None, "notes.exe: not an image"),
    ("undecodable", {"img0.png": b"\x89PNG\r\n\x1a\n broken"}, None, "img0.png: not a readable image"),
    (
        "caption names a missing file",
        {"metadata.csv": b"file_name,caption\nghost.png,boo\n"},
        None,
        "metadata names files that are not in the dataset: ghost.png",
    ),
    ("bad header", {"metadata.csv": b"image,text\nimg0.png,x\n"}, None, "the header must have the columns"),
]


@pytest.mark.parametrize(("case", "extra", "links", "message"), BAD_ZIPS, ids=[c[0] for c in BAD_ZIPS])
def test_bad_zip_is_refused_and_leaves_nothing(case, extra, links, message, tmp_path: Path, tiny: Settings) -> None:
    entries = {**good_entries(), **extra}
    if case == "caption names a missing file":
        entries["metadata.csv"] = good_entries()["metadata.csv"] + b"ghost.png,boo\n"
    with pytest.raises(DatasetError, match=message):
        open_dataset(make_zip(tmp_path / "bad.zip", entries, links), tmp_path / "work", tiny)
    assert not (tmp_path / "work").exists()  # nothing extracted is left behind
    assert not (tmp_path.parent / "evil.png").exists() and not Path("/etc/evil.png").exists()


def test_zip_bomb_caps_before_extracting(tmp_path: Path, tiny: Settings) -> None:
    tiny.max_dataset_bytes = 1_000_000
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("huge.png", b"\0" * 5_000_000)  # a few KiB compressed
    assert bomb.stat().st_size < 100_000
    with pytest.raises(DatasetError, match="4 MiB uncompressed; the limit is 0 MiB"):
        open_dataset(bomb, tmp_path / "work", tiny)
    assert not (tmp_path / "work").exists()
    tiny.max_dataset_files = 3
    with pytest.raises(DatasetError, match="7 files; the limit is 3"):
        open_dataset(make_zip(tmp_path / "many.zip", good_entries()), tmp_path / "work2", tiny)


def test_decompression_bomb_image_and_oversize_attachment(tmp_path: Path, tiny: Settings) -> None:
    tiny.max_image_pixels = 64 * 64
    with pytest.raises(DatasetError, match=r"img0.png: 72x80 pixels is over the limit of 4096 pixels"):
        load_dataset(make_folder(tmp_path / "big"), tiny)
    tiny.max_dataset_bytes = 100
    with pytest.raises(DatasetError, match="the limit is 0 MiB"):
        open_dataset(make_zip(tmp_path / "ds.zip", good_entries()), tmp_path / "w", tiny)


def test_missing_captions_listed_too_few_images_and_names(tmp_path: Path, tiny: Settings) -> None:
    with pytest.raises(DatasetError, match=r"1 images have no caption: img0.png .*--autocaption"):
        load_dataset(make_folder(tmp_path / "nocap", captions=False), tiny)
    dataset = load_dataset(make_folder(tmp_path / "auto", captions=False), tiny, captioner=lambda image: "a fox")
    assert dataset.items[0].caption == "a fox"
    with pytest.raises(DatasetError, match="4 images; at least 5 are needed"):
        load_dataset(make_folder(tmp_path / "few", n=4), tiny)
    store = open_store(tiny.data_dir)
    store.add_style("taken", "/x")
    for name, message in (("", "empty"), ("Bad Name!", "must be 1-32 characters"), ("taken", "already exists")):
        with pytest.raises(DatasetError, match=message):
            check_style_name(name, store)


# --- training ---------------------------------------------------------------------------------
FAST = dict(steps=6, rank=4, checkpoint_every=3, learning_rate=5e-2)


@pytest.mark.parametrize(
    ("adapter", "optimizer"),
    [("lora", "adamw"), ("lora", "prodigy"), ("loha", "adamw"), ("lokr", "adamw"), ("ia3", "adamw")],
)
def test_each_adapter_trains_into_a_style_that_changes_output(adapter, optimizer, tmp_path, tiny, engine) -> None:
    from tests.test_engine import frame_files, pixels, run

    dataset = load_dataset(make_folder(tmp_path / "ds"), tiny)
    config = TrainConfig(
        adapter=adapter,
        optimizer=optimizer,
        **{**FAST, "learning_rate": 1.0 if optimizer == "prodigy" else FAST["learning_rate"]},
    )
    result = Trainer(tiny, dataset, "foxstyle", config, tmp_path / "out").run()
    assert result.finished and result.step == 6 and len(result.losses) == 6
    assert result.weights.suffix == ".safetensors" and result.weights.exists()
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
    engine.store.add_style("fox", str(result.weights), trigger="foxstyle", adapter=adapter)
    plain, _ = run(engine, frames=2, seed=4)
    styled, _ = run(engine, frames=2, seed=4, style="fox")
    assert np.abs(pixels(frame_files(engine, plain)[0]) - pixels(frame_files(engine, styled)[0])).mean() > 0.1
    if adapter == "lora":  # diffusers' own loader reads it: so do other SD tools
        from diffusers import StableDiffusionPipeline

        state, _ = StableDiffusionPipeline.lora_state_dict(str(result.weights))
        assert state and all(k.startswith("unet.") for k in state)


def test_interrupted_training_resumes_from_checkpoint(tmp_path: Path, tiny: Settings) -> None:
    dataset = load_dataset(make_folder(tmp_path / "ds"), tiny)
    whole = Trainer(tiny, dataset, "fox", TrainConfig(**FAST), tmp_path / "whole").run()
    starts: list[tuple[int, int]] = []  # (step, total) before the first step: where a progress bar begins
    first = Trainer(tiny, dataset, "fox", TrainConfig(**FAST), tmp_path / "split").run(
        should_yield=lambda: True, on_start=lambda step, total: starts.append((step, total))
    )
    assert not first.finished and first.step == 3 and (tmp_path / "split" / "checkpoint.pt").exists()
    seen: list[int] = []
    second = Trainer(tiny, dataset, "fox", TrainConfig(**FAST), tmp_path / "split").run(
        on_step=lambda p: seen.append(p.step), on_start=lambda step, total: starts.append((step, total))
    )
    assert second.finished and seen == [4, 5, 6]  # continued, not restarted
    assert starts == [(0, 6), (3, 6)]
    assert np.allclose(second.losses, whole.losses, atol=1e-5)  # same data order, noise and updates
    from safetensors.torch import load_file

    a, b = load_file(str(whole.weights)), load_file(str(second.weights))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert list(dataset.root.glob(".emaki-cache-*.pt"))  # latents and embeddings cached with the dataset


# --- evaluation -------------------------------------------------------------------------------
def reference_fid_kid(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    mu1, mu2 = real.mean(0), fake.mean(0)
    c1, c2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(c1 @ c2).real
    fid = float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))
    d, m = real.shape[1], real.shape[0]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731 - the polynomial kernel of the KID paper
    kxx, kyy, kxy = k(real, real), k(fake, fake), k(real, fake)
    kid = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2
    return fid, float(kid)


def test_fid_kid_match_a_scipy_reference_on_the_same_features() -> None:
    rng = np.random.default_rng(0)
    real = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(48)]
    fake = [Image.fromarray(rng.integers(40, 200, (64, 64, 3), dtype=np.uint8)) for _ in range(48)]
    extractor = TinyFeatures()
    metrics = fid_kid(real, fake, feature=extractor, size=64, kid_subsets=5)
    with torch.no_grad():
        f_real = extractor(to_uint8_batch(real, 64)).double().numpy()
        f_fake = extractor(to_uint8_batch(fake, 64)).double().numpy()
    fid, kid = reference_fid_kid(f_real, f_fake)
    assert metrics["fid"] == pytest.approx(fid, abs=1e-3)
    assert metrics["kid"] == pytest.approx(kid, abs=1e-3)
    assert metrics["n_real"] == 48 and metrics["fid"] > 0


def test_temporal_ssim_orders_still_moving_and_unrelated() -> None:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:48, 0:48]
    smooth = (127 + 120 * np.sin(x / 5.0) * np.cos(y / 7.0)).astype(np.uint8)  # a scene has structure
    base = np.stack([smooth, smooth[::-1], smooth.T], axis=-1)
    still = [Image.fromarray(base)] * 3
    moving = [Image.fromarray(np.roll(base, s, axis=1)) for s in (0, 1, 2)]
    unrelated = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]
    assert temporal_ssim(still) == pytest.approx(1.0)
    assert temporal_ssim(unrelated) < temporal_ssim(moving) < 1.0


def test_text_encoder_lora_trains_loads_and_switches_off(tmp_path: Path, tiny: Settings, engine) -> None:
    from diffusers import StableDiffusionPipeline

    from tests.helpers import sha
    from tests.test_engine import frame_files, pixels, run

    dataset = load_dataset(make_folder(tmp_path / "ds"), tiny)
    config_kw = dict(train_text_encoder=True, **FAST)
    result = Trainer(tiny, dataset, "foxstyle", TrainConfig(**config_kw), tmp_path / "out").run()
    state, _ = StableDiffusionPipeline.lora_state_dict(str(result.weights))
    assert any(k.startswith("text_encoder.") for k in state) and any(k.startswith("unet.") for k in state)
    engine.store.add_style("fox", str(result.weights), trigger="foxstyle")
    plain, _ = run(engine, frames=1, seed=4)
    styled, _ = run(engine, frames=1, seed=4, style="fox")
    again, _ = run(engine, frames=1, seed=4)
    assert np.abs(pixels(frame_files(engine, plain)[0]) - pixels(frame_files(engine, styled)[0])).mean() > 0.1
    assert sha(frame_files(engine, again)[0]) == sha(frame_files(engine, plain)[0])  # both models switched off
    # IA3 (the anime paper's kind) trains the text encoder too: its half is saved beside the UNet's
    # and loaded with it, so the style is never applied half-way.
    ia3 = Trainer(tiny, dataset, "foxstyle", TrainConfig(adapter="ia3", **config_kw), tmp_path / "o2").run()
    assert (ia3.weights.parent / "text_encoder" / "adapter_model.safetensors").is_file()
    engine.store.add_style("fox3", str(ia3.weights), trigger="foxstyle", adapter="ia3")
    engine.models.use_style(None)
    run(engine, frames=1, seed=4, style="fox3")
    from peft.tuners.tuners_utils import BaseTunerLayer

    text_encoder = engine.models.txt2img.text_encoder
    assert any(isinstance(m, BaseTunerLayer) and "style_fox3" in m.active_adapters for m in text_encoder.modules())
