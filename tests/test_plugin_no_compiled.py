"""Issue 21: the plug-in completes an edit in a Python with the standard library alone, as in
GIMP's Python on Windows (MSYS2) and macOS (hardened runtime), where neither pyzmq nor
msgpack's C extension can load.

The plug-in is installed by install.py's own ``install_plugin`` into a scratch folder; its
backend module then runs in a subprocess started with ``-S -E -s`` (no site-packages, no
PYTHON* variables) and tests/no_compiled/sitecustomize.py blocking ``zmq`` and ``msgpack``,
against a real backend (pyzmq's ROUTER with its ZAP login; a fake engine).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import limits
from fixtures_server import FakeEngine, image, running_server

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = Path(__file__).resolve().parent / "no_compiled"

_EDIT = r"""
import json, sys, sysconfig
plugin, blocker, conn = sys.argv[1:4]
sys.path.insert(0, blocker)
import sitecustomize  # -S skipped it: block zmq and msgpack by hand
sys.path.insert(0, plugin)
blocked = []
for name in ("zmq", "msgpack"):
    try:
        __import__(name)
    except ImportError:
        blocked.append(name)
import dragdiff_backend as db
import dragdiff_progress as prog
session = db.open_session(conn, 30.0, db.Feedback())
pixels = bytes(range(256)) * (8 * 6 * 3 // 256) + bytes(8 * 6 * 3 % 256)
job = db.JobSpec(pixels=pixels, width=8, height=6, channels=3, mask=None,
                 handles=[(1.5, 1.5)], targets=[(4.5, 3.5)], method="dragdiffusion",
                 params={})
result = session.run(job, db.Feedback(), prog.Tracker({"drag": 1}))
transport = session.transport
session.close()
stdlib = tuple(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib"))
extensions = sorted(m.__name__ for m in list(sys.modules.values())
                    if str(getattr(m, "__file__", "") or "").endswith((".so", ".pyd"))
                    and not m.__file__.startswith(stdlib))
outside = sorted({str(getattr(m, "__file__", "")) for m in list(sys.modules.values())
                  if getattr(m, "__file__", None) and not m.__file__.startswith(stdlib)
                  and not m.__file__.startswith(plugin) and not m.__file__.startswith(blocker)})
print(json.dumps({"blocked": blocked, "transport": transport, "extensions": extensions,
                  "outside": outside, "pixels": result.pixels.hex(), "handles": result.handles,
                  "zmq_loaded": "zmq" in sys.modules, "msgpack_loaded": "msgpack" in sys.modules}))
"""


def _installer():
    spec = importlib.util.spec_from_file_location("drag_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_the_plugin_edits_with_no_compiled_package(tmp_path):
    plugin = tmp_path / "plug-ins" / "drag-diffusion"
    _installer().install_plugin(plugin)
    conn = tmp_path / "run" / "backend.json"
    with running_server(FakeEngine(steps=2), connection_file=conn):
        run = limits.run([sys.executable, "-S", "-E", "-s", "-c", _EDIT, str(plugin),
                          str(BLOCKER), str(conn)], limit=120, capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["blocked"] == ["zmq", "msgpack"]
    assert report["transport"] == "zmtp"
    assert not report["zmq_loaded"] and not report["msgpack_loaded"]
    assert report["extensions"] == []  # no compiled module from outside the standard library
    assert report["outside"] == []  # nothing at all from outside stdlib + the plug-in folder
    assert bytes.fromhex(report["pixels"]) == bytes(255 - b for b in image())
    assert report["handles"] == [[4.5, 3.5]]


_CURVE = r"""
import pathlib, sys
plugin, blocker, conn = sys.argv[1:4]
sys.path.insert(0, blocker)
import sitecustomize
sys.path.insert(0, plugin)
import dragdiff_backend as db
try:
    db.try_connect(pathlib.Path(conn), 2.0)
except db.BackendError as exc:
    print(exc)
"""


def test_a_curve_backend_without_pyzmq_is_one_line_saying_what_to_do(tmp_path):
    """CURVE stays pyzmq-only: the plug-in says so at once instead of timing out."""
    from protocol.connection import ConnectionInfo, write_connection_file

    plugin = tmp_path / "plug-ins" / "drag-diffusion"
    _installer().install_plugin(plugin)
    conn = tmp_path / "remote" / "backend.json"
    write_connection_file(conn, ConnectionInfo(
        "tcp://gpu-host:5557", b"k" * 32, curve_server_key="x" * 40,
        curve_client_key=str(tmp_path / "gimp.key_secret")))
    run = limits.run([sys.executable, "-S", "-E", "-s", "-c", _CURVE, str(plugin),
                      str(BLOCKER), str(conn)], limit=60, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = run.stdout.splitlines()
    assert line.startswith("The plug-in can't use the connection file: the backend uses CURVE")
    assert "pyzmq does not load in this Python" in line and "ssh -L" in line
