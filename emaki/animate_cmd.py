"""`emaki animate`: one idea (or a sidecar) to an animation file, its frames folder and a sidecar.

Everything is checked before any model loads or any row is written; outputs never replace what is
there (unless --force) and appear whole or not at all. `render_job` and `publish` also serve
`emaki resume` and `emaki redo` (emaki/jobs_cmd.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emaki.common import (
    check_data_dir,
    check_writable_folder,
    existing_store,
    setting_help,
    settings_from_args,
    size_help,
    slug,
    user_name,
)
from engine.errors import EmakiError, InvalidRequest
from engine.params import MOTION_MODES
from engine.settings import MAX_SEED, Settings, check_value, rule_of

FORMATS = ("gif", "webp", "mp4")
SIDECAR_VERSION = 1
META_FILE = "cli.json"  # in the job's folder: where the CLI was asked to write, and which story backend answered
# What a sidecar's models section pins; reproducing applies them to the settings.
MODEL_KEYS = (
    "profile",
    "base_model",
    "controlnet_model",
    "depth_model",
    "scheduler",
    "motion_adapter",
    "motion_fewstep",
    "video_model",
    "video_fewstep",
    "video_vae_tiling",
)
PARAM_OPTIONS = (
    "frames",
    "width",
    "height",
    "steps",
    "guidance",
    "strength",
    "seed",
    "style",
    "negative_prompt",
    "duration",
    "seconds",
    "fps",
    "interpolate",
    "color_coherence",
    "motion",
    "motion_depth",
)


# --- where results go ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """Where an animation goes. `explicit`: the user named it, so exactly that name or an error;
    otherwise a name from the idea that gets a -2, -3 ... suffix when taken."""

    path: Path
    fmt: str
    explicit: bool
    force: bool = False

    @staticmethod
    def frames_dir(path: Path) -> Path:
        return path.with_name(f"{path.stem}_frames")

    @staticmethod
    def sidecar(path: Path) -> Path:
        return path.with_suffix(".json")


def plan_output(out: str | None, fmt: str | None, idea: str, force: bool = False) -> Output:
    """Check an output request without writing anything: type, folder, writability, clobbering."""
    if out:
        path = Path(out).expanduser()
        suffix = path.suffix.lstrip(".").lower()
        if fmt is None:
            if suffix not in FORMATS:
                raise InvalidRequest(
                    f"--out {out} does not end in .gif, .webp or .mp4 (use --format to choose the type)"
                )
            fmt = suffix
        elif suffix != fmt:
            raise InvalidRequest(f"--out {out} does not end in .{fmt} (use --format to choose the type)")
    else:
        fmt = fmt or "gif"
        path = Path(f"{slug(idea)}.{fmt}")
    folder = path.parent
    if not folder.exists():
        raise InvalidRequest(f"output folder {folder} does not exist")
    if not folder.is_dir():
        raise InvalidRequest(f"output folder {folder} is a file, not a folder")
    if path.is_dir():
        raise InvalidRequest(f"--out {path} is a folder: give a file name, e.g. {path / f'animation.{fmt}'}")
    check_writable_folder(folder, "output folder")
    output = Output(path, fmt, explicit=bool(out), force=force)
    if output.explicit:
        frames_dir, sidecar = Output.frames_dir(path), Output.sidecar(path)
        if force:
            if frames_dir.exists() and not frames_dir.is_dir():
                raise InvalidRequest(f"{frames_dir} is a file; --force replaces only a frames folder there")
            if sidecar.is_dir():
                raise InvalidRequest(f"{sidecar} is a folder; --force replaces only a sidecar file there")
        else:
            for taken in (path, frames_dir, sidecar):
                if taken.exists() or taken.is_symlink():
                    raise InvalidRequest(
                        f"{taken} already exists: choose another --out, or add --force to replace "
                        f"{path.name}, {frames_dir.name}/ and {sidecar.name}"
                    )
    return output


def _place_file(source: Path, target: Path, replace: bool) -> None:
    """Move a finished file into place in one step; without `replace` it fails if the name is taken,
    even when another process takes it between our check and the move (a hard link never clobbers)."""
    if replace:
        os.replace(source, target)
        return
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if target.exists():
            raise FileExistsError(target) from None
        os.replace(source, target)
    else:
        source.unlink()


def _place_dir(source: Path, target: Path, replace: bool, trash: Path) -> None:
    """Move a finished folder into place. The empty folder made with mkdir is the reservation (mkdir
    fails if the name exists); renaming a folder onto an empty one replaces it in one step."""
    if replace and target.exists():
        target.rename(trash / "old_frames")
    else:
        target.mkdir()
    source.rename(target)


def publish(output: Output, engine: Any, job_id: int, fmt: str, story: dict[str, Any]) -> Path:
    """Write the animation, its frames folder and its sidecar; the animation appears last, so its
    presence means the set is whole. Returns the animation's path."""
    from engine.coordinator.worker import MP4_FILE, clip_images, job_dir
    from engine.render.media import encode_webp, write_mp4
    from engine.render.video import CLIP_DIR

    job = engine.store.job(job_id)
    rows = engine.store.frames(job_id)
    folder = output.path.parent
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{output.path.stem}.") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "frames").mkdir()
        for row in rows:
            shutil.copyfile(row["path"], tmp / "frames" / Path(row["path"]).name)
        video_job = job["params"].get("motion") == "video"
        if video_job:  # the keyframes, and the video model's clip beside them
            shutil.copytree(job_dir(engine.settings, job_id) / CLIP_DIR, tmp / "frames" / CLIP_DIR)
        animation = tmp / "animation"
        if fmt == "gif":
            shutil.copyfile(job["gif_path"], animation)
        elif fmt == "mp4" and video_job:  # the one the job made: exact fps, fitted under the upload cap
            shutil.copyfile(job_dir(engine.settings, job_id) / MP4_FILE, animation)
        else:
            images, frame_ms = clip_images(engine.settings, job, rows)  # in-betweens included
            if fmt == "webp":
                animation.write_bytes(encode_webp(images, frame_ms))
            else:
                write_mp4(images, tmp / "animation.mp4", frame_ms)
                (tmp / "animation.mp4").rename(animation)

        path = output.path
        for n in range(1, 10_000):
            if not output.explicit:
                path = output.path.with_name(f"{output.path.stem}{'' if n == 1 else f'-{n}'}.{fmt}")
                if path.exists() or Output.sidecar(path).exists():
                    continue
            try:
                _place_dir(tmp / "frames", Output.frames_dir(path), output.force, tmp)
                break
            except FileExistsError:
                if output.explicit:
                    raise InvalidRequest(
                        f"{Output.frames_dir(path)} appeared while rendering; nothing was replaced. "
                        f"Write the result elsewhere: emaki resume {job_id} --out OTHER.{fmt}"
                    ) from None
        sidecar = build_sidecar(engine, job_id, Output.frames_dir(path).name, story)
        (tmp / "sidecar.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        try:
            _place_file(tmp / "sidecar.json", Output.sidecar(path), output.force)
            _place_file(animation, path, output.force)
        except FileExistsError as exc:
            raise InvalidRequest(
                f"{exc.args[0] if exc.args else path} appeared while rendering; the frames are in "
                f"{Output.frames_dir(path)}; write the animation elsewhere: emaki resume {job_id} --out OTHER.{fmt}"
            ) from None
    return path


# --- the sidecar -----------------------------------------------------------------------------------
def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Every version that changes the bytes of a frame or of the file they are encoded into."""
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in ("emaki", "torch", "diffusers", "transformers", "peft", "numpy", "pillow", "imageio"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def model_revision(setting: str, ref: str) -> str | None:
    """The hub snapshot (commit) a model was loaded from: the cached snapshot the loader resolves (for a
    tiny model, its repo's revision in emaki's tiny cache); None for a local folder or file."""
    from engine.render import model_files, tiny_hub

    kind = model_files.kind_of(ref)
    try:
        if kind == "tiny":
            return tiny_hub.revision(tiny_hub.repo_for(setting, ref))
        snapshot = model_files.cached_snapshot(ref, model_files.hub_cache_dir()) if kind == "hub" else None
    except Exception:  # noqa: BLE001 - a revision is a nicety in the sidecar, never a reason to fail
        return None
    return snapshot.name if snapshot is not None else None


def build_sidecar(engine: Any, job_id: int, frames_dir_name: str, story: dict[str, Any]) -> dict[str, Any]:
    from engine.coordinator.worker import METRICS_FILE, STORY_FILE, job_record
    from engine.render.video import VIDEO_FILE

    settings: Settings = engine.settings
    job = engine.store.job(job_id)
    rows = engine.store.frames(job_id)
    style = None
    if job["params"].get("style"):
        row = engine.store.style(job["params"]["style"])
        if row is not None:
            style = {
                "name": row["name"],
                "sha256": _sha256(row["path"]) if Path(row["path"]).is_file() else None,
                "weight": row["weight"],
                "trigger": row["trigger"] or "",
                "adapter": row["adapter"] or "lora",
            }
    models = {k: getattr(settings, k) for k in MODEL_KEYS}
    models["family"] = engine.models.family_name  # "sd15" or "sdxl": read from the base model's files
    pinned = ("base_model", "controlnet_model", "depth_model", "motion_adapter", "video_model")
    models["revisions"] = {k: model_revision(k, getattr(settings, k)) for k in pinned if getattr(settings, k)}
    return {
        "emaki_sidecar": SIDECAR_VERSION,
        "job_id": job_id,
        "idea": job["idea"],
        "params": job["params"],
        "story": {
            **story,
            **job_record(settings, job_id, STORY_FILE),  # the LLM's raw answers, refine turn included
            "frames": [row["prompt"] for row in rows],
        },
        "metrics": job_record(settings, job_id, METRICS_FILE),  # warping error: on random weights, tooling only
        "video": job_record(settings, job_id, VIDEO_FILE) or None,  # video mode: the clip's model, seed, conditions
        "frames": [
            {k: row[k] for k in ("idx", "prompt", "seed", "strength", "steps", "guidance", "style")}
            | {"file": f"{frames_dir_name}/{Path(row['path']).name}"}
            for row in rows
        ],
        "style": style,
        "models": models,
        "device": str(engine.models.device),
        "dtype": str(engine.models.dtype).replace("torch.", ""),
        "versions": versions(),
    }


def read_sidecar(path: str) -> dict[str, Any]:
    """A sidecar's recipe, its shape checked (the values are checked as any request's are)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"cannot read sidecar {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("emaki_sidecar") != SIDECAR_VERSION:
        raise InvalidRequest(f"{path} is not an emaki sidecar (version {SIDECAR_VERSION})")
    params, frames, models = data.get("params"), data.get("frames"), data.get("models")
    if not isinstance(params, dict) or not isinstance(frames, list) or not isinstance(models, dict):
        raise InvalidRequest(f"sidecar {path} lacks its params, frames or models")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or frame.get("idx") != i or not isinstance(frame.get("prompt"), str):
            raise InvalidRequest(f"sidecar {path}: frame {i + 1} has no recipe")
        seed = frame.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InvalidRequest(f"sidecar {path}: frame {i + 1} has no valid seed")
        if not isinstance(frame.get("style"), str):
            raise InvalidRequest(f"sidecar {path}: frame {i + 1} has no valid style")
        for name in ("steps", "guidance", "strength"):
            try:
                check_value(name, frame.get(name))
            except InvalidRequest as exc:
                raise InvalidRequest(f"sidecar {path}: frame {i + 1}: {exc}") from None
    # Each value's type, so a tampered one is one line here, never a traceback (or a list's repr as the idea).
    if not isinstance(data.get("idea", ""), str):
        raise InvalidRequest(f"sidecar {path}: the idea must be text")
    if not isinstance(params.get("style") or "", str):
        raise InvalidRequest(f"sidecar {path}: params.style must be a style name (text)")
    style = data.get("style")
    if style is not None and not (
        isinstance(style, dict)
        and isinstance(style.get("name"), str)
        and style["name"].strip()
        and isinstance(style.get("sha256") or "", str)
        and (
            style.get("weight") is None
            or (isinstance(style["weight"], int | float) and not isinstance(style["weight"], bool))
        )
    ):
        raise InvalidRequest(f"sidecar {path}: style must be null or an object with a name (and its sha256, weight)")
    return data


def _check_sidecar_style(store: Any, sidecar: dict[str, Any]) -> None:
    """The styles the sidecar's job used, the keyframes' and (video mode) the video model's, are the same
    files here with the same weights: otherwise it would render something else and say it reproduced."""
    _check_recorded_style(store, sidecar.get("style"), "style")
    _check_recorded_style(store, (sidecar.get("video") or {}).get("style"), "video style")


def _check_recorded_style(store: Any, wanted: Any, what: str) -> None:
    if not wanted:
        return
    if not isinstance(wanted, dict) or not isinstance(wanted.get("name"), str):
        raise InvalidRequest(f"the sidecar's {what} is not a recorded style (name, sha256, weight)")
    row = store.style(wanted["name"]) if store is not None else None
    if row is None:
        raise InvalidRequest(f"the sidecar uses {what} '{wanted['name']}', which is not registered here")
    if wanted.get("sha256") and (not Path(row["path"]).is_file() or _sha256(row["path"]) != wanted["sha256"]):
        raise InvalidRequest(f"{what} '{wanted['name']}' here is not the file the sidecar used (sha256 differs)")
    if row["weight"] != wanted.get("weight", row["weight"]):
        raise InvalidRequest(
            f"{what} '{wanted['name']}' has weight {row['weight']} here; the sidecar used {wanted['weight']}"
        )


def _warn_version_drift(sidecar: dict[str, Any]) -> None:
    recorded = sidecar.get("versions") or {}
    here = versions()
    drift = [f"{k} {recorded[k]} -> {here[k]}" for k in here if k in recorded and recorded[k] != here[k]]
    if drift:
        print(f"warning: versions differ from the sidecar's ({'; '.join(drift)}): frames may differ", file=sys.stderr)


# --- the per-job record of what the CLI was asked -------------------------------------------------
def _meta_path(settings: Settings, job_id: int) -> Path:
    from engine.coordinator.worker import job_dir

    return job_dir(settings, job_id) / META_FILE


def read_meta(settings: Settings, job_id: int) -> dict[str, Any]:
    path = _meta_path(settings, job_id)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_meta(settings: Settings, job_id: int, **fields: Any) -> None:
    from engine.coordinator.worker import write_atomic

    meta = read_meta(settings, job_id) | fields
    _meta_path(settings, job_id).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(_meta_path(settings, job_id), json.dumps(meta, indent=2).encode())


# --- rendering with progress -----------------------------------------------------------------------
def render_job(args: argparse.Namespace, engine: Any, job_id: int, output: Output) -> Path:
    """Run a job to its end with progress bars, then publish it. Ctrl-C leaves the job resumable
    and says how (main prints the line once the bars are closed)."""
    from tqdm import tqdm

    from engine.coordinator.worker import METRICS_FILE, disk_errors_as_one_line, job_record
    from engine.events import Failed, Finished, FrameDone, StepProgress, StoryReady

    quiet = args.quiet
    total = engine.store.job(job_id)["params"]["frames"]
    bar: Any = None

    def on_step(event: StepProgress) -> None:
        nonlocal bar
        if quiet:
            return
        desc = "video" if event.frame_index >= total else f"frame {event.frame_index + 1}/{total}"
        if bar is None or bar.desc != desc:
            if bar is not None:
                bar.close()
            bar = tqdm(total=event.total_steps, desc=desc, unit="step", leave=True, file=sys.stderr)
        bar.n = event.step
        bar.refresh()

    args.interrupt_hint = f"job {job_id} stopped; continue it with: emaki resume {job_id}"
    # A full (or read-only) disk, here or in the worker: one line that says how to go on, never a traceback.
    with disk_errors_as_one_line(f", then continue with: emaki resume {job_id}"):
        try:
            with tqdm(total=1, desc="story", disable=quiet, file=sys.stderr) as story_bar:
                events = engine.run_to_end(job_id, on_step=on_step)
                for event in events:
                    if isinstance(event, StoryReady):
                        story_bar.set_postfix_str(event.backend)
                        story_bar.update(1)
                        if event.backend != "recorded":
                            write_meta(engine.settings, job_id, story=story_record(engine.settings, event.backend))
                        break
                    if isinstance(event, Failed):
                        raise EmakiError(event.reason)
            if not quiet:
                for i, row in enumerate(engine.store.frames(job_id), 1):
                    print(f"  {i}. {row['prompt']}", file=sys.stderr)
            finished = False
            for event in events:
                if isinstance(event, FrameDone) and bar is not None:
                    bar.close()
                    bar = None
                elif isinstance(event, Failed):
                    raise EmakiError(event.reason)
                elif isinstance(event, Finished):
                    finished = True
            if not finished:
                raise EmakiError(f"job {job_id} ended without an animation")
        finally:
            if bar is not None:
                bar.close()
        args.interrupt_hint = f"job {job_id} is rendered; write its files with: emaki resume {job_id}"
        with tqdm(total=1, desc=output.fmt, disable=quiet, file=sys.stderr) as media_bar:
            path = publish(output, engine, job_id, output.fmt, read_meta(engine.settings, job_id).get("story", {}))
            media_bar.update(1)
        if job_record(engine.settings, job_id, METRICS_FILE).get("mp4_over_cap"):
            cap = engine.settings.upload_limit_bytes
            print(
                f"warning: the MP4 is over the upload cap of {cap} bytes at every size: the bot would not post it",
                file=sys.stderr,
            )
        return path


def story_record(settings: Settings, backend: str) -> dict[str, Any]:
    """Which story backend answered; its raw answers are in the job's story file."""
    uses_model = backend in ("hf", "openai", "transformers")
    return {
        "backend": backend,
        "requested": settings.story_backend,
        "model": settings.llm_model if uses_model else None,
    }


def start_engine(settings: Settings, motion: str, store: Any = None) -> Any:
    """An engine whose models are loaded (here, or on the cluster's workers), the motion adapter too
    for `motion` animatediff and the video model for video: before any row is written, so a model that
    cannot load leaves nothing behind. With no `store`, the data dir's is opened only once the models are
    up (no database either)."""
    from engine.coordinator import safety
    from engine.coordinator.store import open_store
    from engine.coordinator.worker import Engine, cluster_renderers
    from engine.render.renderer import LocalRenderers, Renderer

    if settings.safety_cli:  # frames will be screened: a missing checker is one line now, not a failed job later
        safety.require(settings)
    if settings.ray_address:
        renderers = cluster_renderers(settings, store)  # joins the cluster: one line when it cannot
        renderers.warm()
        if motion == "animatediff":
            renderers.check_motion()
        if motion == "video":
            renderers.check_video()
        store = store if store is not None else open_store(settings.data_dir)
        renderers.store = store  # type: ignore[attr-defined]  # the workers table, for `emaki jobs`
        return Engine(settings, store, renderers=renderers)
    models = load_models(settings)
    if motion == "animatediff":
        models.motion_renderer()  # a motion adapter that cannot load, too, leaves no row
    local = LocalRenderers(Renderer(settings, models))
    if motion == "video":
        local.check_video()  # so does a video model
    if settings.safety_cli:  # loaded before any row: a broken checker is one line, not a failed job
        safety.checker_for(settings, models.device, models.dtype)
    store = store if store is not None else open_store(settings.data_dir)
    return Engine(settings, store, models=models, renderers=local)


def load_models(settings: Settings) -> Any:
    """The models, loaded before any row is written: a model that fails to load leaves nothing behind."""
    from engine.render.models import Models

    return Models(settings).load()


def _request_from_sidecar(args: argparse.Namespace) -> tuple[Settings, str, dict[str, Any], dict[str, Any]]:
    """Settings with the sidecar's models pinned, its idea and its parameters, and the sidecar."""
    given = [f"--{k.replace('_', '-')}" for k in PARAM_OPTIONS if getattr(args, k) is not None]
    if args.idea is not None or given:
        what = ", ".join((["IDEA"] if args.idea is not None else []) + given)
        raise InvalidRequest(f"--from-sidecar takes everything from the sidecar: drop {what}")
    sidecar = read_sidecar(args.from_sidecar)
    pinned = {k: sidecar["models"].get(k) for k in MODEL_KEYS}
    if args.profile and pinned["profile"] and args.profile != pinned["profile"]:
        raise InvalidRequest(f"the sidecar was made with --profile {pinned['profile']}, not {args.profile}")
    pinned["profile"] = args.profile or pinned["profile"]
    if pinned["profile"] == "tiny":
        # The tiny profile builds its own random-weight models whatever a sidecar names: pinning a
        # (tampered) base_model would only copy it into the new sidecar as if it had rendered.
        pinned = {k: v for k, v in pinned.items() if k not in ("base_model", "controlnet_model", "depth_model")}
    settings = settings_from_args(args, **pinned)
    recorded = sidecar["params"]
    names = ("frames", "width", "height", "steps", "guidance", "strength", "seed", "style", "negative_prompt")
    recorded_keys = (*names, "controlnet_scale", "color_coherence", "frame_duration_ms", "interpolate", "motion")
    recorded_keys = (*recorded_keys, "motion_depth")
    if recorded.get("motion") == "video":
        recorded_keys = (*recorded_keys, "video_seconds", "video_fps", "video_style")
    options = {k: recorded.get(k) for k in recorded_keys}
    return settings, sidecar.get("idea", ""), options, sidecar


def _request_from_options(args: argparse.Namespace) -> tuple[Settings, str, dict[str, Any]]:
    if args.idea is None:
        raise InvalidRequest("give an IDEA to animate (or --from-sidecar FILE.json)")
    names = ("frames", "width", "height", "steps", "guidance", "strength", "seed", "style", "negative_prompt")
    options = {k: getattr(args, k) for k in names}
    settings = settings_from_args(args)
    options |= {
        "color_coherence": args.color_coherence,
        "interpolate": args.interpolate,
        "motion": args.motion,
        "motion_depth": args.motion_depth,
    }
    if args.motion == "video":  # --seconds and --fps are the clip's, both at once if wanted
        if args.duration is not None:
            raise InvalidRequest("--duration does not apply to --motion video: use --seconds and --fps")
        fps = args.fps
        if fps is not None and math.isfinite(fps) and fps == int(fps):
            fps = int(fps)  # a whole number typed as 24.0; anything else is refused by build_params in one line
        options |= {"video_seconds": args.seconds, "video_fps": fps}
    else:
        options["frame_duration_ms"] = _keyframe_ms(args, settings)
    if args.video_style is not None:  # refused in one line outside video mode (build_params)
        options["video_style"] = args.video_style
    return settings, args.idea, options


def _keyframe_ms(args: argparse.Namespace, settings: Settings) -> int | None:
    """--duration, --seconds or --fps as the length each keyframe stands for (in-betweens share it).
    Values they cannot be turned into are left for build_params to refuse with its own line."""
    given = [f"--{name}" for name in ("duration", "seconds", "fps") if getattr(args, name) is not None]
    if len(given) > 1:
        raise InvalidRequest(f"give one of {', '.join(given)}: each sets the clip's timing")
    frames = args.frames if args.frames is not None else settings.frames
    default_count = settings.motion_inbetweens if args.motion == "animatediff" else settings.interpolate
    count = args.interpolate if args.interpolate is not None else default_count
    if args.duration is not None or not (isinstance(frames, int) and frames >= 1 and 0 <= count <= 8):
        return args.duration
    for name, value in (("seconds", args.seconds), ("fps", args.fps)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InvalidRequest(f"--{name} must be a number above 0 (got {value})")
    if args.seconds is not None:
        option, keyframe_ms = f"--seconds {args.seconds:g}", args.seconds * 1000 / frames
    elif args.fps is not None:
        from engine.params import clip_frame_count

        option, keyframe_ms = f"--fps {args.fps:g}", 1000 / args.fps * clip_frame_count(frames, count) / frames
    else:
        return None
    rule = rule_of("frame_duration_ms")
    assert rule.low is not None and rule.high is not None
    if not (math.isfinite(keyframe_ms) and rule.low <= keyframe_ms <= rule.high):
        raise InvalidRequest(
            f"{option} gives each of the {frames} keyframes {keyframe_ms:.3g} ms; it must come to "
            f"{rule.low:g}..{rule.high:g} ms a keyframe"
        )
    return round(keyframe_ms)


def cmd_animate(args: argparse.Namespace) -> int:
    from engine.coordinator.requests import build_params

    # 1. Everything checked; nothing written, nothing loaded.
    sidecar = None
    if args.from_sidecar:
        settings, idea, options, sidecar = _request_from_sidecar(args)
    else:
        settings, idea, options = _request_from_options(args)
    check_data_dir(settings)
    known = existing_store(settings)
    params = build_params(settings, known, idea, **options)
    if sidecar is not None:
        _check_sidecar_style(known, sidecar)
        if len(sidecar["frames"]) != params.frames:
            listed = len(sidecar["frames"])
            raise InvalidRequest(f"sidecar {args.from_sidecar} lists {listed} frames, not {params.frames}")
        _warn_version_drift(sidecar)
    fmt = args.format or ("mp4" if params.motion == "video" and not args.out else None)  # the video is the result
    output = plan_output(args.out, fmt, params.idea, args.force)

    # 2. Models, so one that cannot load leaves no row (nor a database); then the row, then the work.
    engine = start_engine(settings, params.motion, known)
    if sidecar is not None:
        job_id = engine.create_from_recipe(params, sidecar["frames"], owner_name=user_name())
        write_meta(settings, job_id, story=sidecar.get("story") or {})
    else:
        job_id = engine.create_job(params, owner_name=user_name())
    write_meta(settings, job_id, out=_recorded_out(output), format=output.fmt)
    print(render_job(args, engine, job_id, output))
    return 0


def _recorded_out(output: Output) -> str | None:
    return str(output.path.absolute()) if output.explicit else None


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", help="output file (default: a name from the idea, with -2, -3 ... when taken); never replaced"
    )
    parser.add_argument("--format", choices=FORMATS, help="gif, webp or mp4 (default: --out's extension, else gif)")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing --out file, its _frames folder and .json sidecar"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    animate = sub.add_parser(
        "animate",
        parents=[common],
        help="turn an idea into an animation",
        description="Turn an idea into an animation file, a folder of its frames and a JSON sidecar that "
        "reproduces it (emaki animate --from-sidecar FILE.json). Defaults are the Ghibli paper's.",
    )
    animate.add_argument("idea", nargs="?", help="what should happen, e.g. 'a dragon glides over a town'")
    animate.add_argument("--from-sidecar", metavar="FILE.json", help="re-render an animation from its sidecar")
    add_output_options(animate)
    animate.add_argument("--frames", type=int, help=setting_help("frames", "number of frames; at most max_frames"))
    animate.add_argument("--width", type=int, help=size_help("width"))
    animate.add_argument("--height", type=int, help=size_help("height"))
    animate.add_argument("--steps", type=int, help=setting_help("steps", "denoising steps"))
    animate.add_argument("--guidance", type=float, help=setting_help("guidance", "classifier-free guidance"))
    animate.add_argument("--strength", type=float, help=setting_help("strength", "img2img strength for frames 2..N"))
    animate.add_argument("--seed", type=int, help=f"job seed, 0..{MAX_SEED} (default: random)")
    animate.add_argument("--style", help="a registered style name (emaki styles; default none)")
    animate.add_argument(
        "--video-style",
        help="with --motion video: a registered video style (an LTX-Video LoRA, emaki styles add) for the video "
        "model; --style stays the keyframes' image style",
    )
    animate.add_argument("--negative-prompt", help="what to avoid (default: EMAKI_NEGATIVE_PROMPT's)")
    animate.add_argument(
        "--duration", type=int, help=setting_help("frame_duration_ms", "milliseconds each keyframe stands for")
    )
    animate.add_argument(
        "--seconds",
        type=float,
        help="length of the whole clip in seconds (instead of --duration); with --motion video the video's length "
        "(0..30; default EMAKI_VIDEO_SECONDS, 5)",
    )
    animate.add_argument(
        "--fps",
        type=float,
        help="frames per second of the clip, in-betweens included; with --motion video the video's fps, a whole "
        "number 4..50 (default EMAKI_VIDEO_FPS, 24), the frame count rounded to the nearest 8k+1",
    )
    animate.add_argument(
        "--interpolate",
        type=int,
        metavar="K",
        help=setting_help("interpolate", "optical-flow in-betweens per pair of keyframes; the clip keeps its length"),
    )
    animate.add_argument(
        "--color-coherence",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=setting_help("color_coherence", "match every frame's colours to frame 1"),
    )
    animate.add_argument(
        "--motion",
        choices=MOTION_MODES,
        help="chain: the paper's img2img chain, one frame from the one before (default); animatediff: the clip "
        "rendered at once by an AnimateDiff motion adapter (EMAKI_MOTION_ADAPTER; few-step with "
        "EMAKI_MOTION_FEWSTEP=lcm|lightning), the frames being the story's beats and --interpolate K the "
        "frames the motion model renders between them (default EMAKI_MOTION_INBETWEENS, 3); video: the chain "
        "renders the frames as keyframes, then the video model (EMAKI_VIDEO_MODEL, LTX-Video) renders a clip of "
        "--seconds at --fps through them, written as MP4 by default",
    )
    animate.add_argument(
        "--motion-depth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=setting_help("motion_depth", "motion mode: keep frame 1's depth layout with the depth ControlNet"),
    )
    animate.add_argument("--story-backend", help=setting_help("story_backend", "who writes the frames' prompts"))
    animate.set_defaults(func=cmd_animate)
