"""ZMTP 3.1, ZeroMQ's wire protocol (rfc.zeromq.org specs 23 and 37), as bytes: the greeting,
frames, commands, metadata and the PLAIN mechanism's commands, plus a frame parser that reads
large frames straight into their own buffer. No sockets here (``transport_zmtp`` has them).

A connection starts with a 64-byte greeting each way::

    signature  0xFF, 8 bytes of padding (libzmq: 7 × 0x00, 0x01), 0x7F   (10 bytes)
    version    major 3, minor 1                                           (2 bytes)
    mechanism  "PLAIN" padded with NUL bytes                             (20 bytes)
    as-server  1 for the side that checks the login, else 0              (1 byte)
    filler     31 × 0x00

then the mechanism's handshake (PLAIN: client HELLO username/password, server WELCOME or
ERROR, client INITIATE with its metadata, server READY with its own), then frames:
a flags byte (bit 0 MORE: another frame of this message follows; bit 1 LONG: the size is
8 bytes, else 1; bit 2 COMMAND), the size (big-endian), the body. A command's body is its
name (one length byte, then ASCII) and its data.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MORE, LONG, COMMAND = 0x01, 0x02, 0x04
SIGNATURE = b"\xff" + bytes(7) + b"\x01\x7f"
VERSION = (3, 1)
GREETING_SIZE = 64
# The signature and version: what a peer may send before it has read the other's greeting.
# libzmq sends the rest of its own greeting (its mechanism) once it has read these bytes of
# ours, but a peer whose whole greeting came at once, naming a mechanism it does not speak,
# is dropped before libzmq has written its mechanism: a client sends the rest of its greeting
# only after reading the backend's, so that the backend's mechanism always arrives.
GREETING_HEAD = len(SIGNATURE) + len(VERSION)
PLAIN, NULL, CURVE = b"PLAIN", b"NULL", b"CURVE"
# Commands: what a DEALER may meet, and what this module builds.
HELLO, WELCOME, INITIATE, READY, ERROR = b"HELLO", b"WELCOME", b"INITIATE", b"READY", b"ERROR"
PING, PONG = b"PING", b"PONG"
SOCKET_TYPE, IDENTITY = "Socket-Type", "Identity"
# libzmq (4.2.5 and later, still so in 4.3.5) writes the PLAIN ERROR command's name as the C
# literal "\x05ERROR", whose hex escape swallows the "E": 0x5E, "RROR". Its own client
# expects the same bytes, so a refused login looks like this on the wire.
LIBZMQ_ERROR = b"\x5eRROR"
MAX_COMMAND_BYTES = 2**16  # handshakes and heartbeats are small; a larger command is refused
LARGE_FRAME = 2**16  # bodies at least this big are read into a buffer of their own

_SHORT = struct.Struct(">BB")
_LONG = struct.Struct(">BQ")


class ZmtpError(Exception):
    """The peer broke ZMTP (or spoke an incompatible version or mechanism)."""


# --- greeting ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Greeting:
    version: tuple[int, int]
    mechanism: bytes
    as_server: bool


def greeting(mechanism: bytes, as_server: bool) -> bytes:
    """Our 64-byte greeting."""
    if len(mechanism) > 20:
        raise ValueError(f"mechanism name {mechanism!r} is longer than 20 bytes")
    return (SIGNATURE + bytes(VERSION) + mechanism.ljust(20, b"\0")
            + bytes((1 if as_server else 0,)) + bytes(31))


def parse_greeting(data: bytes) -> Greeting:
    """The peer's greeting; ``ZmtpError`` unless it is ZMTP 3.x."""
    if len(data) != GREETING_SIZE:
        raise ZmtpError(f"a greeting has {GREETING_SIZE} bytes, got {len(data)}")
    if data[0] != 0xFF or not data[9] & 0x01:
        raise ZmtpError("the peer does not speak ZMTP (bad greeting signature)")
    major, minor = data[10], data[11]
    if major < 3:
        raise ZmtpError(f"the peer speaks ZMTP {major}.{minor}; version 3 or newer is needed")
    return Greeting((major, minor), data[12:32].rstrip(b"\0"), data[32] == 1)


# --- frames ------------------------------------------------------------------------------------
def frame_header(size: int, flags: int = 0) -> bytes:
    """Flags and size of one frame (``flags``: MORE and/or COMMAND; LONG is set here)."""
    if size > 0xFF:
        return _LONG.pack(flags | LONG, size)
    return _SHORT.pack(flags, size)


def message_chunks(frames: Sequence[bytes | bytearray | memoryview]) -> list[memoryview | bytes]:
    """The bytes of one message of ``frames`` to write in order: small frames are joined with
    their headers into few chunks; a large frame stays the caller's buffer (no copy)."""
    chunks: list[memoryview | bytes] = []
    pending: list[bytes | memoryview] = []
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        view = memoryview(frame).cast("B")
        pending.append(frame_header(view.nbytes, MORE if index < last else 0))
        if view.nbytes >= LARGE_FRAME:
            chunks.append(b"".join(pending))
            chunks.append(view)
            pending = []
        else:
            pending.append(view)
    if pending:
        chunks.append(b"".join(pending))
    return chunks


# --- commands ------------------------------------------------------------------------------------
def command(name: bytes, data: bytes = b"") -> bytes:
    """One command frame: header, name, data."""
    body = bytes((len(name),)) + name + data
    return frame_header(len(body), COMMAND) + body


def parse_command(body: bytes) -> tuple[bytes, bytes]:
    """(name, data) of a command frame's body (libzmq's misspelt ERROR included)."""
    if bytes(body[:len(LIBZMQ_ERROR)]) == LIBZMQ_ERROR:
        return ERROR, bytes(body[len(LIBZMQ_ERROR):])
    if not body or len(body) < 1 + body[0]:
        raise ZmtpError("a command frame is shorter than its name")
    return bytes(body[1:1 + body[0]]), bytes(body[1 + body[0]:])


def metadata(properties: Iterable[tuple[str, bytes]]) -> bytes:
    """Properties as READY/INITIATE carry them: name (1-byte length) and value (4-byte)."""
    out = b""
    for name, value in properties:
        raw = name.encode("ascii")
        out += bytes((len(raw),)) + raw + struct.pack(">I", len(value)) + value
    return out


def parse_metadata(data: bytes) -> dict[str, bytes]:
    """Properties by lower-case name (ZMTP names are case-insensitive)."""
    properties: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        size = data[pos]
        name_end = pos + 1 + size
        if name_end + 4 > len(data):
            raise ZmtpError("truncated metadata property")
        (value_size,) = struct.unpack_from(">I", data, name_end)
        value_end = name_end + 4 + value_size
        if value_end > len(data):
            raise ZmtpError("truncated metadata value")
        name = data[pos + 1:name_end].decode("ascii", "replace").lower()
        properties[name] = bytes(data[name_end + 4:value_end])
        pos = value_end
    return properties


def plain_hello(username: bytes, password: bytes) -> bytes:
    """The PLAIN mechanism's HELLO command frame."""
    if len(username) > 255 or len(password) > 255:
        raise ValueError("PLAIN user names and passwords have at most 255 bytes")
    return command(HELLO, bytes((len(username),)) + username + bytes((len(password),)) + password)


def parse_plain_hello(data: bytes) -> tuple[bytes, bytes]:
    """(username, password) from a HELLO command's data (the server's side)."""
    if not data or len(data) < 2 + data[0]:
        raise ZmtpError("truncated PLAIN HELLO")
    user = data[1:1 + data[0]]
    rest = data[1 + data[0]:]
    if len(rest) != 1 + rest[0]:
        raise ZmtpError("malformed PLAIN HELLO password")
    return bytes(user), bytes(rest[1:])


def plain_refusal(status: bytes = b"400") -> bytes:
    """The ERROR command that refuses a PLAIN login, spelt as libzmq spells it
    (``LIBZMQ_ERROR``), so that libzmq's own clients see their login refused (the server's
    side)."""
    return frame_header(len(LIBZMQ_ERROR) + 1 + len(status), COMMAND) + LIBZMQ_ERROR + bytes(
        (len(status),)) + status


def error_reason(data: bytes) -> str:
    """The reason an ERROR command gives (one length byte, then text)."""
    return bytes(data[1:1 + data[0]]).decode("utf-8", "replace") if data else ""


def pong_for(ping_data: bytes) -> bytes:
    """The PONG command frame that answers a PING (ZMTP 3.1: TTL, then the context to echo)."""
    return command(PONG, bytes(ping_data[2:]))


# --- reading frames ------------------------------------------------------------------------------
@dataclass
class Frame:
    flags: int
    body: bytes | bytearray

    @property
    def more(self) -> bool:
        return bool(self.flags & MORE)

    @property
    def is_command(self) -> bool:
        return bool(self.flags & COMMAND)


class FrameParser:
    """Turns the bytes a peer sends into frames, without copying large bodies twice.

    Use: ``n = sock.recv_into(parser.buffer())``, then ``parser.advance(n)`` returns the
    frames completed so far. Small frames are cut out of a staging buffer; a large frame's
    body gets a ``bytearray`` of its own size that the socket then fills directly. A frame
    over ``max_frame`` bytes (or a command over ``MAX_COMMAND_BYTES``), reserved flag bits or
    a command with MORE raise ``ZmtpError``: the connection must then be dropped.
    """

    def __init__(self, max_frame: int, staging: int = 4 * LARGE_FRAME) -> None:
        self.max_frame = max_frame
        self._staging = bytearray(staging)
        self._view = memoryview(self._staging)
        self._start = self._end = 0  # unparsed bytes: staging[start:end]
        self._body: bytearray | None = None  # the large frame being filled, its flags and fill
        self._body_flags = 0
        self._filled = 0

    @property
    def mid_frame(self) -> bool:
        """Whether bytes of an unfinished frame are held (the peer stopped mid-frame)."""
        return self._body is not None or self._end > self._start

    def buffer(self) -> memoryview:
        """Where the next bytes from the socket go."""
        if self._body is not None:
            return memoryview(self._body)[self._filled:]
        if self._start:
            held = self._end - self._start
            self._staging[:held] = bytes(self._view[self._start:self._end])
            self._start, self._end = 0, held
        return self._view[self._end:]

    def advance(self, count: int) -> list[Frame]:
        """Account ``count`` bytes written into ``buffer()``; the frames now complete."""
        if self._body is not None:
            self._filled += count
            if self._filled < len(self._body):
                return []
            frame = Frame(self._body_flags, self._body)
            self._body = None
            return [frame]
        self._end += count
        return self._parse()

    def _parse(self) -> list[Frame]:
        frames: list[Frame] = []
        while self._end - self._start >= 2:
            flags = self._staging[self._start]
            if flags & ~(MORE | LONG | COMMAND):
                raise ZmtpError(f"reserved frame flag bits set (0x{flags:02x})")
            if flags & COMMAND and flags & MORE:
                raise ZmtpError("a command frame cannot have MORE set")
            header = _LONG if flags & LONG else _SHORT
            if self._end - self._start < header.size:
                break
            size = header.unpack_from(self._staging, self._start)[1]
            limit = MAX_COMMAND_BYTES if flags & COMMAND else self.max_frame
            if size > limit:
                raise ZmtpError(f"the peer sent a {'command' if flags & COMMAND else 'frame'} "
                                f"of {size} bytes; at most {limit} are accepted")
            body_start = self._start + header.size
            held = min(self._end - body_start, size)
            if size >= LARGE_FRAME:  # a buffer of its own; the socket fills the rest directly
                body = bytearray(size)
                body[:held] = self._view[body_start:body_start + held]
                self._start = body_start + held
                if held < size:
                    self._body, self._body_flags, self._filled = body, flags, held
                    break
                frames.append(Frame(flags, body))
            elif held == size:
                frames.append(Frame(flags, bytes(self._view[body_start:body_start + size])))
                self._start = body_start + size
            else:
                break  # wait for the rest of a small frame
        return frames
