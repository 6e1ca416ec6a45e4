"""Who may open a connection at all: the PLAIN login's check (``PlainGate``, which the pure
ZMTP router asks) and the ZAP handler of a libzmq ROUTER's context (``ZapGate``, RFC 27).

Local mode: a client must log in with ZeroMQ's PLAIN mechanism, its password derived from the
connection file's key (``wire.transport_password``), so a program without the key cannot even
complete the handshake, let alone deliver a message (a keyless flood never reaches the server
loop). CURVE mode: the client's public key must be in the allow-list folder. Denials are counted
(``denied``) for the server's refusal summary; nothing secret is logged.
"""

from __future__ import annotations

import hmac
import logging
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from protocol import wire

log = logging.getLogger("backend.server")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_VERSION = b"1.0"


def plain_login_ok(user: bytes, password: bytes, expected: bytes) -> bool:
    """Whether a PLAIN login (user name, password) is the key holder's."""
    return user == wire.TRANSPORT_USER and hmac.compare_digest(password, expected)


class PlainGate:
    """The PLAIN login for ``zmtp_router``: the same check as ``ZapGate``'s and the same
    counts (``denied``, ``last_reason``), without ZeroMQ."""

    def __init__(self, password: bytes) -> None:
        self.password = password
        self.denied = 0  # logins refused so far
        self.last_reason = ""

    def check(self, user: bytes, password: bytes) -> bool:
        if plain_login_ok(user, password, self.password):
            return True
        self.denied += 1
        self.last_reason = "wrong key"
        return False


class KeyGate:
    """The CURVE check for ``zmtp_router``: the client's long-term public key must be one of
    the ``*.key`` certificates in ``allow_dir`` (read once, as ``ZapGate`` reads them); the
    same counts as ``PlainGate``."""

    def __init__(self, allow_dir: Path) -> None:
        self.allowed_keys = load_allow_list(allow_dir)
        self.denied = 0
        self.last_reason = ""

    def check(self, client_key: bytes) -> bool:
        if client_key in self.allowed_keys:
            return True
        self.denied += 1
        self.last_reason = "client key not in the allow-list"
        return False


def load_allow_list(allow_dir: Path) -> set[bytes]:
    """The raw (32-byte) public keys of the ``*.key`` certificates in ``allow_dir``."""
    return {z85.decode(key) for key in zmq.auth.load_certificates(str(allow_dir))}


class ZapGate:
    """A thread answering ZAP requests for one context: PLAIN with ``password``, or CURVE
    with the public keys found in ``allow_dir``."""

    def __init__(self, context: zmq.Context, *, password: bytes | None = None,
                 allow_dir: Path | None = None) -> None:
        self.context = context
        self.password = password
        self.allowed_keys: set[bytes] = set()
        if allow_dir is not None:
            self.allowed_keys = load_allow_list(allow_dir)
        self.denied = 0  # handshakes refused so far (read by the socket thread)
        self.last_reason = ""
        self._stop = threading.Event()
        self._socket = context.socket(zmq.REP)
        self._socket.linger = 0
        self._socket.bind(ZAP_ENDPOINT)  # before any server socket binds
        self._thread = threading.Thread(target=self._serve, name="zap-gate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(100):
                continue
            request = self._socket.recv_multipart()
            ok, reason = self.check(request)
            if not ok:
                self.denied += 1
                self.last_reason = reason
            request_id = request[1] if len(request) > 1 else b""
            self._socket.send_multipart([_VERSION, request_id, b"200" if ok else b"400",
                                         b"OK" if ok else reason.encode(),
                                         b"client" if ok else b"", b""])

    def check(self, request: list[bytes]) -> tuple[bool, str]:
        """(allowed, reason) for one ZAP request: version, id, domain, address, routing id,
        mechanism, credentials…"""
        if len(request) < 6 or request[0] != _VERSION:
            return False, "malformed ZAP request"
        mechanism, credentials = request[5], request[6:]
        if mechanism == b"PLAIN" and self.password is not None and len(credentials) == 2:
            if plain_login_ok(*credentials, self.password):
                return True, ""
            return False, "wrong key"
        if mechanism == b"CURVE" and self.allowed_keys and len(credentials) == 1:
            if credentials[0] in self.allowed_keys:
                return True, ""
            return False, "client key not in the allow-list"
        return False, f"mechanism {mechanism.decode('ascii', 'replace')[:10]} not accepted"
