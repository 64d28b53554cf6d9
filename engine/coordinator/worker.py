"""The coordinator: runs one animation job: plan (story, seeds) -> frames (`run`, the GPU part, done
by a renderer), then the GIF (`finish`, CPU only, so it can overlap the next job's rendering).

The renderer (engine/render/renderer.py) never sees the store: `run` hands it a recipe (frame plans, the frames
to keep, the style by content hash) and writes each frame it sends back as it arrives. In-process mode
drives one renderer on the calling thread; cluster mode (EMAKI_RAY_ADDRESS, engine/coordinator/cluster.py) sends
the recipe to one of several Ray actors, and a job whose actor died goes back to the queue.

Everything needed to reproduce a frame is in its row before it is rendered. A job interrupted by a
crash resumes at its first frame without a file; a regeneration job starts with the parent's frames
before k already copied, so the same `run` serves new, resumed and regenerated jobs. While a process
renders a job it holds the job's lock file, which is how a `running` row left by a kill is told apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from PIL import Image

from engine.coordinator import guild_settings
from engine.coordinator.job_files import holding_job_lock, job_dir
from engine.coordinator.retention import purged_reason
from engine.coordinator.safety import screen_frame
from engine.coordinator.store import Store, StoreError, now
from engine.coordinator.story import StoryTeller
from engine.errors import EmakiError, InvalidRequest, JobCancelled, ResourceError
from engine.events import Event, Failed, Finished, FrameDone, Requeued, Started, StepProgress, StoryReady
from engine.params import AnimationParams
from engine.render import video
from engine.render.animate import FramePlan, frame_seed
from engine.render.interpolate import Inbetweener, warping_error
from engine.render.media import encode_gif, encode_mp4, fit_mp4
from engine.render.models import Models, StyleRef
from engine.render.motion import clip_images as motion_clip_images
from engine.render.motion import save_inbetweens
from engine.render.renderer import LocalRenderers, Recipe, Renderer, Renderers, StyleSpec, WorkerLost, png_decode
from engine.settings import MAX_SEED, Settings

log = logging.getLogger(__name__)


STORY_BLOCKED_REASON = (
    "the story written for this idea used words this server's blocklist does not allow, so nothing was "
    "rendered or posted; try another idea"
)
MAX_WORKER_LOSSES = 3  # renderers a job may lose (cluster mode) before it fails instead of queueing again
STORY_FILE = "story.json"  # in the job folder: the story teller's raw answers
METRICS_FILE = "metrics.json"  # in the job folder: the clip's frame count, timing and warping error
MP4_FILE = "animation.mp4"  # in the job folder: video mode's result (the bot's MP4 button reuses the name)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file and rename, so a crash never leaves a half file that looks like a result.
    A write the disk refuses (full) takes its half temp file away: it would hold the space freed for a resume."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


# A full disk, a full quota, a file system remounted read-only: the machine's state, not a bug.
DISK_ERRNOS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space", errno.EROFS: "make it writable"}


def disk_error(exc: BaseException, hint: str = "") -> ResourceError | None:
    """The one line for an OSError the disk caused (None for any other error); `hint` says how to go on."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_ERRNOS:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return ResourceError(f"{os.strerror(exc.errno)}{where}: {DISK_ERRNOS[exc.errno]}{hint}")


@contextlib.contextmanager
def disk_errors_as_one_line(hint: str = "") -> Iterator[None]:
    """OSErrors of a full or read-only disk as ResourceError (one line at every front door)."""
    try:
        yield
    except OSError as exc:
        error = disk_error(exc, hint)
        if error is None:
            raise
        raise error from None


class Engine:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        models: Models | None = None,
        story: StoryTeller | None = None,
        renderers: Renderers | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.models = models or Models(settings)
        self.story = story or StoryTeller(settings)
        self._renderers = renderers
        # Set when the process is asked to stop (SIGTERM): the running job stops at its next step and
        # its row stays `running`, exactly as after a crash, so the next start resumes it.
        self.stopping = threading.Event()

    @property
    def renderers(self) -> Renderers:
        """Who renders: one in-process renderer over `self.models` (default), or Ray actors when
        EMAKI_RAY_ADDRESS is set. Made on first use, so commands that never render never start Ray."""
        if self._renderers is None:
            if self.settings.ray_address:
                self._renderers = cluster_renderers(self.settings, self.store)
            else:
                self._renderers = LocalRenderers(Renderer(self.settings, self.models))
        return self._renderers

    @property
    def slots(self) -> int:
        """How many jobs can render at once (one per renderer)."""
        return self.renderers.slots

    def warm(self) -> None:
        """Load the models before the first job: in-process here, or wait until every actor has."""
        self.renderers.warm()

    def close(self) -> None:
        if self._renderers is not None:
            self._renderers.close()

    def job_dir(self, job_id: int) -> Path:
        return job_dir(self.settings, job_id)

    # --- creating jobs (rows first, so nothing is acknowledged before it is durable) ----------
    def create_job(self, params: AnimationParams, **owner: Any) -> int:
        return self.store.add_job(kind="animate", idea=params.idea, params=params.to_dict(), **owner)

    def create_from_recipe(self, params: AnimationParams, frames: list[dict[str, Any]], **owner: Any) -> int:
        """A new job whose every frame recipe (prompt, seed, strength, steps, guidance, style) is given,
        as a sidecar records them: no story is asked for, so the same models render the same frames."""
        if len(frames) != params.frames or [f["idx"] for f in frames] != list(range(params.frames)):
            raise InvalidRequest(f"the recipe must list frames 0..{params.frames - 1} once each")
        job_id = self.create_job(params, **owner)
        for frame in frames:
            recipe = {k: frame[k] for k in ("prompt", "seed", "strength", "steps", "guidance", "style")}
            self.store.put_frame(job_id, frame["idx"], **recipe, path="")
        return job_id

    def create_regeneration(
        self, parent_id: int, from_index: int, reseed_all: bool = False, seed: int | None = None, **owner: Any
    ) -> int:
        """A new job that keeps the parent's frames before `from_index` byte-for-byte, gives frame
        `from_index` a new seed (`seed` when given) and re-chains the frames after it (with their
        recorded seeds, or new ones too with `reseed_all`: a reroll)."""
        parent = self.store.job(parent_id)
        purged = purged_reason(parent) if parent is not None else None
        if purged:  # the retention sweep took its frames: say so, not "file not found"
            raise InvalidRequest(purged)
        frames = self.store.frames(parent_id)
        if parent is None or parent["status"] != "done" or len(frames) != parent["params"]["frames"]:
            raise InvalidRequest(f"job {parent_id} has no finished animation to regenerate from")
        if not 0 <= from_index < len(frames):
            raise InvalidRequest(f"frame {from_index + 1} does not exist: this animation has {len(frames)} frames")
        if not all(row["path"] and Path(row["path"]).is_file() for row in frames[:from_index]):
            raise InvalidRequest(frames_gone(parent_id))
        params = parent["params"]
        if reseed_all and params.get("motion") == "video":  # a reroll: new clip noise too (engine/render/video.py)
            params = {**params, "clip_seed": secrets.randbelow(MAX_SEED)}
        job_id = self.store.add_job(
            kind="animate",
            idea=parent["idea"],
            params=params,
            parent_job_id=parent_id,
            regen_from=from_index,
            **owner,
        )
        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        for row in frames:
            row = dict(row, job_id=job_id)
            if row["idx"] < from_index:
                target = job_dir / Path(row["path"]).name
                try:
                    shutil.copyfile(row["path"], target)
                except OSError as exc:  # deleted between the check and the copy (a sweep, by hand)
                    # The row exists already: it must not stay queued, render something nobody asked
                    # for and count against the member's cap.
                    self.store.update_job(job_id, status="failed", error=f"the parent's frames went away: {exc}")
                    shutil.rmtree(job_dir, ignore_errors=True)
                    raise InvalidRequest(frames_gone(parent_id)) from exc
                row["path"] = str(target)
            else:
                row["path"] = ""
                if row["idx"] == from_index and seed is not None:
                    row["seed"] = seed
                elif row["idx"] == from_index or reseed_all:
                    row["seed"] = frame_seed(parent["params"]["seed"], row["idx"], reroll=job_id)
            self.store.put_frame(job_id, row["idx"], **{k: v for k, v in row.items() if k not in ("job_id", "idx")})
        return job_id

    # --- running ------------------------------------------------------------------------------
    def run(
        self, job_id: int, cancel: threading.Event | None = None, on_step: Callable[[StepProgress], None] | None = None
    ) -> Iterator[Event]:
        """Render a job's frames, yielding events; ends after the last FrameDone, or with Failed.
        Never raises for job errors. Call `finish` afterwards for the GIF."""
        asked = cancel.is_set if cancel is not None else (lambda: False)

        def cancelled() -> bool:
            return asked() or self.stopping.is_set()

        with holding_job_lock(self.settings.data_dir, job_id) as mine:
            if not mine:
                # Another process renders it and will write its end: the row must read `running`,
                # never `queued`, or a queue would pick it again at once.
                self.store.update_job(job_id, status="running")
                yield Failed(job_id, f"job {job_id} is being rendered by another process")
                return
            self.store.update_job(job_id, status="running", started_at=now(), error=None)
            yield Started(job_id)
            yield from self._run_guarded(job_id, cancelled, on_step, asked)

    def _run_guarded(
        self,
        job_id: int,
        cancelled: Callable[[], bool],
        on_step: Callable[[StepProgress], None] | None,
        asked: Callable[[], bool] = lambda: False,
    ) -> Iterator[Event]:
        try:
            yield from self._run(job_id, cancelled, on_step)
        except JobCancelled:
            if self.stopping.is_set() and not asked():  # the process stops, not the owner: resumable
                yield Requeued(job_id, "the process is stopping; the job resumes at the next start")
                return
            self.store.update_job(job_id, status="cancelled", finished_at=now(), error="cancelled")
            yield Failed(job_id, "cancelled")
        except WorkerLost as exc:
            yield self._worker_lost(job_id, exc, asked())
        except StoreError as exc:  # the database refused a write mid-job (a full disk): the frames stay
            reason = f"{exc}, then resume job {job_id}"
            self._record_failure(job_id, reason)
            yield Failed(job_id, reason)
        except EmakiError as exc:
            self._record_failure(job_id, str(exc))
            yield Failed(job_id, str(exc))
        except Exception as exc:  # one bad job must not stop the queue
            full = disk_error(exc, f", then resume job {job_id}")
            if full is not None:  # the machine's fault, not the job's: one line, and it stays resumable
                self._record_failure(job_id, str(full))
                yield Failed(job_id, str(full))
                return
            log.exception("job %s failed", job_id)
            reason = f"internal error ({type(exc).__name__}); the admin can find details in the bot's log"
            self._record_failure(job_id, reason, error=f"{type(exc).__name__}: {exc}")
            yield Failed(job_id, reason)

    def _record_failure(self, job_id: int, reason: str, error: str | None = None) -> None:
        """Mark the job failed. On a full or read-only disk the row may not take the write either:
        the job then stays `running` with its lock released, which `emaki jobs` shows as interrupted
        and `emaki resume` (or the bot's restart) continues; the reason still reaches the person."""
        try:
            self.store.update_job(job_id, status="failed", finished_at=now(), error=error or reason)
        except StoreError as exc:
            log.warning("job %s: could not record its failure (%s): %s", job_id, reason, exc)

    def _worker_lost(self, job_id: int, exc: WorkerLost, cancelled: bool) -> Requeued | Failed:
        """A renderer died under the job. Not the job's fault the first times: it goes back in front
        of the queue and resumes where it stopped. A job asked to stop stays stopped, and one that has
        lost its renderer MAX_WORKER_LOSSES times fails with the last reason (a worker that dies at
        every start, or a job that kills its worker, must not loop for ever)."""
        if cancelled:
            self.store.update_job(job_id, status="cancelled", finished_at=now(), error="cancelled")
            return Failed(job_id, "cancelled")
        losses = ((self.store.job(job_id) or {}).get("worker_losses") or 0) + 1
        if losses >= MAX_WORKER_LOSSES:
            reason = f"its renderer was lost {losses} times; the last: {exc}"
            self.store.update_job(job_id, status="failed", finished_at=now(), error=reason, worker_losses=losses)
            return Failed(job_id, reason)
        log.warning("job %s lost its renderer (%s); queued again", job_id, exc)
        self.store.update_job(job_id, status="queued", resume_first=1, error=None, worker_losses=losses)
        return Requeued(job_id, str(exc))

    def _check_disk(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.settings.data_dir).free
        if free < self.settings.min_free_bytes:
            raise ResourceError(
                f"only {free // 2**20} MiB free in {self.settings.data_dir}; "
                f"at least {self.settings.min_free_bytes // 2**20} MiB are needed"
            )

    def _style(self, name: str, style_id: str = "") -> StyleRef | None:
        """The style the job was asked with. A job holds it by identity (`style_id`, the row's uid when
        it was queued): a row of that name registered since (another server's, or new weights) is not
        it, and the job fails rather than render with weights nobody chose. Jobs from before uids
        (no `style_id`) go by name, as they always did."""
        if not name:
            return None
        row = self.store.style(name)
        if row is None:
            raise InvalidRequest(f"unknown style '{name}': it was removed after the job was queued")
        if style_id and row.get("uid") != style_id:
            raise InvalidRequest(
                f"the style '{name}' was removed or replaced after the job was queued: ask again to use the current one"
            )
        return StyleRef(
            name=row["name"],
            path=row["path"],
            trigger=row["trigger"] or "",
            weight=row["weight"] or 1.0,
            adapter=row["adapter"] or "lora",
        )

    def _style_spec(self, style: StyleRef | None) -> StyleSpec | None:
        """The style as a renderer receives it: by name and content hash, with a handle to its bytes
        for a renderer that does not share this machine's data dir."""
        if style is None:
            return None
        path = Path(style.path)
        if not path.exists():
            raise InvalidRequest(f"style '{style.name}': its weights file {path} is missing")
        sha256, blob = self.renderers.share(path)
        return StyleSpec(
            style.name, sha256, path.name, style.trigger, style.weight, style.adapter, str(path), blob, path.is_dir()
        )

    def _screen_story(self, job: dict[str, Any], plans: list[FramePlan]) -> None:
        """The server's blocklist over the frame prompts the story LLM wrote: the member's idea passed
        it when the job was asked for, but the LLM may write a blocked word on its own. The reason
        names no prompt and no entry (the status message is public)."""
        if job.get("guild_id") is None:
            return
        blocklist = guild_settings.load(self.store, job["guild_id"]).blocked
        if any(blocklist.first_match(plan.prompt) is not None for plan in plans):
            log.info("job %s: the story's prompts hit the server's blocklist; nothing rendered", job["id"])
            raise InvalidRequest(STORY_BLOCKED_REASON)

    def _plan(self, job_id: int, params: AnimationParams, style: StyleRef | None) -> tuple[list[FramePlan], str]:
        rows = self.store.frames(job_id)
        if len(rows) != params.frames:  # new job: ask the story teller, record every frame's recipe
            story = self.story.tell(params.idea, params.frames, style.trigger if style else "")
            prompts, source = story.frames, story.source
            # The LLM's raw answers (first and refine turn), for the sidecar: the frames alone do not
            # say whether the refine turn changed anything.
            self.job_dir(job_id).mkdir(parents=True, exist_ok=True)
            write_atomic(self.job_dir(job_id) / STORY_FILE, json.dumps(story.record(), indent=2).encode())
            for i, prompt in enumerate(prompts):
                self.store.put_frame(
                    job_id,
                    i,
                    prompt=prompt,
                    seed=frame_seed(params.seed, i),
                    strength=params.strength,
                    steps=params.steps,
                    guidance=params.guidance,
                    style=params.style,
                    path="",
                )
            rows = self.store.frames(job_id)
        else:
            source = "recorded"
        plans = [FramePlan(r["idx"], r["prompt"], r["seed"], r["strength"], r["steps"], r["guidance"]) for r in rows]
        return plans, source

    def _run(
        self, job_id: int, cancelled: Callable[[], bool], on_step: Callable[[StepProgress], None] | None
    ) -> Iterator[Event]:
        job = self.store.job(job_id)
        if job is None:
            raise InvalidRequest(f"job {job_id} does not exist")
        params = AnimationParams.from_dict(job["params"])
        self._check_disk()
        style = self._style(params.style, params.style_id)
        plans, source = self._plan(job_id, params, style)
        self._screen_story(job, plans)  # before StoryReady: a status message may list the prompts
        yield StoryReady(job_id, [p.prompt for p in plans], source)

        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        rows = self.store.frames(job_id)
        done = [r for r in rows if r["path"] and Path(r["path"]).exists()]
        start = len(done) if [r["idx"] for r in done] == list(range(len(done))) else 0
        kept = [Path(r["path"]).read_bytes() for r in rows[:start]]
        images: list[Image.Image] = [png_decode(data) for data in kept]
        for i, image in enumerate(images):  # frames kept from a parent or an interrupted run
            yield FrameDone(job_id, i, params.frames, image, Path(rows[i]["path"]))

        video_style = self._style(params.video_style, params.video_style_id)  # the video model's (video mode)
        recipe = Recipe(job_id, job["params"], plans, kept, self._style_spec(style), self._style_spec(video_style))
        for rendered in self.renderers.frames(recipe, cancelled, on_step):
            index, image = rendered.index, rendered.image()
            screen_frame(
                self, job, image
            )  # engine/coordinator/safety.py: a flagged frame ends the job, its files deleted
            path = job_dir / f"frame_{index + 1:02d}.png"
            # Video mode's clip rides on the last keyframe: written (screened) before that keyframe's file,
            # so a job whose last keyframe is on disk has its clip too (a resumed job starts from there).
            if rendered.clip:
                plan = video.plan_clip(params, [p.prompt for p in plans], self.settings)
                record = video.clip_record(plan, self.settings, recipe.video_style)
                video.save_clip(image, job_dir, record, screen=lambda frame: screen_frame(self, job, frame))
            write_atomic(path, rendered.png)  # the renderer's own PNG bytes: identical on every worker
            # Motion mode: the clip frames up to the next beat, screened like the frame (none in chain mode).
            save_inbetweens(image, path, screen=lambda frame: screen_frame(self, job, frame))
            self.store.put_frame(job_id, index, path=str(path))
            images.append(image)
            yield FrameDone(job_id, index, params.frames, image, path)

    def finish(self, job_id: int) -> Finished | Failed:
        """Encode the GIF of a fully rendered job and mark it done. CPU only: safe to run on another
        thread while the next job renders."""
        job = self.store.job(job_id)
        rows = self.store.frames(job_id)
        if job is None or not rows or not all(r["path"] and Path(r["path"]).exists() for r in rows):
            return Failed(job_id, "the job has no complete set of frames")
        try:
            images, frame_ms = clip_images(self.settings, job, rows)
            gif_path = self.job_dir(job_id) / "animation.gif"
            write_atomic(gif_path, encode_gif(images, duration_ms=frame_ms))
            metrics = {"clip_frames": len(images), "frame_ms": frame_ms, "warping_error": warping_error(images)}
            params = AnimationParams.from_dict(job["params"])
            if params.motion == "video":  # the MP4 is the result: fitted under the upload cap (bitrate, then size)
                try:
                    data, fitted = fit_mp4(images, params.video_fps, self.settings.upload_limit_bytes)
                except InvalidRequest:  # no size fits the cap: the rendered clip is kept all the same, and the
                    # job done (a failed one could not be redone); the CLI writes it, the bot's post says why.
                    data, fitted = encode_mp4(images, params.video_fps), {"scale": 1.0, "kbps": 0}
                    metrics["mp4_over_cap"] = 1
                write_atomic(self.job_dir(job_id) / MP4_FILE, data)
                metrics |= {"fps": params.video_fps, "mp4_bytes": len(data), "mp4_scale": fitted["scale"]}
                metrics |= {"mp4_kbps": fitted["kbps"], "gif_bytes": gif_path.stat().st_size}
            write_atomic(self.job_dir(job_id) / METRICS_FILE, json.dumps(metrics, indent=2).encode())
        except EmakiError as exc:  # the clip's frames gone, or no MP4 fits the cap
            self._record_failure(job_id, str(exc))
            return Failed(job_id, str(exc))
        except OSError as exc:
            full = disk_error(exc, f", then resume job {job_id}")
            reason = str(full) if full is not None else f"could not write the animation: {exc}"
            self._record_failure(job_id, reason)
            return Failed(job_id, reason)
        self.store.update_job(job_id, status="done", finished_at=now(), gif_path=str(gif_path))
        return Finished(job_id, gif_path, [Path(r["path"]) for r in rows])

    def run_to_end(
        self, job_id: int, cancel: threading.Event | None = None, on_step: Callable[[StepProgress], None] | None = None
    ) -> Iterator[Event]:
        """`run` then `finish`, one after the other: for the CLI and tests. A job whose renderer died
        is run again at once (this caller's queue is this one job); `run` fails it after
        MAX_WORKER_LOSSES losses, so this ends."""
        while True:
            for event in self.run(job_id, cancel, on_step):
                yield event
                if isinstance(event, Failed):
                    return
                if isinstance(event, Requeued):
                    break
            else:
                yield self.finish(job_id)
                return


def clip_images(settings: Settings, job: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[Image.Image], int]:
    """The frames a clip shows, in-betweens included, and how long each shows (ms). In-betweens are
    cached by the content of their two keyframes, so a redone keyframe recomputes only its pairs."""
    params = AnimationParams.from_dict(job["params"])
    if params.motion == "video":  # the video model's clip, in the job folder
        return video.clip_images(params, job_dir(settings, job["id"]))
    if params.motion != "chain":  # the motion model rendered the in-betweens; they lie beside the keyframes
        return motion_clip_images(params, rows)
    keyframes = [Image.open(r["path"]).convert("RGB") for r in rows]
    if not params.interpolate:
        return keyframes, params.frame_duration_ms
    inbetweener = Inbetweener(params.interpolate, cache_dir=settings.data_dir / "inbetweens")
    return inbetweener.sequence(keyframes), params.clip_frame_ms


def cluster_renderers(settings: Settings, store: Store | None = None) -> Renderers:
    """Ray renderer actors for EMAKI_RAY_ADDRESS (ray imported only here: in-process mode never does)."""
    try:
        from engine.coordinator.cluster import RayRenderers
    except ImportError as exc:
        raise ResourceError(
            f'EMAKI_RAY_ADDRESS={settings.ray_address} needs Ray: pip install -c requirements.lock -e ".[cluster]"'
        ) from exc
    return RayRenderers(settings, store)


def frames_gone(job_id: int) -> str:
    return f"job {job_id}'s frames are no longer on disk: start a new animation"


def job_record(settings: Settings, job_id: int, name: str) -> dict[str, Any]:
    """A JSON file the engine wrote beside a job's frames (STORY_FILE, METRICS_FILE), or {}."""
    path = job_dir(settings, job_id) / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


async def stream_job(
    engine: Engine,
    executor: Executor,
    job_id: int,
    cancel: threading.Event | None = None,
    steps: Callable[[StepProgress], bool] | None = None,
) -> AsyncIterator[Event]:
    """Run `engine.run` on the executor's thread and yield its events on the event loop as they
    happen, so the loop keeps serving while frames render. The denoising steps `steps` picks are
    yielded too (none by default: a step is far more frequent than anything a status message shows)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event | None] = asyncio.Queue()

    def on_step(progress: StepProgress) -> None:
        if steps is not None and steps(progress):
            loop.call_soon_threadsafe(events.put_nowait, progress)

    def pump() -> None:
        try:
            for event in engine.run(job_id, cancel, on_step if steps is not None else None):
                loop.call_soon_threadsafe(events.put_nowait, event)
        finally:
            loop.call_soon_threadsafe(events.put_nowait, None)

    rendering = loop.run_in_executor(executor, pump)
    try:
        while (event := await events.get()) is not None:
            yield event
    finally:
        await rendering
