"""The pure-Python transport: a DEALER speaking ZMTP 3.1 (``zmtp.py``) over a plain TCP (or
Unix) socket, with the PLAIN login, for Pythons where pyzmq can't load (``transport.py``).

It behaves like libzmq's DEALER where the client relies on it: ``send`` never waits for the
backend (a message waits in a queue until a connection is up), a lost connection is retried
every ``RECONNECT`` seconds, and a login the backend refuses (its ZAP handler answers the
HELLO with an ERROR command) is reported as ``LoginRefused``. Large frames are written from
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
from protocol.transport import ZMTP, LoginRefused
from protocol.wire import Buffer

log = logging.getLogger("protocol.client")

RECONNECT = 0.1  # seconds between connection attempts (libzmq's ZMQ_RECONNECT_IVL)
MAX_QUEUED = 1000  # messages waiting for a connection (libzmq's ZMQ_SNDHWM)
WRITE_SECONDS = 10.0  # a peer that takes no bytes for this long is gone
WRITE_RATE = 5e6  # … and this many bytes per second more for a large message
PEER_TYPES = (b"ROUTER", b"DEALER")  # the socket types a DEALER may talk to (RFC 28)


class Disconnected(Exception):
    """The connection broke or the peer broke the protocol; it is dropped and retried."""


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
    """A DEALER connected to one ROUTER, in pure Python (see the module's docstring)."""

    name = ZMTP

    def __init__(self, endpoint: str, *, username: bytes, password: bytes, max_frame: int,
                 max_frames: int, handshake_timeout: float) -> None:
        parse_endpoint(endpoint)  # refuse an endpoint it can never connect to now
        self.endpoint = endpoint
        self.max_frame = max_frame
        self.max_frames = max_frames  # frames kept of one message; the rest are dropped
        self.handshake_timeout = handshake_timeout
        self._hello = zmtp.plain_hello(username, password)
        self._sock: socket.socket | None = None
        self._parser: zmtp.FrameParser | None = None
        self._queue: deque[list[Buffer]] = deque()  # messages waiting for a connection
        self._inbox: deque[list[Buffer]] = deque()  # complete messages not yet returned
        self._partial: list[Buffer] = []  # frames of the message being received
        self._partial_count = 0
        self._next_attempt = 0.0
        self._refused: str | None = None
        self._closed = False

    # --- the interface --------------------------------------------------------------------------
    def send(self, frames: Sequence[Buffer]) -> None:
        assert not self._closed, "transport is closed"
        if len(self._queue) >= MAX_QUEUED:
            log.debug("send queue full; a message was not sent")
            return
        self._queue.append(list(frames))
        if self._sock is None:
            self._connect(time.monotonic() + self.handshake_timeout)
        self._flush()

    def recv(self, timeout: float) -> list[Buffer] | None:
        assert not self._closed, "transport is closed"
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self._inbox:
                return self._inbox.popleft()
            if self._refused is not None:
                reason, self._refused = self._refused, None
                raise LoginRefused(reason)
            now = time.monotonic()
            if now >= deadline:
                return None
            if self._sock is None:
                if now < self._next_attempt:
                    time.sleep(min(self._next_attempt, deadline) - now)
                    continue
                self._connect(min(deadline, now + self.handshake_timeout))
                self._flush()
                continue
            self._read(deadline)

    def close(self) -> None:
        self._drop("closed")
        self._queue.clear()
        self._closed = True

    # --- connection ---------------------------------------------------------------------------
    def _connect(self, deadline: float) -> None:
        """Connect and log in within ``deadline``; on failure, retry after ``RECONNECT``."""
        self._next_attempt = time.monotonic() + RECONNECT
        sock = None
        try:
            sock = connect_socket(self.endpoint, max(0.001, deadline - time.monotonic()))
            self._handshake(sock, deadline)
        except LoginRefused as exc:
            self._refused = str(exc)
        except (OSError, ValueError, zmtp.ZmtpError, Disconnected) as exc:
            log.debug("no ZMTP connection to %s: %s", self.endpoint, exc)
        else:
            sock.settimeout(None)
            self._sock, sock = sock, None
            self._parser = zmtp.FrameParser(self.max_frame)
            self._partial, self._partial_count = [], 0
        finally:
            if sock is not None:
                sock.close()

    def _handshake(self, sock: socket.socket, deadline: float) -> None:
        """Greetings, then PLAIN: HELLO → WELCOME, INITIATE (our metadata) → READY."""
        _write(sock, [zmtp.greeting(zmtp.PLAIN, as_server=False)], deadline)
        peer = zmtp.parse_greeting(_read_exact(sock, zmtp.GREETING_SIZE, deadline))
        if peer.mechanism != zmtp.PLAIN:  # (libzmq leaves its as-server flag 0: not checked)
            theirs = peer.mechanism.decode("ascii", "replace")
            raise LoginRefused(f"the backend expects the {theirs} security mechanism, not a "
                               "PLAIN login")
        _write(sock, [self._hello], deadline)
        self._expect(sock, zmtp.WELCOME, deadline)
        properties = [(zmtp.SOCKET_TYPE, b"DEALER"), (zmtp.IDENTITY, b"")]
        _write(sock, [zmtp.command(zmtp.INITIATE, zmtp.metadata(properties))], deadline)
        ready = zmtp.parse_metadata(self._expect(sock, zmtp.READY, deadline))
        if ready.get(zmtp.SOCKET_TYPE.lower()) not in PEER_TYPES:
            raise zmtp.ZmtpError(f"the peer is a {ready.get('socket-type')!r} socket, which a "
                                 "DEALER cannot talk to")

    def _expect(self, sock: socket.socket, name: bytes, deadline: float) -> bytes:
        """The data of the handshake command ``name``; an ERROR is a refused login."""
        flags, size = _read_header(sock, deadline)
        if not flags & zmtp.COMMAND or size > zmtp.MAX_COMMAND_BYTES:
            raise zmtp.ZmtpError(f"expected the {name.decode()} command during the handshake")
        got, data = zmtp.parse_command(_read_exact(sock, size, deadline))
        if got == zmtp.ERROR:
            raise LoginRefused(zmtp.error_reason(data) or "login refused")
        if got != name:
            raise zmtp.ZmtpError(f"expected {name.decode()}, got {got!r} during the handshake")
        return data

    def _drop(self, why: str) -> None:
        if self._sock is not None:
            log.debug("dropping the ZMTP connection to %s: %s", self.endpoint, why)
            self._sock.close()
        self._sock, self._parser = None, None
        self._partial, self._partial_count = [], 0
        self._next_attempt = time.monotonic() + RECONNECT

    # --- traffic ------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Write the queued messages; a message whose write fails is lost (like libzmq's)."""
        while self._sock is not None and self._queue:
            frames = self._queue.popleft()
            chunks = zmtp.message_chunks(frames)
            size = sum(memoryview(c).nbytes for c in chunks)
            try:
                _write(self._sock, chunks, time.monotonic() + WRITE_SECONDS + size / WRITE_RATE)
            except (OSError, Disconnected) as exc:
                self._drop(f"writing failed: {exc}")

    def _read(self, deadline: float) -> None:
        """Read what arrives until ``deadline`` or a complete message; keep the messages."""
        assert self._sock is not None and self._parser is not None
        while not self._inbox and self._sock is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            buffer = self._parser.buffer()
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
            try:
                frames = self._parser.advance(count)
            except zmtp.ZmtpError as exc:
                self._drop(str(exc))
                return
            for frame in frames:
                self._take(frame)

    def _take(self, frame: zmtp.Frame) -> None:
        if frame.is_command:
            self._command(frame.body)
            return
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
        if name == zmtp.PING and self._sock is not None:
            try:
                _write(self._sock, [zmtp.pong_for(data)], time.monotonic() + WRITE_SECONDS)
            except (OSError, Disconnected) as exc:
                self._drop(f"writing failed: {exc}")
        elif name == zmtp.ERROR:
            self._drop(f"the backend sent ERROR {zmtp.error_reason(data)!r}")
        # anything else (PONG, unknown commands) is ignored, as ZMTP asks


# --- blocking reads and writes with a deadline ---------------------------------------------
def _write(sock: socket.socket, chunks: Sequence[bytes | memoryview], deadline: float) -> None:
    for chunk in chunks:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Disconnected("the peer did not take the bytes in time")
        sock.settimeout(left)
        try:
            sock.sendall(chunk)
        except TimeoutError:
            raise Disconnected("the peer did not take the bytes in time") from None


def _read_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Disconnected("the peer did not answer in time")
        sock.settimeout(left)
        try:
            count = sock.recv_into(view[got:])
        except TimeoutError:
            raise Disconnected("the peer did not answer in time") from None
        if count == 0:
            raise Disconnected("the peer closed the connection")
        got += count
    return bytes(data)


def _read_header(sock: socket.socket, deadline: float) -> tuple[int, int]:
    """Flags and size of the next frame, read byte-exactly (handshake only)."""
    flags = _read_exact(sock, 1, deadline)[0]
    width = 8 if flags & zmtp.LONG else 1
    return flags, int.from_bytes(_read_exact(sock, width, deadline), "big")
