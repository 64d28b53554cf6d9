"""`emaki models pull | check` (and `emaki doctor` = `emaki models check`).

`pull` downloads every model of the active profile into the Hugging Face cache (only the files emaki
loads, in the fp16 variant when that dtype will be used) and verifies each loads. `check` is the first
thing a self-hoster runs: device, VRAM, dtype, versions, which models are on disk and their sizes, and
whether the profile fits the GPU. Loading never downloads (engine/render/model_files.py), so `pull` is the
one place the network is used for models.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from importlib import metadata
from typing import Any

from emaki.common import settings_from_args
from engine.errors import ModelLoadError
from engine.settings import Settings


def _versions() -> dict[str, str]:
    out = {}
    for name in ("emaki", "torch", "diffusers", "transformers", "peft", "huggingface_hub", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _device_lines(settings: Settings) -> tuple[list[str], Any, Any, int | None]:
    import torch

    from engine.render.loading import pick_device, pick_dtype

    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    free: int | None = None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return [f"device   {device}: CUDA is not available on this machine"], device, dtype, None
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        line = f"device   {device} ({name}): {total / 2**30:.1f} GiB VRAM, {free / 2**30:.1f} GiB free"
    else:
        line = f"device   {device}" + ("" if torch.cuda.is_available() else " (no CUDA GPU found)")
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    return [line, f"dtype    {names.get(dtype, str(dtype))}"], device, dtype, free


def cmd_check(args: argparse.Namespace) -> int:
    from engine.render import model_files
    from engine.render.model_files import human_size

    settings = settings_from_args(args)
    lines, device, dtype, free = _device_lines(settings)
    versions = _versions()
    print("versions " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for line in lines:
        print(line)
    print(f"profile  {settings.profile}; memory setting {settings.memory}")
    print(f"hub cache {model_files.hub_cache_dir()}")
    specs = model_files.profile_models(settings, half=dtype in (_half_dtypes()))
    ready = True
    counts: dict[str, Any] = {}
    width = max(len(s.role) for s in specs)
    for spec in specs:
        found = model_files.on_disk(spec, settings.base_model_config)
        if found.ready:
            variant = f", {found.variant} weights" if found.variant else ""
            where = f"random weights in emaki's tiny cache {found.where}" if found.kind == "tiny" else found.where
            kind = "" if found.kind == "tiny" else f"{found.kind}: "
            state = f"ready, {human_size(found.size_bytes)} on disk{variant} ({kind}{where})"
            try:
                counts[spec.setting] = model_files.parameter_counts(
                    model_files.resolve(spec, settings.base_model_config)
                )
            except ModelLoadError as exc:  # a weights file that cannot even be read
                state, ready = f"NOT READY: {exc}", ready and spec.setting in model_files.OPTIONAL_ROLES
        else:
            optional = model_files.OPTIONAL_ROLES.get(spec.setting)
            state = f"NOT READY{f' (only {optional} needs it)' if optional else ''}: {found.problem}"
            ready = ready and optional is not None
        print(f"  {spec.role:<{width}}  {spec.ref}: {state}")
    family = _family_line(settings)
    if family is not None:
        print(family[0])
        ready = ready and "NOT READY" not in family[0]
    print(_fit_line(settings, device, dtype, free, counts, family[1] if family else None))
    return 0 if ready else 1


def _family_line(settings: Settings) -> tuple[str, Any] | None:
    """The base model's family as its files show it, and the Family; None when the base is not ready. A base of
    another family than the profile's is NOT READY, with the profile to use."""
    from engine.render import model_files
    from engine.render.families import check_profile, check_single_file, family_of_found

    try:
        check_single_file(settings)  # an SDXL file on the sd15 profile: said before its config is missed
    except ModelLoadError as exc:
        return f"family   NOT READY: {exc}", None
    spec = model_files.profile_models(settings, half=False)[0]
    try:
        found = model_files.resolve(spec, settings.base_model_config, build=False)
    except ModelLoadError:
        return None
    family = family_of_found(found)
    _, evidence = model_files.base_family(found.path, single_file=found.config is not None)
    because = f" ({evidence})" if evidence else " (the files do not say: SD1.5 assumed)"
    try:
        check_profile(family, settings)
    except ModelLoadError as exc:
        return f"family   {family.title}{because}: NOT READY: {exc}", family
    line = f"family   {family.title}{because}; frames {settings.width}x{settings.height} by default"
    return line, family


def _half_dtypes() -> tuple[Any, ...]:
    from engine.render.models import HALF_DTYPES

    return HALF_DTYPES


def _fit_line(
    settings: Settings, device: Any, dtype: Any, free: int | None, counts: dict[str, Any], family: Any = None
) -> str:
    from engine.render import memory

    if settings.is_tiny:
        return "fits     yes: the tiny profile's models are a few MB"
    if device.type != "cuda":
        return "fits     no GPU: everything runs on the CPU (minutes per frame at 512x512)"
    needed = ("base_model", "controlnet_model", "depth_model")
    if any(counts.get(k) is None for k in needed):
        return "fits     unknown until the models are pulled (their parameter counts are read from the files)"
    base, controlnet, depth = (counts[k] for k in needed)
    need = memory.footprint_from_counts(
        base.parts,
        sum(controlnet.parts.values()),
        sum(depth.parts.values()),
        max(c.largest_tensor for c in (base, controlnet, depth)),
        dtype,
        **({"margin": family.working_margin} if family is not None else {}),
    )
    assert free is not None
    gib = 2**30
    needs = ", ".join(f"{m} {need.need(m) / gib:.1f} GiB" for m in memory.MODES)
    fitting = [m for m in memory.MODES if need.need(m) <= free]
    if settings.memory in memory.MODES:
        verdict = "yes" if settings.memory in fitting else f"no: EMAKI_MEMORY={settings.memory} needs more"
    else:
        verdict = f"yes, auto will use {fitting[0]}" if fitting else "no, not even with EMAKI_MEMORY=low"
    return f"fits     {verdict} ({free / gib:.1f} GiB free; needs {needs})"


def cmd_pull(args: argparse.Namespace) -> int:
    from engine.render import model_files
    from engine.render.loading import pick_device, pick_dtype
    from engine.render.models import HALF_DTYPES

    settings = settings_from_args(args)
    dtype = pick_dtype(settings.dtype, pick_device(settings.device))
    specs = model_files.profile_models(settings, half=dtype in HALF_DTYPES)
    cache_dir = model_files.hub_cache_dir()
    needs_hub = any(model_files.kind_of(spec.ref) == "hub" for spec in specs)
    if needs_hub and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelLoadError("HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it to pull models")
    for spec in specs:
        kind = model_files.kind_of(spec.ref)
        if kind == "hub":
            _pull_repo(
                spec.role,
                spec.ref,
                spec.pipeline,
                spec.half,
                settings,
                cache_dir,
                args.quiet,
                folders=spec.weight_folders,
            )
        elif kind == "tiny":
            print(f"{spec.role}: random weights, built in emaki's tiny cache (nothing to download)", file=sys.stderr)
            model_files.resolve(spec)  # builds it the first time
        else:
            print(f"{spec.role}: {spec.ref} is local, nothing to download", file=sys.stderr)
            if kind == "file" and model_files.kind_of(settings.base_model_config) == "hub":
                _pull_repo(
                    "its config", settings.base_model_config, True, False, settings, cache_dir, args.quiet, configs=True
                )
    _verify(settings, dtype)
    print("all models downloaded and verified", file=sys.stderr)
    return 0


def _pull_repo(
    role: str,
    repo_id: str,
    pipeline: bool,
    half: bool,
    settings: Settings,
    cache_dir: Any,
    quiet: bool,
    configs: bool = False,
    folders: tuple[str, ...] | None = None,
) -> None:
    from huggingface_hub import HfApi, snapshot_download
    from tqdm import tqdm

    from engine.render import model_files

    token = settings.hf_token or None
    # Read now: huggingface_hub reads HF_ENDPOINT (a mirror) once, when it is imported.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    print(f"{role}: asking {endpoint or 'the hub'} for {repo_id}", file=sys.stderr)
    try:
        files = HfApi(endpoint=endpoint).list_repo_files(repo_id, token=token)
    except Exception as exc:  # offline, unknown repo, gated repo: one line
        raise ModelLoadError(f"cannot list {role} '{repo_id}' on the hub: {_first_line(exc)}") from exc
    chosen, variant, missing = model_files.select_files(
        files, pipeline=pipeline, want_fp16=half, weight_folders=folders or model_files.PIPELINE_WEIGHT_FOLDERS
    )
    if configs:
        chosen = [f for f in chosen if f.endswith(model_files.CONFIG_SUFFIXES)]
    elif missing:
        raise ModelLoadError(f"{role} '{repo_id}' has no weights emaki can load in {', '.join(missing) or '/'}")

    class Bar(tqdm):  # emaki's own bar: on even when library bars are silenced, off with -q
        def __init__(self, *a: Any, **kw: Any) -> None:
            kw.pop("name", None)
            super().__init__(*a, **{**kw, "disable": quiet, "file": sys.stderr})

    print(f"{role}: downloading {len(chosen)} files{' (fp16 weights)' if variant else ''}", file=sys.stderr)
    try:
        snapshot_download(
            repo_id,
            allow_patterns=chosen,
            cache_dir=cache_dir,
            token=token,
            endpoint=endpoint,
            tqdm_class=Bar,
            max_workers=4,
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot download {role} '{repo_id}': {_first_line(exc)}") from exc


def _verify(settings: Settings, dtype: Any) -> None:
    """Load what was pulled, on the CPU, as the engine will (same resolution, same dtype): every model the
    settings can use, the safety checker, captioner, story LLM and motion adapter included."""
    import torch

    from engine.coordinator import safety
    from engine.coordinator.story import TransformersBackend
    from engine.render import motion
    from engine.render.models import load_components
    from training.caption import Captioner
    from training.service import load_clip_model

    cpu = dataclasses.replace(settings, device="cpu")
    load_components(settings, dtype)
    safety.SafetyChecker.load(cpu)
    Captioner(cpu)
    if load_clip_model(cpu) is None:
        raise ModelLoadError(f"CLIP (style evaluation) '{settings.clip_model}' did not load")
    if settings.story_backend == "transformers":  # its files and tokenizer: a 7B model is not loaded on the CPU
        from transformers import AutoConfig, AutoTokenizer

        folder = str(TransformersBackend(settings.llm_model).found.path)
        AutoConfig.from_pretrained(folder, local_files_only=True)
        AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if settings.motion_adapter:
        motion.load_adapter(cpu, torch.device("cpu"), dtype)
    from engine.render import video

    video.verify(cpu)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    models = sub.add_parser("models", parents=[common], help="download (pull) or check the profile's models")
    actions = models.add_subparsers(dest="models_command", required=True)
    pull = actions.add_parser("pull", parents=[common], help="download every model of the profile and verify it")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    pull.set_defaults(func=cmd_pull)
    check = actions.add_parser(
        "check", parents=[common], help="device, VRAM, versions, models on disk, whether it fits"
    )
    check.set_defaults(func=cmd_check)
    doctor = sub.add_parser("doctor", parents=[common], help="same as `emaki models check`")
    doctor.set_defaults(func=cmd_check)
