"""How the client's frames reach the backend's ROUTER socket: one small interface, two
implementations, and the rule that picks one (PROTOCOL.md section 1).

- ``pyzmq``: libzmq's DEALER socket through pyzmq (``transport_pyzmq``); PLAIN or CURVE.
- ``zmtp``: the same ZMTP 3.1 conversation in pure Python (``transport_zmtp``); PLAIN only.
  It is what the plug-in uses where pyzmq can't load: GIMP's MSYS2 Python on Windows, its
  hardened-runtime Python on macOS.

``auto`` (the default) takes pyzmq where it imports and the pure transport elsewhere; CURVE
needs pyzmq. ``DRAG_DIFFUSION_TRANSPORT`` (or ``Client(transport=...)``) forces one. This
module imports nothing outside the standard library; the client opens the chosen one.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Protocol

from protocol.wire import Buffer

TRANSPORT_ENV = "DRAG_DIFFUSION_TRANSPORT"
PYZMQ, ZMTP, AUTO = "pyzmq", "zmtp", "auto"
CHOICES = (AUTO, PYZMQ, ZMTP)


class LoginRefused(Exception):
    """The backend refused our login (its ZAP handler said no): a backend with another key."""


class MechanismMismatch(LoginRefused):
    """The backend speaks another security mechanism than ours: CURVE where we log in with
    PLAIN, or the reverse (a connection file from before or after the backend's ``--curve``).
    ``theirs`` names its mechanism where the handshake shows it (``CURVE``), else is empty."""

    def __init__(self, message: str, theirs: str = "") -> None:
        super().__init__(message)
        self.theirs = theirs


class TransportUnavailable(ValueError):
    """The transport asked for (or needed) cannot run in this Python; the message says why
    and what to do instead."""


class Transport(Protocol):
    """A connection to one backend, reconnecting on its own (as a ZeroMQ socket does)."""

    name: str
    max_frame: int  # the largest frame accepted from the backend

    def send(self, frames: Sequence[Buffer]) -> None:
        """Send one message, or queue it until connected; never waits for the backend."""

    def recv(self, timeout: float) -> list[Buffer] | None:
        """The next message's frames within ``timeout`` seconds, else None. Raises
        ``LoginRefused`` when the backend refused our login, ``MechanismMismatch`` (one kind
        of it) when the backend speaks another security mechanism."""

    def close(self) -> None:
        """Drop the connection and anything not yet sent."""


def pyzmq_problem() -> str | None:
    """Why pyzmq can't be used in this Python (None: it can)."""
    try:
        importlib.import_module("zmq")
    except (ImportError, OSError) as exc:  # missing, or a wheel this Python cannot load
        return f"{type(exc).__name__}: {exc}"
    return None


def choose(requested: str | None = None, *, curve: bool = False) -> str:
    """``pyzmq`` or ``zmtp``: the argument, else ``$DRAG_DIFFUSION_TRANSPORT``, else auto.

    Raises ``TransportUnavailable`` for an unknown name, a forced pyzmq that does not load,
    and CURVE without pyzmq (or with the pure transport forced).
    """
    name = (requested or os.environ.get(TRANSPORT_ENV) or AUTO).strip().lower()
    if name not in CHOICES:
        raise TransportUnavailable(f"unknown transport {name!r} (from {TRANSPORT_ENV} or the "
                                   f"client's settings); use one of {', '.join(CHOICES)}")
    if name == ZMTP and curve:
        raise TransportUnavailable(
            "the backend uses CURVE encryption, which only the pyzmq transport speaks; unset "
            f"{TRANSPORT_ENV}={ZMTP}")
    if name == ZMTP:
        return ZMTP
    problem = pyzmq_problem()
    if problem is None:
        return PYZMQ
    if curve:
        raise TransportUnavailable(
            "the backend uses CURVE encryption, which needs pyzmq, and pyzmq does not load in "
            f"this Python ({problem}); install pyzmq for it, or run the backend on its machine "
            "without --curve (loopback) and reach it through an SSH tunnel (ssh -L "
            "5557:127.0.0.1:5557 HOST) with that backend's connection file (see PROTOCOL.md, "
            "section 6)")
    if name == PYZMQ:
        raise TransportUnavailable(f"{TRANSPORT_ENV}={PYZMQ} but pyzmq does not load in this "
                                   f"Python ({problem}); unset it to use the pure-Python "
                                   "transport")
    return ZMTP
