"""`emaki styles [add|remove]`."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from emaki.common import existing_store, quiet_libraries, settings_from_args
from engine.errors import InvalidRequest

if TYPE_CHECKING:
    from engine.coordinator.store import Store
    from engine.settings import Settings


def cmd_styles(args: argparse.Namespace) -> int:
    from engine.coordinator.store import open_store

    settings = settings_from_args(args)
    # Read-only until a change is accepted: a refused command leaves no data dir and no database.
    store = existing_store(settings)
    if args.action == "add":
        quiet_libraries(args)  # reading a style file imports the model libraries; listing does not
        _check_name_and_trigger(args.name, args.trigger)
    if args.action == "add" and args.from_run:
        from training.service import register_saved_step, style_dir

        if not style_dir(settings, args.from_run.strip().lower()).is_dir():
            raise InvalidRequest(f"run '{args.from_run}' has no kept saves in {settings.data_dir}")
        store = store or open_store(settings.data_dir)
        weights = register_saved_step(settings, store, args.name, args.from_run, args.step)
        print(f"registered style {args.name} from run {args.from_run} at step {args.step}: {weights}")
        return 0
    if args.action == "add":
        if not args.path:
            raise InvalidRequest("give the weights file, or --from-run RUN --step S")
        return _add(settings, store, args)
    if args.action == "remove":
        if store is None or store.style(args.name) is None:
            raise InvalidRequest(f"unknown style '{args.name}'")
        store.delete_style(args.name)
        print(f"removed style {args.name}")
        return 0
    rows = store.styles() if store is not None else []
    if not rows:
        print("no styles registered (emaki styles add NAME FILE, or emaki train)")
    for row in rows:
        metrics = json.loads(row["metrics"]) if row.get("metrics") else {}
        shown = ", ".join(f"{k}={v:.3g}" for k, v in metrics.items() if isinstance(v, int | float))
        # A style trained from a server's /train dataset belongs to that server (shared: others may use it).
        owner = row.get("guild_id")
        server = "global" if owner is None else f"server {owner}" + (" (shared)" if row.get("shared") else "")
        print(f"{row['name']}\ttrigger={row['trigger'] or '-'}\t{row['adapter']}\t{server}\t{shown}")
    return 0


MAX_STYLE_WEIGHT = 2.0  # beyond this a style overpowers the base model into noise


MAX_TRIGGER_CHARS = 100  # a trigger goes into every prompt of the style, and into Discord messages


def _check_name_and_trigger(name: str, trigger: str | None) -> None:
    """Trained styles' name rule (training.dataset.style_name), and a one-line, capped trigger."""
    from training.dataset import style_name

    style_name(name)
    if trigger and (len(trigger) > MAX_TRIGGER_CHARS or any(c in trigger for c in "\r\n")):
        raise InvalidRequest(f"--trigger must be one line of at most {MAX_TRIGGER_CHARS} characters")


def _add(settings: Settings, store: Store | None, args: argparse.Namespace) -> int:
    """Check everything before the store is touched: a refused file registers nothing and replaces nothing."""
    from engine.coordinator.store import open_store
    from engine.render.families import settings_family
    from engine.render.style_files import KIND_NAMES, base_architecture, locate, read_style

    name = args.name.strip().lower()  # as trained styles are named
    if not name:
        raise InvalidRequest("the style name is empty")
    if not (math.isfinite(args.weight) and 0 < args.weight <= MAX_STYLE_WEIGHT):
        raise InvalidRequest(f"--weight must be a number above 0 and at most {MAX_STYLE_WEIGHT:g} (got {args.weight})")
    path = Path(args.path).expanduser().resolve()
    if not path.exists():
        raise InvalidRequest(f"style weights file {args.path} does not exist")
    existing = store.style(name) if store is not None else None
    if existing is not None and not args.replace:
        trained = " (trained here, with its metrics)" if existing.get("dataset_id") is not None else ""
        raise InvalidRequest(f"a style named '{name}' already exists{trained}; add --replace to replace it")
    if is_video_lora(path):  # a LoRA for the video model (engine/render/video_styles.py): family ltx-video
        return _add_video(settings, store, args, name, path, existing)
    family = settings_family(settings)  # read from the base's files; of the profile's family
    architecture = base_architecture(settings.base_model, settings.base_model_config)
    layers = read_style(path, architecture, family=family.name, style_name=name)
    weights, _ = locate(path)
    fields = {"trigger": args.trigger or "", "adapter": layers.kind, "weight": args.weight}
    fields["family"] = layers.family or family.name  # it fits this base: this base's family
    store = store or open_store(settings.data_dir)  # everything checked: now the store may be created
    if existing is None:
        store.add_style(name, str(weights), **fields)
    else:
        store.replace_style(name, str(weights), **fields)
    verb = "replaced" if existing is not None else "registered"
    print(
        f"{verb} style {name}: {family.title} {KIND_NAMES[layers.kind]} from a {layers.source} file, "
        f"{layers.n_layers} layers"
    )
    return 0


def is_video_lora(path: Path) -> bool:
    """Whether a style file's keys are a transformer LoRA (the video model's), not a UNet style."""
    from engine.render.style_files import load_tensors, locate
    from engine.render.video_styles import looks_like_video_lora

    weights, _ = locate(path)
    return weights.is_file() and looks_like_video_lora(load_tensors(weights)[0])


def _add_video(
    settings: Settings, store: Store | None, args: argparse.Namespace, name: str, path: Path, existing: dict | None
) -> int:
    """A video style: checked against the configured video model's transformer, registered as family ltx-video
    (applied to the video model of `--motion video` jobs that name it with --video-style)."""
    from engine.coordinator.store import open_store
    from engine.render.video_styles import VIDEO_FAMILY, VIDEO_FAMILY_TITLE, read_video_style

    found = read_video_style(path, settings)
    fields = {"trigger": args.trigger or "", "adapter": "lora", "weight": args.weight, "family": VIDEO_FAMILY}
    store = store or open_store(settings.data_dir)
    if existing is None:
        store.add_style(name, str(found.weights), **fields)
    else:
        store.replace_style(name, str(found.weights), **fields)
    verb = "replaced" if existing is not None else "registered"
    print(
        f"{verb} video style {name}: {VIDEO_FAMILY_TITLE} LoRA from a {found.source} file, {found.n_layers} layers "
        "(use it with --motion video --video-style)"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    styles = sub.add_parser(
        "styles", parents=[common], help="list, add or remove styles", description="With no subcommand: list styles."
    )
    styles_sub = styles.add_subparsers(dest="action")
    add = styles_sub.add_parser(
        "add",
        parents=[common],
        help="register a style file: LoRA (diffusers, peft, kohya/A1111), LyCORIS LoHa/LoKr, IA3, or a peft folder",
    )
    add.add_argument("name")
    add.add_argument(
        "path", nargs="?", help="a .safetensors file, or a peft adapter folder (adapter_config.json + weights)"
    )
    add.add_argument("--from-run", help="instead of a file: a training run's name, to register one of its kept saves")
    add.add_argument("--step", type=int, help="with --from-run: the kept step to register")
    add.add_argument("--trigger", default="")
    add.add_argument("--weight", type=float, default=1.0, help=f"strength, above 0 and at most {MAX_STYLE_WEIGHT:g}")
    add.add_argument("--replace", action="store_true", help="replace an existing style of the same name")
    remove = styles_sub.add_parser("remove", parents=[common], help="unregister a style (its file stays)")
    remove.add_argument("name")
    styles.set_defaults(func=cmd_styles, action="list", light=True)  # quiets the libraries itself for `add`
