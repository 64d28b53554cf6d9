"""What every subcommand shares: settings from the common options, and names derived from ideas."""

from __future__ import annotations

import argparse
import re

from engine.settings import Settings, load_settings


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "animation"


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(
        config_file=getattr(args, "config", None),
        profile=getattr(args, "profile", None),
        data_dir=getattr(args, "data_dir", None),
        story_backend=getattr(args, "story_backend", None),
        device=getattr(args, "device", None),
    )
