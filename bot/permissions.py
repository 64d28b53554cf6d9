"""The Discord permissions the bot uses: the one list `emaki invite`'s URL and the docs' table are made from.

Each entry is one permission the code needs, with what needs it. Nothing here is asked for "in case":
the bot deletes only its own posts (which needs no permission), so Manage Messages is absent, and it
sends no embeds, uses no external emoji and opens no threads. tests/test_invite.py runs a job in a
channel where the bot has exactly these permissions, and checks that the whole flow works there.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

import discord


@dataclass(frozen=True)
class BotPermission:
    flag: str  # discord.Permissions attribute
    label: str  # as the developer portal and the server settings name it
    why: str  # what in the code needs it


BOT_PERMISSIONS: tuple[BotPermission, ...] = (
    BotPermission(
        "view_channel",
        "View Channels",
        "see the channels it posts in, and receive the reactions members add to its results there",
    ),
    BotPermission(
        "send_messages",
        "Send Messages",
        "post results, status messages a lost interaction could not carry, and /train dataset previews",
    ),
    BotPermission(
        "attach_files",
        "Attach Files",
        "the result GIF, the progress contact sheet and the dataset preview are attachments",
    ),
    BotPermission(
        "read_message_history",
        "Read Message History",
        "react to its own results, fetch a dataset preview a moderator reacted to, and look up a result whose "
        "send a crash interrupted (so it is never posted twice)",
    ),
    BotPermission(
        "add_reactions",
        "Add Reactions",
        "put 🔁, 1️⃣..🔟 and ❌ under each result, ✅ and ❌ under each dataset preview",
    ),
)

# The OAuth2 scopes: `bot` joins the server, `applications.commands` registers the slash commands.
SCOPES = ("bot", "applications.commands")


def bot_permissions() -> discord.Permissions:
    return discord.Permissions(**{p.flag: True for p in BOT_PERMISSIONS})


def invite_url(application_id: int) -> str:
    query = urlencode({"client_id": application_id, "scope": " ".join(SCOPES), "permissions": bot_permissions().value})
    return f"https://discord.com/oauth2/authorize?{query}"
