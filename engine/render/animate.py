"""The frame chain: frame 1 is txt2img; frame k>1 is img2img from frame k-1, guided by a depth
ControlNet conditioned on frame k-1's depth map (the Ghibli paper's pipeline).

Video mode runs the chain for the keyframes, then the video model (engine/render/video.py) for the clip."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine.errors import JobCancelled
from engine.params import AnimationParams
from engine.render.models import Models
from engine.render.motion import INBETWEENS_KEY, beat_starts
from engine.render.video import CLIP_KEY, VideoRenderer, plan_clip

StepHook = Callable[[int, int, int], None]  # (frame index, step, total steps)


@dataclass(frozen=True)
class FramePlan:
    index: int  # 0-based
    prompt: str
    seed: int
    strength: float
    steps: int
    guidance: float


def frame_seed(job_seed: int, index: int, reroll: int = 0) -> int:
    """Each frame's own seed, derived from the job seed (and a reroll counter for regenerations)."""
    return int(np.random.SeedSequence([job_seed, index, reroll]).generate_state(1)[0])


def match_colors(image: Image.Image, reference: Image.Image) -> Image.Image:
    """Histogram-match each RGB channel to the reference (Deforum's colour coherence), so the chain
    does not drift in hue. Written with numpy: one CDF lookup per channel needs no image library."""
    source = np.asarray(image.convert("RGB"))
    target = np.asarray(reference.convert("RGB").resize(image.size))
    out = np.empty_like(source)
    for c in range(3):
        _, src_index, src_counts = np.unique(source[..., c].ravel(), return_inverse=True, return_counts=True)
        ref_values, ref_counts = np.unique(target[..., c].ravel(), return_counts=True)
        src_cdf = np.cumsum(src_counts) / source[..., c].size
        ref_cdf = np.cumsum(ref_counts) / target[..., c].size
        mapped = np.interp(src_cdf, ref_cdf, ref_values)
        out[..., c] = mapped[src_index].reshape(source.shape[:2]).round().astype(np.uint8)
    return Image.fromarray(out)


def _step_callback(frame: int, on_step: StepHook | None, cancelled: Callable[[], bool]):
    def callback(pipe, step: int, timestep, kwargs):
        if cancelled():
            raise JobCancelled("cancelled")
        if on_step is not None:
            # The pipeline's own count: PNDM runs steps+1 timesteps, img2img int(steps*strength).
            on_step(frame, step + 1, pipe.num_timesteps)
        return kwargs

    return callback


def render_frames(
    models: Models,
    params: AnimationParams,
    plans: list[FramePlan],
    start: int = 0,
    previous: Image.Image | None = None,
    reference: Image.Image | None = None,
    on_step: StepHook | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    kept: list[Image.Image] | None = None,
    video: Callable[[], VideoRenderer] | None = None,
) -> Iterator[tuple[int, Image.Image]]:
    """Yield (index, image) for frames start..N-1. For start > 0, `previous` is frame start-1 and
    `reference` frame 0 (the colour reference).

    Motion mode (params.motion == "animatediff") renders the whole clip in one call and yields every beat's
    frame whatever `start` is, each carrying the clip frames up to the next beat (engine/render/motion.py).

    Video mode chains the keyframes as chain mode does, then renders the clip through all of them (`kept`,
    frames 0..start-1, and those rendered here) with `video()`'s model; the last keyframe is yielded only then,
    carrying the clip (CLIP_KEY), so a job with its last keyframe on disk has its clip too. Its steps are
    reported as frame N's (one past the last keyframe)."""
    models.load()
    assert models.family is not None
    if params.motion == "animatediff":
        yield from render_clip(models, params, plans, on_step, cancelled)
        return
    keyframes = list(kept or [])[:start]
    for plan in plans[start:]:
        if cancelled():
            raise JobCancelled("cancelled")
        generator = torch.Generator("cpu").manual_seed(plan.seed)  # CPU: same seed, same noise anywhere
        common = dict(
            prompt=plan.prompt,
            negative_prompt=params.negative_prompt or None,
            height=params.height,
            width=params.width,
            guidance_scale=plan.guidance,
            generator=generator,
            **models.family.conditioning(params.height, params.width),  # SDXL's micro-conditioning
        )
        if plan.index == 0 or previous is None:
            image = models.txt2img(
                num_inference_steps=plan.steps,
                callback_on_step_end=_step_callback(plan.index, on_step, cancelled),
                **common,
            ).images[0]
        else:
            image = models.img2img(
                image=previous,
                control_image=models.depth_map(previous),
                strength=plan.strength,
                num_inference_steps=plan.steps,
                controlnet_conditioning_scale=params.controlnet_scale,
                callback_on_step_end=_step_callback(plan.index, on_step, cancelled),
                **common,
            ).images[0]
            if params.color_coherence and reference is not None:
                image = match_colors(image, reference)
        if plan.index == 0:
            reference = image
        previous = image
        if params.motion == "video":
            keyframes.append(image)
            if plan.index == len(plans) - 1:
                if video is None:
                    raise ValueError("video mode needs a video model")
                clip = video().render(
                    keyframes,
                    plan_clip(params, [p.prompt for p in plans], models.settings),
                    on_step=(lambda step, total: on_step(len(plans), step, total)) if on_step is not None else None,
                    cancelled=cancelled,
                )
                image.info[CLIP_KEY] = clip
        yield plan.index, image


# --- rendering a job's clip --------------------------------------------------------------------------
def render_clip(
    models: Models,
    params: AnimationParams,
    plans: list[FramePlan],
    on_step: StepHook | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[int, Image.Image]]:
    """Render the whole clip in one call and yield (k, frame where beat k lands) for every beat, the
    frames up to the next beat riding along in the image's info (INBETWEENS_KEY). The whole clip is
    always rendered: the motion layers tie every frame to the others, so no beat's frames can be kept."""
    if cancelled():
        raise JobCancelled("cancelled")
    renderer = models.motion_renderer()
    first = plans[0]
    depth = None
    if params.motion_depth:
        # The layout to keep: the depth of beat 1's still, rendered by the chain's txt2img with its seed.
        still = models.txt2img(
            prompt=first.prompt,
            negative_prompt=params.negative_prompt or None,
            height=params.height,
            width=params.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generator=torch.Generator("cpu").manual_seed(first.seed),
        ).images[0]
        depth = models.depth_map(still)
    num_frames = params.clip_frames
    frames = renderer.render(
        [p.prompt for p in plans],
        [p.seed for p in plans],
        num_frames,
        width=params.width,
        height=params.height,
        steps=first.steps,
        guidance=first.guidance,
        negative_prompt=params.negative_prompt,
        depth=depth,
        controlnet_scale=params.controlnet_scale,
        on_step=(lambda step, total: on_step(0, step, total)) if on_step is not None else None,
        cancelled=cancelled,
    )
    starts = beat_starts(len(plans), num_frames)
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else num_frames
        image = frames[start]
        image.info[INBETWEENS_KEY] = frames[start + 1 : end]
        yield k, image
