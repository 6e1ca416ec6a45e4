"""The server's side of CurveZMQ (rfc.zeromq.org spec 26, as ZMTP 3.1 and libzmq use it), for
``zmtp_router``: the handshake, and each message frame sealed in a MESSAGE box.

The boxes are libsodium's (PyNaCl): ``crypto_box`` (Curve25519, XSalsa20, Poly1305) and
``crypto_secretbox`` for the cookie. Keys: the server's long-term pair (S, s), a short-term
pair per connection (S', s'), the client's long-term public key C and short-term C'.

The handshake (command frames after the greeting; short nonces are 8-byte big-endian
counters, long ones 16 random bytes, each after a 16- or 8-byte prefix)::

    HELLO     version 1.0, 72 zero bytes, C', short nonce, Box[64 zero bytes](C'->S)
    WELCOME   long nonce, Box[S' + cookie](S->C')
              cookie = long nonce + SecretBox[C' + s'](cookie key)
    INITIATE  cookie, short nonce, Box[C + vouch + metadata](C'->S')
              vouch = long nonce + Box[C' + S](C->S')
    READY     short nonce, Box[metadata](S'->C')
    ERROR     (when C is not allowed) status "400", as libzmq's ZAP refusal sends it

The cookie key rotates (``COOKIE_SECONDS``): INITIATE brings C' and s' back in the cookie, so
the server keeps no keys between HELLO and INITIATE, only the 16-byte nonce of the cookie it
gave this connection, which INITIATE must bring back (a handshake recorded on one connection
and replayed on another is refused; libzmq gets the same from a cookie key per connection). Then every frame is one data frame (flags 0, as libzmq
writes it) holding ``MESSAGE``, a short nonce and Box[flags + body]: the MORE bit of the
message is inside the box, so the end of a message is known only once its last frame is
opened. Nonces must increase; anything that fails to open drops the connection.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings as sodium
import nacl.exceptions
import nacl.utils
from nacl._sodium import ffi, lib  # in-place boxes for MESSAGE frames (no copies)
from zmq.utils import z85

from protocol import zmtp
from protocol.curve import load_keypair

# The nonce prefixes (libzmq's curve_client.cpp, curve_server.cpp, curve_mechanism_base.cpp).
HELLO_PREFIX = b"CurveZMQHELLO---"
WELCOME_PREFIX = b"WELCOME-"
COOKIE_PREFIX = b"COOKIE--"
INITIATE_PREFIX = b"CurveZMQINITIATE"
VOUCH_PREFIX = b"VOUCH---"
READY_PREFIX = b"CurveZMQREADY---"
CLIENT_MESSAGE_PREFIX = b"CurveZMQMESSAGEC"
SERVER_MESSAGE_PREFIX = b"CurveZMQMESSAGES"
MESSAGE = b"MESSAGE"
MESSAGE_HEAD = b"\x07MESSAGE"  # a MESSAGE frame's first bytes: the command name
HEAD_BYTES = len(MESSAGE_HEAD) + 8  # name and short nonce
MAC_BYTES = 16
# The smallest MESSAGE frame: name, nonce, MAC and the flags byte of an empty frame.
MESSAGE_OVERHEAD = HEAD_BYTES + MAC_BYTES + 1
INNER_MORE, INNER_COMMAND = 0x01, 0x02  # the flags byte inside a MESSAGE box
HELLO_BYTES = 200 - len(b"\x05HELLO")  # HELLO's data (libzmq checks the whole command: 200)
MIN_INITIATE_BYTES = 257 - len(b"\x08INITIATE")
COOKIE_SECONDS = 60.0  # a cookie key opens cookies made at most two periods ago
REFUSED = b"400"  # the status libzmq's ERROR carries when ZAP refuses a client key


class CurveError(zmtp.ZmtpError):
    """A CURVE box did not open, or a command broke the mechanism: drop the connection."""


@dataclass(frozen=True)
class ServerKeys:
    public: bytes  # S, 32 raw bytes
    secret: bytes  # s

    @classmethod
    def from_file(cls, secret_file: Path) -> ServerKeys:
        public, secret = load_keypair(secret_file)
        return cls(z85.decode(public), z85.decode(secret))


class CookieJar:
    """The cookie keys: a fresh one every ``COOKIE_SECONDS``, the one before still opens."""

    def __init__(self, period: float = COOKIE_SECONDS) -> None:
        self.period = period
        self._keys = [nacl.utils.random(32), nacl.utils.random(32)]  # current, previous
        self._made = time.monotonic()

    def current(self) -> bytes:
        now = time.monotonic()
        if now - self._made >= self.period:
            self._keys = [nacl.utils.random(32), self._keys[0]]
            self._made = now
        return self._keys[0]

    def open(self, nonce: bytes, box: bytes) -> bytes | None:
        self.current()
        for key in self._keys:
            try:
                return sodium.crypto_secretbox_open(box, nonce, key)
            except nacl.exceptions.CryptoError:
                continue
        return None


def _open_box(box: bytes, nonce: bytes, public: bytes, secret: bytes, what: str) -> bytes:
    try:
        return sodium.crypto_box_open_easy(box, nonce, public, secret)
    except nacl.exceptions.CryptoError:
        raise CurveError(f"the {what} box does not open (wrong key, or tampered)") from None


def welcome(hello: bytes, keys: ServerKeys, cookies: CookieJar) -> tuple[bytes, bytes]:
    """The WELCOME command frame that answers a HELLO command's data, and its cookie's nonce
    (for ``initiate``)."""
    if len(hello) != HELLO_BYTES:
        raise CurveError(f"a CURVE HELLO has {HELLO_BYTES} bytes of data, got {len(hello)}")
    if hello[:2] != b"\x01\x00":
        raise CurveError(f"CURVE version {hello[0]}.{hello[1]} is not 1.0")
    client_short = hello[74:106]
    nonce = HELLO_PREFIX + hello[106:114]
    if _open_box(hello[114:194], nonce, client_short, keys.secret, "HELLO") != bytes(64):
        raise CurveError("the HELLO box does not hold 64 zero bytes")
    short_public, short_secret = sodium.crypto_box_keypair()
    cookie_nonce = nacl.utils.random(16)
    cookie = cookie_nonce + sodium.crypto_secretbox(
        client_short + short_secret, COOKIE_PREFIX + cookie_nonce, cookies.current())
    welcome_nonce = nacl.utils.random(16)
    box = sodium.crypto_box_easy(short_public + cookie, WELCOME_PREFIX + welcome_nonce,
                                 client_short, keys.secret)
    return zmtp.command(zmtp.WELCOME, welcome_nonce + box), cookie_nonce


@dataclass(frozen=True)
class Initiated:
    session: CurveSession
    client_key: bytes  # C
    metadata: bytes  # the peer's properties (``zmtp.parse_metadata``)


def initiate(data: bytes, keys: ServerKeys, cookies: CookieJar,
             cookie_nonce: bytes) -> Initiated:
    """Check an INITIATE command's data: the cookie (the one this connection's WELCOME gave,
    ``cookie_nonce``), the box, the vouch. Whether C is allowed is the caller's question."""
    if len(data) < MIN_INITIATE_BYTES:
        raise CurveError(f"a CURVE INITIATE has at least {MIN_INITIATE_BYTES} bytes of data")
    if not hmac.compare_digest(data[:16], cookie_nonce):
        raise CurveError("the INITIATE cookie is not the one this connection was given")
    opened = cookies.open(COOKIE_PREFIX + data[:16], data[16:96])
    if opened is None:
        raise CurveError("the INITIATE cookie does not open (forged, or too old)")
    client_short, short_secret = opened[:32], opened[32:]
    nonce = int.from_bytes(data[96:104], "big")
    plain = _open_box(data[104:], INITIATE_PREFIX + data[96:104], client_short,
                      short_secret, "INITIATE")
    if len(plain) < 128:
        raise CurveError("the INITIATE box is too short for a key and a vouch")
    client_key = plain[:32]
    vouch = _open_box(plain[48:128], VOUCH_PREFIX + plain[32:48], client_key, short_secret,
                      "vouch")
    if not (hmac.compare_digest(vouch[:32], client_short)
            and hmac.compare_digest(vouch[32:], keys.public)):
        raise CurveError("the vouch is not for this connection's keys")
    shared = sodium.crypto_box_beforenm(client_short, short_secret)
    return Initiated(CurveSession(shared, nonce), client_key, plain[128:])


def refusal(status: bytes = REFUSED) -> bytes:
    """The ERROR command libzmq's CURVE server sends when a client key is refused."""
    return zmtp.command(zmtp.ERROR, bytes((len(status),)) + status)


class CurveSession:
    """One open connection's boxes: its shared key, and the nonces each way."""

    def __init__(self, shared: bytes, peer_nonce: int) -> None:
        self._key = shared
        self._key_ptr = ffi.from_buffer(self._key)
        self.peer_nonce = peer_nonce  # the last short nonce the peer used
        self.nonce = 1  # the next one we use
        self._nonce_buf = bytearray(CLIENT_MESSAGE_PREFIX + bytes(8))
        self._nonce_ptr = ffi.from_buffer(self._nonce_buf)

    def ready(self, metadata: bytes) -> bytes:
        """The READY command frame, with our properties."""
        short = self._next_nonce()
        box = sodium.crypto_box_easy_afternm(metadata, READY_PREFIX + short, self._key)
        return zmtp.command(zmtp.READY, short + box)

    def _next_nonce(self) -> bytes:
        short = self.nonce.to_bytes(8, "big")
        self.nonce += 1
        return short

    def check_nonce(self, frame: memoryview) -> None:
        """A MESSAGE frame's name and nonce, without opening it: the nonce must grow."""
        if frame.nbytes < MESSAGE_OVERHEAD or frame[:len(MESSAGE_HEAD)] != MESSAGE_HEAD:
            raise CurveError("a frame of an open CURVE connection is not a MESSAGE")
        nonce = int.from_bytes(frame[len(MESSAGE_HEAD):HEAD_BYTES], "big")
        if nonce <= self.peer_nonce:
            raise CurveError("a MESSAGE nonce did not increase (replayed or reordered)")
        self.peer_nonce = nonce

    def open_in_place(self, frame: bytearray | memoryview) -> int:
        """Open a MESSAGE frame (``check_nonce`` first) in its own buffer: afterwards
        ``frame[MESSAGE_OVERHEAD - 1]`` is the flags byte and the body follows it. Returns
        the flags."""
        self._nonce_buf[16:] = frame[len(MESSAGE_HEAD):HEAD_BYTES]
        ptr = ffi.from_buffer(frame)
        out = ptr + HEAD_BYTES + MAC_BYTES
        if lib.crypto_box_open_easy_afternm(out, ptr + HEAD_BYTES, len(frame) - HEAD_BYTES,
                                            self._nonce_ptr, self._key_ptr) != 0:
            raise CurveError("a MESSAGE box does not open (tampered, or a wrong key)")
        return frame[MESSAGE_OVERHEAD - 1]

    def seal(self, body: memoryview, flags: int) -> bytearray:
        """A MESSAGE frame's body (name, nonce, box) for one frame: one copy of ``body``."""
        size = body.nbytes
        frame = bytearray(MESSAGE_OVERHEAD + size)
        frame[:len(MESSAGE_HEAD)] = MESSAGE_HEAD
        frame[len(MESSAGE_HEAD):HEAD_BYTES] = self._next_nonce()
        frame[MESSAGE_OVERHEAD - 1] = flags
        frame[MESSAGE_OVERHEAD:] = body
        nonce = SERVER_MESSAGE_PREFIX + frame[len(MESSAGE_HEAD):HEAD_BYTES]
        ptr = ffi.from_buffer(frame)
        rc = lib.crypto_box_easy_afternm(ptr + HEAD_BYTES, ptr + MESSAGE_OVERHEAD - 1,
                                         size + 1, nonce, self._key_ptr)
        if rc != 0:
            raise CurveError("sealing a MESSAGE failed")
        return frame
