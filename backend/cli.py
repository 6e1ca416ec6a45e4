"""``python -m backend``: one entry point, one sub-command per module.

Each module below defines ``register(subparsers)``, which adds its sub-commands with
``set_defaults(func=...)``. Modules import torch and diffusers lazily so that ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "backend.server.cli",  # serve, keygen
    "backend.commands",  # drag, make-tiny-model
    "backend.tools.bench",  # bench
    "backend.tools.precision_bench",  # precision
    "backend.tools.memory_estimate",  # memory
    "backend.tools.gpu_check",  # gpu-check
    "backend.demo.cli",  # toy train, bench-quality
)


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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
