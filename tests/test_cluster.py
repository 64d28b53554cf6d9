"""Cluster mode on a local Ray with two logical GPUs (CPU only, tiny profile): two renderer actors,
one Ray instance for the whole session. Skipped where Ray is not installed (CI installs it)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from engine.coordinator.cluster import RayRenderers  # noqa: E402  (after the skip: needs ray)
from engine.coordinator.jobs import JobQueue  # noqa: E402
from engine.coordinator.requests import build_params  # noqa: E402
from engine.coordinator.store import Store, open_store  # noqa: E402
from engine.coordinator.worker import Engine  # noqa: E402
from engine.events import Event, Failed, Finished, FrameDone, Requeued, StepProgress  # noqa: E402
from engine.params import AnimationParams  # noqa: E402
from engine.render.models import Models  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402
from tests.helpers import make_random_lora, sha  # noqa: E402

FAST = dict(steps=4, strength=0.5, width=32, height=32)


@pytest.fixture(scope="session")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayRenderers]:
    # One torch thread per actor, as in-process tests use: the same float order, so the same bytes.
    ray.init(
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
    )
    settings = Settings(profile="tiny", data_dir=tmp_path_factory.mktemp("coordinator"), ray_address="local")
    renderers = RayRenderers(settings, workers=2, cache_dir=str(tmp_path_factory.mktemp("worker-cache")))
    renderers.wait_ready()
    yield renderers
    renderers.close()
    ray.shutdown()


@pytest.fixture
def cluster_engine(tmp_path: Path, pool: RayRenderers) -> Engine:
    settings = load_settings(profile="tiny", data_dir=tmp_path / "data", ray_address="local")
    store = open_store(settings.data_dir)
    pool.store = store
    return Engine(settings, store, renderers=pool)


def local_frames(settings: Settings, store: Store, models: Models, job_id: int) -> list[str]:
    """The same job rendered in-process: the reference a worker's frames must match byte for byte."""
    models.use_style(None)
    engine = Engine(dataclasses.replace(settings, ray_address=""), store, models=models)
    copy = engine.create_from_recipe(AnimationParams.from_dict(store.job(job_id)["params"]), store.frames(job_id))
    events = list(engine.run_to_end(copy))
    assert isinstance(events[-1], Finished), events[-1]
    return [sha(p) for p in events[-1].frame_paths]


def test_two_jobs_render_at_the_same_time_on_two_workers(cluster_engine: Engine, shared_tiny_models: Models) -> None:
    engine = cluster_engine
    jobs = [
        engine.create_job(build_params(engine.settings, engine.store, f"idea {i}", frames=2, seed=i, **FAST))
        for i in (1, 2)
    ]
    seen: list[tuple[float, int, str]] = []
    lock = threading.Lock()

    def note(job_id: int, kind: str) -> None:
        with lock:
            seen.append((time.monotonic(), job_id, kind))

    stepped = {job: threading.Event() for job in jobs}

    def on_step(event: StepProgress) -> None:
        # Each job's first step waits (bounded) for the other's: they can only both pass if two
        # workers render at once, so overlap does not depend on how loaded this machine is.
        note(event.job_id, "step")
        stepped[event.job_id].set()
        other = jobs[1] if event.job_id == jobs[0] else jobs[0]
        assert stepped[other].wait(120), "the other job never rendered while this one did"

    def run(job_id: int) -> Event:
        last: Event | None = None
        for event in engine.run_to_end(job_id, on_step=on_step):
            if isinstance(event, FrameDone):
                note(job_id, "frame")
            last = event
        assert last is not None
        return last

    with ThreadPoolExecutor(2) as threads:
        ends = list(threads.map(run, jobs))
    assert all(isinstance(e, Finished) for e in ends), ends
    first = {j: min(t for t, job, _ in seen if job == j) for j in jobs}
    last = {j: max(t for t, job, kind in seen if job == j and kind == "frame") for j in jobs}
    # Each job's work began before the other's last frame arrived: they overlapped.
    assert first[jobs[0]] < last[jobs[1]] and first[jobs[1]] < last[jobs[0]]
    workers = engine.store.workers()
    assert len(workers) == 2 and {w["state"] for w in workers} == {"idle"}
    # What the workers rendered is what this process renders for the same recipe.
    assert [sha(p) for p in ends[0].frame_paths] == local_frames(
        engine.settings, engine.store, shared_tiny_models, jobs[0]
    )


async def test_killed_worker_job_resumes_and_is_finished_once(
    cluster_engine: Engine, pool: RayRenderers, shared_tiny_models: Models
) -> None:
    engine = cluster_engine
    job_id = engine.create_job(build_params(engine.settings, engine.store, "a kite", frames=8, seed=9, **FAST))
    before: list[str] = []
    finished: list[int] = []
    requeued: list[Requeued] = []

    def kill_mid_job(step: StepProgress) -> None:
        if step.frame_index == 2 and not before:  # frames 0 and 1 are written; the worker is on frame 2
            before.extend(sha(r["path"]) for r in engine.store.frames(job_id)[:2])
            busy = next(w for w in engine.store.workers() if w["state"] == "busy")
            ray.kill(pool.actors[int(busy["name"].rsplit("-", 1)[1])], no_restart=False)

    async def run_job(job_id: int, cancel: threading.Event) -> None:  # what the bot's run_job does
        events = await asyncio.to_thread(lambda: list(engine.run(job_id, cancel, on_step=kill_mid_job)))
        requeued.extend(e for e in events if isinstance(e, Requeued))
        if not any(isinstance(e, Failed | Requeued) for e in events):
            assert isinstance(await asyncio.to_thread(engine.finish, job_id), Finished)
            finished.append(job_id)

    queue = JobQueue(engine.store, run_job, max_pending_per_member=5, workers=2)
    queue.kick()
    await queue.idle()
    assert len(before) == 2 and len(requeued) == 1
    assert finished == [job_id]  # complete, and finished (posted) once
    assert engine.store.job(job_id)["status"] == "done"
    frames = [sha(r["path"]) for r in engine.store.frames(job_id)]
    assert frames[:2] == before  # the frames from before the kill, byte-identical
    assert frames == local_frames(engine.settings, engine.store, shared_tiny_models, job_id)
    # The killed actor came back and loaded its models again.
    infos = pool.wait_ready()
    assert any(info["restarted"] for info in infos)


async def test_losing_both_renderers_twice_is_two_losses_not_three(
    cluster_engine: Engine, pool: RayRenderers, shared_tiny_models: Models
) -> None:
    """Issue 24: what losing a node does to a local Ray, twice in one job. Each time both actors die,
    the job goes back to the queue and is handed to an actor that is still restarting: waiting for it
    is not a loss, so the job has lost its renderer twice, not three times, and finishes."""
    engine = cluster_engine
    job_id = engine.create_job(build_params(engine.settings, engine.store, "a heron", frames=8, seed=4, **FAST))
    kills: list[int] = []
    outcomes: list[Event] = []

    def kill_both(step: StepProgress) -> None:
        if (step.frame_index, len(kills)) in ((2, 0), (5, 1)):
            kills.append(step.frame_index)
            for actor in pool.actors:
                ray.kill(actor, no_restart=False)

    async def run_job(job_id: int, cancel: threading.Event) -> None:
        events = await asyncio.to_thread(lambda: list(engine.run(job_id, cancel, on_step=kill_both)))
        outcomes.extend(e for e in events if isinstance(e, Failed | Requeued))
        if not any(isinstance(e, Failed | Requeued) for e in events):
            outcomes.append(await asyncio.to_thread(engine.finish, job_id))

    queue = JobQueue(engine.store, run_job, max_pending_per_member=5, workers=2)
    queue.kick()
    await queue.idle()
    assert kills == [2, 5]
    assert [type(e) for e in outcomes] == [Requeued, Requeued, Finished], outcomes
    job = engine.store.job(job_id)
    assert job["status"] == "done" and job["worker_losses"] == 2
    assert [sha(r["path"]) for r in engine.store.frames(job_id)] == local_frames(
        engine.settings, engine.store, shared_tiny_models, job_id
    )
    pool.wait_ready()


def test_style_registered_after_start_reaches_a_worker_without_its_file(
    cluster_engine: Engine, pool: RayRenderers, tmp_path: Path, shared_tiny_models: Models
) -> None:
    engine = cluster_engine
    weights = make_random_lora(tmp_path / "late-style", seed=11)  # made after the workers started
    engine.store.add_style("late", str(weights), trigger="lte")
    params = build_params(engine.settings, engine.store, "a hill", frames=1, seed=4, style="late", **FAST)
    events = list(engine.run_to_end(engine.create_job(params)))
    assert isinstance(events[-1], Finished), events[-1]
    digest = sha(weights)
    fetched = [info for info in pool.wait_ready() if digest in info["fetched"]]
    assert len(fetched) == 1  # fetched through the object store by the worker that rendered it
    cached = Path(fetched[0]["cache_dir"]) / digest / weights.name
    assert cached.read_bytes() == weights.read_bytes()
    # The style was applied on the worker: the frame is what this process renders with the style.
    shared_tiny_models.use_style(None)
    local = Engine(dataclasses.replace(engine.settings, ray_address=""), engine.store, models=shared_tiny_models)
    again = list(local.run_to_end(local.create_from_recipe(params, engine.store.frames(events[-1].job_id))))
    assert sha(again[-1].frame_paths[0]) == sha(events[-1].frame_paths[0])
    shared_tiny_models.use_style(None)


def test_training_runs_on_one_worker_while_the_other_animates(cluster_engine: Engine, tmp_path: Path) -> None:
    from tests.test_train_robust import QUICK, make_folder
    from training.lora import TrainConfig
    from training.service import prepare_dataset, style_dir, train_style

    engine = cluster_engine
    store, settings = engine.store, engine.settings
    config = TrainConfig(steps=6, learning_rate=5e-2, **QUICK)
    dataset_id, _ = prepare_dataset(
        settings, store, make_folder(tmp_path / "ds"), "fox", status="approved", config=config
    )
    job_id = engine.create_job(build_params(settings, store, "a meadow", frames=3, seed=2, **FAST))
    training = threading.Event()
    animated = threading.Event()
    states: list[set[str]] = []

    def on_train_step(_: Any) -> None:
        training.set()  # the worker is training: now the animation starts
        animated.wait(120)  # this training keeps its worker until the animation is done on the other

    def train() -> Any:
        return train_style(settings, store, dataset_id, on_step=on_train_step, renderers=engine.renderers)

    def animate() -> Event:
        assert training.wait(120)
        on_step = lambda _: states.append({w["state"] for w in store.workers()})  # noqa: E731
        try:
            return list(engine.run_to_end(job_id, on_step=on_step))[-1]
        finally:
            animated.set()

    with ThreadPoolExecutor(2) as threads:
        trained, animation = threads.submit(train), threads.submit(animate)
        end, result = animation.result(), trained.result()
    assert isinstance(end, Finished) and result.finished and result.step == 6
    assert {"busy", "training"} in states  # one worker animating while the other held the training
    # The style came back from the worker and is registered here, usable by the next job.
    style = store.style("fox")
    assert style is not None and Path(style["path"]).is_file()
    assert Path(style["path"]).is_relative_to(style_dir(settings, "fox"))
    assert store.dataset(dataset_id)["status"] == "trained"


def test_cancel_reaches_the_worker_and_frees_it(cluster_engine: Engine) -> None:
    engine = cluster_engine
    job_id = engine.create_job(build_params(engine.settings, engine.store, "a lantern", frames=6, seed=3, **FAST))
    cancel = threading.Event()
    events = list(engine.run(job_id, cancel=cancel, on_step=lambda _: cancel.set()))
    assert isinstance(events[-1], Failed) and events[-1].reason == "cancelled"
    assert engine.store.job(job_id)["status"] == "cancelled"
    assert {w["state"] for w in engine.store.workers()} == {"idle"}
    # The worker that stopped takes the next job as usual.
    again = engine.create_job(build_params(engine.settings, engine.store, "a lantern", frames=1, seed=3, **FAST))
    assert isinstance(list(engine.run_to_end(again))[-1], Finished)


class Recording:
    """The pool, noting when each job's frames started and stopped streaming (ordering, not timing)."""

    def __init__(self, pool: RayRenderers) -> None:
        self.pool = pool
        self.spans: dict[int, list[int]] = {}
        self.order = itertools.count()  # SimCord runs a virtual clock: a sequence number orders events

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def frames(self, recipe: Any, cancelled: Any, on_step: Any) -> Iterator[Any]:
        self.spans[recipe.job_id] = [next(self.order)]
        yield from self.pool.frames(recipe, cancelled, on_step)
        self.spans[recipe.job_id].append(next(self.order))


@pytest.fixture
def simcord_bot(tmp_path: Path, pool: RayRenderers) -> Any:
    from bot.client import create_bot

    settings = load_settings(
        profile="tiny",
        data_dir=tmp_path / "bot-data",
        steps=4,
        strength=0.5,
        progress_edit_interval_s=0.0,
        position_edit_interval_s=0.0,
        ray_address="local",
    )
    recording = Recording(pool)
    bot = create_bot(settings, renderers=recording)  # type: ignore[arg-type]
    pool.store = bot.store
    bot.post_retry_delays = (0.01, 0.01)
    bot.outbox.retry_base_s = 0.01
    return bot


@pytest.mark.simcord(settle_timeout=120)
async def test_the_bot_renders_two_members_jobs_at_once_and_posts_each_once(simcord_env: Any) -> None:
    import discord

    env = simcord_env
    guild = env.create_guild("ghibli fans")
    channel = guild.create_text_channel("animations")
    alice = guild.add_member(env.create_user("alice"))
    bob = guild.add_member(env.create_user("bob"))
    mods = guild.create_role("mods", permissions=discord.Permissions(manage_guild=True))
    mod = guild.add_member(env.create_user("mod"), roles=[mods])
    bot = env.bot
    assert bot.queue.workers == 2 and bot.gpu._max_workers == 2
    await mod.slash(channel, "pause")  # both queued before either starts: they start together
    await alice.slash(channel, "animate", prompt="a dragon over a town", frames=3, seed=1)
    await bob.slash(channel, "animate", prompt="a cat on a roof", frames=3, seed=2)
    await mod.slash(channel, "resume")
    await env.settle()
    posts = [m for m in channel.history() if m.attachments and m.attachments[0].filename.endswith(".gif")]
    assert sorted(m.attachments[0].filename for m in posts) == ["emaki-1.gif", "emaki-2.gif"]  # each once
    assert [bot.store.job(i)["status"] for i in (1, 2)] == ["done", "done"]
    spans = bot.engine.renderers.spans
    assert spans[1][0] < spans[2][1] and spans[2][0] < spans[1][1]  # the two renders overlapped


CLUSTER_REFUSALS = """
import ray
from engine.coordinator.cluster import RayRenderers
from engine.errors import EmakiError, ModelLoadError
from engine.settings import Settings

def models_missing(settings):
    raise ModelLoadError("base model 'x/y' is not downloaded on this machine")

ray.init(num_cpus=1, num_gpus=1, include_dashboard=False)
settings = Settings(profile="tiny", ray_address="local")
try:
    RayRenderers(settings, workers=2)
except EmakiError as exc:
    print("more-workers:", exc)
try:
    RayRenderers(settings, workers=1, load=models_missing).wait_ready()
except EmakiError as exc:
    print("cannot-start:", type(exc).__name__, exc)
ray.shutdown()
"""


def test_more_workers_than_gpus_and_a_worker_that_cannot_start_are_one_line_each(tmp_path: Path) -> None:
    """In a Ray of its own (the session's holds both logical GPUs): an actor no GPU can host would
    wait for ever, and an actor whose models cannot load died with a Ray traceback; both are now one
    line naming the cause."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CLUSTER_REFUSALS], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "more-workers: EMAKI_GPU_WORKERS=2 renderers asked for, but the Ray cluster has 1 GPU(s)" in lines[0]
    assert lines[1].startswith("cannot-start: ModelLoadError a renderer could not start:")
    assert "base model 'x/y' is not downloaded on this machine" in lines[1] and len(lines) == 2


def test_a_video_job_renders_on_a_worker_with_its_video_style_and_its_clip_comes_back(
    cluster_engine: Engine, pool: RayRenderers, tmp_path: Path, shared_tiny_models: Models
) -> None:
    """Video mode on a Ray renderer: the keyframes, then the video model's steps (as frame N's progress),
    the clip back on the last keyframe's event, a video style fetched through the object store; the same
    bytes as this process renders from the same recipe."""
    import torch

    from engine.render.video import VideoRenderer, clip_paths
    from tests.test_video import make_video_lora

    engine = cluster_engine
    pool.check_video()  # every worker loads the video model (one line where one cannot)
    video_model = VideoRenderer.load(engine.settings, torch.device("cpu"), torch.float32)
    weights = make_video_lora(video_model, tmp_path / "video-style")
    engine.store.add_style("drift", str(weights), family="ltx-video")
    clip = {"motion": "video", "video_seconds": 2.0, "video_fps": 8, "video_style": "drift"}
    params = build_params(engine.settings, engine.store, "a kite rises", frames=3, seed=7, **FAST, **clip)
    steps: list[StepProgress] = []
    job = engine.create_job(params)
    events = list(engine.run_to_end(job, on_step=steps.append))
    assert isinstance(events[-1], Finished), events[-1]
    assert any(step.frame_index == 3 for step in steps)  # the video model's steps came back as frame N's
    remote_clip = [sha(p) for p in clip_paths(engine.job_dir(job))]
    assert len(remote_clip) == 17 and (engine.job_dir(job) / "animation.mp4").is_file()
    assert any(sha(weights) in info["fetched"] for info in pool.wait_ready())  # the style travelled
    # In-process, the same recipe: the same keyframes and the same clip, byte for byte.
    shared_tiny_models.use_style(None)
    local = Engine(dataclasses.replace(engine.settings, ray_address=""), engine.store, models=shared_tiny_models)
    copy = local.create_from_recipe(params, engine.store.frames(job))
    again = list(local.run_to_end(copy))
    assert isinstance(again[-1], Finished), again[-1]
    assert [sha(p) for p in clip_paths(local.job_dir(copy))] == remote_clip
    assert [sha(p) for p in again[-1].frame_paths] == [sha(p) for p in events[-1].frame_paths]
