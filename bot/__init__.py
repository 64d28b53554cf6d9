"""The Discord adapter. `create_bot` builds the bot the same way for `emaki bot` and for tests."""

from typing import Any

__all__ = ["EmakiBot", "create_bot"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `bot.permissions` (read by `emaki invite` and the docs) loads without the models.
    if name in __all__:
        from bot import client

        return getattr(client, name)
    raise AttributeError(f"module 'bot' has no attribute {name!r}")
