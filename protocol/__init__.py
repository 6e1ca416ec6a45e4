"""The wire protocol between the GIMP plug-in and the backend (see PROTOCOL.md).

Pure Python; needs only pyzmq and msgpack, so it imports in GIMP's own Python.
"""

from __future__ import annotations

from protocol.client import (
    BackendError,
    BackendUnavailable,
    Client,
    ConnectionFileError,
    Event,
    IncompatibleVersion,
    JobFailed,
    JobTimeout,
    WarpResult,
    WrongKey,
)
from protocol.connection import (
    ConnectionInfo,
    UnsafeConnectionFile,
    default_connection_file,
    read_connection_file,
    write_connection_file,
)
from protocol.wire import PROTOCOL_VERSION, Limits, ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "BackendError",
    "BackendUnavailable",
    "Client",
    "ConnectionFileError",
    "ConnectionInfo",
    "Event",
    "IncompatibleVersion",
    "JobFailed",
    "JobTimeout",
    "Limits",
    "ProtocolError",
    "UnsafeConnectionFile",
    "WarpResult",
    "WrongKey",
    "default_connection_file",
    "read_connection_file",
    "write_connection_file",
]
