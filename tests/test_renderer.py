"""The coordinator/renderer seam without Ray: the renderer's events, files by content hash, the queue
running several jobs at once, and in-process mode never importing Ray."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.coordinator.jobs import JobQueue
from engine.coordinator.requests import build_params
from engine.coordinator.store import Store
from engine.coordinator.worker import Engine
from engine.events import StepProgress
from engine.render.animate import FramePlan
from engine.render.models import Models
from engine.render.renderer import (
    ContentCache,
    FrameRendered,
    Recipe,
    Renderer,
    WorkerLost,
    content_hash,
    pack,
    png_decode,
)
from engine.settings import Settings
from tests.helpers import sha

ROOT = Path(__file__).resolve().parent.parent


def test_renderer_streams_steps_and_frames_as_plain_picklable_events(
    settings: Settings, store: Store, shared_tiny_models: Models
) -> None:
    params = build_params(settings, store, "a fox in the snow", frames=2, steps=4, strength=0.5, seed=3)
    plans = [FramePlan(i, f"a fox, frame {i}", 100 + i, 0.5, 4, 7.0) for i in range(2)]
    shared_tiny_models.use_style(None)
    renderer = Renderer(settings, shared_tiny_models)
    events = list(renderer.render(Recipe(1, params.to_dict(), plans)))
    frames = [e for e in events if isinstance(e, FrameRendered)]
    assert [f.index for f in frames] == [0, 1]
    assert any(isinstance(e, StepProgress) and e.frame_index == 1 for e in events)
    # Steps of a frame arrive before the frame itself, as they happen.
    assert isinstance(events[0], StepProgress) and events.index(frames[0]) > 0
    assert pickle.loads(pickle.dumps(events)) == events  # what a Ray actor can send back
    # Keeping frame 0 and rendering from frame 1 gives the same frame 1 (what a resumed job does).
    again = list(renderer.frames(Recipe(1, params.to_dict(), plans, kept=[frames[0].png])))
    assert [f.index for f in again] == [1] and again[0].png == frames[1].png
    assert png_decode(frames[1].png).size == (params.width, params.height)


def test_content_cache_fetches_once_and_checks_the_hash(tmp_path: Path) -> None:
    source = tmp_path / "style.safetensors"
    source.write_bytes(b"weights" * 100)
    digest = content_hash(source)
    assert digest == sha(source)
    calls: list[str] = []

    def fetch(blob: str) -> bytes:
        calls.append(blob)
        return pack(source)

    cache = ContentCache(tmp_path / "cache", fetch)
    first = cache.get(digest, source.name, "blob", is_folder=False)
    second = cache.get(digest, source.name, "blob", is_folder=False)
    assert first == second and first.read_bytes() == source.read_bytes() and calls == ["blob"]
    with pytest.raises(Exception, match="damaged"):
        ContentCache(tmp_path / "other", lambda blob: b"not it").get(digest, source.name, "x", is_folder=False)
    folder = tmp_path / "dataset"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"a")
    (folder / "sub" / "b.txt").write_bytes(b"b")
    copy = ContentCache(tmp_path / "c2", lambda blob: pack(folder)).get(content_hash(folder), "dataset", 1, True)
    assert (copy / "a.png").read_bytes() == b"a" and (copy / "sub" / "b.txt").read_bytes() == b"b"


async def test_queue_runs_n_jobs_at_once_in_fair_order(store: Store) -> None:
    for owner in (1, 1, 2, 3):
        store.add_job(kind="animate", idea="x", params={}, owner_id=owner)
    started: list[int] = []
    gate = asyncio.Event()
    queue: JobQueue

    async def run_job(job_id: int, cancel: threading.Event) -> None:
        started.append(job_id)
        if len(started) == 2:
            # Both slots are busy: both jobs read as running, the rest wait in the fair order.
            assert queue.running_ids == {1, 3} and queue.position(1) == queue.position(3) == 0
            assert queue.position(4) == 1 and queue.position(2) == 2
            gate.set()
        await gate.wait()
        store.update_job(job_id, status="done")

    queue = JobQueue(store, run_job, max_pending_per_member=5, workers=2)
    queue.kick()
    await queue.idle()
    assert started == [1, 3, 4, 2]  # round-robin between members, two at a time
    assert queue.running_ids == set()


def test_in_process_mode_never_imports_ray(tmp_path: Path) -> None:
    """The default install has no Ray: rendering a job in-process, the bot and the CLI must not import it."""
    code = f"""
import sys
import torch
torch.set_num_threads(1)
import bot.client, emaki.cli
from engine.coordinator.requests import build_params
from engine.settings import load_settings
from engine.coordinator.store import open_store
from engine.coordinator.worker import Engine
settings = load_settings(profile="tiny", data_dir={str(tmp_path / "data")!r})
store = open_store(settings.data_dir)
engine = Engine(settings, store)
params = build_params(settings, store, "a boat", frames=1, steps=2, width=32, height=32)
events = list(engine.run_to_end(engine.create_job(params)))
assert type(events[-1]).__name__ == "Finished", events[-1]
assert engine.slots == 1
assert "ray" not in sys.modules, "in-process mode imported ray"
print("ok")
"""
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_engine_keeps_working_with_a_renderer_given(engine: Engine) -> None:
    # The seam is used, not bypassed: the Engine's frames come from its renderers.
    assert engine.slots == 1 and isinstance(engine.renderers.renderer, Renderer)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EMAKI_RAY_ADDRESS": "http://head:6379"}, "ray_address must be local, auto or ray://host:port"),
        ({"EMAKI_RAY_ADDRESS": "ray://head"}, "ray_address must be local, auto or ray://host:port"),
        ({"EMAKI_GPU_WORKERS": "-1"}, "gpu_workers must be between 0 and 1024"),
        ({"EMAKI_GPU_WORKERS": "2"}, "gpu_workers=2 needs ray_address"),
    ],
)
def test_cluster_settings_are_checked_where_they_come_from(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    from engine.errors import InvalidRequest
    from engine.settings import load_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(InvalidRequest, match=message):
        load_settings(profile="tiny")


def test_cluster_settings_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.settings import load_settings

    for address in ("local", "auto", "ray://10.0.0.5:10001"):
        monkeypatch.setenv("EMAKI_RAY_ADDRESS", address)
        monkeypatch.setenv("EMAKI_GPU_WORKERS", "4")
        settings = load_settings(profile="tiny")
        assert (settings.ray_address, settings.gpu_workers) == (address, 4)


def test_emaki_jobs_lists_workers_when_there_are_any(
    settings: Settings, store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from emaki.cli import main

    monkeypatch.setenv("EMAKI_PROFILE", "tiny")
    monkeypatch.setenv("EMAKI_DATA_DIR", str(settings.data_dir))
    store.add_job(kind="animate", idea="a kite", params={}, status="done")
    assert main(["jobs"]) == 0
    assert "worker" not in capsys.readouterr().out  # in-process mode: no workers section
    store.put_worker("renderer-0", node="10.0.0.7", gpu="0", state="busy", job_id=1, updated_at=0.0)
    store.put_worker("renderer-1", node="10.0.0.8", gpu="1", state="idle", job_id=None, updated_at=0.0)
    assert main(["jobs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("worker\tnode\tgpu\tstate\tjob\tsince") + 1 :]
    assert [row.split("\t")[:5] for row in table] == [
        ["renderer-0", "10.0.0.7", "0", "busy", "1"],
        ["renderer-1", "10.0.0.8", "1", "idle", "-"],
    ]
    assert store.workers()[0]["name"] == "renderer-0"


def test_a_style_replaced_at_the_same_path_is_loaded_again(
    settings: Settings, store: Store, shared_tiny_models: Models, tmp_path: Path
) -> None:
    """Retrained or replaced under the same name and file: the warm models must not keep the old
    weights because the path did not change (the content hash did)."""
    from engine.render.renderer import StyleSpec
    from tests.helpers import make_random_lora

    params = build_params(settings, store, "a fox in the snow", frames=1, steps=3, seed=3)
    plans = [FramePlan(0, "a fox", 100, 0.5, 3, 7.0)]
    renderer = Renderer(settings, shared_tiny_models)
    first_file = make_random_lora(tmp_path / "a", seed=1)
    second_file = make_random_lora(tmp_path / "b", seed=2)
    target = tmp_path / "style" / first_file.name
    target.parent.mkdir()

    def render_with(source: Path) -> bytes:
        target.write_bytes(source.read_bytes())
        spec = StyleSpec("ink", content_hash(target), target.name, path=str(target))
        [frame] = renderer.frames(Recipe(1, params.to_dict(), plans, style=spec))
        return frame.png

    try:
        before = render_with(first_file)
        after = render_with(second_file)
        assert after != before
        assert render_with(first_file) == before  # and back: exactly the first file's output
    finally:
        shared_tiny_models.use_style(None)


class _DyingRenderers:
    """A renderer pool whose worker dies under every job (what a worker whose models cannot load, or a
    job that kills its worker, looks like to the coordinator). `cancel_first` sets the job's cancel
    event just before the death, as a member's cancel racing a worker loss."""

    remote = False
    slots = 1

    def __init__(self, cancel_first: threading.Event | None = None) -> None:
        self.cancel_first = cancel_first
        self.calls = 0

    def share(self, path: Path) -> tuple[str, None]:
        return content_hash(path), None

    def warm(self) -> None: ...

    def check_motion(self) -> None: ...

    def frames(self, recipe: Recipe, cancelled: object, on_step: object) -> None:
        self.calls += 1
        if self.cancel_first is not None:
            self.cancel_first.set()
        raise WorkerLost("renderer 0 died: ModelLoadError: the base model is not in this machine's cache")

    def close(self) -> None: ...


def test_a_job_whose_worker_keeps_dying_fails_with_the_reason_instead_of_looping(
    settings: Settings, store: Store
) -> None:
    from engine.events import Failed, Requeued

    renderers = _DyingRenderers()
    engine = Engine(settings, store, renderers=renderers)  # type: ignore[arg-type]
    job_id = engine.create_job(build_params(settings, store, "a fox", frames=1, steps=3, seed=1))
    events = list(engine.run_to_end(job_id))
    assert [type(e) for e in events].count(Requeued) == 2 and renderers.calls == 3
    assert isinstance(events[-1], Failed) and "lost 3 times" in events[-1].reason
    assert "the base model is not in this machine's cache" in events[-1].reason
    row = store.job(job_id)
    assert row["status"] == "failed" and row["worker_losses"] == 3


def test_a_cancel_racing_a_worker_loss_stays_cancelled(settings: Settings, store: Store) -> None:
    from engine.events import Failed

    cancel = threading.Event()
    engine = Engine(settings, store, renderers=_DyingRenderers(cancel_first=cancel))  # type: ignore[arg-type]
    job_id = engine.create_job(build_params(settings, store, "a fox", frames=1, steps=3, seed=1))
    events = list(engine.run(job_id, cancel))
    assert isinstance(events[-1], Failed) and events[-1].reason == "cancelled"
    assert store.job(job_id)["status"] == "cancelled"  # not queued again behind the member's back


def test_cluster_mode_without_ray_installed_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    hidden = tmp_path / "hide" / "ray"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ModuleNotFoundError("No module named ray", name="ray")\n')
    data = tmp_path / "data"
    env = {
        **os.environ,
        "PYTHONPATH": f"{hidden.parent}{os.pathsep}{ROOT}",
        "EMAKI_PROFILE": "tiny",
        "EMAKI_DATA_DIR": str(data),
        "EMAKI_RAY_ADDRESS": "local",
    }
    done = subprocess.run(
        [sys.executable, "-m", "emaki", "animate", "a fox", "--frames", "1", "--out", str(tmp_path / "f.gif")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("error: EMAKI_RAY_ADDRESS=local needs Ray")
    assert "\n" not in done.stderr.strip() and not data.exists() and not (tmp_path / "f.gif").exists()
