"""Retention: the files of jobs that ended more than `keep_days` ago are deleted; their rows stay.

A job's files are its folder under `data_dir/jobs/` (frames, GIF, MP4, story and metrics records,
the CLI's meta) and its lock file; the in-between cache is shared between jobs by content, so the
sweep deletes the cache entries of the purged job's keyframe pairs (a living job that shares a pair,
such as a regeneration keeping the first frames, recomputes it if it ever needs it again: it is a
cache). Rows stay and record `purged_at`, so `emaki jobs`, /queue and the history still know what
was made, and regenerating from a purged job can say why it cannot.

The clock is a parameter (`now`), so the tests decide what "30 days ago" is.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from engine.coordinator.store import PURGE_BATCH, Store
from engine.settings import Settings

log = logging.getLogger(__name__)

DAY_S = 86400.0


@dataclass
class SweepReport:
    jobs: list[int] = field(default_factory=list)  # purged now
    bytes_freed: int = 0
    cache_files: int = 0  # in-between cache files deleted


def purged_reason(job: dict[str, Any]) -> str | None:
    """The one line a member reads when they try to regenerate from a purged job; None if it is not."""
    if not job.get("purged_at"):
        return None
    days = job.get("purged_days")
    after = f" after {days} days" if days else ""
    return f"job {job['id']}'s frames were deleted{after} (the bot keeps files for a while only): start a new one"


def sweep(settings: Settings, store: Store, now: float) -> SweepReport:
    """Delete the files of every job that ended more than `settings.keep_days` days before `now`
    and is not waited for (see `Store.purge_candidates`). keep_days 0 keeps everything."""
    report = SweepReport()
    if settings.keep_days <= 0:
        return report
    from engine.coordinator.job_files import is_rendering

    cutoff = now - settings.keep_days * DAY_S
    for job in _candidates(store, cutoff):
        if is_rendering(settings.data_dir, job["id"]):  # a CLI `emaki resume` of an old failed job
            continue
        # Marked first: a regeneration asked for while the files go says "purged", not "file not found".
        store.mark_purged(job["id"], now, settings.keep_days)
        freed, cache_files = _delete_job_files(settings, store, job)
        report.jobs.append(job["id"])
        report.bytes_freed += freed
        report.cache_files += cache_files
    if report.jobs:
        log.info(
            "retention: deleted the files of %d job(s) older than %d days (%.1f MiB)",
            len(report.jobs),
            settings.keep_days,
            report.bytes_freed / 2**20,
        )
    return report


def _candidates(store: Store, cutoff: float, batch: int | None = None) -> Iterator[dict[str, Any]]:
    """Every purge candidate, read in bounded batches (each one short query on the index of unpurged
    jobs): the store is free between batches, so the bot's own queries never wait for the sweep, and
    memory holds one batch whatever the history. A job skipped (being rendered) is not read again."""
    after: tuple[float, int] | None = None
    size = batch or PURGE_BATCH
    while True:
        rows = store.purge_candidates(cutoff, after=after, limit=size)
        yield from rows
        if len(rows) < size:
            return
        after = (rows[-1]["finished_at"], rows[-1]["id"])


def _delete_job_files(settings: Settings, store: Store, job: dict[str, Any]) -> tuple[int, int]:
    from engine.coordinator.job_files import job_dir, job_lock_path

    folder = job_dir(settings, job["id"])
    # The cache entries are named by the keyframes' content: read the frames before they go.
    cache = _inbetween_files(settings, job, store.frames(job["id"]))
    freed = 0
    cache_files = 0
    for path in cache:
        freed += _size(path)
        if _unlink(path):
            cache_files += 1
    if folder.is_dir():
        freed += sum(_size(p) for p in folder.rglob("*"))
        shutil.rmtree(folder, ignore_errors=True)
    lock = job_lock_path(settings.data_dir, job["id"])
    freed += _size(lock)
    _unlink(lock)
    gif = job.get("gif_path")
    if gif and Path(gif).is_file() and not Path(gif).is_relative_to(folder):  # rows from older layouts
        freed += _size(Path(gif))
        _unlink(Path(gif))
    return freed, cache_files


def _inbetween_files(settings: Settings, job: dict[str, Any], frames: list[dict[str, Any]]) -> list[Path]:
    """The in-between cache files of the job's keyframe pairs. The names come from
    engine/render/interpolate.py's own (private) digest and file naming, so they can never drift apart."""
    from engine.render.interpolate import Inbetweener, _digest

    count = int((job.get("params") or {}).get("interpolate") or 0)
    cache_dir = settings.data_dir / "inbetweens"
    if not count or not cache_dir.is_dir():
        return []
    digests: list[str | None] = []
    for row in frames:
        try:
            with Image.open(row["path"]) as image:
                digests.append(_digest(image.convert("RGB")))  # as clip_images reads keyframes
        except (OSError, ValueError):
            digests.append(None)  # a missing or broken frame: its pairs were never cached
    files: list[Path] = []
    namer = Inbetweener(count, cache_dir=cache_dir)
    for first, second in itertools.pairwise(digests):
        if first is not None and second is not None:
            files.extend(p for p in namer._files((first, second)) if p.exists())
    return files


def file_size(path: Path) -> int:
    """A file's bytes; 0 if it is not a file (gone, a folder, unreadable)."""
    return _size(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def dir_size(path: Path) -> int:
    """Bytes under a folder (files only; links not followed), for /stats."""
    total = 0
    if path.is_dir():
        for item in path.rglob("*"):
            if not item.is_symlink():
                total += _size(item)
    return total
