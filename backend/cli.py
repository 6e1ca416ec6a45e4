"""``python -m backend``: one entry point, one sub-command per module.

Each module below defines ``register(subparsers)``, which adds its sub-commands with
``set_defaults(func=...)``. Modules import torch and diffusers lazily so that ``--help`` is quick.
A command refuses bad input by raising ``UsageError``: ``main`` prints it as one ``error:`` line
(exit status 2). ``parse_overrides`` reads the ``--set KEY=VALUE`` options every command shares.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from backend.engine.errors import InvalidInput
from backend.engine.params import parse_assignments

COMMAND_MODULES = (
    "backend.server.cli",  # serve, keygen
    "backend.commands",  # drag, make-random-tiny-model
    "backend.tools.bench",  # bench
    "backend.tools.precision_bench",  # precision
    "backend.tools.memory_estimate",  # memory
    "backend.tools.gpu_check",  # gpu-check
    "backend.demo.cli",  # demo train|export|eval, bench-quality
    "backend.hub.cli",  # models list|get|verify|remove
)


class UsageError(Exception):
    """Bad command-line input; the message is printed as is."""


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items → knob values (``params.parse_assignments``)."""
    try:
        return parse_assignments(items, "--set")
    except InvalidInput as exc:
        raise UsageError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m backend",
        description="Drag-editing backend: DragDiffusion and GoodDrag on Stable Diffusion 1.5.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:  # bad command-line input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
