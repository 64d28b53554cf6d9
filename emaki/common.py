"""What every subcommand shares: settings from the common options, checks made before any work,
names derived from ideas, and the help text built from the settings' declared ranges."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequest, ResourceError
from engine.settings import PROFILES, Settings, load_settings, rule_of


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "animation"


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings from the common options (validated: a bad value is one error line, before any work);
    `overrides` win over the options (a sidecar's pinned models)."""
    options = {name: getattr(args, name, None) for name in ("profile", "data_dir", "story_backend", "device")}
    return load_settings(config_file=getattr(args, "config", None), **(options | overrides))


def setting_help(name: str, what: str) -> str:
    """`what (range; default D)` from the setting's declared rule and default, so --help never
    disagrees with what is checked."""
    default = next(f.default for f in dataclasses.fields(Settings) if f.name == name)
    shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
    described = rule_of(name).describe()
    return f"{what} ({described + '; ' if described else ''}default {shown})".replace("%", "%%")


def size_help(name: str) -> str:
    sizes = ", ".join(f"{p['min_size']}..{p['max_size']} ({n})" for n, p in PROFILES.items())
    defaults = ", ".join(f"{p[name]} ({n})" for n, p in PROFILES.items())
    return f"{name} in pixels, a multiple of 8: {sizes}; default {defaults}"


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(folder: Path, what: str) -> None:
    """Really try to create a file there: permission bits, read-only mounts and full quotas all show."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".emaki-probe-"):
            pass
    except OSError as exc:
        raise InvalidRequest(f"cannot write in {what} {folder}: {exc.strerror or exc}") from None


def check_data_dir(settings: Settings) -> None:
    """The data dir can be created and written, and has room, checked without creating anything."""
    existing = nearest_existing(settings.data_dir)
    if not existing.is_dir():
        raise InvalidRequest(f"data dir {settings.data_dir}: {existing} is a file, not a folder")
    check_writable_folder(existing, "the data dir")
    free = shutil.disk_usage(existing).free
    if free < settings.min_free_bytes:
        raise ResourceError(
            f"only {free // 2**20} MiB free in {settings.data_dir}; "
            f"at least {settings.min_free_bytes // 2**20} MiB are needed"
        )


def existing_store(settings: Settings) -> Any:
    """The store when the data dir already holds one, else None: looking must create nothing."""
    from engine.coordinator.store import open_store

    return open_store(settings.data_dir) if (settings.data_dir / "emaki.db").is_file() else None


def user_name() -> str:
    return os.environ.get("USER", "cli")


# Loggers of libraries whose progress bars and advice interleave with emaki's own bars.
LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft", "httpx", "torch")


def quiet_environment() -> None:
    """What the libraries decide at import time (transformers warns about a missing torchvision while
    importing an image processor), set without importing them. Python warnings (deprecations, "should
    be kept in float32") are advice to emaki's developers, not to the person running a command."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")


def quiet_libraries(args: argparse.Namespace | None = None) -> None:
    """Only emaki's own lines and bars on the terminal (`-v` keeps the libraries' too). Imports the
    libraries' logging modules, which imports torch: a command that prints a table without the models
    (`jobs`, `styles`, `bot` before its token is checked) calls it only once it needs them."""
    if args is not None and getattr(args, "verbose", False):
        return
    quiet_environment()
    # Their progress bars ("Loading pipeline components", "Loading weights") are switched by a call,
    # not by the environment.
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    disable_progress_bars()
    # After the imports: each library sets its own logger's level when it is first imported.
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
