"""The pure-Python transport: a DEALER speaking ZMTP 3.1 (``zmtp.py``) over a plain TCP (or
Unix) socket, with the PLAIN login, for Pythons where pyzmq can't load (``transport.py``).

It behaves like libzmq's DEALER where the client relies on it: ``send`` never waits for the
backend (a message waits in a queue until a connection is up), a lost connection is retried
every ``RECONNECT`` seconds, and a login the backend refuses (its ZAP handler answers the
HELLO with an ERROR command) is reported as ``LoginRefused``, a backend whose greeting names
another security mechanism (CURVE) as ``MechanismMismatch``. Large frames are written from
the caller's buffers and read into one preallocated ``bytearray`` each: no copy of the
pixels on the way, whatever their size.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Sequence

from protocol import zmtp
from protocol.transport import ZMTP, LoginRefused, MechanismMismatch
from protocol.wire import Buffer

log = logging.getLogger("protocol.client")

RECONNECT = 0.1  # seconds between connection attempts (libzmq's ZMQ_RECONNECT_IVL)
MAX_QUEUED = 1000  # messages waiting for a connection (libzmq's ZMQ_SNDHWM)
WRITE_SECONDS = 10.0  # a peer that takes no bytes for this long is gone
WRITE_RATE = 5e6  # … and this many bytes per second more for a large message
PEER_TYPES = (b"ROUTER", b"DEALER")  # the socket types a DEALER may talk to (RFC 28)
# Connection states: not connected, waiting for the backend's greeting, for WELCOME (after
# our HELLO), for READY (after our INITIATE), and open for messages.
CLOSED, GREETING, WELCOME, READY, OPEN = "closed", "greeting", "welcome", "ready", "open"


class Disconnected(Exception):
    """The peer stopped taking our bytes; the connection is dropped and tried again."""


def parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """(``tcp``, host, port) or (``ipc``, path, 0); ``ValueError`` for anything else."""
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[len("tcp://"):].rpartition(":")
        if sep and port.isdigit() and host and host != "*":
            return "tcp", host.strip("[]"), int(port)
        raise ValueError(f"cannot connect to {endpoint}: expected tcp://HOST:PORT")
    if endpoint.startswith("ipc://") and hasattr(socket, "AF_UNIX"):
        return "ipc", endpoint[len("ipc://"):], 0
    raise ValueError(f"cannot connect to {endpoint}: the pure-Python transport speaks "
                     "tcp:// (and ipc:// where the system has Unix sockets)")


def connect_socket(endpoint: str, timeout: float) -> socket.socket:
    """A connected stream socket for ``tcp://HOST:PORT`` or ``ipc://PATH``."""
    kind, where, port = parse_endpoint(endpoint)
    if kind == "tcp":
        sock = socket.create_connection((where, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(where)
    except OSError:
        sock.close()
        raise
    return sock


class ZmtpDealer:
    """A DEALER connected to one ROUTER, in pure Python (see the module's docstring).

    The handshake advances inside ``recv`` as the backend's bytes arrive, so no call waits
    past its own timeout for it; one that takes longer than ``handshake_timeout`` in all is
    dropped and tried again.
    """

    name = ZMTP

    def __init__(self, endpoint: str, *, username: bytes, password: bytes, max_frame: int,
                 max_frames: int, handshake_timeout: float) -> None:
        parse_endpoint(endpoint)  # refuse an endpoint it can never connect to now
        self.endpoint = endpoint
        self.max_frame = max_frame
        self.max_frames = max_frames  # frames kept of one message; the rest are dropped
        self.handshake_timeout = handshake_timeout
        self._hello = zmtp.plain_hello(username, password)
        self._greeting_ours = zmtp.greeting(zmtp.PLAIN, as_server=False)
        self._sock: socket.socket | None = None
        self._state = CLOSED
        self._greeting = bytearray(zmtp.GREETING_SIZE)  # the backend's, as it arrives
        self._greeting_got = 0
        self._handshake_deadline = 0.0
        self._parser: zmtp.FrameParser | None = None
        self._queue: deque[list[Buffer]] = deque()  # messages waiting for a connection
        self._inbox: deque[list[Buffer]] = deque()  # complete messages not yet returned
        self._partial: list[Buffer] = []  # frames of the message being received
        self._partial_count = 0
        self._next_attempt = 0.0
        self._refused: LoginRefused | None = None  # raised by the next recv
        self._closed = False

    # --- the interface --------------------------------------------------------------------------
    def send(self, frames: Sequence[Buffer]) -> None:
        assert not self._closed, "transport is closed"
        if len(self._queue) >= MAX_QUEUED:
            log.debug("send queue full; a message was not sent")
            return
        self._queue.append(list(frames))
        if self._sock is None and time.monotonic() >= self._next_attempt:
            self._connect()
        self._flush()

    def recv(self, timeout: float) -> list[Buffer] | None:
        assert not self._closed, "transport is closed"
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self._inbox:
                return self._inbox.popleft()
            if self._refused is not None:
                refusal, self._refused = self._refused, None
                raise refusal
            now = time.monotonic()
            if now >= deadline:
                return None
            if self._sock is None:
                if now < self._next_attempt:
                    time.sleep(min(self._next_attempt, deadline) - now)
                else:
                    self._connect()
                continue
            if self._state != OPEN and now >= self._handshake_deadline:
                self._drop(f"no handshake within {self.handshake_timeout:g} s")
                continue
            self._read(deadline if self._state == OPEN
                       else min(deadline, self._handshake_deadline))

    def close(self) -> None:
        self._drop("closed")
        self._queue.clear()
        self._closed = True

    # --- connection and handshake ---------------------------------------------------------------
    def _connect(self) -> None:
        """Connect and send our greeting; on failure, try again after ``RECONNECT``."""
        self._next_attempt = time.monotonic() + RECONNECT
        try:
            sock = connect_socket(self.endpoint, self.handshake_timeout)
        except (OSError, ValueError) as exc:
            log.debug("cannot connect to %s: %s", self.endpoint, exc)
            return
        self._sock, self._state = sock, GREETING
        self._greeting_got = 0
        self._handshake_deadline = time.monotonic() + self.handshake_timeout
        self._parser = zmtp.FrameParser(self.max_frame)
        self._partial, self._partial_count = [], 0
        self._write([self._greeting_ours[:zmtp.GREETING_HEAD]])  # the rest in _greeted

    def _greeted(self) -> None:
        """The backend's greeting is complete: check it, then send the rest of ours and log
        in (HELLO). A backend that names another mechanism (CURVE) is ``MechanismMismatch``:
        it is seen here because ours waited (``zmtp.GREETING_HEAD``)."""
        try:
            peer = zmtp.parse_greeting(bytes(self._greeting))
        except zmtp.ZmtpError as exc:
            self._drop(str(exc))
            return
        if peer.mechanism != zmtp.PLAIN:  # (libzmq leaves its as-server flag 0: not checked)
            theirs = peer.mechanism.decode("ascii", "replace")
            self._refuse(MechanismMismatch(f"the backend expects the {theirs} security "
                                           "mechanism, not a PLAIN login", theirs))
            return
        self._state = WELCOME
        self._write([self._greeting_ours[zmtp.GREETING_HEAD:], self._hello])

    def _handshake_command(self, name: bytes, data: bytes) -> None:
        """WELCOME → send INITIATE (our metadata); READY → open; ERROR → refused."""
        if name == zmtp.ERROR:
            self._refuse(LoginRefused(zmtp.error_reason(data) or "login refused"))
        elif self._state == WELCOME and name == zmtp.WELCOME:
            self._state = READY
            properties = [(zmtp.SOCKET_TYPE, b"DEALER"), (zmtp.IDENTITY, b"")]
            self._write([zmtp.command(zmtp.INITIATE, zmtp.metadata(properties))])
        elif self._state == READY and name == zmtp.READY:
            peer_type = zmtp.parse_metadata(data).get(zmtp.SOCKET_TYPE.lower())
            if peer_type not in PEER_TYPES:
                self._drop(f"the peer is a {peer_type!r} socket, which a DEALER cannot talk to")
                return
            self._state = OPEN
            self._flush()
        else:
            self._drop(f"unexpected {name!r} command during the handshake")

    def _refuse(self, refusal: LoginRefused) -> None:
        self._refused = refusal
        self._drop(f"login refused: {refusal}")

    def _drop(self, why: str) -> None:
        if self._sock is not None:
            log.debug("dropping the ZMTP connection to %s: %s", self.endpoint, why)
            self._sock.close()
        self._sock, self._parser, self._state = None, None, CLOSED
        self._partial, self._partial_count = [], 0
        self._next_attempt = time.monotonic() + RECONNECT

    # --- traffic ------------------------------------------------------------------------------
    def _write(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Write all of ``chunks`` or drop the connection (a half-written frame ends it)."""
        assert self._sock is not None
        size = sum(memoryview(c).nbytes for c in chunks)
        try:
            _send_all(self._sock, chunks, time.monotonic() + WRITE_SECONDS + size / WRITE_RATE)
        except (OSError, Disconnected) as exc:
            self._drop(f"writing failed: {exc}")

    def _flush(self) -> None:
        """Write the queued messages; a message whose write fails is lost (like libzmq's)."""
        while self._state == OPEN and self._queue:
            self._write(zmtp.message_chunks(self._queue.popleft()))

    def _read(self, deadline: float) -> None:
        """Read what arrives until ``deadline`` or a complete message; keep the messages."""
        while not self._inbox and self._sock is not None and self._refused is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            assert self._parser is not None
            greeting = self._state == GREETING
            buffer = (memoryview(self._greeting)[self._greeting_got:] if greeting
                      else self._parser.buffer())
            self._sock.settimeout(left)
            try:
                count = self._sock.recv_into(buffer)
            except TimeoutError:
                return
            except OSError as exc:
                self._drop(f"reading failed: {exc}")
                return
            if count == 0:
                self._drop("the backend closed the connection"
                           + (" in the middle of a frame" if self._parser.mid_frame else ""))
                return
            if greeting:
                self._greeting_got += count
                if self._greeting_got == zmtp.GREETING_SIZE:
                    self._greeted()
                continue
            try:
                frames = self._parser.advance(count)
            except zmtp.ZmtpError as exc:
                self._drop(str(exc))
                return
            for frame in frames:
                if self._sock is None:  # dropped by the frame before
                    break
                self._take(frame)

    def _take(self, frame: zmtp.Frame) -> None:
        if frame.is_command:
            self._command(frame.body)
        elif self._state != OPEN:
            self._drop("a message frame arrived during the handshake")
        else:
            self._partial_count += 1
            if self._partial_count <= self.max_frames:
                self._partial.append(frame.body)
            if not frame.more:
                self._inbox.append(self._partial)
                self._partial, self._partial_count = [], 0

    def _command(self, body: bytes | bytearray) -> None:
        try:
            name, data = zmtp.parse_command(body)
        except zmtp.ZmtpError as exc:
            self._drop(str(exc))
            return
        if self._state != OPEN:
            self._handshake_command(name, data)
        elif name == zmtp.PING:
            self._write([zmtp.pong_for(data)])
        elif name == zmtp.ERROR:
            self._drop(f"the backend sent ERROR {zmtp.error_reason(data)!r}")
        # anything else (PONG, unknown commands) is ignored, as ZMTP asks


# --- blocking writes with a deadline -----------------------------------------------------------
def _send_all(sock: socket.socket, chunks: Sequence[bytes | memoryview], deadline: float) -> None:
    for chunk in chunks:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Disconnected("the peer did not take the bytes in time")
        sock.settimeout(left)
        try:
            sock.sendall(chunk)
        except TimeoutError:
            raise Disconnected("the peer did not take the bytes in time") from None
