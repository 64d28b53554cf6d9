"""A compiled UNet whose LoRA style is hot-swapped in place, so switching styles never recompiles.

torch.compile specialises the graph on the modules it sees; loading a second peft adapter, or
switching the active one, changes them and costs a recompile (tens of seconds on a GPU, minutes on a
CPU) on the next job. diffusers' hot-swap (`enable_lora_hotswap` + `load_lora_weights(hotswap=True)`,
built on peft's `hotswap_adapter_from_state_dict`) instead overwrites the weights of one adapter slot
in place, with ranks padded to a target rank and scalings held as tensors. The slot is created before
compiling with a *neutral* LoRA (B = 0: no effect) over every layer a style may touch; "no style" is
that neutral LoRA swapped back in. A style's weight is folded into its B matrices rather than set as
a scale, because changing a scale would change a guarded value and recompile.

Only LoRA hot-swaps (peft's limit). LoHa/LoKr/IA3 styles, and LoRAs that touch layers outside the
slot, are refused by `CompiledUNet.use` with `NotHotSwappable`; the caller then renders that style on
the eager UNet (one log line) instead of recompiling.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from engine.settings import COMPILE_MODES

log = logging.getLogger(__name__)

SLOT = "emaki_style"
# Every UNet layer kind that SD1.5 LoRAs (diffusers, kohya, the attention-processor era) train.
SLOT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


class NotHotSwappable(ValueError):
    """This style cannot be swapped into the compiled slot (not LoRA, or layers outside the slot)."""


def _slot_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    layers = {}
    for name, module in unet.named_modules():
        if any(name.endswith("." + target) for target in SLOT_TARGETS) and isinstance(
            module, torch.nn.Linear | torch.nn.Conv2d
        ):
            layers[name] = module
    return layers


def neutral_lora(unet: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA over every slot layer with B = 0: loaded, it changes nothing."""
    state: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    for name, layer in _slot_layers(unet).items():
        if isinstance(layer, torch.nn.Linear):
            a_shape: tuple[int, ...] = (rank, layer.in_features)
            b_shape: tuple[int, ...] = (layer.out_features, rank)
        else:
            a_shape, b_shape = (rank, layer.in_channels, 1, 1), (layer.out_channels, rank, 1, 1)
        state[f"unet.{name}.lora_A.weight"] = torch.randn(a_shape, generator=generator) * 0.01
        state[f"unet.{name}.lora_B.weight"] = torch.zeros(b_shape)
    return state


def _copied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in state.items()}


def use_compile_cache(data_dir: Path) -> None:
    """Keep inductor's compiled kernels under the data dir, so a restart reuses them instead of
    compiling again, unless the operator chose a folder. (Inductor writes its own default into the
    variable when first imported, so the default does not count as a choice.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given is None or os.path.abspath(given) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(data_dir).resolve() / "compile-cache")


class CompiledUNet:
    """Owns the compiled UNet of `pipe` and the one LoRA slot inside it."""

    def __init__(self, pipe: Any, target_rank: int = 64, mode: str = "default") -> None:
        if mode not in COMPILE_MODES or mode == "off":
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES[1:])}, not {mode!r}")
        self.pipe = pipe
        self.target_rank = target_rank
        self.eager_unet = pipe.unet
        pipe.enable_lora_hotswap(target_rank=target_rank)
        self._neutral = neutral_lora(pipe.unet, target_rank)
        # Copies: the loaders may adopt the given tensors as the slot's parameters, and every later swap
        # writes into those in place.
        pipe.load_lora_weights(_copied(self._neutral), adapter_name=SLOT)
        self.active: tuple[str, float] | None = None
        pipe.unet = torch.compile(pipe.unet, mode=None if mode == "default" else mode)

    def use(self, lora_state: dict[str, torch.Tensor] | None, weight: float = 1.0, key: str = "") -> None:
        """Swap a LoRA state dict (diffusers/peft keys, `unet.` prefixed) into the slot, or the neutral
        one for `None`. `key` names what is loaded so repeating the same request costs nothing."""
        wanted = None if lora_state is None else (key, weight)
        if wanted == self.active:  # None at first too: the slot starts out neutral
            return
        if lora_state is None:
            state = _copied(self._neutral)
        else:
            state = {k: v for k, v in lora_state.items() if k.startswith("unet.")}
            if len(state) != len(lora_state):
                raise NotHotSwappable("it has text-encoder layers, which diffusers cannot hot-swap")
            state = {k: (v * weight if ".lora_B." in k else v.clone()) for k, v in state.items()}
        try:
            self.pipe.load_lora_weights(state, adapter_name=SLOT, hotswap=True)
        except (RuntimeError, ValueError) as exc:
            # The swap checks every key before writing any, so a refusal leaves the slot as it was.
            raise NotHotSwappable(str(exc).splitlines()[0][:200]) from exc
        self.active = wanted
