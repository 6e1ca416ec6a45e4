"""What the server's two transports share: where a server may listen (loopback unless
CURVE), what a received message looks like to the server (``Inbound``), and the connection
file that tells clients where it is and which key signs the messages.

The transports: ``zmtp_router`` (pure Python, the PLAIN login: the default, loopback) and
``transport`` (libzmq's ROUTER: ``--curve``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from protocol import connection
from protocol.client import BackendError, Client
from protocol.wire import Buffer

log = logging.getLogger("backend.server")

DEFAULT_BIND = "tcp://127.0.0.1:5557"
RECEIVE_BATCH = 64  # messages handed to the server per loop turn, so worker events are not starved


class ServerError(Exception):
    """The server cannot start; the message says what to change."""


@dataclass(frozen=True)
class CurveServer:
    """``--curve``: the server's secret key file and the folder of allowed client ``*.key``."""

    secret_key_file: Path
    allow_dir: Path


@dataclass(frozen=True)
class Inbound:
    """A received message: the sender's routing identity, its first frames (from the
    delimiter on) and how many frames it had after the identity (None: more than
    ``wire.MAX_FRAMES``, how many more not known)."""

    identity: bytes
    frames: list[Buffer]
    count: int | None


def is_local(endpoint: str) -> bool:
    """Whether ``endpoint`` is reachable from this machine only."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    match = re.fullmatch(r"tcp://(.+):([0-9]+|\*)", endpoint)
    if not match:
        return False
    host = match.group(1).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_public_bind(bind: str, curve: CurveServer | None) -> None:
    """``ServerError`` for an address other machines can reach, unless CURVE encrypts."""
    if curve is None and not is_local(bind):
        raise ServerError(f"refusing to bind {bind} without encryption: it is reachable from "
                          "other machines; add --curve (see docs/remote.md) or bind "
                          "tcp://127.0.0.1")


# --- the connection file ----------------------------------------------------------------------
def refuse_if_running(path: Path | None) -> None:
    """Raise ``ServerError`` when ``path`` names a backend that still answers a ping.

    A file others could have swapped (another user's, or writable by others) is not followed:
    it is replaced. One of the user's own that others may read is followed for the ping only;
    if nobody answers it is replaced too. The log says so either way (the new file is 0600 with
    a new key: the old key is worth nothing from then on).
    """
    if path is None or not path.exists():
        return
    try:
        swappable = connection.why_unsafe(path, secret=False)
        if swappable:
            log.warning("%s; replacing it", swappable)
            return
        readable = connection.why_unsafe(path)
        info = connection.read_connection_file(path, private=False)
    except (OSError, ValueError):
        return
    try:
        with Client(info.endpoint, info.key, timeout=0.5, retries=0) as probe:
            probe.ping()
    except BackendError:  # stale file from a backend that is gone
        if readable:
            log.warning("%s; replacing it with a private connection file (mode 600, a new "
                        "key)", readable)
        return
    raise ServerError(f"a backend is already running at {info.endpoint} (pid {info.pid}, "
                      f"connection file {path}); stop it first or give another "
                      "--connection-file")


def write_connection_file(path: Path, endpoint: str, key: bytes,
                          curve_server_key: str | None) -> None:
    try:
        connection.write_connection_file(path, connection.ConnectionInfo(
            endpoint=endpoint, key=key, pid=os.getpid(), curve_server_key=curve_server_key))
    except connection.UnsafeConnectionFile as exc:
        raise ServerError(str(exc)) from None
    except OSError as exc:
        raise ServerError(f"cannot write the connection file {path}: {exc}; give a "
                          "writable --connection-file") from None


def remove_connection_file(path: Path, endpoint: str) -> None:
    """Remove ``path`` if it still describes this process's ``endpoint``."""
    try:
        info = connection.read_connection_file(path)
        if info.pid == os.getpid() and info.endpoint == endpoint:
            path.unlink()
    except (OSError, ValueError):
        pass
