"""The steps a style goes through, shared by `emaki train/evaluate` and the bot's /train flow:
prepare (validate, store) a dataset, train it into a registered style, evaluate a style."""

from __future__ import annotations

import json
import logging
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
from training.evaluate import TinyFeatures, fid_kid, temporal_ssim
from training.export import export_trained_style
from training.lora import TrainConfig, Trainer, TrainProgress, TrainResult

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
) -> TrainResult:
    """Train (or resume) a dataset's style; when it finishes, register the style."""
    row = store.dataset(dataset_id)
    if row is None:
        raise InvalidRequest(f"dataset {dataset_id} does not exist")
    name = row["style_name"]
    if store.style(name) is not None:
        raise DatasetError(f"a style named '{name}' already exists")
    dataset = load_dataset(Path(row["path"]), settings)
    config = TrainConfig(**json.loads(row["params"] or "{}"))
    trainer = Trainer(settings, dataset, row["trigger"] or "", config, style_dir(settings, name))
    result = trainer.run(
        on_step=on_step, should_yield=should_yield, on_checkpoint=on_checkpoint, should_stop=should_stop
    )
    if result.finished:
        assert result.weights is not None
        export_trained_style(settings, result.weights, name)  # the same style for A1111/ComfyUI
        store.add_style(
            name,
            str(result.weights),
            trigger=row["trigger"] or "",
            adapter=trainer.config.adapter,
            steps=result.step,
            dataset_id=dataset_id,
            metrics={"final_loss": sum(result.losses[-20:]) / len(result.losses[-20:])},
        )
        store.update_dataset(dataset_id, status="trained")
    return result


def evaluate_style(
    settings: Settings,
    store: Store,
    models: Models,
    name: str,
    samples: int | None = None,
    features: str = "auto",
    animation: bool = True,
    on_image: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Generate images from the dataset's captions with the style; FID/KID against the dataset
    images; the temporal SSIM of one animation in the style. Stored with the style."""
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
    feature: int | torch.nn.Module = (
        TinyFeatures() if (features == "tiny" or (features == "auto" and settings.is_tiny)) else 2048
    )
    ref = StyleRef(
        name=name,
        path=style["path"],
        trigger=style["trigger"] or "",
        weight=style["weight"] or 1.0,
        adapter=style["adapter"] or "lora",
    )
    models.use_style(ref)
    pipe = models.load().txt2img
    assert pipe is not None
    generated = []
    for i in range(samples):
        caption = dataset.items[i % len(dataset.items)].caption
        prompt = f"{ref.trigger}, {caption}" if ref.trigger else caption
        generator = torch.Generator("cpu").manual_seed(i)
        generated.append(
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
            on_image(i + 1, samples)
    real = [Image.open(item.path).convert("RGB") for item in dataset.items]
    size = 299 if isinstance(feature, int) else 64
    metrics: dict[str, Any] = fid_kid(real, generated, feature=feature, size=size)
    metrics["features"] = "inception-2048" if isinstance(feature, int) else "tiny-random-conv"
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
