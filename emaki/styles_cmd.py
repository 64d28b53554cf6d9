"""`emaki styles [add|remove]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emaki.common import settings_from_args
from engine.errors import InvalidRequest


def cmd_styles(args: argparse.Namespace) -> int:
    from engine.store import open_store

    settings = settings_from_args(args)
    store = open_store(settings.data_dir)
    if args.action == "add" and args.from_run:
        from training.service import register_saved_step

        weights = register_saved_step(settings, store, args.name, args.from_run, args.step)
        print(f"registered style {args.name} from run {args.from_run} at step {args.step}: {weights}")
        return 0
    if args.action == "add":
        if not args.path:
            raise InvalidRequest("give the weights file, or --from-run RUN --step S")
        path = Path(args.path).expanduser().resolve()
        if not path.is_file():
            raise InvalidRequest(f"style weights file {args.path} does not exist")
        if not args.name.strip():
            raise InvalidRequest("the style name is empty")
        store.add_style(args.name.strip(), str(path), trigger=args.trigger or "", adapter="lora", weight=args.weight)
        print(f"registered style {args.name}")
        return 0
    if args.action == "remove":
        if store.style(args.name) is None:
            raise InvalidRequest(f"unknown style '{args.name}'")
        store.db["styles"].delete(args.name)
        print(f"removed style {args.name}")
        return 0
    rows = store.styles()
    if not rows:
        print("no styles registered (emaki styles add NAME FILE, or emaki train)")
    for row in rows:
        metrics = json.loads(row["metrics"]) if row.get("metrics") else {}
        shown = ", ".join(f"{k}={v:.3g}" for k, v in metrics.items() if isinstance(v, int | float))
        print(f"{row['name']}\ttrigger={row['trigger'] or '-'}\t{row['adapter']}\t{shown}")
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    styles = sub.add_parser(
        "styles", parents=[common], help="list, add or remove styles", description="With no subcommand: list styles."
    )
    styles_sub = styles.add_subparsers(dest="action")
    add = styles_sub.add_parser("add", parents=[common], help="register a LoRA safetensors file as a style")
    add.add_argument("name")
    add.add_argument("path", nargs="?", help="weights file (or --from-run)")
    add.add_argument("--from-run", help="a training run's name: register one of its kept saves")
    add.add_argument("--step", type=int, help="with --from-run: the kept step to register")
    add.add_argument("--trigger", default="")
    add.add_argument("--weight", type=float, default=1.0)
    remove = styles_sub.add_parser("remove", parents=[common], help="unregister a style (its file stays)")
    remove.add_argument("name")
    styles.set_defaults(func=cmd_styles, action="list")
