"""What the subcommands share: how a setup error ends a command, and comma-separated count options."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

# Errors a bad configuration, data set or checkpoint path, or a missing optional extra, raises while a run is set up.
SETUP_ERRORS = (ValueError, TypeError, OSError, ImportError)


def fail(command: str, err: Exception) -> None:
    """Ends the command with the setup error's message and exit status 2, no traceback."""
    print(f"imm-kernels {command}: error: {err}", file=sys.stderr)
    raise SystemExit(2)


def comma_separated_counts(what: str, example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for comma-separated ints >= 1, such as `example`; `what` names them in the error."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            counts = tuple(int(part) for part in text.split(","))
        except ValueError:
            counts = ()
        if not counts or min(counts) < 1:
            raise argparse.ArgumentTypeError(f"expected {what} like {example}, got {text!r}")
        return counts

    return parse


parse_step_counts = comma_separated_counts("step counts", "1,2,4,8")


def comma_separated_labels(text: str) -> tuple[int, ...]:
    """An argparse type for comma-separated class indices >= 0, such as 207,360,387."""
    try:
        labels = tuple(int(part) for part in text.split(","))
    except ValueError:
        labels = ()
    if not labels or min(labels) < 0:
        raise argparse.ArgumentTypeError(f"expected class indices like 207,360,387, got {text!r}")
    return labels


def parse_override(text: str) -> tuple[str, object]:
    """An argparse type for NAME=VALUE; VALUE is read as JSON (numbers, true/false/null, lists) or else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE like temb_type=identity, got {text!r}")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


def add_official_options(parser: argparse.ArgumentParser) -> None:
    """--key and --set: which entry of an official IMM checkpoint to read, and IMMPrecond arguments to replace."""
    parser.add_argument("--key", default="ema", help="official checkpoints: the entry to load (default: %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=parse_override,
        default=[],
        metavar="NAME=VALUE",
        help="official checkpoints: replace an IMMPrecond argument, e.g. temb_type=identity (repeatable)",
    )
