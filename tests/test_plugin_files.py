"""The plug-in folder as GIMP users install it by hand: copied into GIMP's plug-ins folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "gimp_plugin" / "drag-diffusion" / "drag-diffusion.py"


def test_plugin_file_is_committed_executable():
    """GIMP silently ignores a plug-in file without the executable bit (gimp3.md pitfall 2)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    entry = subprocess.run(["git", "ls-files", "-s", str(PLUGIN.relative_to(REPO))], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    assert entry, "the plug-in file is not tracked"
    assert entry[0] == "100755", f"committed with mode {entry[0]}; run " \
                                 "git update-index --chmod=+x on it"


def test_plugin_file_is_executable_on_disk_with_a_python3_shebang():
    assert os.access(PLUGIN, os.X_OK)
    assert PLUGIN.read_text().startswith("#!/usr/bin/env python3\n")
