"""The durable, fair job queue: SQLite rows are the queue; the order is computed from them.

There is no separate in-memory list to lose or keep in sync: pending jobs are the `queued` rows, an
interrupted (`running` at start-up) job is put back in front, and the next job is picked round-robin
between members (the member served least recently goes first; within a member, oldest first). The
pause and the round-robin history are rows too, so a restart keeps both. Up to `workers` jobs run at
once (one per renderer; 1 in-process): a free slot takes the next job in the fair order, on enqueue,
at start-up and whenever a job ends, so nothing waits forever on an empty queue. A slot awaits only
the render: whatever a front end does with the result (posting, status edits) must run beside it, so
the next job starts the moment a renderer is free.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from engine.coordinator.store import Store
from engine.errors import InvalidRequest

log = logging.getLogger(__name__)

KEEP_SECONDS = 100  # job durations kept for ETAs (the ETA averages the last 10)
RunJob = Callable[[int, threading.Event], Awaitable[None]]


def fair_order(pending: list[dict[str, Any]], last_served: dict[int, int]) -> list[dict[str, Any]]:
    """Pending jobs in the order they will run: round-robin between owners, oldest first within one.

    `last_served` maps owner -> a counter of when they were last served (higher = more recent). The
    owner served least recently (then: whose oldest job is oldest) goes next, and is then the most
    recent. A heap of owners keyed that way: O(q log m) for q jobs of m owners, where picking the
    minimum by a pass over the owners each time was O(q m).
    """
    by_owner: dict[int, list[dict[str, Any]]] = {}
    for job in sorted(pending, key=lambda j: j["id"]):
        by_owner.setdefault(job["owner_id"] or 0, []).append(job)
    clock = max(last_served.values(), default=0)
    heap = [(last_served.get(owner, -1), jobs[0]["id"], owner) for owner, jobs in by_owner.items()]
    heapq.heapify(heap)
    taken = dict.fromkeys(by_owner, 0)  # how many of each owner's jobs are in the order so far
    order: list[dict[str, Any]] = []
    while heap:
        _, _, owner = heapq.heappop(heap)
        jobs = by_owner[owner]
        order.append(jobs[taken[owner]])
        taken[owner] += 1
        clock += 1  # served now: after every other owner, whose keys do not change
        if taken[owner] < len(jobs):
            heapq.heappush(heap, (clock, jobs[taken[owner]]["id"], owner))
    return order


class JobQueue:
    def __init__(self, store: Store, run_job: RunJob, max_pending_per_member: int, workers: int = 1) -> None:
        self.store = store
        self.run_job = run_job
        self.max_pending = max_pending_per_member
        self.workers = max(1, workers)
        self.running_ids: set[int] = set()  # the jobs being rendered now, at most `workers`
        self.cancel_events: dict[int, threading.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.job_seconds: list[float] = []  # recent job durations, for ETAs

    @property
    def running_id(self) -> int | None:
        """One running job (the oldest), for callers written when only one could run."""
        return min(self.running_ids, default=None)

    # --- state from the store ---------------------------------------------------------------
    @property
    def paused(self) -> bool:
        """The whole queue (the operator's switch): nothing starts."""
        return self.store.queue_flag("paused") == "1"

    @paused.setter
    def paused(self, value: bool) -> None:
        self.store.set_queue_flag("paused", "1" if value else "0")

    def guild_paused(self, guild_id: int | None) -> bool:
        """One server's switch (/pause): its jobs wait, every other server's keep running. A row too."""
        return guild_id is not None and self.store.queue_flag(f"paused:{guild_id}") == "1"

    def pause_guild(self, guild_id: int, value: bool) -> None:
        self.store.set_queue_flag(f"paused:{guild_id}", "1" if value else "0")

    @property
    def last_served(self) -> dict[int, int]:
        return self.store.served()

    def recover(self) -> list[int]:
        """At start-up: jobs left `running` by a crash are queued again, in front of everything
        (they resume at their first missing frame). Returns their ids."""
        interrupted = [j["id"] for j in self.store.jobs_where("status = 'running'", [])]
        for job_id in interrupted:
            self.store.update_job(job_id, status="queued", resume_first=1)
        self.job_seconds.extend(self.store.recent_durations(20))
        return interrupted

    def pending(self) -> list[dict[str, Any]]:
        """Animations first, then trainings: a training gives way at its next checkpoint (it checks
        for queued animations), so a 40-minute run never blocks the channel."""
        queued = self.store.jobs_where("status = 'queued'", [])
        resumed = [j for j in queued if j.get("resume_first")]
        animations = [j for j in queued if j["kind"] != "train" and not j.get("resume_first")]
        trainings = [j for j in queued if j["kind"] == "train" and not j.get("resume_first")]
        served = self.store.served({j["owner_id"] or 0 for j in animations + trainings})
        return resumed + fair_order(animations, served) + fair_order(trainings, served)

    def animations_waiting(self) -> bool:
        return bool(self.store.jobs_where("status = 'queued' and kind = 'animate'", []))

    def position(self, job_id: int) -> int:
        """1 = runs next; 0 = running now; -1 = not pending."""
        if job_id in self.running_ids:
            return 0
        for i, job in enumerate(self._waiting(), start=1):
            if job["id"] == job_id:
                return i
        return -1

    def _waiting(self) -> list[dict[str, Any]]:
        """`pending` less the jobs a slot has just taken (their row turns `running` a moment later,
        on the renderer's thread)."""
        return [job for job in self.pending() if job["id"] not in self.running_ids]

    def eta_seconds(self, position: int) -> float:
        """With N renderers, the job at position p starts after ceil(p / N) job lengths."""
        average = sum(self.job_seconds[-10:]) / len(self.job_seconds[-10:]) if self.job_seconds else 60.0
        return average * max(-(-position // self.workers), 1)

    def check_cap(self, owner_id: int) -> None:
        open_jobs = self.store.jobs_where("owner_id = ? and status in ('queued', 'running')", [owner_id])
        if len(open_jobs) >= self.max_pending:
            raise InvalidRequest(
                f"you already have {len(open_jobs)} jobs waiting (the limit is {self.max_pending}); "
                "wait for one to finish or /cancel one"
            )

    # --- running ---------------------------------------------------------------------------
    def kick(self) -> None:
        """Fill the free slots with the next jobs in the fair order (if not paused). Safe to call any
        time: a slot that is busy is left alone."""
        while not self.paused and len(self.running_ids) < self.workers:
            waiting = self._waiting()
            held = {guild for guild in {job.get("guild_id") for job in waiting} if self.guild_paused(guild)}
            order = [job for job in waiting if job.get("guild_id") not in held]
            if not order:
                return
            self._start(order[0])

    def _start(self, job: dict[str, Any]) -> None:
        self.store.mark_served(job["owner_id"] or 0)
        if job.get("resume_first"):
            self.store.update_job(job["id"], resume_first=0)
        self.running_ids.add(job["id"])
        task = asyncio.get_running_loop().create_task(self._run_one(job["id"]), name=f"emaki-job-{job['id']}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_one(self, job_id: int) -> None:
        cancel = self.cancel_events.setdefault(job_id, threading.Event())
        started = time.monotonic()
        try:
            await self.run_job(job_id, cancel)
        except Exception:  # one failing job must not stop the queue (logged with its traceback)
            log.exception("job %s crashed the runner", job_id)
            self.store.update_job(job_id, status="failed", error="runner crashed")
        finally:
            self.running_ids.discard(job_id)
            self.cancel_events.pop(job_id, None)
        # What the next member waits for is the render (the GIF and upload overlap the next job).
        self.job_seconds.append(time.monotonic() - started)
        del self.job_seconds[:-KEEP_SECONDS]  # a bounded window, not one float per job forever
        self.kick()  # this slot is free: the next job in the fair order takes it

    def cancel(self, job_id: int) -> str:
        """Cancel a queued job now, or ask the running one to stop at its next step."""
        row = self.store.job(job_id)
        if row is None or row["status"] not in ("queued", "running"):
            raise InvalidRequest(f"job {job_id} is not queued or running")
        if job_id in self.running_ids:
            self.cancel_events.setdefault(job_id, threading.Event()).set()
            return "running"
        self.store.update_job(job_id, status="cancelled", error="cancelled")
        return "queued"

    async def idle(self) -> None:
        """Wait until no job is running and none is left to start (or the queue is paused)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))  # never cancels them, even when this wait is cancelled
