"""Motion mode: the clip rendered at once by an AnimateDiff SD1.5 motion adapter (diffusers).

The story's N beats become a prompt schedule: beat k starts at frame round(k * F / N). diffusers'
FreeNoise (`enable_free_noise`) reads such a schedule (a dict frame -> prompt), interpolates the
prompt embeddings between beats, and denoises in overlapping windows of the adapter's context
length, so clips longer than its 16 frames stay coherent. The pipeline is built with `from_pipe` from
the chain's txt2img pipeline: UNet, VAE, text encoder and tokenizer are the same objects, and the
motion mode adds only the adapter's weights (plus the motion UNet wrapper, which reuses the 2D
weights). Not done yet: the motion UNet is built from the 2D UNet's plain weights, so it must be built
before style adapters are injected into that UNet, and styles are not yet applied in motion mode;
nor is motion mode selectable from the CLI or the bot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

MOTION_CONTEXT = 16  # frames the SD1.5 motion adapters were trained on


def tiny_motion_adapter() -> Any:
    """A random-weight motion adapter for the tiny UNet (the configuration diffusers' own tests use)."""
    from diffusers import MotionAdapter

    from engine import tiny

    torch.manual_seed(tiny.WEIGHT_SEED + 3)
    return MotionAdapter(
        block_out_channels=tiny.BLOCKS,
        motion_layers_per_block=2,
        motion_norm_num_groups=2,
        motion_num_attention_heads=4,
    ).eval()


def prompt_schedule(beats: list[str], num_frames: int) -> dict[int, str]:
    """Beat k of N starts at frame round(k * F / N); beats that would share a frame keep the first."""
    schedule: dict[int, str] = {}
    for index, beat in enumerate(beats):
        schedule.setdefault(min(num_frames - 1, round(index * num_frames / len(beats))), beat)
    return schedule


class MotionRenderer:
    """An AnimateDiff pipeline sharing the chain pipeline's weights."""

    def __init__(self, txt2img: Any, adapter: Any) -> None:
        from diffusers import AnimateDiffPipeline

        self.pipe = AnimateDiffPipeline.from_pipe(txt2img, motion_adapter=adapter.to(txt2img.device, txt2img.dtype))
        self.pipe.set_progress_bar_config(disable=True)

    def render(
        self,
        beats: list[str],
        num_frames: int,
        *,
        width: int,
        height: int,
        steps: int,
        guidance: float,
        seed: int,
        negative_prompt: str = "",
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        if not beats:
            raise ValueError("motion mode needs at least one beat")
        schedule = prompt_schedule(beats, num_frames)
        # FreeNoise reads the schedule and slides a context window over clips longer than the adapter's.
        self.pipe.enable_free_noise(context_length=min(MOTION_CONTEXT, num_frames), context_stride=4)

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(step + 1, len(pipe.scheduler.timesteps))  # PNDM adds a step
            return tensors

        result = self.pipe(
            prompt=schedule,
            negative_prompt=negative_prompt or None,
            num_frames=num_frames,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
            callback_on_step_end=step_end,
        )
        return list(result.frames[0])
