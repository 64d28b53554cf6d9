"""`emaki animate | styles | bot | train | evaluate`.

Errors a person can act on print as one `error: ...` line with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import EmakiError, InvalidRequest
from engine.settings import Settings, load_settings

log = logging.getLogger("emaki")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "animation"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        config_file=getattr(args, "config", None),
        profile=getattr(args, "profile", None),
        data_dir=getattr(args, "data_dir", None),
        story_backend=getattr(args, "story_backend", None),
        device=getattr(args, "device", None),
    )


# --- animate ---------------------------------------------------------------------------------
def cmd_animate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.events import Failed, Finished, FrameDone, StepProgress, StoryReady
    from engine.params import build_params
    from engine.store import open_store
    from engine.worker import Engine

    settings = _settings(args)
    out = Path(args.out or f"{_slug(args.idea)}.{args.format}")
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


# --- styles ----------------------------------------------------------------------------------
def cmd_styles(args: argparse.Namespace) -> int:
    from engine.store import open_store

    settings = _settings(args)
    store = open_store(settings.data_dir)
    if args.action == "add":
        path = Path(args.path).expanduser().resolve()
        if not path.is_file():
            raise InvalidRequest(f"style weights file {args.path} does not exist")
        if not args.name.strip():
            raise InvalidRequest("the style name is empty")
        store.add_style(args.name.strip(), str(path), trigger=args.trigger or "", adapter="lora", weight=args.weight)
        print(f"registered style {args.name}")
        return 0
    if args.action == "remove":
        if store.style(args.name) is None:
            raise InvalidRequest(f"unknown style '{args.name}'")
        store.db["styles"].delete(args.name)
        print(f"removed style {args.name}")
        return 0
    rows = store.styles()
    if not rows:
        print("no styles registered (emaki styles add NAME FILE, or emaki train)")
    for row in rows:
        metrics = json.loads(row["metrics"]) if row.get("metrics") else {}
        shown = ", ".join(f"{k}={v:.3g}" for k, v in metrics.items() if isinstance(v, int | float))
        print(f"{row['name']}\ttrigger={row['trigger'] or '-'}\t{row['adapter']}\t{shown}")
    return 0


# --- train / evaluate ----------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.store import open_store
    from training.lora import TrainConfig
    from training.service import prepare_dataset, style_dir, train_style

    settings = _settings(args)
    store = open_store(settings.data_dir)
    name = (args.name or "").strip().lower()
    config = TrainConfig(
        steps=args.steps or 0,
        rank=args.rank,
        adapter=args.adapter,
        optimizer=args.optimizer,
        learning_rate=args.lr or 0.0,
        resolution=args.resolution or 0,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        train_text_encoder=args.train_text_encoder,
    )
    # An interrupted run of this style left its dataset row and checkpoint: continue it.
    earlier = store.datasets_where("style_name = ? and status = 'approved'", [name])
    if earlier and (style_dir(settings, name) / "checkpoint.pt").exists():
        dataset_id = earlier[-1]["id"]
        print(f"resuming the interrupted training of '{name}'", file=sys.stderr)
    else:
        config.resolved(settings.min_dataset_images, settings)  # refuse bad options before any work
        dataset_id, dataset = prepare_dataset(
            settings,
            store,
            Path(args.dataset),
            name,
            args.trigger or "",
            autocaption=args.autocaption,
            status="approved",
            config=config,
        )
        print(f"dataset: {len(dataset.items)} images from {dataset.root}", file=sys.stderr)
    bar = tqdm(desc=f"train {name}", unit="step", disable=args.quiet, file=sys.stderr)

    def on_step(progress: Any) -> None:
        bar.total = progress.total
        bar.n = progress.step
        bar.set_postfix(loss=f"{progress.loss:.4f}")

    try:
        result = train_style(settings, store, dataset_id, on_step=on_step)
    except KeyboardInterrupt:
        bar.close()
        print("error: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    bar.close()
    print(
        f"style '{name}' registered: {result.weights} ({result.step} steps, final loss "
        f"{sum(result.losses[-20:]) / len(result.losses[-20:]):.4f}). Use it: emaki animate IDEA --style {name}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.models import Models
    from engine.store import open_store
    from training.evaluate import report
    from training.service import evaluate_style

    settings = _settings(args)
    store = open_store(settings.data_dir)
    if store.style(args.style) is None:
        raise InvalidRequest(f"unknown style '{args.style}'")
    bar = tqdm(desc="generating", unit="image", disable=args.quiet, file=sys.stderr)

    def on_image(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    metrics = evaluate_style(
        settings,
        store,
        Models(settings),
        args.style,
        samples=args.samples,
        features=args.features,
        animation=not args.no_animation,
        on_image=on_image,
    )
    bar.close()
    print(report(metrics))
    return 0


# --- bot -------------------------------------------------------------------------------------
def cmd_bot(args: argparse.Namespace) -> int:
    from bot.client import run_bot

    settings = _settings(args)
    run_bot(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", help="model profile: sd15 (default) or tiny (offline, random weights)")
    common.add_argument("--config", help="TOML settings file (also EMAKI_CONFIG)")
    common.add_argument("--data-dir", help="where the database and artifacts live (EMAKI_DATA_DIR)")
    common.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    common.add_argument("-v", "--verbose", action="store_true")

    parser = argparse.ArgumentParser(prog="emaki", description="Ghibli-style animations from one idea.")
    sub = parser.add_subparsers(dest="command", required=True)

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

    styles = sub.add_parser("styles", parents=[common], help="list, add or remove styles")
    styles_sub = styles.add_subparsers(dest="action")
    add = styles_sub.add_parser("add", parents=[common], help="register a LoRA safetensors file as a style")
    add.add_argument("name")
    add.add_argument("path")
    add.add_argument("--trigger", default="")
    add.add_argument("--weight", type=float, default=1.0)
    remove = styles_sub.add_parser("remove", parents=[common])
    remove.add_argument("name")
    styles.set_defaults(func=cmd_styles, action="list")

    train = sub.add_parser("train", parents=[common], help="train a style from a captioned image dataset")
    train.add_argument("dataset", help="zip or folder: images + metadata.csv (file_name,caption) or metadata.jsonl")
    train.add_argument("--name", required=True, help="the style's name (a-z, 0-9, - and _)")
    train.add_argument("--trigger", default="", help="word put in every caption and every prompt of the style")
    train.add_argument("--steps", type=int, help="training steps (default: from the dataset size)")
    train.add_argument("--rank", type=int, default=16)
    train.add_argument("--adapter", choices=("lora", "loha", "lokr", "ia3"), default="lora")
    train.add_argument("--optimizer", choices=("adamw", "prodigy"), default="adamw")
    train.add_argument("--lr", type=float, help="learning rate (default 1e-4 AdamW, 1.0 Prodigy)")
    train.add_argument("--resolution", type=int, help="training size (default: the profile's width)")
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder too")
    train.add_argument("--autocaption", action="store_true", help="caption images that have none with BLIP")
    train.add_argument("-q", "--quiet", action="store_true")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", parents=[common], help="FID/KID of a style against its dataset")
    evaluate.add_argument("--style", required=True)
    evaluate.add_argument("--samples", type=int, help="images to generate (default 100, as the paper)")
    evaluate.add_argument(
        "--features",
        choices=("auto", "inception", "tiny"),
        default="auto",
        help="inception (needs torch-fidelity's weights); tiny: offline smoke only",
    )
    evaluate.add_argument("--no-animation", action="store_true", help="skip the temporal-coherence animation")
    evaluate.add_argument("-q", "--quiet", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    bot = sub.add_parser("bot", parents=[common], help="run the Discord bot (DISCORD_TOKEN)")
    bot.set_defaults(func=cmd_bot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except EmakiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "huggingface_hub", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
