"""The persistent backend server: one ROUTER socket, a fair job queue, one engine thread.

Only the socket thread (``serve_forever``) touches the ZeroMQ socket and the job table; the
worker thread loads the model and runs one edit at a time, posting events to a queue and
waking the socket thread through a socket pair. So hello, ping, cancel and shutdown are
answered while an edit runs. The wire format is ``protocol/PROTOCOL.md``.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import ipaddress
import logging
import os
import queue
import re
import secrets
import socket as pysocket
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from backend import __version__
from backend.engine.errors import Cancelled, EngineError, ModelNotFound
from backend.engine.params import defaults_table, resolve
from backend.engine.types import CancelToken, DragRequest
from protocol import wire
from protocol.client import BackendError, Client
from protocol.curve import load_keypair
from protocol.wire import ConnectionInfo, Limits, Message, ProtocolError

log = logging.getLogger("backend.server")

DEFAULT_BIND = "tcp://127.0.0.1:5557"
PROGRESS_INTERVAL = 0.05  # seconds between progress events of one job (phase changes always)
PREVIEW_INTERVAL = 0.5
_STATE_OF = {wire.FINISHED: "finished", wire.CANCELLED: "cancelled", wire.ERROR: "failed"}


class ServerError(Exception):
    """The server cannot start; the message says what to change."""


@dataclass(frozen=True)
class CurveServer:
    """``--curve``: the server's secret key file and the folder of allowed client ``*.key``."""

    secret_key_file: Path
    allow_dir: Path


@dataclass(eq=False)
class Job:
    job_id: str
    session: str  # the submitting client session (fair queueing)
    route: str  # the session that receives the events (changes on attach)
    parent: dict[str, Any]  # the submit's header
    fingerprint: bytes
    request: dict[str, Any]
    buffers: list[Any]
    created: float = field(default_factory=time.monotonic)
    state: str = "queued"
    position: int | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    cancel_reason: str = "client"
    started: float | None = None
    ended: float | None = None
    terminal: tuple[str, dict[str, Any], list[Any]] | None = None

    @property
    def result_bytes(self) -> int:
        return sum(len(b) for b in self.terminal[2]) if self.terminal else 0


class FairQueue:
    """Round-robin over client sessions; each session's jobs run in submission order."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[Job]:
        return iter(self.order())

    def push(self, job: Job) -> None:
        self._queues.setdefault(job.session, deque()).append(job)

    def pop(self) -> Job | None:
        if not self._queues:
            return None
        session, jobs = next(iter(self._queues.items()))
        job = jobs.popleft()
        if jobs:
            self._queues.move_to_end(session)
        else:
            del self._queues[session]
        return job

    def remove(self, job: Job) -> None:
        jobs = self._queues.get(job.session)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del self._queues[job.session]

    def order(self) -> list[Job]:
        """The order in which the queued jobs will run."""
        rounds = [list(q) for q in self._queues.values()]
        depth = max((len(r) for r in rounds), default=0)
        return [r[i] for i in range(depth) for r in rounds if i < len(r)]


def _plain(value: Any, depth: int = 0) -> Any:
    """Turn engine stats (numpy scalars, tuples, paths) into msgpack-safe values."""
    if depth > 8:
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return str(value)


def _is_local(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    match = re.fullmatch(r"tcp://(.+):(\d+|\*)", endpoint)
    if not match:
        return False
    host = match.group(1).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _looks_like_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


class Server:
    """Serves drag edits from any number of clients with one engine.

    ``load_engine`` is called once in the worker thread and returns an object with
    ``info() -> dict`` and ``run(DragRequest, progress=, cancel=) -> DragResult``.
    """

    def __init__(self, load_engine: Callable[[], Any], *, model_name: str,
                 device: str = "auto", bind: str = DEFAULT_BIND,
                 connection_file: Path | None = None, limits: Limits | None = None,
                 curve: CurveServer | None = None, client_ttl: float = 60.0,
                 replay_window: float = 300.0, keep_results: int = 32,
                 keep_bytes: int = 2**30, keep_seconds: float = 3600.0,
                 shutdown_grace: float = 30.0,
                 on_ready: Callable[[Server], None] | None = None) -> None:
        self._load_engine = load_engine
        self.model_name = model_name
        self.device = device
        self.bind = bind
        self.connection_file = Path(connection_file) if connection_file else None
        self.limits = limits or Limits()
        self.curve = curve
        self.client_ttl = client_ttl
        self.keep_results, self.keep_bytes = keep_results, keep_bytes
        self.keep_seconds = keep_seconds
        self.shutdown_grace = shutdown_grace
        self.on_ready = on_ready
        self.key = secrets.token_bytes(32)
        self.endpoint = ""
        self.ready = threading.Event()  # set once the model has loaded or failed to
        self._session = wire.Session(self.key, me="this backend", peer="the plug-in",
                                     replay=wire.ReplayGuard(replay_window),
                                     max_field_bytes=self.limits.max_field_bytes)
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._auth: ThreadAuthenticator | None = None
        self._wake_r, self._wake_w = pysocket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="drag-engine", daemon=True)
        self._engine: Any = None
        self._engine_info: dict[str, Any] = {}
        self._model_state, self._model_error = "loading", None
        self._jobs: dict[str, Job] = {}
        self._queue = FairQueue()
        self._running: Job | None = None
        self._done: OrderedDict[str, Job] = OrderedDict()  # terminal jobs kept for re-fetching
        self._expired: OrderedDict[str, str] = OrderedDict()  # job id -> final state
        self._routes: dict[str, bytes] = {}  # session -> current ZeroMQ identity
        self._last_seen: dict[str, float] = {}
        self._stop_reason: str | None = None
        self._stop_deadline: float | None = None
        self._next_housekeeping = 0.0

    # --- life cycle -------------------------------------------------------------------------
    def start(self) -> str:
        """Bind, write the connection file, start loading the model; return the endpoint."""
        try:
            self._refuse_if_running()
            self._socket = self._context.socket(zmq.ROUTER)
            self._socket.linger = 2000
            self._socket.router_mandatory = 1
            self._socket.maxmsgsize = self.limits.max_frame_bytes
            if self.curve is not None:
                self._setup_curve(self._socket)
            elif not _is_local(self.bind):
                raise ServerError(f"refusing to bind {self.bind} without encryption: it is "
                                  "reachable from other machines; add --curve (see the README, "
                                  "'Remote backend') or bind tcp://127.0.0.1")
            self.endpoint = self._bind(self._socket)
            if self.connection_file is not None:
                self._write_connection_file(self.connection_file)
        except BaseException:
            self._release()
            raise
        log.info("listening on %s (connection file %s)", self.endpoint, self.connection_file)
        self._worker.start()
        return self.endpoint

    def _write_connection_file(self, path: Path) -> None:
        server_key = None
        if self.curve is not None:
            server_key = load_keypair(self.curve.secret_key_file)[0].decode("ascii")
        try:
            wire.write_connection_file(path, ConnectionInfo(
                endpoint=self.endpoint, key=self.key, pid=os.getpid(),
                curve_server_key=server_key))
        except OSError as exc:
            raise ServerError(f"cannot write the connection file {path}: {exc}; give a "
                              "writable --connection-file") from None

    def _refuse_if_running(self) -> None:
        if self.connection_file is None or not self.connection_file.exists():
            return
        try:
            info = wire.read_connection_file(self.connection_file)
        except (OSError, ValueError):
            return
        try:
            with Client(info.endpoint, info.key, timeout=0.5, retries=0,
                        context=self._context) as probe:
                probe.ping()
        except BackendError:
            return  # stale file from a backend that is gone
        raise ServerError(f"a backend is already running at {info.endpoint} (pid {info.pid}, "
                          f"connection file {self.connection_file}); stop it first or give "
                          "another --connection-file")

    def _setup_curve(self, sock: zmq.Socket) -> None:
        assert self.curve is not None
        if not zmq.has("curve"):
            raise ServerError("this libzmq has no CURVE support; reinstall pyzmq")
        try:
            public, secret = load_keypair(self.curve.secret_key_file)
        except ValueError as exc:
            raise ServerError(f"{exc}; create it with: python -m backend keygen") from None
        if not self.curve.allow_dir.is_dir():
            raise ServerError(f"the allow-list folder {self.curve.allow_dir} does not exist; put "
                              "the clients' public .key files there")
        self._auth = ThreadAuthenticator(self._context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(self.curve.allow_dir))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def _bind(self, sock: zmq.Socket) -> str:
        endpoint = re.sub(r":0$", ":*", self.bind)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EADDRINUSE and self.bind == DEFAULT_BIND:
                log.warning("%s is in use; binding a free port instead", self.bind)
                sock.bind("tcp://127.0.0.1:*")
            else:
                raise ServerError(f"cannot bind {self.bind}: {exc.strerror}; choose another "
                                  "--bind (tcp://127.0.0.1:0 picks a free port)") from None
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # A wildcard address is not connectable; advertise this host's name instead.
        return re.sub(r"^tcp://(0\.0\.0\.0|\[::\]|\*):", f"tcp://{pysocket.gethostname()}:",
                      bound)

    def stop(self, reason: str = "shutdown") -> None:
        """Ask ``serve_forever`` to cancel all jobs and return (thread- and signal-safe)."""
        self._stop_reason = self._stop_reason or reason
        self._wake()

    def serve_forever(self) -> None:
        """Serve until ``stop`` or a ``shutdown`` message; then clean up."""
        assert self._socket is not None, "call start() first"
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll(100))
                if self._wake_r.fileno() in ready:
                    self._drain_wakeups()
                for _ in range(64):  # bounded, so worker events are not starved
                    if not self._socket.poll(0, zmq.POLLIN):
                        break
                    self._receive(self._socket.recv_multipart(copy=False))
                self._drain_events()
                now = time.monotonic()
                if now >= self._next_housekeeping:
                    self._housekeeping(now)
                    self._next_housekeeping = now + 0.25
                if self._stop_reason and self._stop_deadline is None:
                    self._begin_shutdown(self._stop_reason)
                if self._stop_deadline is not None:
                    if not self._worker.is_alive() and self._events.empty():
                        break
                    if now > self._stop_deadline:
                        log.warning("the engine did not stop within %.0f s; exiting anyway",
                                    self.shutdown_grace)
                        break
        finally:
            self._close()

    def _close(self) -> None:
        if self.connection_file is not None:
            try:
                info = wire.read_connection_file(self.connection_file)
                if info.pid == os.getpid() and info.endpoint == self.endpoint:
                    self.connection_file.unlink()
            except (OSError, ValueError):
                pass
        self._release()
        log.info("stopped")

    def _release(self) -> None:
        if self._socket is not None:
            self._socket.close()  # with linger: queued cancelled events still go out
        if self._auth is not None:
            self._auth.stop()
        self._wake_r.close()
        self._wake_w.close()
        if not self._worker.is_alive():
            self._context.term()

    def _begin_shutdown(self, reason: str) -> list[str]:
        log.info("shutting down (%s)", reason)
        self._stop_reason = self._stop_reason or reason
        self._stop_deadline = time.monotonic() + self.shutdown_grace
        cancelled = [job.job_id for job in self._queue.order()]
        for job in self._queue.order():
            self._queue.remove(job)
            self._end(job, wire.CANCELLED, {"job_id": job.job_id, "reason": "shutdown"})
        if self._running is not None:
            cancelled.append(self._running.job_id)
            self._running.cancel_reason = "shutdown"
            self._running.cancel.cancel()
        self._inbox.put(None)
        return cancelled

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # buffer full (already awake) or closed
            self._wake_w.send(b"!")

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    # --- inbound ------------------------------------------------------------------------------
    def _receive(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        message: Message | None = None
        try:
            message = self._session.parse([f.buffer for f in frames[1:]])
            wire.check_content(message)
            if message.msg_type not in wire.REQUESTS:
                raise ProtocolError(wire.UNKNOWN_MESSAGE_TYPE,
                                    f"{message.msg_type!r} is not a request")
        except ProtocolError as exc:
            parent = message.header if message else exc.header
            log.info("refused a message from %s: %s (%s)", identity.hex()[:8], exc.message,
                     exc.detail)
            self._send(identity, wire.ERROR, exc.content(), parent=parent,
                       job_id=(parent or {}).get("job_id"))
            return
        self._routes[message.session] = identity
        self._last_seen[message.session] = time.monotonic()
        handler = getattr(self, f"_on_{message.msg_type}")
        try:
            handler(message, identity)
        except ProtocolError as exc:
            self._reply(identity, message, wire.ERROR, exc.content())
        except Exception as exc:
            log.exception("internal error handling %s", message.msg_type)
            self._reply(identity, message, wire.ERROR, {
                "code": wire.INTERNAL_ERROR, "message": "internal error in the backend; see "
                "its log file", "detail": f"{type(exc).__name__}: {exc}"})

    def _on_hello(self, message: Message, identity: bytes) -> None:
        info = self._engine_info
        if self._engine is not None:
            try:
                info = self._engine.info()
            except Exception:
                log.exception("engine.info() failed")
        self._reply(identity, message, wire.HELLO_REPLY, {
            "protocol_version": wire.PROTOCOL_VERSION,
            "backend_version": __version__,
            "server_session": self._session.session_id,
            "device": str(info.get("device", self.device)),
            "memory": _plain(info.get("memory", {})),
            "model": {"name": str(info.get("model", self.model_name)),
                      "state": self._model_state, "error": self._model_error},
            "methods": _plain(defaults_table()),
            "default_method": "dragdiffusion",
            "limits": self.limits.as_dict(),
            "client_ttl": self.client_ttl,
            "queue": {"queued": len(self._queue),
                      "running": self._running.job_id if self._running else None},
            "security": {"signature_scheme": wire.SIGNATURE_SCHEME,
                         "curve": self.curve is not None},
        })
        log.info("hello from %s (%s)", message.session[:8], message.content["client"][:80])

    def _on_ping(self, message: Message, identity: bytes) -> None:
        self._reply(identity, message, wire.PONG, {
            "server_session": self._session.session_id, "time": time.time(),
            "queued": len(self._queue),
            "running": self._running.job_id if self._running else None})

    def _on_submit(self, message: Message, identity: bytes) -> None:
        content = message.content
        job_id = content["job_id"]
        job = self._jobs.get(job_id)
        if job is not None:
            if job.fingerprint != message.fingerprint:
                raise ProtocolError(wire.JOB_ID_CONFLICT, f"job id {job_id} is already used by "
                                    "a different edit; use a new job id")
            job.route = message.session
            self._reply(identity, message, wire.SUBMIT_REPLY, {
                "job_id": job_id, "state": job.state, "position": job.position,
                "duplicate": True})
            self._resend_terminal(job)
            return
        if job_id in self._expired:
            raise ProtocolError(wire.RESULT_EXPIRED, f"job {job_id} already ran and its result "
                                "is no longer kept; submit it with a new job id to run it again")
        if self._stop_reason:
            raise ProtocolError(wire.SHUTTING_DOWN, "the backend is shutting down; start it "
                                "again and resubmit")
        wire.check_submit(content, [len(b) for b in message.buffers], self.limits)
        try:
            resolve(content["method"], content["params"])
        except EngineError as exc:
            raise ProtocolError(wire.INVALID_INPUT, str(exc)) from None
        self._check_model()
        if len(self._queue) >= self.limits.max_queue:
            raise ProtocolError(wire.QUEUE_FULL, f"the backend already has "
                                f"{self.limits.max_queue} edits waiting; try again later")
        job = Job(job_id, message.session, message.session, message.header, message.fingerprint,
                  content, message.buffers)
        self._jobs[job_id] = job
        self._queue.push(job)
        self._reply(identity, message, wire.SUBMIT_REPLY, {
            "job_id": job_id, "state": "queued", "position": None, "duplicate": False})
        self._update_positions()
        self._dispatch()

    def _check_model(self) -> None:
        if self._model_state == "missing":
            raise ProtocolError(wire.MODEL_NOT_FOUND, f"the backend has no model: "
                                f"{self._model_error}")
        if self._model_state == "error":
            raise ProtocolError(wire.ENGINE_ERROR, f"the model failed to load: "
                                f"{self._model_error}; see the backend log")

    def _on_attach(self, message: Message, identity: bytes) -> None:
        job = self._job(message.content["job_id"])
        job.route = message.session
        self._reply(identity, message, wire.ATTACH_REPLY, {
            "job_id": job.job_id, "state": job.state, "position": job.position})
        self._resend_terminal(job)

    def _on_cancel(self, message: Message, identity: bytes) -> None:
        job = self._job(message.content["job_id"])
        if job.state == "queued":
            self._queue.remove(job)
            self._reply(identity, message, wire.CANCEL_REPLY,
                        {"job_id": job.job_id, "state": "cancelled"})
            self._end(job, wire.CANCELLED, {"job_id": job.job_id, "reason": "client"})
            self._update_positions()
        elif job.state == "running":
            job.cancel_reason = "client"
            job.cancel.cancel()
            self._reply(identity, message, wire.CANCEL_REPLY,
                        {"job_id": job.job_id, "state": "cancelling"})
        else:
            self._reply(identity, message, wire.CANCEL_REPLY,
                        {"job_id": job.job_id, "state": job.state})

    def _on_shutdown(self, message: Message, identity: bytes) -> None:
        cancelled = [] if self._stop_deadline else self._begin_shutdown("shutdown request")
        self._reply(identity, message, wire.SHUTDOWN_REPLY, {"cancelled": cancelled})

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise ProtocolError(wire.UNKNOWN_JOB, f"unknown job {job_id}: the backend may have "
                                "restarted or dropped its result; submit the edit again")
        return job

    # --- outbound -----------------------------------------------------------------------------
    def _send(self, identity: bytes, msg_type: str, content: dict[str, Any], *,
              parent: dict[str, Any] | None = None, job_id: str | None = None,
              buffers: list[Any] | tuple = ()) -> None:
        assert self._socket is not None
        _, frames = self._session.serialize(msg_type, content, parent=parent, job_id=job_id,
                                            buffers=buffers)
        try:
            self._socket.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # the client is gone, or not reading
            if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                raise
            log.debug("dropped %s for %s: %s", msg_type, identity.hex()[:8], exc.strerror)

    def _reply(self, identity: bytes, request: Message, msg_type: str,
               content: dict[str, Any]) -> None:
        self._send(identity, msg_type, content, parent=request.header, job_id=request.job_id)

    def _emit(self, job: Job, msg_type: str, content: dict[str, Any],
              buffers: list[Any] | tuple = ()) -> None:
        identity = self._routes.get(job.route)
        if identity is not None:
            self._send(identity, msg_type, content, parent=job.parent, job_id=job.job_id,
                       buffers=buffers)

    def _resend_terminal(self, job: Job) -> None:
        if job.terminal is not None:
            self._emit(job, *job.terminal)

    def _update_positions(self) -> None:
        for position, job in enumerate(self._queue.order(), 1):
            if job.position != position:
                job.position = position
                self._emit(job, wire.QUEUED, {"job_id": job.job_id, "position": position})

    # --- scheduling ---------------------------------------------------------------------------
    def _dispatch(self) -> None:
        if self._running is not None or self._model_state != "ready" or self._stop_reason:
            return
        job = self._queue.pop()
        if job is None:
            return
        job.state, job.position, job.started = "running", None, time.monotonic()
        self._running = job
        self._emit(job, wire.STARTED, {"job_id": job.job_id})
        self._inbox.put(job)
        self._update_positions()

    def _end(self, job: Job, msg_type: str, content: dict[str, Any],
             buffers: list[Any] | tuple = ()) -> None:
        """Record a job's terminal event, send it, log the job, keep the result a while."""
        job.state = _STATE_OF[msg_type]
        job.terminal = (msg_type, content, list(buffers))
        job.ended = time.monotonic()
        job.position = None
        job.buffers = []
        self._emit(job, msg_type, content, buffers)
        self._log_job(job)
        self._done[job.job_id] = job
        self._trim_results()

    def _log_job(self, job: Job) -> None:
        r = job.request
        assert job.terminal is not None and job.ended is not None
        msg_type, content, _ = job.terminal
        waited = (job.started or job.ended) - job.created
        ran = job.ended - job.started if job.started else 0.0
        phases = " ".join(f"{k}={v:.2f}s" for k, v in content.get("timings", {}).items())
        outcome = {wire.FINISHED: "finished",
                   wire.CANCELLED: f"cancelled ({content.get('reason')})",
                   wire.ERROR: f"failed ({content.get('code')}: {content.get('message')})"}
        log.info("job %s %s: client %s, %dx%dx%d%s, %d points, method %s, waited %.2fs, "
                 "ran %.2fs%s", job.job_id, outcome[msg_type], job.session[:8], r["width"],
                 r["height"], r["channels"], " +mask" if r["has_mask"] else "",
                 len(r["handles"]), r["method"], waited, ran, f", {phases}" if phases else "")

    def _trim_results(self) -> None:
        now = time.monotonic()
        total = sum(job.result_bytes for job in self._done.values())
        while self._done:
            job_id, job = next(iter(self._done.items()))
            if (len(self._done) <= self.keep_results and total <= self.keep_bytes
                    and now - (job.ended or now) <= self.keep_seconds):
                break
            del self._done[job_id]
            del self._jobs[job_id]
            total -= job.result_bytes
            self._expired[job_id] = job.state
            if len(self._expired) > 10000:
                self._expired.popitem(last=False)

    def _housekeeping(self, now: float) -> None:
        """Cancel the jobs of clients that went silent; forget idle sessions; expire results."""
        active = [*self._queue.order(), *([self._running] if self._running else [])]
        for job in active:
            if now - self._last_seen.get(job.route, now) <= self.client_ttl:
                continue
            log.info("client %s silent for %.0f s; cancelling job %s", job.route[:8],
                     self.client_ttl, job.job_id)
            if job.state == "queued":
                self._queue.remove(job)
                self._end(job, wire.CANCELLED, {"job_id": job.job_id, "reason": "client_gone"})
                self._update_positions()
            elif not job.cancel.cancelled:
                job.cancel_reason = "client_gone"
                job.cancel.cancel()
        busy = {job.route for job in active}
        for session, seen in list(self._last_seen.items()):
            if session not in busy and now - seen > max(3 * self.client_ttl, 300.0):
                del self._last_seen[session]
                self._routes.pop(session, None)
        self._trim_results()

    # --- the worker thread --------------------------------------------------------------------
    def _post(self, *item: Any) -> None:
        self._events.put(item)
        self._wake()

    def _work(self) -> None:
        engine = None
        try:
            engine = self._load_engine()
            self._post("model", "ready", None, engine)
        except ModelNotFound as exc:
            self._post("model", "missing", str(exc), None)
        except Exception as exc:
            log.exception("loading the model failed")
            self._post("model", "error", f"{type(exc).__name__}: {exc}", None)
        while (job := self._inbox.get()) is not None:
            assert engine is not None
            self._run(engine, job)

    def _run(self, engine: Any, job: Job) -> None:
        r = job.request
        image = np.frombuffer(job.buffers[0], np.uint8).reshape(r["height"], r["width"],
                                                                 r["channels"])
        mask = (np.frombuffer(job.buffers[1], np.uint8).reshape(r["height"], r["width"])
                if r["has_mask"] else None)
        request = DragRequest(image=image, mask=mask, method=r["method"], prompt=r["prompt"],
                              seed=r["seed"], params=dict(r["params"]),
                              handles=[(x, y) for x, y in r["handles"]],
                              targets=[(x, y) for x, y in r["targets"]])
        kwargs: dict[str, Any] = {"progress": self._progress_callback(job), "cancel": job.cancel}
        if r["preview"] and "preview" in inspect.signature(engine.run).parameters:
            kwargs["preview"] = self._preview_callback(job)
        jid = job.job_id
        try:
            result = engine.run(request, **kwargs)
        except Cancelled:
            self._post("end", job, wire.CANCELLED, {"job_id": jid, "reason": job.cancel_reason})
        except EngineError as exc:
            self._post("end", job, wire.ERROR, {"job_id": jid, "code": exc.code,
                                                 "message": str(exc), "detail": None})
        except Exception as exc:
            detail = "".join(traceback.format_exception(exc)[-3:])[-2000:]
            if _looks_like_oom(exc):
                error = {"code": wire.OUT_OF_MEMORY, "message": "the device ran out of memory "
                         "during this edit; try a smaller work_size, fewer or smaller LoRA "
                         "batches, or close other programs using the GPU"}
            else:
                log.exception("job %s failed", jid)
                error = {"code": wire.ENGINE_ERROR, "message": f"the edit failed: "
                         f"{type(exc).__name__}: {exc}"}
            self._post("end", job, wire.ERROR, {"job_id": jid, **error, "detail": detail})
        else:
            pixels = np.ascontiguousarray(result.image, dtype=np.uint8)
            h, w = pixels.shape[:2]
            channels = pixels.shape[2] if pixels.ndim == 3 else 1
            self._post("end", job, wire.FINISHED, {
                "job_id": jid, "width": w, "height": h, "channels": channels,
                "handles": [[float(x), float(y)] for x, y in result.handles],
                "timings": _plain(result.timings), "stats": _plain(result.stats),
            }, [pixels.tobytes()])

    def _progress_callback(self, job: Job) -> Callable[[str, int, int], None]:
        last = {"phase": None, "time": 0.0}

        def progress(phase: str, step: int, total: int) -> None:
            now = time.monotonic()
            if (phase == last["phase"] and step < total - 1
                    and now - last["time"] < PROGRESS_INTERVAL):
                return
            last.update(phase=phase, time=now)
            self._post("event", job, wire.PROGRESS, {"job_id": job.job_id, "phase": phase,
                                                     "step": int(step), "total": int(total)})
        return progress

    def _preview_callback(self, job: Job) -> Callable[[str, int, np.ndarray], None]:
        last = [0.0]

        def preview(phase: str, step: int, image: np.ndarray) -> None:
            now = time.monotonic()
            if now - last[0] < PREVIEW_INTERVAL:
                return
            last[0] = now
            pixels = np.ascontiguousarray(image, dtype=np.uint8)
            self._post("event", job, wire.PREVIEW, {
                "job_id": job.job_id, "phase": phase, "step": int(step),
                "width": pixels.shape[1], "height": pixels.shape[0],
                "channels": pixels.shape[2] if pixels.ndim == 3 else 1}, [pixels.tobytes()])
        return preview

    def _drain_events(self) -> None:
        while True:
            try:
                kind, *rest = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "model":
                self._model_loaded(*rest)
            elif kind == "event":
                job, msg_type, content, *buffers = rest
                self._emit(job, msg_type, content, buffers[0] if buffers else ())
            else:  # "end"
                job, msg_type, content, *buffers = rest
                self._running = None
                self._end(job, msg_type, content, buffers[0] if buffers else ())
                self._dispatch()

    def _model_loaded(self, state: str, error: str | None, engine: Any) -> None:
        self._model_state, self._model_error, self._engine = state, error, engine
        if engine is not None:
            try:
                self._engine_info = engine.info()
            except Exception:
                log.exception("engine.info() failed")
            log.info("model %s ready on %s", self.model_name,
                     self._engine_info.get("device", self.device))
        else:
            log.error("model %s not available: %s", self.model_name, error)
            for job in self._queue.order():
                self._queue.remove(job)
                try:
                    self._check_model()
                except ProtocolError as exc:
                    self._end(job, wire.ERROR, {"job_id": job.job_id, **exc.content()})
        self.ready.set()
        if self.on_ready is not None:
            self.on_ready(self)
        self._dispatch()
        self._update_positions()
