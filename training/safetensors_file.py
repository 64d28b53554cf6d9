"""Writing a style file whose bytes are a function of its content.

safetensors (0.8) writes the header's `__metadata__` in the order of a randomly seeded hash map, so two saves
of the same tensors and metadata differ in bytes as soon as the metadata has two keys: a trainer run again
with the same seed would give the same adapter in a different file. `save_file` writes as safetensors does,
then rewrites the header in place with the metadata's keys sorted: the same keys and values, so the same
length (the writer pads the header with spaces), and the tensors' offsets are untouched. No library does this.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file as _save_file


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    _save_file(tensors, str(path), metadata=metadata)
    if not metadata or len(metadata) < 2:
        return
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))  # a dict keeps the file's order of the tensor entries
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        ordered = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(ordered) > length:  # an escaping serde_json writes shorter than Python: keep the file as written
            return
        handle.seek(8)
        handle.write(ordered + b" " * (length - len(ordered)))
