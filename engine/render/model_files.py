"""Where each model of a profile comes from, and which of its files are on disk.

A model reference (`EMAKI_BASE_MODEL`, ...) is a hub id, a local diffusers/transformers folder, or, for the
base model, one `.safetensors`/`.ckpt` file in the original LDM layout. Loading never downloads: a hub model
is read from the Hugging Face cache, which `emaki models pull` fills, so a bot never stalls on a download
mid-job and a missing model is one line naming it, where it was looked for, and the command that fixes it.

On fp16/bf16 the `fp16` weight variant is used when the folder or cache has it (half the bytes on disk and
to download); when only one of the two sets is present, that one is used and cast to the requested dtype.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.errors import ModelLoadError
from engine.render import tiny_hub
from engine.settings import Settings

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb", ".gguf")
# Weight formats emaki's loaders read, best first.
LOADABLE_FORMATS = (".safetensors", ".bin")
# Small files a loader needs besides the weights: configs, tokenizers, processors.
CONFIG_SUFFIXES = (".json", ".txt", ".model")
# Pipeline folders emaki never loads (it passes safety_checker=None), so pull skips their weights.
SKIPPED_FOLDERS = ("safety_checker",)
# The components of a pipeline that must have weights (SD1.5's; SDXL adds its second text encoder, required
# whenever the pipeline has that folder: see `select_files`).
PIPELINE_WEIGHT_FOLDERS = ("text_encoder", "unet", "vae")
SECOND_TEXT_ENCODER = "text_encoder_2"
PULL_COMMAND = "emaki models pull"

Kind = Literal["hub", "folder", "file", "tiny"]


@dataclass(frozen=True)
class ModelSpec:
    """One model a profile uses, as configured."""

    role: str  # what a person calls it: "base model", "depth ControlNet", ...
    setting: str  # the Settings field that names it (EMAKI_<SETTING>)
    ref: str  # hub id, folder or file
    pipeline: bool  # a diffusers pipeline (model_index.json + component folders) rather than one model
    half: bool  # loaded in fp16/bf16, so the fp16 weight variant is wanted
    # A pipeline's component folders that must hold weights (SD's unless told: the video model has a transformer).
    weight_folders: tuple[str, ...] = PIPELINE_WEIGHT_FOLDERS


# Roles of models that only one feature needs: a missing one turns that feature off, not the product.
# (The story LLM is listed only when EMAKI_STORY_BACKEND=transformers names it: then it is required.)
OPTIONAL_ROLES = {
    "captioner_model": "--autocaption",
    "clip_model": "the CLIP score of a trained style",
    "video_model": "--motion video",
}


def profile_models(s: Settings, half: bool) -> list[ModelSpec]:
    """Every model the product can load with these settings: what `emaki models pull` fetches and `check`
    checks. The depth estimator, safety checker and captioner always run in fp32; the motion adapter
    (motion mode) and the video model are listed only when configured, the story LLM only for the transformers
    backend."""
    specs = [
        ModelSpec("base model", "base_model", s.base_model, pipeline=True, half=half),
        ModelSpec("depth ControlNet", "controlnet_model", s.controlnet_model, pipeline=False, half=half),
        ModelSpec("depth estimator", "depth_model", s.depth_model, pipeline=False, half=False),
        safety_spec(s),
        captioner_spec(s),
        clip_spec(s),
    ]
    if s.story_backend == "transformers":
        specs.append(llm_spec(s))
    if s.motion_adapter:
        specs.append(ModelSpec("motion adapter (motion mode)", "motion_adapter", s.motion_adapter, False, False))
    if s.video_model:  # tens of GB with its T5 encoder: fetched only when the operator names one
        specs.append(video_spec(s, half))
    return specs


# LTX-Video's pipeline folders that hold weights (the tokenizer and scheduler hold configs only).
VIDEO_WEIGHT_FOLDERS = ("text_encoder", "transformer", "vae")


def video_spec(s: Settings, half: bool) -> ModelSpec:
    return ModelSpec("video model (--motion video)", "video_model", s.video_model, True, half, VIDEO_WEIGHT_FOLDERS)


def safety_spec(s: Settings) -> ModelSpec:
    return ModelSpec("safety checker (screening)", "safety_model", s.safety_model, pipeline=False, half=False)


def captioner_spec(s: Settings) -> ModelSpec:
    return ModelSpec("captioner (--autocaption)", "captioner_model", s.captioner_model, pipeline=False, half=False)


def clip_spec(s: Settings) -> ModelSpec:
    return ModelSpec("CLIP (style evaluation)", "clip_model", s.clip_model, pipeline=False, half=False)


def llm_spec(s: Settings) -> ModelSpec:
    return ModelSpec("story LLM (transformers backend)", "llm_model", s.llm_model, pipeline=False, half=False)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def looks_local(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or Path(ref).exists() or ref.lower().endswith(SINGLE_FILE_SUFFIXES)


def kind_of(ref: str) -> Kind:
    """`tiny` (a tiny repo in emaki's own cache, engine/render/tiny_hub.py), a hub id, a folder or one file."""
    if tiny_hub.is_tiny_ref(ref):
        return "tiny"
    if not looks_local(ref):
        return "hub"
    return "file" if ref.lower().endswith(SINGLE_FILE_SUFFIXES) else "folder"


def is_variant(name: str, variant: str = "fp16") -> bool:
    """`diffusion_pytorch_model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`."""
    return f".{variant}." in Path(name).name or f".{variant}-" in Path(name).name


def select_files(
    files: Iterable[str], *, pipeline: bool, want_fp16: bool, weight_folders: tuple[str, ...] = PIPELINE_WEIGHT_FOLDERS
) -> tuple[list[str], str | None, list[str]]:
    """From a repo's (or folder's) relative file names: the files to fetch or load, the weight variant to
    ask the loader for ("fp16" or None), and the folders that have no loadable weights ("" is the root).

    One variant for the whole model: diffusers loads every component with the same `variant`."""
    files = [f.replace(os.sep, "/") for f in files]
    needed_dirs: tuple[str, ...] = weight_folders if pipeline else ("",)
    if pipeline and any(f.startswith(f"{SECOND_TEXT_ENCODER}/") for f in files):  # SDXL
        needed_dirs = (*needed_dirs, SECOND_TEXT_ENCODER)
    weights: dict[str, list[str]] = {d: [] for d in needed_dirs}
    configs = []
    for name in files:
        folder = name.rsplit("/", 1)[0] if "/" in name else ""
        if folder.split("/")[0] in SKIPPED_FOLDERS:
            continue
        # A pipeline's configs live in its component folders; a single model keeps them at its root.
        if name.endswith(CONFIG_SUFFIXES) and (pipeline or folder == ""):
            configs.append(name)
        elif name.endswith(LOADABLE_FORMATS) and folder in weights:
            weights[folder].append(name)

    def pick(folder_files: list[str], fp16: bool) -> list[str]:
        for suffix in LOADABLE_FORMATS:
            chosen = [f for f in folder_files if f.endswith(suffix) and is_variant(f) == fp16]
            if chosen:
                return chosen
        return []

    has_fp16 = all(pick(w, True) for w in weights.values())
    has_full = all(pick(w, False) for w in weights.values())
    use_fp16 = has_fp16 and (want_fp16 or not has_full)
    chosen = {d: pick(w, use_fp16) for d, w in weights.items()}
    missing = [d for d, f in chosen.items() if not f]
    return sorted(configs + [f for fs in chosen.values() for f in fs]), ("fp16" if use_fp16 else None), missing


def relative_files(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)).replace(os.sep, "/") for p in folder.rglob("*") if p.is_file()]


@dataclass(frozen=True)
class Resolved:
    """A model found on disk, ready for a loader."""

    spec: ModelSpec
    path: Path  # the folder to load from, or the single file
    variant: str | None  # "fp16" or None
    config: Path | None = None  # a single file's config folder


def cached_snapshot(repo_id: str, cache_dir: Path) -> Path | None:
    """The cached snapshot folder of a hub repo (its `main` ref), or None. Never touches the network."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo_dir / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def not_found(spec: ModelSpec, where: str, why: str) -> ModelLoadError:
    """A hub model that is not (fully) in the cache: what to run."""
    other = f", or set EMAKI_{spec.setting.upper()} to a local folder or file" if spec.setting else ""
    return ModelLoadError(f"{spec.role} '{spec.ref}' {why} ({where}): run `{PULL_COMMAND}`{other}")


def hub_location(spec: ModelSpec, cache_dir: Path | None = None, build: bool = True) -> tuple[str, Path]:
    """The hub id a model stands for and the cache it is read from: a tiny model's repo in emaki's own
    cache (built there the first time it is asked for, unless `build` is off), any other hub id in the
    Hugging Face cache."""
    if kind_of(spec.ref) == "tiny":
        try:
            repo_id = tiny_hub.repo_for(spec.setting, spec.ref)
        except ValueError as exc:
            raise ModelLoadError(f"cannot load {spec.role}: {exc}") from None
        tiny_hub.ensure(repo_id, build=build)
        return repo_id, tiny_hub.cache_dir()
    return spec.ref, cache_dir or hub_cache_dir()


def resolve(spec: ModelSpec, config_ref: str = "", cache_dir: Path | None = None, build: bool = True) -> Resolved:
    """Find `spec` on disk or raise one line that says which model, where it looked and what to do.
    A tiny model is a hub repo like any other, only in emaki's own cache (`build=False`: not built here)."""
    kind = kind_of(spec.ref)
    located = hub_location(spec, cache_dir, build) if kind in ("hub", "tiny") else (spec.ref, cache_dir)
    repo_id, cache_dir = located
    cache_dir = cache_dir or hub_cache_dir()
    if kind in ("file", "folder") and not Path(spec.ref).expanduser().exists():
        raise ModelLoadError(f"cannot load {spec.role}: local path '{spec.ref}' does not exist")
    if kind == "file":
        if not spec.pipeline:
            raise ModelLoadError(f"cannot load {spec.role} from '{spec.ref}': only the base model can be one file")
        path = Path(spec.ref).expanduser()
        if path.suffix.lower() == ".safetensors":
            unreadable_safetensors(spec, path)
        if spec.setting == "base_model":  # its own keys say its family: before asking for a config
            refuse_other_family(spec, path, single_file=True)
        return Resolved(spec, path, None, resolve_config(spec, config_ref, cache_dir))
    if kind == "folder":
        folder = Path(spec.ref).expanduser()
    else:
        snapshot = cached_snapshot(repo_id, cache_dir)
        if snapshot is None:
            raise not_found(spec, f"hub cache {cache_dir}", "is not downloaded")
        folder = snapshot
    marker = "model_index.json" if spec.pipeline else "config.json"
    if not folder.is_dir():
        raise ModelLoadError(f"cannot load {spec.role} from '{spec.ref}': {folder} is a file, not a folder")
    if not (folder / marker).is_file():  # before walking it: a wrong folder (/usr, /) is one line at once
        problem, variant = f"no {marker}", None
        files: list[str] = []
    else:
        if spec.setting == "base_model":  # an SD3/Flux folder has no unet/: its family says more than that
            refuse_other_family(spec, folder, single_file=False)
        files = relative_files(folder)
        _, variant, missing = select_files(
            files, pipeline=spec.pipeline, want_fp16=spec.half, weight_folders=spec.weight_folders
        )
        folders = ", ".join(f"{m}/" if m else "its top folder" for m in missing)
        problem = f"no weights in {folders}" if missing else ""
        if not problem and spec.pipeline:
            problem = components_without_config(folder, files)
    if problem and kind in ("hub", "tiny"):
        raise not_found(spec, f"hub cache {cache_dir}", f"is only partly downloaded: {problem}")
    if problem:
        raise ModelLoadError(f"cannot load {spec.role} from '{spec.ref}': {problem} in {folder}")
    return Resolved(spec, folder, variant)


# --- which model family a base model is (read from its files, never guessed from its name) -----------
FAMILY_NAMES = {"sd15": "SD1.5", "sd2": "SD2", "sdxl": "SDXL-class", "sd3": "SD3", "flux": "Flux"}
# SDXL's refiner: img2img only, its one text encoder OpenCLIP bigG (the base's second), aesthetic-score conditioning.
FAMILY_NAMES["sdxl-refiner"] = "SDXL refiner"
# model_index.json's pipeline class -> family (SD2 shares SD1.5's class: told apart by its UNet's width).
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionImg2ImgPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
# A single file's key prefixes (original layouts) -> family, most specific first.
CHECKPOINT_FAMILIES = (
    ("conditioner.embedders.0.model.", "sdxl-refiner"),  # the base has CLIP ViT-L there (`.transformer.`)
    ("conditioner.embedders.", "sdxl"),
    ("model.diffusion_model.joint_blocks.", "sd3"),
    ("double_blocks.", "flux"),
    ("model.diffusion_model.double_blocks.", "flux"),
    ("cond_stage_model.model.", "sd2"),  # OpenCLIP text encoder
    ("cond_stage_model.transformer.", "sd15"),
)


def base_family(path: Path, single_file: bool) -> tuple[str, str]:
    """(family, the evidence): from model_index.json and the UNet's config for a folder, from the key names
    of a `.safetensors` (its header only) for a single file. ("", "") when the files do not say."""
    import json

    if single_file:
        keys = checkpoint_keys(path)
        for prefix, family in CHECKPOINT_FAMILIES:
            if any(k.startswith(prefix) for k in keys):
                return family, f"its keys include {prefix}*"
        return "", ""
    try:
        index = json.loads((path / "model_index.json").read_text())
        unet = json.loads((path / "unet" / "config.json").read_text()) if (path / "unet").is_dir() else {}
    except (OSError, ValueError):
        return "", ""
    pipeline = str(index.get("_class_name", ""))
    family = PIPELINE_FAMILIES.get(pipeline, "")
    if unet.get("addition_embed_type") == "text_time":
        family = "sdxl"
        if index.get("requires_aesthetics_score") is True or index.get("text_encoder") == [None, None]:
            family = "sdxl-refiner"
    elif family == "sd15" and unet.get("cross_attention_dim") == 1024:
        family = "sd2"
    return family or pipeline, f"model_index.json names {pipeline}" if pipeline else ""


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a single-file checkpoint without reading its weights: a `.safetensors` header, or a
    `.ckpt` unpickled with torch's `weights_only` loader (no code runs) and memory-mapped (nothing is read but
    the names); [] when the file cannot be read that way (the loader then says why, in its one line)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as weights:
                return list(weights.keys())
        import torch

        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable, an old pickle format, a pickle of other objects
        return []
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # how LDM/SGM trainers save
        state = state["state_dict"]
    return [str(key) for key in state] if isinstance(state, dict) else []


# The families the renderer has (engine/render/families/: one module each; tests keep the two lists equal).
RENDERED_FAMILIES = ("sd15", "sdxl")


def unreadable_safetensors(spec: ModelSpec, path: Path) -> None:
    """A truncated or damaged `.safetensors` (an interrupted download) is one line saying so, not the loader's
    "Unable to load weights"."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # noqa: BLE001 - safetensors' own error names what is wrong with the header
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{spec.role} '{spec.ref}' is not a readable .safetensors ({reason}): it is truncated or damaged; "
            "download it again or replace the file"
        ) from None


def refuse_other_family(spec: ModelSpec, path: Path, single_file: bool) -> None:
    """This bot renders SD1.5 and SDXL-class models: a base of another family is one line naming the family
    its files show."""
    family, evidence = base_family(path, single_file)
    if family and family not in RENDERED_FAMILIES:
        name = FAMILY_NAMES.get(family, family)
        raise ModelLoadError(
            f"{spec.role} '{spec.ref}' is of the {name} family ({evidence}); this bot renders SD1.5 and SDXL-class "
            "models: set EMAKI_BASE_MODEL to one of those (hub id, diffusers folder or single file)"
        )


# Pipeline parts emaki passes as None: their folders may be absent or partial.
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def components_without_config(folder: Path, files: list[str]) -> str:
    """What is wrong with a pipeline folder's parts ("" when nothing): model_index.json must be JSON and
    every part it names (those emaki loads) needs its config or tokenizer files."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return "model_index.json is not valid JSON"
    if not isinstance(index, dict):
        return "model_index.json is not a pipeline index"
    without = [
        name
        for name, value in index.items()
        if not name.startswith("_")
        and name not in UNUSED_COMPONENTS
        and isinstance(value, list)
        and all(value)
        and not any(f.startswith(f"{name}/") and f.endswith((".json", ".txt")) for f in files)
    ]
    return f"no config in {', '.join(f'{n}/' for n in without)}" if without else ""


def resolve_config(spec: ModelSpec, config_ref: str, cache_dir: Path) -> Path:
    """The diffusers folder whose configs and tokenizer describe a single-file checkpoint."""
    if not config_ref:
        raise ModelLoadError(f"{spec.role} '{spec.ref}' is one file: set EMAKI_BASE_MODEL_CONFIG to its config")
    if kind_of(config_ref) == "tiny":
        config_ref, cache_dir = tiny_hub.repo_for("base_model_config", config_ref), tiny_hub.cache_dir()
        tiny_hub.ensure(config_ref)  # an unknown emaki-tiny/ id is one ModelLoadError line
    if kind_of(config_ref) == "folder":
        folder = Path(config_ref).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"config for {spec.role} '{spec.ref}': {folder} is not a diffusers folder (no model_index.json)"
            )
        return folder
    snapshot = cached_snapshot(config_ref, cache_dir)
    if snapshot is None or not (snapshot / "model_index.json").is_file():
        raise ModelLoadError(
            f"config '{config_ref}' for {spec.role} '{spec.ref}' is not downloaded (hub cache {cache_dir}): "
            f"run `{PULL_COMMAND}`, or set EMAKI_BASE_MODEL_CONFIG to a local diffusers folder"
        )
    return snapshot


# --- what is on disk --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnDisk:
    """What `emaki models check` reports for one model."""

    spec: ModelSpec
    kind: Kind
    where: str  # the folder, file or cache it was looked for in
    ready: bool  # loadable as it is
    size_bytes: int  # on disk (for a hub model: the whole cached repo, every revision)
    variant: str | None
    problem: str  # why it is not ready ("" when it is)


def on_disk(spec: ModelSpec, config_ref: str = "", cache_dir: Path | None = None) -> OnDisk:
    kind = kind_of(spec.ref)
    try:
        found = resolve(spec, config_ref, cache_dir, build=False)  # a check writes nothing
        ready, problem, variant = True, "", found.variant
    except ModelLoadError as exc:
        found, ready, problem, variant = None, False, str(exc), None
    if kind in ("hub", "tiny"):
        tiny = kind == "tiny"
        repo_id = tiny_hub.repo_for(spec.setting, spec.ref) if tiny else spec.ref
        cache_dir = tiny_hub.cache_dir() if tiny else cache_dir or hub_cache_dir()
        where = str(cache_dir)
        repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
        size = _size(repo_dir / "blobs") if repo_dir.is_dir() else 0
    else:
        path = Path(spec.ref).expanduser()
        where, size = str(path), _size(path) if ready else 0  # a wrong folder (/, /usr) is not walked
    return OnDisk(spec, kind, where, ready, size, variant, problem)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


# Key prefixes of the parts of a single-file checkpoint (original LDM/SGM layout): SD1.5 keeps its text encoder
# under `cond_stage_model.`, SDXL both of its encoders under `conditioner.embedders.{0,1}.`.
LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",
    "text_encoder_2": "conditioner.embedders.1.",
}
LDM_PREFIX_ALIASES = {"conditioner.embedders.0.": "text_encoder"}


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters per part of a model, read from safetensors headers (no weights are read)."""

    parts: dict[str, int]  # "unet"/"vae"/"text_encoder" for a base model, "" for a single model
    largest_tensor: int


def parameter_counts(found: Resolved) -> ParameterCounts | None:
    """From the safetensors headers of the files that would load; None when the weights are not
    safetensors (a `.bin`/`.ckpt` can only be counted by unpickling it)."""
    from safetensors import safe_open

    if found.config is not None:  # a single file: its parts are key prefixes
        files: dict[str, list[Path]] = {"": [found.path]}
    else:
        chosen, _, _ = select_files(
            relative_files(found.path),
            pipeline=found.spec.pipeline,
            want_fp16=found.variant == "fp16",
            weight_folders=found.spec.weight_folders,
        )
        files = {}
        for name in chosen:
            if name.endswith(LOADABLE_FORMATS):
                files.setdefault(name.rsplit("/", 1)[0] if "/" in name else "", []).append(found.path / name)
    parts: dict[str, int] = {}
    largest = 0
    for folder, paths in files.items():
        for path in paths:
            if path.suffix != ".safetensors":
                return None
            try:
                opened = safe_open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001 - truncated, empty, not safetensors: one line
                raise ModelLoadError(
                    f"{found.spec.role} '{found.spec.ref}': {path.name} is not a readable .safetensors ({exc}); "
                    f"download it again (`{PULL_COMMAND}`) or replace the file"
                ) from None
            with opened as weights:
                for key in weights.keys():  # noqa: SIM118 - safe_open is not iterable
                    numel = 1
                    for dim in weights.get_slice(key).get_shape():
                        numel *= dim
                    part = folder or next(
                        (
                            p
                            for pre, p in (*((v, k) for k, v in LDM_PREFIXES.items()), *LDM_PREFIX_ALIASES.items())
                            if key.startswith(pre)
                        ),
                        "",
                    )
                    parts[part] = parts.get(part, 0) + numel
                    largest = max(largest, numel)
    return ParameterCounts(parts, largest)
