"""In-between frames from optical flow: K frames between each pair of keyframes, no download.

OpenCV's DIS optical flow gives the motion both ways between two keyframes. The flow from an
intermediate time t back to each keyframe is approximated from those two flows as Super SloMo does
(Jiang et al. 2018, eq. 4), which is exact for constant motion; each keyframe is warped to t with
`cv2.remap` and the two warps are blended by temporal distance, each weighted down where a
forward-backward consistency check says the pixel is occluded in the other keyframe. At t=0 and t=1
the result is the keyframe itself, bit for bit.

No maintained package on the index serves RIFE or FILM without a model download, so the learned
interpolators are not offered; this is the interpolator Deforum's optical-flow cadence also uses.
Why by hand: OpenCV gives flow and warping, but the blend with occlusion weights is a few lines that
no library packages for arbitrary image pairs.

The in-betweens of a pair depend on that pair alone, so regenerating one keyframe recomputes only the
in-betweens that touch it: `Inbetweener` caches them by the two keyframes' content hashes.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

MAX_INBETWEENS = 8
# How strongly an inconsistent (likely occluded) pixel is down-weighted: pixels of forward-backward
# error (in pixels) much above this count almost nothing.
OCCLUSION_SIGMA_PX = 1.5


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def optical_flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dense flow F with source(x) ~ target(x + F(x)), (H, W, 2) float32, by OpenCV's DIS."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(_gray(source), _gray(target), None)


def _grid(height: int, width: int) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return np.stack([xs, ys], axis=-1)


def backward_warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """out(x) = image(x + flow(x)), bilinear, edges replicated."""
    height, width = flow.shape[:2]
    coords = _grid(height, width) + flow
    return cv2.remap(image, coords[..., 0], coords[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def consistency_error(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """|F(x) + B(x + F(x))| in pixels: near 0 where x is visible in both images, large where occluded."""
    returned = backward_warp(backward, forward)
    return np.linalg.norm(forward + returned, axis=-1)


def inbetween(
    first: np.ndarray, second: np.ndarray, t: float, flows: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """The frame at time t in [0, 1] between two RGB uint8 images of one size."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], not {t}")
    if t == 0.0:
        return first.copy()
    if t == 1.0:
        return second.copy()
    flow_01, flow_10 = flows if flows is not None else (optical_flow(first, second), optical_flow(second, first))
    # Flow from time t to each keyframe (Super SloMo eq. 4): exact for linear motion.
    flow_t0 = -(1.0 - t) * t * flow_01 + t * t * flow_10
    flow_t1 = (1.0 - t) ** 2 * flow_01 - t * (1.0 - t) * flow_10
    from_first = backward_warp(first.astype(np.float32), flow_t0)
    from_second = backward_warp(second.astype(np.float32), flow_t1)
    # Visibility: a pixel of `first` that the return trip does not bring back is occluded in `second`.
    occluded_first = backward_warp(consistency_error(flow_01, flow_10), flow_t0)
    occluded_second = backward_warp(consistency_error(flow_10, flow_01), flow_t1)
    weight_first = (1.0 - t) * np.exp(-((occluded_first / OCCLUSION_SIGMA_PX) ** 2))
    weight_second = t * np.exp(-((occluded_second / OCCLUSION_SIGMA_PX) ** 2))
    total = weight_first + weight_second
    # Where both sides look occluded, fall back to the plain temporal blend.
    fallback = total < 1e-6
    weight_first = np.where(fallback, 1.0 - t, weight_first)
    weight_second = np.where(fallback, t, weight_second)
    total = weight_first + weight_second
    blended = (from_first * weight_first[..., None] + from_second * weight_second[..., None]) / total[..., None]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def inbetweens(first: np.ndarray, second: np.ndarray, count: int) -> list[np.ndarray]:
    """`count` frames evenly spaced strictly between two keyframes (flows computed once)."""
    if count <= 0:
        return []
    flows = (optical_flow(first, second), optical_flow(second, first))
    return [inbetween(first, second, i / (count + 1), flows) for i in range(1, count + 1)]


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()


class Inbetweener:
    """Builds the full frame sequence from keyframes, remembering each pair's in-betweens by content
    (in memory, and as PNGs under `cache_dir` when given, so a regeneration job in another process
    reuses them too): a changed keyframe costs only the two pairs it belongs to."""

    def __init__(self, count: int, cache_dir: Path | None = None) -> None:
        if not 0 <= count <= MAX_INBETWEENS:
            raise ValueError(f"in-betweens per pair must be 0..{MAX_INBETWEENS}, not {count}")
        self.count = count
        self.cache_dir = cache_dir
        self._cache: dict[tuple[str, str], list[Image.Image]] = {}
        self.pairs_computed = 0

    def _files(self, key: tuple[str, str]) -> list[Path]:
        assert self.cache_dir is not None
        stem = f"{key[0][:24]}-{key[1][:24]}-k{self.count}"
        return [self.cache_dir / f"{stem}-{i}.png" for i in range(1, self.count + 1)]

    def pair(self, first: Image.Image, second: Image.Image) -> list[Image.Image]:
        key = (_digest(first), _digest(second))
        if key in self._cache:
            return self._cache[key]
        files = self._files(key) if self.cache_dir is not None else []
        frames = self._read(files)
        if frames is None:
            arrays = inbetweens(np.asarray(first.convert("RGB")), np.asarray(second.convert("RGB")), self.count)
            frames = [Image.fromarray(a) for a in arrays]
            self.pairs_computed += 1
            for image, path in zip(frames, files, strict=False):
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(f".{path.name}.{os.getpid()}")
                image.save(partial, format="PNG")
                os.replace(partial, path)  # a reader never sees half a file
        self._cache[key] = frames
        return frames

    @staticmethod
    def _read(files: list[Path]) -> list[Image.Image] | None:
        """The cached in-betweens, or None when any is missing: the retention sweep may delete a pair
        another job shares between the check and the read, and a cache miss only costs a recompute."""
        if not files:
            return None
        try:
            return [Image.open(f).convert("RGB") for f in files]
        except OSError:
            return None

    def sequence(self, keyframes: Sequence[Image.Image]) -> list[Image.Image]:
        out: list[Image.Image] = []
        for index, frame in enumerate(keyframes):
            if index > 0 and self.count:
                out.extend(self.pair(keyframes[index - 1], frame))
            out.append(frame)
        return out


def warping_error(frames: Sequence[Image.Image]) -> float:
    """Mean temporal warping error of a clip: each frame is predicted from the one before by optical
    flow, and the squared difference (intensities in [0, 1]) is averaged over the pixels the
    forward-backward check finds visible in both. Lower is smoother. On random-weight models this only
    tests the tooling; it says something about motion only with real weights."""
    if len(frames) < 2:
        return 0.0
    errors = []
    for earlier, later in itertools.pairwise(frames):
        a = np.asarray(earlier.convert("RGB"))
        b = np.asarray(later.convert("RGB"))
        flow_ba, flow_ab = optical_flow(b, a), optical_flow(a, b)
        predicted = backward_warp(a.astype(np.float32), flow_ba)
        visible = consistency_error(flow_ba, flow_ab) < 1.0
        if not visible.any():
            visible = np.ones_like(visible)
        diff = ((predicted - b.astype(np.float32)) / 255.0) ** 2
        errors.append(float(diff.mean(axis=-1)[visible].mean()))
    return float(np.mean(errors))
