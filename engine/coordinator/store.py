"""SQLite via sqlite-utils: the truth for jobs, frames, styles and datasets.

Rows are written before work starts or anything is acknowledged; artifacts are files under the data
dir referenced from rows. One connection is shared by the event loop and the worker thread, so every
call takes a lock (SQLite itself serialises writers; the lock keeps sqlite3's cursor state sane).
"""

from __future__ import annotations

import fcntl
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import sqlite_utils

from engine.errors import ResourceError

log = logging.getLogger(__name__)


def now() -> float:
    return time.time()


def style_key(name: str) -> str:
    """A style name as it is registered (emaki train, emaki styles add, /train): trimmed, lower case."""
    return name.strip().lower()


# Results the repost check (every 60 s, on the bot's event loop) takes at once; a channel posts a few a second.
REPOST_BATCH = 50
# Job fields that record whether a result reached Discord: written with a synced commit (Store._durable).
POST_FIELDS = frozenset({"posted", "post_state", "result_message_id"})


class StoreError(ResourceError):
    """The database cannot be read or written: a read-only data dir, a full disk, a file another
    process holds too long. One line for the person, never a traceback."""


# sqlite's own codes (extended ones start with these) for what the machine refuses, not what the code asks.
MACHINE_ERRORS = ("SQLITE_READONLY", "SQLITE_FULL", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_PERM")
INDEX_NOTICE_JOBS = 100_000  # a history this long takes seconds to index: the log says so first
PURGE_BATCH = 500  # jobs per retention batch: the store is free between batches
BUSY_TIMEOUT_MS = 30_000  # a process migrating a fresh data dir holds it for milliseconds; wait, never fail
QUEUE_LOG_KEPT = 4096  # queue changes remembered for readers behind; one further behind reads the rows again


class QueueChange(NamedTuple):
    """One write that may change the waiting jobs or their order, as this process's store made it:
    a job row added or updated (`status`: its status was among the fields), or an owner served."""

    kind: str  # "job" | "served"
    key: int  # the job's id, or the owner's
    status: bool = False
    clock: int = 0  # "served": the owner's new clock


def machine_error(path: Path, exc: sqlite3.Error) -> StoreError | None:
    """The one line for an error the machine caused (read-only, disk full, locked); None for the rest
    (a bug in a query must stay a traceback in the log)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if not name.startswith(MACHINE_ERRORS):
        return None
    if name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_CANTOPEN")):
        why = "the data dir is read-only or not this user's: make it writable"
    elif name.startswith("SQLITE_FULL"):
        why = "the disk is full: free some space"
    elif name.startswith("SQLITE_BUSY"):
        why = f"another process held it for more than {BUSY_TIMEOUT_MS // 1000} s: let it finish"
    else:
        why = "the disk refused a read or write: check it"
    return StoreError(f"cannot use the database {path} ({exc}): {why}")


@contextmanager
def opening_lock(path: Path) -> Iterator[None]:
    """An advisory lock beside the database, held while a process prepares it (milliseconds). Where it
    cannot be made (a read-only data dir) the open goes on without it and sqlite says what is wrong."""
    try:
        handle = open(path.with_name(f"{path.name}.open-lock"), "a")  # noqa: SIM115 - held across the yield
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        # The writes that can change the queue, numbered, so a JobQueue keeps its order current from the
        # few rows that changed (see queue_changes) instead of reading every waiting row each time.
        self._queue_log: list[QueueChange] = []
        self._queue_log_start = 0  # the number of the first change still in _queue_log
        self._data_version = -1  # sqlite's count of other connections' commits, when last looked at
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"the data dir {path.parent} cannot be created: {exc.strerror or exc}") from None
        try:
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            # The busy timeout first: every statement after it, the journal switch included, waits for a
            # process that opens the same fresh data dir at the same moment instead of failing "locked".
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self.db = sqlite_utils.Database(conn)
            # Processes opening a fresh data dir at once would each switch it to WAL while the others hold
            # a shared lock: sqlite then answers "locked" at once, without waiting (its deadlock rule), so
            # the switch and the migrations run one process at a time under a file lock.
            with opening_lock(path), self._locked():
                conn.execute("PRAGMA journal_mode=WAL")
                self._migrate()
            # In WAL mode, NORMAL syncs the log at checkpoints, not at every commit: a killed or crashed
            # process loses nothing, and the database stays consistent; only an OS crash or power loss may
            # undo the last commits (as the frame files, never synced, may be lost then too; a job resumes
            # at its first missing frame). Per commit, FULL's fsync was most of a job's cost outside the
            # render: ~9 commits for a 4-frame job, 5-7 ms each on this project's machines (bench.scale).
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise machine_error(path, exc) or exc from None

    @contextmanager
    def _locked(self) -> Iterator[sqlite_utils.Database]:
        """The connection, for one call at a time; sqlite's machine errors (read-only, disk full)
        become StoreError, which every front door shows as one line."""
        with self._lock:
            try:
                yield self.db
            except sqlite3.Error as exc:
                error = machine_error(self.path, exc)
                if error is None:
                    raise
                raise error from None

    @contextmanager
    def _durable(self) -> Iterator[sqlite_utils.Database]:
        """`_locked`, with this one commit synced to disk before it returns (synchronous=FULL): what a member is
        told was accepted (a job, a dataset) or was posted must survive a power loss too, not only a kill. Every
        other commit rides on NORMAL (see __init__): progress rows are cheap to redo, these are promises."""
        with self._locked() as db:
            db.execute("PRAGMA synchronous=FULL")
            try:
                yield db
            finally:
                db.execute("PRAGMA synchronous=NORMAL")

    # --- schema: versioned migrations ----------------------------------------------------------
    def _migrate(self) -> None:
        """Bring the schema to the newest version, one step per version, each applied once. Steps run
        inside one BEGIN IMMEDIATE transaction: the first process to open a fresh (or older) data dir
        takes the write lock and migrates, the others wait on the busy timeout and then find
        `user_version` already current, so two processes never probe and add the same column."""
        latest = len(MIGRATIONS)
        with self._locked() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] >= latest:
                return  # the common case: no write lock taken
            db.conn.execute("BEGIN IMMEDIATE")
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
                    step(self, db)
                    db.conn.execute(f"PRAGMA user_version = {number}")
                db.conn.execute("COMMIT")
            except BaseException:
                if db.conn.in_transaction:
                    db.conn.execute("ROLLBACK")
                raise

    def _migration_1(self, db: sqlite_utils.Database) -> None:
        """Version 1: the schema as it was before versions were kept. A data dir from then has
        user_version 0 and some of these columns: the probes below add what it lacks (safe here:
        only the one process holding the write lock runs them)."""
        db["jobs"].create(
            {
                "id": int,
                "kind": str,  # animate | train
                "status": str,  # queued | running | done | failed | cancelled
                "owner_id": int,
                "owner_name": str,
                "guild_id": int,
                "channel_id": int,
                "status_message_id": int,  # the message edited with progress
                "result_message_id": int,
                "idea": str,
                "params": str,  # JSON: everything needed to reproduce
                "parent_job_id": int,
                "regen_from": int,  # 0-based frame index a regeneration starts at
                "error": str,
                "gif_path": str,
                "posted": int,
                "created_at": float,
                "started_at": float,
                "finished_at": float,
            },
            pk="id",
            if_not_exists=True,
            defaults={"posted": 0},
        )
        db["jobs"].create_index(["status"], if_not_exists=True)
        db["jobs"].create_index(["result_message_id"], if_not_exists=True)
        db["frames"].create(
            {
                "job_id": int,
                "idx": int,
                "prompt": str,
                "seed": int,
                "strength": float,
                "steps": int,
                "guidance": float,
                "style": str,
                "path": str,
            },
            pk=("job_id", "idx"),
            if_not_exists=True,
        )
        db["styles"].create(
            {
                "name": str,
                "trigger": str,
                "adapter": str,
                "path": str,
                "weight": float,
                "steps": int,
                "dataset_id": int,
                "metrics": str,
                "created_at": float,
            },
            pk="name",
            if_not_exists=True,
        )
        db["datasets"].create(
            {
                "id": int,
                "style_name": str,
                "trigger": str,
                "owner_id": int,
                "guild_id": int,
                "channel_id": int,
                "preview_message_id": int,
                "path": str,
                "n_images": int,
                "status": str,  # pending | approved | rejected | trained | failed
                "params": str,
                "created_at": float,
            },
            pk="id",
            if_not_exists=True,
        )
        self._migrate_bot_state(db)
        self._migrate_retention(db)
        self._migrate_workers(db)

    def _migration_2(self, db: sqlite_utils.Database) -> None:
        """Version 2 (issue 24): each style row gets an identity of its own, kept by the jobs that use
        it, so a job queued with one server's `ink` never renders with weights registered later under
        the same name (another server's, or a replacement)."""
        if "uid" not in db["styles"].columns_dict:
            db["styles"].add_column("uid", str)
        db.execute("update styles set uid = lower(hex(randomblob(8))) where uid is null")

    def _migration_3(self, db: sqlite_utils.Database) -> None:
        """Version 3 (issue 25): indexes for every question the bot asks often, so each costs what it
        did on the first day however long the history grows. Partial ones hold only the few rows
        still waited for (unpurged, unposted, status edit owed), so they stay small too. Built once:
        on a large history this takes a while, said in the log before it starts."""
        jobs = db.execute("select count(*) from jobs").fetchone()[0]
        if jobs > INDEX_NOTICE_JOBS:
            log.warning("indexing %d jobs for the new store version, once: this takes a moment", jobs)
        for statement in INDEXES_3:
            db.execute(statement)
        if "disk_bytes" not in db["jobs"].columns_dict:  # a finished job's folder size, once /stats measured it
            db["jobs"].add_column("disk_bytes", int)

    def _migration_4(self, db: sqlite_utils.Database) -> None:
        """Version 4 (issue 21): the model family a style was made for ("sd15", "sdxl"), so /animate offers
        only the running family's styles. Every style registered before was SD1.5 (nothing else was
        accepted); a row without one (a trainer that does not say) counts as SD1.5 too."""
        if "family" not in db["styles"].columns_dict:
            db["styles"].add_column("family", str)
        db.execute("update styles set family = 'sd15' where family is null")

    def _migrate_bot_state(self, db: sqlite_utils.Database) -> None:
        """Additive: posting state per job, and the queue's own state (pause, fairness history), so a
        restart finds everything as it was. Databases from before these columns are upgraded."""
        jobs = db["jobs"]
        columns = jobs.columns_dict
        added = {
            # pending | sending (a send may have reached Discord) | posted | refused (Discord said
            # no: retried when the channel accepts again) | failed (cannot be posted at all)
            "post_state": str,
            "post_error": str,
            "post_attempts": int,
            "next_post_at": float,
            "post_generation": int,  # part of the result's nonce; bumped only by an admin repost
            "status_sends": int,  # part of the status message's nonce
            "status_final": int,  # 1 once the status message shows the posted result's link
            "resume_first": int,  # interrupted by a crash: runs before everything else
        }
        for name, kind in added.items():
            if name not in columns:
                jobs.add_column(name, kind)
        if "status_final" not in columns:  # results posted before this column: their edit was sent then
            db.execute("update jobs set status_final = 1 where posted = 1")
        if "post_state" not in columns:  # old rows: derive the state from the old flag
            db.execute("update jobs set post_state = 'posted' where posted = 1")
            db.execute("update jobs set post_state = 'refused' where posted = -1")
        db["queue_state"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        db["served"].create({"owner_id": int, "clock": int}, pk="owner_id", if_not_exists=True)
        self._migrate_guilds(db)

    def _migrate_guilds(self, db: sqlite_utils.Database) -> None:
        """Additive (issue 13): per-server settings as rows, the server a style belongs to, and each
        job's screening decision, taken when the job is created."""
        db["guild_settings"].create(
            {"guild_id": int, "key": str, "value": str}, pk=("guild_id", "key"), if_not_exists=True
        )
        styles = db["styles"].columns_dict
        if "guild_id" not in styles:  # NULL: added by the operator, global
            db["styles"].add_column("guild_id", int)
        if "shared" not in styles:  # 1: usable in other servers too
            db["styles"].add_column("shared", int)
        if "screen" not in db["jobs"].columns_dict:  # 1: every frame passes the safety checker
            db["jobs"].add_column("screen", int)

    def _migrate_retention(self, db: sqlite_utils.Database) -> None:
        """Additive: when the retention sweep deleted a job's files (its rows stay, so the record of
        what was made and by whom outlives the pixels), and after how many days, for the message a
        member gets when they try to regenerate from it."""
        columns = db["jobs"].columns_dict
        for name, kind in {"purged_at": float, "purged_days": int}.items():
            if name not in columns:
                db["jobs"].add_column(name, kind)
        db["jobs"].create_index(["finished_at"], if_not_exists=True)

    # --- retention ------------------------------------------------------------------------------
    def purge_candidates(
        self, finished_before: float, after: tuple[float, int] | None = None, limit: int = PURGE_BATCH
    ) -> list[dict[str, Any]]:
        """Animation jobs that ended before the cutoff and still have their files, whose files no
        one waits for: never queued or running ones, never a result still to be posted (pending,
        sending, refused or failed to post: an admin may still /repost it). Jobs made by the CLI
        (no channel) have nothing to post.

        One batch of at most `limit`, by (finished_at, id), starting past `after` (the last batch's
        last job): walked on the index of unpurged jobs, so a batch costs the same at any history
        size, and the store is free between batches."""
        start = after or (-1e300, 0)  # before any clock (a finite number: an infinity cannot be written as SQL)
        with self._locked() as db:
            rows = db.execute(
                "select * from jobs indexed by jobs_unpurged where purged_at is null and finished_at < ? "
                "and (finished_at, id) > (?, ?) and kind = 'animate' "
                "and (status in ('failed', 'cancelled') or (status = 'done' and "
                "(channel_id is null or coalesce(post_state, '') = 'posted' or posted = 1))) "
                "order by finished_at, id limit ?",
                [finished_before, *start, limit],
            )
            columns = [c[0] for c in rows.description]
            return [_decode_job(dict(zip(columns, r, strict=True))) for r in rows.fetchall()]

    def mark_purged(self, job_id: int, at: float, days: int) -> None:
        self.update_job(job_id, purged_at=at, purged_days=days)

    # --- figures for /stats ---------------------------------------------------------------------
    def count_jobs(self, where: str, args: list[Any]) -> int:
        with self._locked() as db:
            return int(db.execute(f"select count(*) from jobs where {where}", args).fetchone()[0])

    def count_running(self) -> int:
        return self.count_jobs("status = 'running'", [])

    def jobs_since(self, since: float, guild_id: int | None = None) -> int:
        """Jobs created at or after `since` (in one server, if given): /stats' "jobs today"."""
        if guild_id is None:
            return self.count_jobs("created_at >= ?", [since])
        return self.count_jobs("created_at >= ? and guild_id = ?", [since, guild_id])

    def disk_figure(self) -> tuple[int, float] | None:
        """The bytes of the data dir at its last full walk, and when that walk began; None before any."""
        value = self.queue_flag("disk_bytes")
        if value is None:
            return None
        figure = json.loads(value)
        return int(figure["bytes"]), float(figure["at"])

    def set_disk_figure(self, size: int, at: float) -> None:
        self.set_queue_flag("disk_bytes", json.dumps({"bytes": size, "at": at}))

    def job_bytes_since(self, since: float) -> list[tuple[int, str, int | None]]:
        """(id, status, bytes kept for its folder or None) of the jobs created at or after `since`: a
        range of the created_at index, a day of jobs at most."""
        with self._locked() as db:
            rows = db.execute(
                "select id, status, disk_bytes from jobs indexed by jobs_created where created_at >= ?", [since]
            )
            return [(int(r[0]), str(r[1]), r[2]) for r in rows]

    def keep_job_bytes(self, sizes: dict[int, int]) -> None:
        """Remember finished jobs' folder sizes (one transaction), so /stats measures each folder once."""
        if not sizes:
            return
        with self._locked() as db:
            db.conn.execute("BEGIN")  # the connection autocommits: one commit for all, not one per row
            try:
                db.conn.executemany("update jobs set disk_bytes = ? where id = ?", [(b, i) for i, b in sizes.items()])
                db.conn.execute("COMMIT")
            except BaseException:
                db.conn.execute("ROLLBACK")
                raise

    def recent_job_seconds(self, limit: int) -> list[float]:
        """Render-to-GIF seconds of the newest `limit` finished animations."""
        with self._locked() as db:
            rows = db.execute(
                "select finished_at - started_at from jobs where kind = 'animate' and status = 'done' "
                "and started_at is not null and finished_at is not null order by finished_at desc limit ?",
                [limit],
            ).fetchall()
        return [float(r[0]) for r in rows]

    def _migrate_workers(self, db: sqlite_utils.Database) -> None:
        """Additive: the renderers of cluster mode, for the operator (`emaki jobs`, /stats). Written by
        the coordinator as workers start, take a job, finish it or die; empty in in-process mode."""
        db["workers"].create(
            {
                "name": str,  # renderer-N
                "node": str,  # the machine's address, as Ray reports it
                "gpu": str,  # the GPU id(s) Ray gave the actor
                "state": str,  # starting | idle | busy (animating) | training | lost (restarting)
                "job_id": int,  # the job it renders now, if busy (or lost it)
                "updated_at": float,
            },
            pk="name",
            if_not_exists=True,
        )
        if "worker_losses" not in db["jobs"].columns_dict:  # renderers a job lost: bounded, then it fails
            db["jobs"].add_column("worker_losses", int)

    # --- workers (cluster mode) -------------------------------------------------------------
    def put_worker(self, name: str, **fields: Any) -> None:
        with self._locked() as db:
            db["workers"].upsert({"name": name, **fields}, pk="name")

    def workers(self) -> list[dict[str, Any]]:
        with self._locked() as db:
            return list(db["workers"].rows_where(order_by="name"))

    def clear_workers(self) -> None:
        with self._locked() as db:
            db.execute("delete from workers")

    # --- queue state (pause, fairness history): rows, not memory -----------------------------
    def queue_flag(self, key: str) -> str | None:
        with self._locked() as db:
            rows = list(db["queue_state"].rows_where("key = ?", [key]))
        return rows[0]["value"] if rows else None

    def queue_flags(self, prefix: str) -> dict[str, str]:
        """Every flag whose key starts with `prefix` (the servers' pauses: one read, not one per server)."""
        with self._locked() as db:
            rows = db.execute(
                "select key, value from queue_state where key >= ? and key < ?", [prefix, prefix + "\U0010ffff"]
            ).fetchall()
        return {str(key): str(value) for key, value in rows}

    def set_queue_flag(self, key: str, value: str) -> None:
        with self._locked() as db:
            db["queue_state"].upsert({"key": key, "value": value}, pk="key")

    def served(self, owners: Collection[int] | None = None) -> dict[int, int]:
        """owner -> a counter of when they were last served (higher = more recent); only `owners`'
        rows if given (the members with jobs waiting, not every member the bot ever served)."""
        with self._locked() as db:
            if owners is None:
                return {r["owner_id"]: r["clock"] for r in db["served"].rows}
            rows = db.execute(
                "select owner_id, clock from served where owner_id in (select value from json_each(?))",
                [json.dumps(sorted(owners))],
            ).fetchall()
            return {int(owner): int(clock) for owner, clock in rows}

    def mark_served(self, owner_id: int) -> int:
        with self._locked() as db:
            clock = int((db.execute("select max(clock) from served").fetchone()[0] or 0) + 1)
            db["served"].upsert({"owner_id": owner_id, "clock": clock}, pk="owner_id")
            self._queue_changed(QueueChange("served", owner_id, clock=clock))
            return clock

    def _queue_changed(self, change: QueueChange) -> None:
        """Called with the lock held, after the write."""
        self._queue_log.append(change)
        if len(self._queue_log) > 2 * QUEUE_LOG_KEPT:  # bounded: a reader that far behind starts over
            del self._queue_log[:QUEUE_LOG_KEPT]
            self._queue_log_start += QUEUE_LOG_KEPT

    def queue_changes(self, since: int) -> tuple[int, list[QueueChange] | None]:
        """The number of the next change, and the changes made through this store since change `since`
        (None: too far behind, or another connection wrote to the database meanwhile: read the rows).
        Writes by other processes (or other Store objects on the same file) are seen by sqlite's
        data_version, which is folded into the numbering: any such commit starts the count over."""
        with self._locked() as db:
            version = int(db.execute("PRAGMA data_version").fetchone()[0])
            if version != self._data_version:
                self._data_version = version
                self._queue_log_start += len(self._queue_log) + 1  # every earlier number is now behind
                self._queue_log.clear()
            end = self._queue_log_start + len(self._queue_log)
            if since < self._queue_log_start:
                return end, None
            return end, self._queue_log[since - self._queue_log_start :]

    # --- jobs -----------------------------------------------------------------------------
    def add_job(self, **fields: Any) -> int:
        fields.setdefault("kind", "animate")
        fields.setdefault("status", "queued")
        fields["created_at"] = now()
        if isinstance(fields.get("params"), dict):
            fields["params"] = json.dumps(fields["params"])
        with self._durable() as db:  # acknowledged to the member right after: synced first
            job_id = int(db["jobs"].insert(fields).last_pk)
            self._queue_changed(QueueChange("job", job_id, status=True))
            return job_id

    def job(self, job_id: int) -> dict[str, Any] | None:
        with self._locked() as db:
            rows = list(db["jobs"].rows_where("id = ?", [job_id]))
        return _decode_job(rows[0]) if rows else None

    def update_job(self, job_id: int, **fields: Any) -> None:
        if isinstance(fields.get("params"), dict):
            fields["params"] = json.dumps(fields["params"])
        # Whether a result went out is a promise both ways (posted exactly once): synced, as a new job is.
        with self._durable() if POST_FIELDS & fields.keys() else self._locked() as db:
            db["jobs"].update(job_id, fields)
            self._queue_changed(QueueChange("job", job_id, status="status" in fields))

    def jobs_where(self, where: str, args: list[Any], order_by: str = "id") -> list[dict[str, Any]]:
        with self._locked() as db:
            return [_decode_job(r) for r in db["jobs"].rows_where(where, args, order_by=order_by)]

    def jobs_by_id(self, ids: Collection[int]) -> list[dict[str, Any]]:
        """The rows of these jobs (those that exist), by id: one read for a handful of changed jobs."""
        if not ids:
            return []
        return self._jobs_sql(
            "select * from jobs where id in (select value from json_each(?)) order by id", [json.dumps(sorted(ids))]
        )

    def has_queued(self, kind: str) -> bool:
        """Whether a job of this kind waits (a training's checkpoints ask, from its thread)."""
        with self._locked() as db:
            row = db.execute("select 1 from jobs where status = 'queued' and kind = ? limit 1", [kind]).fetchone()
            return row is not None

    def recent_jobs(self, limit: int, kind: str = "animate") -> list[dict[str, Any]]:
        """The newest `limit` jobs of a kind, newest first (for `emaki jobs`)."""
        with self._locked() as db:
            rows = db["jobs"].rows_where("kind = ?", [kind], order_by="id desc", limit=limit)
            return [_decode_job(r) for r in rows]

    def _jobs_sql(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        """Decoded job rows of a `select * from jobs ...` written here, in the store."""
        with self._locked() as db:
            cursor = db.execute(sql, args)
            columns = [c[0] for c in cursor.description]
            return [_decode_job(dict(zip(columns, r, strict=True))) for r in cursor.fetchall()]

    def results_due(self, at: float, limit: int = REPOST_BATCH) -> list[dict[str, Any]]:
        """Finished animations whose result is not posted yet and may be tried at `at`: never tried,
        interrupted mid-post, or refused and due again (the bot's repost check), the oldest `limit` of them.
        Read from the small index of unposted results, not the history; the batch bounds the check's time on
        the event loop however many results Discord refused (the rest are the next check's)."""
        return self._jobs_sql(
            "select * from jobs indexed by jobs_unposted "
            "where kind = 'animate' and status = 'done' and coalesce(posted, 0) != 1 and channel_id is not null "
            "and coalesce(post_state, 'pending') in ('pending', 'sending', 'refused') "
            "and coalesce(next_post_at, 0) <= ? order by id limit ?",
            [at, limit],
        )

    def unposted_results(self, owner_id: int) -> list[dict[str, Any]]:
        """A member's finished animations whose result is not posted (yet, or at all): /queue."""
        return self._jobs_sql(
            "select * from jobs indexed by jobs_unposted "
            "where kind = 'animate' and status = 'done' and coalesce(posted, 0) != 1 and owner_id = ? "
            "and coalesce(post_state, 'pending') != 'posted' order by id",
            [owner_id],
        )

    def status_edits_owed(self) -> list[dict[str, Any]]:
        """Posted results whose status message never got its final edit."""
        return self._jobs_sql(
            "select * from jobs indexed by jobs_status_owed where posted = 1 and coalesce(status_final, 0) != 1 "
            "and kind = 'animate' and result_message_id is not null and channel_id is not null order by id",
            [],
        )

    def recent_durations(self, limit: int) -> list[float]:
        """Started-to-finished seconds of the newest `limit` done jobs (any kind), newest first: the
        queue's ETA at start-up. Only those rows are read (the status index, newest id first)."""
        with self._locked() as db:
            rows = db.execute(
                "select finished_at - started_at from jobs where status = 'done' and started_at is not null "
                "order by id desc limit ?",
                [limit],
            ).fetchall()
        return [float(r[0]) for r in rows]

    def job_by_result_message(self, message_id: int) -> dict[str, Any] | None:
        rows = self.jobs_where("result_message_id = ?", [message_id])
        return rows[0] if rows else None

    # --- frames ---------------------------------------------------------------------------
    def put_frame(self, job_id: int, idx: int, **fields: Any) -> None:
        with self._locked() as db:
            db["frames"].upsert({"job_id": job_id, "idx": idx, **fields}, pk=("job_id", "idx"))

    def frames(self, job_id: int) -> list[dict[str, Any]]:
        with self._locked() as db:
            return list(db["frames"].rows_where("job_id = ?", [job_id], order_by="idx"))

    # --- styles ---------------------------------------------------------------------------
    def add_style(self, name: str, path: str, trigger: str = "", adapter: str = "lora", **fields: Any) -> None:
        if isinstance(fields.get("metrics"), dict):
            fields["metrics"] = json.dumps(fields["metrics"])
        # A new uid for every registration: jobs hold the style by it (see _migration_2).
        row = {"name": name, "path": path, "trigger": trigger, "adapter": adapter, "created_at": now()}
        row.update(uid=secrets.token_hex(8), weight=1.0)
        row.update(fields)
        with self._locked() as db:
            db["styles"].upsert(row, pk="name")

    def replace_style(self, name: str, path: str, trigger: str = "", adapter: str = "lora", **fields: Any) -> None:
        """A new file under an existing name. INSERT OR REPLACE swaps the whole row in one statement, so the
        old style's metrics, steps and dataset do not stay attached to the new weights."""
        if isinstance(fields.get("metrics"), dict):
            fields["metrics"] = json.dumps(fields["metrics"])
        row = {"name": name, "path": path, "trigger": trigger, "adapter": adapter, "created_at": now(), "weight": 1.0}
        row["uid"] = secrets.token_hex(8)
        row.update(fields)
        with self._locked() as db:
            db["styles"].insert(row, pk="name", replace=True)

    def update_style(self, name: str, **fields: Any) -> None:
        if isinstance(fields.get("metrics"), dict):
            fields["metrics"] = json.dumps(fields["metrics"])
        with self._locked() as db:
            row = self.style(name)
            if row is not None:
                db["styles"].update(row["name"], fields)

    def style(self, name: str) -> dict[str, Any] | None:
        """The style a person means by `name`. Names are folded when registered (`Snowfox` is kept as
        `snowfox`), so they are folded here too, the one lookup every command goes through; a row kept
        under its exact spelling (registered before names were folded) is still found by it."""
        key = style_key(name)
        with self._locked() as db:
            rows = list(db["styles"].rows_where("name = ? or name = ?", [key, name.strip()]))
        rows.sort(key=lambda r: r["name"] != key)
        return rows[0] if rows else None

    def styles(self) -> list[dict[str, Any]]:
        with self._locked() as db:
            return list(db["styles"].rows_where(order_by="name"))

    def style_choices(
        self, guild_id: int | None, shared_from_others: bool, typed: str, limit: int = 25, family: str = ""
    ) -> list[str]:
        """Names of the styles visible in a server (see `styles_visible_in`) that start with what was
        typed, in name order, at most `limit`: /animate's style autocomplete, one keystroke each. A
        range on the name's own index (names are kept folded, see `style_key`), stopping at `limit`.
        With `family` (the running base's, "sd15"/"sdxl"), only styles made for it (a row without one is SD1.5)."""
        prefix = style_key(typed)
        where = "guild_id is null"
        args: list[Any] = [prefix, prefix + "\U0010ffff"]
        if guild_id is not None:
            where += " or guild_id = ?" + (" or coalesce(shared, 0) = 1" if shared_from_others else "")
            args.append(guild_id)
        if family:
            where = f"({where}) and coalesce(family, 'sd15') = ?"
            args.append(family)
        with self._locked() as db:
            rows = db.execute(
                f"select name from styles where name >= ? and name < ? and ({where}) order by name limit ?",
                [*args, limit],
            ).fetchall()
        return [r[0] for r in rows]

    def delete_style(self, name: str) -> None:
        with self._locked() as db:
            row = self.style(name)
            if row is not None:
                db.execute("delete from styles where name = ?", [row["name"]])

    def styles_visible_in(self, guild_id: int | None, shared_from_others: bool = True) -> list[dict[str, Any]]:
        """The styles a server may list and use: global ones, its own, and (`shared_from_others`)
        those other servers share. Outside any server (a DM): the global ones."""
        where = "guild_id is null"
        args: list[Any] = []
        if guild_id is not None:
            where += " or guild_id = ?" + (" or coalesce(shared, 0) = 1" if shared_from_others else "")
            args.append(guild_id)
        with self._locked() as db:
            return list(db["styles"].rows_where(where, args, order_by="name"))

    # --- per-server settings ----------------------------------------------------------------
    def guild_settings(self, guild_id: int) -> dict[str, Any]:
        """A server's own values (JSON-decoded), by key; keys it never set are absent."""
        with self._locked() as db:
            rows = db["guild_settings"].rows_where("guild_id = ?", [guild_id])
            return {r["key"]: json.loads(r["value"]) for r in rows}

    def set_guild_setting(self, guild_id: int, key: str, value: Any) -> None:
        """Store one value; None removes it (the server follows the operator's default again)."""
        with self._locked() as db:
            if value is None:
                db.execute("delete from guild_settings where guild_id = ? and key = ?", [guild_id, key])
            else:
                db["guild_settings"].upsert(
                    {"guild_id": guild_id, "key": key, "value": json.dumps(value)}, pk=("guild_id", "key")
                )

    # --- datasets -------------------------------------------------------------------------
    def add_dataset(self, **fields: Any) -> int:
        fields.setdefault("status", "pending")
        fields["created_at"] = now()
        if isinstance(fields.get("params"), dict):
            fields["params"] = json.dumps(fields["params"])
        with self._durable() as db:  # a submitted dataset is acknowledged right after: synced first
            return int(db["datasets"].insert(fields).last_pk)

    def dataset(self, dataset_id: int) -> dict[str, Any] | None:
        with self._locked() as db:
            rows = list(db["datasets"].rows_where("id = ?", [dataset_id]))
        return rows[0] if rows else None

    def update_dataset(self, dataset_id: int, **fields: Any) -> None:
        with self._locked() as db:
            db["datasets"].update(dataset_id, fields)

    def delete_dataset(self, dataset_id: int) -> None:
        with self._locked() as db:
            db.execute("delete from datasets where id = ?", [dataset_id])

    def datasets_where(self, where: str, args: list[Any]) -> list[dict[str, Any]]:
        with self._locked() as db:
            return list(db["datasets"].rows_where(where, args, order_by="id"))


# Version 3's indexes. The partial ones' WHERE terms are repeated word for word in the queries that
# name them (INDEXED BY): SQLite uses a partial index only for a query whose WHERE contains its terms.
INDEXES_3 = (
    # jobs today (in all, in one server): a range of the newest rows
    "create index if not exists jobs_created on jobs(created_at)",
    "create index if not exists jobs_guild_created on jobs(guild_id, created_at)",
    # median job time: the newest finished animations, newest first
    "create index if not exists jobs_kind_status_finished on jobs(kind, status, finished_at)",
    # the retention sweep walks only jobs that still have files, oldest end first
    "create index if not exists jobs_unpurged on jobs(finished_at) where purged_at is null",
    # results not posted yet (repost check, /queue): a handful, however long the history
    "create index if not exists jobs_unposted on jobs(owner_id) "
    "where kind = 'animate' and status = 'done' and coalesce(posted, 0) != 1",
    # posted results whose status message still needs its final edit (start-up)
    "create index if not exists jobs_status_owed on jobs(id) where posted = 1 and coalesce(status_final, 0) != 1",
    # the fair order's clock: the newest served, at every job start, however many members
    "create index if not exists served_clock on served(clock)",
)

# One step per schema version, in order; a new version appends a step, never edits an old one.
MIGRATIONS = (Store._migration_1, Store._migration_2, Store._migration_3, Store._migration_4)


def _decode_job(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["params"] = json.loads(row["params"]) if row.get("params") else {}
    return row


def open_store(data_dir: Path) -> Store:
    return Store(data_dir / "emaki.db")
