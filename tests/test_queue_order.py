"""Issue 25: the queue keeps its waiting jobs and their fair order in memory, current from the store's
change log, and gives the same answers as reading every queued row and ordering them afresh (the code
before). Behaviour and the statements run only: no assertion on time (bench.queue --queue-length)."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from engine.coordinator.jobs import FairOrder, JobQueue, fair_order
from engine.coordinator.store import QUEUE_LOG_KEPT, Store, open_store
from tests.test_history import fair_order_before, ids, statements


async def no_run(job_id: int, cancel: threading.Event) -> None:
    return None


def pending_before(store: Store) -> list[dict[str, Any]]:
    """JobQueue.pending as it was before: every queued row read and ordered by the old fair order."""
    queued = store.jobs_where("status = 'queued'", [])
    resumed = [j for j in queued if j.get("resume_first")]
    animations = [j for j in queued if j["kind"] != "train" and not j.get("resume_first")]
    trainings = [j for j in queued if j["kind"] == "train" and not j.get("resume_first")]
    served = store.served()
    return resumed + fair_order_before(animations, served) + fair_order_before(trainings, served)


def next_before(store: Store, running: set[int]) -> int | None:
    """The job the old kick() started next: the first waiting one outside a paused server."""
    waiting = [j for j in pending_before(store) if j["id"] not in running]
    guilds = {j.get("guild_id") for j in waiting}
    held = {g for g in guilds if g is not None and store.queue_flag(f"paused:{g}") == "1"}
    order = [j for j in waiting if j.get("guild_id") not in held]
    return order[0]["id"] if order else None


def test_fair_order_from_ranks_and_its_head_are_the_old_order() -> None:
    rng = random.Random(2025)
    for _ in range(300):
        owners = rng.randint(1, 12)
        jobs = [{"id": i, "owner_id": rng.choice([None, *range(1, owners + 1)])} for i in rng.sample(range(1, 999), 40)]
        clocks = rng.sample(range(1, 100), owners)
        served = {o: clocks[o - 1] for o in range(1, owners + 1) if rng.random() < 0.6}
        order = FairOrder(dict(served))
        for job in jobs:
            order.add(job["owner_id"] or 0, job["id"])
        for job in rng.sample(jobs, 10):  # some leave (started, cancelled)
            order.remove(job["owner_id"] or 0, job["id"])
            jobs.remove(job)
        expected = ids(fair_order_before(jobs, served))
        assert order.order() == expected == ids(fair_order(jobs, served))
        assert order.first() == expected[0]
    assert FairOrder({}).order() == [] and FairOrder({}).first() is None


def test_the_queue_follows_the_rows_through_random_changes(tmp_path: Path) -> None:
    """Jobs added, started, finished, cancelled, interrupted and requeued, members served, servers
    paused, and writes by another connection to the same database: after each, the queue's order,
    every position and the next pick equal the old answers read from all the rows."""
    store = open_store(tmp_path)
    other = Store(store.path)  # another process's connection (the CLI, a second bot)
    queue = JobQueue(store, no_run, 1000, workers=2)
    rng = random.Random(25)
    running: set[int] = set()
    for step in range(400):
        queued = [j["id"] for j in store.jobs_where("status = 'queued'", [])]
        action = rng.random()
        writer = other if rng.random() < 0.1 else store
        if action < 0.35 or not queued:
            writer.add_job(
                kind="train" if rng.random() < 0.2 else "animate",
                owner_id=rng.choice([None, *range(1, 9)]),
                guild_id=rng.choice([None, 10, 20]),
                idea=f"idea {step}",
                params={"frames": 1},
            )
        elif action < 0.5:
            writer.mark_served(rng.choice([0, *range(1, 12)]))
        elif action < 0.6 and len(running) < 2:
            running.add(rng.choice(queued))  # a slot took it; its row turns running a moment later
        elif action < 0.7 and running:
            job_id = running.pop()
            store.update_job(job_id, status=rng.choice(["running", "done"]))
        elif action < 0.8:
            job_id = rng.choice(queued)
            if job_id not in running:
                writer.update_job(job_id, status="cancelled", error="cancelled")
        elif action < 0.85:
            done = store.jobs_where("status in ('running', 'done', 'cancelled')", [])
            if done:  # interrupted (recover) or yielded (a training): queued again, maybe in front
                job_id = rng.choice(done)["id"]
                store.update_job(job_id, status="queued", resume_first=rng.choice([0, 1]))
        elif action < 0.9:
            queue.pause_guild(rng.choice([10, 20]), rng.random() < 0.5)
        else:
            store.update_job(rng.choice(queued), status_message_id=step)  # not a queue change
        queue.running_ids = set(running)
        expected = pending_before(store)
        assert ids(queue.pending()) == ids(expected), step
        assert queue.pending() == expected  # the rows themselves, as they are now
        waiting = [j["id"] for j in expected if j["id"] not in running]
        for position, job_id in enumerate(waiting, start=1):
            assert queue.position(job_id) == position
        assert all(queue.position(job_id) == 0 for job_id in running)
        assert queue.position(10_000) == -1
        picked = queue._next()
        assert (picked["id"] if picked else None) == next_before(store, running), step


def test_the_queue_reads_only_the_rows_that_changed(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for i in range(30):
        store.add_job(owner_id=i % 7, idea=f"idea {i}")
    queue = JobQueue(store, no_run, 1000)
    queue.pending()  # the first look reads every queued row
    new = store.add_job(owner_id=3, idea="one more")
    store.mark_served(5)
    with statements(store) as seen:
        order = queue.pending()
        assert queue.position(new) == 31 - 0 and queue.position(1) >= 1
    assert new in ids(order) and len(order) == 31
    job_reads = [sql for sql in seen if "from jobs" in sql.lower()]
    assert len(job_reads) == 1 and "json_each" in job_reads[0] and f"[{new}]" in job_reads[0], seen
    assert not any("status = 'queued'" in sql for sql in seen)
    with statements(store) as seen:
        queue.pending()  # nothing changed: nothing read but the change count
    assert not any("from jobs" in sql.lower() for sql in seen), seen
    assert ids(queue.pending()) == ids(pending_before(store))


def test_a_reader_far_behind_the_change_log_reads_the_rows_again(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    queue = JobQueue(store, no_run, 100_000)
    job_id = store.add_job(owner_id=1, idea="x")
    assert ids(queue.pending()) == [job_id]
    for _ in range(2 * QUEUE_LOG_KEPT + 1):  # more changes than the log keeps
        store.update_job(job_id, error=None)
    store.update_job(job_id, status="cancelled")
    other = store.add_job(owner_id=2, idea="y")
    with statements(store) as seen:
        assert ids(queue.pending()) == [other]
    assert any("status = 'queued'" in sql for sql in seen)


def test_bench_queue_length_mode_prints_the_cost_per_job_at_each_length(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import queue as bench_queue

    bench_queue.main(["--queue-length", "8,4", "--measure-jobs", "3", "--repeat", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["mode"] == "queue-length" and set(result["ms_per_job"]) == {"4", "8"}
    assert all(ms > 0 for ms in result["ms_per_job"].values()) and result["growth"] > 0
    assert [line.split()[0] for line in out[1:3]] == ["4", "8"]  # the table, side by side


def test_promises_are_synced_and_progress_is_not(tmp_path: Path) -> None:
    # WAL + synchronous=NORMAL for every commit, except those a member is told about: a new job, a submitted
    # dataset, whether a result was posted. Those commit with synchronous=FULL (synced before they return).
    store = open_store(tmp_path)
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)

    def synced_inserts() -> list[str]:
        out, full = [], False
        for sql in statements:
            if sql.startswith("PRAGMA synchronous"):
                full = sql.endswith("FULL")
            elif sql.split()[0].upper() in ("INSERT", "UPDATE"):
                words = sql.split()
                verb = words[0].upper()
                table = words[2 if verb == "INSERT" else 1].strip('[]"')  # INSERT INTO t / UPDATE t
                out.append(f"{'FULL' if full else 'NORMAL'} {verb} {table}")
        return out

    job_id = store.add_job(owner_id=1, channel_id=2, params={"idea": "a fox"})
    store.update_job(job_id, status="running")
    store.update_job(job_id, post_state="posted", posted=1)
    store.add_dataset(owner_id=1, style_name="ink", trigger="", path=str(tmp_path), n_images=2)
    assert synced_inserts() == ["FULL INSERT jobs", "NORMAL UPDATE jobs", "FULL UPDATE jobs", "FULL INSERT datasets"]
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL again after each
