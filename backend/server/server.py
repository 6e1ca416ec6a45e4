"""The persistent backend server: request handlers and scheduling around one engine thread.

Five parts, one file each: ``zmtp_router`` (the ROUTER socket, pure Python, with the PLAIN
login or CURVE: ``curve_server``; ``endpoint``: the connection file),
``jobs`` (job table, fair queue, result retention), ``engine_worker`` (the worker thread
that runs the ``Engine`` and rate-limits its events), ``downloads`` (model downloads in their
own thread, protocol 1.3), and this module, which answers the requests, moves jobs
from the queue to the engine, and reloads the engine when a download brings a model it serves.
Only the socket thread (``serve_forever``) touches the socket and the job table, so hello, ping, cancel and shutdown are answered while an
edit runs. The wire format is ``protocol/PROTOCOL.md``.

Prepares (protocol 1.2) are low-priority jobs: one per client session, started only when no
edit is queued, and stopped within one model block when any submit arrives, unless that submit
matches (same image, prompt, seed, algorithm and ``params.PREPARED_KNOBS``): then it joins the
running prepare, which becomes its first phases. A prepare that yielded starts over when the
queue is empty again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backend import __version__
from backend.engine.errors import EngineError
from backend.engine.interface import Engine, WarpFn, load_preview_warp
from backend.engine.params import DragParams, MethodTable, prepared_settings
from backend.hub.store import Progress, Store
from backend.model_choice import Fallback, ServePlan
from backend.server.downloads import DownloadJob, Downloads
from backend.server.endpoint import (
    DEFAULT_BIND,
    CurveServer,
    Inbound,
    refuse_if_running,
    remove_connection_file,
    write_connection_file,
)
from backend.server.engine_worker import (
    ACCEPTED_DTYPES,
    EngineWorker,
    ModelLoaded,
    plain,
    run_warp,
)
from backend.server.jobs import EDIT, PREPARE, Job, JobTable, Terminal
from backend.server.log import RefusalLog, log_job, printable
from backend.server.zmtp_router import ZmtpRouter
from protocol import wire
from protocol.wire import Limits, Message, ProtocolError

log = logging.getLogger("backend.server")


class Server:
    """Serves drag edits from any number of clients with one engine.

    ``load_engine`` is called once in the worker thread and returns an ``Engine``. ``table``
    is what that engine will run (``model_choice.expected_table``): announced and checked
    against while the model loads; once loaded, the engine's own ``table`` replaces it.

    ``make_worker(wake)`` replaces the engine thread by another worker with the same face
    (``ray_worker.RayWorker``: a Ray Serve application, ``slots`` jobs at once).

    ``store`` (the model catalogue and where its sets go) turns on ``hello_reply.models`` and
    ``download`` requests; ``plan`` says what ``load_engine`` would load now
    (``model_choice.serve_plan``): when a finished download changes it, the engine is loaded
    again and the download's ``installed`` event waits for that.
    """

    def __init__(self, load_engine: Callable[[], Engine], *, model_name: str,
                 device: str = "auto", bind: str = DEFAULT_BIND,
                 connection_file: Path | None = None, limits: Limits | None = None,
                 curve: CurveServer | None = None, client_ttl: float = 6.0,
                 replay_window: float = 300.0, replay_capacity: int = 65536,
                 keep_results: int = 32,
                 keep_bytes: int = 2**30, keep_seconds: float = 3600.0,
                 shutdown_grace: float = 30.0, refusal_log_interval: float = 60.0,
                 fallback: Fallback | None = None, table: MethodTable | None = None,
                 on_ready: Callable[[Server], None] | None = None,
                 warp: WarpFn | None = None, store: Store | None = None,
                 plan: Callable[[], ServePlan] | None = None,
                 make_worker: Callable[[Callable[[], None]], EngineWorker] | None = None
                 ) -> None:
        self.model_name = model_name
        self.device = device
        self.connection_file = Path(connection_file) if connection_file else None
        self.limits = limits or Limits()
        self.curve = curve
        self.client_ttl = client_ttl
        self.shutdown_grace = shutdown_grace
        self.on_ready = on_ready
        self.key = secrets.token_bytes(32)
        self.ready = threading.Event()  # set once the model has loaded or failed to
        self._session = wire.Session(self.key, me="this backend", peer="the plug-in",
                                     replay=wire.ReplayGuard(replay_window,
                                                             replay_capacity),
                                     max_field_bytes=self.limits.max_field_bytes)
        # The pure-Python ROUTER (PLAIN locally, CURVE for --curve), which caps a message's
        # frames as it reads them.
        self._transport = ZmtpRouter(bind, self.key, self.limits, curve=curve)
        self._fallback = fallback
        self._demo: str | None = None  # why the fallback (demo) model is served, if it is
        # who runs the jobs: the engine thread, or a Ray Serve application (``ray_worker``)
        self._worker = (make_worker(self._transport.wake) if make_worker is not None
                        else EngineWorker(load_engine, self._transport.wake, fallback))
        self._engine: Engine | None = None
        self._engine_info: dict[str, Any] = {}
        self._table = table if table is not None else MethodTable()
        self._model_state, self._model_error = "loading", None
        self._jobs = JobTable(keep_results, keep_bytes, keep_seconds,
                              slots=self._worker.slots)
        self._routes: dict[str, bytes] = {}  # session -> current ZeroMQ identity
        self._last_seen: dict[str, float] = {}
        self._stop_reason: str | None = None
        self._stop_deadline: float | None = None
        self._next_housekeeping = 0.0
        self._refusals = RefusalLog(refusal_log_interval)
        self._denied_seen = 0  # the gate's count of refused logins, as last logged
        self._warp = warp  # Inpaint4Drag's warp for previews (loaded on the first request)
        self._store = store
        self._downloads = Downloads(store, self._transport.wake) if store is not None else None
        self._plan = plan
        self._loaded_plan: ServePlan | None = None  # what the engine (being) loaded serves
        self._reload_again = False  # a download ended while a reload was already under way

    @property
    def bind(self) -> str:
        return self._transport.bind

    @property
    def endpoint(self) -> str:
        return self._transport.endpoint

    @property
    def demo_notice(self) -> str | None:
        """One line for the user when the demo model is served instead of the configured one."""
        if self._demo is None or self._fallback is None:
            return None
        return self._fallback.notice()

    # --- life cycle -------------------------------------------------------------------------
    def start(self) -> str:
        """Bind, write the connection file, start loading the model; return the endpoint."""
        try:
            refuse_if_running(self.connection_file)
            self._transport.open()
            if self.connection_file is not None:
                write_connection_file(self.connection_file, self.endpoint, self.key,
                                      self._transport.server_public_key())
        except BaseException:
            self._transport.close(term=True)
            raise
        log.info("listening on %s (connection file %s)", self.endpoint, self.connection_file)
        self._loaded_plan = self._plan() if self._plan is not None else None
        self._worker.start()
        return self.endpoint

    def stop(self, reason: str = "shutdown") -> None:
        """Ask ``serve_forever`` to cancel all jobs and return (thread- and signal-safe)."""
        self._stop_reason = self._stop_reason or reason
        self._transport.wake()

    def serve_forever(self) -> None:
        """Serve until ``stop`` or a ``shutdown`` message; then clean up."""
        try:
            while True:
                self._transport.poll(100)
                for inbound in self._transport.receive():
                    self._receive(inbound)
                self._collect_worker_events()
                self._collect_download_events()
                now = time.monotonic()
                if now >= self._next_housekeeping:
                    self._housekeeping(now)
                    self._next_housekeeping = now + 0.25
                if self._stop_reason and self._stop_deadline is None:
                    self._begin_shutdown(self._stop_reason)
                if self._stop_deadline is not None:
                    if (not self._jobs.running and self._worker.idle()
                            and (self._downloads is None or self._downloads.idle())):
                        break  # every job has ended and its last event is out
                    if now > self._stop_deadline:
                        log.warning("the engine did not stop within %.0f s; exiting anyway",
                                    self.shutdown_grace)
                        break
        finally:
            self._log_refusals(time.monotonic(), force=True)
            if self.connection_file is not None:
                remove_connection_file(self.connection_file, self.endpoint)
            self._worker.join(self._worker.stop_seconds)
            self._transport.close(term=not self._worker.is_alive())
            log.info("stopped")

    def _begin_shutdown(self, reason: str) -> list[str]:
        log.info("shutting down (%s)", reason)
        self._stop_reason = self._stop_reason or reason
        self._stop_deadline = time.monotonic() + self.shutdown_grace
        waiting = self._jobs.waiting()
        cancelled = [job.job_id for job in waiting]
        for job in waiting:
            self._end(job, wire.CANCELLED, {"job_id": job.job_id, "reason": "shutdown"})
        for running in list(self._jobs.running):
            if running.serves is not None:
                cancelled.append(running.serves.job_id)
                self._stop(running.serves, "shutdown")
            cancelled.append(running.job_id)
            self._stop(running, "shutdown")
        if self._downloads is not None:
            cancelled += [job.job_id for job in self._downloads.active()]
            self._downloads.stop()
        self._worker.stop()
        return cancelled

    # --- inbound ------------------------------------------------------------------------------
    def _receive(self, inbound: Inbound) -> None:
        identity = inbound.identity
        message: Message | None = None
        try:
            if inbound.count is None or inbound.count > wire.MAX_FRAMES:
                raise wire.too_many_frames(inbound.count)
            message = self._session.parse(inbound.frames)
            wire.check_content(message)
            if message.msg_type not in wire.REQUESTS:
                raise ProtocolError(wire.UNKNOWN_MESSAGE_TYPE,
                                    f"{message.msg_type!r} is not a request")
        except ProtocolError as exc:
            parent = message.header if message else exc.header
            self._refusals.refused(identity.hex()[:8], exc.code, exc.message, exc.detail)
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
        running = self._oldest_running()
        self._reply(identity, message, wire.HELLO_REPLY, {
            "protocol_version": wire.PROTOCOL_VERSION,
            "backend_version": __version__,
            "server_session": self._session.session_id,
            "device": str(info.get("device", self.device)),
            "memory": plain(info.get("memory", {})),
            "model": self._model_description(info),
            # methods (those the models run), parameters, descriptions, default_method
            **self._table.as_hello(),
            "limits": self.limits.as_dict(),
            "dtypes": list(ACCEPTED_DTYPES),
            "client_ttl": self.client_ttl,
            "queue": {"queued": len(self._jobs.waiting()),
                      "running": running.job_id if running else None},
            "security": {"signature_scheme": wire.SIGNATURE_SCHEME,
                         "curve": self.curve is not None},
            **({"models": self._models_hello()} if self._store is not None else {}),
        })
        log.info("hello from %s (%s)", printable(message.session, 8),
                 printable(message.content["client"], 80))

    def _model_description(self, info: dict[str, Any]) -> dict[str, Any]:
        model: dict[str, Any] = {"name": str(info.get("model", self.model_name)),
                                 "state": self._model_state, "error": self._model_error}
        for key in ("inpaint_model", "filler"):  # what Inpaint4Drag runs (1.1)
            if info.get(key):
                model[key] = str(info[key])
        if self._demo is not None and self._fallback is not None:
            model.update(demo=True, requested=self.model_name, why=self._demo,
                         hint=self._fallback.hint)
        return model

    def _oldest_running(self) -> Job | None:
        """The job that ``hello`` and ``ping`` name as running (with a Ray cluster several
        run at once: the one that started first)."""
        return self._jobs.running[0] if self._jobs.running else None

    def _on_ping(self, message: Message, identity: bytes) -> None:
        running = self._oldest_running()
        self._reply(identity, message, wire.PONG, {
            "server_session": self._session.session_id, "time": time.time(),
            "queued": len(self._jobs.waiting()),
            "running": running.job_id if running else None})

    def _answer_known(self, message: Message, identity: bytes, reply_type: str,
                      what: str) -> bool:
        """A submit or prepare whose job id is known: the same request sent again is answered
        as a duplicate (the job's events resent to this session); another one under the same
        id is refused. False when the id is new."""
        job_id = message.content["job_id"]
        job = self._jobs.get(job_id)
        if job is None:
            return False
        if job.fingerprint != message.fingerprint:
            raise ProtocolError(wire.JOB_ID_CONFLICT, f"job id {job_id} is already used by "
                                f"a different {what}; use a new job id")
        job.route = message.session
        self._reply(identity, message, reply_type, {
            "job_id": job_id, "state": job.state, "position": job.position, "duplicate": True})
        self._resend_terminal(job)
        return True

    def _on_submit(self, message: Message, identity: bytes) -> None:
        content = message.content
        job_id = content["job_id"]
        if self._answer_known(message, identity, wire.SUBMIT_REPLY, "edit"):
            return
        if self._jobs.expired(job_id):
            raise ProtocolError(wire.RESULT_EXPIRED, f"job {job_id} already ran and its result "
                                "is no longer kept; submit it with a new job id to run it again")
        if self._stop_reason:
            raise ProtocolError(wire.SHUTTING_DOWN, "the backend is shutting down; start it "
                                "again and resubmit")
        wire.check_submit(content, [len(b) for b in message.buffers], self.limits,
                          ACCEPTED_DTYPES)
        algorithm, params = self._check_request(content)
        self._check_model()
        self._check_queue()
        job = Job(job_id, message.session, message.session, message.header, message.fingerprint,
                  content, message.buffers,
                  key=self._prepare_key(content, algorithm, params, message.digests[0]))
        self._jobs.add(job)
        joined = self._meet_prepares(job)
        self._reply(identity, message, wire.SUBMIT_REPLY, {
            "job_id": job_id, "state": job.state, "position": None, "duplicate": False,
            "joined": joined.job_id if joined else None})
        if joined is not None:
            self._emit(job, wire.STARTED, {"job_id": job_id})
            log.info("job %s joined prepare %s", job_id, joined.job_id)
        self._update_positions()
        self._dispatch()

    def _on_prepare(self, message: Message, identity: bytes) -> None:
        """Start the LoRA and inversion of an image while its dialog is open (1.2): checked and
        counted like a submit; the session's earlier prepare is discarded, or answered as this
        one (``duplicate``) when it prepares the same."""
        content = message.content
        job_id = content["job_id"]
        if self._answer_known(message, identity, wire.PREPARE_REPLY, "request"):
            return
        if self._jobs.expired(job_id):
            raise ProtocolError(wire.RESULT_EXPIRED, f"job {job_id} already ran; send the "
                                "prepare with a new job id")
        if self._stop_reason:
            raise ProtocolError(wire.SHUTTING_DOWN, "the backend is shutting down")
        wire.check_prepare(content, [len(b) for b in message.buffers], self.limits,
                           ACCEPTED_DTYPES)
        algorithm, params = self._check_request(content)
        self._check_model()
        key = self._prepare_key(content, algorithm, params, message.digests[0])
        current = self._current_prepare(message.session)
        if current is not None and current.key == key:
            current.route = message.session
            self._reply(identity, message, wire.PREPARE_REPLY, {
                "job_id": current.job_id, "state": current.state,
                "position": current.position, "duplicate": True})
            return
        self._check_queue(PREPARE)
        if current is not None:
            self._discard(current, "replaced")
        job = Job(job_id, message.session, message.session, message.header, message.fingerprint,
                  content, message.buffers, kind=PREPARE, key=key)
        self._jobs.add(job)
        self._reply(identity, message, wire.PREPARE_REPLY, {
            "job_id": job_id, "state": "queued", "position": None, "duplicate": False})
        self._update_positions()
        self._dispatch()

    def _check_queue(self, kind: str = EDIT) -> None:
        """``max_queue`` bounds the waiting edits; a prepare also counts the waiting prepares
        (so prepares never take an edit's place)."""
        waiting = len(self._jobs.waiting() if kind == PREPARE else self._jobs.queue)
        if waiting >= self.limits.max_queue:
            raise ProtocolError(wire.QUEUE_FULL, f"the backend already has "
                                f"{self.limits.max_queue} edits waiting; try again later")

    @staticmethod
    def _prepare_key(request: dict[str, Any], algorithm: str, params: DragParams,
                     image_digest: bytes) -> str:
        """What an edit's or prepare's LoRA and inversion depend on: the image's pixels (their
        SHA-256, computed once for the signature) and geometry, the prompt, the seed and
        ``params.prepared_settings``. A submit with the key of the running prepare joins it."""
        header = json.dumps({
            "size": [request["width"], request["height"], request["channels"]],
            "dtype": request["dtype"], "prompt": request["prompt"], "seed": request["seed"],
            **prepared_settings(algorithm, params)}, sort_keys=True)
        return hashlib.sha256(header.encode() + image_digest).hexdigest()

    def _current_prepare(self, session: str) -> Job | None:
        """The session's prepare that is waiting or running for it (not one that a submit
        joined, nor one already stopping)."""
        for running in self._jobs.running:
            if (running.kind == PREPARE and running.session == session
                    and running.serves is None and not running.cancel.cancelled):
                return running
        return self._jobs.prepares.get(session)

    def _meet_prepares(self, edit: Job) -> Job | None:
        """A new edit and the prepares: it joins a running prepare that prepares the same
        (returned); otherwise the edit's own session's running prepare ends (``replaced``),
        and other sessions' running prepares yield (back to waiting, ``preempted``), newest
        first, as many as the queued edits lack free slots (with one slot: the running one).
        Waiting prepares of the same image and settings end (``superseded``: the edit does
        their work), as does the edit's own session's (``replaced``)."""
        for prepare in list(self._jobs.prepares.values()):
            if prepare.key == edit.key:
                self._discard(prepare, "superseded")
            elif prepare.session == edit.session:
                self._discard(prepare, "replaced")
        prepares = [job for job in self._jobs.running
                    if job.kind == PREPARE and job.serves is None]
        stopping = [job for job in prepares if job.cancel.cancelled]
        for running in stopping:
            if running.key == edit.key and running.cancel_reason == "preempted":
                running.cancel_reason = "superseded"  # not waiting again: the edit does it
        live = [job for job in prepares if not job.cancel.cancelled]
        for running in live:
            if running.key == edit.key:
                self._jobs.join(edit, running)
                return running
        for running in [job for job in live if job.session == edit.session]:
            self._discard(running, "replaced")
            live.remove(running)
            stopping.append(running)
        free = self._jobs.slots - len(self._jobs.running)
        lacking = len(self._jobs.queue) - free - len(stopping)
        for running in reversed(live[-lacking:] if lacking > 0 else []):
            self._discard(running, "preempted")
        return None

    def _discard(self, prepare: Job, reason: str) -> None:
        """End a waiting prepare now, or stop a running one (within one model block)."""
        if prepare.state == "queued":
            self._end(prepare, wire.CANCELLED, {"job_id": prepare.job_id, "reason": reason})
        else:
            self._stop(prepare, reason)

    def _stop(self, job: Job, reason: str) -> None:
        """Cancel a running job. A submit that joined a prepare has nothing running of its own
        yet: it ends at once, and its prepare stops with it when its session sent it (another
        session's prepare goes on for that session)."""
        prepare = job.joined
        if prepare is None:
            job.cancel_reason = reason
            job.cancel.cancel()
            return
        self._end(job, wire.CANCELLED, {"job_id": job.job_id, "reason": reason})
        if prepare.session == job.session and not prepare.cancel.cancelled:
            prepare.cancel_reason = reason
            prepare.cancel.cancel()

    def _check_request(self, request: dict[str, Any]) -> tuple[str, DragParams]:
        """The one check before a job is accepted: the request's method and knobs against what
        the engine runs (``self._table``: the presets with the model's own defaults), and the
        cost of those settings on the request's real working canvas, attention's square of the
        tokens included, and the memory it needs (``params.check_canvas``). The engine runs the
        same ``MethodTable.resolve`` when the job's turn comes; a refusal here is the submit's
        reply, the job is never queued."""
        try:
            return self._table.resolve(request["method"], request["params"],
                                       (request["width"], request["height"]))
        except EngineError as exc:
            raise ProtocolError(wire.INVALID_INPUT, str(exc)) from None

    def _on_warp(self, message: Message, identity: bytes) -> None:
        """Inpaint4Drag's warp alone, answered at once from the socket thread (no model, no
        queue; ``limits.max_warp_pixels`` bounds its time). Its knobs are checked against the
        engine's table, and those left out take the table's values, as an edit's."""
        content = message.content
        wire.check_warp(content, [len(b) for b in message.buffers], self.limits,
                        ACCEPTED_DTYPES)
        try:
            _, params = self._table.resolve("inpaint4drag", content["params"])
            if self._warp is None:
                self._warp = load_preview_warp()
            reply, buffers = run_warp(self._warp, {**content, "params": params.as_dict()},
                                      message.buffers)
        except EngineError as exc:
            raise ProtocolError(wire.INVALID_INPUT, str(exc)) from None
        self._send(identity, wire.WARP_REPLY, reply, parent=message.header,
                   buffers=buffers)
        log.info("warp %dx%d from %s: %d px move, %d px to inpaint, %.3f s", reply["width"],
                 reply["height"], printable(message.session, 8), reply["moved_pixels"],
                 reply["inpaint_pixels"], reply["seconds"])

    def _check_model(self) -> None:
        if self._model_state == "missing":
            raise ProtocolError(wire.MODEL_NOT_FOUND, f"the backend has no model: "
                                f"{self._model_error}")
        if self._model_state == "error":
            raise ProtocolError(wire.ENGINE_ERROR, f"the model failed to load: "
                                f"{self._model_error}; see the backend log")

    def _on_attach(self, message: Message, identity: bytes) -> None:
        job = self._any_job(message.content["job_id"])
        job.route = message.session
        self._reply(identity, message, wire.ATTACH_REPLY, {
            "job_id": job.job_id, "state": job.state, "position": job.position})
        self._resend_terminal(job)

    def _on_cancel(self, message: Message, identity: bytes) -> None:
        job = self._any_job(message.content["job_id"])
        if isinstance(job, DownloadJob):
            self._cancel_download(job, message, identity)
        elif job.state == "queued":
            self._reply(identity, message, wire.CANCEL_REPLY,
                        {"job_id": job.job_id, "state": "cancelled"})
            self._end(job, wire.CANCELLED, {"job_id": job.job_id, "reason": "client"})
            self._update_positions()
        elif job.serves is not None:  # a prepare a submit joined is that submit's work now
            self._reply(identity, message, wire.CANCEL_REPLY,
                        {"job_id": job.job_id, "state": job.state})
        elif job.state == "running":
            self._reply(identity, message, wire.CANCEL_REPLY, {
                "job_id": job.job_id,
                "state": "cancelled" if job.joined is not None else "cancelling"})
            self._stop(job, "client")
        else:
            self._reply(identity, message, wire.CANCEL_REPLY,
                        {"job_id": job.job_id, "state": job.state})

    def _on_shutdown(self, message: Message, identity: bytes) -> None:
        cancelled = [] if self._stop_deadline else self._begin_shutdown("shutdown request")
        self._reply(identity, message, wire.SHUTDOWN_REPLY, {"cancelled": cancelled})

    def _any_job(self, job_id: str) -> Job | DownloadJob:
        """An edit's job or a download's (they share ``attach`` and ``cancel``)."""
        download = self._downloads.get(job_id) if self._downloads is not None else None
        return download if download is not None else self._job(job_id)

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
        _, frames = self._session.serialize(msg_type, content, parent=parent, job_id=job_id,
                                            buffers=buffers)
        self._transport.send(identity, frames, msg_type)

    def _reply(self, identity: bytes, request: Message, msg_type: str,
               content: dict[str, Any]) -> None:
        self._send(identity, msg_type, content, parent=request.header, job_id=request.job_id)

    def _emit(self, job: Job | DownloadJob, msg_type: str, content: dict[str, Any],
              buffers: list[Any] | tuple = ()) -> None:
        identity = self._routes.get(job.route)
        if identity is not None:
            self._send(identity, msg_type, content, parent=job.parent, job_id=job.job_id,
                       buffers=buffers)

    def _resend_terminal(self, job: Job | DownloadJob) -> None:
        if job.terminal is not None:
            t = job.terminal
            self._emit(job, t.msg_type, t.content, t.buffers)

    def _update_positions(self) -> None:
        for position, job in enumerate(self._jobs.waiting(), 1):
            if job.position != position:
                job.position = position
                self._emit(job, wire.QUEUED, {"job_id": job.job_id, "position": position})

    # --- scheduling ---------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Start waiting jobs while a slot is free (one slot: the engine thread; with a Ray
        cluster, one per replica)."""
        if self._model_state != "ready" or self._stop_reason:
            return
        while self._jobs.free():
            job = self._jobs.start_next()
            if job is None:
                break
            if job.joined is None:  # a submit that joined its prepare was told when it joined
                self._emit(job, wire.STARTED, {"job_id": job.job_id})
            job.joined = None
            self._worker.run(job)
        self._update_positions()

    def _end(self, job: Job, msg_type: str, content: dict[str, Any],
             buffers: list[Any] | tuple = ()) -> None:
        """Record a job's terminal event, send it, log the job, keep the result a while."""
        self._jobs.finish(job, Terminal(msg_type, content, list(buffers)))
        self._emit(job, msg_type, content, buffers)
        log_job(job)

    def _housekeeping(self, now: float) -> None:
        """Cancel the jobs of clients that went silent; forget idle sessions; expire results.

        A client's silence is measured up to the last moment every message waiting in the
        socket had been read (``drained_at``), not up to now: after a long loop turn, or while
        other clients' messages queue up, its heartbeat may be waiting in the socket unread,
        and it must not be taken for gone for that (N10).
        """
        active = self._jobs.active()
        heard_up_to = min(now, self._transport.drained_at)
        for job in active:
            # a prepare that a submit joined lives as long as that submit's client
            route = job.serves.route if job.serves is not None else job.route
            if heard_up_to - self._last_seen.get(route, now) <= self.client_ttl:
                continue
            if job.cancel.cancelled or job.terminal is not None:  # already stopping or ended
                continue
            log.info("client %s silent for %g s; cancelling job %s",
                     printable(route, 8), self.client_ttl, job.job_id)
            if job.state == "queued":
                self._end(job, wire.CANCELLED, {"job_id": job.job_id, "reason": "client_gone"})
                self._update_positions()
            else:
                self._stop(job, "client_gone")
        busy = {job.route for job in active}
        for session, seen in list(self._last_seen.items()):
            if session not in busy and now - seen > max(3 * self.client_ttl, 300.0):
                del self._last_seen[session]
                self._routes.pop(session, None)
        self._jobs.trim()
        self._log_refusals(now)

    def _take_table(self, table: MethodTable) -> None:
        """The loaded engine's own table replaces the announced one; the jobs queued against
        the announced one are checked again when they differ (a download that failed, say)."""
        if table == self._table:
            return
        log.warning("the model's defaults differ from those announced while it loaded "
                    "(%s, not %s); checking the queued edits again", dict(table.model_params),
                    dict(self._table.model_params))
        self._table = table
        for job in self._jobs.waiting():
            try:
                self._check_request(job.request)
            except ProtocolError as exc:
                self._end(job, wire.ERROR, {"job_id": job.job_id, **exc.content()})

    def _log_refusals(self, now: float, force: bool = False) -> None:
        gate = self._transport.gate
        if gate is not None and gate.denied != self._denied_seen:
            self._refusals.handshakes_refused(gate.denied - self._denied_seen)
            self._denied_seen = gate.denied
        self._refusals.flush(now, force)

    # --- events from the engine thread --------------------------------------------------------
    def _collect_worker_events(self) -> None:
        for event in self._worker.events():
            if isinstance(event, ModelLoaded):
                self._model_loaded(event)
            elif event.terminal:
                job = event.job
                if (job.kind == PREPARE and event.msg_type == wire.CANCELLED
                        and job.cancel_reason == "preempted" and not self._stop_reason):
                    self._jobs.requeue(job)  # it yielded to an edit: it starts over later
                else:
                    self._end(job, event.msg_type, event.content, event.buffers)
                self._dispatch()
                self._update_positions()
            else:
                self._emit(event.job, event.msg_type, event.content, event.buffers)
                joined = event.job.serves
                if joined is not None and event.msg_type == wire.PROGRESS:
                    # the submit that joined this prepare sees its first phases progress
                    self._emit(joined, wire.PROGRESS, {**event.content, "job_id": joined.job_id})

    def _model_loaded(self, event: ModelLoaded) -> None:
        first = not self.ready.is_set()
        self._model_state, self._model_error = event.state, event.error
        self._engine, self._demo = event.engine, event.demo
        if event.engine is not None:
            try:
                self._engine_info = event.engine.info()
            except Exception:
                log.exception("engine.info() failed")
            self._take_table(event.engine.table)
            log.info("model %s ready on %s", self._engine_info.get("model", self.model_name),
                     self._engine_info.get("device", self.device))
            if self.demo_notice:
                log.warning("%s; %s", self._demo, self.demo_notice)
        else:
            log.error("model %s not available: %s", self.model_name, event.error)
            for job in self._jobs.waiting():
                try:
                    self._check_model()
                except ProtocolError as exc:
                    self._end(job, wire.ERROR, {"job_id": job.job_id, **exc.content()})
        self.ready.set()
        if first and self.on_ready is not None:
            self.on_ready(self)
        self._downloads_loaded(event)
        self._dispatch()
        self._update_positions()

    # --- model downloads (protocol 1.3) -------------------------------------------------------
    def _on_download(self, message: Message, identity: bytes) -> None:
        """Start (or follow) the download of a catalogue set, named by the client: never a URL
        or a path."""
        content = message.content
        if self._downloads is None or self._store is None:
            raise ProtocolError(wire.INVALID_INPUT, "this backend does not download models; "
                                "run `python -m backend models get NAME` where it runs")
        name = content["set"]
        if name not in self._store.catalogue.sets:
            raise ProtocolError(wire.INVALID_INPUT, f"unknown model set {name[:64]!r}; this "
                                f"backend offers {', '.join(self._store.catalogue.names())}")
        job_id = content["job_id"]
        if self._jobs.get(job_id) is not None or self._jobs.expired(job_id):
            raise ProtocolError(wire.JOB_ID_CONFLICT, f"job id {job_id} is an edit's; use a "
                                "new job id for the download")
        job = self._downloads.get(job_id)
        if job is not None:  # the same request again (a retry)
            job.route = message.session
            self._reply(identity, message, wire.DOWNLOAD_REPLY,
                        {"job_id": job_id, "state": job.state, "duplicate": True})
            self._resend_terminal(job)
            return
        if self._stop_reason:
            raise ProtocolError(wire.SHUTTING_DOWN, "the backend is shutting down; start it "
                                "again and ask again (the download resumes)")
        same = self._downloads.active_for(name)
        if same is not None:  # that set is already coming: follow it
            same.route = message.session
            self._reply(identity, message, wire.DOWNLOAD_REPLY,
                        {"job_id": same.job_id, "state": same.state, "duplicate": True})
            return
        job = DownloadJob(job_id, name, message.session, message.header)
        self._downloads.start(job)
        self._reply(identity, message, wire.DOWNLOAD_REPLY,
                    {"job_id": job_id, "state": job.state, "duplicate": False})
        log.info("download of %s asked by %s (job %s)", name, printable(message.session, 8),
                 job_id)

    def _cancel_download(self, job: DownloadJob, message: Message, identity: bytes) -> None:
        state = job.state
        if state in ("queued", "running"):
            self._downloads.cancel(job)  # its thread reports ``cancelled`` within one chunk
            state = "cancelling"
        self._reply(identity, message, wire.CANCEL_REPLY, {"job_id": job.job_id, "state": state})

    def _collect_download_events(self) -> None:
        if self._downloads is None:
            return
        for event in self._downloads.events():
            job = event.job
            if event.kind == "started":
                job.state = "running"
                self._emit(job, wire.STARTED, {"job_id": job.job_id})
            elif event.kind == "progress" and event.progress is not None:
                job.progress = event.progress
                self._emit(job, wire.PROGRESS, _progress_content(job.job_id, event.progress))
            elif event.kind == "done":
                job.result = event.result
                self._download_done(job)
            elif event.kind == "failed":
                self._end_download(job, wire.ERROR, {
                    "job_id": job.job_id, "code": wire.DOWNLOAD_FAILED,
                    "message": event.error or "the download failed", "detail": event.detail},
                    "failed")
            else:
                self._end_download(job, wire.CANCELLED,
                                   {"job_id": job.job_id, "reason": job.cancel_reason},
                                   "cancelled")

    def _download_done(self, job: DownloadJob) -> None:
        """The set is in place: load it when the engine would now serve something else (the
        ``installed`` event follows the load), else say so at once."""
        if self._plan is None or self._stop_reason or self._plan() == self._loaded_plan:
            self._installed(job)
            return
        job.state = "loading"
        self._emit(job, wire.PROGRESS, {"job_id": job.job_id, "phase": "load", "step": 0,
                                        "total": 1})
        if self._model_state == "loading":  # a load is under way: it may predate this set
            self._reload_again = True
        else:
            self._reload()

    def _reload(self) -> None:
        log.info("loading the models again for the downloaded set(s)")
        self._model_state, self._model_error = "loading", None
        self._engine = None
        self._loaded_plan = self._plan() if self._plan is not None else None
        self._worker.reload()

    def _downloads_loaded(self, event: ModelLoaded) -> None:
        """A load ended: the downloads that waited for it end with it."""
        if self._downloads is None:
            return
        if self._reload_again:
            self._reload_again = False
            self._reload()
            return
        for job in [j for j in self._downloads.active() if j.state == "loading"]:
            if event.state == "ready":
                self._installed(job)
            else:
                self._end_download(job, wire.ERROR, {
                    "job_id": job.job_id, "code": wire.MODEL_NOT_FOUND if event.state ==
                    "missing" else wire.ENGINE_ERROR, "detail": None,
                    "message": f"{job.set} is downloaded, but the backend could not load it: "
                               f"{event.error}"}, "failed")

    def _installed(self, job: DownloadJob) -> None:
        assert self._store is not None
        result, model_set = job.result, self._store.catalogue.get(job.set)
        serving = (self._loaded_plan is not None and job.set in self._loaded_plan.sets
                   and self._model_state == "ready")
        self._end_download(job, wire.INSTALLED, {
            "job_id": job.job_id, "set": job.set, "methods": list(model_set.methods),
            "bytes": result.total if result else 0, "fetched": result.fetched if result else 0,
            "seconds": result.seconds if result else 0.0, "serving": serving}, "finished")

    def _end_download(self, job: DownloadJob, msg_type: str, content: dict[str, Any],
                      state: str) -> None:
        assert self._downloads is not None
        self._downloads.finish(job, Terminal(msg_type, content, []), state)
        self._emit(job, msg_type, content)
        log.info("download %s of %s: %s", job.job_id, job.set, state)

    def _models_hello(self) -> dict[str, Any]:
        """``hello_reply.models`` (1.3): each set's state, what it runs, whether it is served
        now, and a download under way; each method's sets, best first."""
        assert self._store is not None and self._downloads is not None
        serving = set(self._loaded_plan.sets) if (
            self._loaded_plan is not None and self._model_state == "ready"
            and self._demo is None) else set()
        sets = {}
        for name, model_set in self._store.catalogue.sets.items():
            status = self._store.status(name)
            entry: dict[str, Any] = {
                "title": model_set.title, "summary": model_set.summary,
                "licence": model_set.licence, "methods": list(model_set.methods),
                "state": status.state, "serving": name in serving,
                "bytes": status.bytes if status.installed else model_set.approx_bytes}
            active = self._downloads.active_for(name)
            if active is not None:
                entry["state"] = "downloading"
                entry["download"] = {"job_id": active.job_id, "state": active.state,
                                     **({"done": active.progress.done,
                                         "total": active.progress.total}
                                        if active.progress else {})}
            sets[name] = entry
        return {"sets": sets,
                "methods": {m: list(n) for m, n in self._store.catalogue.methods.items()},
                "can_download": not self._store.hub.offline(),
                "location": str(self._store.location)}


def _progress_content(job_id: str, progress: Progress) -> dict[str, Any]:
    """A download's ``progress`` event: ``step`` bytes of ``total``, the file, the rate and the
    time left (None: not known yet)."""
    left = progress.seconds_left
    return {"job_id": job_id, "phase": progress.phase, "step": int(progress.done),
            "total": int(progress.total), "file": progress.file, "rate": float(progress.rate),
            "seconds_left": None if left is None else float(left)}
