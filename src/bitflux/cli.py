"""The `bitflux` command line: one sub-command per module, errors as one line and exit code 2.

Each command module exports `register(subparsers)`, which adds its parser and sets `func`,
a callable taking the parsed `argparse.Namespace` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from . import _quiet
from .errors import BitfluxError

_quiet.install()  # before any command module imports diffusers' pipelines

# Modules that contribute sub-commands, in `--help` order. A missing optional module is skipped.
_COMMAND_MODULES = (
    "bitflux.commands",  # quantize, generate, inspect
    "bitflux.calibrate.command",  # calibrate
    "bitflux.ablate",  # ablate
    "bitflux.eval.commands",  # eval
    "bitflux.bench.commands",  # bench
    "bitflux.toy.commands",  # toy train / toy render
)


def print_result(obj: dict[str, Any], as_json: bool, text: str | None = None) -> None:
    """Print one JSON object (for scripts) or human text."""
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(text if text is not None else "\n".join(f"{k}: {v}" for k, v in obj.items()))


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (exit 2), like every other bitflux error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bitflux",
        description="1.58-bit (ternary) FLUX: quantise, calibrate, inspect, run and measure.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # the command module itself is absent: skip it
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Commands that hand their own options to a sub-module (bench) set `passthrough`.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BitfluxError as e:
        print(f"bitflux: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitflux: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
