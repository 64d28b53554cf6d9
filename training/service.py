"""The steps a style goes through, shared by `emaki train/evaluate` and the bot's /train flow:
prepare (validate, store) a dataset, train it into a registered style, evaluate a style."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.animate import FramePlan, frame_seed, render_frames
from engine.errors import InvalidRequest
from engine.models import Models, StyleRef
from engine.params import build_params
from engine.settings import Settings
from engine.store import Store
from training.dataset import Dataset, DatasetError, check_style_name, load_dataset, open_dataset
from training.evaluate import TinyFeatures, clip_score, fid_kid, temporal_ssim, tiny_clip
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


def train_style(
    settings: Settings,
    store: Store,
    dataset_id: int,
    on_step: Callable[[TrainProgress], None] | None = None,
    should_yield: Callable[[], bool] = lambda: False,
    on_checkpoint: Callable[[int, Image.Image], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_save: Callable[[int, Path], None] | None = None,
) -> TrainResult:
    """Train (or resume) a dataset's style; when it finishes, register the style with the values it
    was trained with. A run that diverges registers nothing and marks the dataset `failed`, which
    frees the style name for a new attempt (TrainingDiverged is raised on)."""
    row = store.dataset(dataset_id)
    if row is None:
        raise InvalidRequest(f"dataset {dataset_id} does not exist")
    name = row["style_name"]
    if store.style(name) is not None:
        raise DatasetError(f"a style named '{name}' already exists")
    dataset = load_dataset(Path(row["path"]), settings)
    config = TrainConfig.from_dict(json.loads(row["params"] or "{}"))
    trainer = Trainer(settings, dataset, row["trigger"] or "", config, style_dir(settings, name))
    try:
        result = trainer.run(
            on_step=on_step,
            should_yield=should_yield,
            on_checkpoint=on_checkpoint,
            should_stop=should_stop,
            on_save=on_save,
        )
    except TrainingDiverged:
        store.update_dataset(dataset_id, status="failed")
        raise
    if result.finished:
        assert result.weights is not None
        tail = result.losses[-20:]
        export_trained_style(settings, result.weights, name)  # the same style for A1111/ComfyUI
        register_trained_style(
            store,
            name,
            result.weights,
            trigger=row["trigger"] or "",
            config=trainer.config,
            steps=result.step,
            dataset_id=dataset_id,
            final_loss=sum(tail) / len(tail),
            heldout=[path.relative_to(dataset.root).as_posix() for path in trainer.heldout],
            guild_id=row.get("guild_id"),  # a server's dataset makes that server's style; the CLI's is global
        )
        store.update_dataset(dataset_id, status="trained")
    return result


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
) -> None:
    """The one place a trained adapter becomes a style: the training values are recorded with it,
    and the dataset images it never saw (`heldout`, relative to the dataset) for evaluation."""
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
    clip = _clip_model(settings)
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


CLIP_MODEL = "openai/clip-vit-large-patch14"  # the CLIP score's usual model


def _clip_model(settings: Settings) -> tuple[str, Any, Any] | None:
    """(label, model, processor), or None where no CLIP model can be had (offline, not cached)."""
    if settings.is_tiny:
        return ("tiny-random-clip (random weights: the number means nothing)", *tiny_clip())
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIP_MODEL, CLIPModel.from_pretrained(CLIP_MODEL).eval(), CLIPProcessor.from_pretrained(CLIP_MODEL)
    except (OSError, ValueError) as exc:  # offline or not cached: the other figures stand without it
        log.warning("no CLIP score: %s cannot be loaded (%s)", CLIP_MODEL, type(exc).__name__)
        return None
