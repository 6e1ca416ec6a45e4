"""The wire protocol of ``PROTOCOL.md``: envelope, signing, replay guard, codec, validation.

Standard library only (msgpack through ``msgpack_codec``); no ZeroMQ here, so both sides (and
tests) can build and parse frames without sockets. Section numbers refer to ``PROTOCOL.md``.
Over 450 lines on purpose: it is the one module that implements that document (sections 1–5),
kept whole beside it so the two can be read side by side; only the connection file (section 7)
lives apart, in ``connection.py``.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
import re
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from protocol import msgpack_codec

PROTOCOL_VERSION = "1.3"
DELIMITER = b"<DRAG|MSG>"
SIGNATURE_SCHEME = "hmac-sha256"
_SIGNATURE_PREFIX = b"DRAG1"
_HEX = re.compile(rb"[0-9a-f]{64}\Z")
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_VERSION = re.compile(r"([0-9]{1,4})\.([0-9]{1,4})\Z")  # ASCII digits only, unlike \d

Buffer = bytes | bytearray | memoryview

# --- message types (section 4) -------------------------------------------------------------
HELLO, HELLO_REPLY = "hello", "hello_reply"
SUBMIT, SUBMIT_REPLY = "submit", "submit_reply"
ATTACH, ATTACH_REPLY = "attach", "attach_reply"
CANCEL, CANCEL_REPLY = "cancel", "cancel_reply"
PING, PONG = "ping", "pong"
SHUTDOWN, SHUTDOWN_REPLY = "shutdown", "shutdown_reply"
WARP, WARP_REPLY = "warp", "warp_reply"  # 1.1: Inpaint4Drag's warp alone, for previews
# 1.2: LoRA and inversion of an image while the dialog is open, ended by ``prepared``
PREPARE, PREPARE_REPLY, PREPARED = "prepare", "prepare_reply", "prepared"
DOWNLOAD, DOWNLOAD_REPLY = "download", "download_reply"  # 1.3: fetch a catalogue model set
ERROR = "error"
QUEUED, STARTED, PROGRESS, PREVIEW = "queued", "started", "progress", "preview"
FINISHED, CANCELLED = "finished", "cancelled"
INSTALLED = "installed"  # 1.3: a download's terminal event (its set is in place and loaded)

REQUESTS = (HELLO, SUBMIT, ATTACH, CANCEL, PING, SHUTDOWN, WARP, PREPARE, DOWNLOAD)
EVENTS = (QUEUED, STARTED, PROGRESS, PREVIEW, FINISHED, CANCELLED, ERROR, PREPARED,
          INSTALLED)
TERMINAL_EVENTS = (FINISHED, CANCELLED, ERROR, PREPARED, INSTALLED)

# --- error codes (section 5) ---------------------------------------------------------------
BAD_MESSAGE = "bad_message"
BAD_SIGNATURE = "bad_signature"
REPLAYED = "replayed"
INCOMPATIBLE_VERSION = "incompatible_version"
UNKNOWN_MESSAGE_TYPE = "unknown_message_type"
INVALID_INPUT = "invalid_input"
QUEUE_FULL = "queue_full"
UNKNOWN_JOB = "unknown_job"
JOB_ID_CONFLICT = "job_id_conflict"
RESULT_EXPIRED = "result_expired"
SHUTTING_DOWN = "shutting_down"
MODEL_NOT_FOUND = "model_not_found"
OUT_OF_MEMORY = "out_of_memory"
ENGINE_ERROR = "engine_error"
INTERNAL_ERROR = "internal_error"
DOWNLOAD_FAILED = "download_failed"  # 1.3
ERROR_CODES = (BAD_MESSAGE, BAD_SIGNATURE, REPLAYED, INCOMPATIBLE_VERSION,
               UNKNOWN_MESSAGE_TYPE, INVALID_INPUT, QUEUE_FULL, UNKNOWN_JOB, JOB_ID_CONFLICT,
               RESULT_EXPIRED, SHUTTING_DOWN, MODEL_NOT_FOUND, OUT_OF_MEMORY, ENGINE_ERROR,
               INTERNAL_ERROR, DOWNLOAD_FAILED)

# msgpack container limits for header/parent/content frames (section 2, step 3).
MAX_MAP_LEN = 256
MAX_ARRAY_LEN = 1024
MAX_BUFFERS = 2
MAX_SEED = 2**63

# Pixel sample types (section 3): wire name -> bytes per sample. Multi-byte samples are
# little-endian; ``f32`` is nominally 0–1 and may exceed it.
PIXEL_DTYPES = {"u8": 1, "u16": 2, "f32": 4}


class ProtocolError(Exception):
    """A message broke the protocol; ``code`` is one of ``ERROR_CODES``."""

    def __init__(self, code: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail
        self.header: dict[str, Any] | None = None  # the offending header, once it was verified

    def content(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}


@dataclass(frozen=True)
class Limits:
    """Section 3. The server reports its own values in ``hello_reply.limits``."""

    max_side: int = 8192
    max_pixels: int = 64 * 2**20
    max_frame_bytes: int = 256 * 2**20
    max_points: int = 64
    max_prompt_chars: int = 1000
    max_queue: int = 32
    max_field_bytes: int = 2**20
    max_warp_pixels: int = 2**22  # largest width × height of a warp request (4 Mpx, 1.1)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Message:
    """A received, verified and decoded message."""

    msg_type: str
    header: dict[str, Any]
    parent: dict[str, Any]
    content: dict[str, Any]
    buffers: list[Buffer] = field(default_factory=list)
    signature: bytes = b""
    # SHA-256 over the content frame and the buffers' digests: what a duplicate submit must match.
    fingerprint: bytes = b""
    digests: list[bytes] = field(default_factory=list)  # SHA-256 of each buffer (signed)

    @property
    def msg_id(self) -> str:
        return self.header["msg_id"]

    @property
    def session(self) -> str:
        return self.header["session"]

    @property
    def job_id(self) -> str | None:
        return self.header.get("job_id")


def new_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_JOB_ID.match(value))


def parse_version(version: Any) -> tuple[int, int]:
    match = _VERSION.match(version) if isinstance(version, str) else None
    if not match:
        raise ProtocolError(BAD_MESSAGE, f"malformed protocol version {version!r}",
                            "expected 'MAJOR.MINOR'")
    return int(match.group(1)), int(match.group(2))


def check_version(theirs: str, ours: str = PROTOCOL_VERSION, peer: str = "the peer",
                  me: str = "this side") -> None:
    """Raise ``incompatible_version`` unless ``theirs`` has the MAJOR version of ``ours``."""
    if parse_version(theirs)[0] != parse_version(ours)[0]:
        raise ProtocolError(
            INCOMPATIBLE_VERSION,
            f"{peer} speaks protocol {theirs} but {me} speaks protocol {ours}; "
            "install the same release of the GIMP plug-in and the backend",
        )


# --- transport login (section 6) --------------------------------------------------------------
TRANSPORT_USER = b"drag-diffusion"
MAX_FRAMES = 5 + MAX_BUFFERS  # frames of a message after the routing identity


def needs_ipv6(endpoint: str) -> bool:
    """Whether ``endpoint`` names an IPv6 address (``tcp://[::1]:5557``): its socket needs
    ``ZMQ_IPV6``, without which libzmq reports "No such device"."""
    return endpoint.startswith("tcp://[")


def transport_password(key: bytes) -> bytes:
    """The PLAIN password a local client logs in with: derived from the HMAC key, so only a
    holder of the connection file can connect, and the key itself never crosses the wire."""
    return hmac.new(key, b"DRAG1 transport login", hashlib.sha256).hexdigest().encode("ascii")


# --- signing (section 2) --------------------------------------------------------------------
def signature(key: bytes, header: Buffer, parent: Buffer, content: Buffer,
              buffers: Sequence[Buffer] = ()) -> tuple[bytes, list[bytes]]:
    """Return (hex signature, buffer digests) for the frames after the signature frame."""
    mac = hmac.new(key, _SIGNATURE_PREFIX, hashlib.sha256)
    mac.update(struct.pack(">I", 3 + len(buffers)))
    for frame in (header, parent, content):
        mac.update(struct.pack(">Q", len(frame)))
        mac.update(frame)
    digests = [hashlib.sha256(buf).digest() for buf in buffers]
    for digest in digests:
        mac.update(digest)
    return mac.hexdigest().encode("ascii"), digests


class ReplayGuard:
    """Refuses a signature seen before, and a message dated more than ``window`` seconds before
    this machine's clock or more than ``future`` seconds after it (section 2, step 4).

    It remembers every signature whose time is inside the window, up to ``capacity`` of them.
    When it must forget one early (more than ``capacity`` messages in the window), it keeps the
    forgotten time as a floor for that message's session only, and refuses that session's
    messages not newer than its floor. A sender can therefore raise only its own session's
    floor, never another's, and no further ahead than ``future`` seconds past the clock: no
    sender can make the guard refuse another session's messages. A floor is dropped once its
    time has left the window (the window refuses those messages then). At most ``capacity``
    floors are kept; past that (more than ``capacity`` sessions each with a signature forgotten
    early, within one window) the least recently raised floor is dropped.
    """

    def __init__(self, window: float = 300.0, capacity: int = 65536,
                 clock: Callable[[], float] = time.time, future: float = 10.0) -> None:
        self.window = window
        self.future = min(future, window)
        self.capacity = capacity
        self._clock = clock
        self._seen: set[bytes] = set()
        self._heap: list[tuple[float, bytes, str]] = []
        self._floors: OrderedDict[str, float] = OrderedDict()  # session -> floor

    def check(self, sig: bytes, sent: float, session: str = "") -> None:
        now = self._clock()
        if sent < now - self.window or sent > now + self.future:
            ahead = sent > now
            raise ProtocolError(
                REPLAYED, "message time is too far from this machine's clock",
                f"sent {sent:.3f}, now {now:.3f}: {abs(sent - now):.1f} s "
                f"{'ahead' if ahead else 'behind'}, at most "
                f"{self.future if ahead else self.window:g} s allowed; synchronise the clocks",
            )
        if sig in self._seen or sent <= self._floors.get(session, -math.inf):
            raise ProtocolError(REPLAYED, "message refused: it was already received (replay)")
        self._seen.add(sig)
        heapq.heappush(self._heap, (sent, sig, session))
        self._forget(now)

    def _forget(self, now: float) -> None:
        """Drop signatures that left the window, then the oldest beyond ``capacity`` (raising
        their sessions' floors), then floors that left the window or exceed ``capacity``."""
        oldest = now - self.window
        while self._heap and (self._heap[0][0] < oldest or len(self._seen) > self.capacity):
            old_time, old_sig, old_session = heapq.heappop(self._heap)
            self._seen.discard(old_sig)
            if old_time >= oldest:
                floor = max(self._floors.pop(old_session, -math.inf), old_time)
                self._floors[old_session] = floor  # most recently raised last
        while self._floors and (len(self._floors) > self.capacity
                                or next(iter(self._floors.values())) < oldest):
            self._floors.popitem(last=False)


# --- the codec --------------------------------------------------------------------------------
def _pack(obj: Any) -> bytes:
    return msgpack_codec.pack(obj)


def _unpack(frame: Buffer, what: str) -> dict[str, Any]:
    try:
        obj = msgpack_codec.unpack(frame, max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN)
    except msgpack_codec.DecodeError as exc:
        raise ProtocolError(BAD_MESSAGE, f"the {what} frame is not valid msgpack",
                            f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_MESSAGE, f"the {what} frame must be a msgpack map",
                            f"got {type(obj).__name__}")
    return obj


class Session:
    """Builds and parses signed messages for one peer (one client object, or the server)."""

    def __init__(self, key: bytes, *, me: str, peer: str, session_id: str | None = None,
                 replay: ReplayGuard | None = None, max_field_bytes: int = Limits.max_field_bytes,
                 clock: Callable[[], float] = time.time) -> None:
        if not key:
            raise ValueError("an HMAC key is required")
        self.key = key
        self.me, self.peer = me, peer  # for messages, e.g. "this backend", "the plug-in"
        self.version = PROTOCOL_VERSION
        self.session_id = session_id or new_id()
        self.replay = replay or ReplayGuard(clock=clock)
        self.max_field_bytes = max_field_bytes
        self._clock = clock

    def header(self, msg_type: str, job_id: str | None = None) -> dict[str, Any]:
        return {"msg_id": new_id(), "msg_type": msg_type, "version": self.version,
                "session": self.session_id, "time": self._clock(), "job_id": job_id}

    def serialize(self, msg_type: str, content: dict[str, Any], *,
                  parent: dict[str, Any] | None = None, job_id: str | None = None,
                  buffers: Sequence[Buffer] = ()) -> tuple[dict[str, Any], list[Buffer]]:
        """Return (header, frames starting at the delimiter)."""
        header = self.header(msg_type, job_id)
        h, p, c = _pack(header), _pack(parent or {}), _pack(content)
        sig, _ = signature(self.key, h, p, c, buffers)
        return header, [DELIMITER, sig, h, p, c, *buffers]

    def parse(self, frames: Sequence[Buffer]) -> Message:
        """Verify and decode frames starting at the delimiter (section 2, steps 1–5).

        Content fields are checked separately by ``check_content``.
        """
        if len(frames) < 5 or len(frames[0]) != len(DELIMITER) or bytes(frames[0]) != DELIMITER:
            raise ProtocolError(BAD_MESSAGE, "malformed message: expected the <DRAG|MSG> "
                                "delimiter, a signature, header, parent and content frames",
                                f"got {len(frames)} frames")
        if len(frames) > MAX_FRAMES:
            raise too_many_frames(len(frames))
        sig, h, p, c, *buffers = frames[1:]
        for name, frame in (("header", h), ("parent", p), ("content", c)):
            if len(frame) > self.max_field_bytes:
                raise ProtocolError(BAD_MESSAGE, f"the {name} frame is too large",
                                    f"{len(frame)} > {self.max_field_bytes} bytes")
        if len(sig) != 64 or not _HEX.match(bytes(sig)):
            raise ProtocolError(BAD_SIGNATURE, "message is not signed: the signature frame must "
                                "be 64 lower-case hex digits")
        sig = bytes(sig)
        expected, digests = signature(self.key, h, p, c, buffers)
        if not hmac.compare_digest(sig, expected):
            raise ProtocolError(BAD_SIGNATURE, "bad message signature: the key does not match "
                                "(is the connection file out of date?)")
        header = _unpack(h, "header")
        _check_header(header)
        try:
            self.replay.check(sig, header["time"], header["session"])
            check_version(header["version"], self.version, self.peer, self.me)
            parent = _unpack(p, "parent")
            content = _unpack(c, "content")
        except ProtocolError as exc:
            exc.header = header
            raise
        fingerprint = hashlib.sha256(bytes(c) + b"".join(digests)).digest()
        return Message(header["msg_type"], header, parent, content, list(buffers), sig,
                       fingerprint, digests)


def too_many_frames(count: int | None) -> ProtocolError:
    """``count`` frames (None: more than ``MAX_FRAMES``, how many more unknown)."""
    return ProtocolError(BAD_MESSAGE, f"too many frames ({count or f'over {MAX_FRAMES}'}); at "
                         f"most {MAX_FRAMES} are allowed")


def _check_header(header: dict[str, Any]) -> None:
    def bad(name: str, what: str) -> ProtocolError:
        return ProtocolError(BAD_MESSAGE, f"header field {name!r} must be {what}",
                             f"got {header.get(name)!r:.80}")

    for name in ("msg_id", "session"):
        value = header.get(name)
        if not (isinstance(value, str) and 1 <= len(value) <= 64):
            raise bad(name, "a string of 1–64 characters")
    msg_type = header.get("msg_type")
    if not (isinstance(msg_type, str) and 1 <= len(msg_type) <= 32):
        raise bad("msg_type", "a string of 1–32 characters")
    parse_version(header.get("version"))
    sent = header.get("time")
    if isinstance(sent, bool) or not isinstance(sent, (int, float)) or not math.isfinite(sent):
        raise bad("time", "a finite number (Unix seconds)")
    job_id = header.get("job_id")
    if job_id is not None and not is_job_id(job_id):
        raise bad("job_id", "nil or 1–64 characters of A-Z a-z 0-9 _ -")


# --- content fields (section 4) ----------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def _is_points(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and _is_num(p[0]) and _is_num(p[1]) for p in v)


# kind name -> (check, description)
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "str?": (lambda v: v is None or isinstance(v, str), "a string or nil"),
    "int": (_is_int, "an integer"),
    "int?": (lambda v: v is None or _is_int(v), "an integer or nil"),
    "num": (_is_num, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "map": (lambda v: isinstance(v, dict), "a map"),
    "job": (is_job_id, "1–64 characters of A-Z a-z 0-9 _ -"),
    "job?": (lambda v: v is None or is_job_id(v), "nil or a job id"),
    "points": (_is_points, "a list of [x, y] number pairs"),
    "strs": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
             "a list of strings"),
}

# msg_type -> field -> (kind, default); default ``...`` means required.
_R = ...
SCHEMAS: dict[str, dict[str, tuple[str, Any]]] = {
    HELLO: {"client": ("str", "")},
    HELLO_REPLY: {"protocol_version": ("str", _R), "backend_version": ("str", _R),
                  "server_session": ("str", _R), "device": ("str", _R), "memory": ("map", {}),
                  "model": ("map", _R), "methods": ("map", _R), "parameters": ("map", {}),
                  "descriptions": ("map", {}), "default_method": ("str", _R),
                  "limits": ("map", _R), "dtypes": ("strs", ["u8"]),
                  "client_ttl": ("num", 6.0), "queue": ("map", {}),
                  "security": ("map", {}), "models": ("map", {})},
    SUBMIT: {"job_id": ("job", _R), "width": ("int", _R), "height": ("int", _R),
             "channels": ("int", _R), "has_mask": ("bool", False), "handles": ("points", _R),
             "targets": ("points", _R), "method": ("str", _R), "params": ("map", {}),
             "prompt": ("str", ""), "seed": ("int", 0), "preview": ("bool", False),
             "dtype": ("str", "u8")},
    SUBMIT_REPLY: {"job_id": ("job", _R), "state": ("str", _R), "position": ("int?", None),
                   "duplicate": ("bool", False), "joined": ("job?", None)},
    ATTACH: {"job_id": ("job", _R)},
    ATTACH_REPLY: {"job_id": ("job", _R), "state": ("str", _R), "position": ("int?", None)},
    CANCEL: {"job_id": ("job", _R)},
    CANCEL_REPLY: {"job_id": ("job", _R), "state": ("str", _R)},
    PING: {},
    PONG: {"server_session": ("str", _R), "time": ("num", _R), "queued": ("int", 0),
           "running": ("job?", None)},
    SHUTDOWN: {},
    SHUTDOWN_REPLY: {"cancelled": ("strs", [])},
    ERROR: {"code": ("str", _R), "message": ("str", _R), "detail": ("str?", None)},
    QUEUED: {"job_id": ("job", _R), "position": ("int", _R)},
    STARTED: {"job_id": ("job", _R)},
    PROGRESS: {"job_id": ("job", _R), "phase": ("str", _R), "step": ("int", _R),
               "total": ("int", _R)},
    PREVIEW: {"job_id": ("job", _R), "phase": ("str", _R), "step": ("int", _R),
              "width": ("int", _R), "height": ("int", _R), "channels": ("int", _R)},
    FINISHED: {"job_id": ("job", _R), "width": ("int", _R), "height": ("int", _R),
               "channels": ("int", _R), "handles": ("points", _R), "timings": ("map", {}),
               "stats": ("map", {}), "dtype": ("str", "u8"), "warnings": ("strs", [])},
    CANCELLED: {"job_id": ("job", _R), "reason": ("str", _R)},
    WARP: {"width": ("int", _R), "height": ("int", _R), "channels": ("int", _R),
           "dtype": ("str", "u8"), "handles": ("points", _R), "targets": ("points", _R),
           "params": ("map", {}), "overlay": ("bool", False)},
    WARP_REPLY: {"width": ("int", _R), "height": ("int", _R), "channels": ("int", _R),
                 "dtype": ("str", "u8"), "moved_pixels": ("int", 0),
                 "inpaint_pixels": ("int", 0), "seconds": ("num", 0.0),
                 "warnings": ("strs", [])},
    PREPARE: {"job_id": ("job", _R), "width": ("int", _R), "height": ("int", _R),
              "channels": ("int", _R), "dtype": ("str", "u8"), "method": ("str", _R),
              "params": ("map", {}), "prompt": ("str", ""), "seed": ("int", 0),
              "masked": ("bool", True)},
    PREPARE_REPLY: {"job_id": ("job", _R), "state": ("str", _R), "position": ("int?", None),
                    "duplicate": ("bool", False)},
    PREPARED: {"job_id": ("job", _R), "timings": ("map", {}), "stats": ("map", {})},
    DOWNLOAD: {"job_id": ("job", _R), "set": ("str", _R)},
    DOWNLOAD_REPLY: {"job_id": ("job", _R), "state": ("str", _R), "duplicate": ("bool", False)},
    INSTALLED: {"job_id": ("job", _R), "set": ("str", _R), "bytes": ("int", 0),
                "fetched": ("int", 0), "seconds": ("num", 0.0), "serving": ("bool", False),
                "methods": ("strs", [])},
}

# How many buffers each message type carries (default: none).
_BUFFERS = {SUBMIT: (1, 2), PREVIEW: (1, 1), FINISHED: (1, 1), WARP: (2, 2),
            WARP_REPLY: (2, 2), PREPARE: (1, 1)}


def check_content(message: Message) -> dict[str, Any]:
    """Check ``message.content`` against its schema; fill defaults; return it.

    Raises ``unknown_message_type`` or ``bad_message``. Unknown fields are kept (they may come
    from a newer MINOR version).
    """
    schema = SCHEMAS.get(message.msg_type)
    if schema is None:
        raise ProtocolError(UNKNOWN_MESSAGE_TYPE,
                            f"unknown message type {message.msg_type!r}",
                            f"known types: {', '.join(SCHEMAS)}")
    content = message.content
    for name, (kind, default) in schema.items():
        if name not in content:
            if default is _R:
                raise ProtocolError(BAD_MESSAGE,
                                    f"{message.msg_type} is missing the field {name!r}")
            content[name] = default.copy() if isinstance(default, (dict, list)) else default
            continue
        check, description = _KINDS[kind]
        if not check(content[name]):
            raise ProtocolError(BAD_MESSAGE,
                                f"field {name!r} of {message.msg_type} must be {description}",
                                f"got {content[name]!r:.80}")
    low, high = _BUFFERS.get(message.msg_type, (0, 0))
    if not low <= len(message.buffers) <= high:
        raise ProtocolError(BAD_MESSAGE, f"{message.msg_type} must carry {low}–{high} binary "
                            f"buffers, got {len(message.buffers)}")
    if "job_id" in schema and message.job_id != content["job_id"] and (
            message.msg_type in (SUBMIT, PREPARE, DOWNLOAD) or message.msg_type in EVENTS):
        raise ProtocolError(BAD_MESSAGE, "header job_id and content job_id differ")
    return content


def check_submit(content: dict[str, Any], buffer_sizes: Sequence[int],
                 limits: Limits, dtypes: Sequence[str] = tuple(PIXEL_DTYPES)) -> None:
    """Check a submit's values against ``limits`` and the pixel types the server accepts
    (section 3; ``hello_reply.dtypes``); raise ``invalid_input``."""
    _check_image(content, buffer_sizes, limits, dtypes)
    _check_settings(content, limits)


def _check_settings(content: dict[str, Any], limits: Limits) -> None:
    """The prompt, seed, method and parameter list of a submit or prepare."""
    if len(content["prompt"]) > limits.max_prompt_chars:
        raise ProtocolError(INVALID_INPUT,
                            f"prompt is longer than {limits.max_prompt_chars} characters")
    if not 0 <= content["seed"] < MAX_SEED:
        raise ProtocolError(INVALID_INPUT, "seed must be between 0 and 2**63 - 1")
    if len(content["method"]) > 64 or len(content["params"]) > 64:
        raise ProtocolError(INVALID_INPUT, "method name or parameter list too long")


def check_prepare(content: dict[str, Any], buffer_sizes: Sequence[int], limits: Limits,
                  dtypes: Sequence[str] = tuple(PIXEL_DTYPES)) -> None:
    """Check a prepare request (section 4, 1.2): a submit's image, prompt, seed, method and
    parameter checks, without a mask or points; raise ``invalid_input``."""
    _check_pixels({**content, "has_mask": False}, buffer_sizes, limits, dtypes)  # no mask sent
    _check_settings(content, limits)


def check_warp(content: dict[str, Any], buffer_sizes: Sequence[int], limits: Limits,
               dtypes: Sequence[str] = tuple(PIXEL_DTYPES)) -> None:
    """Check a warp request (section 4, 1.1): a submit's image, mask and point checks, always
    with a mask, and at most ``limits.max_warp_pixels`` pixels; raise ``invalid_input``."""
    w, h = content["width"], content["height"]
    if w * h > limits.max_warp_pixels:
        raise ProtocolError(INVALID_INPUT, f"a warp preview of {w}×{h} pixels exceeds the "
                            f"limit of {limits.max_warp_pixels}; send the layer scaled down")
    _check_image({**content, "has_mask": True}, buffer_sizes, limits, dtypes)
    if len(content["params"]) > 64:
        raise ProtocolError(INVALID_INPUT, "parameter list too long")


def _check_image(content: dict[str, Any], buffer_sizes: Sequence[int], limits: Limits,
                 dtypes: Sequence[str]) -> None:
    """The geometry, pixel type, buffers and points of a submit or warp."""
    _check_pixels(content, buffer_sizes, limits, dtypes)
    _check_points(content, limits)


def _check_pixels(content: dict[str, Any], buffer_sizes: Sequence[int], limits: Limits,
                  dtypes: Sequence[str]) -> None:
    """The geometry, pixel type and buffers of a submit, warp or prepare."""
    def invalid(message: str) -> ProtocolError:
        return ProtocolError(INVALID_INPUT, message)

    dtype = content.get("dtype", "u8")
    if dtype not in dtypes or dtype not in PIXEL_DTYPES:
        raise invalid(f"pixel type {dtype!r:.20} is not accepted by this backend; it accepts "
                      f"{', '.join(dtypes)} (convert the image to 8 bits per channel)")
    w, h, c = content["width"], content["height"], content["channels"]
    if not (1 <= w <= limits.max_side and 1 <= h <= limits.max_side):
        raise invalid(f"image size {w}×{h} is outside 1…{limits.max_side} pixels per side; "
                      "scale the image or the selection down")
    if w * h > limits.max_pixels:
        raise invalid(f"image of {w * h} pixels exceeds the limit of {limits.max_pixels}; "
                      "crop to a selection or scale down")
    if c not in (1, 2, 3, 4):
        raise invalid(f"channels must be 1, 2, 3 or 4, got {c}")
    image_bytes = w * h * c * PIXEL_DTYPES[dtype]
    if image_bytes > limits.max_frame_bytes:  # libzmq would drop it without a word
        mb = 2**20
        raise invalid(f"the image is {image_bytes / mb:.1f} MB ({w}×{h}, {c} channels, "
                      f"{dtype}) but the backend accepts at most "
                      f"{limits.max_frame_bytes / mb:.1f} MB per image; restart the backend "
                      f"with --max-frame-mb {-(-image_bytes // mb)} or more, or scale the "
                      "image (or crop to the selection) down")
    expected = [image_bytes] + ([w * h] if content["has_mask"] else [])
    if list(buffer_sizes) != expected:
        raise invalid(f"pixel buffers have {list(buffer_sizes)} bytes but {w}×{h}×{c} {dtype}"
                      f"{' plus a mask' if content['has_mask'] else ''} needs {expected}")


def _check_points(content: dict[str, Any], limits: Limits) -> None:
    """The handles and targets of a submit or warp: pairs on the image."""
    def invalid(message: str) -> ProtocolError:
        return ProtocolError(INVALID_INPUT, message)

    w, h = content["width"], content["height"]
    handles, targets = content["handles"], content["targets"]
    if not 1 <= len(handles) <= limits.max_points:
        raise invalid(f"give 1–{limits.max_points} handle points, got {len(handles)}")
    if len(targets) != len(handles):
        raise invalid(f"{len(handles)} handles but {len(targets)} targets; every handle needs "
                      "a target")
    for x, y in handles + targets:
        if not (0 <= x <= w and 0 <= y <= h):
            raise invalid(f"point ({x:g}, {y:g}) lies outside the {w}×{h} image")
