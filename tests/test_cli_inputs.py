"""Every bad input to `emaki animate | jobs | resume | redo`, as a new user or a hostile tester would
type it: exit code 2, one clean `error:` line (argparse's own errors keep their usage line), no
traceback, and nothing changed on disk: no job row, no data dir, no output folder, user files kept."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from emaki.cli import main


@dataclass(frozen=True)
class Case:
    argv: list[str]
    message: str
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] = lambda tmp: None
    usage: bool = False  # argparse's own error: usage line + error line


def _file(name: str, text: str = "mine") -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)

    return make


def _folder_with_user_file(name: str) -> Callable[[Path], None]:
    return _file(f"{name}/user-notes.txt", "do not delete")


def _config(text: str) -> Callable[[Path], None]:
    return _file("emaki.toml", text)


def _store_with_an_unfinished_job(tmp: Path) -> None:
    from engine.coordinator.requests import build_params
    from engine.coordinator.store import open_store
    from engine.settings import load_settings

    settings = load_settings(profile="tiny", data_dir=tmp / "data")
    store = open_store(settings.data_dir)
    params = build_params(settings, store, "a fox", seed=1)
    store.add_job(kind="animate", idea="a fox", params=params.to_dict(), status="failed", error="disk full")
    store.db.conn.close()  # checkpoints the WAL, so the file compared below is the whole database


FOX = ["animate", "a fox"]
CASES: dict[str, Case] = {
    # options out of range or of the wrong type
    "frames 0": Case([*FOX, "--frames", "0"], "frames must be between 1 and 16"),
    "frames 2.5": Case([*FOX, "--frames", "2.5"], "argument --frames: invalid int value: '2.5'", usage=True),
    "steps 0": Case([*FOX, "--steps", "0"], "steps must be between 1 and 150 (got 0)"),
    "steps 151": Case([*FOX, "--steps", "151"], "steps must be between 1 and 150 (got 151)"),
    "guidance nan": Case([*FOX, "--guidance", "nan"], "guidance must be a finite number"),
    "guidance inf": Case([*FOX, "--guidance", "inf"], "guidance must be a finite number"),
    "guidance 31": Case([*FOX, "--guidance", "31"], "guidance must be between 0 and 30"),
    "strength nan": Case([*FOX, "--strength", "nan"], "strength must be a finite number"),
    "strength -1": Case([*FOX, "--strength", "-1"], "strength must be above 0 and at most 1"),
    "seed -1": Case([*FOX, "--seed", "-1"], "seed must be between 0 and 4294967295 (got -1)"),
    "seed 10**23": Case([*FOX, "--seed", str(10**23)], "seed must be between 0 and 4294967295"),
    "duration 5": Case([*FOX, "--duration", "5"], "frame_duration_ms must be between 20 and 5000 (got 5)"),
    "width 60": Case([*FOX, "--width", "60"], "width must be a multiple of 8 between 32 and 256"),
    "height -8": Case([*FOX, "--height", "-8"], "height must be a multiple of 8 between 32 and 256"),
    "format bmp": Case([*FOX, "--format", "bmp"], "argument --format: invalid choice: 'bmp'", usage=True),
    "no idea": Case(["animate"], "give an IDEA to animate (or --from-sidecar FILE.json)"),
    "empty idea": Case(["animate", "  "], "the idea is empty"),
    "unknown style": Case([*FOX, "--style", "nope"], "unknown style 'nope': no styles are registered yet"),
    # settings from options, the environment and the TOML file
    "device bogus": Case([*FOX, "--device", "bogus"], "unknown device 'bogus': use auto, cpu, mps, cuda or cuda:N"),
    "story backend bogus": Case([*FOX, "--story-backend", "bogus"], "unknown story_backend 'bogus'"),
    "profile bogus": Case([*FOX, "--profile", "sdxl-turbo"], "unknown profile 'sdxl-turbo'"),
    "EMAKI_SCHEDULER=bogus": Case(FOX, "EMAKI_SCHEDULER='bogus': unknown scheduler", env={"EMAKI_SCHEDULER": "bogus"}),
    "EMAKI_COLOR_COHERENCE=maybe": Case(
        FOX, "color_coherence must be true or false", env={"EMAKI_COLOR_COHERENCE": "maybe"}
    ),
    "EMAKI_DTYPE=fp8": Case(FOX, "unknown dtype 'fp8'", env={"EMAKI_DTYPE": "fp8"}),
    "data dir is a file": Case([*FOX, "--data-dir", "afile"], "data_dir afile is a file", setup=_file("afile")),
    "data dir under a file": Case([*FOX, "--data-dir", "afile/data"], "data dir afile/data: ", setup=_file("afile")),
    "toml steps abc": Case(
        [*FOX, "--config", "emaki.toml"], "steps must be a whole number (got 'abc')", setup=_config('steps = "abc"')
    ),
    "toml frames 2.5": Case(
        [*FOX, "--config", "emaki.toml"], "frames must be a whole number (got 2.5)", setup=_config("frames = 2.5")
    ),
    "toml data_dir 5": Case(
        [*FOX, "--config", "emaki.toml"], "data_dir must be a folder path (got 5)", setup=_config("data_dir = 5")
    ),
    "toml color_coherence no": Case(
        [*FOX, "--config", "emaki.toml"], "color_coherence must be true", setup=_config('color_coherence = "no"')
    ),
    "toml discord_token": Case(
        [*FOX, "--config", "emaki.toml"],
        "secrets belong in the environment (DISCORD_TOKEN)",
        setup=_config('discord_token = "MTIz.abc"'),
    ),
    "config missing": Case([*FOX, "--config", "nope.toml"], "cannot read config file nope.toml"),
    # outputs: never clobbered, checked before rendering
    "out exists": Case([*FOX, "--out", "keep.gif"], "keep.gif already exists", setup=_file("keep.gif")),
    "frames folder exists": Case(
        [*FOX, "--out", "keep.gif"], "keep_frames already exists", setup=_folder_with_user_file("keep_frames")
    ),
    "sidecar exists": Case([*FOX, "--out", "keep.gif"], "keep.json already exists", setup=_file("keep.json")),
    "out is a folder": Case(
        [*FOX, "--out", "isdir.gif"], "--out isdir.gif is a folder", setup=_folder_with_user_file("isdir.gif")
    ),
    "out's parent is a file": Case(
        [*FOX, "--out", "afile/fox.gif"], "output folder afile is a file, not a folder", setup=_file("afile")
    ),
    "out's parent missing": Case([*FOX, "--out", "missing/fox.gif"], "output folder missing does not exist"),
    "out type unknown": Case([*FOX, "--out", "fox.png"], "--out fox.png does not end in .gif, .webp or .mp4"),
    "out and format disagree": Case([*FOX, "--out", "fox.gif", "--format", "mp4"], "does not end in .mp4"),
    "force over a file named like the frames folder": Case(
        [*FOX, "--out", "keep.gif", "--force"], "keep_frames is a file", setup=_file("keep_frames")
    ),
    # sidecars
    "sidecar missing": Case(["animate", "--from-sidecar", "nope.json"], "cannot read sidecar nope.json"),
    "sidecar not one": Case(
        ["animate", "--from-sidecar", "x.json"], "x.json is not an emaki sidecar", setup=_file("x.json", "[1, 2]")
    ),
    "sidecar with options": Case(
        ["animate", "--from-sidecar", "x.json", "--seed", "3"], "drop --seed", setup=_file("x.json", "{}")
    ),
    "sidecar frame without steps": Case(
        ["animate", "--from-sidecar", "x.json"],
        "x.json: frame 1: steps must be a whole number (got None)",
        setup=_file(
            "x.json",
            '{"emaki_sidecar": 1, "params": {}, "models": {}, "frames": '
            '[{"idx": 0, "prompt": "a fox", "seed": 1, "style": "", "strength": 0.5, "guidance": 7}]}',
        ),
    ),
    # motion mode (issue 15): refused before any model loads or any row is written
    "motion bogus": Case([*FOX, "--motion", "wiggle"], "argument --motion: invalid choice: 'wiggle'", usage=True),
    "motion without an adapter": Case(
        [*FOX, "--motion", "animatediff"], "motion mode needs a motion adapter, and the tiny profile has none"
    ),
    "motion adapter folder without its files": Case(
        [*FOX, "--motion", "animatediff", "--profile", "sd15"],
        "cannot load motion adapter from './adapter': no config.json in adapter",
        env={"EMAKI_MOTION_ADAPTER": "./adapter"},
        setup=_folder_with_user_file("adapter"),
    ),
    "motion adapter hub id not cached": Case(
        [*FOX, "--motion", "animatediff", "--profile", "sd15"],
        "motion adapter 'nobody/no-such-motion-adapter' is not downloaded",
        env={"EMAKI_MOTION_ADAPTER": "nobody/no-such-motion-adapter"},
    ),
    "motion tiny adapter on sd15": Case(
        [*FOX, "--motion", "animatediff", "--profile", "sd15"],
        "motion adapter 'tiny' is for the tiny profile only",
        env={"EMAKI_MOTION_ADAPTER": "tiny"},
    ),
    "motion with EMAKI_COMPILE": Case(
        [*FOX, "--motion", "animatediff"],
        "motion mode cannot run with EMAKI_COMPILE on",
        env={"EMAKI_MOTION_ADAPTER": "tiny", "EMAKI_COMPILE": "default"},
    ),
    "motion with EMAKI_MEMORY=low": Case(
        [*FOX, "--motion", "animatediff"],
        "motion mode needs the models resident (EMAKI_MEMORY high or auto), not 'low'",
        env={"EMAKI_MOTION_ADAPTER": "tiny", "EMAKI_MEMORY": "low"},
    ),
    "motion with one frame": Case(
        [*FOX, "--motion", "animatediff", "--frames", "1"],
        "motion mode needs at least 2 frames",
        env={"EMAKI_MOTION_ADAPTER": "tiny"},
    ),
    "motion depth in chain mode": Case([*FOX, "--motion-depth"], "motion depth guidance applies to --motion"),
    "EMAKI_MOTION_FEWSTEP=turbo": Case(FOX, "unknown motion_fewstep 'turbo'", env={"EMAKI_MOTION_FEWSTEP": "turbo"}),
    # jobs, resume, redo
    "jobs limit 0": Case(["jobs", "--limit", "0"], "--limit must be between 1 and 1000"),
    "resume unknown job": Case(["resume", "7"], "there is no animation job 7"),
    "resume not a number": Case(["resume", "seven"], "argument job: invalid int value: 'seven'", usage=True),
    "redo unknown job": Case(["redo", "7", "--from", "1"], "there is no animation job 7"),
    "redo without --from": Case(["redo", "7"], "the following arguments are required: --from", usage=True),
    "redo unfinished": Case(
        ["redo", "1", "--from", "1"], "job 1 has no finished animation to redo", setup=_store_with_an_unfinished_job
    ),
}
if not torch.cuda.is_available():
    CASES["device cuda without a GPU"] = Case(
        [*FOX, "--device", "cuda"], "device cuda is not available: torch sees no CUDA device"
    )
if os.geteuid() == 0:  # root ignores permission bits; /proc refuses new files even to root
    CASES["read-only output folder"] = Case([*FOX, "--out", "/proc/fox.gif"], "cannot write in output folder /proc")
else:
    CASES["read-only output folder"] = Case(
        [*FOX, "--out", "ro/fox.gif"], "cannot write in output folder ro", setup=lambda tmp: (tmp / "ro").mkdir(0o555)
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content's hash (SQLite's -wal/-shm companions aside)."""
    seen = {}
    for path in sorted(root.rglob("*")):
        if path.name.endswith(("-wal", "-shm")):
            continue
        seen[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return seen


def job_rows(data_dir: Path) -> int | None:
    db = data_dir / "emaki.db"
    if not db.exists():
        return None
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from jobs").fetchone()[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_changes_nothing(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    case = CASES[name]
    monkeypatch.setenv("EMAKI_PROFILE", "tiny")
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    case.setup(tmp_path)
    before, rows_before = snapshot(tmp_path), job_rows(tmp_path / "data")

    if case.usage:
        with pytest.raises(SystemExit) as exited:
            main(case.argv)
        code = exited.value.code
    else:
        code = main(case.argv)
    out, err = capsys.readouterr()

    assert code == 2
    lines = err.strip().splitlines()
    assert "Traceback" not in err and out == ""
    if case.usage:
        assert lines[0].startswith("usage: emaki") and lines[-1].startswith("emaki ") and "error:" in lines[-1]
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.message in lines[-1]
    assert snapshot(tmp_path) == before  # no data dir, no folder, no temp file, user files intact
    assert job_rows(tmp_path / "data") == rows_before


def test_a_model_that_fails_to_load_leaves_no_job_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EMAKI_BASE_MODEL", str(tmp_path / "no-such-model"))
    monkeypatch.chdir(tmp_path)
    assert main(["animate", "a fox", "--profile", "sd15", "-q"]) == 2
    assert "cannot load base model: local path" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
