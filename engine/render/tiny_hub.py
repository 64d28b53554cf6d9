"""The `tiny` profile's models as hub repos on disk, in a cache emaki owns.

Each tiny model (engine/render/tiny.py builds them: seeded random weights, real classes) is written once into
the Hugging Face cache layout (`models--emaki-tiny--sd15/{blobs,snapshots/<rev>,refs/main}`) under
`EMAKI_TINY_CACHE` (default `~/.cache/emaki/tiny-hub`), and from then on it is found and loaded by exactly
the code that finds and loads a user's hub ids (engine/render/model_files.py, `local_files_only`). So every
offline run and every test goes through the user's loading path; only where the files come from differs
(built here instead of downloaded by `emaki models pull`).

A setting whose value is `tiny` names the tiny repo for that role; a hub id under `emaki-tiny/` is looked
up in this cache too. Building is seeded, so every machine writes byte-identical files; it happens under a
file lock and lands with one rename, so processes starting at once neither race nor see half a repo.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from engine.errors import ModelLoadError

TINY = "tiny"
ORG = "emaki-tiny"
# Bump when a builder changes what it writes: a new revision is built beside the old one's files.
FORMAT = 1

# setting -> the repo that a `tiny` value of that setting names
REPOS: dict[str, str] = {
    "base_model": f"{ORG}/sd15",
    "base_model_config": f"{ORG}/sd15",
    "controlnet_model": f"{ORG}/sd15-controlnet-depth",
    "depth_model": f"{ORG}/dpt",
    "safety_model": f"{ORG}/safety-checker",
    "captioner_model": f"{ORG}/blip",
    "motion_adapter": f"{ORG}/animatediff",
    "llm_model": f"{ORG}/llm",
    "clip_model": f"{ORG}/clip",
    "video_model": f"{ORG}/ltx-video",
}
# The tiny SDXL set (the `tiny-sdxl` profile names them by id; engine/render/families/sdxl.py).
SDXL_BASE = f"{ORG}/sdxl"
SDXL_CONTROLNET = f"{ORG}/controlnet-depth-sdxl"
# Every tiny repo: what `ensure_all` builds.
ALL_REPOS = tuple(sorted({*REPOS.values(), SDXL_BASE, SDXL_CONTROLNET}))


def _builders() -> dict[str, Callable[[Path], None]]:
    from engine.render import tiny, tiny_video  # torch and diffusers: imported only when a repo is built

    return {
        f"{ORG}/sd15": tiny.save_sd15,
        f"{ORG}/sd15-controlnet-depth": tiny.save_controlnet,
        f"{ORG}/dpt": tiny.save_depth,
        f"{ORG}/safety-checker": tiny.save_safety_checker,
        f"{ORG}/blip": tiny.save_captioner,
        f"{ORG}/animatediff": tiny.save_motion_adapter,
        f"{ORG}/llm": tiny.save_llm,
        f"{ORG}/clip": tiny.save_clip,
        SDXL_BASE: tiny.save_sdxl,
        SDXL_CONTROLNET: tiny.save_sdxl_controlnet,
        f"{ORG}/ltx-video": tiny_video.save_tiny_video,
    }


def cache_dir() -> Path:
    """Where the tiny repos live: EMAKI_TINY_CACHE, else the user's cache folder."""
    if os.environ.get("EMAKI_TINY_CACHE"):
        return Path(os.environ["EMAKI_TINY_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "emaki" / "tiny-hub"


def is_tiny_ref(ref: str) -> bool:
    return ref == TINY or ref.startswith(f"{ORG}/")


def repo_for(setting: str, ref: str) -> str:
    """The hub id a reference stands for: `tiny` becomes the role's tiny repo."""
    if ref != TINY:
        return ref
    if setting not in REPOS:
        raise ValueError(f"no tiny model for {setting}")
    return REPOS[setting]


def revision(repo_id: str) -> str:
    """A commit-hash-shaped revision that changes only with FORMAT."""
    return hashlib.sha1(f"{repo_id}@{FORMAT}".encode()).hexdigest()


def repo_dir(repo_id: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / f"models--{repo_id.replace('/', '--')}"


def ensure(repo_id: str, root: Path | None = None, build: bool = True) -> Path:
    """The repo's snapshot folder, built first (or built again, when a file of it has gone) if this cache
    does not have it whole. With `build=False` a missing repo is one line saying how to build it."""
    root = root or cache_dir()
    snapshot = repo_dir(repo_id, root) / "snapshots" / revision(repo_id)
    if _complete(repo_id, root):
        return snapshot
    builders = _builders()
    if repo_id not in builders:
        raise ModelLoadError(f"'{repo_id}' is not one of the tiny models ({', '.join(sorted(builders))})")
    if not build:
        raise ModelLoadError(
            f"tiny model '{repo_id}' is not built in emaki's tiny cache {root}: `emaki models pull --profile tiny` "
            "builds it (so does the first tiny command that needs it)"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        locks = root / ".locks"
        locks.mkdir(exist_ok=True)
        with open(locks / f"{repo_id.replace('/', '--')}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then use its result
            if not _complete(repo_id, root):
                _build(repo_id, builders[repo_id], root)
    except OSError as exc:
        raise ModelLoadError(
            f"emaki's tiny cache {root} cannot be written ({exc.strerror or exc}): set EMAKI_TINY_CACHE to a "
            "folder this user can write"
        ) from None
    return snapshot


def ensure_all(root: Path | None = None) -> list[str]:
    """Every tiny repo, both families' (the test session's prebuild); their ids."""
    for repo_id in ALL_REPOS:
        ensure(repo_id, root)
    return list(ALL_REPOS)


def manifest_path(repo_id: str, root: Path) -> Path:
    """The list of files a build wrote. In `.locks/`, the one folder of a hub cache that huggingface_hub's
    own cache tools skip (a folder of its own would read to them as a broken repo)."""
    return root / ".locks" / f"{repo_id.replace('/', '--')}.files.json"


def _complete(repo_id: str, root: Path) -> bool:
    """refs/main names this FORMAT's revision and every file the build wrote is still there (a deleted
    blob or snapshot file means the repo is built again, not reported as a download to make)."""
    ref = repo_dir(repo_id, root) / "refs" / "main"
    try:
        if not (ref.is_file() and ref.read_text().strip() == revision(repo_id)):
            return False
        files = json.loads(manifest_path(repo_id, root).read_text())
    except (OSError, ValueError):
        return False
    snapshot = repo_dir(repo_id, root) / "snapshots" / revision(repo_id)
    return isinstance(files, list) and all((snapshot / name).is_file() for name in files)


def _build(repo_id: str, build: Callable[[Path], None], root: Path) -> None:
    """Write the repo in the hub's layout beside the cache, then move it in with one rename: content-
    addressed blobs, the snapshot's files as relative links to them, `refs/main` naming the snapshot."""
    rev = revision(repo_id)
    for stale in root.glob(f".building-{repo_id.replace('/', '--')}-*"):  # a build killed midway; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    work = root / f".building-{repo_id.replace('/', '--')}-{os.getpid()}"
    files = work / "files"
    files.mkdir(parents=True)
    try:
        import torch

        with torch.random.fork_rng(devices=[]):  # seeded builders must not move the caller's RNG
            build(files)
        staged = work / "repo"
        snapshot = staged / "snapshots" / rev
        (staged / "blobs").mkdir(parents=True)
        for path in sorted(p for p in files.rglob("*") if p.is_file()):
            relative = path.relative_to(files)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            blob = staged / "blobs" / digest
            if not blob.exists():
                os.replace(path, blob)
            link = snapshot / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (staged / "refs").mkdir()
        (staged / "refs" / "main").write_text(rev)
        written = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_symlink())
        target = repo_dir(repo_id, root)
        if target.exists():  # an older FORMAT's repo, or one with files gone: replaced whole
            shutil.rmtree(target)
        os.replace(staged, target)
        manifest = manifest_path(repo_id, root)
        manifest.parent.mkdir(exist_ok=True)
        manifest.with_suffix(".tmp").write_text(json.dumps(written))
        os.replace(manifest.with_suffix(".tmp"), manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
