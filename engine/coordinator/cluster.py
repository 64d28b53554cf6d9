"""Cluster mode: one renderer per GPU, each in a Ray actor, on this machine or several.

Imported only when EMAKI_RAY_ADDRESS is set (engine.coordinator.worker.Engine.renderers), so the default install
and the in-process mode never import Ray. The coordinator (the bot or CLI process) keeps the store,
the story teller and the fair queue; an actor gets a `Recipe` and streams back `StepProgress` and
`FrameRendered` events (frames as PNG bytes) through a Ray streaming generator, which the coordinator
writes to the store as they arrive.

Files travel by content: a style (or a training dataset) is put in Ray's object store once per
content hash, and each worker fetches it only when its own cache (`<cache>/<sha256>/<name>`) lacks it,
so a style registered after the workers started reaches a worker on a machine that never had the file.

Failure: an actor that dies mid-job (its process killed, its node lost) surfaces here as a
RayActorError; the pool raises WorkerLost, the coordinator puts the job back in front of the queue
(it resumes at its first missing frame, on whichever worker is free) and Ray restarts the actor
(`max_restarts`), which loads its models again before it takes the next job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from engine.coordinator.store import Store, now
from engine.errors import ModelLoadError, ResourceError
from engine.events import StepProgress
from engine.render.renderer import ContentCache, FrameRendered, Recipe, Renderer, WorkerLost, content_hash, pack
from engine.settings import Settings

log = logging.getLogger(__name__)

# Work other than rendering, run on a worker: (worker settings, its file cache, payload, flagged) -> events.
Task = Callable[[Settings, ContentCache, Any, Callable[[str], bool]], Iterator[Any]]
MAX_RESTARTS = -1  # Ray restarts a dead renderer actor as often as it dies; each restart reloads the models
RESTART_WAIT_S = 600.0  # how long a restarting actor may take to come back (loading sd15 from disk)
# Steps travel in batches: sent with the frame that ends them, or once this long has passed since the
# last batch (the CLI's step bar, a cancel noticed). One remote round trip per frame, not one per step.
STEP_BATCH_S = 0.5


def connect(settings: Settings) -> None:
    """Join (or, for `local`, start) the Ray cluster named by the settings; a process that already
    called ray.init (the tests, the benchmark) keeps its own. Any failure is one ResourceError line."""
    if ray.is_initialized():
        return
    # Ray Client announces at INFO which init() arguments it forwards: noise before a one-line error.
    logging.getLogger("ray.client_builder").setLevel(logging.WARNING)
    try:
        if settings.ray_address == "local":
            ray.init()  # this machine's CPUs and GPUs, detected by Ray
        else:
            ray.init(address=settings.ray_address)
    except Exception as exc:  # ConnectionError (no cluster), ValueError/ImportError (ray:// without the client)
        raise ResourceError(
            f"could not join the Ray cluster at EMAKI_RAY_ADDRESS={settings.ray_address}: {_one_line(exc)}"
        ) from exc


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def death_reason(exc: RayActorError) -> str:
    """Why an actor died, in one line: the error its start-up raised (a model that would not load, the
    usual case on a worker whose cache lacks the models), else Ray's own first line."""
    text = str(exc)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.split(":", 1)[0].endswith(("Error", "Exception")) and not line.startswith("ray."):
            return line[:300]
    return _one_line(exc)


def worker_settings(settings: Settings) -> Settings:
    """What a renderer actor is given: no secrets (a worker neither talks to Discord nor asks the LLM,
    and loading models never downloads), no cluster fields, and the device Ray assigned (`num_gpus=1`
    makes the actor's one GPU `cuda:0`)."""
    return dataclasses.replace(
        settings,
        discord_token="",
        hf_token="",
        llm_api_key="",
        ray_address="",
        gpu_workers=0,
        device="auto",
    )


def default_cache_dir() -> Path:
    """On a worker: beside its own data dir (EMAKI_DATA_DIR in the worker's image), else the user's cache."""
    base = os.environ.get("EMAKI_DATA_DIR")
    return (Path(base) if base else Path("~/.cache/emaki")).expanduser() / "worker-cache"


class RendererWorker:
    """The actor body: one warm Renderer on the actor's GPU. `render` runs in the default concurrency
    group (one at a time); `cancel` and `describe` in their own, so they answer while a job renders."""

    def __init__(self, settings: Settings, cache_dir: str | None, load: Callable[[Settings], Renderer] | None) -> None:
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache = ContentCache(root, fetch=ray.get)
        self.settings = dataclasses.replace(settings, data_dir=root / "data")
        # `load` lets the benchmark swap the models for a stated stand-in; everything else is the real path.
        self.renderer = load(self.settings) if load else Renderer(self.settings, cache=self.cache).load()
        self.renderer.cache = self.cache
        self.cancelled: set[int] = set()
        self.flags: set[str] = set()  # raised by the coordinator during run_task ("yield", "stop")

    def render(self, recipe: Recipe) -> Iterator[list[StepProgress | FrameRendered]]:
        """The recipe's events in batches (see STEP_BATCH_S): each yielded value is one round trip."""
        self.cancelled.discard(recipe.job_id)
        events = self.renderer.render(recipe, cancelled=lambda: recipe.job_id in self.cancelled)
        yield from batches(events, lambda event: isinstance(event, FrameRendered), STEP_BATCH_S)

    def run_task(self, task: Task, payload: Any) -> Iterator[Any]:
        """Other GPU work through the same seam (a training): `task(settings, cache, payload, flagged)`
        is a module-level function of the caller's package (engine imports no trainer), streaming its
        events back; `flagged(name)` reads the flags the coordinator raised (`flag`)."""
        self.flags = set()
        yield from task(self.settings, self.cache, payload, lambda name: name in self.flags)

    def load_motion(self) -> None:
        """Load the motion adapter now (motion mode asked for): one that cannot load fails here."""
        self.renderer.models.motion_renderer()

    def load_video(self) -> None:
        """Load the video model now (video mode asked for): one that cannot load fails here. A video job's
        clip comes back on its last keyframe's FrameRendered (`clip`, PNG bytes), like any frame."""
        self.renderer.video()

    @ray.method(concurrency_group="control")
    def flag(self, name: str) -> None:
        self.flags.add(name)

    @ray.method(concurrency_group="control")
    def cancel(self, job_id: int) -> None:
        self.cancelled.add(job_id)

    @ray.method(concurrency_group="control")
    def describe(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {
            "node": ray.util.get_node_ip_address(),
            "gpu": ",".join(str(g) for g in ray.get_gpu_ids()) or "-",
            "pid": os.getpid(),
            "restarted": bool(context.was_current_actor_reconstructed),
            "fetched": list(self.cache.fetched),
            "cache_dir": str(self.cache.root),
        }


class RayRenderers:
    """The coordinator's side: a pool of renderer actors. `frames` blocks the calling thread (one of the
    bot's executor threads, one per actor) until an actor is free, then streams its events."""

    remote = True  # actors may be on other machines: files travel by content hash, training via run_task

    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        workers: int = 0,
        cache_dir: str | None = None,
        load: Callable[[Settings], Renderer] | None = None,
    ) -> None:
        connect(settings)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or settings.gpu_workers or gpus
        if count < 1:
            raise ResourceError(
                "the Ray cluster has no GPU for a renderer: start workers with `ray start --address=... "
                "--num-gpus=N`, or set EMAKI_GPU_WORKERS"
            )
        if count > gpus:  # an actor with num_gpus=1 that no GPU can host would wait forever
            raise ResourceError(
                f"EMAKI_GPU_WORKERS={count} renderers asked for, but the Ray cluster has {gpus} GPU(s): "
                "lower it, or add GPU workers with `ray start --address=... --num-gpus=N`"
            )
        actor = ray.remote(concurrency_groups={"control": 2})(RendererWorker).options(
            num_gpus=1,
            num_cpus=0,  # the GPU is what a renderer holds; CPU is not what limits how many fit
            max_restarts=MAX_RESTARTS,
            max_task_retries=0,  # a lost job is resumed by the coordinator from its frames, not replayed
        )
        shipped = worker_settings(settings)
        self.actors = [actor.remote(shipped, cache_dir, load) for _ in range(count)]
        self.store = store
        self._free: queue.Queue[int] = queue.Queue()
        for index in range(count):
            self._free.put(index)
        self._described = [False] * count
        self._shared: dict[str, Any] = {}  # content hash -> ObjectRef (kept alive by this dict)
        self._lock = threading.Lock()
        if store is not None:
            store.clear_workers()  # rows of a previous run describe actors that are gone
            for index in range(count):
                self._record(index, "starting")

    @property
    def slots(self) -> int:
        return len(self.actors)

    def wait_ready(self) -> list[dict[str, Any]]:
        """Block until every actor has loaded its models; what each says about itself. An actor that
        cannot start (its models missing from that machine's cache) is one ModelLoadError line."""
        try:
            infos = [_describe(actor) for actor in self.actors]
        except RayActorError as exc:
            raise ModelLoadError(f"a renderer could not start: {death_reason(exc)}") from exc
        for index, info in enumerate(infos):
            self._described[index] = True
            self._record(index, "idle", info=info)
        return infos

    def warm(self) -> None:
        self.wait_ready()

    def check_motion(self) -> None:
        """Every worker loads the motion adapter (a job in motion mode may land on any of them)."""
        for actor in self.actors:
            _get(actor.load_motion.remote())

    def check_video(self) -> None:
        """Every worker loads the video model (a video job may land on any of them)."""
        for actor in self.actors:
            _get(actor.load_video.remote())

    def share(self, path: Path) -> tuple[str, Any]:
        """Put a file's (or folder's) content in the object store once per content hash."""
        sha256 = content_hash(path)
        with self._lock:
            if sha256 not in self._shared:
                self._shared[sha256] = ray.put(pack(path))
            return sha256, self._shared[sha256]

    def frames(
        self, recipe: Recipe, cancelled: Callable[[], bool], on_step: Callable[[StepProgress], None] | None
    ) -> Iterator[FrameRendered]:
        with self._checkout(recipe.job_id) as actor:
            cancel_sent = False
            for ref in actor.render.remote(recipe):
                if cancelled() and not cancel_sent:
                    actor.cancel.remote(recipe.job_id)  # it stops at its next step and raises JobCancelled
                    cancel_sent = True
                for event in _get(ref):
                    if isinstance(event, StepProgress):
                        if on_step is not None:
                            on_step(event)
                    else:
                        yield event

    def run_task(
        self, task: Task, payload: Any, flags: Callable[[], set[str]], job_id: int | None = None
    ) -> Iterator[Any]:
        """`task` on a free actor (see RendererWorker.run_task), its events as they come. `flags()` is
        polled at each event; a flag it names is raised on the actor once (e.g. "yield", "stop")."""
        with self._checkout(job_id, "training") as actor:
            raised: set[str] = set()
            for ref in actor.run_task.remote(task, payload):
                for name in flags() - raised:
                    actor.flag.remote(name)
                    raised.add(name)
                yield _get(ref)

    @contextlib.contextmanager
    def _checkout(self, job_id: int | None, state: str = "busy") -> Iterator[Any]:
        """A free actor for one job (blocking until one is), back in the pool afterwards; its death
        while in use becomes WorkerLost."""
        index = self._free.get()
        actor = self.actors[index]
        lost = False
        try:
            # Asked before every job, not only the first after a restart this pool saw: an actor that
            # died while idle (its node lost with the busy one) is restarting unnoticed, and a job
            # handed to it would fail at once ("The actor is restarting") and count as a loss it never
            # had. `describe` answers once the actor is up with its models loaded, so the loss count
            # holds only renderers lost during the job's own render.
            info = _describe(actor)
            if not self._described[index]:
                self._record(index, "idle", info=info)
                self._described[index] = True
            self._record(index, state, job_id)
            yield actor
        except RayActorError as exc:
            lost = True
            self._described[index] = False
            self._record(index, "lost", job_id)
            raise WorkerLost(f"renderer {index} died: {death_reason(exc)}") from exc
        finally:
            if not lost:
                self._record(index, "idle")
            self._free.put(index)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.store is not None:
            self.store.clear_workers()

    def _record(self, index: int, state: str, job_id: int | None = None, info: dict[str, Any] | None = None) -> None:
        if self.store is None:
            return
        fields: dict[str, Any] = {"state": state, "job_id": job_id, "updated_at": now()}
        if info is not None:
            fields.update(node=info["node"], gpu=info["gpu"])
        self.store.put_worker(f"renderer-{index}", **fields)


def batches(events: Iterator[Any], ends_batch: Callable[[Any], bool], every_s: float) -> Iterator[list[Any]]:
    """The events in lists, in order: a list ends at an event `ends_batch` says ends one, or at the first
    event `every_s` seconds or more after the last list went; nothing is held back at the end."""
    batch: list[Any] = []
    sent = time.monotonic()
    for event in events:
        batch.append(event)
        if ends_batch(event) or time.monotonic() - sent >= every_s:
            yield batch
            batch = []
            sent = time.monotonic()
    if batch:
        yield batch


def _describe(actor: Any) -> dict[str, Any]:
    """The actor's description, once it is up: a restarting actor answers only after its models loaded,
    and Ray refuses calls for a moment while it restarts (ActorUnavailableError), so those are retried."""
    deadline = time.monotonic() + RESTART_WAIT_S
    while True:
        try:
            return ray.get(actor.describe.remote(), timeout=max(deadline - time.monotonic(), 1.0))
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        except GetTimeoutError as exc:  # never placed (its node gone) or loading for too long
            raise ResourceError(f"a renderer did not come up within {RESTART_WAIT_S:.0f} s") from exc


def _get(ref: Any) -> Any:
    """ray.get, with an error raised inside the actor re-raised as itself (JobCancelled, InvalidRequest,
    ModelLoadError...), so the coordinator handles it exactly as an in-process one."""
    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception) and not isinstance(cause, RayActorError):
            raise cause from None
        raise
