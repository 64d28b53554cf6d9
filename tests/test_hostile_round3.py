"""Issue 24, hostile inputs round 3, below Discord: style names, processes opening one data dir at
once, read-only and full disks, tampered sidecars, a style held by identity. Real processes, real
files, tiny models."""

from __future__ import annotations

import errno
import gc
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emaki.cli import main
from engine.coordinator.store import MIGRATIONS, open_store
from tests import test_cli_jobs
from tests.helpers import make_random_lora, sha

tiny_env = test_cli_jobs.tiny_env
SMALL = test_cli_jobs.SMALL
ROOT = Path(__file__).resolve().parents[1]
ONE = ["--frames", "1", "--steps", "2", "-q"]

# Each process waits for the go file, then opens the data dir and writes a job: as close to "at the
# same moment" as processes get.
OPENER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.001)
    from engine.coordinator.store import open_store
    store = open_store(Path(sys.argv[1]))
    store.add_job(idea="race", params={"n": os.getpid()})
    print("ok")
    """
)


def test_processes_opening_a_fresh_data_dir_at_once_all_succeed(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for attempt in range(4):
        data, go = tmp_path / f"data{attempt}", tmp_path / f"go{attempt}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPENER, str(data), str(go)], env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )
            for _ in range(4)
        ]  # fmt: skip
        time.sleep(1.5)  # every interpreter started and waiting (imports are the slow part)
        go.touch()
        outcomes = [p.communicate(timeout=120) for p in procs]
        for proc, (out, err) in zip(procs, outcomes, strict=True):
            assert proc.returncode == 0 and out.strip() == "ok", err[-2000:]
        store = open_store(data)
        assert len(store.jobs_where("1 = 1", [])) == 4
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_two_animate_commands_on_a_fresh_data_dir_both_keep_their_result(tmp_path: Path) -> None:
    """The README's promise, as a person runs it: two `emaki animate` of one idea at once, the data dir
    created by whichever opens it first; both exit 0 and each keeps its own animation."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), EMAKI_PROFILE="tiny", EMAKI_DATA_DIR=str(tmp_path / "data"))
    argv = [sys.executable, "-m", "emaki", "animate", "a kite over a hill", "--frames", "1", "--steps", "2", "-q"]
    runs = [
        subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    written = []
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-2000:]
        written.append(out.strip())
    assert sorted(written) == ["a-kite-over-a-hill-2.gif", "a-kite-over-a-hill.gif"]
    assert all((tmp_path / name).is_file() for name in written)
    assert len(open_store(tmp_path / "data").jobs_where("status = 'done'", [])) == 2


def test_a_data_dir_from_before_versions_upgrades_in_place(tmp_path: Path) -> None:
    """Today's first schema (no posting state, no server columns, no uid) with a job and a style in it."""
    tmp_path.mkdir(exist_ok=True)
    conn = sqlite3.connect(tmp_path / "emaki.db")
    conn.executescript(
        """
        CREATE TABLE jobs (id INTEGER PRIMARY KEY, kind TEXT, status TEXT, owner_id INTEGER, owner_name TEXT,
            guild_id INTEGER, channel_id INTEGER, status_message_id INTEGER, result_message_id INTEGER, idea TEXT,
            params TEXT, parent_job_id INTEGER, regen_from INTEGER, error TEXT, gif_path TEXT,
            posted INTEGER DEFAULT 0, created_at FLOAT, started_at FLOAT, finished_at FLOAT, post_state TEXT);
        CREATE TABLE styles (name TEXT PRIMARY KEY, trigger TEXT, adapter TEXT, path TEXT, weight FLOAT,
            steps INTEGER, dataset_id INTEGER, metrics TEXT, created_at FLOAT);
        INSERT INTO jobs (kind, status, idea, params, posted) VALUES ('animate', 'done', 'a fox', '{}', 1);
        INSERT INTO styles (name, path, weight) VALUES ('ink', '/x/ink.safetensors', 1.0);
        """
    )
    conn.commit()
    conn.close()
    store = open_store(tmp_path)
    job = store.job(1)
    assert job["idea"] == "a fox" and job["status_final"] == 1 and job["worker_losses"] is None
    assert store.style("INK")["uid"] and store.style("ink")["guild_id"] is None
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    again = open_store(tmp_path)  # a second open changes nothing
    assert again.style("ink")["uid"] == store.style("ink")["uid"]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- item 2: style names folded at every lookup -----------------------------------------------------
def test_a_style_added_with_capitals_is_found_by_them(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = make_random_lora(tiny_env / "lora")
    assert main(["styles", "add", "Ghibli", str(weights), "--trigger", "ghibli"]) == 0
    assert main(["animate", "a fox", "--style", "Ghibli", "--out", "fox.gif", *ONE]) == 0
    sidecar = json.loads((tiny_env / "fox.json").read_text())
    assert sidecar["params"]["style"] == "ghibli" and sidecar["style"]["name"] == "ghibli"
    assert main(["styles", "remove", "Ghibli"]) == 0
    assert open_store(tiny_env / "data").styles() == []


# --- item 5: tampered sidecars ----------------------------------------------------------------------
@pytest.fixture
def sidecar(tiny_env: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert main(["animate", "a fox", "--out", "fox.gif", "--seed", "3", *ONE]) == 0
    capsys.readouterr()
    return tiny_env / "fox.json"


def _tamper(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("style", ["ink", ["ink"], 3, {"sha256": "00"}, {"name": 7}])
def test_a_sidecars_style_of_the_wrong_shape_is_one_line(
    sidecar: Path, capsys: pytest.CaptureFixture[str], style: object
) -> None:
    _tamper(sidecar, style=style)
    assert main(["animate", "--from-sidecar", str(sidecar), "--out", "again.gif", "-q"]) == 2
    assert "style must be null or an object with a name" in one_error_line(capsys)
    assert not (sidecar.parent / "again.gif").exists()


def test_a_sidecars_idea_that_is_a_list_is_refused(sidecar: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tamper(sidecar, idea=["a fox", "a wolf"])
    assert main(["animate", "--from-sidecar", str(sidecar), "--out", "again.gif", "-q"]) == 2
    assert "the idea must be text" in one_error_line(capsys)


def test_a_tampered_base_model_is_not_recorded_as_rendered_on_tiny(
    sidecar: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads(sidecar.read_text())
    data["models"]["base_model"] = "someone/not-what-rendered"
    sidecar.write_text(json.dumps(data))
    assert main(["animate", "--from-sidecar", str(sidecar), "--out", "again.gif", "-q"]) == 0
    again = json.loads((sidecar.parent / "again.json").read_text())
    assert again["models"]["base_model"] == "tiny"


# --- item 4: read-only and full disks -----------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 16 MiB file system of its own for the data dir (a tmpfs: root here, as in the container); as
    another user, a plain folder whose permission bits are taken away instead (see `read_only`)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = os.geteuid() == 0
    if mounted and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)]).returncode:
        pytest.skip("running as root where mount is not allowed: no file system to fill or make read-only")
    monkeypatch.setenv("EMAKI_DATA_DIR", str(mount / "data"))
    monkeypatch.setenv("EMAKI_MIN_FREE_BYTES", "0")
    yield mount
    for view in _views:
        subprocess.run(["umount", "-l", str(view)], check=True)
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], check=True)
    else:
        for folder in [mount, *(p for p in mount.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)


def read_only(mount: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data dir from now on through a read-only view: a read-only bind mount as root (the files
    stay open for writing in this process, so the disk itself cannot be remounted), else no write bits."""
    if os.geteuid() == 0:
        view = mount.parent / "read-only-view"
        view.mkdir()
        subprocess.run(["mount", "--bind", str(mount), str(view)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        monkeypatch.setenv("EMAKI_DATA_DIR", str(view / "data"))
        monkeypatch.setattr(sys.modules[__name__], "_views", [*_views, view])
    else:
        for folder in [*(p for p in mount.rglob("*") if p.is_dir()), mount]:
            folder.chmod(0o555)
        for file in (p for p in mount.rglob("*") if p.is_file()):
            file.chmod(0o444)


_views: list[Path] = []


def fill(mount: Path) -> Path:
    """Write zeros until the file system says it is full; the file to delete to make room again."""
    filler = mount / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.parametrize(
    "argv", [["jobs"], ["styles"], ["jobs", "--purge"], ["resume", "1"], ["redo", "1", "--from", "1"]]
)
def test_a_read_only_data_dir_is_one_line(
    tiny_env: Path,
    small_disk: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
) -> None:
    assert main(["animate", "a fox", "--out", str(tiny_env / "fox.gif"), *ONE]) == 0
    capsys.readouterr()
    gc.collect()  # the command's database connection closes, as when its process ends: no -wal, no -shm left
    assert not list(small_disk.glob("data/emaki.db-*"))
    read_only(small_disk, monkeypatch)
    assert main(argv) == 2
    assert "read-only" in one_error_line(capsys)


def test_a_disk_that_fills_during_a_render_is_one_line_and_resume_finishes(
    tiny_env: Path, small_disk: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills as frame 1 lands: the database then refuses the frame's row ("database or disk
    is full"). Once there is room, `emaki resume` finishes the job, its frames as an unbroken run's."""
    assert main(["animate", "a fox runs", "--out", str(tiny_env / "whole.gif"), "--seed", "5", *SMALL]) == 0
    from engine.coordinator import worker

    real_write, filled = worker.write_atomic, []

    def write_then_fill(path: Path, data: bytes) -> None:
        real_write(path, data)
        if path.name == "frame_01.png" and not filled:
            filled.append(fill(small_disk))

    monkeypatch.setattr(worker, "write_atomic", write_then_fill)
    capsys.readouterr()
    assert main(["animate", "a fox runs", "--out", str(tiny_env / "fox.gif"), "--seed", "5", *SMALL]) == 2
    line = one_error_line(capsys)
    assert "full" in line and "resume job 2" in line, line
    assert not (tiny_env / "fox.gif").exists()
    monkeypatch.setattr(worker, "write_atomic", real_write)
    filled[0].unlink()
    assert main(["resume", "2", "-q"]) == 0
    assert sha(tiny_env / "fox.gif") == sha(tiny_env / "whole.gif")


def test_enospc_writing_a_frame_is_one_line_and_resume_finishes(
    tiny_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no file system can be filled: the write of frame 2 refused as a full disk refuses it."""
    from engine.coordinator import worker

    real_write = worker.write_atomic

    def refuse_frame_2(path: Path, data: bytes) -> None:
        if path.name == "frame_02.png":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(worker, "write_atomic", refuse_frame_2)
    assert main(["animate", "a fox runs", "--out", "fox.gif", "--seed", "5", *SMALL]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "resume job 1" in line, line
    monkeypatch.setattr(worker, "write_atomic", real_write)
    assert main(["resume", "1", "-q"]) == 0
    assert (tiny_env / "fox.gif").is_file() and len(list((tiny_env / "fox_frames").glob("frame_*.png"))) == 3
