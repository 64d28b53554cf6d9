"""Loading one model from files on disk, the same way for every model and every profile: a hub repo in the
cache, a folder or a single file resolved by model_files, loaded with `local_files_only`, any failure one line.
Also the device and dtype every loader uses. Kept apart from models.py so that the motion adapter, the safety
checker, the captioner and the CLIP model load without importing the pipelines that hold them."""

from __future__ import annotations

from typing import Any

import torch

from engine.errors import InvalidRequest, ModelLoadError
from engine.render import model_files


def pick_device(setting: str) -> torch.device:
    if setting != "auto":
        return torch.device(setting)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        try:
            return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[setting]
        except KeyError:
            raise InvalidRequest(f"unknown dtype '{setting}': use auto, fp16, bf16 or fp32") from None
    return torch.float16 if device.type == "cuda" else torch.float32


def load_model(what: str | model_files.ModelSpec, ref_or_loader: Any, loader: Any = None, **kwargs: Any) -> Any:
    """Load one model found on disk (a folder, or a hub repo in the cache) with `loader` (a `from_pretrained`),
    turning any failure into one line naming the model and the cause.

    Called as `load_model(spec, loader, **kw)`, or `load_model("captioner", ref, loader, **kw)` for a model that is
    not part of `profile_models`."""
    if isinstance(what, model_files.ModelSpec):
        spec, loader = what, ref_or_loader
    else:
        spec = model_files.ModelSpec(what, "", str(ref_or_loader), pipeline=False, half=False)
    found = model_files.resolve(spec)
    if found.variant is not None:
        kwargs["variant"] = found.variant
    return call_loader(spec, loader, str(found.path), local_files_only=True, **kwargs)


def load_complete(spec: model_files.ModelSpec, loader: Any, **kwargs: Any) -> Any:
    """`load_model`, refusing a model whose files do not hold its class's weights: transformers fills what a
    checkpoint lacks with random values and only warns, so a folder of another kind of model (a depth
    estimator given as the safety checker) would load as a checker that never flags anything."""
    model, info = load_model(spec, loader, output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(
            f"cannot load {spec.role} from '{spec.ref}': its files lack {len(missing)} of the weights this kind "
            f"of model has (e.g. {sorted(missing)[0]}): is it the right model? Set EMAKI_{spec.setting.upper()}"
        )
    return model


def call_loader(spec: model_files.ModelSpec, loader: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return loader(*args, **kwargs)
    except Exception as exc:  # any loader failure becomes one clear line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {spec.role} from '{spec.ref}': {first_line[:300]}") from exc
