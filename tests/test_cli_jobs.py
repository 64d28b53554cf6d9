"""Nothing of the user's lost, any frame redone: `emaki jobs`, `resume`, `redo`, `--from-sidecar`,
never-clobbering outputs and Ctrl-C, on the tiny profile with small, few-step renders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from emaki.cli import main
from tests.helpers import sha

SMALL = ["--frames", "3", "--steps", "4", "--strength", "0.5", "--width", "32", "--height", "32", "-q"]


@pytest.fixture
def tiny_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_tiny_models) -> Path:
    # The tiny models are seeded, so every build is byte-identical: build them once for all commands.
    monkeypatch.setattr("emaki.animate_cmd.load_models", lambda settings: shared_tiny_models)
    monkeypatch.setenv("EMAKI_PROFILE", "tiny")
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def frame_hashes(folder: Path) -> list[str]:
    return [sha(p) for p in sorted(folder.glob("frame_*.png"))]


def jobs_table(capsys: pytest.CaptureFixture[str]) -> list[list[str]]:
    assert main(["jobs"]) == 0
    return [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()[1:]]


def interrupt_after_frames(monkeypatch: pytest.MonkeyPatch, kept: int) -> None:
    """Ctrl-C while frame `kept + 1` renders: the frames before it are on disk, the row says running."""
    import engine.render.renderer  # the renderer runs the frame chain (engine.coordinator.worker only coordinates)

    real = engine.render.renderer.render_frames

    def interrupted(*args, **kwargs) -> Iterator:
        for n, item in enumerate(real(*args, **kwargs)):
            if n + kwargs.get("start", 0) == kept:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(engine.render.renderer, "render_frames", interrupted)


def test_interrupted_job_is_listed_and_resumes_byte_identical(
    tiny_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["animate", "a fox runs", "--out", "whole.gif", "--seed", "5", *SMALL]) == 0
    capsys.readouterr()

    with monkeypatch.context() as patch:
        interrupt_after_frames(patch, kept=1)
        assert main(["animate", "a fox runs", "--out", "part.gif", "--seed", "5", *SMALL]) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "error: interrupted; job 2 stopped; continue it with: emaki resume 2"
    assert not list(tiny_env.glob("part*"))  # nothing that looks like a result
    assert jobs_table(capsys)[0][:2] == ["2", "interrupted"]  # the row says running; no process holds it

    assert main(["resume", "2", "-q"]) == 0  # where the first run was asked to write
    assert capsys.readouterr().out.strip() == str(tiny_env / "part.gif")
    assert sha(tiny_env / "part.gif") == sha(tiny_env / "whole.gif")
    assert frame_hashes(tiny_env / "part_frames") == frame_hashes(tiny_env / "whole_frames")
    assert jobs_table(capsys)[0][:2] == ["2", "done"]


def test_a_job_being_rendered_is_shown_running_and_not_resumed(
    tiny_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kill -9 leaves the same row as Ctrl-C; only a live process's lock makes it `running`."""
    from engine.coordinator.requests import build_params
    from engine.coordinator.store import open_store
    from engine.coordinator.worker import holding_job_lock
    from engine.settings import load_settings

    settings = load_settings()
    store = open_store(settings.data_dir)
    job_id = store.add_job(idea="a fox", params=build_params(settings, store, "a fox").to_dict(), status="running")
    with holding_job_lock(settings.data_dir, job_id) as mine:
        assert mine
        assert jobs_table(capsys)[0][:2] == [str(job_id), "running"]
        assert main(["resume", str(job_id), "-q"]) == 2
        assert "is being rendered right now by another process" in capsys.readouterr().err
    assert jobs_table(capsys)[0][:2] == [str(job_id), "interrupted"]


def test_redo_keeps_earlier_frames_and_the_same_seed_reproduces(
    tiny_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["animate", "a fox runs", "--out", "fox.gif", "--seed", "9", *SMALL]) == 0
    capsys.readouterr()
    sidecar = json.loads((tiny_env / "fox.json").read_text())
    original = frame_hashes(tiny_env / "fox_frames")

    assert main(["redo", "1", "--from", "3", "-q"]) == 0  # a new seed for frame 3: the default name
    assert capsys.readouterr().out.strip() == "a-fox-runs.gif"
    redone = frame_hashes(tiny_env / "a-fox-runs_frames")
    assert redone[:2] == original[:2] and redone[2] != original[2]
    assert json.loads((tiny_env / "a-fox-runs.json").read_text())["frames"][2]["seed"] != sidecar["frames"][2]["seed"]

    seed = sidecar["frames"][1]["seed"]
    assert main(["redo", "1", "--from", "2", "--seed", str(seed), "--out", "same.gif", "-q"]) == 0
    assert sha(tiny_env / "same.gif") == sha(tiny_env / "fox.gif")
    assert main(["redo", "1", "--from", "4"]) == 2
    assert "--from must be between 1 and 3" in capsys.readouterr().err


def test_from_sidecar_reproduces_byte_for_byte_and_records_everything(
    tiny_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["animate", "a heron lands", "--out", "heron.webp", "--seed", "3", *SMALL]) == 0
    sidecar = json.loads((tiny_env / "heron.json").read_text())
    assert sidecar["story"] == {
        "backend": "fallback",
        "requested": "auto",
        "model": None,
        "source": "fallback",
        "refined": False,
        "answers": [],  # the LLM's raw answers: none without an LLM
        "frames": [f["prompt"] for f in sidecar["frames"]],
    }
    assert {"emaki", "torch", "diffusers", "transformers", "peft", "pillow"} <= set(sidecar["versions"])
    assert sidecar["models"]["profile"] == "tiny" and "base_model" in sidecar["models"]["revisions"]
    assert sidecar["style"] is None and all(isinstance(f["seed"], int) for f in sidecar["frames"])

    # Another profile in the environment: the sidecar's pinned models win.
    assert main(["animate", "--from-sidecar", "heron.json", "--out", "again.webp", "--profile", "tiny", "-q"]) == 0
    assert sha(tiny_env / "again.webp") == sha(tiny_env / "heron.webp")
    assert frame_hashes(tiny_env / "again_frames") == frame_hashes(tiny_env / "heron_frames")
    assert main(["animate", "--from-sidecar", "heron.json", "--profile", "sd15"]) == 2
    assert "the sidecar was made with --profile tiny" in capsys.readouterr().err


def test_default_names_never_overwrite_and_force_replaces(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = ["--frames", "1", "--steps", "2", "--width", "32", "--height", "32", "-q"]
    assert main(["animate", "an owl", "--seed", "1", *one]) == 0
    assert main(["animate", "an owl", "--seed", "2", *one]) == 0
    assert capsys.readouterr().out.split() == ["an-owl.gif", "an-owl-2.gif"]
    assert sha(tiny_env / "an-owl.gif") != sha(tiny_env / "an-owl-2.gif")
    assert json.loads((tiny_env / "an-owl-2.json").read_text())["frames"][0]["file"] == "an-owl-2_frames/frame_01.png"

    (tiny_env / "keep_frames").mkdir()
    (tiny_env / "keep_frames" / "notes.txt").write_text("mine")
    assert main(["animate", "an owl", "--out", "keep.gif", *one]) == 2
    assert (tiny_env / "keep_frames" / "notes.txt").read_text() == "mine"
    assert main(["animate", "an owl", "--out", "keep.gif", "--force", *one]) == 0
    assert [p.name for p in (tiny_env / "keep_frames").iterdir()] == ["frame_01.png"]
    assert not list(tiny_env.glob(".keep*"))  # no staging folder left


def test_a_name_taken_while_rendering_is_not_clobbered(tmp_path: Path) -> None:
    from emaki.animate_cmd import _place_dir, _place_file

    (tmp_path / "new").write_text("ours")
    (tmp_path / "taken").write_text("theirs")
    with pytest.raises(FileExistsError):
        _place_file(tmp_path / "new", tmp_path / "taken", replace=False)
    assert (tmp_path / "taken").read_text() == "theirs" and (tmp_path / "new").exists()
    (tmp_path / "frames").mkdir()
    (tmp_path / "theirs_frames").mkdir()
    with pytest.raises(FileExistsError):
        _place_dir(tmp_path / "frames", tmp_path / "theirs_frames", replace=False, trash=tmp_path)


def test_help_version_and_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["styles", "--help"])
    styles_help = " ".join(capsys.readouterr().out.split())
    assert "{add,remove}" in styles_help and "add register" in styles_help and "remove unregister" in styles_help
    assert "With no subcommand: list styles." in styles_help
    for argv in (["--version"], ["animate", "--help"], ["redo", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    assert out.startswith("emaki 0.1.0")
    assert "(1..150; default 50)" in out and "(above 0, at most 1; default 0.15)" in out  # animate --steps/--strength
    assert "32..256 (tiny)" in out and "default 512 (sd15)" in out  # sizes per profile
    assert "auto, hf, openai, transformers, fallback; default auto" in out
    assert "--from K" in out and "0..4294967295" in out


def test_sidecar_pins_the_style_file_and_weight(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.coordinator.store import open_store
    from tests.helpers import make_random_lora

    weights = make_random_lora(tiny_env / "lora")
    assert main(["styles", "add", "ink", str(weights), "--trigger", "inkwash", "--weight", "0.8"]) == 0
    one = ["--frames", "1", "--steps", "2", "--width", "32", "--height", "32", "-q"]
    assert main(["animate", "a fox", "--style", "ink", "--out", "ink.gif", *one]) == 0
    style = json.loads((tiny_env / "ink.json").read_text())["style"]
    assert style == {"name": "ink", "sha256": sha(weights), "weight": 0.8, "trigger": "inkwash", "adapter": "lora"}

    open_store(tiny_env / "data").update_style("ink", weight=1.0)
    assert main(["animate", "--from-sidecar", "ink.json", "-q"]) == 2
    assert "style 'ink' has weight 1.0 here; the sidecar used 0.8" in capsys.readouterr().err
    open_store(tiny_env / "data").update_style("ink", weight=0.8)
    make_random_lora(tiny_env / "lora", seed=8)  # same path, other weights
    assert main(["animate", "--from-sidecar", "ink.json", "-q"]) == 2
    assert "is not the file the sidecar used (sha256 differs)" in capsys.readouterr().err


def test_ctrl_c_message_starts_its_own_line_after_the_bars(
    tiny_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    interrupt_after_frames(monkeypatch, kept=1)
    small = ["--frames", "2", "--steps", "2", "--strength", "0.5", "--width", "32", "--height", "32"]
    assert main(["animate", "a fox", *small]) == 130  # progress bars on
    err = capsys.readouterr().err
    assert "frame 1/2" in err
    assert "\nerror: interrupted; job 1 stopped; continue it with: emaki resume 1\n" in err


def test_a_job_locked_elsewhere_is_left_running_for_its_owner(engine) -> None:
    from engine.coordinator.requests import build_params
    from engine.coordinator.worker import holding_job_lock
    from engine.events import Failed

    job_id = engine.create_job(build_params(engine.settings, engine.store, "a fox", frames=1, steps=2))
    with holding_job_lock(engine.settings.data_dir, job_id):
        events = list(engine.run(job_id))
    assert isinstance(events[-1], Failed) and "another process" in events[-1].reason
    assert engine.store.job(job_id)["status"] == "running"  # not `queued`: no queue picks it again


def test_kill_9_leaves_a_job_that_resumes(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real `emaki animate` process killed with SIGKILL after its first frame: listed as
    interrupted, and `emaki resume` finishes it keeping that frame."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    slow = ["--frames", "3", "--steps", "8", "--strength", "1", "--width", "32", "--height", "32", "-q"]
    child = subprocess.Popen(
        [sys.executable, "-m", "emaki", "animate", "a fox", "--out", "fox.gif", *slow],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = tiny_env / "data" / "jobs" / "1" / "frame_01.png"
    deadline = time.monotonic() + 300
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the child ended before it could be killed"
    kept = sha(first)
    assert jobs_table(capsys)[0][:2] == ["1", "interrupted"]
    assert not (tiny_env / "fox.gif").exists()

    assert main(["resume", "1", "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_env / "fox.gif")
    assert sha(tiny_env / "fox_frames" / "frame_01.png") == kept
    assert len(frame_hashes(tiny_env / "fox_frames")) == 3 and jobs_table(capsys)[0][:2] == ["1", "done"]


def test_jobs_shows_each_results_post_state(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The rows as the bot leaves them (bot/client.py `_record_posted`, `_post_not_taken`, `_post_result`):
    an operator sees a stranded result, and why, instead of a plain `done`."""
    from engine.coordinator.store import open_store

    store = open_store(tiny_env / "data")
    bot_job = {"kind": "animate", "params": {"frames": 1}, "channel_id": 42, "status": "done"}
    states = [
        dict(posted=1, post_state="posted", result_message_id=7),
        dict(posted=-1, post_state="refused", post_error="403 Missing Permissions", post_attempts=1),
        dict(posted=0, post_state="pending", post_error="503 Service Unavailable"),
        dict(posted=-1, post_state="failed", post_error="its files are gone (frame_01.png)"),
        dict(posted=-1),  # a row from before the post_state column: refused, with no reason recorded
    ]
    for n, fields in enumerate(states):
        store.add_job(idea=f"bot job {n}", **bot_job, **fields)
    store.add_job(kind="animate", idea="a cli job", params={"frames": 1}, status="done")  # nothing to post
    store.add_job(kind="animate", idea="still queued", params={"frames": 1}, channel_id=42)
    assert [row[:3] for row in reversed(jobs_table(capsys))] == [
        ["1", "done", "posted"],
        ["2", "done", "refused: 403 Missing Permissions"],
        ["3", "done", "pending"],
        ["4", "done", "failed: its files are gone (frame_01.png)"],
        ["5", "done", "refused"],
        ["6", "done", "-"],
        ["7", "queued", "-"],
    ]
