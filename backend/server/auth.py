"""Who may open a connection at all, as the server's ROUTER (``zmtp_router``) asks: the PLAIN
login's check (``PlainGate``) and CURVE's allow-list (``KeyGate``).

Local mode: a client must log in with ZeroMQ's PLAIN mechanism, its password derived from the
connection file's key (``wire.transport_password``), so a program without the key cannot even
complete the handshake, let alone deliver a message (a keyless flood never reaches the server
loop). CURVE mode: the client's public key must be in the allow-list folder. Denials are counted
(``denied``) for the server's refusal summary; nothing secret is logged.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from protocol import wire

log = logging.getLogger("backend.server")



def plain_login_ok(user: bytes, password: bytes, expected: bytes) -> bool:
    """Whether a PLAIN login (user name, password) is the key holder's."""
    return user == wire.TRANSPORT_USER and hmac.compare_digest(password, expected)


class PlainGate:
    """The PLAIN login for ``zmtp_router``; ``denied`` and ``last_reason`` are read by the
    server's refusal summary."""

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
    the ``*.key`` certificates in ``allow_dir`` (read once, at start); the same counts as
    ``PlainGate``."""

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
