"""What the client shares with its Cogs, in a module below both: the Cogs name `Host` instead of
importing the client (which imports them), so no feature module imports the client back.

Imports neither discord.py nor torch at run time: `emaki jobs` reads `post_state` from here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import discord
    from discord.http import HTTPClient

    from bot.outbox import Outbox
    from engine.coordinator.jobs import JobQueue
    from engine.coordinator.store import Store
    from engine.coordinator.worker import Engine
    from engine.settings import Settings

# A status message's fields, computed from the job's row when the edit goes out (None: skip it).
StatusFields = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


def post_state(job: dict[str, Any]) -> str:
    """pending | sending | posted | refused | failed (rows from before the column: from `posted`)."""
    if job.get("post_state"):
        return str(job["post_state"])
    return {1: "posted", -1: "refused"}.get(job.get("posted") or 0, "pending")


class Host(Protocol):
    """What a Cog may use of the bot that hosts it (bot/client.py's EmakiBot)."""

    settings: Settings
    store: Store
    engine: Engine
    queue: JobQueue
    outbox: Outbox
    http: HTTPClient  # discord.py's REST client (/train streams attachments over its session)
    gpu: ThreadPoolExecutor  # the renderers' threads: GPU work never runs on the event loop
    train_names_in_check: set[str]  # /train names whose upload is being checked
    previewing: set[int]  # datasets whose preview is being posted
    # /animate's first answer: the job is skipped by position edits until it is sent, then its text kept.
    _announcing: set[int]
    _shown: dict[int, str]

    @property
    def user(self) -> discord.ClientUser | None: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def get_channel(self, id: int, /) -> Any: ...

    async def channel_for(self, channel_id: int) -> discord.abc.Messageable: ...

    def set_status(
        self,
        job_id: int,
        fields: StatusFields | dict[str, Any],
        min_interval: float = 0.0,
        final: bool = False,
        job: dict[str, Any] | None = None,
    ) -> None: ...

    def show_positions(self) -> None: ...

    async def announce(self, job_id: int) -> None: ...

    def remember_interaction(self, job_id: int, interaction: discord.Interaction) -> None: ...

    def tell_privately(self, job_id: int, text: str) -> bool: ...

    async def repost(self, job_id: int, channel_id: int | None = None) -> str: ...

    def add_dynamic_items(self, *items: type[discord.ui.DynamicItem[Any]]) -> None: ...

    def remove_dynamic_items(self, *items: type[discord.ui.DynamicItem[Any]]) -> None: ...
