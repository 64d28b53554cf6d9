"""A member's request made into AnimationParams: defaults from settings (the paper's), validated before
anything runs, the style looked up in the store.

Every front door (CLI, Discord) builds its request through `build_params`, so nothing reaches the
engine unvalidated and every refusal names the option and the allowed range.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from engine.coordinator.store import Store
from engine.errors import InvalidRequest
from engine.params import MIN_CLIP_FRAME_MS, MOTION_MODES, VIDEO_FRAME_STEP, AnimationParams
from engine.settings import MAX_SEED, Settings, check_value


def build_params(
    settings: Settings,
    store: Store | None,
    idea: str,
    *,
    frames: int | None = None,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    strength: float | None = None,
    seed: int | None = None,
    style: str | None = None,
    negative_prompt: str | None = None,
    controlnet_scale: float | None = None,
    color_coherence: bool | None = None,
    frame_duration_ms: int | None = None,
    interpolate: int | None = None,
    motion: str | None = None,
    motion_depth: bool | None = None,
    video_seconds: float | None = None,
    video_fps: int | None = None,
    video_style: str | None = None,
) -> AnimationParams:
    idea = " ".join((idea or "").split())
    if not idea:
        raise InvalidRequest("the idea is empty: describe what should happen, e.g. 'a dragon glides over a town'")
    if len(idea) > settings.max_idea_chars:
        raise InvalidRequest(f"the idea is {len(idea)} characters long; the limit is {settings.max_idea_chars}")
    motion = motion or "chain"
    if motion not in MOTION_MODES:
        raise InvalidRequest(f"unknown motion '{motion}': use {', '.join(MOTION_MODES)}")
    if motion == "chain" and motion_depth:
        raise InvalidRequest("motion depth guidance applies to --motion animatediff only (the chain always has it)")
    if motion != "video" and (video_seconds is not None or video_fps is not None):
        raise InvalidRequest("the clip's seconds and fps as a video clip apply to --motion video only")
    if motion != "video" and (video_style or "").strip():
        raise InvalidRequest("a video style applies to --motion video only (style takes the frames' image style)")
    if motion == "video":
        if motion_depth:
            raise InvalidRequest(
                "motion depth guidance applies to --motion animatediff only (video mode has keyframes)"
            )
        if interpolate:
            raise InvalidRequest("--interpolate does not apply to --motion video: the video model renders every frame")
        interpolate = 0
        video_seconds = settings.video_seconds if video_seconds is None else video_seconds
        video_fps = settings.video_fps if video_fps is None else video_fps
        check_value("video_seconds", video_seconds)
        check_value("video_fps", video_fps)
        from engine.render import video as video_mode

        video_mode.check_request(settings)  # configured, on disk, of the LTX family
    if motion == "animatediff":
        from engine.render import motion as motion_mode

        motion_mode.check_request(settings)
        motion_depth = settings.motion_depth if motion_depth is None else motion_depth
        interpolate = settings.motion_inbetweens if interpolate is None else interpolate
        fewstep = motion_mode.FEWSTEP.get(settings.motion_fewstep)
        if fewstep is not None:  # the model card's steps and guidance, unless asked otherwise
            steps = fewstep.steps if steps is None else steps
            guidance = fewstep.guidance if guidance is None else guidance
    p = AnimationParams(
        idea=idea,
        frames=settings.frames if frames is None else frames,
        width=settings.width if width is None else width,
        height=settings.height if height is None else height,
        steps=settings.steps if steps is None else steps,
        guidance=settings.guidance if guidance is None else guidance,
        strength=settings.strength if strength is None else strength,
        seed=secrets.randbelow(MAX_SEED) if seed is None else seed,
        style=(style or "").strip(),
        negative_prompt=settings.negative_prompt if negative_prompt is None else negative_prompt,
        controlnet_scale=settings.controlnet_scale if controlnet_scale is None else controlnet_scale,
        color_coherence=settings.color_coherence if color_coherence is None else color_coherence,
        frame_duration_ms=settings.frame_duration_ms if frame_duration_ms is None else frame_duration_ms,
        interpolate=settings.interpolate if interpolate is None else interpolate,
        motion=motion,
        motion_depth=bool(motion_depth),
        video_seconds=float(video_seconds or 0.0),
        video_fps=int(video_fps or 0),
    )
    if isinstance(p.frames, bool) or not isinstance(p.frames, int) or not 1 <= p.frames <= settings.max_frames:
        raise InvalidRequest(f"frames must be between 1 and {settings.max_frames} (got {p.frames})")
    for name, value in (("width", p.width), ("height", p.height)):
        if isinstance(value, bool) or not isinstance(value, int) or value % 8:
            value = None
        if value is None or not settings.min_size <= value <= settings.max_size:
            raise InvalidRequest(
                f"{name} must be a multiple of 8 between {settings.min_size} and {settings.max_size} "
                f"for the {settings.profile} profile (got {getattr(p, name)})"
            )
    for name in ("steps", "guidance", "strength", "controlnet_scale", "frame_duration_ms", "color_coherence"):
        check_value(name, getattr(p, name))  # type, finiteness and range: one message per field
    check_value("interpolate", p.interpolate)
    if p.motion == "video" and p.clip_frames > settings.max_clip_frames:
        raise InvalidRequest(
            f"{p.video_seconds:g} s at {p.video_fps} fps make {p.clip_frames} frames; the limit is "
            f"{settings.max_clip_frames}: use fewer seconds or a lower fps"
        )
    if p.motion == "video" and p.frames >= 2 and (p.clip_frames - 1) // VIDEO_FRAME_STEP + 1 < p.frames:
        raise InvalidRequest(
            f"{p.frames} keyframes need a clip of at least {(p.frames - 1) * VIDEO_FRAME_STEP + 1} frames (one latent "
            f"frame of {VIDEO_FRAME_STEP} each); {p.video_seconds:g} s at {p.video_fps} fps make {p.clip_frames}: "
            "use more seconds, a higher fps or fewer frames"
        )
    if p.clip_frames > settings.max_clip_frames:
        raise InvalidRequest(
            f"{p.frames} frames with {p.interpolate} in-betweens make {p.clip_frames} frames; "
            f"the limit is {settings.max_clip_frames}: use fewer frames or in-betweens"
        )
    if p.clip_frame_ms < MIN_CLIP_FRAME_MS:
        raise InvalidRequest(
            f"with {p.interpolate} in-betweens each frame would show {p.clip_frame_ms} ms; players show GIF frames "
            f"under {MIN_CLIP_FRAME_MS} ms at 100 ms: make the clip longer or use fewer in-betweens"
        )
    if not isinstance(p.negative_prompt, str):
        raise InvalidRequest("the negative prompt must be text")
    if p.motion != "chain" and p.frames < 2:
        raise InvalidRequest("motion mode needs at least 2 frames (beats) to move between: use --frames 2 or more")
    if p.motion in ("chain", "video") and p.frames > 1 and int(p.steps * p.strength) < 1:
        # diffusers runs int(steps * strength) denoising steps for img2img frames.
        raise InvalidRequest(
            f"strength {p.strength} x steps {p.steps} gives no denoising step for frames 2..N: raise steps or strength"
        )
    if isinstance(p.seed, bool) or not isinstance(p.seed, int) or not 0 <= p.seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be between 0 and {MAX_SEED} (got {p.seed})")
    if p.style:
        from engine.render.video_styles import check_not_video_style

        row = style_row(store, p.style)
        check_not_video_style(row)  # a video model's LoRA is not a keyframe style
        refuse_style_of_another_family(settings, row)
        # As registered (`Ghibli` asked, `ghibli` kept), and held by identity from here on.
        p = dataclasses.replace(p, style=row["name"], style_id=row.get("uid") or "")
    if (video_style or "").strip():
        from engine.render.video_styles import check_video_style

        row = style_row(store, video_style.strip())
        check_video_style(row)
        p = dataclasses.replace(p, video_style=row["name"], video_style_id=row.get("uid") or "")
    return p


def style_row(store: Store | None, name: str) -> dict[str, Any]:
    row = store.style(name) if store is not None else None
    if row is None:
        known = ", ".join(s["name"] for s in store.styles()) if store else ""
        hint = f"known styles are {known}" if known else "no styles are registered yet"
        raise InvalidRequest(f"unknown style '{name}': {hint}")
    return row


def refuse_style_of_another_family(settings: Settings, row: dict[str, Any]) -> None:
    """A style recorded for the other family than the running base's is one line when the job is asked for,
    not a failure after it waited in the queue. Rows from before families were recorded are SD1.5's."""
    from engine.render.families import family_name
    from engine.render.style_files import FAMILY_TITLES

    running = family_name(settings.base_model, settings.base_model_config)  # "" when the base is not on disk
    recorded = row.get("family") or "sd15"
    if running and recorded != running:
        raise InvalidRequest(
            f"'{row['name']}' is an {FAMILY_TITLES.get(recorded, recorded)} style; this bot renders "
            f"{FAMILY_TITLES.get(running, running)}: pick a style made for it (/styles lists them)"
        )
