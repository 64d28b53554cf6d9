"""Scale-out benchmark: jobs per minute with 1, 2, 4... renderer actors on a local Ray.

    python -m bench.scale --workers 1,2,4

Ray runs locally with logical GPUs (`ray.init(num_gpus=max(workers))`), so this measures the
coordinator and the cluster plumbing, not a GPU. Jobs go through the real path: the fair queue
(engine.coordinator.jobs.JobQueue with one slot per worker), Engine.run (story, frame rows, the recipe, writing
each frame as it streams back from its actor), and Engine.finish (the GIF) beside the next job, as the
bot does. Two renderers, measured in the same run:

- `stand-in`: a BENCHMARK-ONLY renderer whose every denoising step is a fixed sleep (`--step-ms`) and
  whose frames are a fixed small PNG. With the render time fixed and known, what is left is the
  coordinator's and Ray's cost, and efficiency = throughput(N) / (N x throughput(1)) shows how much of
  N GPUs the coordinator can keep busy.
- `tiny`: the real renderer on the tiny profile (random-weight models, real diffusers code; 3 frames x
  10 steps at 64x64). On this
  machine's CPU cores N actors share the same cores, so its efficiency says how CPU-bound the tiny
  models are here, not how N GPUs scale: it is printed for honesty, next to the stand-in.

Dispatch overhead per job: the time a job held its renderer slot beyond its stated render time (the
stand-in only: steps x step time), i.e. the story, rows, recipe, Ray round trips and frame writes.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from engine.coordinator.jobs import JobQueue
from engine.coordinator.requests import build_params
from engine.coordinator.store import open_store
from engine.coordinator.worker import Engine, stream_job
from engine.events import StepProgress
from engine.render.renderer import FrameRendered, Recipe, Renderer
from engine.settings import Settings, load_settings


class SleepRenderer(Renderer):
    """STAND-IN FOR THIS BENCHMARK ONLY: no model is loaded; every denoising step sleeps `step_s`, and
    every frame is the same small PNG. Never used by the bot or the CLI."""

    def __init__(self, settings: Settings, step_s: float) -> None:
        super().__init__(settings)
        self.step_s = step_s
        out = io.BytesIO()
        Image.new("RGB", (32, 32), (90, 140, 200)).save(out, format="PNG")
        self.png = out.getvalue()

    def load(self) -> SleepRenderer:
        return self

    def frames(
        self,
        recipe: Recipe,
        cancelled: Callable[[], bool] = lambda: False,
        on_step: Callable[[StepProgress], None] | None = None,
    ) -> Iterator[FrameRendered]:
        for plan in recipe.plans[recipe.start :]:
            for step in range(plan.steps):
                time.sleep(self.step_s)
                if on_step is not None:
                    on_step(StepProgress(recipe.job_id, plan.index, step + 1, plan.steps))
            yield FrameRendered(recipe.job_id, plan.index, self.png, time.time())


def run_workers(
    workers: int, jobs: int, frames: int, steps: int, load: Callable[[Settings], Renderer] | None, size: int
) -> dict[str, float]:
    """`jobs` jobs through the queue on `workers` fresh actors; wall time and per-job slot times."""
    from engine.coordinator.cluster import RayRenderers

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(profile="tiny", data_dir=tmp, story_backend="fallback", ray_address="local")
        store = open_store(settings.data_dir)
        pool = RayRenderers(settings, store, workers=workers, cache_dir=os.path.join(tmp, "cache"), load=load)
        pool.wait_ready()  # model loading is not what is measured
        engine = Engine(settings, store, renderers=pool)
        ids = [
            engine.create_job(
                build_params(
                    settings, store, f"idea {i}", frames=frames, steps=steps, strength=1.0, width=32, height=32
                ),
                owner_id=i % 7,
            )
            for i in range(jobs)
        ]
        executor = ThreadPoolExecutor(workers, thread_name_prefix="bench-slot")
        held: list[float] = []
        finishing: set[asyncio.Task[Any]] = set()

        async def run_job(job_id: int, cancel: threading.Event) -> None:  # the bot's run_job, minus Discord
            started = time.perf_counter()
            async for _event in stream_job(engine, executor, job_id, cancel):
                pass
            held.append(time.perf_counter() - started)
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(engine.finish, job_id))
            finishing.add(task)

        async def drain() -> float:
            queue = JobQueue(store, run_job, max_pending_per_member=jobs, workers=workers)
            started = time.perf_counter()
            queue.kick()
            await queue.idle()
            await asyncio.gather(*finishing)
            return time.perf_counter() - started

        wall = asyncio.run(drain())
        executor.shutdown()
        pool.close()
        done = sum(1 for i in ids if store.job(i)["status"] == "done")
        assert done == jobs, f"only {done} of {jobs} jobs finished"
        return {"wall_s": wall, "jobs_per_min": jobs * 60 / wall, "held_s": sum(held) / len(held)}


def measure(
    name: str,
    counts: list[int],
    jobs_per_worker: int,
    frames: int,
    steps: int,
    load: Any,
    render_s: float | None,
    size: int = 32,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in counts:
        result = run_workers(n, jobs_per_worker * n, frames, steps, load, size)
        rows.append({"renderer": name, "workers": n, "jobs": jobs_per_worker * n, **result})
    base = next((r["jobs_per_min"] for r in rows if r["workers"] == 1), None)
    for row in rows:
        row["efficiency"] = row["jobs_per_min"] / (row["workers"] * base) if base else None
        row["overhead_ms"] = (row["held_s"] - render_s) * 1000 if render_s is not None else None
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="renderer counts to compare (must include 1)")
    parser.add_argument("--jobs-per-worker", type=int, default=6, help="jobs per worker in each run")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="denoising steps per frame")
    parser.add_argument("--step-ms", type=float, default=50.0, help="the stand-in's fixed time per step")
    parser.add_argument("--tiny-jobs-per-worker", type=int, default=2, help="0: skip the tiny-profile runs")
    args = parser.parse_args(argv)
    counts = sorted({int(n) for n in args.workers.split(",")})
    if 1 not in counts:
        parser.error("--workers must include 1: efficiency is relative to one worker")

    import ray

    ray.init(
        num_cpus=os.cpu_count() or 2,
        num_gpus=max(counts),  # logical GPUs: the actors' placement is real, the devices are not
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
    )
    try:
        render_s = args.frames * args.steps * args.step_ms / 1000
        stand_in = functools.partial(SleepRenderer, step_s=args.step_ms / 1000)
        rows = measure("stand-in", counts, args.jobs_per_worker, args.frames, args.steps, stand_in, render_s)
        if args.tiny_jobs_per_worker:
            rows += measure("tiny", counts, args.tiny_jobs_per_worker, 3, 10, None, None, size=64)
    finally:
        ray.shutdown()

    print(
        f"stand-in renderer (BENCHMARK ONLY: sleeps {args.step_ms:g} ms per step, {args.frames} frames x "
        f"{args.steps} steps = {render_s:.2f} s per job); tiny = real tiny-profile models on this machine's "
        f"{os.cpu_count()} CPU cores; Ray local, logical GPUs"
    )
    head = f"{'renderer':10}{'workers':>8}{'jobs':>6}{'wall s':>9}{'jobs/min':>10}"
    print(f"{head}{'efficiency':>12}{'overhead ms/job':>17}")
    for r in rows:
        eff = f"{r['efficiency']:.3f}" if r["efficiency"] is not None else "-"
        over = f"{r['overhead_ms']:.1f}" if r["overhead_ms"] is not None else "-"
        print(
            f"{r['renderer']:10}{r['workers']:>8}{r['jobs']:>6}{r['wall_s']:>9.2f}{r['jobs_per_min']:>10.1f}{eff:>12}{over:>17}"
        )
    summary: dict[str, Any] = {"step_ms": args.step_ms, "render_s_per_job": render_s, "cpu_cores": os.cpu_count()}
    for r in rows:
        key = f"{r['renderer'].replace('-', '_')}_{r['workers']}"
        summary[f"{key}_jobs_per_min"] = round(r["jobs_per_min"], 2)
        summary[f"{key}_efficiency"] = round(r["efficiency"], 4) if r["efficiency"] is not None else None
        if r["overhead_ms"] is not None:
            summary[f"{key}_overhead_ms"] = round(r["overhead_ms"], 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
