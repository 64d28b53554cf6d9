"""The docs cannot drift from the code: every setting is described where it is declared, the generated
reference pages are what the declarations give, the README's commands are CI's, the site builds, and
every shell block marked runnable runs on the tiny profile."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bot.permissions import BOT_PERMISSIONS, bot_permissions
from engine.settings import Settings
from tools import settings_doc

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNABLE = re.compile(r"<!-- runnable -->\n```bash\n(.*?)\n```", re.DOTALL)


def test_every_setting_has_a_description() -> None:
    missing = [f.name for f in dataclasses.fields(Settings) if not f.metadata.get("help", "").strip()]
    assert missing == [], f"settings without help=: {missing}"


def test_the_generated_reference_pages_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    stale = settings_doc.main(["--check"])
    assert stale == 0, capsys.readouterr().err
    page = (DOCS / "reference" / "settings.md").read_text()
    for fld in dataclasses.fields(Settings):
        assert f"| `{fld.name}` |" in page  # one row per setting


def test_the_generator_notices_a_stale_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = tmp_path / "settings.md"
    page.write_text(settings_doc.settings_page().replace("Denoising steps", "Denoise steps"))
    monkeypatch.setattr(settings_doc, "PAGES", {page: settings_doc.settings_page})
    assert settings_doc.main(["--check"]) == 1
    assert settings_doc.main([]) == 0 and page.read_text() == settings_doc.settings_page()


def test_pages_that_quote_the_permissions_quote_the_list() -> None:
    for name in ("README.md", "docs/bot.md"):
        text = (ROOT / name).read_text()
        assert all(p.label in text for p in BOT_PERMISSIONS), name
        assert "Manage Messages is not" in text or "nothing more" in text, name
    assert f"integer {bot_permissions().value}" in (DOCS / "bot.md").read_text()


def test_readme_is_short_and_its_test_command_is_cis() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    ci = (ROOT / ".ci" / "run").read_text()
    test_line = ". .venv/bin/activate && python -m pytest -q -p no:cacheprovider"
    assert f"```bash\n{test_line}\n```" in readme
    assert ci.rstrip().splitlines()[-1] == test_line.removeprefix(". .venv/bin/activate && ")
    install = 'pip install torch==2.13.0 && pip install -c requirements.lock -e ".[dev,cluster]"'
    assert install in readme and install in (ROOT / "requirements.lock").read_text()  # the lock's header


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (CI installs it)")
    # Screenshots are committed PNGs; a page pointing at a missing one fails the strict build.
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def runnable_blocks() -> list[tuple[str, str]]:
    found = []
    for page in sorted([ROOT / "README.md", *DOCS.rglob("*.md")]):
        for block in RUNNABLE.findall(page.read_text()):
            found.append((str(page.relative_to(ROOT)), block))
    return found


def test_there_are_runnable_examples() -> None:
    assert any(page == "docs/cli.md" for page, _ in runnable_blocks())


@pytest.mark.parametrize(("page", "block"), runnable_blocks(), ids=lambda value: value if value.endswith(".md") else "")
def test_runnable_example(page: str, block: str, tmp_path: Path) -> None:
    """The block as a reader would paste it, in an empty folder, on the tiny profile (`emaki` is this
    checkout's CLI)."""
    script = f'emaki() {{ "{sys.executable}" -m emaki "$@"; }}\nset -euo pipefail\n{block}\n'
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMAKI_") and k != "DISCORD_TOKEN"}
    env |= {"EMAKI_PROFILE": "tiny", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [shutil.which("bash") or "bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{page}:\n{block}\n--- stderr ---\n{done.stderr[-3000:]}"
