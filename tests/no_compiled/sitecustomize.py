"""Makes a Python behave like GIMP's on Windows (MSYS2's Python, another extension ABI) and on
macOS (a hardened runtime that refuses pip-installed ``.so`` files) for the plug-in: pyzmq and
msgpack cannot be imported there, whatever is installed.

Use: put this folder first on ``PYTHONPATH`` (Python imports ``sitecustomize`` at start-up,
unless run with ``-S``, ``-E`` or ``-I``; then import it by hand). The blocked top-level names
come from ``DRAG_BLOCK_IMPORTS`` (comma-separated; default ``zmq,msgpack``).
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder

BLOCKED = tuple(name.strip() for name in
                os.environ.get("DRAG_BLOCK_IMPORTS", "zmq,msgpack").split(",") if name.strip())


class CompiledPackageBlocker(MetaPathFinder):
    """Refuses the blocked packages (and their submodules) as a foreign-ABI or unsigned
    extension would be refused: with ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked (tests/no_compiled): it cannot load in GIMP's "
                              "Python on Windows or macOS", name=name)
        return None


if not any(isinstance(finder, CompiledPackageBlocker) for finder in sys.meta_path):
    sys.meta_path.insert(0, CompiledPackageBlocker())
