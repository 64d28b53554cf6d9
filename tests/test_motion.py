"""Motion mode: a tiny random-weight motion adapter through diffusers' AnimateDiff pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from engine.motion import MotionRenderer, prompt_schedule, tiny_motion_adapter

BEATS = ["a fox wakes", "the fox runs", "the fox leaps"]


def test_prompt_schedule_spreads_beats_over_the_clip() -> None:
    assert prompt_schedule(BEATS, 12) == {0: BEATS[0], 4: BEATS[1], 8: BEATS[2]}
    assert prompt_schedule(BEATS, 2) == {0: BEATS[0], 1: BEATS[1]}
    assert prompt_schedule(BEATS, 4) == {
        0: BEATS[0],
        1: BEATS[1],
        3: BEATS[2],
    }  # more beats than frames: first ones win


@pytest.fixture(scope="module")
def chain_pipe():
    # Fresh models: the session's shared ones carry style adapters from other tests, and the motion
    # UNet is built from plain 2D weights (see MotionRenderer).
    from engine import tiny

    return tiny.tiny_components().txt2img


@pytest.fixture(scope="module")
def renderer(chain_pipe) -> MotionRenderer:
    return MotionRenderer(chain_pipe, tiny_motion_adapter())


def _render(renderer: MotionRenderer, seed: int, beats: list[str] = BEATS, frames: int = 4) -> list:
    steps_seen: list[tuple[int, int]] = []
    out = renderer.render(
        beats,
        frames,
        width=32,
        height=32,
        steps=2,
        guidance=7.5,
        seed=seed,
        on_step=lambda s, t: steps_seen.append((s, t)),
    )
    total = steps_seen[-1][1]
    assert [s for s, _ in steps_seen] == list(range(1, total + 1)) and total >= 2
    return out


def test_motion_mode_renders_the_clip_seeded_and_shares_weights(renderer, chain_pipe) -> None:
    first = _render(renderer, seed=3)
    assert len(first) == 4 and first[0].size == (32, 32)
    again = _render(renderer, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True))
    other = _render(renderer, seed=4)
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    # One copy of the base weights: the motion pipeline's VAE and text encoder are the chain's.
    assert renderer.pipe.vae is chain_pipe.vae
    assert renderer.pipe.text_encoder is chain_pipe.text_encoder


def test_the_prompt_schedule_reaches_the_pipeline(renderer) -> None:
    # Different later beats with the same seed change the clip: the schedule is read, not just beat 1.
    base = _render(renderer, seed=5)
    changed = _render(renderer, seed=5, beats=[BEATS[0], "a whale sings", "a city at night"])
    assert not np.array_equal(np.asarray(base[-1]), np.asarray(changed[-1]))
