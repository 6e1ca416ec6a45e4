"""The plug-in's backend conversation (dragdiff_backend.py) outside GIMP: messages, install.json,
and starting the real backend detached when none is running."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "gimp_plugin" / "drag-diffusion"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, PLUGIN_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load("dragdiff_geometry")
db = _load("dragdiff_backend")


class Recorder(db.Feedback):
    def __init__(self) -> None:
        self.texts: list[str] = []

    def progress(self, fraction, text):
        self.texts.append(text)


def test_install_info_round_trip(tmp_path):
    (tmp_path / "install.json").write_text(json.dumps({
        "backend_python": "/opt/dd/.venv/bin/python", "repo": "/opt/my repo",
        "connection_file": "/x/backend.json"}))
    info = db.InstallInfo.load(tmp_path)
    assert info.start_command() == "cd '/opt/my repo' && /opt/dd/.venv/bin/python -m backend serve"
    assert "not visible" in info.why_not_startable()
    assert db.InstallInfo.load(tmp_path / "missing").start_command() is None


def test_connection_file_precedence(tmp_path, monkeypatch):
    install = db.InstallInfo(connection_file=str(tmp_path / "recorded.json"))
    monkeypatch.delenv("DRAG_DIFFUSION_CONNECTION_FILE", raising=False)
    assert db.connection_file(" /a/b.json ", install) == Path("/a/b.json")
    assert db.connection_file("", install) == tmp_path / "recorded.json"
    monkeypatch.setenv("DRAG_DIFFUSION_CONNECTION_FILE", str(tmp_path / "env.json"))
    assert db.connection_file("", install) == tmp_path / "env.json"


def test_not_running_says_how_to_start(tmp_path):
    install = db.InstallInfo(backend_python="/nowhere/python", repo="/repo")
    with pytest.raises(db.BackendError) as info:
        db.connect(tmp_path / "none.json", install, 2, Recorder())
    message = str(info.value)
    assert "not running" in message
    assert "cd /repo && /nowhere/python -m backend serve" in message
    with pytest.raises(db.BackendError, match=r"install\.py"):
        db.connect(tmp_path / "none.json", db.InstallInfo(), 2, Recorder())


@pytest.mark.slow
def test_connect_starts_the_backend_detached(tmp_path, monkeypatch):
    from backend.engine.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    conn = tmp_path / "run" / "backend.json"
    install = db.InstallInfo(
        backend_python=sys.executable, repo=str(REPO),
        backend_args=["-m", "backend", "serve", "--model", str(model), "--device", "cpu",
                      "--bind", "tcp://127.0.0.1:0", "--connection-file", str(conn)])
    # GIMP's environment must not leak into the backend: a broken PYTHONPATH would stop it.
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "does-not-exist"))
    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "does-not-exist"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    feedback = Recorder()
    started = time.monotonic()
    client = db.connect(conn, install, 240, feedback)
    try:
        assert "Starting backend…" in feedback.texts
        pid = json.loads(conn.read_text())["pid"]
        assert os.getsid(pid) != os.getsid(0)  # its own session: detached from "GIMP"
        assert client.hello()["model"]["state"] in ("loading", "ready")
        print(f"backend started and answered in {time.monotonic() - started:.1f} s")
    finally:
        client.shutdown()
        client.close()
    assert (conn.parent / "backend-console.log").exists()
