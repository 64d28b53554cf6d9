"""Motion mode: the clip rendered at once by an AnimateDiff SD1.5 motion adapter (diffusers).

Layout. The story's N beats are the job's N frame rows, as in chain mode: each row keeps its beat's
prompt and seed, and its file is the clip frame where the beat lands. With K frames between beats
(`--interpolate K`, rendered by the motion model here, not by optical flow) the clip has
F = N + (N - 1) K frames and beat k lands on frame k (K + 1). The frames between two beats are saved
beside the earlier beat's file (`frame_03_in_1.png` ...), so the frames folder still holds one file per
row and the GIF shows all F.

Prompts. The beats become a prompt schedule {k (K + 1): beat k}; diffusers' FreeNoise reads it,
interpolates the prompt embeddings between beats, and denoises in overlapping windows of the adapter's
16-frame context, so clips longer than 16 frames stay coherent (FreeNoise is what accepts a schedule, so
it is on for short clips too: a clip of at most 16 frames is then one window).

Noise. Beat k's seed makes the initial noise of its window (frames k (K + 1) .. k (K + 1) + K), so
redoing beat k (a new seed on row k) changes only that window's noise and a reroll changes all of it.
The motion layers attend across the whole context, so frames outside the window still change a little.

Weights. The motion UNet is assembled from the chain's own modules: its 2D blocks ARE the 2D UNet's
(the same objects, re-pointed before every clip), its motion blocks are the adapter's. So the motion mode
adds only the adapter's weights, and a style injected into the 2D UNet (engine/render/models.py `use_style`) is
seen by the motion UNet too. VAE, text encoder, tokenizer and scheduler come from the chain's pipeline
through `from_pipe`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from engine.errors import InvalidRequest, JobCancelled

if TYPE_CHECKING:
    from engine.params import AnimationParams
    from engine.settings import Settings

MOTION_CONTEXT = 16  # frames the SD1.5 motion adapters were trained on
INBETWEENS_KEY = "motion_inbetweens"  # PIL info key: the clip frames after a beat's frame, before the next


@dataclass(frozen=True)
class FewStep:
    """A few-step option as its model card runs it: the scheduler, and the steps and guidance to default to."""

    scheduler: str  # diffusers class name
    overrides: tuple[tuple[str, Any], ...]  # scheduler config changes
    steps: int
    guidance: float


FEWSTEP: dict[str, FewStep] = {
    # AnimateLCM (wangfuyun/AnimateLCM): LCMScheduler with linear betas, 4-8 steps at low guidance.
    "lcm": FewStep("LCMScheduler", (("beta_schedule", "linear"),), steps=6, guidance=1.5),
    # AnimateDiff-Lightning (ByteDance/AnimateDiff-Lightning): Euler, trailing timesteps, linear betas, no CFG;
    # the checkpoint is distilled for 1, 2, 4 or 8 steps (4 is the card's default).
    "lightning": FewStep(
        "EulerDiscreteScheduler", (("timestep_spacing", "trailing"), ("beta_schedule", "linear")), steps=4, guidance=1.0
    ),
}


def beat_starts(beats: int, num_frames: int) -> list[int]:
    """Where beat k of N lands among F frames: spread from the first frame to the last, so with
    F = N + (N - 1) K beat k lands on k (K + 1). Beats that would share a frame collapse onto it."""
    if beats <= 1:
        return [0] * beats
    return [min(num_frames - 1, round(k * (num_frames - 1) / (beats - 1))) for k in range(beats)]


def prompt_schedule(beats: list[str], num_frames: int) -> dict[int, str]:
    """FreeNoise's prompt dict: beat k at its start frame; beats that would share a frame keep the first."""
    schedule: dict[int, str] = {}
    for start, beat in zip(beat_starts(len(beats), num_frames), beats, strict=True):
        schedule.setdefault(start, beat)
    return schedule


def window_noise(seeds: list[int], num_frames: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """The clip's initial latents (1, C, F, h, w): each beat's window drawn from that beat's seed, on
    the CPU so a seed gives the same noise on any device."""
    channels, height, width = latent_shape
    starts = beat_starts(len(seeds), num_frames)
    windows = []
    for seed, start, end in zip(seeds, starts, [*starts[1:], num_frames], strict=True):
        if end > start:  # beats collapsed onto one frame: the first one's seed draws it
            generator = torch.Generator("cpu").manual_seed(seed)
            windows.append(torch.randn((1, channels, end - start, height, width), generator=generator))
    return torch.cat(windows, dim=2)


# --- the motion UNet, built from the chain's modules ---------------------------------------------
_TOP = ("conv_in", "time_proj", "time_embedding", "conv_norm_out", "conv_act", "conv_out")
_PARTS = ("resnets", "attentions", "downsamplers", "upsamplers")


def share_modules(motion_unet: Any, unet: Any, adapter: Any) -> None:
    """Point the motion UNet's 2D parts at the 2D UNet's modules and its motion parts at the adapter's.
    Run before every clip: a style's peft layers may have replaced a module the last call pointed at."""
    for name in _TOP:
        setattr(motion_unet, name, getattr(unet, name))
    pairs = [
        *zip(motion_unet.down_blocks, unet.down_blocks, adapter.down_blocks, strict=True),
        *zip(motion_unet.up_blocks, unet.up_blocks, adapter.up_blocks, strict=True),
        (motion_unet.mid_block, unet.mid_block, adapter.mid_block if hasattr(adapter, "mid_block") else None),
    ]
    for motion_block, block, adapter_block in pairs:
        for part in _PARTS:
            if getattr(motion_block, part, None) is not None:
                setattr(motion_block, part, getattr(block, part))
        if getattr(motion_block, "motion_modules", None) is not None and adapter_block is not None:
            motion_block.motion_modules = adapter_block.motion_modules


def build_motion_unet(unet: Any, adapter: Any) -> Any:
    """A UNetMotionModel that owns no weights of its own (built on the meta device, then shared)."""
    from diffusers import UNetMotionModel

    with torch.device("meta"):
        motion_unet = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
    share_modules(motion_unet, unet, adapter)
    left = [name for name, p in [*motion_unet.named_parameters(), *motion_unet.named_buffers()] if p.is_meta]
    if left:  # a diffusers release with parts this code does not know: refuse rather than run on empty weights
        raise InvalidRequest(f"the motion UNet has parts not shared with the base model: {', '.join(left[:3])}")
    return motion_unet.eval()


def load_adapter(settings: Settings, device: torch.device, dtype: torch.dtype) -> Any:
    """The configured motion adapter, on the device; any failure is one ModelLoadError line."""
    from diffusers import MotionAdapter

    from engine.render.loading import load_model

    check_configured(settings)
    # `tiny` is a repo in emaki's tiny cache: the loader a user's adapter goes through.
    adapter = load_model(adapter_spec(settings), MotionAdapter.from_pretrained, dtype=dtype)
    return adapter.to(device, dtype).eval()


class MotionRenderer:
    """AnimateDiff pipelines over the chain pipeline's weights (plus the adapter's)."""

    def __init__(self, txt2img: Any, adapter: Any, fewstep: str = "none", controlnet: Any = None) -> None:
        from diffusers import AnimateDiffPipeline

        self.unet2d = txt2img.unet
        self.adapter = adapter.to(txt2img.device, txt2img.dtype)
        self.motion_unet = build_motion_unet(self.unet2d, self.adapter)
        # from_pipe casts what it is given to `dtype` (fp32 when not told): keep the chain's.
        self.pipe = AnimateDiffPipeline.from_pipe(
            txt2img, unet=self.motion_unet, motion_adapter=self.adapter, dtype=txt2img.dtype
        )
        if fewstep != "none":
            choice = FEWSTEP[fewstep]
            import diffusers

            scheduler_class = getattr(diffusers, choice.scheduler)
            self.pipe.scheduler = scheduler_class.from_config(self.pipe.scheduler.config, **dict(choice.overrides))
        self.pipe.set_progress_bar_config(disable=True)
        self.depth_pipe: Any = None
        if controlnet is not None:
            from diffusers import AnimateDiffControlNetPipeline

            # Same motion UNet, VAE, text encoder and scheduler; the ControlNet is the chain's depth one.
            self.depth_pipe = AnimateDiffControlNetPipeline.from_pipe(
                self.pipe, controlnet=controlnet, dtype=txt2img.dtype
            )
            self.depth_pipe.set_progress_bar_config(disable=True)

    def render(
        self,
        beats: list[str],
        seeds: list[int],
        num_frames: int,
        *,
        width: int,
        height: int,
        steps: int,
        guidance: float,
        negative_prompt: str = "",
        depth: Image.Image | None = None,
        controlnet_scale: float = 1.0,
        on_step: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> list[Image.Image]:
        if not beats or len(beats) != len(seeds):
            raise ValueError("motion mode needs one seed per beat, and at least one beat")
        pipe = self.pipe if depth is None else self.depth_pipe
        if pipe is None:
            raise ValueError("depth guidance needs the renderer built with a ControlNet")
        share_modules(self.motion_unet, self.unet2d, self.adapter)  # whatever the style layers are now
        # FreeNoise reads the schedule and slides a context window over clips longer than the adapter's.
        pipe.enable_free_noise(context_length=min(MOTION_CONTEXT, num_frames), context_stride=4)
        scale = pipe.vae_scale_factor
        latents = window_noise(seeds, num_frames, (4, height // scale, width // scale))

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if cancelled():
                raise JobCancelled("cancelled")
            if on_step is not None:
                on_step(step + 1, len(pipe.scheduler.timesteps))  # PNDM adds a step
            return tensors

        extra: dict[str, Any] = {}
        if depth is not None:
            extra = {"conditioning_frames": [depth] * num_frames, "controlnet_conditioning_scale": controlnet_scale}
        result = pipe(
            prompt=prompt_schedule(beats, num_frames),
            negative_prompt=negative_prompt or None,
            num_frames=num_frames,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents.to(pipe.device, pipe.dtype),
            output_type="pil",
            callback_on_step_end=step_end,
            **extra,
        )
        return list(result.frames[0])


# --- requests: what motion mode refuses before anything is queued ----------------------------------
def check_configured(settings: Settings) -> None:
    from engine.settings import PROFILE_FAMILIES

    if PROFILE_FAMILIES.get(settings.profile, "sd15") != "sd15":  # before asking for an adapter it could not use
        raise InvalidRequest(
            f"motion mode renders with SD1.5's motion adapter (AnimateDiff): the {settings.profile} profile renders "
            "SDXL; use the frame chain (motion 'chain')"
        )
    if not settings.motion_adapter:
        raise InvalidRequest(
            f"motion mode needs a motion adapter, and the {settings.profile} profile has none configured: set "
            "EMAKI_MOTION_ADAPTER (a diffusers folder or a cached hub id, "
            "e.g. guoyww/animatediff-motion-adapter-v1-5-3)"
        )
    if (settings.motion_adapter == "tiny") != settings.is_tiny:
        which = "is for the tiny profile only" if not settings.is_tiny else "cannot drive the tiny profile's UNet"
        raise InvalidRequest(f"motion adapter '{settings.motion_adapter}' {which}")


def check_request(settings: Settings) -> None:
    """Motion mode asked for: the adapter is configured and can be found, and no setting excludes it.
    Cheap (file lookups only), so the bot runs it on every request."""
    check_configured(settings)
    if settings.compile != "off":
        raise InvalidRequest(
            "motion mode cannot run with EMAKI_COMPILE on (the compiled UNet is the 2D one): "
            "use --motion chain, or ask the admin to set EMAKI_COMPILE=off"
        )
    if settings.memory in ("medium", "low"):
        raise InvalidRequest(
            f"motion mode needs the models resident (EMAKI_MEMORY high or auto), not '{settings.memory}'"
        )
    from engine.render import model_files

    # A folder without config.json and weights, or a hub id not in the cache: one ModelLoadError line.
    model_files.resolve(adapter_spec(settings))


def adapter_spec(settings: Settings) -> Any:
    from engine.render import model_files

    ref = settings.motion_adapter
    return model_files.ModelSpec("motion adapter", "motion_adapter", ref, pipeline=False, half=False)


def inbetween_paths(path: Path, count: int) -> list[Path]:
    return [path.with_name(f"{path.stem}_in_{i}.png") for i in range(1, count + 1)]


def save_inbetweens(image: Image.Image, path: Path, screen: Callable[[Image.Image], None] = lambda frame: None) -> None:
    """Write the motion frames a beat's image carries beside its file (nothing in chain mode). Each is
    passed to `screen` first (the safety check, which raises to end the job) before any is written."""
    from engine.render.media import save_png_atomic

    frames = image.info.get(INBETWEENS_KEY, [])
    for frame in frames:
        screen(frame)
    for frame, target in zip(frames, inbetween_paths(path, len(frames)), strict=True):
        save_png_atomic(frame, target)


def clip_images(params: AnimationParams, rows: list[dict[str, Any]]) -> tuple[list[Image.Image], int]:
    """A motion job's clip: each beat's frame, then the frames saved beside it."""
    count = params.interpolate
    images: list[Image.Image] = []
    for index, row in enumerate(rows):
        images.append(Image.open(row["path"]).convert("RGB"))
        if index + 1 < len(rows):
            images.extend(Image.open(p).convert("RGB") for p in inbetween_paths(Path(row["path"]), count))
    return images, params.clip_frame_ms
