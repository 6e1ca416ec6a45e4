"""The pyzmq transport: libzmq's DEALER socket, logging in with PLAIN or CURVE
(``transport.py`` says when it is used)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import wire
from protocol.transport import PYZMQ, LoginRefused, MechanismMismatch
from protocol.wire import Buffer

if TYPE_CHECKING:
    from protocol.curve import CurveClient

log = logging.getLogger("protocol.client")

HEADER_FRAMES = 5  # delimiter, signature, header, parent, content: small, taken as bytes


class PyzmqDealer:
    """A DEALER socket connected to ``endpoint``; libzmq queues and reconnects by itself."""

    name = PYZMQ

    def __init__(self, endpoint: str, *, username: bytes = b"", password: bytes = b"",
                 curve: CurveClient | None = None, max_frame: int,
                 context: zmq.Context | None = None) -> None:
        self.max_frame = max_frame  # libzmq needs no cap here: the backend is authenticated
        socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        socket.linger = 0
        socket.ipv6 = wire.needs_ipv6(endpoint)
        if curve is not None:
            curve.apply(socket)
        else:
            socket.plain_username = username
            socket.plain_password = password
        # The handshake's outcome: a refused login means a backend with another key; a
        # mechanism mismatch, a backend with CURVE on where we have it off, or the reverse.
        self._monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        try:
            socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self._monitor.close(linger=0)
            socket.close(linger=0)
            raise ValueError(f"cannot connect to {endpoint}: {exc.strerror}") from None
        self._socket: zmq.Socket | None = socket
        self._poller = zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def send(self, frames: Sequence[Buffer]) -> None:
        assert self._socket is not None, "transport is closed"
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.debug("send queue full; a message was not sent")

    def recv(self, timeout: float) -> list[Buffer] | None:
        assert self._socket is not None, "transport is closed"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = dict(self._poller.poll(max(1, int(left * 1000)))) if left > 0 else {}
            if self._monitor in ready:
                self._handshake_failed(recv_monitor_message(self._monitor))
                continue  # a failure that says nothing about the backend: wait on
            if self._socket not in ready:
                return None
            frames = self._socket.recv_multipart(copy=False)
            return [f.bytes if i < HEADER_FRAMES else f.buffer for i, f in enumerate(frames)]

    @staticmethod
    def _handshake_failed(event: dict) -> None:
        """Raise what a failed handshake means: a refused login, or a backend that speaks
        another security mechanism (libzmq's monitor says which failure, not whose
        mechanism). Other protocol failures (a broken connection, say) are retried by
        libzmq and raise nothing."""
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise LoginRefused("the backend refused the login")
        if event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            raise MechanismMismatch("the backend speaks another security mechanism")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._socket = None
            self._monitor.close(linger=0)
