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
import bisect
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


class FairOrder:
    """One kind's waiting jobs in the order `fair_order` gives them, kept as jobs come and go instead of
    computed from every row per pick: each owner's job ids (oldest first) and a heap of owners keyed
    (last served, oldest job id, owner), stale entries skipped when they surface. The next job is the
    heap's top, O(log m) per change. The whole order comes from ranks, built only when asked for: the
    r-th round holds the r-th job of every owner with more than r, owners in key order (each owner,
    once served, is more recent than everyone not yet served in that round, so rounds keep that order)."""

    def __init__(self, served: dict[int, int]) -> None:
        self.served = served  # owner -> clock, shared with the queue's other FairOrder
        self.jobs: dict[int, list[int]] = {}
        self._heap: list[tuple[int, int, int]] = []

    def _key(self, owner: int) -> tuple[int, int, int]:
        return (self.served.get(owner, -1), self.jobs[owner][0], owner)

    def touch(self, owner: int) -> None:
        """The owner's key may have changed (served, or a new oldest job): push its current one."""
        if owner not in self.jobs:
            return
        heapq.heappush(self._heap, self._key(owner))
        if len(self._heap) > 2 * len(self.jobs) + 64:  # mostly stale entries: start over, O(m)
            self._heap = [self._key(o) for o in self.jobs]
            heapq.heapify(self._heap)

    def add(self, owner: int, job_id: int) -> None:
        jobs = self.jobs.setdefault(owner, [])
        bisect.insort(jobs, job_id)  # almost always an append: ids grow
        if jobs[0] == job_id:
            self.touch(owner)

    def remove(self, owner: int, job_id: int) -> None:
        jobs = self.jobs[owner]
        index = bisect.bisect_left(jobs, job_id)
        del jobs[index]
        if not jobs:
            del self.jobs[owner]
        elif index == 0:
            self.touch(owner)

    def first(self) -> int | None:
        """The job that runs next, in O(log m) amortised."""
        while self._heap:
            key = self._heap[0]
            if key[2] in self.jobs and self._key(key[2]) == key:
                return key[1]
            heapq.heappop(self._heap)
        return None

    def order(self) -> list[int]:
        """Every job id in the order they will run (what fair_order returns), from ranks: O(q + m log m)."""
        order: list[int] = []
        active = sorted(self.jobs, key=self._key)
        rank = 0
        while active:
            next_round = []
            for owner in active:
                jobs = self.jobs[owner]
                order.append(jobs[rank])
                if len(jobs) > rank + 1:
                    next_round.append(owner)
            active, rank = next_round, rank + 1
        return order


class WaitingJobs:
    """The queued rows held in memory in `JobQueue.pending`'s order: interrupted jobs first (oldest
    first), then animations, then trainings, each in the fair order. Kept current by the queue from the
    store's change log (only the rows that changed are read); the rows stay the truth."""

    def __init__(self, rows: list[dict[str, Any]], served: dict[int, int]) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.served = served
        self.resumed: list[int] = []
        self.animations = FairOrder(served)
        self.trainings = FairOrder(served)
        self._order: list[int] | None = None  # built on demand, dropped at every change
        self._index: dict[int, int] = {}
        for row in rows:
            self.put(row)

    def _group(self, row: dict[str, Any]) -> FairOrder | None:
        if row.get("resume_first"):
            return None
        return self.trainings if row["kind"] == "train" else self.animations

    def put(self, row: dict[str, Any]) -> None:
        """A job's row as it is now: kept if queued, dropped otherwise."""
        self.drop(row["id"])
        if row["status"] != "queued":
            return
        self.rows[row["id"]] = row
        group = self._group(row)
        if group is None:
            bisect.insort(self.resumed, row["id"])
        else:
            group.add(row["owner_id"] or 0, row["id"])
        self._order = None

    def drop(self, job_id: int) -> None:
        row = self.rows.pop(job_id, None)
        if row is None:
            return
        group = self._group(row)
        if group is None:
            self.resumed.remove(job_id)
        else:
            group.remove(row["owner_id"] or 0, job_id)
        self._order = None

    def serve(self, owner: int, clock: int) -> None:
        if clock <= self.served.get(owner, -1):
            return  # clocks only grow: an older report (the row was read after it) changes nothing
        self.served[owner] = clock
        self.animations.touch(owner)
        self.trainings.touch(owner)
        self._order = None

    def owners(self) -> set[int]:
        return set(self.animations.jobs) | set(self.trainings.jobs)

    def first(self) -> int | None:
        """The job at the head of the order, without building it: O(log m)."""
        if self.resumed:
            return self.resumed[0]
        first = self.animations.first()
        return first if first is not None else self.trainings.first()

    def order(self) -> list[int]:
        if self._order is None:
            self._order = self.resumed + self.animations.order() + self.trainings.order()
            self._index = {job_id: i for i, job_id in enumerate(self._order)}
        return self._order

    def index(self, job_id: int) -> int | None:
        """0-based place in the order (its rank), or None when not waiting."""
        self.order()
        return self._index.get(job_id)


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
        # The waiting jobs in order, kept from the store's change log (see _model); rebuilt from the rows
        # at first use and whenever the log cannot say what changed (another process wrote).
        self._lock = threading.RLock()  # /stats asks from a thread
        self._model_jobs: WaitingJobs | None = None
        self._seen = 0  # the store's change number _model_jobs is current to

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

    def _model(self) -> WaitingJobs:
        """The waiting jobs, brought up to date: the rows of the jobs written since the last look (one
        read for all of them) and the owners served since; every queued row only the first time, or
        when the store cannot say what changed (another process or connection wrote). Call with the
        lock held."""
        end, changes = self.store.queue_changes(self._seen)
        model = self._model_jobs
        if model is None or changes is None:
            queued = self.store.jobs_where("status = 'queued'", [])
            served = self.store.served({j["owner_id"] or 0 for j in queued if not j.get("resume_first")})
            model = self._model_jobs = WaitingJobs(queued, served)
        elif changes:
            ids = {c.key for c in changes if c.kind == "job" and (c.status or c.key in model.rows)}
            rows = self.store.jobs_by_id(ids)
            for job_id in ids - {row["id"] for row in rows}:
                model.drop(job_id)  # gone from the table
            owners = model.owners()
            for row in rows:
                model.put(row)
            waiting_owners = model.owners()
            for owner in owners - waiting_owners:
                model.served.pop(owner, None)  # kept only for owners with jobs waiting
            new_owners = waiting_owners - owners
            for owner, clock in self.store.served(new_owners).items() if new_owners else ():
                model.serve(owner, clock)  # read now: at least as new as any change below
            for change in changes:
                if change.kind == "served" and change.key in waiting_owners:
                    model.serve(change.key, change.clock)
        self._seen = end
        return model

    def pending(self) -> list[dict[str, Any]]:
        """Animations first, then trainings: a training gives way at its next checkpoint (it checks
        for queued animations), so a 40-minute run never blocks the channel. The rows are the queue's
        own copies: read them, never change them."""
        with self._lock:
            model = self._model()
            return [model.rows[job_id] for job_id in model.order()]

    def animations_waiting(self) -> bool:
        return self.store.has_queued("animate")

    def position(self, job_id: int) -> int:
        """1 = runs next; 0 = running now; -1 = not pending. From the job's rank in the order, less the
        jobs ahead of it a slot has just taken: no row read, no pass over the queue."""
        if job_id in self.running_ids:
            return 0
        with self._lock:
            model = self._model()
            rank = model.index(job_id)
            if rank is None:
                return -1
            taken = sum(1 for i in self.running_ids if (r := model.index(i)) is not None and r < rank)
            return rank + 1 - taken

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
            job = self._next()
            if job is None:
                return
            self._start(job)

    def _next(self) -> dict[str, Any] | None:
        """The first waiting job not taken by a slot and not in a paused server: the order's head in
        O(log m) when it qualifies (the usual case), else the first that does in the built order."""
        flags = self.store.queue_flags("paused:")
        held = {int(key.split(":", 1)[1]) for key, value in flags.items() if value == "1"}
        with self._lock:
            model = self._model()
            first = model.first()
            candidates = [first] if first is not None else []
            if first is not None and (first in self.running_ids or model.rows[first].get("guild_id") in held):
                candidates = model.order()
            for job_id in candidates:
                job = model.rows[job_id]
                if job_id not in self.running_ids and job.get("guild_id") not in held:
                    return job
        return None

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
