"""History benchmark: what each coordinator operation costs as the jobs table grows.

    python -m bench.history --jobs 1000,100000,1000000

For each size a fresh data dir is made by `open_store` (the store's own schema and migrations), then
filled with one bulk `executemany` on the store's connection inside one transaction: `--jobs`
animation jobs from `--members` members spread over a year, as a server running with 30-day
retention leaves them (older jobs purged, the last 31 days not: one day is due for the sweep), a few
results unposted or refused, a few queued, and one style per 20 jobs (at most 50,000). Files
are the kept jobs' only: one 1 KiB frame in each job folder not purged (what /stats' disk use walks
and the sweep deletes). Then each operation of issue 25 is timed (median of `--repeat` runs, in ms):

- stats: /stats' figures (`bot.admin.stats_figures`: running, jobs today, median job time, disk use)
- sweep: one retention sweep with one day of jobs due (`engine.coordinator.retention.sweep`, run once)
- repost: the bot's 60 s repost check (`Store.results_due`)
- status_edits: start-up's owed status edits (`Store.status_edits_owed`)
- queue: /queue's store reads for one member (`Store.unposted_results` and `JobQueue.pending`)
- recover: start-up `JobQueue.recover()`
- autocomplete: /animate's style autocomplete (`Store.style_choices`, two typed letters)
- jobs_cmd: `emaki jobs`' query (`Store.recent_jobs`, 20 rows)
- daily_walk: the walk of the whole data dir that keeps /stats' disk figure (once a day, in a thread)

The sizes are printed side by side; the last line is one JSON object: {"ops": {op: {size: ms}},
"growth": {op: ms at the largest size / ms at the smallest}, "fill_s": {size: s}}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.coordinator.retention import DAY_S
from engine.coordinator.store import Store, open_store

KEEP_DAYS = 30
YEAR_S = 365 * DAY_S
FRAME = bytes(1024)
COLUMNS = (
    "kind, status, owner_id, owner_name, guild_id, channel_id, status_message_id, result_message_id, idea, params, "
    "posted, post_state, status_final, created_at, started_at, finished_at, purged_at, purged_days"
)


def fill(store: Store, data_dir: Path, jobs: int, members: int, at: float, seed: int = 0) -> None:
    """`jobs` rows through the store's connection in one transaction (ids ascend with created_at)."""
    rng = random.Random(seed)
    cutoff = at - KEEP_DAYS * DAY_S
    params = json.dumps({"frames": 8, "steps": 20, "strength": 0.55, "guidance": 7.5, "width": 512, "height": 512})
    step = YEAR_S / max(jobs, 1)
    rows: list[tuple[Any, ...]] = []
    for i in range(jobs):
        created = at - YEAR_S + i * step
        started = created + rng.uniform(1, 30)
        finished = started + rng.uniform(20, 90)
        status = "done" if rng.random() > 0.05 else rng.choice(["failed", "cancelled"])
        # Purged by earlier sweeps when they ended more than a day before today's cutoff.
        purged = finished + KEEP_DAYS * DAY_S if finished < cutoff - DAY_S else None
        post_state, posted, final = "posted", 1, 1
        if status == "done" and rng.random() < 0.0005:  # a few results Discord refused: an admin may /repost
            post_state, posted, final = "refused", -1, 0
        rows.append(
            (
                "animate",
                status,
                1000 + rng.randrange(members),
                "member",
                1,
                10,
                i + 1,
                i + 1 if posted == 1 else None,
                f"an idea number {i} about a fox crossing a snowy field",
                params,
                posted,
                post_state,
                final,
                created,
                started,
                finished,
                purged,
                KEEP_DAYS if purged else None,
            )
        )
    for owner in range(3):  # a few jobs waiting
        rows.append(
            (
                *("animate", "queued", 1000 + owner, "member", 1, 10, None, None, "waiting", params),
                *(0, "pending", 0, at - 60, None, None, None, None),
            )
        )
    marks = ", ".join("?" * len(rows[0]))
    db = store.db
    db.conn.execute("BEGIN")
    db.conn.executemany(f"insert into jobs ({COLUMNS}) values ({marks})", rows)
    styles = min(max(jobs // 20, 5), 50_000)
    db.conn.executemany(
        "insert into styles (name, path, trigger, adapter, weight, created_at, uid, guild_id, shared) "
        "values (?, ?, ?, 'lora', 1.0, ?, ?, ?, ?)",
        [
            (f"{_name(rng)}{k}", f"/styles/{k}.safetensors", "", at, f"{k:016x}", None if k % 3 else 1, k % 2)
            for k in range(styles)
        ],
    )
    db.conn.execute("COMMIT")
    # The files a 30-day data dir keeps: one small frame per job not purged (purged ones have none).
    kept = db.execute("select id from jobs where purged_at is null and status != 'queued'").fetchall()
    for (job_id,) in kept:
        folder = data_dir / "jobs" / str(job_id)
        folder.mkdir(parents=True)
        (folder / "0.png").write_bytes(FRAME)


def _name(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall ms of `repeat` calls."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def measure(jobs: int, members: int, repeat: int, root: Path) -> tuple[dict[str, float], float]:
    from bot.admin import stats_figures
    from engine.coordinator import retention
    from engine.coordinator.jobs import JobQueue
    from engine.coordinator.worker import job_dir  # noqa: F401 (the sweep's first import of the engine is not timed)
    from engine.settings import load_settings

    at = time.time()
    data_dir = root / f"history-{jobs}"
    store = open_store(data_dir)
    start = time.perf_counter()
    fill(store, data_dir, jobs, members, at)
    fill_s = time.perf_counter() - start
    store.db.conn.execute("ANALYZE")
    settings = load_settings(None, data_dir=data_dir, keep_days=KEEP_DAYS)
    # The bot's daily walk of the data dir (in the sweep's thread): as if it began a day ago, so
    # /stats adds the folders of a day of jobs to its figure.
    start = time.perf_counter()
    size = retention.dir_size(data_dir)
    walk_ms = (time.perf_counter() - start) * 1000
    store.set_disk_figure(size, at - DAY_S)

    async def run_job(job_id: int, cancel: Any) -> None:
        return None

    def queue_reads() -> None:
        store.unposted_results(1000)
        JobQueue(store, run_job, 3).pending()

    ops: dict[str, float] = {
        "stats": timed(lambda: stats_figures(store, settings, 1, at), repeat),
        "repost": timed(lambda: store.results_due(at), repeat),
        "status_edits": timed(store.status_edits_owed, repeat),
        "queue": timed(queue_reads, repeat),
        "recover": timed(lambda: JobQueue(store, run_job, 3).recover(), repeat),
        "autocomplete": timed(lambda: store.style_choices(1, True, "st"), repeat),
        "jobs_cmd": timed(lambda: store.recent_jobs(20), repeat),
    }
    ops["sweep"] = timed(lambda: retention.sweep(settings, store, at), 1)  # one day due: changes the rows
    ops["daily_walk"] = walk_ms  # in the sweep's thread once a day, never on the event loop
    return ops, fill_s


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="1000,100000", help="comma-separated history sizes")
    parser.add_argument("--members", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5, help="runs per operation (the median is kept)")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.jobs.split(",")]
    result: dict[str, Any] = {"ops": {}, "growth": {}, "fill_s": {}}
    with tempfile.TemporaryDirectory(prefix="emaki-history-") as tmp:
        for size in sizes:
            ops, fill_s = measure(size, args.members, args.repeat, Path(tmp))
            result["fill_s"][str(size)] = round(fill_s, 2)
            for op, ms in ops.items():
                result["ops"].setdefault(op, {})[str(size)] = round(ms, 3)
    print(f"{'operation':<14}" + "".join(f"{n:>14,} jobs" for n in sizes))
    for op, by_size in result["ops"].items():
        print(f"{op:<14}" + "".join(f"{by_size[str(n)]:>16.2f} ms" for n in sizes))
        low, high = by_size[str(sizes[0])], by_size[str(sizes[-1])]
        result["growth"][op] = round(high / low, 2) if low > 0 else None
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
