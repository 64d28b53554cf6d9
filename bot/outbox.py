"""Discord writes that never hold up the GPU: who may be pinged, nonces, and a per-channel outbox.

Every message and edit the bot makes goes through here or names its `allowed_mentions` itself: a
member's text (prompt, style name, trigger, captions) is echoed into messages, and Discord parses
`@everyone`, `@here`, `<@&role>` and `<@user>` in whatever it is sent unless told not to.

Status edits are coalesced: an edit for a message replaces any edit for it that has not gone out
yet (the newest carries the newest state), a message is edited at most once per `min_interval`,
and each channel has one flusher task writing its edits one at a time. Sends share a small
per-channel bound with those edits, so a flood of work in one channel queues in memory (one entry
per message) instead of in Discord's rate limiter, and never in front of the next render.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import discord

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
SENDS_PER_CHANNEL = 2  # Discord's per-channel buckets make more parallel writes pointless
EDIT_RETRIES = 3


def only(user_id: int | None) -> discord.AllowedMentions:
    """Pings at most this one member: never everyone/here, never a role, never anyone else."""
    if user_id is None:
        return NO_MENTIONS
    return discord.AllowedMentions(everyone=False, roles=False, replied_user=False, users=[discord.Object(user_id)])


def retryable(exc: discord.HTTPException) -> bool:
    """Discord's trouble (5xx) or a rate limit (429): the same write can succeed later. Anything
    else (403 missing permissions, 404 unknown channel) needs something to change first."""
    return exc.status >= 500 or exc.status == 429


def result_nonce(job_id: int, generation: int) -> str:
    """Discord de-duplicates sends with the same nonce (`enforce_nonce`): a retry or a restart that
    re-sends a result gets the first message back instead of a second post."""
    return f"emaki-r{job_id}.{generation}"


def status_nonce(job_id: int, sends: int) -> str:
    return f"emaki-s{job_id}.{sends}"


def preview_nonce(dataset_id: int) -> str:
    return f"emaki-d{dataset_id}"


# Builds the edit when it is about to go out (so skipped edits cost nothing) and performs it; a
# write that no longer applies returns without writing.
Write = Callable[[], Awaitable[None]]


@dataclass
class _Pending:
    write: Write
    min_interval: float
    attempts: int = 0
    not_before: float = 0.0
    seq: int = 0  # when the key joined the queue: ties go to the earliest (a replacement keeps its place)


@dataclass
class _Channel:
    limit: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(SENDS_PER_CHANNEL))
    edits: dict[Any, _Pending] = field(default_factory=dict)
    flusher: asyncio.Task[None] | None = None
    # (due time, seq, push number, key, the entry it was computed for): the next edit in O(log n) per write, not a
    # pass over every pending edit. Entries of replaced or written edits are skipped when they surface.
    due: list[tuple[float, int, int, Any, _Pending]] = field(default_factory=list)


class Outbox:
    retry_base_s = 2.0  # a failed edit is retried after 2, then 4 seconds

    def __init__(self, spawn: Callable[[Any], asyncio.Task[Any]]) -> None:
        self._spawn = spawn
        self._channels: dict[int, _Channel] = {}
        self._last_edit: dict[Any, float] = {}
        self._seq = 0
        self._pushes = itertools.count()  # never two equal heap entries (the entries themselves do not compare)
        self.writes = 0  # Discord calls made through the outbox (for the benchmark and logs)

    @staticmethod
    def _clock() -> float:
        return asyncio.get_running_loop().time()  # the clock asyncio.sleep counts in

    def _channel(self, channel_id: int) -> _Channel:
        channel = self._channels.get(channel_id)
        if channel is None:  # made only when new (setdefault would build a semaphore per call)
            channel = self._channels[channel_id] = _Channel()
        return channel

    def slot(self, channel_id: int) -> asyncio.Semaphore:
        """Hold for one send (not across retry sleeps): bounds the writes in flight per channel."""
        return self._channel(channel_id).limit

    def edit(self, channel_id: int, key: Any, write: Write, min_interval: float = 0.0) -> None:
        """Queue a write for `key` (one message), replacing one not yet made. Returns at once."""
        channel = self._channel(channel_id)
        previous = channel.edits.get(key)
        pending = _Pending(write, min_interval, not_before=previous.not_before if previous else 0.0)
        pending.seq = previous.seq if previous else self._next_seq()
        self._queue(channel, key, pending)
        if channel.flusher is None or channel.flusher.done():
            channel.flusher = self._spawn(self._flush(channel_id, channel))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _queue(self, channel: _Channel, key: Any, pending: _Pending) -> None:
        """`pending` becomes the key's edit, due when it may be written (the last edit's time, known
        now, plus its interval; or a retry's wait)."""
        channel.edits[key] = pending
        due = max(pending.not_before, self._last_edit.get(key, float("-inf")) + pending.min_interval)
        heapq.heappush(channel.due, (due, pending.seq, next(self._pushes), key, pending))

    def forget(self, key: Any) -> None:
        """The message will not be throttled again (its job ended): drop its last-edit time (an edit
        still queued for it is due when the flusher next looks, as its interval no longer applies)."""
        if self._last_edit.pop(key, None) is None:
            return
        for channel in self._channels.values():
            if key in channel.edits:
                self._queue(channel, key, channel.edits[key])

    def pending(self) -> int:
        return sum(len(c.edits) for c in self._channels.values())

    async def _flush(self, channel_id: int, channel: _Channel) -> None:
        """Write the channel's queued edits, each when its message may be edited again; ends when
        none are left (a later edit starts a new flusher), so nothing idles between bursts."""
        while channel.edits:
            due, _, _, key, pending = channel.due[0]
            if channel.edits.get(key) is not pending:  # replaced or written since: a stale entry
                heapq.heappop(channel.due)
                continue
            now = self._clock()
            if due > now:
                await asyncio.sleep(due - now)  # an edit queued meanwhile may be due sooner: look again
                continue
            heapq.heappop(channel.due)
            del channel.edits[key]
            if pending.min_interval > 0:  # remembered only where it throttles anything
                self._last_edit[key] = self._clock()
            try:
                async with channel.limit:
                    self.writes += 1
                    await pending.write()
            except discord.HTTPException as exc:
                if retryable(exc) and pending.attempts + 1 < EDIT_RETRIES and key not in channel.edits:
                    pending.attempts += 1
                    pending.not_before = self._clock() + self.retry_base_s * 2 ** (pending.attempts - 1)
                    pending.seq = self._next_seq()  # behind the edits already waiting, as it joins again
                    self._queue(channel, key, pending)
                log.warning("Discord write %s in channel %s failed: %s", key, channel_id, exc.status)
            except Exception:  # one broken write must not stop the channel's others
                log.exception("Discord write %s in channel %s crashed", key, channel_id)

    async def idle(self) -> None:
        """Wait until every queued write has been made (tests, benchmark, shutdown)."""
        while any(c.flusher is not None and not c.flusher.done() for c in self._channels.values()):
            await asyncio.gather(*(c.flusher for c in self._channels.values() if c.flusher is not None))
