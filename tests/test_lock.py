"""The lock (requirements.lock) must fit pyproject.toml; tools/check_lock.py is what CI runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "tools" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_lock"] = module
    spec.loader.exec_module(module)
    return module


def test_the_committed_lock_fits_pyproject(check_lock) -> None:
    pins = check_lock.read_lock(ROOT / "requirements.lock")
    assert check_lock.lock_misfits(ROOT / "pyproject.toml", pins) == []
    # The pins the issue was about: a transformers that works with the peft the index has.
    assert "peft" in pins and "transformers" in pins and str(pins["torch"]) == "2.13.0"


def test_a_range_edited_without_refreshing_the_lock_fails(check_lock, tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    assert '"peft>=0.17"' in text
    pyproject.write_text(
        text.replace('"peft>=0.17"', '"peft>=0.22"').replace(
            '"sqlite-utils>=3.37"', '"sqlite-utils>=3.37", "newdep>=1"'
        )
    )
    problems = check_lock.lock_misfits(pyproject, check_lock.read_lock(ROOT / "requirements.lock"))
    assert any("peft>=0.22" in p and "pins peft==" in p for p in problems)
    assert any("newdep>=1" in p and "does not pin" in p for p in problems)
    assert len(problems) == 2


def test_an_unpinned_line_in_the_lock_is_refused(check_lock, tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\nnumpy>=1\n")
    with pytest.raises(SystemExit, match="not pinned"):
        check_lock.read_lock(lock)
