"""Queue benchmark: how much of the wall time the engine spends computing.

    python -m bench.queue --jobs 6

N tiny-profile jobs go through the real queue (engine.coordinator.jobs.JobQueue), the real GPU-thread runner
(engine.coordinator.worker.stream_job) and the real finishing (Engine.finish: the GIF; fit_to_bytes: the upload
file). Discord is left out: posting is writing the fitted GIF, since a simulated Discord would add
only noise. Two ways of running are measured side by side in one process:
- overlapped (as the bot ships): a job's finishing runs in a task of its own while the next renders;
- serial: finishing sits between jobs.
engine_busy_s is the time the single GPU-thread executor spent running engine work. The last line is
one JSON object.

    python -m bench.queue --discord --jobs 50 --members 10

The bot's job path (the real queue, GPU-thread runner, finishing, and the bot's own Discord outbox)
with a simulated Discord client whose every write waits for its channel's bucket (`--rate` writes
per second; Discord's own is about 5 per 5 s for edits, scaled up so the run takes a minute, not an
hour). `--jobs` tiny jobs from `--members` members, all in one channel, every status and position
edit and result post a write. Measured side by side in one run: as the bot ships (Discord I/O
beside the GPU) with the rate-limited Discord and with an instant one, and, as the baseline, the
next job waiting for the last one's Discord writes (how the bot worked before). Printed: the
GPU-idle share between jobs (gaps between one render ending and the next starting, over the span
of all renders) and the largest gap.

    python -m bench.queue --queue-length 10,100,500,1000

The coordinator's own cost per job as the queue grows: the render is removed (a stand-in renderer,
bench.scale's SleepRenderer with no sleep: one 32x32 frame, one step), Discord too (a write reads its
row, as the bot's does, and sends nothing). For each queue length q, a fresh data dir holds q waiting
jobs from q/2 members in one channel; every job that runs is replaced by a new one from its owner, so
q stays constant while `--measure-jobs` jobs run. Per job it does what the bot does: the job's start
(the fair pick, the position edits of everyone behind it, the job's rows, Engine.run with the
stand-in) and a member's /animate (the cap check, the row, its position, the pick, the position
edits), with the bot's outbox throttling each message to one edit per `position_edit_interval_s`.
Printed side by side: ms per job at each q (the median of `--repeat` runs), and the growth from the
smallest q to the largest.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from engine.coordinator.jobs import JobQueue
from engine.coordinator.requests import build_params
from engine.coordinator.store import open_store
from engine.coordinator.worker import Engine, stream_job
from engine.render.media import fit_to_bytes
from engine.render.models import Models
from engine.settings import load_settings


async def run_queue(models: Models, jobs: int, steps: int | None, overlapped: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(profile="tiny", data_dir=tmp, story_backend="fallback")
        store = open_store(settings.data_dir)
        engine = Engine(settings, store, models=models)
        gpu = RenderClock()
        outbox = Path(tmp) / "outbox"
        outbox.mkdir()
        finishing: set[asyncio.Task[None]] = set()

        def finish_and_post(job_id: int) -> None:
            engine.finish(job_id)
            frames = [Image.open(r["path"]).convert("RGB") for r in store.frames(job_id)]
            data, _ = fit_to_bytes(frames, settings.upload_limit_bytes)
            (outbox / f"{job_id}.gif").write_bytes(data)

        async def run_job(job_id: int, cancel: threading.Event) -> None:
            async for _ in stream_job(engine, gpu, job_id, cancel):
                pass
            if overlapped:
                task = asyncio.get_running_loop().create_task(asyncio.to_thread(finish_and_post, job_id))
                finishing.add(task)
                task.add_done_callback(finishing.discard)
            else:
                await asyncio.to_thread(finish_and_post, job_id)

        queue = JobQueue(store, run_job, max_pending_per_member=jobs)
        for i in range(jobs):
            params = build_params(settings, store, f"a paper boat sails down a stream, take {i}", seed=i, steps=steps)
            engine.create_job(params, owner_id=i % 3)
        started = time.perf_counter()
        queue.kick()
        await queue.idle()
        await asyncio.gather(*finishing)
        wall = time.perf_counter() - started
        gpu.shutdown()
        assert len(list(outbox.glob("*.gif"))) == jobs, "every job must be posted"
        return {"wall_s": wall, "engine_busy_s": gpu.busy_s, "busy_fraction": gpu.busy_s / wall}


class RenderClock(ThreadPoolExecutor):
    """The bot's one GPU thread, recording when each piece of work starts and ends."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="bench-gpu")
        self.spans: list[tuple[float, float]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def timed() -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spans.append((started, time.perf_counter()))

        return super().submit(timed)

    @property
    def busy_s(self) -> float:
        return sum(end - start for start, end in self.spans)

    def idle(self) -> dict[str, float]:
        spans = sorted(self.spans)
        gaps = [max(0.0, b[0] - a[1]) for a, b in itertools.pairwise(spans)]
        span = spans[-1][1] - spans[0][0]
        return {"gpu_idle_share": sum(gaps) / span, "max_gap_s": max(gaps, default=0.0), "span_s": span}


class ChannelBuckets:
    """A rate-limited Discord: each channel allows `rate` REST calls per second, the rest wait."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_free: dict[str, float] = {}
        self.calls = 0

    async def wait(self, path: str) -> None:
        self.calls += 1
        if not self.interval or not path.startswith("/channels/"):
            return
        channel = path.split("/")[2]
        now = time.perf_counter()
        at = max(now, self.next_free.get(channel, now))
        self.next_free[channel] = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)


async def run_discord(models: Models, jobs: int, members: int, steps: int, rate: float, inline: bool) -> dict[str, Any]:
    """The bot's job path with a simulated rate-limited Discord client in place of discord.py: the
    real queue (JobQueue, round-robin over `members`), the real GPU-thread runner (stream_job), the
    bot's own Discord outbox (bot.outbox.Outbox: coalesced, throttled, bounded per channel) and the
    real finishing; every Discord write (status edit, position edit, result post) is a call that
    waits for its channel's bucket. `inline` is the baseline: the next job starts only once this
    job's Discord writes are done (how the bot worked before)."""
    from bot.outbox import Outbox

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(profile="tiny", data_dir=tmp, story_backend="fallback", steps=steps)
        store = open_store(settings.data_dir)
        engine = Engine(settings, store, models=models)
        gpu = RenderClock()
        buckets = ChannelBuckets(rate)
        background: set[asyncio.Task[Any]] = set()

        def spawn(coro: Any) -> asyncio.Task[Any]:
            task = asyncio.get_running_loop().create_task(coro)
            background.add(task)
            task.add_done_callback(background.discard)
            return task

        outbox = Outbox(spawn)
        progress_interval = 0.0 if inline else 1.5  # the bot's defaults; before, every change was sent
        position_interval = 0.0 if inline else 5.0
        shown: dict[int, int] = {}
        posted: list[int] = []

        async def discord_write() -> None:  # one REST call in the jobs' channel
            await buckets.wait("/channels/1/messages")

        def show_positions() -> None:
            for position, job in enumerate(queue.pending(), start=1):
                if shown.get(job["id"]) != position:
                    shown[job["id"]] = position
                    outbox.edit(1, ("status", job["id"]), discord_write, position_interval)

        async def finish_and_post(job_id: int) -> None:
            await asyncio.to_thread(engine.finish, job_id)
            frames = [Image.open(r["path"]).convert("RGB") for r in store.frames(job_id)]
            await asyncio.to_thread(fit_to_bytes, frames, settings.upload_limit_bytes)
            async with outbox.slot(1):
                await discord_write()
            posted.append(job_id)
            outbox.edit(1, ("status", job_id), discord_write)  # the status links the result

        async def run_job(job_id: int, cancel: threading.Event) -> None:
            show_positions()
            async for _event in stream_job(engine, gpu, job_id, cancel):
                outbox.edit(1, ("status", job_id), discord_write, progress_interval)
            if inline:
                await finish_and_post(job_id)
                show_positions()
                await outbox.idle()
            else:
                spawn(finish_and_post(job_id))

        queue = JobQueue(store, run_job, max_pending_per_member=jobs)
        for n in range(jobs):
            params = build_params(settings, store, f"a paper boat sails down a stream, take {n}", seed=n, frames=1)
            engine.create_job(params, owner_id=n % members)
        started = time.perf_counter()
        queue.kick()
        await queue.idle()
        while background:
            await asyncio.gather(*background)
        await outbox.idle()
        wall = time.perf_counter() - started
        gpu.shutdown()
    assert sorted(posted) == list(range(1, jobs + 1)), "every job must be posted"
    return {**gpu.idle(), "wall_s": wall, "discord_calls": buckets.calls}


def main_discord(args: argparse.Namespace) -> None:
    models = Models(load_settings(profile="tiny", story_backend="fallback")).load()
    steps = args.steps or 2
    asyncio.run(run_discord(models, 2, 2, steps, 0, inline=False))  # warm-up: first-call costs
    runs = {
        "waits for Discord": asyncio.run(run_discord(models, args.jobs, args.members, steps, args.rate, inline=True)),
        "instant Discord": asyncio.run(run_discord(models, args.jobs, args.members, steps, 0, inline=False)),
        "rate-limited": asyncio.run(run_discord(models, args.jobs, args.members, steps, args.rate, inline=False)),
    }
    print(f"{'':20}{'wall s':>9}{'GPU idle':>10}{'max gap s':>11}{'REST calls':>12}")
    for name, r in runs.items():
        print(
            f"{name:20}{r['wall_s']:>9.2f}{r['gpu_idle_share']:>10.1%}{r['max_gap_s']:>11.3f}{r['discord_calls']:>12}"
        )
    shipped, baseline = runs["rate-limited"], runs["waits for Discord"]
    print(
        json.dumps(
            {
                "mode": "discord",
                "jobs": args.jobs,
                "members": args.members,
                "rate_per_channel_s": args.rate,
                "gpu_idle_share": round(shipped["gpu_idle_share"], 4),
                "max_gap_s": round(shipped["max_gap_s"], 4),
                "wall_s": round(shipped["wall_s"], 3),
                "instant_gpu_idle_share": round(runs["instant Discord"]["gpu_idle_share"], 4),
                "baseline_gpu_idle_share": round(baseline["gpu_idle_share"], 4),
                "baseline_max_gap_s": round(baseline["max_gap_s"], 4),
                "baseline_wall_s": round(baseline["wall_s"], 3),
                "render_span_s": round(shipped["span_s"], 3),
                "baseline_render_span_s": round(baseline["span_s"], 3),
                # How much more of the time between renders the GPU sat idle when jobs waited for
                # Discord (wall times on a shared machine are mostly other load; this is not).
                "idle_ratio_baseline_vs_shipped": round(
                    baseline["gpu_idle_share"] / max(shipped["gpu_idle_share"], 1e-6), 1
                ),
            }
        )
    )


async def run_queue_length(queue_length: int, measure_jobs: int, warm_jobs: int) -> dict[str, float]:
    """`measure_jobs` jobs through the bot's job path (render and Discord removed) with `queue_length`
    jobs always waiting behind them; ms per job, and how that splits between the job's start (pick,
    position edits, rows, Engine.run) and the /animate that replaces it."""
    from bench.scale import SleepRenderer
    from bot import render
    from bot.outbox import Outbox
    from engine.render.renderer import LocalRenderers

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(profile="tiny", data_dir=tmp, story_backend="fallback")
        store = open_store(settings.data_dir)
        engine = Engine(settings, store, renderers=LocalRenderers(SleepRenderer(settings, step_s=0.0)))
        gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-gpu")
        background: set[asyncio.Task[Any]] = set()

        def spawn(coro: Any) -> asyncio.Task[Any]:
            task = asyncio.get_running_loop().create_task(coro)
            background.add(task)
            task.add_done_callback(background.discard)
            return task

        outbox = Outbox(spawn)
        shown: dict[int, str] = {}
        members = max(1, queue_length // 2)
        params = build_params(
            settings, store, "a paper boat sails down a stream", frames=1, steps=1, width=32, height=32
        )
        started_at: list[float] = []
        split = {"start_s": 0.0, "animate_s": 0.0}

        def set_status(job: dict[str, Any], text: str) -> None:  # the bot's set_status, Discord removed
            async def write() -> None:
                row = store.job(job["id"])  # the bot's write reads the row when it goes out
                if row is not None and row["status"] == "queued":
                    outbox.writes += 0  # the Discord edit would go here

            outbox.edit(job["channel_id"], ("status", job["id"]), write, settings.position_edit_interval_s)

        def show_positions() -> None:  # the bot's show_positions (bot/client.py), Discord removed
            gone, changed = render.position_changes(queue.pending(), shown, queue.eta_seconds)
            for job_id in gone:
                outbox.forget(("status", job_id))
            for job, text in changed:
                set_status(job, text)

        def animate(owner_id: int) -> None:  # /animate: cap, row, position, pick, positions
            queue.check_cap(owner_id)
            job_id = engine.create_job(params, owner_id=owner_id, guild_id=1, channel_id=1)
            job = store.job(job_id)
            assert job is not None
            shown[job_id] = render.queued(job, max(queue.position(job_id), 1), 60.0)
            queue.kick()
            show_positions()

        async def run_job(job_id: int, cancel: threading.Event) -> None:  # the bot's run_job, minus Discord
            began = time.perf_counter()
            started_at.append(began)
            show_positions()
            job = store.job(job_id)
            assert job is not None
            async for _event in stream_job(engine, gpu, job_id, cancel):
                pass
            outbox.forget(("status", job_id))
            split["start_s"] += time.perf_counter() - began
            if len(started_at) <= warm_jobs + measure_jobs:
                began = time.perf_counter()
                animate(job["owner_id"])  # its owner queues the next one: q stays the same
                split["animate_s"] += time.perf_counter() - began
            if len(started_at) == warm_jobs:
                split["start_s"] = split["animate_s"] = 0.0
            if len(started_at) == warm_jobs + measure_jobs + 1:
                queue.paused = True  # measured: nothing more starts

        queue = JobQueue(store, run_job, max_pending_per_member=queue_length + 1)
        for n in range(queue_length):
            engine.create_job(params, owner_id=n % members, guild_id=1, channel_id=1)
        queue.kick()
        await queue.idle()
        while background:
            await asyncio.gather(*background)
        await outbox.idle()
        gpu.shutdown()
        waiting = len(store.jobs_where("status = 'queued'", []))
        assert waiting == queue_length - 1, f"{waiting} jobs waiting, not {queue_length - 1}"
    span = started_at[warm_jobs + measure_jobs] - started_at[warm_jobs]
    return {
        "ms_per_job": span * 1000 / measure_jobs,
        "start_ms": split["start_s"] * 1000 / measure_jobs,
        "animate_ms": split["animate_s"] * 1000 / measure_jobs,
    }


def main_queue_length(args: argparse.Namespace) -> None:
    lengths = sorted({int(n) for n in args.queue_length.split(",")})
    asyncio.run(run_queue_length(min(lengths), 3, 1))  # warm-up: first-call costs (imports, story)
    tries: dict[int, list[dict[str, float]]] = {q: [] for q in lengths}
    for _ in range(args.repeat):  # the lengths take turns, so a burst of other load spreads over all
        for q in lengths:
            tries[q].append(asyncio.run(run_queue_length(q, args.measure_jobs, 3)))
    # Per length, the run with the median cost per job (this machine is shared: one run can be unlucky).
    runs = {q: sorted(t, key=lambda r: r["ms_per_job"])[len(t) // 2] for q, t in tries.items()}
    print(f"{'queue length':>12}{'ms per job':>12}{'job start ms':>14}{'/animate ms':>13}")
    for q, r in runs.items():
        print(f"{q:>12}{r['ms_per_job']:>12.1f}{r['start_ms']:>14.1f}{r['animate_ms']:>13.1f}")
    first, last = runs[lengths[0]], runs[lengths[-1]]
    print(
        json.dumps(
            {
                "mode": "queue-length",
                "measure_jobs": args.measure_jobs,
                "repeat": args.repeat,
                "ms_per_job": {str(q): round(r["ms_per_job"], 2) for q, r in runs.items()},
                "job_start_ms": {str(q): round(r["start_ms"], 2) for q, r in runs.items()},
                "animate_ms": {str(q): round(r["animate_ms"], 2) for q, r in runs.items()},
                "growth": round(last["ms_per_job"] / first["ms_per_job"], 2),
            }
        )
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.queue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--steps", type=int, help="denoising steps per job (default: the profile's, 50)")
    parser.add_argument("--discord", action="store_true", help="the whole bot against a rate-limited Discord")
    parser.add_argument("--members", type=int, default=10, help="with --discord: members sharing the jobs")
    parser.add_argument("--rate", type=float, default=50.0, help="with --discord: REST calls per second per channel")
    parser.add_argument("--queue-length", help="comma-separated queue lengths: the coordinator's cost per job at each")
    parser.add_argument("--measure-jobs", type=int, default=50, help="with --queue-length: jobs timed at each length")
    parser.add_argument(
        "--repeat", type=int, default=3, help="with --queue-length: runs per length (the median is shown)"
    )
    args = parser.parse_args(argv)
    if args.queue_length:
        main_queue_length(args)
        return
    if args.discord:
        main_discord(args)
        return
    models = Models(load_settings(profile="tiny", story_backend="fallback")).load()
    asyncio.run(run_queue(models, 1, args.steps, overlapped=True))  # warm-up: first-call costs
    serial = asyncio.run(run_queue(models, args.jobs, args.steps, overlapped=False))
    overlapped = asyncio.run(run_queue(models, args.jobs, args.steps, overlapped=True))
    print(f"{'':12}{'wall s':>9}{'engine s':>10}{'busy':>8}")
    for name, r in (("serial", serial), ("overlapped", overlapped)):
        print(f"{name:12}{r['wall_s']:>9.2f}{r['engine_busy_s']:>10.2f}{r['busy_fraction']:>8.1%}")
    print(
        json.dumps(
            {
                "jobs": args.jobs,
                "wall_s": round(overlapped["wall_s"], 3),
                "engine_busy_s": round(overlapped["engine_busy_s"], 3),
                "busy_fraction": round(overlapped["busy_fraction"], 4),
                "serial_wall_s": round(serial["wall_s"], 3),
                "serial_busy_fraction": round(serial["busy_fraction"], 4),
                "speed_ratio_vs_serial": round(serial["wall_s"] / overlapped["wall_s"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
