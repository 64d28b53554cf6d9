"""Safety-checker benchmark: what screening adds to each frame (the engine checks frames one by one,
as they land, before anyone sees them).

    python -m bench.safety --arch tiny
    python -m bench.safety --arch sd15 --device cuda

`tiny` is the random-weight checker the tests use; `sd15` builds diffusers' StableDiffusionSafetyChecker
at the real size (the ViT-L/14 vision tower of CompVis/stable-diffusion-safety-checker) with random
weights, so no download is needed and the timing is the real model's. The last line printed is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any


def sd15_sized_checker() -> tuple[Any, Any]:
    """The CompVis checker's architecture (its config.json's vision tower) with random weights."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={},
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 224,
        },
        projection_dim=768,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return StableDiffusionSafetyChecker(config).eval(), processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.safety", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--frames", type=int, default=20, help="frames checked (after one warm-up)")
    parser.add_argument("--size", type=int, default=0, help="frame size in pixels (default: the profile's)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from engine.coordinator.safety import SafetyChecker
    from engine.settings import Settings

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = args.size or (64 if args.arch == "tiny" else 512)
    started = time.perf_counter()
    if args.arch == "tiny":  # from the tiny cache, through the loader every model uses
        checker = SafetyChecker.load(Settings(profile="tiny"), device=device, dtype=dtype)
    else:
        checker = SafetyChecker(*sd15_sized_checker(), device=device, dtype=dtype)
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(args.frames + 1)]
    checker.flagged(frames[:1])  # warm-up: first-call allocations and kernel selection
    times = []
    for frame in frames[1:]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        checker.flagged([frame])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - tick) * 1000)
    result = {
        "arch": args.arch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "frame_size": size,
        "frames": len(times),
        "load_s": round(load_s, 3),
        "ms_per_frame_median": round(statistics.median(times), 3),
        "ms_per_frame_mean": round(statistics.fmean(times), 3),
        "params_m": round(sum(p.numel() for p in checker.model.parameters()) / 1e6, 3),
    }
    print(f"safety checker ({args.arch}, {result['device']}): {result['ms_per_frame_median']} ms per frame")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
