"""Queue benchmark: how much of the wall time the engine spends computing.

    python -m bench.queue --jobs 6

N tiny-profile jobs go through the real queue (engine.jobs.JobQueue), the real GPU-thread runner
(engine.worker.stream_job) and the real finishing (Engine.finish: the GIF; fit_to_bytes: the upload
file). Discord is left out: posting is writing the fitted GIF, since a simulated Discord would add
only noise. Two ways of running are measured side by side in one process:
- overlapped (as the bot ships): a job's finishing runs in a task of its own while the next renders;
- serial: finishing sits between jobs.
engine_busy_s is the time the single GPU-thread executor spent running engine work. The last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from engine.jobs import JobQueue
from engine.media import fit_to_bytes
from engine.models import Models
from engine.params import build_params
from engine.settings import load_settings
from engine.store import open_store
from engine.worker import Engine, stream_job


class TimedExecutor(ThreadPoolExecutor):
    """The one GPU thread, adding up how long its work runs."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="bench-gpu")
        self.busy_s = 0.0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def timed() -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.busy_s += time.perf_counter() - started

        return super().submit(timed)


async def run_queue(models: Models, jobs: int, steps: int | None, overlapped: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(profile="tiny", data_dir=tmp, story_backend="fallback")
        store = open_store(settings.data_dir)
        engine = Engine(settings, store, models=models)
        gpu = TimedExecutor()
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.queue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--steps", type=int, help="denoising steps per job (default: the profile's, 50)")
    args = parser.parse_args(argv)
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
