"""The plug-in's pure modules, importable in tests (they import each other by name, as GIMP
runs them from the plug-in folder)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "gimp_plugin" / "drag-diffusion"


def load(name: str):
    if str(PLUGIN_DIR) not in sys.path:
        sys.path.insert(0, str(PLUGIN_DIR))
    return importlib.import_module(name)
