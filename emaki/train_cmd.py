"""`emaki train` and `emaki evaluate`.

Every option is checked (type and range) before a model loads or a row is written, so a refused
start leaves nothing behind and never blocks the style name.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from emaki.common import existing_store, settings_from_args
from engine.errors import InvalidRequest

MAX_EVAL_SAMPLES = 10_000

# CLI option -> TrainConfig field. Options left out keep the preset's (or the default) value.
TRAIN_OPTIONS: dict[str, str] = {
    "steps": "steps",
    "epochs": "epochs",
    "rank": "rank",
    "network_alpha": "network_alpha",
    "network_dropout": "network_dropout",
    "adapter": "adapter",
    "optimizer": "optimizer",
    "lr": "learning_rate",
    "text_encoder_lr": "text_encoder_lr",
    "lr_scheduler": "lr_scheduler",
    "lr_warmup_steps": "lr_warmup_steps",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "scale_weight_norms": "scale_weight_norms",
    "prodigy_d_coef": "prodigy_d_coef",
    "prodigy_safeguard_warmup": "prodigy_safeguard_warmup",
    "prodigy_use_bias_correction": "prodigy_use_bias_correction",
    "min_snr_gamma": "min_snr_gamma",
    "noise_offset": "noise_offset",
    "adaptive_noise_scale": "adaptive_noise_scale",
    "caption_dropout": "caption_dropout",
    "shuffle_caption": "shuffle_caption",
    "keep_tokens": "keep_tokens",
    "flip": "flip",
    "background": "background",
    "resolution": "resolution",
    "batch_size": "batch_size",
    "checkpoint_every": "checkpoint_every",
    "save_every": "save_every",
    "save_limit": "save_limit",
    "seed": "seed",
    "holdout": "holdout",
    "train_text_encoder": "train_text_encoder",
    "gradient_checkpointing": "gradient_checkpointing",
}


def base_family(settings: Any) -> str:
    """The running base's family as its files say ("sd15", "sdxl"; "" when they are not on disk: then every preset
    is offered, and loading says what is missing); a base of another family than the profile's is one line."""
    from engine.render.families import settings_family_name

    return settings_family_name(settings)


def _requested_config(args: argparse.Namespace, n_images: int, settings: Any, family: str = "") -> Any:
    """The preset's values (its sizes clamped to the profile's range, saying so on stderr), the options on top;
    a preset for another family than the base's (`family`) is one line."""
    from training.presets import preset_config

    given = {field: getattr(args, option) for option, field in TRAIN_OPTIONS.items()}
    notes: list[str] = []
    config = preset_config(
        args.preset or "", {k: v for k, v in given.items() if v is not None}, n_images, settings, notes, family
    )
    for note in notes:
        print(note, file=sys.stderr)
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from training.dataset import STYLE_NAME, count_images

    settings = settings_from_args(args)
    name = (args.name or "").strip().lower()
    if not STYLE_NAME.match(name):
        raise InvalidRequest(f"style name '{name}' must be 1-32 characters of a-z, 0-9, '-' or '_'")
    source = Path(args.dataset) if args.dataset else None
    if source is not None and not source.exists():  # before the store: a refused start writes nothing
        raise InvalidRequest(f"dataset {source} does not exist (a .zip, or a folder of images with metadata.csv)")
    # The dataset's own count (a zip's from its names: nothing extracted yet): presets resolve per-epoch values
    # by it. Without a dataset (--print alone), the smallest one that trains.
    n_images = count_images(source) if source is not None else settings.min_dataset_images
    family = base_family(settings)
    config = _requested_config(args, n_images, settings, family)
    resolved = config.resolved(n_images, settings)  # refuses bad values before any work
    if args.print:
        from training.presets import FAMILY_TITLES, preset_vram, presets_for

        print(f"# resolved for {n_images} images" + (f", preset {args.preset}" if args.preset else ""))
        base = f" ({FAMILY_TITLES[family]} base)" if family in FAMILY_TITLES else ""
        print(f"# presets for this base{base}: {', '.join(presets_for(family))}")
        if args.preset and preset_vram(args.preset):
            print(f"# GPU memory: {preset_vram(args.preset)}")
        for key, value in asdict(resolved).items():
            print(f"{key} = {json.dumps(value)}")
        return 0
    if source is None:
        raise InvalidRequest("give the dataset (a zip or folder) to train on")
    return _train(settings, args, name, source, config)


def _train(settings: Any, args: argparse.Namespace, name: str, source: Path, config: Any) -> int:
    from tqdm import tqdm

    from engine.coordinator.store import open_store
    from training.lora import TrainConfig, kept_saves
    from training.service import prepare_dataset, style_dir, train_style

    store = open_store(settings.data_dir)
    if store.style(name) is not None:
        raise InvalidRequest(f"a style named '{name}' already exists: choose another name")
    checkpoint = style_dir(settings, name) / "checkpoint.pt"
    # Rows the CLI left (no guild): a Discord submission waiting for its turn is not ours to touch.
    earlier = store.datasets_where("style_name = ? and status = 'approved' and guild_id is null", [name])
    dataset_id = None
    if earlier and checkpoint.exists():
        row = earlier[-1]
        stored = TrainConfig.from_dict(json.loads(row["params"] or "{}"))
        differing = stored.differences(config)
        if differing and not args.restart:
            shown = ", ".join(f"{key} ({getattr(stored, key)!r} -> {getattr(config, key)!r})" for key in differing)
            raise InvalidRequest(
                f"the interrupted training of '{name}' used other values for {shown}: "
                "run it with the same options to resume, or add --restart to discard its checkpoint"
            )
        if differing or args.restart:
            checkpoint.unlink()
            store.update_dataset(row["id"], params=json.dumps(asdict(config)))
            print(f"restarting the training of '{name}' from step 0", file=sys.stderr)
        else:
            print(f"resuming the interrupted training of '{name}'", file=sys.stderr)
        dataset_id = row["id"]
    else:
        # A start that died before its first checkpoint left a row and nothing to resume: let it go.
        for row in earlier:
            store.update_dataset(row["id"], status="failed")
        checkpoint.unlink(missing_ok=True)
        dataset_id, dataset = prepare_dataset(
            settings,
            store,
            source,
            name,
            args.trigger or "",
            autocaption=args.autocaption,
            status="approved",
            config=config,
        )
        print(f"dataset: {len(dataset.items)} images from {dataset.root}", file=sys.stderr)
    # The total from the start, as the trainer will resolve it (losses arrive only every few steps, and
    # the base model loads first: minutes without a total otherwise).
    row = store.dataset(dataset_id)
    total = TrainConfig.from_dict(json.loads(row["params"] or "{}")).resolved(row["n_images"], settings).steps
    bar = tqdm(total=total, desc=f"train {name}", unit="step", disable=args.quiet, file=sys.stderr)

    def on_start(step: int, steps: int) -> None:
        """Training begins (the model loaded, the dataset encoded): the clock restarts here, so the rate is
        the training's, and a resumed run counts from its checkpoint's step."""
        bar.reset(total=steps)
        bar.initial = bar.n = bar.last_print_n = step
        bar.refresh()

    def on_step(progress: Any) -> None:
        bar.total = progress.total
        bar.n = progress.step
        bar.set_postfix(loss=f"{progress.loss:.4f}")

    def on_save(step: int, folder: Path) -> None:
        bar.write(f"step {step}: kept {folder} (sample: {folder / 'sample.png'})", file=sys.stderr)

    try:
        result = train_style(settings, store, dataset_id, on_step=on_step, on_save=on_save, on_start=on_start)
    except KeyboardInterrupt:
        bar.close()
        print(
            "error: interrupted; run the same command again to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    finally:
        bar.close()
    saves = kept_saves(style_dir(settings, name))
    if saves:
        sheet = _samples_sheet(style_dir(settings, name), saves)
        print(f"samples of the kept steps {', '.join(map(str, saves))}: {sheet}", file=sys.stderr)
        print(f"register an earlier one: emaki styles add NAME --from-run {name} --step S", file=sys.stderr)
    tail = result.losses[-20:]
    print(
        f"style '{name}' registered: {result.weights} ({result.step} steps, final loss "
        f"{sum(tail) / len(tail):.4f}). Use it: emaki animate IDEA --style {name}"
    )
    return 0


def _samples_sheet(run_dir: Path, saves: dict[int, Path]) -> Path:
    """One image with the sample of every kept step, in step order."""
    from PIL import Image

    from engine.render.media import contact_sheet

    images = []
    for step in sorted(saves):
        with Image.open(saves[step].parent / "sample.png") as sample:
            images.append(sample.convert("RGB"))
    path = run_dir / "saves" / "contact-sheet.png"
    tmp = path.with_name(".contact-sheet.png.tmp")
    contact_sheet(images, tile=160).save(tmp, format="PNG")
    shutil.move(tmp, path)
    return path


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.render.models import Models
    from training.evaluate import report
    from training.service import evaluate_style

    settings = settings_from_args(args)
    if args.samples is not None and not 2 <= args.samples <= MAX_EVAL_SAMPLES:
        raise InvalidRequest(f"--samples must be a whole number from 2 to {MAX_EVAL_SAMPLES} (got {args.samples})")
    store = existing_store(settings)
    if store is None or store.style(args.style) is None:
        raise InvalidRequest(f"unknown style '{args.style}'")
    bar = tqdm(desc="generating", unit="image", disable=args.quiet, file=sys.stderr)

    def on_image(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    try:
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
    finally:
        bar.close()  # an error then prints on a line of its own, not glued to the bar
    print(report(metrics))
    return 0


def _flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    """--NAME / --no-NAME, None when neither is given (the preset or default decides)."""
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_text)


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from training.options import ADAPTERS, DEFAULT_LR, GRADIENT_CHECKPOINTING, LR_SCHEDULERS, OPTIMIZERS
    from training.presets import PRESETS

    lr_defaults = ", ".join(f"{kind} {lr:g}" for kind, lr in DEFAULT_LR.items())
    train = sub.add_parser(
        "train",
        parents=[common],
        help="train a style from a captioned image dataset",
        description="Options left out take the preset's value, else the default shown.",
    )
    train.add_argument(
        "dataset", nargs="?", help="zip or folder: images + metadata.csv (file_name,caption) or metadata.jsonl"
    )
    train.add_argument("--name", required=True, help="the style's name (a-z, 0-9, - and _)")
    train.add_argument("--trigger", default="", help="word put in every caption and every prompt of the style")
    train.add_argument("--preset", choices=sorted(PRESETS), help="a named setup (see README); options override it")
    train.add_argument("--print", action="store_true", help="print every resolved training value and exit")
    train.add_argument("--restart", action="store_true", help="discard an interrupted run's checkpoint")
    train.add_argument("--steps", type=int, help="training steps, 0-1000000 (default: ~100 per image, 500-3000)")
    train.add_argument("--epochs", type=int, help="passes over the dataset instead of --steps")
    train.add_argument("--rank", type=int, help="adapter rank, 1-4096 (default 16)")
    train.add_argument("--network-alpha", type=float, help="LoRA/LoHa/LoKr alpha (default: = rank)")
    train.add_argument("--network-dropout", type=float, help="0-1 (default 0; IA3 has none)")
    train.add_argument("--adapter", choices=ADAPTERS, help="default lora")
    train.add_argument("--optimizer", choices=OPTIMIZERS, help="default adamw")
    train.add_argument("--lr", type=float, help=f"UNet learning rate (default AdamW: {lr_defaults}; Prodigy 1.0)")
    train.add_argument("--text-encoder-lr", type=float, help="text encoder learning rate (default: --lr)")
    train.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, help="default constant")
    train.add_argument("--lr-warmup-steps", type=int, help="linear warmup steps (default 0)")
    train.add_argument("--weight-decay", type=float, help="default 0.01")
    train.add_argument("--max-grad-norm", type=float, help="gradient clipping norm, 0: off (default 1)")
    train.add_argument("--scale-weight-norms", type=float, help="kohya's max-norm regularisation, 0: off")
    train.add_argument("--prodigy-d-coef", type=float, help="Prodigy's d_coef (default 1)")
    _flag(train, "--prodigy-safeguard-warmup", "Prodigy's safeguard_warmup (default off)")
    _flag(train, "--prodigy-use-bias-correction", "Prodigy's use_bias_correction (default off)")
    train.add_argument("--min-snr-gamma", type=float, help="Min-SNR loss weighting, 0: off (default; 5 is usual)")
    train.add_argument("--noise-offset", type=float, help="0-1 (default 0)")
    train.add_argument("--adaptive-noise-scale", type=float, help="0-1, needs --noise-offset (default 0)")
    train.add_argument("--caption-dropout", type=float, help="probability of an empty caption, 0-1 (default 0)")
    _flag(train, "--shuffle-caption", "shuffle comma-separated caption tags (default off)")
    train.add_argument("--keep-tokens", type=int, help="leading tags kept in place when shuffling (default 0)")
    _flag(train, "--flip", "random horizontal flips (default off)")
    train.add_argument("--background", help="colour under transparent pixels (default white)")
    train.add_argument("--resolution", type=int, help="bucket area side, a multiple of 8 (default: profile width)")
    train.add_argument("--batch-size", type=int, help="images per step, 1-1024 (default 1)")
    train.add_argument("--checkpoint-every", type=int, help="resumable checkpoint interval (default 100)")
    train.add_argument("--save-every", type=int, help="keep the adapter and a sample every N steps (default 0: no)")
    train.add_argument("--save-limit", type=int, help="how many kept saves at most (default 10)")
    train.add_argument("--seed", type=int, help="0-4294967295 (default 0); decides every random draw")
    train.add_argument(
        "--holdout", type=int, help="images kept out of training for evaluation (default -1: 10%% from 20 images)"
    )
    _flag(train, "--train-text-encoder", "train the text encoder's half of the adapter too (default off)")
    train.add_argument("--gradient-checkpointing", choices=GRADIENT_CHECKPOINTING, help="default auto")
    train.add_argument("--autocaption", action="store_true", help="caption images that have none with BLIP")
    train.add_argument("-q", "--quiet", action="store_true")
    train.set_defaults(func=cmd_train)


def add_evaluate_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    evaluate = sub.add_parser("evaluate", parents=[common], help="FID/KID of a style against its dataset")
    evaluate.add_argument("--style", required=True)
    evaluate.add_argument(
        "--samples", type=int, help=f"images to generate, 2-{MAX_EVAL_SAMPLES} (default 100, as the paper)"
    )
    evaluate.add_argument(
        "--features",
        choices=("auto", "inception", "tiny"),
        default="auto",
        help="inception (needs torch-fidelity's weights); tiny: offline smoke only",
    )
    evaluate.add_argument("--no-animation", action="store_true", help="skip the temporal-coherence animation")
    evaluate.add_argument("-q", "--quiet", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)
