"""The Discord adapter. `create_bot` builds the bot the same way for `emaki bot` and for tests."""

from bot.client import EmakiBot, create_bot

__all__ = ["EmakiBot", "create_bot"]
