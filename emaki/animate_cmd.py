"""`emaki animate`: one idea to an animation file, its frames folder and a sidecar."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from emaki.common import settings_from_args, slug
from engine.errors import EmakiError, InvalidRequest
from engine.settings import Settings


def cmd_animate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.events import Failed, Finished, FrameDone, StepProgress, StoryReady
    from engine.params import build_params
    from engine.store import open_store
    from engine.worker import Engine

    settings = settings_from_args(args)
    out = Path(args.out or f"{slug(args.idea)}.{args.format}")
    if out.suffix.lstrip(".").lower() != args.format:
        raise InvalidRequest(f"--out {out} does not end in .{args.format} (use --format to choose the type)")
    if not out.parent.exists():
        raise InvalidRequest(f"output folder {out.parent} does not exist")
    store = open_store(settings.data_dir)
    params = build_params(
        settings,
        store,
        args.idea,
        frames=args.frames,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance=args.guidance,
        strength=args.strength,
        seed=args.seed,
        style=args.style,
        negative_prompt=args.negative_prompt,
        color_coherence=None if args.color_coherence is None else args.color_coherence,
        frame_duration_ms=args.duration,
    )
    engine = Engine(settings, store)
    job_id = engine.create_job(params, owner_name=os.environ.get("USER", "cli"))
    quiet = args.quiet
    bar: Any = None

    def on_step(event: StepProgress) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None or bar.desc != f"frame {event.frame_index + 1}/{params.frames}":
            if bar is not None:
                bar.close()
            bar = tqdm(
                total=event.total_steps,
                desc=f"frame {event.frame_index + 1}/{params.frames}",
                unit="step",
                leave=True,
                file=sys.stderr,
            )
        bar.n = event.step
        bar.refresh()

    with tqdm(total=1, desc="story", disable=quiet, file=sys.stderr) as story_bar:
        if not quiet:
            story_bar.set_postfix_str("loading models")
        engine.models.load()
        events = engine.run_to_end(job_id, on_step=on_step)
        story_event = None
        for event in events:
            if isinstance(event, StoryReady):
                story_event = event
                story_bar.set_postfix_str(event.backend)
                story_bar.update(1)
                break
            if isinstance(event, Failed):
                raise EmakiError(event.reason)
    if story_event is not None and not quiet:
        for i, prompt in enumerate(story_event.frames, 1):
            print(f"  {i}. {prompt}", file=sys.stderr)
    result: Finished | None = None
    for event in events:
        if isinstance(event, FrameDone) and bar is not None:
            bar.close()
            bar = None
        elif isinstance(event, Failed):
            raise EmakiError(event.reason)
        elif isinstance(event, Finished):
            result = event
    assert result is not None
    with tqdm(total=1, desc=args.format, disable=quiet, file=sys.stderr) as media_bar:
        _write_outputs(out, args.format, result, engine, job_id, settings)
        media_bar.update(1)
    print(out)
    return 0


def _write_outputs(out: Path, fmt: str, result: Any, engine: Any, job_id: int, settings: Settings) -> None:
    """Animation, frames folder and JSON sidecar, written in a temp folder and moved into place,
    so a failure leaves nothing that looks like a result."""
    import diffusers
    import torch
    from PIL import Image

    from engine import __name__ as _  # noqa: F401 - keep import order stable for tools
    from engine.media import encode_webp, write_mp4

    job = engine.store.job(job_id)
    frames = engine.store.frames(job_id)
    frames_dir = out.with_name(f"{out.stem}_frames")
    sidecar = out.with_suffix(".json")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "frames").mkdir()
        images = []
        for row in frames:
            shutil.copyfile(row["path"], tmp / "frames" / Path(row["path"]).name)
            images.append(Image.open(row["path"]).convert("RGB"))
        if fmt == "gif":
            shutil.copyfile(result.gif_path, tmp / "animation")
        elif fmt == "webp":
            (tmp / "animation").write_bytes(encode_webp(images, job["params"]["frame_duration_ms"]))
        else:
            write_mp4(images, tmp / "animation.mp4", job["params"]["frame_duration_ms"])
            (tmp / "animation.mp4").rename(tmp / "animation")
        public = settings.public_dict()
        record = {
            "job_id": job_id,
            "idea": job["idea"],
            "params": job["params"],
            "frames": [
                {k: row[k] for k in ("idx", "prompt", "seed", "strength", "steps", "guidance", "style")}
                | {"file": f"{frames_dir.name}/{Path(row['path']).name}"}
                for row in frames
            ],
            "models": {k: public[k] for k in ("profile", "base_model", "controlnet_model", "depth_model", "scheduler")},
            "device": str(engine.models.device),
            "dtype": str(engine.models.dtype).replace("torch.", ""),
            "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
        }
        (tmp / "sidecar.json").write_text(json.dumps(record, indent=2))
        if frames_dir.exists():
            shutil.rmtree(frames_dir)
        (tmp / "frames").rename(frames_dir)
        os.replace(tmp / "animation", out)
        os.replace(tmp / "sidecar.json", sidecar)


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    animate = sub.add_parser("animate", parents=[common], help="turn an idea into an animation")
    animate.add_argument("idea")
    animate.add_argument("--out", help="output file (default: a name from the idea)")
    animate.add_argument("--format", choices=("gif", "webp", "mp4"), default="gif")
    animate.add_argument("--frames", type=int)
    animate.add_argument("--width", type=int)
    animate.add_argument("--height", type=int)
    animate.add_argument("--steps", type=int)
    animate.add_argument("--guidance", type=float)
    animate.add_argument("--strength", type=float, help="img2img strength for frames 2..N (0, 1]")
    animate.add_argument("--seed", type=int)
    animate.add_argument("--style", help="a registered style name (emaki styles)")
    animate.add_argument("--negative-prompt")
    animate.add_argument("--duration", type=int, help="milliseconds per frame (default 100)")
    animate.add_argument(
        "--color-coherence",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="match every frame's colours to frame 1",
    )
    animate.add_argument("--story-backend", help="auto, hf, openai, transformers or fallback")
    animate.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    animate.set_defaults(func=cmd_animate)
