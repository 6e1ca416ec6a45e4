"""CurveZMQ in the server's pure-Python ROUTER (backend/server/curve_server.py, zmtp_router.py):
the handshake against a raw CurveZMQ client written here with PyNaCl (so that each box can be
broken on purpose) and against libzmq's client (pyzmq): the allow-list and its count, a bad
vouch, a tampered box and a replayed nonce drop the connection, the frame cap, large frames
both ways. (The whole server with CURVE: tests/test_server_process.py; the flood:
tests/test_server_fuzz.py.)"""

from __future__ import annotations

import socket
import time

import nacl.bindings as sodium
import nacl.utils
import pytest
import zmq
from test_zmtp_router import closed, connect, looping, pump, read_exact
from zmq.utils import z85

from backend.server import curve_server
from backend.server.endpoint import CurveServer
from backend.server.zmtp_router import ZmtpRouter
from protocol import wire, zmtp
from protocol.curve import CurveClient, generate_keypair, load_keypair

KEY = b"k" * 32


@pytest.fixture
def keys(tmp_path):
    """(CurveServer, allowed client secret file, refused client secret file)."""
    _, server_secret = generate_keypair(tmp_path / "server", "server")
    allowed = tmp_path / "allowed"
    good_public, good_secret = generate_keypair(tmp_path / "good", "good")
    allowed.mkdir()
    (allowed / "good.key").write_bytes(good_public.read_bytes())
    _, bad_secret = generate_keypair(tmp_path / "bad", "bad")
    return CurveServer(server_secret, allowed), good_secret, bad_secret


@pytest.fixture
def router(keys):
    router = ZmtpRouter("tcp://127.0.0.1:0", KEY, wire.Limits(max_frame_bytes=2**27),
                        handshake_seconds=2.0, curve=keys[0])
    router.open()
    yield router
    router.close()


def raw_keys(secret_file) -> tuple[bytes, bytes]:
    public, secret = load_keypair(secret_file)
    return z85.decode(public), z85.decode(secret)


class RawCurveClient:
    """A CurveZMQ client over a plain socket; each step can be spoilt by the test."""

    def __init__(self, router: ZmtpRouter, client_secret_file, *, bad_vouch: bool = False):
        self.sock = connect(router)
        self.server = z85.decode(router.server_public_key().encode())
        self.public, self.secret = raw_keys(client_secret_file)
        self.short_public, self.short_secret = sodium.crypto_box_keypair()
        self.nonce = 1
        self.peer_nonce = 0
        self.bad_vouch = bad_vouch
        self.router = router

    def _short(self) -> bytes:
        short = self.nonce.to_bytes(8, "big")
        self.nonce += 1
        return short

    def hello(self) -> bytes:
        short = self._short()
        box = sodium.crypto_box_easy(bytes(64), curve_server.HELLO_PREFIX + short,
                                     self.server, self.short_secret)
        return zmtp.command(zmtp.HELLO, b"\x01\x00" + bytes(72) + self.short_public + short
                            + box)

    def login(self) -> tuple[bytes, bytes]:
        """Greeting, HELLO, WELCOME, INITIATE; the router's answer to INITIATE (name, data)."""
        self.sock.sendall(zmtp.greeting(zmtp.CURVE, as_server=False) + self.hello())
        with looping(self.router):
            peer = zmtp.parse_greeting(read_exact(self.sock, zmtp.GREETING_SIZE))
            assert peer.mechanism == zmtp.CURVE and peer.as_server
            name, data = self.read_command()
        assert name == zmtp.WELCOME
        opened = sodium.crypto_box_open_easy(data[16:], curve_server.WELCOME_PREFIX + data[:16],
                                             self.server, self.short_secret)
        self.server_short, cookie = opened[:32], opened[32:]
        vouch_nonce = nacl.utils.random(16)
        vouch_secret = sodium.crypto_box_keypair()[1] if self.bad_vouch else self.secret
        vouch = vouch_nonce + sodium.crypto_box_easy(
            self.short_public + self.server, curve_server.VOUCH_PREFIX + vouch_nonce,
            self.server_short, vouch_secret)
        properties = zmtp.metadata([(zmtp.SOCKET_TYPE, b"DEALER"), (zmtp.IDENTITY, b"")])
        short = self._short()
        box = sodium.crypto_box_easy(self.public + vouch + properties,
                                     curve_server.INITIATE_PREFIX + short, self.server_short,
                                     self.short_secret)
        self.sock.sendall(zmtp.command(zmtp.INITIATE, cookie + short + box))
        self.shared = sodium.crypto_box_beforenm(self.server_short, self.short_secret)
        with looping(self.router):
            return self.read_command()

    def read_command(self) -> tuple[bytes, bytes]:
        flags, size = read_exact(self.sock, 2)
        assert flags == zmtp.COMMAND
        return zmtp.parse_command(read_exact(self.sock, size))

    def message_frame(self, body: bytes, more: bool, nonce: int | None = None) -> bytes:
        short = (nonce if nonce is not None else self.nonce).to_bytes(8, "big")
        if nonce is None:
            self.nonce += 1
        box = sodium.crypto_box_easy_afternm(bytes((1 if more else 0,)) + body,
                                             curve_server.CLIENT_MESSAGE_PREFIX + short,
                                             self.shared)
        inner = curve_server.MESSAGE_HEAD + short + box
        return zmtp.frame_header(len(inner)) + inner

    def message(self, *frames: bytes) -> bytes:
        return b"".join(self.message_frame(frame, i < len(frames) - 1)
                        for i, frame in enumerate(frames))

    def read_frames(self, count: int) -> list[tuple[int, bytes]]:
        """``count`` MESSAGE frames from the router (its loop runs meanwhile), opened."""
        parser = zmtp.FrameParser(2**20)
        frames: list[zmtp.Frame] = []
        deadline = time.monotonic() + 5
        self.sock.settimeout(0.01)
        while len(frames) < count:
            assert time.monotonic() < deadline, "the router sent too little"
            self.router.poll(10)
            try:
                got = self.sock.recv_into(parser.buffer())
            except TimeoutError:
                continue
            assert got, "the router closed the connection"
            frames += parser.advance(got)
        return [self.open_frame(bytes(frame.body)) for frame in frames]

    def open_frame(self, data: bytes) -> tuple[int, bytes]:
        """(inner flags, body) of a MESSAGE frame's body from the router."""
        assert data[:8] == curve_server.MESSAGE_HEAD
        nonce = int.from_bytes(data[8:16], "big")
        assert nonce > self.peer_nonce
        self.peer_nonce = nonce
        plain = sodium.crypto_box_open_easy_afternm(
            data[16:], curve_server.SERVER_MESSAGE_PREFIX + data[8:16], self.shared)
        return plain[0], plain[1:]


def test_an_allowed_key_logs_in_and_messages_go_both_ways(router, keys):
    client = RawCurveClient(router, keys[1])
    name, data = client.login()
    assert name == zmtp.READY
    ready = sodium.crypto_box_open_easy_afternm(data[8:], curve_server.READY_PREFIX + data[:8],
                                                client.shared)
    assert zmtp.parse_metadata(ready)["socket-type"] == b"ROUTER"
    client.sock.sendall(client.message(b"", b"hello", b"x" * 300))
    (inbound,) = pump(router, lambda got: len(got) == 1)
    assert [bytes(f) for f in inbound.frames] == [b"", b"hello", b"x" * 300]
    assert inbound.count == 3
    router.send(inbound.identity, [b"", b"answer"], "test")
    client.peer_nonce = 1  # READY used the router's first nonce
    assert client.read_frames(2) == [(curve_server.INNER_MORE, b""), (0, b"answer")]
    assert router.gate.denied == 0


def test_a_key_not_in_the_allow_list_is_refused_as_libzmq_refuses_it_and_counted(router, keys):
    client = RawCurveClient(router, keys[2])
    assert client.login() == (zmtp.ERROR, b"\x03400")
    assert closed(client.sock)
    assert router.gate.denied == 1
    assert router.gate.last_reason == "client key not in the allow-list"


def test_libzmqs_client_with_a_refused_key_gets_nothing_through(router, keys):
    """pyzmq's DEALER with a key outside the allow-list: refused, counted, nothing read."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    CurveClient.from_files(router.server_public_key(), keys[2]).apply(sock)
    sock.connect(router.endpoint)
    sock.send_multipart([b"", b"nothing gets through"])
    deadline = time.monotonic() + 5
    while router.gate.denied == 0:
        assert time.monotonic() < deadline, "the refused key was not counted"
        router.poll(10)
        assert not list(router.receive())
    sock.close()
    context.term()


def test_a_bad_vouch_drops_the_connection_uncounted(router, keys):
    client = RawCurveClient(router, keys[1], bad_vouch=True)
    with pytest.raises(AssertionError, match="closed"):
        client.login()
    assert router.gate.denied == 0  # not a refused key: a broken handshake


def test_a_handshake_replayed_on_another_connection_is_dropped(router, keys):
    """Someone who recorded a key holder's HELLO and INITIATE sends them again, on a
    connection of their own, within the cookie key's lifetime: the cookie is not the one
    this connection was given."""
    client = RawCurveClient(router, keys[1])
    sent: list[bytes] = []
    client.sock = _Recording(client.sock, sent)
    assert client.login()[0] == zmtp.READY
    replay = connect(router)
    replay.sendall(b"".join(sent))
    with looping(router):
        assert closed(replay)
    assert router.gate.denied == 0


class _Recording:
    """A socket whose ``sendall`` also keeps what was sent."""

    def __init__(self, sock: socket.socket, sent: list[bytes]) -> None:
        self._sock, self._sent = sock, sent

    def sendall(self, data: bytes) -> None:
        self._sent.append(data)
        self._sock.sendall(data)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def test_a_tampered_box_drops_the_connection(router, keys):
    client = RawCurveClient(router, keys[1])
    assert client.login()[0] == zmtp.READY
    frame = bytearray(client.message_frame(b"payload", more=False))
    frame[-1] ^= 0x01
    client.sock.sendall(bytes(frame))
    with looping(router):
        assert closed(client.sock)


def test_a_replayed_or_reordered_nonce_drops_the_connection(router, keys):
    client = RawCurveClient(router, keys[1])
    assert client.login()[0] == zmtp.READY
    first = client.message_frame(b"one", more=False)
    client.sock.sendall(first)
    pump(router, lambda got: len(got) == 1)
    client.sock.sendall(first)  # the same frame again: its nonce does not increase
    with looping(router):
        assert closed(client.sock)


def test_frames_past_the_cap_are_counted_exactly_not_kept(router, keys):
    client = RawCurveClient(router, keys[1])
    assert client.login()[0] == zmtp.READY
    frames = wire.MAX_FRAMES + 1000
    client.sock.sendall(client.message(*[b"f"] * frames) + client.message(b"next"))
    first, after = pump(router, lambda got: len(got) == 2)
    assert first.count == frames and len(first.frames) == wire.MAX_FRAMES
    assert [bytes(f) for f in after.frames] == [b"next"] and after.count == 1


def test_a_frame_over_the_limit_drops_the_connection(keys):
    router = ZmtpRouter("tcp://127.0.0.1:0", KEY, wire.Limits(max_frame_bytes=1000),
                        curve=keys[0])
    router.open()
    try:
        client = RawCurveClient(router, keys[1])
        assert client.login()[0] == zmtp.READY
        client.sock.sendall(client.message_frame(b"x" * 1001, more=False))
        with looping(router):
            assert closed(client.sock)
    finally:
        router.close()


def test_a_64_mib_frame_goes_both_ways_intact_with_libzmqs_client(router, keys):
    """A large upload is opened in its own buffer; a large result is sealed as the send
    queue drains, one frame at a time."""
    big = bytes(range(256)) * (2**26 // 256)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    CurveClient.from_files(router.server_public_key(), keys[1]).apply(sock)
    sock.connect(router.endpoint)
    try:
        sock.send_multipart([b"", big, b"tail"], copy=False)
        (inbound,) = pump(router, lambda got: len(got) == 1, seconds=60)
        assert inbound.count == 3 and bytes(inbound.frames[1]) == big
        router.send(inbound.identity, [b"", memoryview(big), b"end"], "test")
        deadline = time.monotonic() + 60
        while not sock.poll(0):
            assert time.monotonic() < deadline, "the result did not arrive"
            router.poll(10)
        frames = sock.recv_multipart()
        assert frames[0] == b"" and frames[1] == big and frames[2] == b"end"
    finally:
        sock.close()
        context.term()


def test_a_ping_sealed_in_a_message_is_answered_with_a_sealed_pong(router, keys):
    client = RawCurveClient(router, keys[1])
    assert client.login()[0] == zmtp.READY
    short = client._short()
    ping = b"\x04PING" + b"\x00\x0a" + b"ctx"
    box = sodium.crypto_box_easy_afternm(bytes((curve_server.INNER_COMMAND,)) + ping,
                                         curve_server.CLIENT_MESSAGE_PREFIX + short,
                                         client.shared)
    inner = curve_server.MESSAGE_HEAD + short + box
    client.sock.sendall(zmtp.frame_header(len(inner)) + inner)
    client.peer_nonce = 1
    ((flags, body),) = client.read_frames(1)
    assert flags == curve_server.INNER_COMMAND and body == b"\x04PONGctx"


def test_a_plain_greeting_is_dropped_by_a_curve_router(router):
    sock = connect(router)
    sock.sendall(zmtp.greeting(zmtp.PLAIN, as_server=False))
    with looping(router):
        assert closed(sock)
    assert isinstance(sock, socket.socket)
