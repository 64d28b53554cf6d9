"""The steps a style goes through, shared by `emaki train/evaluate` and the bot's /train flow:
prepare (validate, store) a dataset, train it into a registered style, evaluate a style."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.coordinator.requests import build_params
from engine.coordinator.store import Store
from engine.errors import InvalidRequest
from engine.render.animate import FramePlan, frame_seed, render_frames
from engine.render.models import Models, StyleRef
from engine.settings import Settings
from training.dataset import Dataset, DatasetError, check_style_name, load_dataset, open_dataset
from training.evaluate import TinyFeatures, clip_score, fid_kid, temporal_ssim
from training.export import export_trained_style
from training.images import load_upright_rgb
from training.lora import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainProgress,
    TrainResult,
    kept_saves,
    save_name,
)

log = logging.getLogger(__name__)


def dataset_dir(settings: Settings, name: str) -> Path:
    return settings.data_dir / "datasets" / name


def style_dir(settings: Settings, name: str) -> Path:
    return settings.data_dir / "styles" / name


def prepare_dataset(
    settings: Settings,
    store: Store,
    source: Path,
    name: str,
    trigger: str = "",
    autocaption: bool = False,
    status: str = "pending",
    config: TrainConfig | None = None,
    **owner: Any,
) -> tuple[int, Dataset]:
    """Validate a dataset (zip or folder) and record it. A zip is extracted under the data dir; a run
    of the same style that was interrupted finds its extracted dataset and reuses it."""
    name = check_style_name(name, store)
    captioner = None
    if autocaption:
        from training.caption import Captioner

        captioner = Captioner(settings)
    target = dataset_dir(settings, name)
    if source.is_file() and target.exists():
        dataset = load_dataset(target, settings, captioner)
    else:
        dataset = open_dataset(source, target, settings, captioner)
    if captioner is not None:  # keep the generated captions with the dataset, for training and review
        lines = ["file_name,caption"] + [
            f"{item.path.relative_to(dataset.root).as_posix()},{json.dumps(item.caption)}" for item in dataset.items
        ]
        if dataset.root.is_relative_to(settings.data_dir):
            (dataset.root / "metadata.csv").write_text("\n".join(lines) + "\n")
            (dataset.root / "metadata.jsonl").unlink(missing_ok=True)
    dataset_id = store.add_dataset(
        style_name=name,
        trigger=trigger.strip(),
        path=str(dataset.root),
        n_images=len(dataset.items),
        status=status,
        params=asdict(config or TrainConfig()),
        **owner,
    )
    return dataset_id, dataset


def new_trainer(settings: Settings, dataset: Dataset, trigger: str, config: TrainConfig, out_dir: Path) -> Trainer:
    """The trainer for the base's family, as its files say (SD1.5's unless they say SDXL)."""
    from training.sdxl import FAMILY, SDXLTrainer, base_family

    trainer = SDXLTrainer if base_family(settings) == FAMILY else Trainer
    return trainer(settings, dataset, trigger, config, out_dir)


def train_style(
    settings: Settings,
    store: Store,
    dataset_id: int,
    on_step: Callable[[TrainProgress], None] | None = None,
    should_yield: Callable[[], bool] = lambda: False,
    on_checkpoint: Callable[[int, Image.Image], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_save: Callable[[int, Path], None] | None = None,
    renderers: Any = None,
    on_start: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train (or resume) a dataset's style; when it finishes, register the style with the values it
    was trained with. A run that diverges registers nothing and marks the dataset `failed`, which
    frees the style name for a new attempt (TrainingDiverged is raised on).

    `renderers`: the engine's (Engine.renderers). When they are remote (cluster mode) the training
    runs on one of them, a Ray actor, while the others keep animating; otherwise here, as always."""
    row = store.dataset(dataset_id)
    if row is None:
        raise InvalidRequest(f"dataset {dataset_id} does not exist")
    name = row["style_name"]
    if store.style(name) is not None:
        raise DatasetError(f"a style named '{name}' already exists")
    config = TrainConfig.from_dict(json.loads(row["params"] or "{}"))
    callbacks = dict(
        on_step=on_step,
        should_yield=should_yield,
        on_checkpoint=on_checkpoint,
        should_stop=should_stop,
        on_start=on_start,
    )
    try:
        if renderers is not None and renderers.remote:
            result, config, heldout = _train_remote(settings, renderers, row, config, on_save=on_save, **callbacks)
        else:
            dataset = load_dataset(Path(row["path"]), settings)
            trainer = new_trainer(settings, dataset, row["trigger"] or "", config, style_dir(settings, name))
            result = trainer.run(on_save=on_save, **callbacks)
            config = trainer.config
            heldout = [path.relative_to(dataset.root).as_posix() for path in trainer.heldout]
    except TrainingDiverged:
        store.update_dataset(dataset_id, status="failed")
        raise
    if result.finished:
        assert result.weights is not None
        tail = result.losses[-20:]
        family = trained_style_family(settings, result.weights, name)  # before anything is registered
        export_trained_style(settings, result.weights, name)  # the same style for A1111/ComfyUI
        register_trained_style(
            store,
            name,
            result.weights,
            family=family,
            trigger=row["trigger"] or "",
            config=config,
            steps=result.step,
            dataset_id=dataset_id,
            final_loss=sum(tail) / len(tail),
            heldout=heldout,
            guild_id=row.get("guild_id"),  # a server's dataset makes that server's style; the CLI's is global
        )
        store.update_dataset(dataset_id, status="trained")
    return result


@dataclass(frozen=True)
class RemoteTraining:
    """What a worker needs to train a style: everything by value or by content hash (the dataset, and
    the run folder of an earlier, paused run to resume from)."""

    name: str
    trigger: str
    config: dict[str, Any]
    dataset: tuple[str, str, Any]  # content hash, folder name, object-store handle
    state: tuple[str, str, Any] | None  # the same for the run folder (checkpoints), or None


def _train_remote(
    settings: Settings,
    renderers: Any,
    row: dict[str, Any],
    config: TrainConfig,
    on_step: Callable[[TrainProgress], None] | None,
    should_yield: Callable[[], bool],
    on_checkpoint: Callable[[int, Image.Image], None] | None,
    should_stop: Callable[[], bool],
    on_save: Callable[[int, Path], None] | None,
    on_start: Callable[[int, int], None] | None = None,
) -> tuple[TrainResult, TrainConfig, list[str]]:
    """The coordinator's half of a training on a worker: ship the dataset (and a paused run's folder)
    by content hash, relay the worker's events to the callbacks, raise the yield/stop flags it asks
    about, and unpack the run folder it sends back where an in-process run would have left it."""
    from engine.render.renderer import png_decode, unpack

    out = style_dir(settings, row["style_name"])
    dataset = Path(row["path"])

    def shipped(path: Path) -> tuple[str, str, Any]:
        sha256, blob = renderers.share(path)
        return sha256, path.name, blob

    request = RemoteTraining(
        name=row["style_name"],
        trigger=row["trigger"] or "",
        config=asdict(config),
        dataset=shipped(dataset),
        state=shipped(out) if out.is_dir() and any(out.iterdir()) else None,  # a paused run resumes there
    )

    def flags() -> set[str]:
        return {name for name, asked in (("yield", should_yield), ("stop", should_stop)) if asked()}

    saves: list[int] = []
    for kind, *data in renderers.run_task(train_on_worker, request, flags):
        if kind == "start" and on_start is not None:
            on_start(data[0], data[1])
        elif kind == "step" and on_step is not None:
            on_step(data[0])
        elif kind == "checkpoint" and on_checkpoint is not None:
            on_checkpoint(data[0], png_decode(data[1]))
        elif kind == "save":
            saves.append(data[0])
        elif kind == "done":
            step, losses, weights, resolved, heldout, folder = data
            tmp = out.with_name(f".{out.name}.incoming")
            shutil.rmtree(tmp, ignore_errors=True)
            unpack(folder, tmp, is_folder=True)
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
            for saved in saves:  # the run folder is here now: announce the kept saves with their paths
                if on_save is not None:
                    on_save(saved, out)
            result = TrainResult(weights=out / weights if weights else None, step=step, losses=losses)
            return result, TrainConfig.from_dict(resolved), heldout
    raise RuntimeError("the worker ended the training without a result")


def train_on_worker(settings: Settings, cache: Any, request: RemoteTraining, flagged: Callable[[str], bool]) -> Any:
    """The worker's half (runs in a Ray actor): fetch the dataset and any paused run by content hash,
    train in a scratch run folder, stream steps and checkpoint images, then send the run folder back
    (weights, checkpoints for a later resume, kept saves)."""
    import tempfile

    from engine.render.renderer import callbacks_as_events, pack, png_encode

    dataset_root = cache.get(request.dataset[0], request.dataset[1], request.dataset[2], is_folder=True)
    with tempfile.TemporaryDirectory(dir=cache.root) as scratch:
        run_dir = Path(scratch) / request.name
        if request.state is not None:
            shutil.copytree(cache.get(request.state[0], request.state[1], request.state[2], is_folder=True), run_dir)
        dataset = load_dataset(dataset_root, settings)
        trainer = new_trainer(settings, dataset, request.trigger, TrainConfig.from_dict(request.config), run_dir)

        def work(emit: Callable[[Any], None], closed: Callable[[], bool]) -> None:
            result = trainer.run(
                on_step=lambda progress: emit(("step", progress)),
                should_yield=lambda: flagged("yield"),
                on_checkpoint=lambda step, image: emit(("checkpoint", step, png_encode(image))),
                should_stop=lambda: closed() or flagged("stop"),
                on_save=lambda step, folder: emit(("save", step)),
                on_start=lambda step, total: emit(("start", step, total)),
            )
            weights = result.weights.relative_to(run_dir).as_posix() if result.weights else None
            heldout = [path.relative_to(dataset.root).as_posix() for path in trainer.heldout]
            folder = pack(run_dir)
            emit(("done", result.step, result.losses, weights, asdict(trainer.config), heldout, folder))

        yield from callbacks_as_events(work, f"emaki-train-{request.name}")


def trained_style_family(settings: Settings, weights: Path, name: str) -> str:
    """The family a trained style is for ("sd15", "sdxl"), read from its own file the way the renderer reads it
    (engine/render/style_files.py `read_style` against the running base, with its family): a file the renderer
    would refuse (a layer it cannot place, another family's keys) is one line here, before it is registered."""
    from engine.render.families import settings_family
    from engine.render.style_files import base_architecture, read_style

    family = settings_family(settings).name
    architecture = base_architecture(settings.base_model, settings.base_model_config)
    layers = read_style(weights, architecture, family=family, style_name=name)
    return layers.family or family


def register_trained_style(
    store: Store,
    name: str,
    weights: Path,
    trigger: str,
    config: TrainConfig,
    steps: int,
    dataset_id: int | None,
    final_loss: float | None = None,
    heldout: list[str] | None = None,
    guild_id: int | None = None,
    family: str = "sd15",
) -> None:
    """The one place a trained adapter becomes a style: the training values are recorded with it,
    and the dataset images it never saw (`heldout`, relative to the dataset) for evaluation, and the model
    family it was trained on (`trained_style_family`: /animate offers only the running family's styles)."""
    metrics: dict[str, Any] = {"training": asdict(config), "heldout_images": heldout or []}
    if final_loss is not None:
        metrics["final_loss"] = final_loss
    store.add_style(
        name,
        str(weights),
        trigger=trigger,
        adapter=config.adapter,
        steps=steps,
        dataset_id=dataset_id,
        metrics=metrics,
        guild_id=guild_id,
        family=family,
    )


def register_saved_step(settings: Settings, store: Store, name: str, run: str, step: int | None = None) -> Path:
    """Register the adapter a run kept at `step` (see `Trainer(save_every=...)`) as style `name`.
    `run` is the style name the run trained under. The save is copied beside the style, so
    pruning or retraining the run later cannot pull the weights from under it. Without `step`,
    the steps that can be chosen are listed in the error."""
    name = check_style_name(name, store)
    run_dir = style_dir(settings, (run or "").strip().lower())
    saves = kept_saves(run_dir)
    if not saves:
        raise InvalidRequest(f"run '{run}' has no kept saves (train with --save-every N to keep some)")
    if step not in saves:
        choices = ", ".join(str(s) for s in sorted(saves))
        raise InvalidRequest(f"run '{run}' has no save at step {step}: choose one of {choices}")
    source = saves[step].parent
    recorded = json.loads((source / "training.json").read_text()) if (source / "training.json").exists() else {}
    config = TrainConfig.from_dict(recorded)
    family = trained_style_family(settings, saves[step], name)  # a save of another base's run: one line, no copy
    target = style_dir(settings, name) / f"from-{run_dir.name}-{save_name(step)}"
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    os.replace(tmp, target)
    rows = store.datasets_where("style_name = ?", [run_dir.name])
    register_trained_style(
        store,
        name,
        target / saves[step].name,
        family=family,
        trigger=(rows[-1]["trigger"] or "") if rows else "",
        config=config,
        steps=step,
        dataset_id=rows[-1]["id"] if rows else None,
        heldout=recorded.get("heldout", []),
    )
    return target / saves[step].name


def evaluate_style(
    settings: Settings,
    store: Store,
    models: Models,
    name: str,
    samples: int | None = None,
    features: str = "auto",
    animation: bool = True,
    on_image: Callable[[int, int], None] | None = None,
    baseline: bool = True,
) -> dict[str, Any]:
    """Generate images from the dataset's captions with the style, and (`baseline`) the same
    prompts and seeds with no style; FID/KID of each against the dataset images (both sets scaled
    and centre-cropped alike, KID subsets seeded), the CLIP score of each against its captions, and
    the temporal SSIM of one animation in the style. Stored with the style."""
    style = store.style(name)
    if style is None:
        raise InvalidRequest(f"unknown style '{name}'")
    row = store.dataset(style["dataset_id"]) if style.get("dataset_id") is not None else None
    if row is None:
        raise InvalidRequest(f"style '{name}' has no dataset recorded to compare against")
    dataset = load_dataset(Path(row["path"]), settings)
    samples = samples or settings.eval_samples
    if samples < 2:
        raise InvalidRequest("evaluation needs at least 2 samples")
    tiny_features = features == "tiny" or (features == "auto" and settings.is_tiny)
    feature: int | torch.nn.Module = TinyFeatures() if tiny_features else 2048
    ref = StyleRef(
        name=name,
        path=style["path"],
        trigger=style["trigger"] or "",
        weight=style["weight"] or 1.0,
        adapter=style["adapter"] or "lora",
    )
    captions = [dataset.items[i % len(dataset.items)].caption for i in range(samples)]
    prompts = [f"{ref.trigger}, {c}" if ref.trigger else c for c in captions]
    rounds = [ref, None] if baseline else [ref]
    total = samples * len(rounds)
    images: dict[str, list[Image.Image]] = {}
    for round_index, active in enumerate(rounds):
        models.use_style(active)
        pipe = models.load().txt2img
        assert pipe is not None
        made = []
        for i, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(i)
            made.append(
                pipe(
                    prompt,
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance,
                    height=settings.height,
                    width=settings.width,
                    generator=generator,
                ).images[0]
            )
            if on_image is not None:
                on_image(round_index * samples + i + 1, total)
        images["style" if active is not None else "baseline"] = made
    models.use_style(ref)
    real = [load_upright_rgb(item.path) for item in dataset.items]
    recorded = json.loads(style["metrics"] or "{}").get("heldout_images") or []
    heldout = [load_upright_rgb(dataset.root / name) for name in recorded if (dataset.root / name).is_file()]
    size = 299 if isinstance(feature, int) else 64
    clip = load_clip_model(settings)
    figures = {}
    for key, generated in images.items():
        figures[key] = fid_kid(real, generated, feature=feature, size=size)
        if len(heldout) >= 2:  # against images the style never saw: generalising, not memorising
            figures[key]["heldout"] = fid_kid(heldout, generated, feature=feature, size=size)
        if clip is not None:
            figures[key]["clip_score"] = clip_score(generated, captions, *clip[1:])
    metrics: dict[str, Any] = dict(figures["style"])
    metrics["features"] = "inception-2048" if isinstance(feature, int) else "tiny-random-conv"
    if clip is not None:
        metrics["clip_model"] = clip[0]
    if "baseline" in figures:
        metrics["baseline"] = figures["baseline"]
    if animation:
        params = build_params(settings, store, dataset.items[0].caption, style=name, seed=0)
        plans = [
            FramePlan(
                i,
                f"{ref.trigger}, {dataset.items[0].caption}" if ref.trigger else dataset.items[0].caption,
                frame_seed(0, i),
                params.strength,
                params.steps,
                params.guidance,
            )
            for i in range(params.frames)
        ]
        frames = [image for _, image in render_frames(models, params, plans)]
        metrics["temporal_ssim"] = temporal_ssim(frames)
    store.update_style(name, metrics={**json.loads(style["metrics"] or "{}"), **metrics})
    return metrics


def load_clip_model(settings: Settings) -> tuple[str, Any, Any] | None:
    """(label, model, processor) of `clip_model` from disk, or None when it is not there (the other figures
    stand without it; `emaki models pull` fetches it). Never downloads."""
    from transformers import CLIPModel, CLIPProcessor

    from engine.errors import ModelLoadError
    from engine.render.loading import load_complete, load_model
    from engine.render.model_files import clip_spec

    spec = clip_spec(settings)
    try:
        model = load_complete(spec, CLIPModel.from_pretrained).eval()
        processor = load_model(spec, CLIPProcessor.from_pretrained)
    except ModelLoadError as exc:
        log.warning("no CLIP score: %s", exc)
        return None
    label = "tiny-random-clip (random weights: the number means nothing)" if settings.is_tiny else spec.ref
    return label, model, processor
