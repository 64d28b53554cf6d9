"""`emaki invite [--application-id ID]`: the OAuth2 URL that adds the bot to a server.

The permissions come from bot/permissions.py, the list the docs print too. Without `--application-id`
the id is read from DISCORD_TOKEN: a bot token's first dot-separated segment is the bot user's id in
base64, and Discord gives a bot user the id of its application (some old applications differ: they
pass --application-id). Only that public id is printed; the token itself never is.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os

from engine.errors import InvalidRequest

# Discord ids are snowflakes: positive 64-bit integers. Anything else is not an application id.
MAX_SNOWFLAKE = 2**64 - 1
WHERE_TO_FIND = "the Application ID on the developer portal's General Information page"


def parse_application_id(text: str) -> int:
    raw = text.strip()
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) <= MAX_SNOWFLAKE:
        raise InvalidRequest(
            f"application id must be a Discord id (digits only, like 1234567890123456789): use {WHERE_TO_FIND}"
        )
    return int(raw)


def application_id_from_token(token: str) -> int:
    """The bot user's id from a bot token's first segment. Errors never quote the token."""
    first = token.strip().split(".", 1)[0]
    try:
        decoded = base64.b64decode(first + "=" * (-len(first) % 4), altchars=b"-_", validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = ""
    if not decoded.isdigit() or not 0 < int(decoded) <= MAX_SNOWFLAKE:
        raise InvalidRequest(
            f"DISCORD_TOKEN does not look like a bot token (its first part is not a base64 id): pass --application-id "
            f"with {WHERE_TO_FIND}"
        )
    return int(decoded)


def cmd_invite(args: argparse.Namespace) -> int:
    from bot.permissions import BOT_PERMISSIONS, invite_url

    if args.application_id is not None:
        app_id = parse_application_id(args.application_id)
    elif os.environ.get("DISCORD_TOKEN", "").strip():
        app_id = application_id_from_token(os.environ["DISCORD_TOKEN"])
    else:
        raise InvalidRequest(f"no application id: pass --application-id ({WHERE_TO_FIND}), or set DISCORD_TOKEN")
    print(invite_url(app_id))
    if args.verbose:
        for permission in BOT_PERMISSIONS:
            print(f"  {permission.label}: {permission.why}")
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    invite = sub.add_parser(
        "invite",
        parents=[common],
        help="print the URL that adds the bot to a server, with exactly the permissions it uses",
        description="Print the OAuth2 invite URL (scopes bot and applications.commands). The application id is "
        "--application-id, or else read from DISCORD_TOKEN (its first part is the bot's id). -v lists each "
        "permission and why the bot needs it.",
    )
    invite.add_argument("--application-id", help=f"the application's id ({WHERE_TO_FIND})")
    invite.set_defaults(func=cmd_invite, light=True)  # a URL: no model library is imported
