"""Video mode (`--motion video`): the chain renders the story's N beats as keyframes (any style), then a video
model renders one clip through them.

Why LTX-Video. diffusers (0.42) ships two image-conditioned video families people run at home. Wan 2.x I2V
(`WanImageToVideoPipeline`) conditions on a first frame and, with `last_image`, a last one: N keyframes
become N-1 separate clips, one per pair, each 14B (or 5B) model call seeing only its two ends, joined where
the motion may jump. LTX-Video's `LTXConditionPipeline` (0.9.5 and later) takes image conditions at any frame
index of one clip: "keyframe k at beat k's position" is exactly its input, so the whole story is one
denoising pass whose motion is coherent across every beat; it is also 2B and fast (real-time class on one
GPU). So LTX is the default and the only family for now; Wan would be a per-pair loop over this same plan.

Frames. The clip has F = seconds x fps frames rounded to the nearest 8k+1 (LTX's VAE packs 8 frames into one
latent frame after the first; `engine.params.video_frame_count`). Beat k lands on round(k (F-1) / (N-1)),
snapped to the nearest multiple of 8 (the first pixel frame of a latent frame), so each keyframe conditions
one latent frame; a request whose beats would share one is refused (engine/coordinator/requests.py). Frame 1
IS keyframe 1 (condition at index 0: the pipeline writes it into the first latent frame); later keyframes are
conditions at their indices (strength 1).

Text. The pipeline takes one prompt for the clip (its T5 tokens condition every frame alike), so the beats'
prompts are joined in order into one paragraph ("A. Then B. Then C."), as LTX's own prompts describe a scene
and what happens next; the keyframes carry each beat's look at its position.

Noise. One CPU generator seeded from the job seed (`clip_seed`), so a seed gives the same clip on any device
and `--from-sidecar` the same bytes on the same machine.

Redo. A redo from keyframe k (a digit reaction, "Redo from frame…", `emaki redo JOB --from k`) is a new job that
keeps keyframes 1..k-1 byte for byte (their PNGs are copied), renders keyframe k with a new seed, re-chains
k+1..N with their recorded seeds (each is drawn from the one before), and renders the clip again through all N
with the parent's clip noise: the clip is one denoising pass whose every frame attends to every condition, so
no stretch of it can be kept, but with the same noise it changes only through the keyframes that changed. A
reroll (🔁) draws new seeds for every keyframe and new clip noise (`AnimationParams.clip_seed`, recorded).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from engine.errors import InvalidRequest, JobCancelled, ModelLoadError
from engine.params import VIDEO_FRAME_STEP

if TYPE_CHECKING:
    from engine.params import AnimationParams
    from engine.render.video_styles import VideoStyle
    from engine.settings import Settings

CLIP_KEY = "video_clip"  # PIL info key on the last keyframe's image: the clip's frames ride along with it
CLIP_DIR = "clip"  # in the job folder: clip_0001.png ...
VIDEO_FILE = "video.json"  # in the job folder: the clip's plan (model, revision, seed, conditions)
GUIDANCE = 3.0  # LTXConditionPipeline's default for the non-distilled models
# LTX pipelines whose folders LTXConditionPipeline loads (same components; 0.9.5's index names LTXPipeline).
LTX_PIPELINES = ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline")


@dataclass(frozen=True)
class FewStep:
    """A few-step option as its model card runs it: the timesteps, and guidance off."""

    timesteps: tuple[float, ...]
    guidance: float


FEWSTEP: dict[str, FewStep] = {
    # The distilled LTX-Video checkpoints (0.9.7/0.9.8 distilled): diffusers' docs' schedule, guidance 1.
    "distilled": FewStep((1000, 993, 987, 981, 975, 909, 725, 0.03), 1.0),
}


def clip_seed(job_seed: int) -> int:
    """The clip's noise seed, derived from the job seed apart from every keyframe's (engine/render/animate.py)."""
    return int(np.random.SeedSequence([job_seed, 0x766964656F]).generate_state(1)[0])


def condition_frames(beats: int, num_frames: int) -> list[int]:
    """The frame each beat's keyframe conditions: spread from the first frame to the last, snapped to the
    nearest multiple of 8 (ties down)."""
    if beats <= 1:
        return [0] * beats
    spread = [k * (num_frames - 1) / (beats - 1) for k in range(beats)]
    return [min(num_frames - 1, VIDEO_FRAME_STEP * round(at / VIDEO_FRAME_STEP)) for at in spread]


def joined_prompt(prompts: list[str]) -> str:
    """The beats as one paragraph, in order."""
    sentences = [p.strip().rstrip(".") for p in prompts if p.strip()]
    return ". Then ".join(sentences) + "." if sentences else ""


@dataclass(frozen=True)
class ClipPlan:
    """Everything one clip depends on besides the model and the keyframes' pixels."""

    prompt: str
    negative_prompt: str
    seed: int
    num_frames: int
    fps: int
    width: int
    height: int
    steps: int
    guidance: float
    condition_frames: tuple[int, ...]
    timesteps: tuple[float, ...] = ()  # few-step: the schedule (steps is then its length)


def plan_clip(params: AnimationParams, prompts: list[str], settings: Settings) -> ClipPlan:
    fewstep = FEWSTEP.get(settings.video_fewstep)
    num_frames = params.clip_frames
    return ClipPlan(
        prompt=joined_prompt(prompts),
        negative_prompt=params.negative_prompt,
        seed=clip_seed(params.seed) if params.clip_seed is None else params.clip_seed,
        num_frames=num_frames,
        fps=params.video_fps,
        width=params.width,
        height=params.height,
        steps=len(fewstep.timesteps) if fewstep else params.steps,
        guidance=fewstep.guidance if fewstep else GUIDANCE,
        condition_frames=tuple(condition_frames(len(prompts), num_frames)),
        timesteps=fewstep.timesteps if fewstep else (),
    )


def clip_record(plan: ClipPlan, settings: Settings, style: Any = None) -> dict[str, Any]:
    """What the sidecar says about the clip: the plan, the model, its revision, its style (a StyleSpec: name,
    content hash, weight) and the decode settings."""
    return {
        "model": settings.video_model,
        "style": {"name": style.name, "sha256": style.sha256, "weight": style.weight} if style is not None else None,
        "revision": model_revision(settings),
        "family": "ltx",
        "vae_tiling": settings.video_vae_tiling,
        "fewstep": settings.video_fewstep,
        **asdict(plan),
        "conditions": [
            {"keyframe": k + 1, "frame": frame, "strength": 1.0} for k, frame in enumerate(plan.condition_frames)
        ],
    }


# --- the model ---------------------------------------------------------------------------------------
def spec(settings: Settings, half: bool = False) -> Any:
    from engine.render import model_files

    return model_files.video_spec(settings, half)


def model_revision(settings: Settings) -> str | None:
    """The hub snapshot (commit) the video model loads from; None for a local folder."""
    from engine.render import model_files, tiny_hub

    kind = model_files.kind_of(settings.video_model)
    if kind == "tiny":
        return tiny_hub.revision(tiny_hub.repo_for("video_model", settings.video_model))
    if kind == "hub":
        snapshot = model_files.cached_snapshot(settings.video_model, model_files.hub_cache_dir())
        return snapshot.name if snapshot is not None else None
    return None


def video_dtype(chain_dtype: torch.dtype) -> torch.dtype:
    """bf16 wherever the chain runs in half precision (LTX's T5 overflows in fp16), else the chain's."""
    return torch.bfloat16 if chain_dtype in (torch.float16, torch.bfloat16) else chain_dtype


def check_configured(settings: Settings) -> None:
    if not settings.video_model:
        raise InvalidRequest(
            "video mode needs a video model: set EMAKI_VIDEO_MODEL (a cached hub id, e.g. Lightricks/LTX-Video-0.9.5, "
            "or a diffusers folder)"
        )
    if (settings.video_model == "tiny") != settings.is_tiny:
        which = "is for the tiny profile only" if not settings.is_tiny else "cannot run with the tiny profile's models"
        raise InvalidRequest(f"video model '{settings.video_model}' {which}")


def check_request(settings: Settings) -> None:
    """Video mode asked for: the model is configured and on disk (here; in cluster mode each worker loads it
    from its own cache, engine/coordinator/cluster.py), of the LTX family. File lookups only."""
    from engine.render import model_files

    check_configured(settings)
    ref = settings.video_model
    kind = model_files.kind_of(ref)
    # The kind first, where the folder is here: another pipeline's folder would otherwise be refused for the
    # LTX component it lacks ("no weights in transformer/"), not for being another kind of model.
    folder = Path(ref).expanduser() if kind == "folder" else None
    if kind == "hub":
        folder = model_files.cached_snapshot(ref, model_files.hub_cache_dir())
    if folder is not None:
        check_family(folder, ref)
    found = model_files.resolve(spec(settings))
    check_family(found.path, ref)


def check_family(folder: Path, ref: str) -> None:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return  # resolve() has said what is wrong with the folder
    name = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
    if name not in LTX_PIPELINES:
        raise ModelLoadError(
            f"video model '{ref}' is a {name or 'pipeline of unknown kind'}; video mode runs LTX-Video "
            "(e.g. Lightricks/LTX-Video-0.9.5): set EMAKI_VIDEO_MODEL to one"
        )


def verify(settings: Settings) -> None:
    """`emaki models pull`: the video model's files are whole and of the LTX family; the tiny one is loaded
    too (a real one is not loaded on the CPU: its T5 alone is 4.7B parameters)."""
    from engine.render import model_files

    found = model_files.resolve(spec(settings))
    check_family(found.path, settings.video_model)
    model_files.parameter_counts(found)  # every safetensors header readable
    if settings.is_tiny:
        VideoRenderer.load(settings, torch.device("cpu"), torch.float32)


class VideoRenderer:
    """One loaded LTX-Video pipeline, placed by `video_offload`, and the clip it renders through keyframes."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.style: VideoStyle | None = None  # the video style (LoRA) applied now (engine/render/video_styles.py)
        pipe.set_progress_bar_config(disable=True)

    def use_style(self, style: VideoStyle | None) -> VideoRenderer:
        """Apply a video style (None: none); the one applied already is not loaded again."""
        from engine.render.video_styles import apply

        self.style = apply(self.pipe, self.style, style)
        return self

    @classmethod
    def load(cls, settings: Settings, device: torch.device, chain_dtype: torch.dtype) -> VideoRenderer:
        from diffusers import LTXConditionPipeline

        from engine.render.loading import load_model

        check_configured(settings)
        dtype = video_dtype(chain_dtype)
        model = spec(settings, half=dtype != torch.float32)
        from engine.render import model_files

        check_family(model_files.resolve(model).path, settings.video_model)
        pipe = load_model(model, LTXConditionPipeline.from_pretrained, dtype=dtype)
        if device.type == "cpu" or settings.video_offload == "none":
            pipe.to(device)
        elif settings.video_offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_group_offload(
                onload_device=device, offload_device=torch.device("cpu"), offload_type="leaf_level"
            )
        if settings.video_vae_tiling:
            pipe.vae.enable_tiling()
        return cls(pipe)

    def render_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the model renders at: the keyframes' rounded down to its VAE's multiple (32 for LTX)."""
        step = self.pipe.vae_spatial_compression_ratio
        return max(step, width // step * step), max(step, height // step * step)

    def render(
        self,
        keyframes: list[Image.Image],
        plan: ClipPlan,
        on_step: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> list[Image.Image]:
        from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

        if len(keyframes) != len(plan.condition_frames):
            raise ValueError("video mode needs one keyframe per condition frame")
        if cancelled():
            raise JobCancelled("cancelled")
        pipe = self.pipe
        width, height = self.render_size(plan.width, plan.height)
        conditions = [
            LTXVideoCondition(image=keyframe.convert("RGB"), frame_index=frame, strength=1.0)
            for keyframe, frame in zip(keyframes, plan.condition_frames, strict=True)
        ]

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if cancelled():
                raise JobCancelled("cancelled")
            if on_step is not None:
                on_step(step + 1, pipe.num_timesteps)
            return tensors

        extra: dict[str, Any] = {}
        if plan.timesteps:
            extra["timesteps"] = list(plan.timesteps)
        else:
            extra["num_inference_steps"] = plan.steps
        if pipe.vae.config.timestep_conditioning:  # LTX 0.9.1+: the docs' decode settings
            extra |= {"decode_timestep": 0.05, "decode_noise_scale": 0.025, "image_cond_noise_scale": 0.025}
        frames = pipe(
            conditions=conditions,
            prompt=plan.prompt,
            negative_prompt=plan.negative_prompt or None,
            width=width,
            height=height,
            num_frames=plan.num_frames,
            frame_rate=plan.fps,
            guidance_scale=plan.guidance,
            generator=torch.Generator("cpu").manual_seed(plan.seed),
            output_type="pil",
            callback_on_step_end=step_end,
            **extra,
        ).frames[0]
        if (width, height) != (plan.width, plan.height):
            frames = [f.resize((plan.width, plan.height), Image.Resampling.LANCZOS) for f in frames]
        return [f.convert("RGB") for f in frames]


# --- the clip's files --------------------------------------------------------------------------------
def clip_paths(job_dir: Path) -> list[Path]:
    return sorted((job_dir / CLIP_DIR).glob("clip_*.png"))


def save_clip(
    image: Image.Image, job_dir: Path, record: dict[str, Any], screen: Callable[[Image.Image], None] = lambda f: None
) -> None:
    """Write the clip a (last) keyframe's image carries into the job folder (nothing when it carries none):
    every frame passed to `screen` first (the safety check, which raises), then the frames, then the record."""
    from engine.render.media import save_png_atomic

    frames = image.info.get(CLIP_KEY, [])
    if not frames:
        return
    for frame in frames:
        screen(frame)
    folder = job_dir / CLIP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("clip_*.png"):  # a clip of an earlier run of this job (resumed mid-write)
        stale.unlink()
    for i, frame in enumerate(frames, 1):
        save_png_atomic(frame, folder / f"clip_{i:04d}.png")
    tmp = job_dir / f".{VIDEO_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(job_dir / VIDEO_FILE)


def clip_images(params: AnimationParams, job_dir: Path) -> tuple[list[Image.Image], int]:
    """A video job's clip as saved, and how long each frame shows (ms)."""
    paths = clip_paths(job_dir)
    if len(paths) != params.clip_frames:
        raise InvalidRequest(f"the video clip has {len(paths)} of its {params.clip_frames} frames on disk")
    return [Image.open(p).convert("RGB") for p in paths], params.clip_frame_ms
