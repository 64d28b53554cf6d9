"""Training images as they are: upright (EXIF), transparency over a chosen colour, and aspect-ratio
buckets instead of a square crop.

The buckets follow kohya-ss sd-scripts (`make_bucket_resolutions` in `library/train_util.py`):
every bucket holds about resolution² pixels, both sides are multiples of a step (64 for SD, whose
latents are 1/8 of the pixels and whose UNet halves them three times), between half and twice the
resolution; an image goes to the bucket whose aspect ratio is closest to its own, is scaled to
cover it and loses only the sliver that does not fit.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageColor, ImageOps

from engine.errors import InvalidRequest

Bucket = tuple[int, int]  # (width, height) in pixels


def bucket_step(resolution: int) -> int:
    """64 at SD sizes (kohya's default). The tiny profile trains at 16-64 px, where 64 would leave a
    single bucket: a step of resolution/8 keeps the same geometry at that scale."""
    return 64 if resolution >= 256 else max(8, resolution // 8 // 8 * 8)


def bucket_resolutions(resolution: int, step: int | None = None) -> list[Bucket]:
    """~equal-area buckets (kohya's scheme): the square, then every width from resolution/2 to
    2*resolution in `step`s with the tallest height that keeps the area."""
    step = step or bucket_step(resolution)
    min_size, max_size = max(step, resolution // 2 // step * step), resolution * 2
    area = resolution * resolution
    side = int(math.sqrt(area) // step) * step
    buckets = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int(area // width // step) * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def pick_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket with the closest aspect ratio (kohya's BucketManager.select_bucket)."""
    ratio = width / height
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ratio), -b[0] * b[1]))


def bucket_fit(size: tuple[int, int], bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int]]:
    """How an image of `size` (width, height) fits `bucket`: the size it is scaled to (covering the bucket,
    aspect ratio kept) and the (left, top) corner of the centred crop. SDXL is conditioned on the crop."""
    width, height = bucket
    scale = max(width / size[0], height / size[1])
    scaled = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    return scaled, ((scaled[0] - width) // 2, (scaled[1] - height) // 2)


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Scale to cover the bucket keeping the aspect ratio, then centre-crop the excess (a few
    pixels on one axis: the bucket already has nearly the image's shape)."""
    scaled, (left, top) = bucket_fit(image.size, bucket)
    image = image.resize(scaled, Image.Resampling.LANCZOS)
    return image.crop((left, top, left + bucket[0], top + bucket[1]))


def parse_colour(colour: str) -> tuple[int, int, int]:
    try:
        red, green, blue = ImageColor.getrgb(colour)[:3]
    except ValueError:
        raise InvalidRequest(f"background '{colour}' is not a colour (use a name like white or #rrggbb)") from None
    return red, green, blue


def load_upright_rgb(path: Path, background: str = "white") -> Image.Image:
    """The image the way a viewer shows it: EXIF orientation applied, and any transparency
    composited over `background` (what lies under transparent pixels is arbitrary)."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
        if has_alpha:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*parse_colour(background), 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return image.convert("RGB")
