"""The wire protocol between the GIMP plug-in and the backend (see PROTOCOL.md).

Standard library only, so it imports in any GIMP's Python (3.10+): the client speaks ZeroMQ's
wire protocol in pure Python where pyzmq can't load (``transport.py``); msgpack is the small
subset in ``msgpack_codec.py``. Only ``transport_pyzmq`` and ``curve`` import pyzmq, lazily.
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
    "WrongKey",
    "default_connection_file",
    "read_connection_file",
    "write_connection_file",
]
