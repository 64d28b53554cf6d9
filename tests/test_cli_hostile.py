"""Found by trying the CLI as a hostile user: each is one `error:` line, exit 2, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from emaki.cli import main


@pytest.fixture
def empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMAKI_PROFILE", "tiny")
    monkeypatch.setenv("EMAKI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rand.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    return tmp_path


CASES = [
    (["resume", "99999999999999999999999"], "there is no animation job"),
    (["redo", "99999999999999999999999", "--from", "1"], "there is no animation job"),
    (["styles", "add", "a/b", "rand.safetensors"], "must be 1-32 characters"),
    (["styles", "add", "..", "rand.safetensors"], "must be 1-32 characters"),
    (["styles", "add", "@everyone", "rand.safetensors"], "must be 1-32 characters"),
    (["styles", "add", "ok", "rand.safetensors", "--trigger", "x" * 101], "--trigger must be one line"),
    (["styles", "add", "ok", "missing.safetensors"], "does not exist"),
    (["styles", "add", "ok", "rand.safetensors"], "rand.safetensors"),
    (["styles", "add", "ok", "--from-run", "nope", "--step", "2"], "has no kept saves"),
    (["styles", "remove", "nope"], "unknown style"),
    (["train", "missing.zip", "--name", "fox"], "does not exist"),
    (["evaluate", "--style", "nope"], "unknown style"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_refused_with_one_line_and_no_data_dir(empty: Path, capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err
    assert not (empty / "data").exists()  # a refused command creates no data dir and no database
