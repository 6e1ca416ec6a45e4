"""The plug-in's backend conversation (dragdiff_backend.py) outside GIMP: messages, install.json,
and starting the real backend detached when none is running."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from plugin_modules import load

REPO = Path(__file__).resolve().parents[1]
db = load("dragdiff_backend")
prog = load("dragdiff_progress")


class Recorder(db.Feedback):
    def __init__(self) -> None:
        self.texts: list[str] = []

    def progress(self, fraction, text, detail=""):
        self.texts.append(text)


def test_install_info_round_trip(tmp_path):
    (tmp_path / "install.json").write_text(json.dumps({
        "backend_python": "/opt/dd/.venv/bin/python", "repo": "/opt/my repo",
        "connection_file": "/x/backend.json"}))
    info = db.InstallInfo.load(tmp_path)
    assert info.start_command() == "cd '/opt/my repo' && /opt/dd/.venv/bin/python -m backend serve"
    assert "not visible" in info.why_not_startable()
    assert db.InstallInfo.load(tmp_path / "missing").start_command() is None


def test_the_start_command_is_the_one_install_py_printed(tmp_path):
    """install.json carries the commands install.py printed (PowerShell and cmd on Windows) and
    the user service when it set one up; the plug-in's "not running" line uses them."""
    windows = {"PowerShell": "Set-Location -LiteralPath 'C:\\r'; & 'C:\\r\\py.exe' -m backend serve",
               "cmd": 'cd /d "C:\\r" && "C:\\r\\py.exe" -m backend serve'}
    (tmp_path / "install.json").write_text(json.dumps({
        "backend_python": "C:\\r\\py.exe", "repo": "C:\\r", "start_commands": windows}))
    info = db.InstallInfo.load(tmp_path)
    assert info.start_command() == (f"PowerShell: {windows['PowerShell']}\n"
                                    f"    cmd: {windows['cmd']}")
    message = db.not_running_message(tmp_path / "b.json", info, "some reason")
    assert f"Start it in a terminal with:\n    PowerShell: {windows['PowerShell']}" in message
    service = db.InstallInfo(backend_python="/v/python", repo="/r",
                             start_commands={"shell": "cd /r && /v/python -m backend serve"},
                             service="gimp-drag-diffusion.service")
    assert service.start_command() == "systemctl --user restart gimp-drag-diffusion.service"


def test_the_detached_start_on_posix_gets_its_own_session():
    assert db.detached_launch("/v/bin/python", "posix") == ("/v/bin/python",
                                                           {"start_new_session": True})


def test_the_detached_start_on_windows_opens_no_console_window():
    """A venv's python.exe redirector started DETACHED_PROCESS gives the real interpreter a
    new visible console whose closing kills the backend: pythonw.exe beside it instead, with
    CREATE_NO_WINDOW (and never DETACHED_PROCESS, which would override it)."""
    venv = "C:\\Users\\ann\\drag\\.venv\\Scripts"
    beside = {f"{venv}\\pythonw.exe"}
    program, kwargs = db.detached_launch(f"{venv}\\python.exe", "nt", beside.__contains__)
    assert program == f"{venv}\\pythonw.exe"
    assert kwargs == {"creationflags": db.CREATE_NEW_PROCESS_GROUP | db.CREATE_NO_WINDOW}
    assert not kwargs["creationflags"] & db.DETACHED_PROCESS
    # No pythonw.exe beside it (some other Python): python.exe, still without a window.
    program, kwargs = db.detached_launch(f"{venv}\\python.exe", "nt", set().__contains__)
    assert program == f"{venv}\\python.exe"
    assert kwargs["creationflags"] & db.CREATE_NO_WINDOW


@pytest.mark.skipif(os.name != "nt", reason="Windows' own flag values")
def test_the_windows_flags_are_windows_own():
    import subprocess

    assert db.CREATE_NO_WINDOW == subprocess.CREATE_NO_WINDOW
    assert db.CREATE_NEW_PROCESS_GROUP == subprocess.CREATE_NEW_PROCESS_GROUP
    assert db.DETACHED_PROCESS == subprocess.DETACHED_PROCESS


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
    from backend.engine.random_tiny import make_tiny_model

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
        assert "Starting the backend…" in feedback.texts
        pid = json.loads(conn.read_text())["pid"]
        assert os.getsid(pid) != os.getsid(0)  # its own session: detached from "GIMP"
        info = client.hello()
        assert info["model"]["state"] in ("loading", "ready")
        # The dialog's table comes from this reply: every knob has a default and a spec.
        par = load("dragdiff_params")
        table = par.ParamTable.parse(info, "backend")
        for knob in par.KNOBS:
            assert table.default("gooddrag", knob.param) is not None, knob
            assert table.specs[knob.param].step, knob
        assert table.describe("dragdiffusion")
        print(f"backend started and answered in {time.monotonic() - started:.1f} s")
    finally:
        client.shutdown()
        client.close()
    assert (conn.parent / "backend-console.log").exists()


# --- one job against a scripted client --------------------------------------------------------

class ScriptedClient:
    """Plays back job events like protocol.Client.events (a few per poll)."""

    def __init__(self, events, timeout=60.0) -> None:
        import protocol

        self.protocol = protocol
        self.script = list(events)
        self.timeout, self.retries = timeout, 1
        self.server_info = {"device": "cpu", "model": {"name": "toy", "demo": True},
                            "methods": {}}
        self.submitted: dict = {}
        self.cancelled: list[str] = []

    def submit(self, *args, **kwargs):
        self.submitted = kwargs
        return kwargs["job_id"]

    def events(self, job_id, timeout=None):
        from protocol.client import Event

        if not self.script:
            raise self.protocol.JobTimeout("nothing yet")
        kind, content, buffers = self.script.pop(0)
        yield Event(kind, job_id, {"job_id": job_id, **content}, buffers)

    def cancel(self, job_id):
        self.cancelled.append(job_id)
        self.script.append(("cancelled", {"reason": "client"}, []))
        return "cancelling"

    def close(self):
        pass


class Watcher(db.Feedback):
    def __init__(self, cancel_at: int | None = None) -> None:
        self.shown: list[tuple] = []
        self.previews: list[tuple] = []
        self.cancel_at = cancel_at

    def progress(self, fraction, text, detail=""):
        self.shown.append((fraction, text, detail))

    def preview(self, pixels, width, height, channels):
        self.previews.append((len(pixels), width, height, channels))

    def cancelled(self):
        return self.cancel_at is not None and len(self.shown) >= self.cancel_at


def job(**changes):
    spec = {"pixels": bytes(8 * 6 * 3), "width": 8, "height": 6, "channels": 3, "mask": None,
            "handles": [(1.0, 1.0)], "targets": [(3.0, 2.0)], "method": "dragdiffusion",
            "params": {}, "preview": True, **changes}
    return db.JobSpec(**spec)


def test_a_job_shows_phases_times_previews_and_returns_the_warnings():
    events = [("started", {}, []),
              ("progress", {"phase": "load", "step": 0, "total": 1}, []),
              ("progress", {"phase": "drag", "step": 0, "total": 4}, []),
              ("preview", {"phase": "drag", "step": 1, "width": 2, "height": 1,
                           "channels": 3}, [bytes(6)]),
              ("progress", {"phase": "drag", "step": 3, "total": 4}, []),
              ("finished", {"width": 8, "height": 6, "channels": 3, "handles": [[2.5, 1.5]],
                            "timings": {"drag": 1.0}, "warnings": ["a handle moved off"]},
               [bytes(8 * 6 * 3)])]
    client = ScriptedClient(events)
    session = db.Session(client.protocol, client)
    assert session.demo_model and session.device == "cpu" and session.dtypes == ["u8"]
    feedback = Watcher()
    plan = {"load": 1, "drag": 4, "decode": 1}
    result = session.run(job(), feedback, prog.Tracker(plan))
    assert result.warnings == ["a handle moved off"]
    assert result.previews == 1 and feedback.previews == [(6, 2, 1, 3)]
    assert result.handles == [(2.5, 1.5)] and result.dtype == "u8"
    assert client.submitted["preview"] is True
    assert client.submitted["dtype"] == "u8"
    phases = [text for _, text, _ in feedback.shown]
    assert "Dragging: step 4 of 4" in phases
    assert all("elapsed" in detail for _, _, detail in feedback.shown)
    fractions = [f for f, _, _ in feedback.shown if f is not None]
    assert fractions == sorted(fractions) and 0 < fractions[-1] < 1


def test_cancel_from_the_window_cancels_the_backend_job():
    events = [("progress", {"phase": "drag", "step": k, "total": 100}, []) for k in range(50)]
    client = ScriptedClient(events)
    with pytest.raises(db.JobCancelled, match="stopped job"):
        db.Session(client.protocol, client).run(job(), Watcher(cancel_at=3),
                                                prog.Tracker({"drag": 100}))
    assert len(client.cancelled) == 1


def test_a_wider_dtype_is_sent_only_when_the_backend_accepts_it():
    client = ScriptedClient([("finished", {"width": 8, "height": 6, "channels": 3,
                                           "handles": [[1, 1]], "dtype": "u16"},
                              [bytes(8 * 6 * 6)])])
    client.server_info["dtypes"] = ["u8", "u16", "f32"]
    session = db.Session(client.protocol, client)
    assert session.dtypes == ["u8", "u16", "f32"]
    result = session.run(job(dtype="u16", pixels=bytes(8 * 6 * 6)), Watcher(),
                         prog.Tracker({"drag": 1}))
    assert client.submitted["dtype"] == "u16" and result.dtype == "u16"


def test_demo_model_notice_uses_the_backends_hint():
    plain = {"model": {"name": "sd15", "state": "ready"}}
    assert not db.is_demo_model(plain)
    demo = {"model": {"name": "backend/demo/model", "demo": True,
                      "hint": "To edit photos, put Stable Diffusion 1.5 where the backend "
                              "finds it."}}
    assert db.is_demo_model(demo)
    assert db.demo_notice(demo) == (
        "Demo model: the backend serves the small model that ships with Drag Diffusion, fit "
        "for simple shapes only; to edit photos, put Stable Diffusion 1.5 where the backend "
        "finds it.")
    assert "README" in db.demo_notice({"model": {"demo": True}})
