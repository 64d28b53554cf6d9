"""Animation files and previews: GIF (one shared palette), WebP/MP4, thumbnails, contact sheets,
and fitting an animation under an upload limit."""

from __future__ import annotations

import io
import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from engine.errors import InvalidRequest

# Palette sizes and scales tried, in order, until an animation fits under a byte limit.
PALETTE_STEPS = (256, 128, 64, 32)
SCALE_STEPS = (1.0, 0.75, 0.5, 0.35, 0.25)


def shared_palette(frames: Sequence[Image.Image], colors: int = 256) -> Image.Image:
    """One palette for all frames, quantised from all of them at once, so colours don't flicker."""
    strip = Image.new("RGB", (sum(f.width for f in frames), max(f.height for f in frames)))
    x = 0
    for frame in frames:
        strip.paste(frame.convert("RGB"), (x, 0))
        x += frame.width
    return strip.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)


def gif_durations(count: int, frame_ms: float) -> list[int]:
    """Per-frame GIF delays for frames of `frame_ms`: GIF counts in 10 ms steps (Pillow truncates), so
    the steps are spread (170, 160, 170, ... for 166 ms) and the clip keeps its length."""
    edges = [round(i * frame_ms / 10) * 10 for i in range(count + 1)]
    return [max(10, later - earlier) for earlier, later in itertools.pairwise(edges)]


def encode_gif(frames: Sequence[Image.Image], duration_ms: int = 100, colors: int = 256, loop: int = 0) -> bytes:
    palette = shared_palette(frames, colors)
    indexed = [f.convert("RGB").quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG) for f in frames]
    buffer = io.BytesIO()
    indexed[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=indexed[1:],
        duration=gif_durations(len(indexed), duration_ms),
        loop=loop,
        disposal=1,
        # Naming the palette makes Pillow write it once as the global table and no local tables;
        # without it every frame after the first carries its own (and viewers may flicker).
        palette=palette.getpalette(),
        optimize=False,
    )
    return buffer.getvalue()


def encode_webp(frames: Sequence[Image.Image], duration_ms: int = 100, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        format="WEBP",
        save_all=True,
        append_images=list(frames[1:]),
        duration=duration_ms,
        loop=0,
        quality=quality,
    )
    return buffer.getvalue()


# H.264 in yuv420p (what every browser and Discord's player decode), the index up front (faststart: playback
# starts before the download ends), no metadata that changes between runs (bit-exact: same frames, same bytes).
MP4_FLAGS = ("-movflags", "+faststart", "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact")
MP4_CRF = 18  # visually lossless for x264: the first try before fitting by bitrate
MP4_MIN_KBPS = 32  # below this x264's picture is mush: the size is lowered instead


def _even(n: float) -> int:
    return max(2, round(n / 2) * 2)


def encode_mp4(frames: Sequence[Image.Image], fps: float, kbps: int | None = None, scale: float = 1.0) -> bytes:
    """The frames as an H.264/yuv420p MP4 (faststart) at `fps`: at CRF 18, or at `kbps` (capped by a
    rate buffer) when given; `scale` shrinks every frame first (sides kept even, as yuv420p needs)."""
    import tempfile

    import numpy as np

    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise InvalidRequest(f'MP4 output needs imageio-ffmpeg (pip install "emaki[mp4]"): {exc}') from exc
    size = (_even(frames[0].width * scale), _even(frames[0].height * scale))
    rate = ["-b:v", f"{kbps}k", "-maxrate", f"{kbps}k", "-bufsize", f"{2 * kbps}k"] if kbps else ["-crf", str(MP4_CRF)]
    with tempfile.TemporaryDirectory(prefix="emaki-mp4-") as folder:
        path = Path(folder) / "clip.mp4"
        writer = imageio_ffmpeg.write_frames(
            str(path),
            size,
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=2,
            ffmpeg_log_level="error",
            output_params=[*rate, *MP4_FLAGS],
        )
        try:
            writer.send(None)
            for frame in frames:
                rgb = frame.convert("RGB")
                if rgb.size != size:
                    rgb = rgb.resize(size, Image.Resampling.LANCZOS)
                writer.send(np.ascontiguousarray(np.asarray(rgb)))
            writer.close()
        except (OSError, RuntimeError) as exc:
            raise InvalidRequest(f"ffmpeg could not write the MP4: {str(exc).strip().splitlines()[0][:200]}") from exc
        return path.read_bytes()


def fit_mp4(frames: Sequence[Image.Image], fps: float, limit_bytes: int) -> tuple[bytes, dict[str, float]]:
    """The best MP4 of these frames that is at most `limit_bytes`: CRF 18 when it fits, else the bitrate
    the limit allows over the clip's length (90%: the container and x264's overshoot), then smaller sizes at
    that bitrate. Returns (bytes, {"scale", "kbps"} with kbps 0 for CRF); InvalidRequest when nothing fits."""
    data = encode_mp4(frames, fps)
    if len(data) <= limit_bytes:
        return data, {"scale": 1.0, "kbps": 0}
    seconds = len(frames) / fps
    kbps = int(limit_bytes * 8 * 0.9 / seconds / 1000)
    for scale in SCALE_STEPS:
        rate = max(kbps, MP4_MIN_KBPS)
        data = encode_mp4(frames, fps, kbps=rate, scale=scale)
        if len(data) <= limit_bytes:
            return data, {"scale": scale, "kbps": rate}
    raise InvalidRequest(f"the video cannot be made smaller than {limit_bytes} bytes")


def write_mp4(frames: Sequence[Image.Image], path: Path, duration_ms: int = 100) -> None:
    """MP4 (H.264, yuv420p, faststart) through imageio-ffmpeg (pip install "emaki[mp4]")."""
    path.write_bytes(encode_mp4(frames, fps=1000 / duration_ms))


def thumbnail(image: Image.Image, max_side: int = 256) -> Image.Image:
    thumb = image.convert("RGB").copy()
    thumb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return thumb


def contact_sheet(
    images: Sequence[Image.Image], total: int | None = None, tile: int = 160, columns: int = 5
) -> Image.Image:
    """Frames done so far in a grid; `total` leaves grey tiles for frames still to come."""
    count = max(total or len(images), len(images), 1)
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    sheet = Image.new("RGB", (columns * tile, rows * tile), (40, 40, 46))
    for i in range(count):
        x, y = (i % columns) * tile, (i // columns) * tile
        if i < len(images):
            thumb = thumbnail(images[i], tile - 4)
            sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        else:
            sheet.paste((70, 70, 80), (x + 2, y + 2, x + tile - 2, y + tile - 2))
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fit_to_bytes(
    frames: Sequence[Image.Image], limit_bytes: int, duration_ms: int = 100
) -> tuple[bytes, dict[str, float]]:
    """The best GIF of these frames that is at most `limit_bytes`: fewer colours first, then smaller.

    Returns (gif bytes, {"colors": .., "scale": ..}); raises InvalidRequest when even the smallest
    variant is too large.
    """
    for scale in SCALE_STEPS:
        scaled = (
            frames
            if scale == 1.0
            else [
                f.resize((max(8, round(f.width * scale)), max(8, round(f.height * scale))), Image.Resampling.LANCZOS)
                for f in frames
            ]
        )
        for colors in PALETTE_STEPS:
            data = encode_gif(scaled, duration_ms=duration_ms, colors=colors)
            if len(data) <= limit_bytes:
                return data, {"colors": colors, "scale": scale}
    raise InvalidRequest(f"the animation cannot be made smaller than {limit_bytes} bytes")


def save_png_atomic(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG")
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
