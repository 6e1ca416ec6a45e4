"""A small synchronous client for the backend (PROTOCOL.md), used by the plug-in and tests.

Every wait is bounded (lazy pirate): a request waits ``timeout`` seconds for its reply; on
silence the socket is closed and recreated and the request is sent again, at most
``retries`` more times; then ``BackendUnavailable`` is raised. Re-sending is safe because
all requests are idempotent (a submit carries the client's job id). Not thread-safe: use one
client per thread.

The frames travel through a ``transport.Transport``: pyzmq's DEALER where pyzmq loads, else
the pure-Python ZMTP one (``transport.choose``); this module needs the standard library only.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import connection, wire
from protocol import transport as transport_module
from protocol.transport_zmtp import ZmtpDealer
from protocol.wire import Buffer, Message, ProtocolError

if TYPE_CHECKING:
    from protocol.curve import CurveClient

log = logging.getLogger(__name__)

LIVENESS = 6.0  # longest silence (s) while a job runs before the backend counts as gone
HEARTBEAT = 1.0  # seconds between heartbeats while waiting for a job (at most client_ttl / 4)
START_HINT = "start it with: python -m backend serve (see the README, section 'Quick start')"


class BackendError(Exception):
    """Base class; ``code`` is a protocol error code or ``unavailable``."""

    def __init__(self, message: str, code: str = "backend_error",
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


class BackendUnavailable(BackendError):
    """No (authentic) answer from the backend within the timeout and retries."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "unavailable")


class ConnectionFileError(BackendUnavailable):
    """The connection file cannot be used as it is (unsafe, or CURVE settings missing); the
    message says what to change. Starting another backend would not help."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = "connection_file"


class WrongKey(BackendUnavailable):
    """A backend answers at the endpoint but refuses our key (stale connection file)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = "wrong_key"


class IncompatibleVersion(BackendError):
    """The backend speaks another MAJOR protocol version; the message names both."""

    def __init__(self, message: str) -> None:
        super().__init__(message, wire.INCOMPATIBLE_VERSION)


class JobFailed(BackendError):
    """The backend refused a request or a job failed: ``code``, ``message``, ``detail``."""


class JobTimeout(BackendError):
    """A job did not end within the time given to ``events``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "timeout")


@dataclass
class Event:
    """A job event: ``type`` (``queued``, ``progress``, …), its fields and its pixel buffers."""

    type: str
    job_id: str
    content: dict[str, Any]
    buffers: list[Buffer] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.type in wire.TERMINAL_EVENTS

    @property
    def buffer(self) -> memoryview | None:
        """Pixels of a ``finished`` or ``preview`` event (``width × height × channels``
        samples of the event's ``dtype``) as a read-only view of the received frame: no copy
        (``numpy.frombuffer(event.buffer, …)``)."""
        return memoryview(self.buffers[0]).cast("B") if self.buffers else None

    @functools.cached_property
    def image(self) -> bytes | None:
        """The same pixels as ``bytes``: copied out of the frame once, on first use."""
        return bytes(self.buffers[0]) if self.buffers else None

    def __getitem__(self, name: str) -> Any:
        return self.content[name]


@dataclass
class WarpResult:
    """A ``warp_reply``: the warped pixels (the request's geometry and pixel type; with
    ``overlay`` the inpainting mask painted as the official grid) and the inpainting mask
    (``width × height`` bytes, 255 inside), both without a copy of the received frames."""

    content: dict[str, Any]
    image: memoryview
    mask: memoryview

    def __getitem__(self, name: str) -> Any:
        return self.content[name]


# memoryview formats of numpy/array buffers -> the wire's pixel type
_FORMAT_DTYPES = {"B": "u8", "b": "u8", "c": "u8", "H": "u16", "<H": "u16", "=H": "u16",
                  "f": "f32", "<f": "f32", "=f": "f32"}


def _as_bytes(data: Any) -> memoryview:
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("pixel data must be C-contiguous")
    return view.cast("B")


def _pixel_dtype(data: Any) -> str:
    """The wire pixel type of a buffer, from its format (bytes and uint8 arrays: ``u8``)."""
    fmt = memoryview(data).format
    if fmt not in _FORMAT_DTYPES:
        raise ValueError(f"pixel data of format {fmt!r} is not uint8, uint16 or float32")
    return _FORMAT_DTYPES[fmt]


class Client:
    """Connects to one backend. ``key`` is the HMAC key (bytes, or hex as in the file).

    ``transport``: ``pyzmq``, ``zmtp`` or ``auto`` (default: ``$DRAG_DIFFUSION_TRANSPORT``,
    else auto; see ``transport.choose``); ``context`` is a ZeroMQ context for pyzmq.
    """

    def __init__(self, endpoint: str, key: bytes | str, *, timeout: float = 3.0,
                 retries: int = 2, curve: CurveClient | None = None,
                 context: Any = None, transport: str | None = None,
                 name: str = "drag-diffusion-client", liveness: float | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.name = name
        self.server_info: dict[str, Any] | None = None
        # The last submit's reply: its state and, when it joined a running prepare (1.2),
        # that prepare's job id (``joined``).
        self.last_submit: dict[str, Any] | None = None
        self._curve = curve
        self._context = context
        try:
            self.transport = transport_module.choose(transport, curve=curve is not None)
        except transport_module.TransportUnavailable as exc:
            raise ConnectionFileError(str(exc)) from None
        # The largest frame taken from the backend: the default limit until its hello says.
        self._max_frame = wire.Limits.max_frame_bytes
        key = bytes.fromhex(key) if isinstance(key, str) else key
        self._session = wire.Session(key, me="this plug-in", peer="the backend")
        self._pending: dict[str, deque[Event]] = {}
        self._done: deque[str] = deque(maxlen=256)  # jobs whose terminal event was consumed
        self._beats: deque[str] = deque(maxlen=64)  # msg ids of heartbeat attaches
        self._bad_signatures = 0
        self._refused: str | None = None  # why the backend refused our login, until it answers
        self._last_sent = 0.0
        self._unanswered_since: float | None = None  # first send since we last heard
        self._reopened = False  # the socket was recreated during this silence
        self.liveness = liveness or min(timeout * (retries + 1), LIVENESS)
        self._heartbeat = max(0.05, min(HEARTBEAT, timeout / 3, self.liveness / 4))
        self._transport: transport_module.Transport | None = None
        self._open()

    @classmethod
    def from_connection_file(cls, path: Path | str | None = None, **kwargs: Any) -> Client:
        """Connect as the connection file says (default location: PROTOCOL.md section 7)."""
        try:
            info = connection.read_connection_file(path)
        except connection.UnsafeConnectionFile as exc:
            raise ConnectionFileError(str(exc)) from None
        except (FileNotFoundError, ValueError) as exc:  # no backend, or a stale/damaged file
            raise BackendUnavailable(str(exc)) from None
        curve = None
        if info.curve_server_key:
            try:  # before the key files: CURVE needs pyzmq, and says what to do without it
                transport_module.choose(kwargs.get("transport"), curve=True)
            except transport_module.TransportUnavailable as exc:
                raise ConnectionFileError(str(exc)) from None
            if not info.curve_client_key:
                raise ConnectionFileError(
                    "the backend uses CURVE encryption: add \"curve_client_key\": "
                    "\"/path/to/client.key_secret\" to the connection file (see docs/remote.md)")
            from protocol.curve import CurveClient  # only remote setups need zmq.auth

            try:
                curve = CurveClient.from_files(info.curve_server_key, info.curve_client_key)
            except ValueError as exc:
                raise ConnectionFileError(str(exc)) from None
        return cls(info.endpoint, info.key, curve=curve, **kwargs)

    # --- public API --------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        """First exchange: the backend's versions, device, model, methods and limits."""
        reply = self._request(wire.HELLO, {"client": self.name})
        wire.check_version(reply.content["protocol_version"], self._session.version,
                           "the backend", "this plug-in")
        self.server_info = reply.content
        self._take_larger_frames(reply.content.get("limits"))
        # Ping often enough that the backend never takes us for gone.
        self._heartbeat = min(self._heartbeat, reply.content["client_ttl"] / 4)
        return reply.content

    def submit(self, image: Buffer | Any, width: int, height: int, channels: int,
               handles: Sequence[tuple[float, float]], targets: Sequence[tuple[float, float]],
               *, job_id: str | None = None, mask: Buffer | Any | None = None,
               method: str | None = None, params: dict[str, Any] | None = None,
               prompt: str = "", seed: int = 0, preview: bool = False,
               dtype: str | None = None) -> str:
        """Queue a drag edit and return its job id at once; then iterate ``events(job_id)``.

        ``image`` is ``width × height × channels`` samples (any C-contiguous buffer, e.g. a
        numpy array) of ``dtype`` ``u8``, ``u16`` or ``f32`` (default: from the buffer's
        format); ``mask`` is ``width × height`` bytes, >0 where the image may change (for
        Inpaint4Drag: on the region that moves). ``method`` None runs the backend's default
        (its hello's ``default_method``). Re-submitting with the same ``job_id`` never runs
        the edit twice.
        """
        if self.server_info is None:
            self.hello()  # its limits are checked below, before anything large is sent
        job_id = job_id or wire.new_id()
        dtype = dtype or _pixel_dtype(image)
        buffers = [_as_bytes(image)] + ([_as_bytes(mask)] if mask is not None else [])
        content = {
            "job_id": job_id, "width": int(width), "height": int(height),
            "channels": int(channels), "dtype": dtype, "has_mask": mask is not None,
            "handles": [[float(x), float(y)] for x, y in handles],
            "targets": [[float(x), float(y)] for x, y in targets],
            "method": method or str((self.server_info or {}).get("default_method", "")),
            "params": dict(params or {}), "prompt": prompt,
            "seed": int(seed), "preview": bool(preview),
        }
        limits = wire.Limits(**{k: v for k, v in (self.server_info or {}).get("limits", {}).items()
                                if k in wire.Limits.__dataclass_fields__})
        try:
            wire.check_submit(content, [b.nbytes for b in buffers], limits,
                              (self.server_info or {}).get("dtypes", tuple(wire.PIXEL_DTYPES)))
        except ProtocolError as exc:
            raise JobFailed(exc.message, exc.code, exc.detail) from None
        size = sum(b.nbytes for b in buffers)
        reply = self._request(wire.SUBMIT, content, job_id=job_id, buffers=buffers,
                              timeout=self.timeout + size / 10e6)  # allow ~10 MB/s uploads
        self.last_submit = reply.content
        return job_id

    def prepare(self, image: Buffer | Any, width: int, height: int, channels: int, *,
                job_id: str | None = None, method: str | None = None,
                params: dict[str, Any] | None = None, prompt: str = "", seed: int = 0,
                masked: bool = True, dtype: str | None = None) -> str:
        """Start an edit's work that needs no points (protocol 1.2: the LoRA and inversion of
        DragDiffusion and GoodDrag) while the user is still choosing them; returns the
        prepare's job id: its events end with ``prepared`` (``events``). A submit of the same
        image, method, settings, prompt and seed then joins it, or finds its results cached.
        The backend keeps one prepare per client: a new one with other settings replaces it,
        one with the same settings is answered with its job id (``duplicate``). ``masked``:
        the edit will have a selection. Raises ``JobFailed`` (``unknown_message_type``) at a
        backend older than 1.2."""
        if self.server_info is None:
            self.hello()
        job_id = job_id or wire.new_id()
        dtype = dtype or _pixel_dtype(image)
        buffers = [_as_bytes(image)]
        content = {
            "job_id": job_id, "width": int(width), "height": int(height),
            "channels": int(channels), "dtype": dtype,
            "method": method or str((self.server_info or {}).get("default_method", "")),
            "params": dict(params or {}), "prompt": prompt, "seed": int(seed),
            "masked": bool(masked),
        }
        info = self.server_info or {}
        limits = wire.Limits(**{k: v for k, v in info.get("limits", {}).items()
                                if k in wire.Limits.__dataclass_fields__})
        try:
            wire.check_prepare(content, [b.nbytes for b in buffers], limits,
                               info.get("dtypes", tuple(wire.PIXEL_DTYPES)))
        except ProtocolError as exc:
            raise JobFailed(exc.message, exc.code, exc.detail) from None
        reply = self._request(wire.PREPARE, content, job_id=job_id, buffers=buffers,
                              timeout=self.timeout + buffers[0].nbytes / 10e6)
        return str(reply.content["job_id"])

    def warp(self, image: Buffer | Any, width: int, height: int, channels: int,
             handles: Sequence[tuple[float, float]], targets: Sequence[tuple[float, float]],
             mask: Buffer | Any, *, params: dict[str, Any] | None = None,
             overlay: bool = False, dtype: str | None = None) -> WarpResult:
        """Inpaint4Drag's warp alone (protocol 1.1), for a live preview: no model runs and no
        job is queued, the backend answers at once. ``mask`` is the region that moves
        (``width × height`` bytes); the backend caps the pixels at ``limits.max_warp_pixels``,
        so send a scaled-down layer (points scaled with it)."""
        if self.server_info is None:
            self.hello()
        dtype = dtype or _pixel_dtype(image)
        buffers = [_as_bytes(image), _as_bytes(mask)]
        content = {
            "width": int(width), "height": int(height), "channels": int(channels),
            "dtype": dtype, "handles": [[float(x), float(y)] for x, y in handles],
            "targets": [[float(x), float(y)] for x, y in targets],
            "params": dict(params or {}), "overlay": bool(overlay),
        }
        info = self.server_info or {}
        limits = wire.Limits(**{k: v for k, v in info.get("limits", {}).items()
                                if k in wire.Limits.__dataclass_fields__})
        try:
            wire.check_warp(content, [b.nbytes for b in buffers], limits,
                            info.get("dtypes", tuple(wire.PIXEL_DTYPES)))
        except ProtocolError as exc:
            raise JobFailed(exc.message, exc.code, exc.detail) from None
        size = sum(b.nbytes for b in buffers)
        reply = self._request(wire.WARP, content, buffers=buffers,
                              timeout=self.timeout + size / 10e6)
        return WarpResult(reply.content, memoryview(reply.buffers[0]).cast("B"),
                          memoryview(reply.buffers[1]).cast("B"))

    def download(self, set_name: str, *, job_id: str | None = None) -> dict[str, Any]:
        """Ask the backend to download a model set of its catalogue (protocol 1.3) by name;
        returns ``{job_id, state, duplicate}``. Follow it with ``events(job_id)`` (the reply's
        ``job_id``: a download of that set already running is followed instead): ``progress``
        (phase ``download``, ``verify`` or ``load``; ``step`` bytes of ``total``), then
        ``installed``, ``cancelled`` or an error (``JobFailed``). ``cancel(job_id)`` stops it;
        what arrived is kept for the next try."""
        if self.server_info is None:
            self.hello()
        job_id = job_id or wire.new_id()
        return self._request(wire.DOWNLOAD, {"job_id": job_id, "set": str(set_name)},
                             job_id=job_id).content

    def events(self, job_id: str, timeout: float | None = None) -> Iterator[Event]:
        """Yield the job's events until a terminal one (``finished``, ``prepared`` or
        ``cancelled``).

        An ``error`` event raises ``JobFailed``. While waiting, the job is re-attached about
        once a second (a heartbeat: it keeps this client alive on the backend and recovers
        lost events). A backend answers heartbeats at once, however busy its engine, so when
        none is answered for ``liveness`` seconds (at most ``LIVENESS`` s) it is gone:
        ``BackendUnavailable``, whatever the job takes. ``timeout`` here bounds this call
        (None: no bound) and raises ``JobTimeout``; calling ``events`` again continues where
        it stopped, so a caller may poll with short timeouts between UI updates.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if job_id in self._done:  # asked again: accept its re-sent terminal event
            self._done.remove(job_id)
        while True:
            queue = self._pending.get(job_id)
            if queue:
                event = queue.popleft()
                if event.terminal:
                    self._pending.pop(job_id, None)
                    self._done.append(job_id)
                    if event.type == wire.ERROR:
                        c = event.content
                        raise JobFailed(c["message"], c["code"], c.get("detail"))
                yield event
                if event.terminal:
                    return
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise JobTimeout(f"job {job_id} did not finish within {timeout:g} s; "
                                 "it keeps running on the backend (cancel it or wait longer)")
            silent = self._silent(now)
            if silent >= self.liveness:
                raise self._unavailable(job_id)
            if silent >= self.liveness / 2 and not self._reopened:
                self._reopen()  # lazy pirate: the connection itself may be broken
                self._reopened = True
                self._last_sent = 0.0  # beat again at once, on the new socket
            if now - self._last_sent >= self._heartbeat:
                # The heartbeat is an attach: it keeps us alive on the backend, routes the
                # job's events to our current socket, and makes the backend re-send a
                # terminal event that got lost.
                self._beats.append(self._send(wire.ATTACH, {"job_id": job_id},
                                              job_id)["msg_id"])
            wait = max(0.001, min(self._heartbeat, self.liveness - self._silent(now)))
            if deadline is not None:
                wait = min(wait, deadline - now)
            message = self._recv(wait)
            if message is not None:
                if (message.msg_type == wire.ERROR
                        and message.parent.get("msg_id") in self._beats):
                    c = message.content
                    raise JobFailed(c["message"], c["code"], c.get("detail"))
                self._stash(message)

    def attach(self, job_id: str) -> dict[str, Any]:
        """Route the job's events to this client again; returns ``{job_id, state, position}``."""
        return self._request(wire.ATTACH, {"job_id": job_id}, job_id=job_id).content

    def cancel(self, job_id: str) -> str:
        """Cancel a job; returns its state (``cancelled``, ``cancelling``, or a final state)."""
        return self._request(wire.CANCEL, {"job_id": job_id}, job_id=job_id).content["state"]

    def ping(self) -> dict[str, Any]:
        return self._request(wire.PING, {}).content

    def shutdown(self) -> list[str]:
        """Ask the backend to cancel everything and exit; returns the cancelled job ids."""
        return self._request(wire.SHUTDOWN, {}).content["cancelled"]

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.endpoint!r}, transport={self.transport!r})"

    # --- internals ---------------------------------------------------------------------------
    def _open(self) -> None:
        # The server lets only holders of the key connect (PROTOCOL.md section 6).
        login = {"username": wire.TRANSPORT_USER,
                 "password": wire.transport_password(self._session.key)}
        try:
            if self.transport == transport_module.PYZMQ:
                from protocol.transport_pyzmq import PyzmqDealer  # only where pyzmq loads

                self._transport = PyzmqDealer(self.endpoint, **login, curve=self._curve,
                                              max_frame=self._max_frame, context=self._context)
            else:
                self._transport = ZmtpDealer(self.endpoint, **login, max_frame=self._max_frame,
                                             max_frames=wire.MAX_FRAMES + 1,
                                             handshake_timeout=self.timeout)
        except ValueError as exc:  # an endpoint no transport can connect to
            raise ConnectionFileError(str(exc)) from None

    def _take_larger_frames(self, limits: Any) -> None:
        """Accept frames as large as the backend accepts (its results are that large)."""
        announced = limits.get("max_frame_bytes") if isinstance(limits, dict) else None
        if isinstance(announced, int) and announced > self._max_frame:
            self._max_frame = announced
            if self._transport is not None:
                self._transport.max_frame = announced

    def _reopen(self) -> None:
        """Lazy pirate: a silent socket may hold a broken connection; start afresh."""
        self.close()
        self._open()

    def _send(self, msg_type: str, content: dict[str, Any], job_id: str | None = None,
              buffers: Sequence[Buffer] = ()) -> dict[str, Any]:
        assert self._transport is not None, "client is closed"
        header, frames = self._session.serialize(msg_type, content, job_id=job_id,
                                                 buffers=buffers)
        self._transport.send(frames)
        self._last_sent = time.monotonic()
        if self._unanswered_since is None:
            self._unanswered_since = self._last_sent
        return header

    def _silent(self, now: float) -> float:
        """How long the backend has left our messages unanswered (0: nothing outstanding)."""
        return 0.0 if self._unanswered_since is None else now - self._unanswered_since

    def _recv(self, timeout: float) -> Message | None:
        """The next valid message within ``timeout`` seconds, or None."""
        assert self._transport is not None, "client is closed"
        deadline = time.monotonic() + timeout
        while True:
            try:
                frames = self._transport.recv(deadline - time.monotonic())
            except transport_module.LoginRefused as exc:
                raise self._refusal(exc) from None
            if frames is None:
                return None
            try:
                message = self._session.parse(frames)
                wire.check_content(message)
            except ProtocolError as exc:
                if exc.code == wire.INCOMPATIBLE_VERSION:
                    raise IncompatibleVersion(exc.message) from None
                if exc.code == wire.BAD_SIGNATURE:
                    self._bad_signatures += 1
                log.debug("ignoring a message from the backend: %s (%s)", exc.message,
                          exc.detail)
                continue
            self._unanswered_since, self._reopened = None, False
            self._refused = None
            return message

    def _stash(self, message: Message) -> None:
        job_id = message.job_id
        if message.msg_type in wire.EVENTS and job_id and job_id not in self._done:
            queue = self._pending.setdefault(job_id, deque(maxlen=4096))
            queue.append(Event(message.msg_type, job_id, message.content, message.buffers))

    def _request(self, msg_type: str, content: dict[str, Any], *, job_id: str | None = None,
                 buffers: Sequence[Buffer] = (), timeout: float | None = None,
                 attempts: int | None = None, lost_job: str | None = None) -> Message:
        timeout = self.timeout if timeout is None else timeout
        attempts = self.retries + 1 if attempts is None else attempts
        sent: set[str] = set()
        for attempt in range(attempts):
            if attempt:
                self._reopen()
            sent.add(self._send(msg_type, content, job_id, buffers)["msg_id"])
            deadline = time.monotonic() + timeout
            while (message := self._recv(deadline - time.monotonic())) is not None:
                if message.parent.get("msg_id") not in sent:
                    self._stash(message)
                elif message.msg_type == wire.ERROR:
                    c = message.content
                    if c["code"] == wire.INCOMPATIBLE_VERSION:
                        raise IncompatibleVersion(c["message"])
                    raise JobFailed(c["message"], c["code"], c.get("detail"))
                else:
                    return message
            log.debug("no reply to %s within %.1f s (attempt %d of %d)", msg_type, timeout,
                      attempt + 1, attempts)
        raise self._unavailable(lost_job)

    def _refusal(self, refused: transport_module.LoginRefused) -> WrongKey:
        """The error for a handshake the backend refused (kept until it answers: see
        ``_unavailable``): our key refused, or another security mechanism than ours."""
        if isinstance(refused, transport_module.MechanismMismatch):
            self._refused = self._mismatch_message()
        else:
            self._refused = self._wrong_key_message()
        # Nothing was lost: the next request starts its own wait (an earlier silence would
        # read as "stopped answering" at once).
        self._unanswered_since, self._reopened = None, False
        return WrongKey(self._refused)

    def _mismatch_message(self) -> str:
        """A backend with CURVE on where this client has it off, or the reverse (the pyzmq
        transport's monitor and the pure one's greeting both show it)."""
        if self._curve is None:
            needs = ("" if self.transport == transport_module.PYZMQ else
                     "; CURVE needs the pyzmq transport, which this Python does not use")
            return (f"the backend at {self.endpoint} uses CURVE encryption, but this client "
                    "connected without it: its connection file has no \"curve_server_key\" "
                    "(a copy from before the backend used --curve?); use the connection file "
                    "the backend wrote at its last start and add \"curve_client_key\" (see "
                    f"docs/remote.md){needs}")
        return (f"the backend at {self.endpoint} does not use CURVE encryption, but this client "
                "was set up for it (its connection file names a \"curve_server_key\"): that "
                "file is out of date; use the connection file the backend wrote at its last "
                "start")

    def _unavailable(self, lost_job: str | None) -> BackendUnavailable:
        """The error for a silent backend: the refusal if one was seen and nothing verified
        came since (a backend that refuses our login is there, not gone), else the silence."""
        if self._refused is not None:
            return WrongKey(self._refused)
        return BackendUnavailable(self._silence_message(lost_job))

    def _wrong_key_message(self) -> str:
        if self._curve is not None:
            return (f"the backend at {self.endpoint} refused this client's CURVE key; copy "
                    "this client's public .key file into the backend's --allow-keys folder")
        return (f"a backend answers at {self.endpoint}, but with another key: the connection "
                "file is out of date (that backend was restarted, or it belongs to another "
                "user or installation); restart your backend so that it rewrites the file, "
                "or use the connection file of the backend that runs there")

    def _silence_message(self, lost_job: str | None) -> str:
        total = self.liveness if lost_job else self.timeout * (self.retries + 1)
        if self._bad_signatures:
            return (f"the backend at {self.endpoint} answered but its messages fail the "
                    "signature check: the connection file is out of date; restart the backend "
                    "and try again")
        what = (f"the backend at {self.endpoint} stopped answering while job {lost_job} was "
                f"running (silent for {total:g} s); it may have crashed — see its log, then "
                f"{START_HINT}" if lost_job else
                f"no backend answered at {self.endpoint} within {total:g} s — {START_HINT}")
        if self._curve is not None:
            what += "; with CURVE, also check that this client's public key is in the " \
                    "backend's --allow-keys folder"
        return what
