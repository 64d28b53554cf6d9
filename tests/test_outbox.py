"""The outbox's order of writes (issue 25: it keeps a due-time heap instead of recomputing every
pending edit's due time per write): the same order, coalescing, throttling and retries as before."""

from __future__ import annotations

import asyncio
from typing import Any

import discord
import pytest

from bot.outbox import Outbox


def outbox() -> Outbox:
    return Outbox(lambda coro: asyncio.get_running_loop().create_task(coro))


def writer(log: list[Any], name: Any, fail: int = 0) -> Any:
    """A write that records its name, failing with Discord's 500 the first `fail` times."""
    left = [fail]

    async def write() -> None:
        if left[0] > 0:
            left[0] -= 1
            raise discord.HTTPException(_Response(500), "server error")
        log.append(name)

    return write


class _Response:
    def __init__(self, status: int) -> None:
        self.status = status
        self.reason = "error"


async def test_edits_go_in_queue_order_and_a_replacement_keeps_its_place() -> None:
    box, log = outbox(), []
    for key in ("a", "b", "c"):
        box.edit(1, key, writer(log, key))
    box.edit(1, "a", writer(log, "a2"))  # replaces a's edit before it went out: only the newest is written
    await box.idle()
    assert log == ["a2", "b", "c"] and box.writes == 3 and box.pending() == 0


async def test_a_throttled_message_waits_and_the_others_do_not() -> None:
    box, log = outbox(), []
    box.edit(1, "slow", writer(log, "slow-1"), min_interval=0.3)
    await box.idle()
    box.edit(1, "slow", writer(log, "slow-2"), min_interval=0.3)  # edited 0 s ago: waits 0.3 s
    box.edit(1, "fast", writer(log, "fast"))
    await box.idle()
    assert log == ["slow-1", "fast", "slow-2"]


async def test_after_forget_the_next_edit_is_not_throttled() -> None:
    box, log = outbox(), []
    box.edit(1, "job", writer(log, "first"), min_interval=60)
    await box.idle()
    box.forget("job")  # the job ended: its next edit is not held back by the last one
    box.edit(1, "job", writer(log, "last"), min_interval=60)
    await asyncio.wait_for(box.idle(), 5)
    assert log == ["first", "last"]


async def test_a_failed_edit_is_retried_behind_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Outbox, "retry_base_s", 0.05)
    box, log = outbox(), []
    box.edit(1, "flaky", writer(log, "flaky", fail=1))
    box.edit(1, "ok", writer(log, "ok"))
    await box.idle()
    assert log == ["ok", "flaky"] and box.writes == 3


async def test_a_drain_of_many_edits_writes_each_message_once() -> None:
    box, log = outbox(), []
    for round_ in range(3):
        for key in range(500):
            box.edit(key % 4, key, writer(log, (key, round_)))
    await box.idle()
    assert sorted(log) == sorted((key, 2) for key in range(500))  # coalesced: each message's newest only
    assert [k for k, _ in log if k % 4 == 0] == list(range(0, 500, 4))  # per channel, in queue order
