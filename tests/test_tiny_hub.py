"""The tiny profile's models are hub repos on disk (engine/render/tiny_hub.py), built once, byte-identical on every
machine, in the hub's exact layout, and found by the loader that finds a user's hub ids."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir, try_to_load_from_cache

from emaki.cli import main
from engine.render import model_files, tiny_hub
from engine.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".locks" not in p.parts
    }


def test_the_tiny_set_is_byte_identical_wherever_it_is_built(tmp_path: Path) -> None:
    # Two processes building into two fresh caches at once: the same files, byte for byte.
    code = (
        "import sys; from pathlib import Path; from engine.render import tiny_hub; "
        "tiny_hub.ensure_all(Path(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / name)], env=env) for name in ("a", "b")]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    first, second = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert first == second and len(first) > 30
    assert first == digests(Path(os.environ["EMAKI_TINY_CACHE"]))  # and the same as this session's cache


def test_processes_racing_on_one_fresh_cache_build_each_repo_once(tmp_path: Path) -> None:
    code = "import sys, pathlib\nfrom engine.render import tiny_hub\n"
    code += "tiny_hub.ensure('emaki-tiny/dpt', pathlib.Path(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env) for _ in range(3)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0, 0]
    repo = tiny_hub.repo_dir("emaki-tiny/dpt", tmp_path)
    assert [p.name for p in (repo / "snapshots").iterdir()] == [tiny_hub.revision("emaki-tiny/dpt")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".building")]  # no half-built leftovers


def test_the_layout_is_the_hubs_own() -> None:
    cache = Path(os.environ["EMAKI_TINY_CACHE"])
    info = scan_cache_dir(cache)
    assert not info.warnings
    assert {repo.repo_id for repo in info.repos} == set(tiny_hub.ALL_REPOS)
    # huggingface_hub resolves a file of a tiny repo from that cache, as it does for any download.
    found = try_to_load_from_cache("emaki-tiny/sd15", "unet/config.json", cache_dir=cache)
    assert isinstance(found, str) and Path(found).is_file()


def test_tiny_values_and_tiny_ids_resolve_through_the_users_path() -> None:
    settings = load_settings(profile="tiny")
    for spec in model_files.profile_models(settings, half=False):
        found = model_files.resolve(spec)
        assert found.path.parent.parent == tiny_hub.repo_dir(tiny_hub.repo_for(spec.setting, spec.ref))
    by_id = model_files.ModelSpec("depth estimator", "depth_model", "emaki-tiny/dpt", pipeline=False, half=False)
    assert model_files.resolve(by_id).path.name == tiny_hub.revision("emaki-tiny/dpt")


def test_pull_on_the_tiny_profile_builds_and_verifies_without_a_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMAKI_TINY_CACHE", str(tmp_path / "fresh"))
    assert main(["models", "pull", "--profile", "tiny", "--device", "cpu", "-q"]) == 0
    err = capsys.readouterr().err
    assert err.count("built in emaki's tiny cache") == 7 and "all models downloaded and verified" in err
    built = {repo.repo_id for repo in scan_cache_dir(tmp_path / "fresh").repos}
    assert built == {tiny_hub.REPOS[k] for k in ("base_model", "controlnet_model", "depth_model")} | {
        tiny_hub.REPOS["safety_model"],
        tiny_hub.REPOS["captioner_model"],
        tiny_hub.REPOS["clip_model"],
        tiny_hub.REPOS["video_model"],
    }


def test_a_damaged_tiny_cache_is_built_again_and_a_bad_place_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cache"
    snapshot = tiny_hub.ensure("emaki-tiny/dpt", root)
    (snapshot / "config.json").resolve().unlink()  # a blob gone: the link dangles
    assert tiny_hub.ensure("emaki-tiny/dpt", root) == snapshot and (snapshot / "config.json").is_file()
    (snapshot / "preprocessor_config.json").unlink()  # a snapshot file gone
    stale = root / ".building-emaki-tiny--dpt-999999"
    stale.mkdir()  # a build killed midway
    tiny_hub.ensure("emaki-tiny/dpt", root)
    assert (snapshot / "preprocessor_config.json").is_file() and not stale.exists()
    with pytest.raises(Exception, match="not built in emaki's tiny cache"):
        tiny_hub.ensure("emaki-tiny/blip", root, build=False)  # what `models check` asks: it writes nothing
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    monkeypatch.setenv("EMAKI_TINY_CACHE", str(a_file))
    assert main(["animate", "a fox", "--profile", "tiny", "--frames", "1", "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: emaki's tiny cache") and "EMAKI_TINY_CACHE" in err[-1]
