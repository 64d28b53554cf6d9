"""`emaki bot`."""

from __future__ import annotations

import argparse

from emaki.common import settings_from_args


def cmd_bot(args: argparse.Namespace) -> int:
    from bot.client import run_bot

    settings = settings_from_args(args)
    run_bot(settings)
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bot = sub.add_parser("bot", parents=[common], help="run the Discord bot (DISCORD_TOKEN)")
    bot.set_defaults(func=cmd_bot)
