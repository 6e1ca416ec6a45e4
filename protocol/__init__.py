"""The wire protocol between the GIMP plug-in and the backend (see PROTOCOL.md).

Pure Python; needs only pyzmq and msgpack, so it imports in GIMP's own Python.
"""

from __future__ import annotations

from protocol.client import (
    BackendError,
    BackendUnavailable,
    Client,
    Event,
    IncompatibleVersion,
    JobFailed,
    JobTimeout,
    WrongKey,
)
from protocol.wire import (
    PROTOCOL_VERSION,
    ConnectionInfo,
    Limits,
    ProtocolError,
    default_connection_file,
    read_connection_file,
    write_connection_file,
)

__all__ = [
    "PROTOCOL_VERSION",
    "BackendError",
    "BackendUnavailable",
    "Client",
    "ConnectionInfo",
    "Event",
    "IncompatibleVersion",
    "JobFailed",
    "JobTimeout",
    "Limits",
    "ProtocolError",
    "WrongKey",
    "default_connection_file",
    "read_connection_file",
    "write_connection_file",
]
