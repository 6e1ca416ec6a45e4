"""The server's socket through libzmq: a ROUTER (CURVE for ``--curve``; it can also do the
PLAIN login, which the server leaves to ``zmtp_router``) and its wake-up pair.

libzmq cannot cap how many frames a message has, and its ROUTER hands out one whole message
before the next: a key holder's message of millions of frames delays every other client by
the time libzmq needs to move it (~0.3 µs a frame), at best with ``_discard_rest``. That is
why the server runs ``zmtp_router`` without ``--curve`` and this ROUTER only with it.

Only the socket thread uses a ``Transport``, except ``wake``, which any thread may call.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import re
import socket as pysocket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence

import zmq

from backend.server.auth import ZapGate
from backend.server.endpoint import (
    DEFAULT_BIND,
    RECEIVE_BATCH,
    CurveServer,
    Inbound,
    ServerError,
    refuse_public_bind,
)
from protocol import wire
from protocol.curve import load_keypair
from protocol.wire import Buffer, Limits

log = logging.getLogger("backend.server")

BACKLOG_MESSAGES = 100_000  # room for the messages that arrive while a long one is dropped


class Transport:
    """One ROUTER socket bound to ``bind``, plus a socket pair that wakes its poller."""

    def __init__(self, bind: str, key: bytes, limits: Limits,
                 curve: CurveServer | None = None) -> None:
        self.bind = bind
        self.limits = limits
        self.curve = curve
        self.endpoint = ""
        self.context = zmq.Context()
        self._key = key
        self._socket: zmq.Socket | None = None
        self.gate: ZapGate | None = None
        self._wake_r, self._wake_w = pysocket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = zmq.Poller()
        self.drained_at = time.monotonic()
        self._discards = itertools.count()
        self._backlog: deque[zmq.Socket] = deque()  # read before the ROUTER (_discard_rest)

    def open(self) -> str:
        """Create and bind the socket; return the endpoint clients connect to."""
        refuse_public_bind(self.bind, self.curve)
        sock = self._socket = self.context.socket(zmq.ROUTER)
        sock.ipv6 = wire.needs_ipv6(self.bind)
        sock.linger = 2000
        sock.router_mandatory = 1
        sock.maxmsgsize = self.limits.max_frame_bytes
        if self.curve is not None:
            self._setup_curve(sock)
        else:  # only holders of the connection file's key complete the handshake
            self.gate = ZapGate(self.context, password=wire.transport_password(self._key))
            self.gate.start()
            sock.plain_server = True
        self.endpoint = self._bind(sock)
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        return self.endpoint

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
        self.gate = ZapGate(self.context, allow_dir=self.curve.allow_dir)
        self.gate.start()
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

    def server_public_key(self) -> str | None:
        """The CURVE public key clients need (None without CURVE)."""
        if self.curve is None:
            return None
        return load_keypair(self.curve.secret_key_file)[0].decode("ascii")

    # --- the loop -----------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> None:
        """Wait until a message or a wake-up arrives, or ``timeout_ms`` passes."""
        ready = dict(self._poller.poll(timeout_ms))
        if self._wake_r.fileno() in ready:
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass

    def receive(self) -> Iterator[Inbound]:
        """The waiting messages, at most ``RECEIVE_BATCH`` of them (never blocks).

        At most ``wire.MAX_FRAMES`` frames of a message are read; the rest of a longer one is
        dropped inside libzmq (``_discard_rest``), never one Python call per frame.
        ``drained_at`` is the last time no message was left waiting: every message that arrived
        before it has been read.
        """
        assert self._socket is not None
        for _ in range(RECEIVE_BATCH):
            source = self._backlog[0] if self._backlog else self._socket
            inbound = self._read(source)
            if inbound is not None:
                yield inbound
            elif source is self._socket:
                self.drained_at = time.monotonic()
                return
            else:  # a backlog is read to its end before anything newer
                self._backlog.popleft().close(linger=0)

    def _read(self, source: zmq.Socket) -> Inbound | None:
        """The next message of ``source`` (the ROUTER or a backlog), or None."""
        if not source.poll(0, zmq.POLLIN):
            return None
        identity = source.recv(zmq.NOBLOCK)
        frames: list[Buffer] = []
        while source.rcvmore and len(frames) < wire.MAX_FRAMES:
            frames.append(source.recv(zmq.NOBLOCK, copy=False).buffer)
        if not source.rcvmore:
            return Inbound(identity, frames, len(frames))
        return Inbound(identity, frames, self._discard_rest(source))

    def _discard_rest(self, source: zmq.Socket) -> int | None:
        """Drop the rest of the message being read from ``source`` inside libzmq; return how
        many frames the message had after the identity (None when not known exactly).

        A key holder's message of a million empty frames (2 MB) took 17–19 s to drop with one
        Python call per frame, and every other client waited meanwhile: a ROUTER hands out one
        whole message before the next. Here ``zmq_proxy_steerable`` moves the rest, in C, into
        a PUSH socket with two PULL peers: ``hole``, whose pipe has room for exactly one more
        message (two places, send HWM 1 plus receive HWM 1, one taken beforehand) and is
        first in the PUSH's round robin, so it gets the rest of this message; and ``kept``,
        which gets every whole message the proxy moves after it. Once the proxy's statistics
        show it has moved something (it moves whole messages, this one first), it is told to
        terminate; ``hole`` is closed, which drops the frames inside libzmq, and ``kept``
        becomes a backlog that ``receive`` reads, in order, before the ROUTER.
        """
        name = f"inproc://drag-discard-{id(self)}-{next(self._discards)}"
        sink = self._inproc(zmq.PUSH, f"{name}-sink", bind=True, sndhwm=1)
        hole = self._inproc(zmq.PULL, f"{name}-sink", rcvhwm=1)
        control = self._inproc(zmq.PAIR, f"{name}-control", bind=True)
        steer = self._inproc(zmq.PAIR, f"{name}-control")
        kept: zmq.Socket | None = None
        proxy = threading.Thread(target=zmq.proxy_steerable, name="drag-discard",
                                 args=(source, sink, None, control), daemon=True)
        try:
            sink.send(b"")  # takes one of the hole's two places; the round robin stays on it
            kept = self._inproc(zmq.PULL, f"{name}-sink", rcvhwm=BACKLOG_MESSAGES)
            proxy.start()
            moved = 0
            while not moved and proxy.is_alive():
                steer.send(b"STATISTICS")  # answered between two bursts, never inside one
                if steer.poll(1000):
                    moved = int.from_bytes(steer.recv_multipart()[0], sys.byteorder)
            steer.send(b"TERMINATE")
            proxy.join()
            if source.rcvmore:  # only if the proxy failed: drop the rest the slow way
                log.error("dropping the rest of a long message frame by frame")
                while source.rcvmore:
                    source.recv()
            self._backlog.appendleft(kept)  # older than whatever is left in ``source``
            exact = not kept.poll(0, zmq.POLLIN)  # nothing but this message was moved
            kept = None
            return wire.MAX_FRAMES + moved if exact else None
        finally:
            for sock in (sink, hole, control, steer, kept):
                if sock is not None:
                    sock.close(linger=0)

    def _inproc(self, kind: int, endpoint: str, *, bind: bool = False,
                **options: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        for option, value in options.items():
            setattr(sock, option, value)
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
        return sock

    def send(self, identity: bytes, frames: Sequence[Buffer], what: str) -> None:
        """Send without blocking; a client that is gone or not reading loses the message."""
        assert self._socket is not None
        try:
            self._socket.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, zmq.EAGAIN):
                raise
            log.debug("dropped %s for %s: %s", what, identity.hex()[:8], exc.strerror)

    def wake(self) -> None:
        """Make ``poll`` return now (thread- and signal-safe)."""
        with contextlib.suppress(OSError):  # buffer full (already awake) or closed
            self._wake_w.send(b"!")

    def close(self, term: bool) -> None:
        """Close the sockets (queued messages still go out within the linger time); ``term``
        also ends the ZeroMQ context (only when no other thread uses it)."""
        while self._backlog:
            self._backlog.pop().close(linger=0)
        if self._socket is not None:
            self._socket.close()
        if self.gate is not None:
            self.gate.stop()
        self._wake_r.close()
        self._wake_w.close()
        if term:
            self.context.term()
