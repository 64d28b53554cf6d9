"""Animation parameters: the value every side shares (the coordinator records it, the renderer renders it).

Built and validated by engine/coordinator/requests.py (`build_params`), the one door every front door uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.settings import rule_of

# The ranges are the settings' own (engine/settings.py declares them once).
MAX_STEPS = int(rule_of("steps").high or 0)
MAX_GUIDANCE = float(rule_of("guidance").high or 0)
# Browsers and Discord play GIF frames shorter than this at 100 ms: a clip that fast would crawl.
MIN_CLIP_FRAME_MS = 20
MOTION_MODES = ("chain", "animatediff", "video")
# Video mode: LTX-Video's VAE packs 8 frames into one latent frame after the first, so a clip has 8k+1 frames.
VIDEO_FRAME_STEP = 8


def video_frame_count(seconds: float, fps: int) -> int:
    """Frames of a video-mode clip: seconds x fps rounded to the nearest 8k+1 (ties down), at least 9."""
    steps = max(1, round((seconds * fps - 1) / VIDEO_FRAME_STEP))
    return VIDEO_FRAME_STEP * steps + 1


def clip_frame_count(keyframes: int, interpolate: int) -> int:
    """Frames a clip shows: the keyframes and `interpolate` in-betweens in each gap between them."""
    return keyframes + max(keyframes - 1, 0) * interpolate


@dataclass(frozen=True)
class AnimationParams:
    idea: str
    frames: int
    width: int
    height: int
    steps: int
    guidance: float
    strength: float
    seed: int
    style: str
    negative_prompt: str
    controlnet_scale: float
    color_coherence: bool
    frame_duration_ms: int  # per keyframe: with in-betweens the clip keeps frames x this length
    interpolate: int = 0  # in-betweens per pair of keyframes
    # chain: the paper's img2img chain; animatediff: the clip rendered at once by a motion adapter
    # (engine/render/motion.py), the frames being the story's beats and `interpolate` the frames between them.
    motion: str = "chain"
    motion_depth: bool = False  # motion mode: depth ControlNet guidance
    # The style row's identity when the job was asked for (the store's `uid`): a job holds its style by
    # it, not by name, so weights registered later under the same name (another server's) never render it.
    style_id: str = ""
    # video: the chain renders the beats as keyframes, then a video model (engine/render/video.py) renders a
    # clip of `video_seconds` at `video_fps` through them. 0 in the other modes.
    video_seconds: float = 0.0
    video_fps: int = 0
    # video: the clip's noise seed where a reroll (🔁) drew a new one; None: derived from `seed`
    # (engine.render.video.clip_seed), which a redo from keyframe k keeps, so its clip changes only through
    # the keyframes it re-renders.
    clip_seed: int | None = None
    # video: a style for the video model (family ltx-video, engine/render/video_styles.py), held by identity as
    # `style` is; `style` stays the keyframes' image style.
    video_style: str = ""
    video_style_id: str = ""

    @property
    def clip_frames(self) -> int:
        if self.motion == "video":
            return video_frame_count(self.video_seconds, self.video_fps)
        return clip_frame_count(self.frames, self.interpolate)

    @property
    def clip_frame_ms(self) -> int:
        """How long each frame of the clip shows: the keyframes' length spread over every frame (video mode:
        one frame at the clip's fps)."""
        if self.motion == "video":
            return max(1, round(1000 / self.video_fps))
        return max(1, round(self.frames * self.frame_duration_ms / self.clip_frames))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnimationParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
