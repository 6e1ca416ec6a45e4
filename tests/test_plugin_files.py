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


def _installer():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("drag_install", REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_the_installed_plugin_folder_holds_no_compiled_file(tmp_path):
    """Issue 21: nothing GIMP's Python could refuse (a foreign-ABI .pyd on Windows, an
    unsigned .so on macOS) goes beside the plug-in; the pyzmq/msgpack wheels an older release
    vendored there are removed when the plug-in is installed again."""
    dest = tmp_path / "plug-ins" / "drag-diffusion"
    old = dest / "vendor" / "zmq" / "backend" / "cython" / "_zmq.abi3.so"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"\x7fELF old wheel")
    _installer().install_plugin(dest)
    assert not (dest / "vendor").exists()
    files = [p for p in dest.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".py", ".md", ".xml", ".html"}, files
    magic = (b"\x7fELF", b"MZ", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe")  # ELF, PE, Mach-O
    assert not [p for p in files if p.read_bytes().startswith(magic)]
    assert (dest / "protocol" / "transport_zmtp.py").is_file()
    assert os.access(dest / "drag-diffusion.py", os.X_OK)
