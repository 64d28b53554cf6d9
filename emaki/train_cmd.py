"""`emaki train` and `emaki evaluate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from emaki.common import settings_from_args
from engine.errors import InvalidRequest


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.store import open_store
    from training.lora import TrainConfig
    from training.service import prepare_dataset, style_dir, train_style

    settings = settings_from_args(args)
    store = open_store(settings.data_dir)
    name = (args.name or "").strip().lower()
    config = TrainConfig(
        steps=args.steps or 0,
        rank=args.rank,
        adapter=args.adapter,
        optimizer=args.optimizer,
        learning_rate=args.lr or 0.0,
        resolution=args.resolution or 0,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        train_text_encoder=args.train_text_encoder,
    )
    # An interrupted run of this style left its dataset row and checkpoint: continue it.
    earlier = store.datasets_where("style_name = ? and status = 'approved'", [name])
    if earlier and (style_dir(settings, name) / "checkpoint.pt").exists():
        dataset_id = earlier[-1]["id"]
        print(f"resuming the interrupted training of '{name}'", file=sys.stderr)
    else:
        config.resolved(settings.min_dataset_images, settings)  # refuse bad options before any work
        dataset_id, dataset = prepare_dataset(
            settings,
            store,
            Path(args.dataset),
            name,
            args.trigger or "",
            autocaption=args.autocaption,
            status="approved",
            config=config,
        )
        print(f"dataset: {len(dataset.items)} images from {dataset.root}", file=sys.stderr)
    bar = tqdm(desc=f"train {name}", unit="step", disable=args.quiet, file=sys.stderr)

    def on_step(progress: Any) -> None:
        bar.total = progress.total
        bar.n = progress.step
        bar.set_postfix(loss=f"{progress.loss:.4f}")

    try:
        result = train_style(settings, store, dataset_id, on_step=on_step)
    except KeyboardInterrupt:
        bar.close()
        print("error: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    bar.close()
    print(
        f"style '{name}' registered: {result.weights} ({result.step} steps, final loss "
        f"{sum(result.losses[-20:]) / len(result.losses[-20:]):.4f}). Use it: emaki animate IDEA --style {name}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.models import Models
    from engine.store import open_store
    from training.evaluate import report
    from training.service import evaluate_style

    settings = settings_from_args(args)
    store = open_store(settings.data_dir)
    if store.style(args.style) is None:
        raise InvalidRequest(f"unknown style '{args.style}'")
    bar = tqdm(desc="generating", unit="image", disable=args.quiet, file=sys.stderr)

    def on_image(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    metrics = evaluate_style(
        settings,
        store,
        Models(settings),
        args.style,
        samples=args.samples,
        features=args.features,
        animation=not args.no_animation,
        on_image=on_image,
    )
    bar.close()
    print(report(metrics))
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    train = sub.add_parser("train", parents=[common], help="train a style from a captioned image dataset")
    train.add_argument("dataset", help="zip or folder: images + metadata.csv (file_name,caption) or metadata.jsonl")
    train.add_argument("--name", required=True, help="the style's name (a-z, 0-9, - and _)")
    train.add_argument("--trigger", default="", help="word put in every caption and every prompt of the style")
    train.add_argument("--steps", type=int, help="training steps (default: from the dataset size)")
    train.add_argument("--rank", type=int, default=16)
    train.add_argument("--adapter", choices=("lora", "loha", "lokr", "ia3"), default="lora")
    train.add_argument("--optimizer", choices=("adamw", "prodigy"), default="adamw")
    train.add_argument("--lr", type=float, help="learning rate (default 1e-4 AdamW, 1.0 Prodigy)")
    train.add_argument("--resolution", type=int, help="training size (default: the profile's width)")
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder too")
    train.add_argument("--autocaption", action="store_true", help="caption images that have none with BLIP")
    train.add_argument("-q", "--quiet", action="store_true")
    train.set_defaults(func=cmd_train)


def add_evaluate_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    evaluate = sub.add_parser("evaluate", parents=[common], help="FID/KID of a style against its dataset")
    evaluate.add_argument("--style", required=True)
    evaluate.add_argument("--samples", type=int, help="images to generate (default 100, as the paper)")
    evaluate.add_argument(
        "--features",
        choices=("auto", "inception", "tiny"),
        default="auto",
        help="inception (needs torch-fidelity's weights); tiny: offline smoke only",
    )
    evaluate.add_argument("--no-animation", action="store_true", help="skip the temporal-coherence animation")
    evaluate.add_argument("-q", "--quiet", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)
