"""UNet speed levers, each measured on and off against the same plain model in one run.

    python -m bench.levers --arch tiny --size 64
    python -m bench.levers --arch sd15 --size 256 --no-compile     # compiling full SD1.5 on a CPU takes long

Each lever is applied alone to a copy of the same random-weight UNet (same seed), timed over the same
inputs (median of `--repeats` calls after warm-up), and its output compared with the plain model's.
The plain model is fp32, eager, with diffusers' default attention processor (SDPA), contiguous
tensors. On a CPU these figures say what each lever does on a CPU; none of them predicts a GPU.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _build_unet(arch: str) -> torch.nn.Module:
    from bench.archs import BUILDERS

    torch.manual_seed(0)
    return BUILDERS[arch]["unet"]()


def _inputs(unet: torch.nn.Module, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size // 8, size // 8, generator=generator)  # CFG batch of 2
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([500, 500]), text


def _side_by_side(
    plain: Callable[[], torch.Tensor], lever: Callable[[], torch.Tensor], repeats: int
) -> tuple[float, float, float, torch.Tensor]:
    """(plain ms, lever ms, lever's first call s, lever output): calls alternate, so load from other
    processes hits both sides alike; medians of `repeats` timed calls after one warm-up each."""
    plain()
    start = time.perf_counter()
    out = lever()  # warm-up; for compile, the compilation itself
    first_call_s = time.perf_counter() - start
    plain_times, lever_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        plain()
        plain_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = lever()
        lever_times.append(time.perf_counter() - start)
    return statistics.median(plain_times) * 1000, statistics.median(lever_times) * 1000, first_call_s, out


def _lever_channels_last(unet: torch.nn.Module) -> torch.nn.Module:
    return unet.to(memory_format=torch.channels_last)


def _lever_fused_qkv(unet: torch.nn.Module) -> torch.nn.Module:
    unet.fuse_qkv_projections()
    return unet


def _lever_classic_attention(unet: torch.nn.Module) -> torch.nn.Module:
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())  # the pre-SDPA processor: shows what SDPA is worth
    return unet


def _lever_compile(unet: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(unet)


def _lever_bf16(unet: torch.nn.Module) -> torch.nn.Module:
    return unet.to(torch.bfloat16)


LEVERS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "channels_last": _lever_channels_last,
    "fused_qkv": _lever_fused_qkv,
    "no_sdpa (AttnProcessor)": _lever_classic_attention,
    "bf16": _lever_bf16,
    "torch.compile (inductor)": _lever_compile,
}


def measure(arch: str, size: int, repeats: int, compile_too: bool) -> dict[str, Any]:
    plain = _build_unet(arch).eval()
    latents, timesteps, text = _inputs(plain, size)

    def runner(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode():
                return model(latents.to(dtype), timesteps, encoder_hidden_states=text.to(dtype)).sample.float()

        return call

    base_call = runner(plain)
    base_out = base_call()
    rows = []
    for name, apply in LEVERS.items():
        if name.startswith("torch.compile") and not compile_too:
            continue
        model = apply(copy.deepcopy(plain))
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        base_ms, ms, first_call_s, out = _side_by_side(base_call, runner(model, dtype), repeats)
        rows.append(
            {
                "lever": name,
                "plain_ms": round(base_ms, 2),
                "lever_ms": round(ms, 2),
                "speedup": round(base_ms / ms, 3),
                "max_abs_diff": float((out - base_out).abs().max()),
                "first_call_s": round(first_call_s, 2),
            }
        )
    return {"arch": arch, "size": size, "levers": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.levers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--size", type=int, default=64, help="image size; the UNet sees size/8 latents")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on a CPU)")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")  # the bf16 lever's cast warns; the table says what it does
    result = measure(args.arch, args.size, args.repeats, compile_too=not args.no_compile)
    result.update(
        device=f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        torch=torch.__version__,
    )
    print(f"UNet step, CFG batch 2, {args.arch} at {args.size}px on {result['device']}; each lever against plain")
    print(f"{'lever':28} {'plain ms':>9} {'lever ms':>9} {'speedup':>8} {'max |diff|':>11} {'first call s':>13}")
    for row in result["levers"]:
        print(
            f"{row['lever']:28} {row['plain_ms']:>9} {row['lever_ms']:>9} {row['speedup']:>8} "
            f"{row['max_abs_diff']:>11.2e} {row['first_call_s']:>13}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
