"""Where a job's files live, and the lock file a process holds while it renders the job: how a `running`
row left by a kill is told apart from one being rendered. Its own module so `emaki jobs` and retention can
ask without importing torch or the worker."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.settings import Settings


def job_dir(settings: Settings, job_id: int) -> Path:
    """Where a job's frames, GIF and records live."""
    return settings.data_dir / "jobs" / str(job_id)


def job_lock_path(data_dir: Path, job_id: int) -> Path:
    return data_dir / "jobs" / f"{job_id}.lock"


@contextlib.contextmanager
def holding_job_lock(data_dir: Path, job_id: int) -> Iterator[bool]:
    """An advisory lock held while a process renders the job (yields False when another holds it).
    The OS drops it when the process dies however it dies (kill -9 included), so a `running` row
    whose lock is free is a job that was interrupted, and two processes never render one job."""
    path = job_lock_path(data_dir, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_rendering(data_dir: Path, job_id: int) -> bool:
    """Whether some process (this one included) is rendering the job right now."""
    if not job_lock_path(data_dir, job_id).exists():
        return False
    with holding_job_lock(data_dir, job_id) as free:
        return not free
