"""The server's socket without libzmq: a ROUTER speaking ZMTP 3.1 (``protocol/zmtp.py``) with
the PLAIN login, or CURVE for ``--curve`` (``curve_server.py``), over non-blocking sockets in
the socket thread.

Why not libzmq here: a libzmq ROUTER hands out one whole message before the next and cannot
cap how many frames a message has, so a key holder's message of three million empty frames
kept every other client waiting about a second (and 17–19 s for a million when Python dropped
them one by one). Here each loop turn reads every ready connection for at most one budget
(``TURN_BYTES``, ``TURN_FRAMES``, ``TURN_MESSAGES``), in turn, so one connection's flood delays
another's message by one budget at most. A message keeps its first ``wire.MAX_FRAMES`` frames;
the rest are skipped as they arrive (counted, never kept), and the message is handed on with
its exact frame count when it ends, for the server to refuse.

What it does as libzmq's ROUTER did, for both clients (libzmq's DEALER through pyzmq, and the
pure-Python ``protocol.transport_zmtp.ZmtpDealer``):

- the PLAIN login (``auth.PlainGate``); a wrong one is answered with libzmq's ERROR
  (``zmtp.plain_refusal``), then closed;
- CURVE (``curve_server``): a client key outside the allow-list (``auth.KeyGate``) is
  answered with libzmq's ERROR 400, then closed; a box that does not open, a vouch for other
  keys or a nonce that does not grow drops the connection. Each frame is a MESSAGE box
  whose MORE bit is inside it, so frames past ``wire.MAX_FRAMES`` are opened (in place, to
  find the message's end) but not kept, and weigh ``CURVE_FRAME_WEIGHT`` in the budget;
  frames to send are sealed one at a time as the send queue drains;
- a frame over ``limits.max_frame_bytes`` (libzmq's ``ZMQ_MAXMSGSIZE``), a command over
  ``zmtp.MAX_COMMAND_BYTES`` or anything that breaks ZMTP drops that connection;
- a routing identity per connection, 5 bytes (0, then a 32-bit counter), never reused in the
  process; a peer's own ``Identity`` property is taken if no connection has it, else the peer
  is dropped (libzmq ignores such a peer);
- ``send`` never blocks: each connection has an outbound queue of at most ``SEND_HWM``
  messages (libzmq's ``ZMQ_SNDHWM``); large frames are written from the caller's buffer;
- a ``PING`` command is answered with ``PONG``.

And, where libzmq has no such limit: a connection must finish its login within
``HANDSHAKE_SECONDS``; at most ``MAX_CONNECTIONS`` are open: a new one then replaces the oldest
still logging in, else the logged-in one silent the longest (its client connects again: no key
holder can fill the server and so refuse the others).

Only the socket thread uses a ``ZmtpRouter``, except ``wake``, which any thread may call.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import secrets
import selectors
import socket
import stat
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from backend.server import curve_server
from backend.server.auth import KeyGate, PlainGate
from backend.server.curve_server import CurveSession
from backend.server.endpoint import (
    DEFAULT_BIND,
    RECEIVE_BATCH,
    CurveServer,
    Inbound,
    ServerError,
    refuse_public_bind,
)
from protocol import wire, zmtp
from protocol.curve import load_keypair
from protocol.wire import Buffer, Limits

log = logging.getLogger("backend.server")

# One connection's share of a loop turn: bytes read, frames parsed, messages completed.
TURN_BYTES = 4 * 2**20
TURN_FRAMES = 8192
# A CURVE frame counts as this many against TURN_FRAMES (512 a turn, ~2 ms): opening its box
# costs several times parsing a plain frame. Another client's ping while a key holder sends
# 2 x 3,000,000 empty CURVE frames: median 80 ms, max 138 ms with a weight of 1; 3.8 ms and
# 17-221 ms with 8; 2.4 ms and 15-30 ms with 16 (tests/test_server_fuzz.py).
CURVE_FRAME_WEIGHT = 16
TURN_MESSAGES = 8
TURN_WRITE_BYTES = 16 * 2**20  # bytes written to one connection per turn
READ_CHUNK = 2**16  # one read of headers and small frames
SEND_HWM = 1000  # messages queued for one connection (libzmq's ZMQ_SNDHWM default)
MAX_CONNECTIONS = 256
HANDSHAKE_SECONDS = 5.0
LINGER_SECONDS = 2.0  # how long ``close`` still writes queued messages (libzmq's linger)
ACCEPTS_PER_TURN = 64
# A loop that never waits (a flood keeps every turn busy) pauses this long after each
# BUSY_SLICE, so that the process's other threads get the GIL: a thread waiting for it asks
# for a switch only after 5 ms without one, and every release by a loop doing short system
# calls restarts that wait (CPython's GIL convoy); the engine thread, or a client in the
# same process, would otherwise wait until the flood ends.
BUSY_SLICE = 0.005
BUSY_PAUSE = 0.0002
PEER_TYPES = (b"DEALER", b"REQ", b"ROUTER")  # the sockets a ROUTER may talk to (RFC 28)
_FLAG_BITS = zmtp.MORE | zmtp.LONG | zmtp.COMMAND
_IOV_MAX = 64  # buffers per sendmsg call
SEAL_AHEAD = 2**18  # CURVE: frames are sealed when fewer bytes than this wait to be written
_HAS_SENDMSG = hasattr(socket.socket, "sendmsg")
# Routing identities: 0, then a counter from a random start, shared by every router here.
_IDENTITIES = itertools.count(secrets.randbelow(2**32))
# Connection states: reading the peer's greeting, waiting for its HELLO, for its INITIATE,
# open for messages, and closing (a refused login: the ERROR is written, nothing read).
GREETING, HELLO, INITIATE, OPEN, CLOSING = "greeting", "hello", "initiate", "open", "closing"
_WAKE, _LISTEN = "wake", "listen"


@dataclass
class _Budget:
    bytes: int = TURN_BYTES
    frames: int = TURN_FRAMES
    messages: int = TURN_MESSAGES

    @property
    def spent(self) -> bool:
        return self.bytes <= 0 or self.frames <= 0 or self.messages <= 0


class _Connection:
    """One peer: its socket, handshake state, the message being read and the bytes to write."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.state = GREETING
        self.deadline = deadline  # for the handshake
        self.closed = False
        self.identity = b""
        self.events = selectors.EVENT_READ  # what the selector watches
        self.greeting = bytearray(zmtp.GREETING_SIZE)
        self.greeting_got = 0
        self.held = bytearray()  # bytes read but not parsed: headers, small frames
        self.body: bytearray | None = None  # a large frame being filled from the socket
        self.filled = 0
        self.skip = 0  # bytes still to come of a large frame past wire.MAX_FRAMES
        self.large_more = False  # whether the large frame being read has MORE set
        self.frames: list[Buffer] = []  # the first frames of the message being read
        self.count = 0  # how many frames that message has had so far
        self.out: deque[tuple[memoryview, bool]] = deque()  # (bytes, ends a message)
        self.queued = 0  # messages in ``out`` and ``unsealed``
        self.session: CurveSession | None = None  # CURVE, once INITIATE is checked
        self.cookie_nonce = b""  # CURVE: the nonce of the cookie WELCOME gave
        # CURVE: frames to seal into MESSAGE frames as ``out`` drains (body, flags, ends)
        self.unsealed: deque[tuple[memoryview, int, bool]] = deque()
        self.active = time.monotonic()  # when it last sent anything (or connected)

    @property
    def name(self) -> str:
        return self.identity.hex() if self.identity else "(logging in)"


class ZmtpRouter:
    """A ROUTER bound to ``bind`` (loopback tcp, any tcp with CURVE, or ipc), plus a socket
    pair that wakes its poll: what the server's loop calls (``open``, ``poll``, ``receive``,
    ``send``, ``wake``, ``close``)."""

    def __init__(self, bind: str, key: bytes, limits: Limits,
                 handshake_seconds: float = HANDSHAKE_SECONDS,
                 curve: CurveServer | None = None) -> None:
        self.bind = bind
        self.limits = limits
        self.curve = curve
        self.endpoint = ""
        self.handshake_seconds = handshake_seconds
        self.gate: PlainGate | KeyGate = PlainGate(wire.transport_password(key))
        self._keys: curve_server.ServerKeys | None = None
        self._cookies = curve_server.CookieJar()
        self.drained_at = time.monotonic()
        self._mechanism = zmtp.PLAIN if curve is None else zmtp.CURVE
        self._greeting = zmtp.greeting(self._mechanism, as_server=True)
        self._properties = zmtp.metadata([(zmtp.SOCKET_TYPE, b"ROUTER"), (zmtp.IDENTITY, b"")])
        self._ready = zmtp.command(zmtp.READY, self._properties)
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._ipc_path: str | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._connections: set[_Connection] = set()
        self._handshaking: dict[_Connection, None] = {}  # in the order they connected
        self._routes: dict[bytes, _Connection] = {}  # identity -> open connection
        self._behind: dict[_Connection, None] = {}  # stopped by their budget, not drained
        self._inbound: deque[Inbound] = deque()
        self._pass_started = self.drained_at
        self._pass_clean = True  # the last poll read every ready connection to its end
        self._staging = bytearray(READ_CHUNK)  # where small reads land before ``held``
        self._scratch = bytearray(READ_CHUNK)  # where skipped large frames are read to
        self._full_warned = False
        self._busy_since: float | None = None  # when the loop last waited (None: it did)

    # --- binding ------------------------------------------------------------------------------
    def open(self) -> str:
        """Bind; return the endpoint clients connect to."""
        refuse_public_bind(self.bind, self.curve)
        if self.curve is not None:
            self._load_curve(self.curve)
        listener = self._listen()
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, _LISTEN)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        return self.endpoint

    def _load_curve(self, curve: CurveServer) -> None:
        try:
            self._keys = curve_server.ServerKeys.from_file(curve.secret_key_file)
        except ValueError as exc:
            raise ServerError(f"{exc}; create it with: python -m backend keygen") from None
        if not curve.allow_dir.is_dir():
            raise ServerError(f"the allow-list folder {curve.allow_dir} does not exist; put "
                              "the clients' public .key files there")
        self.gate = KeyGate(curve.allow_dir)

    def _listen(self) -> socket.socket:
        if self.bind.startswith("ipc://"):
            return self._listen_ipc(self.bind[len("ipc://"):])
        match = re.fullmatch(r"tcp://(.+):([0-9]+|\*)", self.bind)
        if not match:
            raise ServerError(f"cannot bind {self.bind}: give tcp://127.0.0.1:PORT (or "
                              "tcp://[::1]:PORT, or ipc://PATH)")
        host = match.group(1).strip("[]")
        host = {"localhost": "127.0.0.1", "*": "0.0.0.0"}.get(host, host)
        port = 0 if match.group(2) == "*" else int(match.group(2))
        try:
            sock = _tcp_listener(host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and self.bind == DEFAULT_BIND:
                log.warning("%s is in use; binding a free port instead", self.bind)
                sock = _tcp_listener("127.0.0.1", 0)
            else:
                raise ServerError(f"cannot bind {self.bind}: {exc.strerror}; choose another "
                                  "--bind (tcp://127.0.0.1:0 picks a free port)") from None
        host, port = sock.getsockname()[:2]
        if host in ("0.0.0.0", "::"):  # a wildcard address is not connectable: this host's name
            host = socket.gethostname()
        self.endpoint = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        return sock

    def _listen_ipc(self, path: str) -> socket.socket:
        if not hasattr(socket, "AF_UNIX") or not path or path == "*":
            raise ServerError(f"cannot bind {self.bind}: ipc:// needs Unix sockets and a path "
                              "(ipc:///tmp/drag.sock); or bind tcp://127.0.0.1:0")
        with contextlib.suppress(OSError):  # a socket left by an earlier run (libzmq does so)
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ServerError(f"cannot bind {self.bind}: {exc.strerror}; choose another "
                              "--bind") from None
        self._ipc_path = path
        self.endpoint = self.bind
        return sock

    def server_public_key(self) -> str | None:
        """The CURVE public key clients need (None without CURVE)."""
        if self.curve is None:
            return None
        return load_keypair(self.curve.secret_key_file)[0].decode("ascii")

    # --- the loop -----------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> None:
        """Wait until something arrives, a wake-up, or ``timeout_ms`` passes; then accept,
        write and read: every ready connection for one budget (``receive`` hands the
        messages out)."""
        now = time.monotonic()
        busy = bool(self._inbound or self._behind)
        timeout = 0.0 if busy else timeout_ms / 1000
        self._share_the_gil(now, busy)
        if self._handshaking:
            timeout = min(timeout, max(0.0, next(iter(self._handshaking)).deadline - now))
        started = time.monotonic()
        readable: list[_Connection] = []
        for key, mask in self._selector.select(timeout):
            if key.data is _WAKE:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
            elif key.data is _LISTEN:
                self._accept()
            else:
                conn: _Connection = key.data
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn)
                if mask & selectors.EVENT_READ:
                    readable.append(conn)
        self._expire_handshakes()
        if len(self._inbound) >= RECEIVE_BATCH:  # hand those out before reading more
            self._pass_clean = False
            return
        turn = list(self._behind) + [c for c in readable if c not in self._behind]
        self._behind = {}
        for conn in turn:
            if not conn.closed and conn.state != CLOSING and not self._read_turn(conn):
                self._behind[conn] = None
        self._pass_started, self._pass_clean = started, not self._behind

    def _share_the_gil(self, now: float, busy: bool) -> None:
        """Pause ``BUSY_PAUSE`` once the loop has not waited for ``BUSY_SLICE``."""
        if not busy:
            self._busy_since = None
        elif self._busy_since is None:
            self._busy_since = now
        elif now - self._busy_since > BUSY_SLICE:
            time.sleep(BUSY_PAUSE)
            self._busy_since = time.monotonic()

    def receive(self) -> Iterator[Inbound]:
        """The messages read, at most ``RECEIVE_BATCH`` of them (never blocks).

        ``drained_at`` is the last time no message was left waiting: every message that
        arrived before it has been handed out.
        """
        for _ in range(RECEIVE_BATCH):
            if not self._inbound:
                if self._pass_clean:
                    self.drained_at = self._pass_started
                return
            yield self._inbound.popleft()

    def send(self, identity: bytes, frames: Sequence[Buffer], what: str) -> None:
        """Send without blocking; a client that is gone or not reading loses the message."""
        conn = self._routes.get(identity)
        if conn is None or conn.queued >= SEND_HWM:
            why = errno.EHOSTUNREACH if conn is None else errno.EAGAIN
            log.debug("dropped %s for %s: %s", what, identity.hex()[:8], os.strerror(why))
            return
        if conn.session is not None:  # sealed frame by frame as ``out`` drains
            last = len(frames) - 1
            conn.unsealed.extend(
                (memoryview(frame).cast("B"), curve_server.INNER_MORE if i < last else 0,
                 i == last) for i, frame in enumerate(frames))
        else:
            chunks = [memoryview(chunk) for chunk in zmtp.message_chunks(frames)]
            conn.out.extend((chunk, False) for chunk in chunks[:-1])
            conn.out.append((chunks[-1], True))
        conn.queued += 1
        self._flush(conn)

    def wake(self) -> None:
        """Make ``poll`` return now (thread- and signal-safe)."""
        with contextlib.suppress(OSError):  # buffer full (already awake) or closed
            self._wake_w.send(b"!")

    def close(self, term: bool = False) -> None:
        """Stop listening; write what is queued for at most ``LINGER_SECONDS``; close.
        (``term``: nothing to end here, unlike libzmq's context.)"""
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            if self._ipc_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._ipc_path)
        for conn in list(self._connections):
            if conn.out or conn.unsealed:
                conn.state = CLOSING  # write only
                self._watch(conn)
            else:
                self._drop(conn, "the server is closing")
        deadline = time.monotonic() + LINGER_SECONDS
        while self._connections and (left := deadline - time.monotonic()) > 0:
            for key, mask in self._selector.select(left):
                if isinstance(key.data, _Connection) and mask & selectors.EVENT_WRITE:
                    self._flush(key.data)
                elif key.data is _WAKE:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
        for conn in list(self._connections):
            self._drop(conn, "the server closed")
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- connections --------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors, say: the next turn tries again
                log.warning("cannot accept a connection: %s", exc)
                return
            if len(self._connections) >= MAX_CONNECTIONS and not self._make_room():
                sock.close()
                continue
            sock.setblocking(False)
            if sock.family != getattr(socket, "AF_UNIX", None):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(sock, time.monotonic() + self.handshake_seconds)
            self._connections.add(conn)
            self._handshaking[conn] = None
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._write(conn, self._greeting)

    def _make_room(self) -> bool:
        """At ``MAX_CONNECTIONS``: drop the oldest connection still logging in (a key holder
        logs in within milliseconds; others never do), else the logged-in one that has sent
        nothing for the longest (a DEALER connects again by itself): a key holder who opens
        many connections cannot shut the others out."""
        if not self._full_warned:
            log.warning("%d connections are open, the most this backend takes; a new one "
                        "replaces the oldest still logging in, else the longest silent",
                        MAX_CONNECTIONS)
            self._full_warned = True
        if self._handshaking:
            self._drop(next(iter(self._handshaking)), "too many connections")
            return True
        if not self._connections:
            return False
        self._drop(min(self._connections, key=lambda conn: conn.active),
                   "too many connections; it was the longest silent")
        return True

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        while self._handshaking:
            oldest = next(iter(self._handshaking))
            if oldest.deadline > now:
                return
            self._drop(oldest, f"no login within {self.handshake_seconds:g} s")

    def _drop(self, conn: _Connection, why: str) -> None:
        if conn.closed:
            return
        log.debug("dropped the connection of %s: %s", conn.name, why)
        conn.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        self._connections.discard(conn)
        self._handshaking.pop(conn, None)
        self._behind.pop(conn, None)
        if conn.identity and self._routes.get(conn.identity) is conn:
            del self._routes[conn.identity]
        conn.out.clear()
        conn.unsealed.clear()
        conn.frames, conn.body, conn.held = [], None, bytearray()

    def _new_identity(self) -> bytes:
        while True:
            identity = b"\0" + (next(_IDENTITIES) % 2**32).to_bytes(4, "big")
            if identity not in self._routes:
                return identity

    # --- writing ------------------------------------------------------------------------------
    def _write(self, conn: _Connection, data: bytes) -> None:
        """Queue a greeting or a command (no message) and write what the socket takes."""
        conn.out.append((memoryview(data), False))
        self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        """Write queued bytes until the socket is full or this turn's share is written."""
        out, budget = conn.out, TURN_WRITE_BYTES
        while budget > 0 and not conn.closed:
            if conn.unsealed:
                self._seal(conn)
            if not out:
                break
            try:
                if _HAS_SENDMSG and len(out) > 1:
                    sent = conn.sock.sendmsg([c for c, _ in itertools.islice(out, _IOV_MAX)])
                else:
                    sent = conn.sock.send(out[0][0])
            except BlockingIOError:
                break
            except OSError as exc:
                self._drop(conn, f"writing failed: {exc}")
                return
            budget -= sent
            while sent:
                chunk, ends = out[0]
                if sent < chunk.nbytes:
                    out[0] = (chunk[sent:], ends)
                    break
                sent -= chunk.nbytes
                out.popleft()
                conn.queued -= ends
        if conn.state == CLOSING and not out and not conn.unsealed:
            self._drop(conn, "login refused" if not conn.identity else "closed")
        elif not conn.closed:
            self._watch(conn)

    def _watch(self, conn: _Connection) -> None:
        events = (0 if conn.state == CLOSING else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if conn.out or conn.unsealed else 0)
        if events != conn.events:
            self._selector.modify(conn.sock, events, conn)
            conn.events = events

    def _seal(self, conn: _Connection) -> None:
        """CURVE: seal queued frames into MESSAGE frames while fewer than ``SEAL_AHEAD``
        bytes wait in ``out`` (so a large result is copied one frame at a time)."""
        assert conn.session is not None
        waiting = sum(chunk.nbytes for chunk, _ in itertools.islice(conn.out, _IOV_MAX))
        while conn.unsealed and waiting < SEAL_AHEAD and len(conn.out) < _IOV_MAX - 1:
            body, flags, ends = conn.unsealed.popleft()
            frame = conn.session.seal(body, flags)
            header = zmtp.frame_header(len(frame))
            if len(frame) < zmtp.LARGE_FRAME:
                conn.out.append((memoryview(header + frame), ends))
            else:
                conn.out.append((memoryview(header), False))
                conn.out.append((memoryview(frame), ends))
            waiting += len(frame)

    # --- reading ------------------------------------------------------------------------------
    def _read_turn(self, conn: _Connection) -> bool:
        """Read ``conn`` for one budget; True when it had nothing more to give."""
        budget = _Budget()
        try:
            while not conn.closed and conn.state != CLOSING:
                if conn.state == GREETING:
                    if not self._read_greeting(conn, budget):
                        return True
                    continue
                if conn.body is not None or conn.skip:
                    if not self._read_large(conn, budget):
                        return True
                else:
                    self._parse(conn, budget)
                    if conn.closed or conn.body is not None or conn.skip:
                        continue
                    if budget.spent:
                        return False
                    if not self._read_held(conn, budget):
                        return True
                if budget.spent:
                    return False
        except zmtp.ZmtpError as exc:
            self._drop(conn, str(exc))
        return True

    def _recv_into(self, conn: _Connection, buffer: memoryview) -> int:
        """Bytes read into ``buffer`` (0: nothing waiting); drops a connection that ended."""
        try:
            count = conn.sock.recv_into(buffer)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self._drop(conn, f"reading failed: {exc}")
            return 0
        if count:
            conn.active = time.monotonic()
        else:
            middle = conn.body is not None or conn.skip or conn.held or conn.frames
            self._drop(conn, "the peer closed the connection"
                       + (" in the middle of a message" if middle else ""))
        return count

    def _read_greeting(self, conn: _Connection, budget: _Budget) -> bool:
        count = self._recv_into(conn, memoryview(conn.greeting)[conn.greeting_got:])
        if not count:
            return False
        budget.bytes -= count
        conn.greeting_got += count
        if conn.greeting_got == zmtp.GREETING_SIZE:
            peer = zmtp.parse_greeting(bytes(conn.greeting))
            if peer.mechanism != self._mechanism:
                name = peer.mechanism.decode("ascii", "replace")
                raise zmtp.ZmtpError(f"the peer's mechanism is {name}, not "
                                     f"{self._mechanism.decode()}")
            conn.state = HELLO
        return True

    def _read_held(self, conn: _Connection, budget: _Budget) -> bool:
        view = memoryview(self._staging)[:min(READ_CHUNK, budget.bytes)]
        count = self._recv_into(conn, view)
        if count:
            conn.held += view[:count]
            budget.bytes -= count
        return bool(count)

    def _read_large(self, conn: _Connection, budget: _Budget) -> bool:
        """Fill the large frame being read straight from the socket (or skip its bytes)."""
        if conn.body is not None:
            want = min(len(conn.body) - conn.filled, budget.bytes)
            count = self._recv_into(conn, memoryview(conn.body)[conn.filled:conn.filled + want])
            conn.filled += count
            done = conn.body is not None and conn.filled == len(conn.body)
        else:
            want = min(conn.skip, len(self._scratch), budget.bytes)
            count = self._recv_into(conn, memoryview(self._scratch)[:want])
            conn.skip -= count
            done = conn.skip == 0
        budget.bytes -= count
        if count and done:
            self._large_done(conn, budget)
        return bool(count)

    def _large_done(self, conn: _Connection, budget: _Budget) -> None:
        if conn.session is not None:
            body, conn.body = conn.body, None
            assert body is not None
            self._curve_frame(conn, body, budget)
            return
        if conn.body is not None:
            conn.frames.append(conn.body)
            conn.body = None
        if not conn.large_more:
            self._deliver(conn, budget)

    def _deliver(self, conn: _Connection, budget: _Budget) -> None:
        self._inbound.append(Inbound(conn.identity, conn.frames, conn.count))
        conn.frames, conn.count = [], 0
        budget.messages -= 1

    def _parse(self, conn: _Connection, budget: _Budget) -> None:
        """Take the complete frames out of ``held``, within the budget. A large frame (at
        least ``zmtp.LARGE_FRAME`` bytes) gets a buffer of its own that ``_read_large`` fills;
        frames past ``wire.MAX_FRAMES`` are counted, not kept."""
        held = conn.held
        view = memoryview(held)
        end, pos, frames = len(held), 0, 0
        try:
            while (frames < budget.frames and budget.messages > 0 and not conn.closed
                   and conn.state != CLOSING):
                if end - pos < 2:
                    break
                flags = held[pos]
                if flags & zmtp.LONG:
                    if end - pos < 9:
                        break
                    size = int.from_bytes(view[pos + 1:pos + 9], "big")
                    start = pos + 9
                else:
                    size = held[pos + 1]
                    start = pos + 2
                if flags & ~_FLAG_BITS:
                    raise zmtp.ZmtpError(f"reserved frame flag bits set (0x{flags:02x})")
                if flags & zmtp.COMMAND:
                    if flags & zmtp.MORE:
                        raise zmtp.ZmtpError("a command frame cannot have MORE set")
                    if size > zmtp.MAX_COMMAND_BYTES:
                        raise zmtp.ZmtpError(f"the peer sent a command of {size} bytes; at "
                                             f"most {zmtp.MAX_COMMAND_BYTES} are accepted")
                    if end - start < size:
                        break
                    pos, frames = start + size, frames + 1
                    self._command(conn, bytes(view[start:pos]))
                    continue
                if conn.state != OPEN:
                    raise zmtp.ZmtpError("a message frame arrived during the login")
                if conn.session is not None:  # CURVE: a MESSAGE frame, the frame in its box
                    if size > self.limits.max_frame_bytes + curve_server.MESSAGE_OVERHEAD:
                        raise zmtp.ZmtpError(
                            f"the peer sent a frame of {size - curve_server.MESSAGE_OVERHEAD} "
                            f"bytes; at most {self.limits.max_frame_bytes} are accepted")
                    if size < zmtp.LARGE_FRAME:
                        if end - start < size:
                            break
                        pos, frames = start + size, frames + CURVE_FRAME_WEIGHT
                        self._curve_frame(conn, view[start:pos], budget)
                        continue
                    have = min(end - start, size)
                    pos, frames = start + have, frames + 1
                    conn.body = bytearray(size)
                    conn.body[:have] = view[start:pos]
                    conn.filled = have
                    if have < size:
                        break
                    self._large_done(conn, budget)
                    continue
                if size > self.limits.max_frame_bytes:
                    raise zmtp.ZmtpError(f"the peer sent a frame of {size} bytes; at most "
                                         f"{self.limits.max_frame_bytes} are accepted")
                if size < zmtp.LARGE_FRAME:
                    if end - start < size:
                        break
                    pos, frames = start + size, frames + 1
                    conn.count += 1
                    if conn.count <= wire.MAX_FRAMES:
                        conn.frames.append(bytes(view[start:pos]))
                    if not flags & zmtp.MORE:
                        self._deliver(conn, budget)
                    continue
                # a large frame: what is held goes into its buffer, the socket fills the rest
                have = min(end - start, size)
                pos, frames = start + have, frames + 1
                conn.count += 1
                conn.large_more = bool(flags & zmtp.MORE)
                if conn.count <= wire.MAX_FRAMES:
                    conn.body = bytearray(size)
                    conn.body[:have] = view[start:pos]
                    conn.filled = have
                else:
                    conn.skip = size - have
                if have < size:
                    break
                self._large_done(conn, budget)
        except zmtp.ZmtpError:
            pos = 0  # the connection is dropped; its bytes may still be lent (a traceback)
            raise
        finally:
            view.release()
            if not conn.closed and pos:
                del held[:pos]
            budget.frames -= frames

    def _curve_frame(self, conn: _Connection, frame: bytearray | memoryview,
                     budget: _Budget) -> None:
        """One MESSAGE frame: check its nonce, open it in place, keep or count the frame.

        A frame past ``wire.MAX_FRAMES`` is opened but not kept: the MORE bit that ends a
        message is inside the box (libzmq writes every MESSAGE frame with flags 0)."""
        assert conn.session is not None
        conn.session.check_nonce(memoryview(frame))
        flags = conn.session.open_in_place(frame)
        if flags & curve_server.INNER_COMMAND:  # a PING, say, sealed like a frame
            self._sealed_command(conn, bytes(frame[curve_server.MESSAGE_OVERHEAD:]))
            return
        conn.count += 1
        if conn.count <= wire.MAX_FRAMES:
            if isinstance(frame, bytearray):  # a large frame's own buffer: no copy
                del frame[:curve_server.MESSAGE_OVERHEAD]
                conn.frames.append(frame)
            else:
                conn.frames.append(bytes(frame[curve_server.MESSAGE_OVERHEAD:]))
        if not flags & curve_server.INNER_MORE:
            self._deliver(conn, budget)

    def _sealed_command(self, conn: _Connection, body: bytes) -> None:
        name, data = zmtp.parse_command(body)
        if name == zmtp.PING:
            pong = bytes((len(zmtp.PONG),)) + zmtp.PONG + data[2:]  # its context echoed
            conn.unsealed.append((memoryview(pong), curve_server.INNER_COMMAND, False))
            self._flush(conn)
        elif name == zmtp.ERROR:
            raise zmtp.ZmtpError(f"the peer sent ERROR {zmtp.error_reason(data)!r}")

    def _command(self, conn: _Connection, body: bytes) -> None:
        """The login (HELLO, INITIATE), then PING; anything else is ignored, as ZMTP asks."""
        name, data = zmtp.parse_command(body)
        if self._keys is not None and conn.state in (HELLO, INITIATE):
            self._curve_command(conn, name, data, self._keys)
        elif conn.state == HELLO:
            if name != zmtp.HELLO:
                raise zmtp.ZmtpError(f"expected HELLO, got {name!r}")
            user, password = zmtp.parse_plain_hello(data)
            if not self.gate.check(user, password):
                conn.state = CLOSING  # libzmq's ERROR, then the connection closes
                self._write(conn, zmtp.plain_refusal())
                return
            conn.state = INITIATE
            self._write(conn, zmtp.command(zmtp.WELCOME))
        elif conn.state == INITIATE:
            if name != zmtp.INITIATE:
                raise zmtp.ZmtpError(f"expected INITIATE, got {name!r}")
            self._open(conn, zmtp.parse_metadata(data), self._ready)
        elif conn.session is not None:
            raise zmtp.ZmtpError(f"a {name!r} command outside a MESSAGE on a CURVE connection")
        elif name == zmtp.PING:
            self._write(conn, zmtp.pong_for(data))
        elif name == zmtp.ERROR:
            raise zmtp.ZmtpError(f"the peer sent ERROR {zmtp.error_reason(data)!r}")

    def _curve_command(self, conn: _Connection, name: bytes, data: bytes,
                       keys: curve_server.ServerKeys) -> None:
        """The CURVE login: HELLO gets WELCOME; INITIATE, once its boxes open and its key is
        allowed, READY (else libzmq's ERROR, then the connection closes)."""
        if conn.state == HELLO:
            if name != zmtp.HELLO:
                raise zmtp.ZmtpError(f"expected HELLO, got {name!r}")
            welcome, conn.cookie_nonce = curve_server.welcome(data, keys, self._cookies)
            conn.state = INITIATE
            self._write(conn, welcome)
            return
        if name != zmtp.INITIATE:
            raise zmtp.ZmtpError(f"expected INITIATE, got {name!r}")
        initiated = curve_server.initiate(data, keys, self._cookies, conn.cookie_nonce)
        assert isinstance(self.gate, KeyGate)
        if not self.gate.check(initiated.client_key):
            conn.state = CLOSING
            self._write(conn, curve_server.refusal())
            return
        properties = zmtp.parse_metadata(initiated.metadata)
        conn.session = initiated.session
        self._open(conn, properties, initiated.session.ready(self._properties))

    def _open(self, conn: _Connection, properties: dict[str, bytes], ready: bytes) -> None:
        """INITIATE: check the peer's socket type, give it its identity, answer READY."""
        peer_type = properties.get(zmtp.SOCKET_TYPE.lower())
        if peer_type not in PEER_TYPES:
            raise zmtp.ZmtpError(f"a {peer_type!r} socket cannot talk to a ROUTER")
        wanted = properties.get(zmtp.IDENTITY.lower(), b"")
        if wanted and (wanted in self._routes or wanted[0] == 0):
            raise zmtp.ZmtpError("its routing identity is taken (or starts with a zero byte, "
                                 "which is reserved)")
        conn.identity = wanted or self._new_identity()
        self._routes[conn.identity] = conn
        self._handshaking.pop(conn, None)
        conn.state = OPEN
        self._write(conn, ready)


def _tcp_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (an IPv4 or IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name == "nt":  # no other program may bind the same port (as libzmq does)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:  # a restart binds again while the last run's connections linger (TIME_WAIT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock
