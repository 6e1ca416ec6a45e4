#!/usr/bin/env python3
"""The whole test suite from a fresh clone: install, lint, and every test tier.

    python3 tests/run_all.py [extra pytest arguments]

1. ``install.py --dev --cluster`` creates/updates ``.venv`` (torch for this machine, pinned
   packages, pytest/hypothesis/ruff, Ray Serve for the Ray tier) and installs the plug-in into a throw-away GIMP plug-in folder
   (so the installer itself is exercised without touching your GIMP profile);
2. ruff lints the tree;
3. pytest runs all tiers: unit, slow end-to-end, the real GIMP 3.0.4 and 3.2.6 tiers (they build
   and cache a Debian 13 and a Debian forky chroot under .cache/, which needs root) and the GUI
   tier under Xvfb in each.

Exits non-zero on any failure, including "no tests collected".
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def step(title: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
    print(f"\n=== {title}: {' '.join(cmd)}", flush=True)
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    if code != 0:
        print(f"=== FAILED ({title}): exit code {code}", flush=True)
        sys.exit(code)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="drag-plugin-install-") as plugin_dir:
        step("install", [sys.executable, str(ROOT / "install.py"), "--dev", "--cluster",
                         "--gimp-plugin-dir", plugin_dir])
    step("lint", [str(VENV_PYTHON), "-m", "ruff", "check", "."])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DRAG_GIMP_TESTS": "1", "DRAG_RAY_TESTS": "1"}
    # pytest exits 5 when nothing was collected: that is a failure here too.
    step("tests", [str(VENV_PYTHON), "-m", "pytest", "-ra", *sys.argv[1:]], env)
    print("\n=== all green", flush=True)


if __name__ == "__main__":
    main()
