"""Issue 24, hostile inputs round 3, below Discord: style names, processes opening one data dir at
once, read-only and full disks, tampered sidecars, a style held by identity. Real processes, real
files, tiny models."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from emaki.cli import main
from engine.store import MIGRATIONS, open_store
from tests import test_cli_jobs
from tests.helpers import make_random_lora

tiny_env = test_cli_jobs.tiny_env
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
    from engine.store import open_store
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
