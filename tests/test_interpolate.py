"""Optical-flow in-betweens (engine/render/interpolate.py) on images whose true motion is known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.render.interpolate import Inbetweener, inbetween, inbetweens, warping_error

SHIFT = 8


def _scene(width: int = 160, height: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth textured RGB scene, wide enough to crop shifted windows from."""
    rng = np.random.default_rng(seed)
    noise = rng.random((height, width, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 3)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).astype(np.uint8)


def _window(scene: np.ndarray, offset: int, width: int = 128) -> np.ndarray:
    return np.ascontiguousarray(scene[:, offset : offset + width])


def _psnr(a: np.ndarray, b: np.ndarray, margin: int = SHIFT) -> float:
    # Borders are where content enters the frame and no interpolator can know it: compare the inside.
    a, b = a[:, margin:-margin].astype(np.float64), b[:, margin:-margin].astype(np.float64)
    mse = np.mean((a - b) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def test_halfway_frame_beats_a_cross_fade_and_ends_are_exact() -> None:
    scene = _scene()
    first, second, truth = _window(scene, 0), _window(scene, SHIFT), _window(scene, SHIFT // 2)
    middle = inbetween(first, second, 0.5)
    cross_fade = ((first.astype(np.float32) + second.astype(np.float32)) / 2).round().astype(np.uint8)
    flow_psnr, fade_psnr = _psnr(middle, truth), _psnr(cross_fade, truth)
    assert flow_psnr > fade_psnr + 3.0, (flow_psnr, fade_psnr)
    assert np.array_equal(inbetween(first, second, 0.0), first)
    assert np.array_equal(inbetween(first, second, 1.0), second)


def test_inbetweens_are_evenly_spaced_in_motion() -> None:
    scene = _scene(seed=1)
    first, second = _window(scene, 0), _window(scene, SHIFT)
    frames = inbetweens(first, second, 3)
    assert len(frames) == 3
    for i, frame in enumerate(frames, start=1):
        truth = _window(scene, 2 * i)  # quarter steps of an 8-pixel shift
        assert _psnr(frame, truth) > max(_psnr(frame, first), _psnr(frame, second)) + 3.0


def test_sequence_counts_and_a_changed_keyframe_recomputes_only_its_pairs() -> None:
    scene = _scene(seed=2)
    keys = [Image.fromarray(_window(scene, offset)) for offset in (0, 4, 8, 12)]
    maker = Inbetweener(2)
    frames = maker.sequence(keys)
    assert len(frames) == 4 + 3 * 2
    assert frames[0] is keys[0] and frames[3] is keys[1] and frames[-1] is keys[-1]
    assert maker.pairs_computed == 3
    changed = [*keys[:3], Image.fromarray(_window(scene, 20))]
    again = maker.sequence(changed)
    assert maker.pairs_computed == 4  # only the last pair was new
    for before, after in zip(frames[:7], again[:7], strict=True):
        assert before.tobytes() == after.tobytes()
    assert again[7].tobytes() != frames[7].tobytes()


@pytest.mark.parametrize("count", [-1, 9])
def test_inbetween_count_outside_the_range_is_refused(count: int) -> None:
    with pytest.raises(ValueError, match=r"0\.\.8"):
        Inbetweener(count)


def test_warping_error_is_lower_for_smooth_motion_than_for_a_cut() -> None:
    scene = _scene(seed=3)
    smooth = [Image.fromarray(_window(scene, o)) for o in (0, 2, 4, 6)]
    cut = [Image.fromarray(_window(scene, 0)), Image.fromarray(_window(_scene(seed=4), 0))]
    assert warping_error(smooth) < warping_error(cut) / 4
    assert warping_error(smooth[:1]) == 0.0


def test_in_betweens_are_reused_from_disk_by_another_process(tmp_path) -> None:
    scene = _scene(seed=5)
    keys = [Image.fromarray(_window(scene, offset)) for offset in (0, 4, 8)]
    first = Inbetweener(1, cache_dir=tmp_path).sequence(keys)
    later = Inbetweener(1, cache_dir=tmp_path)  # a fresh object, as in the next job's process
    again = later.sequence([*keys[:2], Image.fromarray(_window(scene, 12))])
    assert later.pairs_computed == 1  # the untouched pair came from disk
    assert again[1].tobytes() == first[1].tobytes()
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_a_cache_entry_deleted_under_a_reader_is_recomputed(tmp_path) -> None:
    """The retention sweep may delete a pair that a live job shares: a miss, never a failure."""
    scene = _scene(seed=6)
    keys = [Image.fromarray(_window(scene, offset)) for offset in (0, 4)]
    first = Inbetweener(2, cache_dir=tmp_path).sequence(keys)
    next(iter(sorted(tmp_path.glob("*.png")))).unlink()  # one of the pair's two files
    later = Inbetweener(2, cache_dir=tmp_path)
    again = later.sequence(keys)
    assert later.pairs_computed == 1 and [i.tobytes() for i in again] == [i.tobytes() for i in first]
