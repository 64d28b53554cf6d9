"""The Discord adapter. `create_bot` builds the bot the same way for `emaki bot` and for tests.

`bot.client` imports the models (torch): it is imported on first use of `create_bot` or `EmakiBot`, so
that light modules (`bot.service`, which `emaki jobs` reads) do not pay for it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.client import EmakiBot, create_bot

__all__ = ["EmakiBot", "create_bot"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bot import client

        return getattr(client, name)
    raise AttributeError(f"module 'bot' has no attribute {name!r}")
