"""`emaki bot`: the token is checked before anything heavy is imported (bot/service.py)."""

from __future__ import annotations

import argparse

from emaki.common import quiet_libraries, settings_from_args


def cmd_bot(args: argparse.Namespace) -> int:
    from bot.service import run  # neither discord.py nor torch yet

    settings = settings_from_args(args)
    run(settings, quiet=lambda: quiet_libraries(args))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Docker's HEALTHCHECK: 0 healthy, 1 unhealthy (Docker reserves 2, emaki's usual error code)."""
    import sys

    from bot.service import health

    healthy, line = health(settings_from_args(args))
    print(line, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bot = sub.add_parser(
        "bot",
        parents=[common],
        help="run the Discord bot (DISCORD_TOKEN)",
        description="Run the Discord bot. The token is checked with Discord before the models load; SIGTERM "
        "or Ctrl-C stops it cleanly (the running job resumes at the next start) and exits 0.",
    )
    bot.set_defaults(func=cmd_bot, light=True)  # quiets the model libraries itself, once the token is accepted
    health = sub.add_parser(
        "health",
        parents=[common],
        help="exit 0 when a bot on this data dir is connected and alive (the container's HEALTHCHECK)",
        description="Reads the heartbeat the running bot rewrites every 30 s in the data dir; exits 1 when it "
        "is missing or older than 120 s. Imports neither torch nor discord.py.",
    )
    health.set_defaults(func=cmd_health, light=True)
