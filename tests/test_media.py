from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.errors import InvalidRequest
from engine.render.media import contact_sheet, encode_gif, fit_to_bytes


def noisy_frames(n: int = 5, size: int = 128, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def gif_color_tables(data: bytes) -> tuple[bool, list[bool]]:
    """(has a global colour table, [does frame i carry a local one]) read from the GIF's blocks."""
    assert data[:6] in (b"GIF87a", b"GIF89a")
    packed = data[10]
    pos = 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)
    local: list[bool] = []

    def skip_sub_blocks(pos: int) -> int:
        while data[pos]:
            pos += data[pos] + 1
        return pos + 1

    while data[pos] != 0x3B:
        if data[pos] == 0x21:  # extension: label, then data sub-blocks
            pos = skip_sub_blocks(pos + 2)
        elif data[pos] == 0x2C:  # image descriptor
            flags = data[pos + 9]
            local.append(bool(flags & 0x80))
            pos += 10 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
            pos = skip_sub_blocks(pos + 1)  # LZW minimum code size, then image data
        else:
            raise AssertionError(f"unexpected GIF block {data[pos]:#x} at {pos}")
    return bool(packed & 0x80), local


def test_gif_loops_with_one_shared_palette() -> None:
    data = encode_gif(noisy_frames(4, 32), duration_ms=100)
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames == 4 and gif.info["loop"] == 0 and gif.info["duration"] == 100
    has_global, local = gif_color_tables(data)
    assert has_global and local == [False] * 4  # every frame uses the one global palette


@pytest.mark.parametrize("limit", [100_000, 40_000, 12_000])
def test_fit_to_bytes_lands_under_limit(limit: int) -> None:
    frames = noisy_frames()
    assert len(encode_gif(frames)) > limit  # the full-quality GIF really is too big
    data, how = fit_to_bytes(frames, limit)
    assert len(data) <= limit
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames == 5
    assert how["colors"] < 256 or how["scale"] < 1


def test_fit_to_bytes_refuses_the_impossible() -> None:
    with pytest.raises(InvalidRequest, match="cannot be made smaller"):
        fit_to_bytes(noisy_frames(), 100)


def test_contact_sheet_leaves_room_for_frames_to_come() -> None:
    sheet = contact_sheet(noisy_frames(2, 64), total=5, tile=40)
    assert sheet.size == (200, 40)
