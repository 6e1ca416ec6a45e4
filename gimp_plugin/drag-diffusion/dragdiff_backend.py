"""The plug-in's side of the backend conversation: find the backend, start it, run one job.

No gi here: GIMP is reached only through a ``Feedback`` object (progress, previews, notices,
cancel, UI pumping), so this module also runs (and is tested) outside GIMP. The backend is
reached only through the ``protocol`` package installed beside the plug-in.
"""

from __future__ import annotations

import contextlib
import json
import ntpath
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dragdiff_models as models
import dragdiff_preview as pre
import dragdiff_progress as prog
from dragdiff_geometry import Point

HERE = Path(__file__).resolve().parent
# Test hook: cancel the job after this many progress events (non-interactive runs can't click).
CANCEL_AFTER_ENV = "DRAG_DIFFUSION_CANCEL_AFTER_PROGRESS"
POLL_SECONDS = 0.2  # longest the UI goes unpumped while waiting for the backend
CONSOLE_LOG_BYTES = 2**20  # backend-console.log is rotated when a start finds it larger
PREPARE_VERSION = (1, 2)  # the protocol version that has the ``prepare`` request
SETTLE_SECONDS = 1.0  # settings unchanged this long before the dialog sends a prepare
# The algorithms whose edits start with work that needs no points (LoRA, inversion); an
# Inpaint4Drag prepare would only warm its filler, so the dialog sends none for it.
PREPARED_ALGORITHMS = ("dragdiffusion", "gooddrag")
# Windows process creation flags (winbase.h; subprocess has them only on Windows).
CREATE_NEW_PROCESS_GROUP = 0x00000200
DETACHED_PROCESS = 0x00000008
CREATE_NO_WINDOW = 0x08000000
# Variables from GIMP's environment that must not leak into the backend's Python.
_STRIP_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONEXECUTABLE",
              "PYTHONNOUSERSITE", "VIRTUAL_ENV", "GI_TYPELIB_PATH", "LD_LIBRARY_PATH",
              "LD_PRELOAD", "DYLD_LIBRARY_PATH", "GIMP3_DIRECTORY", "GIMP3_PLUGINDIR",
              "BABL_PATH", "GEGL_PATH", "GDK_PIXBUF_MODULE_FILE", "GTK_PATH")


class BackendError(Exception):
    """The backend can't be reached or refused the job; the text is for the user."""


class JobCancelled(Exception):
    """The user (or the test hook) cancelled; the backend job was cancelled too."""


class Feedback:
    """How the backend conversation talks to the user; the default does nothing."""

    def progress(self, fraction: float | None, text: str, detail: str = "") -> None:
        """Show ``text`` (the phase) and ``detail`` (times); ``fraction`` 0..1, or None for
        "busy, no estimate"."""

    def preview(self, pixels: bytes, width: int, height: int, channels: int) -> None:
        """A rough 8-bit picture of the edit so far (only when the job asked for previews)."""

    def notice(self, text: str) -> None:
        """A line the user should read while waiting (demo model, CPU backend, …)."""

    def cancelled(self) -> bool:
        return False

    def idle(self) -> None:
        """Called at least every ``POLL_SECONDS`` while waiting (pump the UI here)."""


@dataclass
class JobSpec:
    pixels: bytes
    width: int
    height: int
    channels: int
    mask: bytes | None
    handles: list[Point]
    targets: list[Point]
    method: str
    params: dict[str, Any]
    prompt: str = ""
    seed: int = 0
    dtype: str = "u8"
    preview: bool = False


@dataclass
class JobResult:
    job_id: str
    pixels: bytes
    width: int
    height: int
    channels: int
    handles: list[Point]
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    dtype: str = "u8"
    previews: int = 0  # preview events shown while it ran


@dataclass
class InstallInfo:
    """What install.py recorded in install.json beside the plug-in (all optional)."""

    backend_python: str | None = None
    backend_args: list[str] = field(default_factory=lambda: ["-m", "backend", "serve"])
    repo: str | None = None
    connection_file: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # the backend's table, recorded
    # The commands install.py printed, by shell ("shell"; Windows: "PowerShell", "cmd").
    start_commands: dict[str, str] = field(default_factory=dict)
    service: str | None = None  # the systemd user unit that runs the backend, if set up

    @classmethod
    def load(cls, folder: Path = HERE) -> InstallInfo:
        try:
            data = json.loads((folder / "install.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls()
        return cls(backend_python=data.get("backend_python"),
                   backend_args=list(data.get("backend_args") or ["-m", "backend", "serve"]),
                   repo=data.get("repo"), connection_file=data.get("connection_file"),
                   parameters=dict(data.get("parameters") or {}),
                   start_commands=dict(data.get("start_commands") or {}),
                   service=data.get("service"))

    def start_command(self) -> str | None:
        """How the user starts the backend: the user service when install.py set one up,
        else the commands it printed (one per shell on Windows)."""
        if self.service:
            return f"systemctl --user restart {self.service}"
        if len(self.start_commands) > 1:
            return "\n    ".join(f"{shell}: {command}"
                                  for shell, command in self.start_commands.items())
        if self.start_commands:
            return next(iter(self.start_commands.values()))
        if not self.backend_python or not self.repo:
            return None
        return f"cd {_quote(self.repo)} && {_quote(self.backend_python)} " \
               f"{' '.join(_quote(a) for a in self.backend_args)}"

    def why_not_startable(self) -> str | None:
        """None when the plug-in can start the backend itself, else the reason."""
        if not self.backend_python or not self.repo:
            return "install.json does not say where the backend is installed"
        if os.path.exists("/.flatpak-info"):
            return "GIMP runs in a Flatpak sandbox, which can't start programs outside it"
        if not os.path.isfile(self.backend_python):
            return f"the backend's Python {self.backend_python} is not visible from GIMP"
        return None


def _quote(text: str) -> str:
    if os.name == "nt":
        return f'"{text}"' if " " in text else text
    return text if text and all(c.isalnum() or c in "/._-+:=@" for c in text) else \
        "'" + text.replace("'", "'\\''") + "'"


def connection_file(setting: str, install: InstallInfo) -> Path:
    """The backend's connection file: the procedure's argument, else the environment's
    ``DRAG_DIFFUSION_CONNECTION_FILE``, else what install.py recorded, else the default."""
    from protocol import default_connection_file
    from protocol.connection import CONNECTION_ENV

    if setting.strip():
        return Path(setting.strip()).expanduser()
    if not os.environ.get(CONNECTION_ENV) and install.connection_file:
        return Path(install.connection_file)
    return default_connection_file()


def _import_protocol():
    """The ``protocol`` package beside the plug-in: standard library only, so it loads in any
    GIMP's Python (pyzmq is used only where it happens to load; see protocol/transport.py)."""
    try:
        import protocol
    except ImportError as exc:
        raise BackendError(
            f"The plug-in can't load its protocol package ({exc}). Re-run install.py, which "
            "copies it beside the plug-in.") from None
    return protocol


def try_connect(path: Path, timeout: float) -> Any | None:
    """A connected ``protocol.Client`` (hello done), or None when no backend answers."""
    protocol = _import_protocol()
    if not path.exists():
        return None
    try:
        client = protocol.Client.from_connection_file(
            path, timeout=max(0.2, timeout / 2), retries=1, name="gimp-drag-diffusion")
    except protocol.BackendUnavailable as exc:
        if exc.code == "connection_file":  # unsafe or incomplete: starting one won't help
            raise BackendError(f"The plug-in can't use the connection file: {exc.message}.") \
                from None
        return None
    try:
        info = client.hello()
    except protocol.BackendUnavailable as exc:
        client.close()
        if exc.code == "wrong_key":  # someone answers there: say so, don't start another
            raise BackendError(f"The backend refused this plug-in: {exc.message}.") from None
        return None
    except protocol.BackendError as exc:
        client.close()
        raise BackendError(f"The backend refused the connection: {exc.message}") from None
    model = info.get("model") or {}
    if model.get("state") in ("missing", "error"):
        client.close()
        raise BackendError(f"The backend has no usable model: "
                           f"{model.get('error') or model.get('state')}")
    return client


def not_running_message(path: Path, install: InstallInfo, reason: str | None) -> str:
    command = install.start_command()
    lines = [f"The Drag Diffusion backend is not running (no answer for connection file {path})."]
    if command:
        lines.append(f"Start it in a terminal with:\n    {command}\nthen run the filter again.")
        if reason:
            lines.append(f"(The plug-in can't start it itself: {reason}.)")
    else:
        lines.append("Install it with 'python3 install.py' in the Drag Diffusion folder and "
                     "start it with '.venv/bin/python -m backend serve' there, or give the "
                     "connection file of a running backend in the Backend setting.")
    return "\n".join(lines)


def detached_launch(python: str, os_name: str = os.name,
                    is_file=os.path.isfile) -> tuple[str, dict[str, Any]]:
    """The program that runs the backend's Python without GIMP, and how to start it.

    POSIX: its own session, so closing GIMP (or its terminal) sends it no signal. Windows:
    GIMP starts plug-ins with no console and no job object, so the plug-in's children outlive
    it; but a venv's ``python.exe`` is a redirector that starts the real interpreter as its own
    child, and started with DETACHED_PROCESS that child opens a new console window
    (python/cpython#85785) whose closing kills the backend. ``pythonw.exe`` beside it is the
    same interpreter without a console; CREATE_NO_WINDOW (never with DETACHED_PROCESS, which
    overrides it) keeps a ``python.exe`` without a ``pythonw.exe`` beside it windowless."""
    if os_name != "nt":
        return python, {"start_new_session": True}
    folder, name = ntpath.split(python)
    windowless = ntpath.join(folder, "pythonw.exe")
    if name.lower() == "python.exe" and is_file(windowless):
        python = windowless
    return python, {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}


def start_backend(install: InstallInfo, log_path: Path) -> subprocess.Popen:
    """Start ``<backend python> -m backend serve`` detached from GIMP (``detached_launch``),
    with a clean environment and its output in ``log_path``."""
    env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists() and log_path.stat().st_size > CONSOLE_LOG_BYTES:
        log_path.replace(log_path.with_name(log_path.name + ".1"))  # keep one old console log
    program, kwargs = detached_launch(install.backend_python)
    with open(log_path, "ab") as log:
        return subprocess.Popen([program, *install.backend_args],
                                cwd=install.repo, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, close_fds=True, **kwargs)


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def connect(path: Path, install: InstallInfo, timeout: float, feedback: Feedback) -> Any:
    """Connect to the backend, starting it when it isn't running and install.json allows."""
    feedback.progress(None, "Connecting to the backend…")
    client = try_connect(path, timeout)
    if client is not None:
        return client
    reason = install.why_not_startable()
    if reason:
        raise BackendError(not_running_message(path, install, reason))
    log_path = path.parent / "backend-console.log"
    process = start_backend(install, log_path)
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    while time.monotonic() < deadline:
        feedback.progress(None, f"{prog.PHASE_LABELS['starting']}…",
                          f"{prog.clock_time(time.monotonic() - started)} elapsed")
        if feedback.cancelled():
            raise JobCancelled("Cancelled while the backend was starting (it keeps starting "
                               "in the background).")
        if process.poll() is not None:
            raise BackendError(f"The backend stopped while starting (exit status "
                               f"{process.returncode}). Its last output ({log_path}):\n"
                               f"{_log_tail(log_path)}")
        client = try_connect(path, min(2.0, timeout))
        if client is not None:
            return client
        _wait(POLL_SECONDS, feedback)
    raise BackendError(f"The backend did not become ready within {timeout:g} s (it may still "
                       f"be starting; see {log_path}). Try again, or raise the timeout.")


def _wait(seconds: float, feedback: Feedback) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        feedback.idle()
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))


class PreviewLink:
    """A connection to a running backend kept while the settings dialog is open: its hello (for
    the dialog's defaults) and the live warp preview. Never starts a backend; when none answers
    within ``timeout`` it stays unconnected (``info`` None)."""

    def __init__(self, setting: str, timeout: float = 1.0) -> None:
        self.client: Any = None
        try:
            self.client = try_connect(connection_file(setting, InstallInfo.load()), timeout)
        except BackendError:
            self.client = None
        self.info: dict[str, Any] | None = (dict(self.client.server_info or {})
                                            if self.client is not None else None)

    @property
    def can_warp(self) -> bool:
        return self.client is not None and pre.supports_warp(self.info)

    def warp(self, inputs: pre.PreviewInputs,
             params: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        """The warped layer with the inpainting grid (8-bit, the inputs' channels) and the
        reply's figures. Raises ``BackendError`` with a line for the dialog."""
        protocol = _import_protocol()
        if inputs.mask is None:
            raise BackendError(pre.NO_SELECTION)
        try:
            reply = self.client.warp(inputs.pixels, inputs.width, inputs.height,
                                     inputs.channels, inputs.handles, inputs.targets,
                                     inputs.mask, params=pre.warp_params(params),
                                     overlay=True, dtype="u8")
        except protocol.BackendUnavailable as exc:
            self.close()
            raise BackendError(f"The backend stopped answering: {exc.message}") from None
        except protocol.BackendError as exc:
            raise BackendError(exc.message) from None
        return bytes(reply.image), dict(reply.content)

    def detach(self) -> Any:
        """Hand the connection over (to the edit that follows the dialog's OK: the same
        client session, so the prepare it joins stays alive); the link forgets it."""
        client, self.client = self.client, None
        return client

    # --- model downloads (protocol 1.3): the backend downloads, the dialog asks and shows ---
    @property
    def can_download(self) -> bool:
        return self.client is not None and models.can_download(self.info)

    def download(self, set_name: str) -> str:
        """Ask the backend to download a catalogue set; returns the job id to follow (that of
        a download of the set already under way, if any)."""
        return str(self._call(lambda c: c.download(set_name))["job_id"])

    def download_events(self, job_id: str, wait: float = 0.05) -> list[Any]:
        """The download's events that arrive within ``wait`` seconds (its terminal one last).
        A failed download raises ``BackendError`` with the backend's line."""
        protocol = _import_protocol()
        events = []
        try:
            for event in self.client.events(job_id, timeout=wait):
                events.append(event)
                if event.terminal:
                    break
        except protocol.JobTimeout:
            pass
        except protocol.BackendUnavailable as exc:
            self.close()
            raise BackendError(f"The backend stopped answering: {exc.message}") from None
        except protocol.BackendError as exc:  # JobFailed: the download's error event
            raise BackendError(exc.message) from None
        return events

    def cancel_download(self, job_id: str) -> None:
        self._call(lambda c: c.cancel(job_id))

    def refresh(self) -> dict[str, Any] | None:
        """Ask ``hello`` again (after a download the backend serves other models)."""
        self.info = dict(self._call(lambda c: c.hello()))
        return self.info

    def _call(self, request: Any) -> Any:
        protocol = _import_protocol()
        if self.client is None:
            raise BackendError("The backend is not running.")
        try:
            return request(self.client)
        except protocol.BackendUnavailable as exc:
            self.close()
            raise BackendError(f"The backend stopped answering: {exc.message}") from None
        except protocol.BackendError as exc:
            raise BackendError(exc.message) from None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def supports_prepare(info: dict[str, Any] | None) -> bool:
    """Whether a backend's hello says it answers ``prepare`` (protocol 1.2 or later)."""
    version = str((info or {}).get("protocol_version") or "0.0")
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= PREPARE_VERSION


@dataclass(frozen=True)
class PrepareSettings:
    """What a prepare sends besides the pixels; the dialog sends a new one when these change
    (the backend answers with the same job when only knobs its caches ignore changed)."""

    method: str
    algorithm: str
    params: tuple[tuple[str, Any], ...]
    prompt: str
    seed: int
    masked: bool  # the edit will have a selection


# (dtype, channels, pixels): the layer as the edit will send it, read once per dialog.
PixelReader = Callable[[], tuple[str, int, bytes]]


class Preparer:
    """The dialog's prepare (protocol 1.2): while the dialog is open, the backend trains the
    LoRA and inverts the layer for the method and settings shown, so that OK starts at the drag
    (the submit joins the prepare, or finds its results cached).

    The dialog's timer calls ``look`` with the settings it shows: once they have stayed the
    same for ``SETTLE_SECONDS`` and differ from the last ones sent, a prepare goes out (for
    Inpaint4Drag, none: the current one is cancelled). ``poll`` keeps the connection alive
    (the backend cancels a silent client's prepare) and reads the prepare's progress;
    ``cancel`` is the dialog's Cancel. A prepare only saves time, so nothing here raises:
    what went wrong is kept in ``error`` and the edit runs without it.
    """

    def __init__(self, link: PreviewLink, read_pixels: PixelReader, width: int, height: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.link, self.read_pixels = link, read_pixels
        self.width, self.height = width, height
        self.clock = clock
        self.job_id: str | None = None
        self.steps: dict[str, tuple[int, int]] = {}  # phase -> (steps done, total)
        self.times = prog.StepTimes()  # its steps' measured seconds (the edit's time left)
        self.phase: str | None = None
        self.ended: str | None = None  # prepared, cancelled or failed
        self.error: str | None = None
        self._pixels: tuple[str, int, bytes] | None = None
        self._seen: PrepareSettings | None = None
        self._since = 0.0
        self._sent: PrepareSettings | None = None

    @property
    def usable(self) -> bool:
        client = self.link.client
        return client is not None and supports_prepare(self.link.info) and self.error is None

    @property
    def active(self) -> bool:
        """A prepare was sent and has not ended."""
        return self.job_id is not None and self.ended is None

    def look(self, settings: PrepareSettings) -> None:
        if not self.usable:
            return
        now = self.clock()
        if settings != self._seen:
            self._seen, self._since = settings, now
            return
        if now - self._since < SETTLE_SECONDS or settings == self._sent:
            return
        self._sent = settings
        if settings.algorithm not in PREPARED_ALGORITHMS:
            self.cancel()
            return
        self._send(settings)

    def _send(self, settings: PrepareSettings) -> None:
        protocol = _import_protocol()
        try:
            if self._pixels is None:
                self._pixels = self.read_pixels()
            dtype, channels, pixels = self._pixels
            job = self.link.client.prepare(
                pixels, self.width, self.height, channels, dtype=dtype, method=settings.method,
                params=dict(settings.params), prompt=settings.prompt, seed=settings.seed,
                masked=settings.masked, job_id="prep-" + uuid.uuid4().hex[:16])
        except protocol.BackendError as exc:  # refused (e.g. too much work): no prepare
            self._forget(f"no prepare: {exc.message}")
            return
        except Exception as exc:  # reading the layer failed: the edit will say why
            self._forget(f"no prepare: {exc}")
            return
        if job != self.job_id:  # a new prepare (else the backend's answer: the same one)
            self.job_id, self.steps, self.phase, self.ended = job, {}, None, None
            self.times = prog.StepTimes()

    def forget(self) -> None:
        """The backend serves other models now (a download in the dialog): what it prepared
        was for the ones before, so the settings shown are prepared again once settled."""
        self._sent = None
        self.job_id, self.steps, self.phase, self.ended = None, {}, None, None
        self.times = prog.StepTimes()

    def _forget(self, error: str) -> None:
        self.error, self.job_id, self.ended = error, None, None

    def poll(self) -> None:
        """Heartbeat and read the prepare's events (a few milliseconds; call often)."""
        if not self.active or self.link.client is None:
            return
        protocol = _import_protocol()
        try:
            for event in self.link.client.events(self.job_id, timeout=0.01):
                if event.type == "progress":
                    self.phase = event["phase"]
                    self.steps[self.phase] = (event["step"], event["total"])
                    self.times.event(self.phase, event["step"], self.clock())
                elif event.type == "prepared":
                    self.ended, self.phase = "prepared", None
                    self.steps = {p: (t, t) for p, (_, t) in self.steps.items()}
                elif event.type == "cancelled":
                    self.ended = "cancelled"
        except protocol.JobTimeout:
            pass
        except protocol.BackendError as exc:
            self.ended, self.error = "failed", f"prepare failed: {exc.message}"

    def cancel(self, client: Any = None) -> None:
        """Stop the prepare (the dialog's Cancel, a method that needs none, or an edit that
        failed before it was sent: ``client``, the connection the link handed over)."""
        client = client or self.link.client
        if not self.active or client is None:
            return
        # Best effort: a backend that is gone, or a connection an edit already closed, has no
        # prepare left to stop that this could reach.
        with contextlib.suppress(Exception):
            client.cancel(self.job_id)
        self.ended = "cancelled"

    def done(self) -> dict[str, int]:
        """Steps done per phase so far (``prepared``: all of them), for the time left."""
        return {phase: step for phase, (step, _) in self.steps.items()}

    def status(self) -> str:
        """One line for the dialog: what the backend prepares now, or that it is ready."""
        if self.ended == "prepared":
            return "Prepared in the background: OK starts at the drag."
        if not self.active:
            return ""
        if self.phase in self.steps:
            step, total = self.steps[self.phase]
            label = prog.PHASE_LABELS.get(self.phase, self.phase)
            return f"Preparing in the background: {label}, step {min(step + 1, total)} of {total}."
        return "Preparing in the background…"


def is_demo_model(info: dict[str, Any]) -> bool:
    """Whether the backend serves the small demo model that ships with the project (its hello
    says ``model.demo``)."""
    return bool((info.get("model") or {}).get("demo"))


def demo_notice(info: dict[str, Any]) -> str:
    """The line the dialog and the progress window show while the demo model is served, with
    the backend's own hint on getting SD1.5 when it gives one."""
    hint = str((info.get("model") or {}).get("hint") or "to edit photos, install Stable "
               "Diffusion 1.5 (README, section “Models”) and restart the backend").strip()
    return ("Demo model: the backend serves the small model that ships with Drag Diffusion, "
            f"fit for simple shapes only; {hint[:1].lower()}{hint[1:].rstrip('.')}.")


class Session:
    """A connected backend: what its ``hello`` said, and running jobs on it."""

    def __init__(self, protocol: Any, client: Any) -> None:
        self.protocol = protocol
        self.client = client
        self.info: dict[str, Any] = dict(client.server_info or {})

    @property
    def device(self) -> str:
        return str(self.info.get("device") or "")

    @property
    def transport(self) -> str:
        """How the frames travel: ``pyzmq`` (libzmq) or ``zmtp`` (pure Python)."""
        return str(getattr(self.client, "transport", ""))

    @property
    def model_name(self) -> str:
        return str((self.info.get("model") or {}).get("name") or "")

    @property
    def demo_model(self) -> bool:
        return is_demo_model(self.info)

    @property
    def dtypes(self) -> list[str]:
        """Pixel dtypes the backend accepts (PROTOCOL.md: 8-bit only unless it says more)."""
        return [str(d) for d in self.info.get("dtypes") or ["u8"]]

    def run(self, job: JobSpec, feedback: Feedback, tracker: prog.Tracker) -> JobResult:
        """Run one drag edit, reporting progress; raise on error or cancel. A backend that
        stops answering the client's heartbeats is reported as lost (protocol.Client's
        ``liveness``, a few seconds)."""
        try:
            return _run_job(self.protocol, self.client, job, feedback, tracker)
        except self.protocol.BackendUnavailable as exc:
            raise BackendError(f"Lost the backend: {exc.message}") from None
        except self.protocol.BackendError as exc:
            raise BackendError(f"The backend reported an error: {exc.message}") from None

    def close(self) -> None:
        self.client.close()


def open_session(setting: str, timeout: float, feedback: Feedback,
                 client: Any = None) -> Session:
    """Connect to (or start) the backend named by ``setting`` (see ``connection_file``), or
    go on with ``client``, the dialog's connection (``PreviewLink.detach``)."""
    protocol = _import_protocol()
    if client is not None:
        return Session(protocol, client)
    install = InstallInfo.load()
    return Session(protocol, connect(connection_file(setting, install), install, timeout,
                                     feedback))


def _show(feedback: Feedback, tracker: prog.Tracker) -> None:
    fraction = None if tracker.phase in ("starting", "queued") else tracker.fraction
    feedback.progress(fraction, tracker.phase_text(), tracker.time_text())


def _run_job(protocol: Any, client: Any, job: JobSpec, feedback: Feedback,
             tracker: prog.Tracker) -> JobResult:
    cancel_after = int(os.environ.get(CANCEL_AFTER_ENV, "0") or 0)
    job_id = "gimp-" + uuid.uuid4().hex[:16]
    client.submit(job.pixels, job.width, job.height, job.channels, job.handles, job.targets,
                  job_id=job_id, mask=job.mask, method=job.method, params=job.params,
                  prompt=job.prompt, seed=job.seed, preview=job.preview, dtype=job.dtype)
    tracker.update("queued", 0, 0)
    _show(feedback, tracker)
    progress_events = previews = 0
    cancelling = False
    while True:
        for event in _poll(protocol, client, job_id):
            c = event.content
            if event.type == "finished" and cancelling:
                raise JobCancelled(f"Cancelled; job {job_id} had just finished on the backend "
                                   "and its result was discarded.")
            if event.type == "finished":
                tracker.finish()
                return JobResult(job_id, event.image or b"", c["width"], c["height"],
                                 c["channels"], [tuple(p) for p in c["handles"]],
                                 dict(c.get("timings") or {}), dict(c.get("stats") or {}),
                                 [str(w) for w in c.get("warnings") or []],
                                 str(c.get("dtype") or "u8"), previews)
            if event.type == "cancelled":
                raise JobCancelled(f"Cancelled; the backend stopped job {job_id} "
                                   f"({c.get('reason', 'client')}).")
            if event.type == "queued":
                tracker.update("queued", 0, 0)
                feedback.progress(None, f"{prog.PHASE_LABELS['queued']} (position "
                                        f"{c.get('position')})", tracker.time_text())
            elif event.type == "progress" and not cancelling:
                progress_events += 1
                tracker.update(c["phase"], c["step"], c["total"])
                _show(feedback, tracker)
            elif event.type == "preview" and not cancelling and event.image:
                previews += 1
                feedback.preview(event.image, c["width"], c["height"], c["channels"])
        feedback.idle()
        if not cancelling and (feedback.cancelled() or
                               (cancel_after and progress_events >= cancel_after)):
            cancelling = True
            feedback.progress(None, "Cancelling…", tracker.time_text())
            client.cancel(job_id)


def _poll(protocol: Any, client: Any, job_id: str) -> list[Any]:
    """The job's events that arrive within ``POLL_SECONDS`` (``events`` with a short bound)."""
    events = []
    try:
        for event in client.events(job_id, timeout=POLL_SECONDS):
            events.append(event)
            if event.terminal:
                break
    except protocol.JobTimeout:
        pass
    return events
