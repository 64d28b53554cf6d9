"""`emaki bot`: the token is checked before anything heavy is imported (bot/service.py)."""

from __future__ import annotations

import argparse

from emaki.common import quiet_libraries, settings_from_args


def cmd_bot(args: argparse.Namespace) -> int:
    from bot.service import run  # neither discord.py nor torch yet

    settings = settings_from_args(args)
    run(settings, quiet=lambda: quiet_libraries(args))
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bot = sub.add_parser(
        "bot",
        parents=[common],
        help="run the Discord bot (DISCORD_TOKEN)",
        description="Run the Discord bot. The token is checked with Discord before the models load; SIGTERM "
        "or Ctrl-C stops it cleanly (the running job resumes at the next start) and exits 0.",
    )
    bot.set_defaults(func=cmd_bot, light=True)  # quiets the model libraries itself, once the token is accepted
