"""`emaki animate` as a user runs it: outputs, sidecar, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from emaki.cli import main

FAST = ["--steps", "6", "--strength", "0.5", "-q"]


@pytest.fixture
def tiny_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMAKI_PROFILE", "tiny")
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_animate_writes_gif_frames_and_sidecar(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny_env / "dragon.gif"
    code = main(
        [
            "animate",
            "a ghibli dragon perches on a hill, then glides over a medieval town",
            "--out",
            str(out),
            "--frames",
            "3",
            "--seed",
            "123",
            *FAST,
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).n_frames == 3
    frames = sorted((tiny_env / "dragon_frames").glob("*.png"))
    assert [f.name for f in frames] == ["frame_01.png", "frame_02.png", "frame_03.png"]
    sidecar = json.loads((tiny_env / "dragon.json").read_text())
    assert sidecar["params"]["seed"] == 123 and sidecar["params"]["strength"] == 0.5
    assert [f["file"] for f in sidecar["frames"]] == [f"dragon_frames/{f.name}" for f in frames]
    assert all({"prompt", "seed", "steps", "guidance", "strength"} <= set(f) for f in sidecar["frames"])
    assert sidecar["models"]["profile"] == "tiny"
    assert not list(tiny_env.glob(".dragon*"))  # no temp folder left behind


def test_progress_bars_name_each_stage(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["animate", "a fox", "--out", "fox.gif", "--frames", "2", "--steps", "4", "--strength", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "story" in err and "frame 1/2" in err and "frame 2/2" in err and "gif" in err


def test_styles_add_and_list(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import make_random_lora

    weights = make_random_lora(tiny_env / "lora")
    assert main(["styles", "add", "inkwash", str(weights), "--trigger", "inkwash"]) == 0
    assert main(["styles"]) == 0
    assert "inkwash\ttrigger=inkwash" in capsys.readouterr().out
    assert main(["animate", "a fox", "--style", "inkwash", "--frames", "1", "--out", "fox.gif", *FAST]) == 0


BAD_INPUTS = [
    (["animate", "   "], "the idea is empty"),
    (["animate", "x" * 501], "the idea is 501 characters long; the limit is 500"),
    (["animate", "a fox", "--frames", "0"], "frames must be between 1 and 16"),
    (["animate", "a fox", "--frames", "17"], "frames must be between 1 and 16"),
    (["animate", "a fox", "--width", "60"], "width must be a multiple of 8 between 32 and 256"),
    (["animate", "a fox", "--height", "512"], "height must be a multiple of 8 between 32 and 256"),
    (["animate", "a fox", "--strength", "0"], "strength must be above 0 and at most 1"),
    (["animate", "a fox", "--strength", "1.5"], "strength must be above 0 and at most 1"),
    (["animate", "a fox", "--strength", "0.01", "--steps", "50"], "gives no denoising step"),
    (["animate", "a fox", "--style", "nope"], "unknown style 'nope': no styles are registered yet"),
    (["animate", "a fox", "--out", "missing/dir/fox.gif"], "output folder missing/dir does not exist"),
    (["animate", "a fox", "--out", "fox.png"], "does not end in .gif"),
    (["styles", "add", "x", "nope.safetensors"], "style weights file nope.safetensors does not exist"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_clear_line(
    argv: list[str], message: str, tiny_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {err.removeprefix('error: ')}" and "\n" not in err and "Traceback" not in err
    assert message in err
    assert not list(tiny_env.glob("*.gif")) and not list(tiny_env.glob("*_frames"))


def test_sd15_profile_defaults_and_size_range(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path))
    assert main(["animate", "a fox", "--width", "1032", "--profile", "sd15"]) == 2
    assert "between 256 and 1024 for the sd15 profile" in capsys.readouterr().err


def test_unreadable_model_path(
    tiny_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMAKI_PROFILE", "sd15")
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(tiny_env / "no-such-model"))
    assert main(["animate", "a fox", "--out", "fox.gif", "-q"]) == 2
    err = capsys.readouterr().err
    assert "cannot load base model: local path" in err and "no-such-model" in err
    broken = tiny_env / "broken-model"
    broken.mkdir()
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(broken))
    assert main(["animate", "a fox", "--out", "fox.gif", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot load base model from '{broken}'") and "\n" not in err
    assert not (tiny_env / "fox.gif").exists()


def test_no_disk_space(tiny_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EMAKI_MIN_FREE_BYTES", str(1 << 62))
    assert main(["animate", "a fox", "--out", "fox.gif", *FAST]) == 2
    assert "MiB free" in capsys.readouterr().err
    assert not (tiny_env / "fox.gif").exists() and not (tiny_env / "fox_frames").exists()


def test_bot_without_token_says_what_to_do(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bot"]) == 2
    assert "DISCORD_TOKEN is not set" in capsys.readouterr().err


# --- train / evaluate ---------------------------------------------------------------------------
def dataset_zip(tmp: Path, caption_first: bool = True) -> Path:
    import zipfile

    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp / "ds.zip"
    with zipfile.ZipFile(path, "w") as archive:
        rows = ["file_name,caption"]
        for i in range(6):
            image = Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8))
            from io import BytesIO

            buffer = BytesIO()
            image.save(buffer, format="PNG")
            archive.writestr(f"img{i}.png", buffer.getvalue())
            rows.append(f"img{i}.png,a fox {i}" if (i or caption_first) else f"img{i}.png,")
        archive.writestr("metadata.csv", "\n".join(rows) + "\n")
    return path


def test_train_with_autocaption_registers_a_usable_style(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zip_path = dataset_zip(tiny_env, caption_first=False)
    assert main(["train", str(zip_path), "--name", "fox", "--steps", "4", "-q"]) == 2
    assert "1 images have no caption: img0.png" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                str(zip_path),
                "--name",
                "fox",
                "--trigger",
                "foxstyle",
                "--steps",
                "4",
                "--autocaption",
                "--lr",
                "0.05",
                "-q",
            ]
        )
        == 0
    )
    assert "style 'fox' registered" in capsys.readouterr().out
    metadata = (tiny_env / "data" / "datasets" / "fox" / "metadata.csv").read_text()
    assert "img0.png," in metadata and 'img0.png,""' not in metadata  # the BLIP caption was kept
    assert main(["animate", "a fox runs", "--style", "fox", "--frames", "1", "--out", "fox.gif", *FAST]) == 0
    assert main(["train", str(zip_path), "--name", "fox", "-q"]) == 2
    assert "a style named 'fox' already exists" in capsys.readouterr().err


def test_interrupted_training_resumes_with_the_same_command(
    tiny_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.lora import Trainer

    zip_path = dataset_zip(tiny_env)
    original_step = Trainer._step
    calls = {"n": 0}

    def ctrl_c_at_step_five(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", ctrl_c_at_step_five)
    argv = ["train", str(zip_path), "--name", "owl", "--steps", "6", "--checkpoint-every", "2", "-q"]
    assert main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    calls["n"] = 100  # no more interruptions
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "resuming the interrupted training of 'owl'" in captured.err and "(6 steps" in captured.out


def test_evaluate_reports_fid_kid_and_coherence(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(dataset_zip(tiny_env)), "--name", "fox", "--steps", "2", "-q"]) == 0
    assert main(["evaluate", "--style", "fox", "--samples", "3", "--no-animation", "-q"]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "KID" in out and "KID is the figure to compare" in out
    from engine.coordinator.store import open_store

    metrics = json.loads(open_store(tiny_env / "data").style("fox")["metrics"])
    assert metrics["n_generated"] == 3 and metrics["features"] == "tiny-random-conv" and "kid" in metrics
    assert main(["evaluate", "--style", "nope"]) == 2
    assert "unknown style 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["webp", "mp4"])
def test_animate_other_formats(fmt: str, tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny_env / f"fox.{fmt}"
    assert main(["animate", "a fox", "--frames", "3", "--format", fmt, "--out", str(out), *FAST]) == 0
    data = out.read_bytes()
    if fmt == "webp":
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP" and Image.open(out).n_frames == 3
    else:
        import imageio.v3 as iio

        assert data[4:8] == b"ftyp" and len(iio.imread(out, index=None)) == 3
