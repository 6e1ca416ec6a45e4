"""The options the measuring tools share: which methods to run (``--method``) and the knob
overrides (``--set``, over ``--quick``'s reduced step counts), added and read in one place for
bench, precision, gpu-check and memory. A bad value raises ``UsageError``, which
``python -m backend`` prints as one ``error:`` line (exit status 2)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.cli import UsageError, parse_overrides
from backend.engine.params import METHODS, PRESETS


@dataclass(frozen=True)
class RunOptions:
    """What a tool runs: these methods (or presets), each with these knob overrides."""

    methods: list[str]
    overrides: dict[str, Any]


def add_run_options(parser: argparse.ArgumentParser, quick: dict[str, Any] | None = None) -> None:
    """``--method`` and ``--set`` (and ``--quick`` when the tool has ``quick`` counts)."""
    parser.add_argument("--method", default="all",
                        help=f"a method or preset ({', '.join(PRESETS)}), a comma-separated "
                        f"list of them, or all (default: {', '.join(METHODS)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a method parameter, e.g. --set "
                        "drag_steps=40 (see drag --list-params)")
    if quick is not None:
        parser.add_argument("--quick", action="store_true",
                            help=f"reduced step counts for slow machines: {quick}")


def run_options(args: argparse.Namespace, quick: dict[str, Any] | None = None) -> RunOptions:
    """``--method`` and ``--set`` (over ``quick`` when ``--quick`` is given), checked."""
    methods = list(METHODS) if args.method == "all" else [
        m for m in args.method.split(",") if m]
    unknown = [m for m in methods if m not in PRESETS]
    if unknown or not methods:
        raise UsageError(f"unknown method {args.method!r}; use all or a comma-separated list "
                         f"of {', '.join(PRESETS)}")
    reduced = quick if quick is not None and getattr(args, "quick", False) else {}
    return RunOptions(methods, {**reduced, **parse_overrides(args.overrides)})


# The models a tool runs by name, besides a model folder, file or Hugging Face id.
TOOL_MODELS = {
    "random-tiny": "the tiny random-weight model in SD1.5's layout (written to a temporary "
                   "folder; no download)",
    "sd15-random": "SD1.5's architecture with random weights: the real model's cost, no "
                   "download",
    "demo": "the trained demo model backend/demo/model, with its preset.json",
}
OLD_MODEL_NAMES = {"tiny": "random-tiny", "toy": "demo"}  # still accepted


def model_name(text: str) -> str:
    """``--model``'s value with an old name replaced by today's."""
    return OLD_MODEL_NAMES.get(text, text)


def add_model_option(parser: argparse.ArgumentParser, default: str) -> None:
    names = "; ".join(f"{name}: {what}" for name, what in TOOL_MODELS.items())
    parser.add_argument("--model", default=default, type=model_name,
                        help=f"{names}; or a model folder, file or Hugging Face id (default: "
                        f"{default}; 'tiny' and 'toy' are accepted for random-tiny and demo)")


def model_source(name: str, scratch: Path) -> str | None:
    """What to load for ``--model`` ``name``: a folder, file or id; the random-tiny model is
    written under ``scratch`` first. None for sd15-random, which is built in memory
    (``engine.random_sd15``)."""
    if name == "sd15-random":
        return None
    if name == "demo":
        from backend.model_choice import DEMO_MODEL_DIR

        return str(DEMO_MODEL_DIR)
    if name == "random-tiny":
        from backend.engine.random_tiny import make_tiny_model

        return str(make_tiny_model(scratch / "random-tiny"))
    return name
