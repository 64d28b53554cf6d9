"""`emaki animate | jobs | resume | redo | styles | train | evaluate | models | doctor | bot | health`: the parser and
the error boundary.

Each subcommand lives in its own module (`emaki/*_cmd.py`) with its `add_parser`.

Errors a person can act on print as one `error: ...` line with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from emaki import animate_cmd, bot_cmd, invite_cmd, jobs_cmd, models_cmd, styles_cmd, train_cmd
from emaki.common import quiet_environment, quiet_libraries
from engine.errors import EmakiError

log = logging.getLogger("emaki")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", help="model profile: sd15 (default) or tiny (offline, random weights)")
    common.add_argument("--config", help="TOML settings file (also EMAKI_CONFIG); secrets never go there")
    common.add_argument("--data-dir", help="folder of the database and artifacts (EMAKI_DATA_DIR; default ./data)")
    common.add_argument("--device", help="auto, cpu, mps, cuda or cuda:N (EMAKI_DEVICE; default auto)")
    common.add_argument("-v", "--verbose", action="store_true", help="log what happens, with library warnings")

    parser = argparse.ArgumentParser(prog="emaki", description="Ghibli-style animations from one idea.")
    parser.add_argument("--version", action="version", version=f"emaki {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    animate_cmd.add_parser(sub, common)
    jobs_cmd.add_parsers(sub, common)
    styles_cmd.add_parser(sub, common)
    train_cmd.add_parser(sub, common)
    train_cmd.add_evaluate_parser(sub, common)
    bot_cmd.add_parser(sub, common)
    models_cmd.add_parser(sub, common)
    invite_cmd.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()  # imports no model library (training/options.py holds the trainer's choices)
    args = parser.parse_args(argv)
    if not args.verbose:
        quiet_environment()
        if not getattr(args, "light", False):  # `jobs`, `styles`, `bot` quiet them only once they need them
            quiet_libraries(args)  # before the subcommand imports torch, diffusers or transformers
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except EmakiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `emaki jobs | head`: the reader is gone; nothing more to say, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        # The command closed its progress bars on the way out, so this starts on a line of its own.
        hint = getattr(args, "interrupt_hint", None)
        print(f"error: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("emaki")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
