"""The renderer: models in, frames out. It never touches the store or Discord.

The coordinator (engine.coordinator.worker.Engine) reads the store, asks the story teller, records every frame's
recipe and then hands a `Recipe` to a renderer: the frame plans, the frames to keep (as PNG bytes) and
the style by name and content hash. The renderer yields plain, picklable events (`FrameRendered` with
the frame as PNG bytes, `StepProgress`), which the coordinator writes as they arrive. Because nothing
here holds a path into the coordinator's data dir or a database handle, the same class runs in the
bot's worker thread (in-process mode, the default) and inside a Ray actor on another machine
(engine/coordinator/cluster.py), with bot and CLI unchanged.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from engine.errors import InvalidRequest
from engine.events import StepProgress
from engine.params import AnimationParams
from engine.render.animate import FramePlan, render_frames
from engine.render.models import Models, StyleRef
from engine.render.motion import INBETWEENS_KEY
from engine.render.video import CLIP_KEY, VideoRenderer
from engine.render.video_styles import VideoStyle
from engine.settings import Settings


@dataclass(frozen=True)
class StyleSpec:
    """A style as the renderer needs it. `path` is where the coordinator keeps it (used as is only
    in-process); `blob` is a handle a remote renderer turns into the file's bytes (a Ray ObjectRef in
    cluster mode), fetched only when its cache has no copy under `sha256`."""

    name: str
    sha256: str
    filename: str  # the file (or folder) name the style loader sees; its suffix picks the reader
    trigger: str = ""
    weight: float = 1.0
    adapter: str = "lora"
    path: str = ""
    blob: Any = None
    folder: bool = False  # a style saved as a folder travels as a tar


@dataclass(frozen=True)
class Recipe:
    """Everything one animation needs from the coordinator. Frames before `len(kept)` are kept
    byte-for-byte (a regeneration's parent frames, or the frames a resumed job already has)."""

    job_id: int
    params: dict[str, Any]
    plans: list[FramePlan]
    kept: list[bytes] = field(default_factory=list)  # PNG bytes of frames 0..start-1
    style: StyleSpec | None = None
    video_style: StyleSpec | None = None  # video mode: the video model's LoRA (engine/render/video_styles.py)

    @property
    def start(self) -> int:
        return len(self.kept)


@dataclass(frozen=True)
class FrameRendered:
    job_id: int
    index: int  # 0-based
    png: bytes
    at: float  # wall-clock seconds on the renderer when the frame was done (for ordering, not timing)
    inbetweens: tuple[bytes, ...] = ()  # motion mode: the clip frames after this beat, as PNG bytes
    clip: tuple[bytes, ...] = ()  # video mode, on the last keyframe: the video model's clip, as PNG bytes

    def image(self) -> Image.Image:
        """The frame as the coordinator handles it, its motion in-betweens attached as the chain attached
        them (engine.render.motion.save_inbetweens writes them beside the frame's file), and in video mode
        the clip (engine.render.video.save_clip writes it into the job's folder)."""
        image = png_decode(self.png)
        if self.inbetweens:
            image.info[INBETWEENS_KEY] = [png_decode(data) for data in self.inbetweens]
        if self.clip:
            image.info[CLIP_KEY] = [png_decode(data) for data in self.clip]
        return image


RenderEvent = StepProgress | FrameRendered


def png_encode(image: Image.Image) -> bytes:
    """The PNG bytes the coordinator writes as the frame file: encoded once, on the renderer, so a
    frame is byte-identical whichever worker rendered it."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def png_decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


# --- content-addressed files (styles, datasets) --------------------------------------------------
_hash_cache: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's relative paths and file contents. Cached by path and every
    file's size and mtime: a style is hashed once, not for every job that uses it, and a folder whose
    files changed (a training's run folder) is hashed again."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = tuple((str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files)
    key = (str(path.resolve()), stats)
    if key in _hash_cache:
        return _hash_cache[key]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def pack(path: Path) -> bytes:
    """A file's bytes, or a folder as an uncompressed tar (styles and datasets are already compressed
    images and safetensors; compressing again costs CPU for nothing)."""
    if path.is_file():
        return path.read_bytes()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.add(path, arcname=".")
    return out.getvalue()


def unpack(data: bytes, target: Path, is_folder: bool) -> None:
    """Write what `pack` made at `target`, atomically: a half-written copy never looks cached."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    if is_folder:
        tmp.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(tmp, filter="data")  # "data": no absolute paths, links out or devices
    else:
        tmp.write_bytes(data)
    try:
        os.replace(tmp, target)
    except OSError:  # another thread cached the same content first: theirs is as good
        if target.exists():
            _remove(tmp)
        else:
            raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


Fetch = Callable[[Any], bytes]  # a StyleSpec's `blob` -> its packed bytes


class ContentCache:
    """Files a remote renderer was sent, under `root/<sha256>/<name>`. `fetch` turns a blob handle into
    the bytes; it is called only on a miss, so a style travels to each worker once."""

    def __init__(self, root: Path, fetch: Fetch) -> None:
        self.root = root
        self.fetch = fetch
        self.fetched: list[str] = []  # hashes this cache had to fetch (for tests and the operator)

    def get(self, sha256: str, name: str, blob: Any, is_folder: bool) -> Path:
        target = self.root / sha256 / name
        if not target.exists():
            if blob is None:
                raise InvalidRequest(f"'{name}' is not cached on this worker and the coordinator sent no copy")
            data = self.fetch(blob)
            if hashlib.sha256(data).hexdigest() != sha256 and not is_folder:
                raise InvalidRequest(f"'{name}' arrived damaged (its content hash does not match)")
            target.parent.mkdir(parents=True, exist_ok=True)
            unpack(data, target, is_folder)
            self.fetched.append(sha256)
        return target


# --- the renderer -------------------------------------------------------------------------------
class Renderer:
    """One set of warm models and the frame chain. `cache` is None in-process (styles are read where
    the coordinator keeps them) and a ContentCache on a remote worker."""

    def __init__(self, settings: Settings, models: Models | None = None, cache: ContentCache | None = None) -> None:
        self.settings = settings
        self.models = models or Models(settings)
        self.cache = cache
        self._video: VideoRenderer | None = None  # video mode's model, loaded the first time it is needed

    def video(self) -> VideoRenderer:
        """The video model (engine/render/video.py), loaded once and kept warm beside the chain's models."""
        if self._video is None:
            self._video = VideoRenderer.load(self.settings, self.models.device, self.models.dtype)
        return self._video

    def styled_video(self, spec: StyleSpec | None) -> VideoRenderer:
        """The video model with this video style applied (none: its own weights), fetched like an image style."""
        ref = self.style_ref(spec)
        wanted = VideoStyle(ref.name, ref.path, ref.weight, ref.version) if ref is not None else None
        return self.video().use_style(wanted)

    def load(self) -> Renderer:
        self.models.load()
        return self

    def style_ref(self, spec: StyleSpec | None) -> StyleRef | None:
        if spec is None:
            return None
        if self.cache is None:
            path = spec.path
        else:
            path = str(self.cache.get(spec.sha256, spec.filename, spec.blob, is_folder=spec.folder))
        return StyleRef(
            name=spec.name,
            path=path,
            trigger=spec.trigger,
            weight=spec.weight,
            adapter=spec.adapter,
            version=spec.sha256,
        )

    def frames(
        self,
        recipe: Recipe,
        cancelled: Callable[[], bool] = lambda: False,
        on_step: Callable[[StepProgress], None] | None = None,
    ) -> Iterator[FrameRendered]:
        """Frames start..N-1 of the recipe as they are done; steps go to `on_step` as they happen, on
        this thread (in-process mode: exactly the frame chain as it always ran)."""
        params = AnimationParams.from_dict(recipe.params)
        kept = [png_decode(data) for data in recipe.kept]
        self.models.use_style(self.style_ref(recipe.style))

        def step_hook(frame: int, step: int, total: int) -> None:
            if on_step is not None:
                on_step(StepProgress(recipe.job_id, frame, step, total))

        for index, image in render_frames(
            self.models,
            params,
            recipe.plans,
            start=recipe.start,
            previous=kept[-1] if kept else None,
            reference=kept[0] if kept else None,
            on_step=step_hook,
            cancelled=cancelled,
            kept=kept,
            video=lambda: self.styled_video(recipe.video_style),  # loaded (and styled) when the clip starts
        ):
            inbetweens = tuple(png_encode(frame) for frame in image.info.get(INBETWEENS_KEY, []))
            clip = tuple(png_encode(frame) for frame in image.info.get(CLIP_KEY, []))
            yield FrameRendered(recipe.job_id, index, png_encode(image), time.time(), inbetweens, clip)

    def render(self, recipe: Recipe, cancelled: Callable[[], bool] = lambda: False) -> Iterator[RenderEvent]:
        """`frames` with the steps as events too, for a consumer that can only receive yielded values
        (a Ray streaming generator). The frame chain reports steps through a callback and a generator
        cannot yield from inside one, so the chain runs on a thread of its own and hands its events
        over a queue. Closing the iterator stops the chain at its next step."""

        def chain(emit: Callable[[Any], None], closed: Callable[[], bool]) -> None:
            for frame in self.frames(recipe, lambda: closed() or cancelled(), emit):
                emit(frame)

        yield from callbacks_as_events(chain, f"emaki-render-{recipe.job_id}")


def callbacks_as_events(work: Callable[[Callable[[Any], None], Callable[[], bool]], None], name: str) -> Iterator[Any]:
    """Run `work(emit, closed)` on a thread of its own and yield what it emits, as it emits it; an
    exception it raises is raised here. For work that reports through callbacks (the frame chain's
    steps, the trainer's losses) whose consumer can only receive yielded values (a Ray streaming
    generator). `closed()` turns true when the consumer stops early: the work should check it."""
    events: queue.Queue[Any] = queue.Queue()
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            work(events.put, stop.is_set)
        except Exception as exc:  # noqa: BLE001 (not swallowed: raised again on the consumer's side)
            events.put(_Raised(exc))
        finally:
            events.put(done)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while (item := events.get()) is not done:
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class _Raised:
    exc: Exception


class Renderers(Protocol):
    """What the coordinator renders with: in-process (LocalRenderers) or Ray actors (cluster.RayRenderers)."""

    remote: bool  # True when renderers do not share this process's files (tasks then run via run_task)

    @property
    def slots(self) -> int: ...  # how many jobs may render at once

    def share(self, path: Path) -> tuple[str, Any]: ...  # a file's content hash and a handle a renderer can fetch

    def warm(self) -> None: ...  # load every renderer's models now

    def check_motion(self) -> None: ...  # load the motion adapter everywhere now (fails with one line)

    def check_video(self) -> None: ...  # load the video model everywhere now (fails with one line)

    def frames(
        self, recipe: Recipe, cancelled: Callable[[], bool], on_step: Callable[[StepProgress], None] | None
    ) -> Iterator[FrameRendered]: ...  # may raise WorkerLost

    def close(self) -> None: ...


class LocalRenderers:
    """In-process mode: one renderer, driven on the caller's thread (the bot's one GPU thread, or the
    CLI's main thread). Never imports Ray."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer

    remote = False  # renderers share this process's files (training runs here as it always did)

    @property
    def slots(self) -> int:
        return 1

    def share(self, path: Path) -> tuple[str, Any]:
        return content_hash(path), None  # the renderer reads the coordinator's own file: no copy

    def warm(self) -> None:
        self.renderer.load()

    def check_motion(self) -> None:
        self.renderer.models.motion_renderer()

    def check_video(self) -> None:
        """Load the video model now (video mode asked for): one that cannot load fails here, in one line."""
        self.renderer.video()

    def frames(
        self, recipe: Recipe, cancelled: Callable[[], bool], on_step: Callable[[StepProgress], None] | None
    ) -> Iterator[FrameRendered]:
        return self.renderer.frames(recipe, cancelled, on_step)

    def close(self) -> None:
        pass


class WorkerLost(Exception):
    """The renderer serving a job went away mid-job (process killed, node lost). The job is not at
    fault: the coordinator puts it back in the queue, to resume at its first missing frame."""
