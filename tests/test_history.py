"""Issue 25: the store's history questions give today's answers, read only what they need (an index,
never the whole jobs table), and the sweep goes in bounded batches. Behaviour and query plans only:
no assertion on time (bench/history.py measures that)."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench import history as bench_history
from engine.coordinator import retention
from engine.coordinator.jobs import KEEP_SECONDS, JobQueue, fair_order
from engine.coordinator.store import INDEXES_3, MIGRATIONS, Store, open_store
from tests import test_bot as base

NOW = 2_000_000_000.0
DAY = 86400.0


def history(store: Store, jobs: int = 120, seed: int = 1) -> None:
    """A small mixed history written through the store's own calls."""
    rng = random.Random(seed)
    for i in range(jobs):
        status = rng.choice(["done", "done", "done", "failed", "cancelled", "queued", "running"])
        job_id = store.add_job(
            kind=rng.choice(["animate", "animate", "animate", "train"]),
            status=status,
            owner_id=rng.choice([1, 2, 3]),
            guild_id=rng.choice([None, 10, 20]),
            channel_id=rng.choice([None, 7, 7]),
            idea=f"idea {i}",
            params={"frames": 2},
        )
        finished = NOW - rng.uniform(0, 60) * DAY
        posted = rng.choice([0, 1, 1, -1, None])
        store.update_job(
            job_id,
            created_at=NOW - rng.uniform(0, 3) * DAY,
            started_at=finished - rng.uniform(5, 50) if rng.random() > 0.1 else None,
            finished_at=finished if status not in ("queued", "running") else None,
            posted=posted,
            post_state=rng.choice([None, "pending", "sending", "refused", "failed", "posted"]),
            next_post_at=rng.choice([None, NOW - 5, NOW + 5]),
            result_message_id=rng.choice([None, 1000 + i]),
            status_final=rng.choice([None, 0, 1]),
            purged_at=rng.choice([None, None, NOW - DAY]),
        )


def ids(rows: list[dict[str, Any]]) -> list[int]:
    return [r["id"] for r in rows]


@contextmanager
def statements(store: Store) -> Iterator[list[str]]:
    """The SQL the store runs meanwhile, with its values bound."""
    seen: list[str] = []
    store.db.conn.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        store.db.conn.set_trace_callback(None)


def plans(store: Store, call: Callable[[], Any]) -> list[str]:
    """The query plan of every select `call` makes: how SQLite reads each table."""
    with statements(store) as seen:
        call()
    out = []
    for sql in seen:
        if sql.lstrip().lower().startswith("select"):
            out += [row[3] for row in store.db.conn.execute(f"explain query plan {sql}")]
    assert out, "no query was made"
    return out


def reads_no_whole_table(plan: list[str]) -> bool:
    """The tables that grow with history (jobs, styles) are read through an index (SEARCH, or a SCAN
    USING an index), never row by row. (Workers, a row per renderer, may be scanned.)"""
    steps = [step for step in plan if step.split()[:2] in (["SCAN", "jobs"], ["SEARCH", "jobs"])]
    steps += [step for step in plan if step.split()[:2] in (["SCAN", "styles"], ["SEARCH", "styles"])]
    return bool(steps) and all("USING" in step for step in steps)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = open_store(tmp_path)
    history(store)
    return store


def test_named_questions_answer_as_the_old_queries(store: Store) -> None:
    """The same rows as the queries the bot ran before (copied here), on a mixed history."""
    old_due = store.jobs_where(
        "kind = 'animate' and status = 'done' and channel_id is not null and coalesce(posted, 0) != 1 "
        "and coalesce(post_state, 'pending') in ('pending', 'sending', 'refused') "
        "and coalesce(next_post_at, 0) <= ?",
        [NOW],
    )
    assert old_due and ids(store.results_due(NOW)) == ids(old_due)
    # a batch at a time, oldest first: the next check takes the rest
    assert ids(store.results_due(NOW, limit=2)) == ids(old_due)[:2]
    for owner in (1, 2, 3):
        old_unposted = store.jobs_where(
            "owner_id = ? and kind = 'animate' and status = 'done' and coalesce(posted, 0) != 1 "
            "and coalesce(post_state, 'pending') != 'posted'",
            [owner],
        )
        assert store.unposted_results(owner) == old_unposted
    old_owed = store.jobs_where(
        "kind = 'animate' and posted = 1 and result_message_id is not null and channel_id is not null "
        "and coalesce(status_final, 0) != 1",
        [],
    )
    assert old_owed and store.status_edits_owed() == old_owed
    old_done = store.jobs_where("status = 'done' and started_at is not null", [], order_by="id desc")[:20]
    assert store.recent_durations(20) == [j["finished_at"] - j["started_at"] for j in old_done]
    since = NOW - DAY
    assert store.jobs_since(since) == store.count_jobs("created_at >= ?", [since]) > 0
    assert store.jobs_since(since, 10) == store.count_jobs("created_at >= ? and guild_id = ?", [since, 10]) > 0


def test_purge_candidates_in_batches_are_the_old_answer(store: Store) -> None:
    cutoff = NOW - 30 * DAY
    old = store.jobs_where(
        "kind = 'animate' and purged_at is null and finished_at is not null and finished_at < ? "
        "and (status in ('failed', 'cancelled') or (status = 'done' and "
        "(channel_id is null or coalesce(post_state, '') = 'posted' or posted = 1)))",
        [cutoff],
    )
    batches: list[int] = []
    original = store.purge_candidates

    def recording(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        rows = original(*args, **kwargs)
        batches.append(len(rows))
        assert not store._lock._is_owned()  # type: ignore[attr-defined]  # released before the caller sees it
        return rows

    store.purge_candidates = recording  # type: ignore[method-assign]
    walked = list(retention._candidates(store, cutoff, batch=3))
    assert len(old) > 6 and sorted(ids(walked)) == sorted(ids(old))
    assert [j["finished_at"] for j in walked] == sorted(j["finished_at"] for j in old)  # oldest end first
    assert max(batches) <= 3 and len(batches) == len(old) // 3 + 1


def test_sweep_in_batches_skips_a_rendered_job_once_and_frees_the_store_between(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job being rendered is skipped without being read again (the walk goes past it), and another
    thread can use the store while the sweep is between batches."""
    from engine.settings import load_settings

    settings = load_settings(None, data_dir=tmp_path, keep_days=30)
    cutoff = NOW - 30 * DAY
    expected = ids(list(retention._candidates(store, cutoff, batch=1000)))
    rendering = expected[1]
    monkeypatch.setattr(retention, "PURGE_BATCH", 2)
    monkeypatch.setattr("engine.coordinator.job_files.is_rendering", lambda data_dir, job_id: job_id == rendering)
    others: list[bool] = []
    original = store.purge_candidates

    def between(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        done = threading.Event()
        threading.Thread(target=lambda: (others.append(store.job(rendering) is not None), done.set())).start()
        assert done.wait(5)
        return original(*args, **kwargs)

    store.purge_candidates = between  # type: ignore[method-assign]
    report = retention.sweep(settings, store, NOW)
    assert report.jobs == [j for j in expected if j != rendering]
    assert store.job(rendering)["purged_at"] is None
    assert len(others) == len(expected) // 2 + 1 and all(others)


def test_recover_reads_the_newest_twenty_durations(store: Store) -> None:
    async def run_job(job_id: int, cancel: threading.Event) -> None:
        return None

    queue = JobQueue(store, run_job, 3)
    running = ids(store.jobs_where("status = 'running'", []))
    assert queue.recover() == running and running
    old_done = store.jobs_where("status = 'done' and started_at is not null", [], order_by="id desc")[:20]
    assert queue.job_seconds == [j["finished_at"] - j["started_at"] for j in old_done]


def test_style_choices_prefix_visibility_and_bound(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for k in range(40):
        store.add_style(f"snow{k:02d}", "/x.safetensors")  # global
    store.add_style("snowfox", "/x.safetensors", guild_id=10)  # server 10's own
    store.add_style("snowowl", "/x.safetensors", guild_id=20, shared=1)  # server 20's, shared
    store.add_style("snowcat", "/x.safetensors", guild_id=20)  # server 20's, private
    store.add_style("inkwash", "/x.safetensors")
    assert store.style_choices(10, True, "SNOWF") == ["snowfox"]  # folded like names are
    assert store.style_choices(10, True, "snowo") == ["snowowl"]
    assert store.style_choices(10, False, "snowo") == []
    assert store.style_choices(10, True, "snowc") == []  # another server's private style
    assert store.style_choices(None, True, "snowf") == []  # a DM sees the global ones only
    assert store.style_choices(10, True, "ink") == ["inkwash"]
    assert store.style_choices(10, True, "snow") == [f"snow{k:02d}" for k in range(25)]  # name order, 25
    assert len(store.style_choices(10, True, "")) == 25
    assert store.style_choices(10, True, "zz") == []


def test_the_bot_questions_read_indexes_not_the_history(store: Store) -> None:
    from bot.admin import stats_figures
    from engine.settings import load_settings

    store.add_style("inkwash", "/x.safetensors")
    calls: dict[str, Callable[[], Any]] = {
        "repost": lambda: store.results_due(NOW),
        "queue": lambda: store.unposted_results(1),
        "status_edits": store.status_edits_owed,
        "recover": lambda: store.recent_durations(20),
        "today": lambda: store.jobs_since(NOW - DAY),
        "today_here": lambda: store.jobs_since(NOW - DAY, 10),
        "median": lambda: store.recent_job_seconds(100),
        "sweep_batch": lambda: store.purge_candidates(NOW - 30 * DAY),
        "autocomplete": lambda: store.style_choices(10, True, "in"),
        "stats": lambda: stats_figures(store, load_settings(None, data_dir=store.path.parent), 10, NOW),
    }
    store.set_disk_figure(0, NOW - DAY)  # as the daily walk leaves it
    for name, call in calls.items():
        plan = plans(store, call)
        assert reads_no_whole_table(plan), (name, plan)


def test_migration_3_builds_the_indexes_once_on_an_older_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(tmp_path)
    history(store, jobs=40)
    due = ids(store.results_due(NOW))
    names = {r[0] for r in store.db.execute("select name from sqlite_master where type = 'index'").fetchall()}
    assert {s.split()[5] for s in INDEXES_3} <= names
    for statement in INDEXES_3:  # as a version-2 data dir has it
        store.db.execute(f"drop index {statement.split()[5]}")
    store.db.execute("pragma user_version = 2")
    store.db.conn.close()
    monkeypatch.setattr("engine.coordinator.store.INDEX_NOTICE_JOBS", 10)
    with caplog.at_level("WARNING", logger="engine.coordinator.store"):
        again = open_store(tmp_path)
    assert "indexing 40 jobs for the new store version, once" in caplog.text  # said at start-up
    caplog.clear()
    open_store(tmp_path)  # built once: the next start says nothing
    assert "indexing" not in caplog.text
    assert again.db.execute("pragma user_version").fetchone()[0] == len(MIGRATIONS) >= 3  # 4: style families
    names = {r[0] for r in again.db.execute("select name from sqlite_master where type = 'index'").fetchall()}
    assert {s.split()[5] for s in INDEXES_3} <= names
    assert due and ids(again.results_due(NOW)) == due


def test_bench_history_prints_side_by_side_json(capsys: pytest.CaptureFixture[str]) -> None:
    bench_history.main(["--jobs", "40,200", "--members", "5", "--repeat", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ops = {"stats", "sweep", "repost", "status_edits", "queue", "recover", "autocomplete", "jobs_cmd", "daily_walk"}
    assert set(result["ops"]) == ops and set(result["growth"]) == ops
    assert all(set(by_size) == {"40", "200"} for by_size in result["ops"].values())


def test_an_unknown_index_name_is_a_bug_not_a_scan(store: Store) -> None:
    """INDEXED BY makes a query fail loudly if its index ever stops fitting it, instead of quietly
    reading the whole history again."""
    with pytest.raises(sqlite3.OperationalError, match="no query solution"):
        store.db.execute("select * from jobs indexed by jobs_unposted where owner_id = 1").fetchall()


def test_pending_reads_only_waiting_members_served_rows_and_keeps_the_fair_order(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for owner in range(50):  # members served long ago, with nothing waiting now
        store.mark_served(1000 + owner)
    for owner in (3, 1, 2, 1, 3, 3, 2):
        store.add_job(owner_id=owner, idea="x")
    store.mark_served(3)
    store.mark_served(1)

    async def run_job(job_id: int, cancel: threading.Event) -> None:
        return None

    queue = JobQueue(store, run_job, 3)
    everyone = fair_order(store.jobs_where("status = 'queued'", []), store.served())
    assert ids(queue.pending()) == ids(everyone)
    assert store.served({1, 2, 3}) == {k: v for k, v in store.served().items() if k in (1, 2, 3)}
    assert any("served_clock" in step for step in plans(store, lambda: store.mark_served(2)))


async def test_job_seconds_keep_a_bounded_window(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for _ in range(KEEP_SECONDS + 30):
        store.add_job(owner_id=1, idea="x")

    async def run_job(job_id: int, cancel: threading.Event) -> None:
        store.update_job(job_id, status="done")

    queue = JobQueue(store, run_job, max_pending_per_member=1000)
    queue.kick()
    await queue.idle()
    assert store.count_jobs("status = 'done'", []) == KEEP_SECONDS + 30
    assert len(queue.job_seconds) == KEEP_SECONDS


def test_disk_use_is_the_daily_walk_plus_new_job_folders_and_equals_a_recount(tmp_path: Path) -> None:
    from bot import admin
    from engine.coordinator.worker import job_dir
    from engine.settings import load_settings

    settings = load_settings(None, data_dir=tmp_path, keep_days=30)
    store = open_store(tmp_path)
    old = store.add_job(owner_id=1, idea="old")
    job_dir(settings, old).mkdir(parents=True)
    (job_dir(settings, old) / "frame_01.png").write_bytes(bytes(3000))
    (tmp_path / "inbetweens").mkdir()
    (tmp_path / "inbetweens" / "a.png").write_bytes(bytes(500))
    assert store.disk_figure() is None
    admin.disk_bytes(settings, store)  # no walk yet: walks now, and keeps the figure
    assert store.disk_figure() is not None
    assert admin.disk_bytes(settings, store) == retention.dir_size(tmp_path)  # the database sized live
    admin.sweep_and_measure(settings, store, NOW - 365 * DAY)  # the daily sweep (nothing due) walks again
    for k in range(3):  # jobs after the walk: their folders are counted without a walk
        new = store.add_job(owner_id=1, idea=f"new {k}")
        job_dir(settings, new).mkdir(parents=True)
        (job_dir(settings, new) / "animation.gif").write_bytes(bytes(1000 * (k + 1)))
    assert admin.disk_bytes(settings, store) == retention.dir_size(tmp_path)  # database growth included
    assert [b for _, _, b in store.job_bytes_since(0)] == [None] * 4  # queued: measured each time, not kept
    for job_id, _, _ in store.job_bytes_since(0):
        store.update_job(job_id, status="done")
    assert admin.disk_bytes(settings, store) == retention.dir_size(tmp_path)
    assert [b for _, _, b in store.job_bytes_since(0)][1:] == [1000, 2000, 3000]  # ended: kept in the row
    # Walked only once a day: a stale old folder is not re-walked by /stats, but the sweep's walk sees it.
    (job_dir(settings, old) / "clip.mp4").write_bytes(bytes(700))
    assert admin.disk_bytes(settings, store) == retention.dir_size(tmp_path) - 700
    admin.measure_disk(settings, store)
    assert admin.disk_bytes(settings, store) == retention.dir_size(tmp_path)


def fair_order_before(pending: list[dict[str, Any]], last_served: dict[int, int]) -> list[dict[str, Any]]:
    """engine.coordinator.jobs.fair_order as it was before issue 25 (a pass over the owners per pick), the reference."""
    by_owner: dict[int, list[dict[str, Any]]] = {}
    for job in sorted(pending, key=lambda j: j["id"]):
        by_owner.setdefault(job["owner_id"] or 0, []).append(job)
    served = dict(last_served)
    clock = max(served.values(), default=0)
    order: list[dict[str, Any]] = []
    while by_owner:
        owner = min(by_owner, key=lambda o: (served.get(o, -1), by_owner[o][0]["id"]))
        order.append(by_owner[owner].pop(0))
        clock += 1
        served[owner] = clock
        if not by_owner[owner]:
            del by_owner[owner]
    return order


def test_fair_order_by_heap_is_the_same_order_as_before() -> None:
    rng = random.Random(25)
    for _ in range(300):
        owners = rng.randint(1, 12)
        jobs = [{"id": i, "owner_id": rng.choice([None, *range(1, owners + 1)])} for i in rng.sample(range(1, 999), 40)]
        clocks = rng.sample(range(1, 100), owners)
        served = {o: clocks[o - 1] for o in range(1, owners + 1) if rng.random() < 0.6}
        if rng.random() < 0.3:
            served[0] = rng.randint(100, 200)
        assert ids(fair_order(jobs, served)) == ids(fair_order_before(jobs, served))
    assert fair_order([], {1: 5}) == []


# The bot itself, on SimCord (tests/test_bot.py's fixtures).
bot_settings = base.bot_settings
simcord_bot = base.simcord_bot
world = base.world


@pytest.mark.simcord(settle_timeout=120)
async def test_position_edits_read_no_row_per_waiting_job(world, monkeypatch: pytest.MonkeyPatch) -> None:
    """show_positions queues an edit per waiting member from the one pending() read: the rows it has,
    not one more read each (the edit reads its row when it goes out, to skip a job that moved on)."""
    env, channel, alice, bob, mod = world.env, world.channel, world.alice, world.bob, world.mod
    await mod.slash(channel, "pause")
    await alice.slash(channel, "animate", prompt="a crane waits", frames=1)
    await bob.slash(channel, "animate", prompt="an owl waits", frames=1)
    bot = base.bot_of(env)
    reads: list[int] = []
    original = bot.store.job
    monkeypatch.setattr(bot.store, "job", lambda job_id: (reads.append(job_id), original(job_id))[1])
    bot._shown.clear()  # as if every waiting member's text changed
    bot.show_positions()
    assert reads == [] and bot.outbox.pending() == 2
    await bot.outbox.idle()
    texts = [m.content for m in channel.history()]
    assert any("a crane waits" in t and "Queued: next up" in t for t in texts), texts
    assert any("an owl waits" in t and "Queued: position 2" in t for t in texts), texts
