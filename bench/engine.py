"""Engine benchmark: the seed pipeline as the papers wrote it vs emaki's engine, side by side.

    python -m bench.engine --arch sd15 --device cpu --size 256 --frames 2 --steps 10
    python -m bench.engine --arch sd15 --device cuda
    python -m bench.engine --arch tiny --device cpu --video   # adds the tiny video model's row

Both run the same job (same frame prompts, seeds, size, steps, guidance 8.5, strength 0.15) on the
same random-weight architectures. Each runs in a fresh subprocess, so its peak memory is its own:
`torch.cuda.max_memory_allocated` on CUDA; on CPU the kernel's high-water mark of resident memory
(ru_maxrss) minus the resident size right after imports. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

# Dense bf16 tensor-core peak in TFLOP/s, by device name fragment (vendor data sheets).
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "RTX 4090": 165.2,
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def frame_prompts(frames: int) -> list[str]:
    from engine.coordinator.story import fallback_frames

    return fallback_frames("a ghibli dragon perches on a hill, then glides over a medieval town", frames)


# --- the two implementations ----------------------------------------------------------------
def run_baseline(args: argparse.Namespace, device: Any, dtype: Any) -> dict[str, float]:
    """The Ghibli paper's code: a txt2img pipeline and a separately built ControlNet img2img pipeline
    (their own copies of UNet, VAE and text encoder), a depth-estimation pipeline, Pillow's GIF."""
    import torch
    from diffusers import StableDiffusionControlNetImg2ImgPipeline
    from transformers import pipeline

    from bench.archs import BUILDERS, base_pipeline
    from engine.render import tiny

    started = time.perf_counter()
    torch.manual_seed(0)
    txt2img = base_pipeline(args.arch).to(device, dtype)
    torch.manual_seed(0)
    second = base_pipeline(args.arch)
    img2img = StableDiffusionControlNetImg2ImgPipeline(
        vae=second.vae,
        text_encoder=second.text_encoder,
        tokenizer=second.tokenizer,
        unet=second.unet,
        controlnet=BUILDERS[args.arch]["controlnet"](),
        scheduler=tiny.tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device, dtype)
    del second
    depth_model, processor = BUILDERS[args.arch]["depth"]()
    depth_estimator = pipeline(
        "depth-estimation", model=depth_model.to(device), image_processor=processor, device=device
    )
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - started

    def get_depth_map(image: Any) -> Any:
        return depth_estimator(image)["depth"].convert("RGB")

    prompts = frame_prompts(args.frames)
    sync(device)
    started = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(1)
    image = txt2img(
        prompt=prompts[0],
        num_inference_steps=args.steps,
        guidance_scale=8.5,
        height=args.size,
        width=args.size,
        generator=generator,
    ).images[0]
    frames = [image]
    for prompt in prompts[1:]:
        image = img2img(
            prompt=prompt,
            image=image,
            control_image=get_depth_map(image),
            strength=0.15,
            guidance_scale=8.5,
            num_inference_steps=args.steps,
            height=args.size,
            width=args.size,
            generator=generator,
        ).images[0]
        frames.append(image)
    with tempfile.TemporaryDirectory() as tmp:
        frames[0].save(f"{tmp}/animation.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sync(device)
    return {"seconds": time.perf_counter() - started, "build_s": build_s}


def run_emaki(args: argparse.Namespace, device: Any, dtype: Any) -> dict[str, float]:
    """The engine as it ships: one set of weights shared by both pipelines, the real job runner."""
    from bench.archs import components
    from engine.coordinator.requests import build_params
    from engine.coordinator.store import open_store
    from engine.coordinator.worker import Engine
    from engine.events import Failed
    from engine.render.models import Models
    from engine.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            profile="sd15" if args.arch == "sd15" else "tiny",
            data_dir=tmp,
            device=str(device),
            dtype={"float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}[str(dtype).split(".")[-1]],
            story_backend="fallback",
            min_size=8,
            max_size=4096,
            min_free_bytes=0,
        )
        started = time.perf_counter()
        models = Models(settings, components=components(args.arch)).load()
        build_s = time.perf_counter() - started
        store = open_store(settings.data_dir)
        engine = Engine(settings, store, models=models)
        params = build_params(
            settings,
            store,
            "a ghibli dragon perches on a hill, then glides over a medieval town",
            frames=args.frames,
            steps=args.steps,
            width=args.size,
            height=args.size,
            seed=1,
            strength=0.15,
            guidance=8.5,
        )
        sync(device)
        started = time.perf_counter()
        events = list(engine.run_to_end(engine.create_job(params)))
        sync(device)
        seconds = time.perf_counter() - started
        if isinstance(events[-1], Failed):
            raise SystemExit(f"emaki job failed: {events[-1].reason}")
        out: dict[str, float] = {"seconds": seconds, "build_s": build_s}
        if device.type == "cuda":
            out.update(unet_figures(models, args.size, dtype))
        return out


VIDEO_SECONDS, VIDEO_FPS = 2.0, 8  # the video row's clip: 17 frames (8k+1)


def run_video(args: argparse.Namespace, device: Any, dtype: Any) -> dict[str, float]:
    """The tiny LTX-Video model (engine/render/video.py) rendering one clip through `--frames` keyframes, at
    `--size` and `--steps`, loaded as the tiny profile loads it (from emaki's tiny hub cache)."""
    import numpy as np
    from PIL import Image

    from engine.params import video_frame_count
    from engine.render.video import ClipPlan, VideoRenderer, condition_frames
    from engine.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(profile="tiny", data_dir=tmp, device=str(device), min_size=8, max_size=4096)
        started = time.perf_counter()
        renderer = VideoRenderer.load(settings, device, dtype)
        build_s = time.perf_counter() - started
        num_frames = video_frame_count(VIDEO_SECONDS, VIDEO_FPS)
        rng = np.random.default_rng(1)
        size = (args.size, args.size, 3)
        keyframes = [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for _ in range(args.frames)]
        plan = ClipPlan(
            "a ghibli dragon glides over a medieval town", "", 1, num_frames, VIDEO_FPS, args.size, args.size,
            args.steps, 3.0, tuple(condition_frames(args.frames, num_frames)),
        )  # fmt: skip
        sync(device)
        started = time.perf_counter()
        frames = renderer.render(keyframes, plan)
        sync(device)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "build_s": build_s, "clip_frames": len(frames)}


def unet_figures(models: Any, size: int, dtype: Any) -> dict[str, float]:
    """One classifier-free-guidance UNet step (batch 2): time, FLOPs (torch's counter), TFLOP/s."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = models.txt2img.unet
    latents = torch.randn(2, 4, size // 8, size // 8, device="cuda", dtype=dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=dtype)
    t = torch.tensor([500, 500], device="cuda")
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            unet(latents, t, encoder_hidden_states=text)
        flops = counter.get_total_flops()
        for _ in range(5):
            unet(latents, t, encoder_hidden_states=text)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            unet(latents, t, encoder_hidden_states=text)
        end.record()
        torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / 20
    tflops = flops / (step_ms / 1000) / 1e12
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    return {
        "unet_step_ms": step_ms,
        "unet_tflops": tflops,
        "fraction_of_peak": tflops / peak if peak else float("nan"),
        "device_name": name,
    }


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    import diffusers
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    level = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run = {"baseline": run_baseline, "emaki": run_emaki, "video": run_video}[args.worker]
    result = run(args, device, dtype)
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mb"] = peak_rss_mb() - level
    result["versions"] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--video",
        action="store_true",
        help="also time the tiny video model rendering a 17-frame clip through the keyframes (--arch tiny only)",
    )
    parser.add_argument("--worker", choices=("baseline", "emaki", "video"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.video and args.arch != "tiny":
        raise SystemExit("--video times the tiny video model: use it with --arch tiny")
    results: dict[str, dict[str, Any]] = {}
    for name in ("baseline", "emaki", "video") if args.video else ("baseline", "emaki"):
        command = [
            sys.executable,
            "-m",
            "bench.engine",
            "--worker",
            name,
            "--arch",
            args.arch,
            "--device",
            args.device,
            "--frames",
            str(args.frames),
            "--steps",
            str(args.steps),
            "--size",
            str(args.size),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"{name} run failed (exit {done.returncode})")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    base, ours = results["baseline"], results["emaki"]
    print(f"{'':10}{'job s':>10}{'build s':>10}{'peak MB':>12}")
    for name, r in results.items():
        print(f"{name:10}{r['seconds']:>10.2f}{r['build_s']:>10.2f}{r['peak_mb']:>12.0f}")
    summary: dict[str, Any] = {
        "arch": args.arch,
        "device": args.device,
        "frames": args.frames,
        "steps": args.steps,
        "size": args.size,
        "baseline_s": round(base["seconds"], 3),
        "emaki_s": round(ours["seconds"], 3),
        "speed_ratio": round(base["seconds"] / ours["seconds"], 3),
        "baseline_peak_mb": round(base["peak_mb"], 1),
        "emaki_peak_mb": round(ours["peak_mb"], 1),
        "memory_ratio": round(ours["peak_mb"] / base["peak_mb"], 3),
        "versions": ours["versions"],
    }
    if "video" in results:
        clip = results["video"]
        summary["video_clip_frames"] = clip["clip_frames"]
        summary["video_s_per_clip_frame"] = round(clip["seconds"] / clip["clip_frames"], 4)
        summary["video_peak_mb"] = round(clip["peak_mb"], 1)
    for key in ("unet_step_ms", "unet_tflops", "fraction_of_peak", "device_name"):
        if key in ours:
            summary[key] = round(ours[key], 4) if isinstance(ours[key], float) else ours[key]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
