"""`emaki jobs`, `emaki resume JOB`, `emaki redo JOB --from K [--seed S]`.

A job's rows hold every frame's recipe, so an interrupted job continues at its first missing frame
and a finished one can be redone from any frame, keeping the frames before it byte for byte (what
the bot's 🔁 and digit reactions do).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from emaki.animate_cmd import Output, add_output_options, plan_output, read_meta, render_job, start_engine, write_meta
from emaki.common import check_data_dir, existing_store, quiet_libraries, settings_from_args, user_name
from engine.errors import InvalidRequest
from engine.settings import MAX_SEED, Settings

MAX_LISTED = 1000


def shown_status(settings: Settings, job: dict[str, Any]) -> str:
    """A `running` row no process is rendering was interrupted (Ctrl-C, kill -9, a crash)."""
    from engine.coordinator.job_files import (
        is_rendering,  # not engine.coordinator.worker: listing jobs must not import torch
    )

    if job["status"] == "running" and not is_rendering(settings.data_dir, job["id"]):
        return "interrupted"
    return job["status"]


def shown_post(job: dict[str, Any]) -> str:
    """Where the bot's result stands in Discord: a result Discord refused (403) is stranded, not `done`.
    `-` for a job nothing posts (a CLI job, a training, one that did not finish)."""
    from bot.state import post_state  # no discord.py, no torch

    if job["kind"] != "animate" or not job.get("channel_id") or job["status"] != "done":
        return "-"
    state = post_state(job)
    reason = (job.get("post_error") or "").splitlines()[0] if job.get("post_error") else ""
    if state in ("refused", "failed") and reason:
        return f"{state}: {reason}"
    return state


def cmd_jobs(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not 1 <= args.limit <= MAX_LISTED:
        raise InvalidRequest(f"--limit must be between 1 and {MAX_LISTED} (got {args.limit})")
    store = existing_store(settings)
    if args.purge:
        quiet_libraries(
            args
        )  # engine.coordinator.retention deletes through engine.coordinator.worker, which imports the model libraries
        return _purge(settings, store)
    jobs = store.recent_jobs(args.limit) if store is not None else []
    if not jobs:
        print(f"no jobs yet in {settings.data_dir}")
        return 0
    print("id\tstatus\tpost\twhen\tidea\terror")
    for job in jobs:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created_at"]))
        idea = job["idea"] if len(job["idea"]) <= 50 else job["idea"][:49] + "…"
        error = (job["error"] or "-").splitlines()[0]
        purged = " (files deleted)" if job.get("purged_at") else ""
        post = shown_post(job)
        print(f"{job['id']}\t{shown_status(settings, job)}{purged}\t{post}\t{when}\t{idea}\t{error}")
    print_workers(store)
    return 0


def _purge(settings: Settings, store: Any) -> int:
    """The bot's daily retention sweep, now (for a box that runs only the CLI, or before a backup)."""
    from engine.coordinator.retention import sweep

    if settings.keep_days == 0:
        print("EMAKI_KEEP_DAYS is 0: files are kept forever; nothing deleted")
        return 0
    report = sweep(settings, store, time.time()) if store is not None else None
    if report is None or not report.jobs:
        print(f"no job older than {settings.keep_days} days has files left in {settings.data_dir}")
        return 0
    ids = ", ".join(str(i) for i in report.jobs)
    print(
        f"deleted the files of {len(report.jobs)} job(s) finished more than {settings.keep_days} days ago "
        f"({report.bytes_freed / 2**20:.1f} MiB; their rows stay): {ids}"
    )
    return 0


def print_workers(store: Any) -> None:
    """Cluster mode's renderers (node, GPU, state, current job), when the coordinator has any."""
    workers = store.workers() if store is not None else []
    if not workers:
        return
    print("\nworker\tnode\tgpu\tstate\tjob\tsince")
    for worker in workers:
        since = time.strftime("%H:%M:%S", time.localtime(worker["updated_at"] or 0))
        job = worker["job_id"] if worker["job_id"] is not None else "-"
        print(f"{worker['name']}\t{worker['node'] or '-'}\t{worker['gpu'] or '-'}\t{worker['state']}\t{job}\t{since}")


MAX_JOB_ID = 2**63 - 1  # SQLite's largest integer


def _job(store: Any, settings: Settings, job_id: int) -> dict[str, Any]:
    known = store is not None and 1 <= job_id <= MAX_JOB_ID
    job = store.job(job_id) if known else None
    if job is None or job["kind"] != "animate":
        raise InvalidRequest(f"there is no animation job {job_id} in {settings.data_dir} (emaki jobs lists them)")
    return job


def _output(args: argparse.Namespace, idea: str, recorded: dict[str, Any]) -> Output:
    out = args.out or recorded.get("out")
    fmt = args.format or (None if args.out else recorded.get("format"))
    return plan_output(out, fmt, idea, args.force)


def cmd_resume(args: argparse.Namespace) -> int:

    settings = settings_from_args(args)
    store = existing_store(settings)
    job = _job(store, settings, args.job)
    status = shown_status(settings, job)
    if status == "running":
        raise InvalidRequest(f"job {args.job} is being rendered right now by another process")
    check_data_dir(settings)
    output = _output(args, job["idea"], read_meta(settings, args.job))
    engine = start_engine(settings, job["params"].get("motion", "chain"), store)
    write_meta(settings, args.job, out=str(output.path.absolute()) if output.explicit else None, format=output.fmt)
    print(render_job(args, engine, args.job, output))
    return 0


def cmd_redo(args: argparse.Namespace) -> int:
    from engine.coordinator.retention import purged_reason

    settings = settings_from_args(args)
    store = existing_store(settings)
    parent = _job(store, settings, args.job)
    purged = purged_reason(parent)
    if purged:
        raise InvalidRequest(purged)
    rows = store.frames(args.job)
    n = parent["params"].get("frames", 0)
    if parent["status"] != "done" or len(rows) != n or not all(r["path"] and Path(r["path"]).is_file() for r in rows):
        raise InvalidRequest(f"job {args.job} has no finished animation to redo (emaki resume {args.job} finishes it)")
    if not 1 <= args.from_frame <= n:
        raise InvalidRequest(f"--from must be between 1 and {n}, the frames of job {args.job} (got {args.from_frame})")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise InvalidRequest(f"--seed must be between 0 and {MAX_SEED} (got {args.seed})")
    check_data_dir(settings)
    video_job = parent["params"].get("motion") == "video"
    output = _output(args, parent["idea"], {"format": "mp4"} if video_job else {})  # as animate's default
    engine = start_engine(settings, parent["params"].get("motion", "chain"), store)
    parent_meta = read_meta(settings, args.job)
    job_id = engine.create_regeneration(args.job, args.from_frame - 1, seed=args.seed, owner_name=user_name())
    write_meta(
        settings,
        job_id,
        story=parent_meta.get("story", {}),
        out=str(output.path.absolute()) if output.explicit else None,
        format=output.fmt,
    )
    print(render_job(args, engine, job_id, output))
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    jobs = sub.add_parser("jobs", parents=[common], help="list animation jobs, newest first")
    jobs.add_argument("--limit", type=int, default=20, help=f"how many to list (1..{MAX_LISTED}; default 20)")
    jobs.add_argument(
        "--purge",
        action="store_true",
        help="delete the files of jobs finished more than EMAKI_KEEP_DAYS days ago (rows stay), as the bot does daily",
    )
    jobs.set_defaults(func=cmd_jobs, light=True)  # a table: torch only for --purge

    resume = sub.add_parser(
        "resume",
        parents=[common],
        help="continue an interrupted job from its first missing frame",
        description="Continue an interrupted (Ctrl-C, kill -9, crash) or failed job from its first missing "
        "frame and write its outputs where the first run was asked to (or --out). A finished job is "
        "written out again.",
    )
    resume.add_argument("job", type=int, help="job id (emaki jobs)")
    add_output_options(resume)
    resume.set_defaults(func=cmd_resume)

    redo = sub.add_parser(
        "redo",
        parents=[common],
        help="a new job redoing a finished animation from frame K",
        description="Make a new job that keeps frames 1..K-1 of a finished animation byte for byte, "
        "renders frame K with a new seed (or --seed) and re-chains the frames after it. In motion mode K "
        "is a beat: only that beat's stretch gets new noise, but the whole clip is rendered again, so "
        "the other frames can change a little. In video mode K is a keyframe: keyframes 1..K-1 are kept, K..N "
        "rendered again, then the clip through all of them with the same clip noise.",
    )
    redo.add_argument("job", type=int, help="job id of a finished animation (emaki jobs)")
    redo.add_argument(
        "--from", dest="from_frame", type=int, required=True, metavar="K", help="first frame to redo (1..N)"
    )
    redo.add_argument("--seed", type=int, help=f"frame K's seed, 0..{MAX_SEED} (default: a new one)")
    add_output_options(redo)
    redo.set_defaults(func=cmd_redo)
