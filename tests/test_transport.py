"""Choosing a transport, and the pure-Python ZMTP transport against peers that misbehave in
ways a real backend does not: a scripted ZMTP server written with the codec itself. (Both
transports against the real backend: tests/test_server*.py, parametrized over TRANSPORTS.)"""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from collections.abc import Callable

import pytest

from protocol import transport, transport_zmtp, zmtp
from protocol.transport_zmtp import ZmtpDealer

PASSWORD = b"p" * 64


class ScriptedPeer:
    """A TCP listener; each accepted connection runs the next script (``script(conn)``) of
    those given to ``start``."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.scripts: list[Callable[[socket.socket], None]] = []
        self.seen: list[dict] = []  # per connection: what the client said in its handshake
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self, *scripts: Callable[[socket.socket], None]) -> ScriptedPeer:
        self.scripts += scripts
        self._thread.start()
        return self

    def _serve(self) -> None:
        for script in self.scripts:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    script(conn)
                except Exception as exc:  # reported by close()
                    self.errors.append(exc)

    def close(self) -> None:
        self.listener.close()
        self._thread.join(5)
        assert not self.errors, self.errors


def read_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError("the client closed the connection")
        data += chunk
    return data


def until_closed(conn: socket.socket) -> None:
    """Wait until the client closes the connection."""
    while conn.recv(4096):
        pass


def read_frame(conn: socket.socket) -> tuple[int, bytes]:
    flags = read_exact(conn, 1)[0]
    size = int.from_bytes(read_exact(conn, 8 if flags & zmtp.LONG else 1), "big")
    return flags, read_exact(conn, size)


def read_message(conn: socket.socket) -> list[bytes]:
    frames = []
    while True:
        flags, body = read_frame(conn)
        frames.append(body)
        if not flags & zmtp.MORE:
            return frames


def handshake(peer: ScriptedPeer, conn: socket.socket, *, refuse: bytes | None = None) -> None:
    """The server's half of a PLAIN handshake; ``refuse``: answer HELLO with this ERROR."""
    conn.sendall(zmtp.greeting(zmtp.PLAIN, as_server=True))
    greeting = zmtp.parse_greeting(read_exact(conn, 64))
    name, data = zmtp.parse_command(read_frame(conn)[1])
    assert name == zmtp.HELLO
    user, password = zmtp.parse_plain_hello(data)
    seen = {"greeting": greeting, "user": user, "password": password}
    peer.seen.append(seen)
    if refuse is not None:
        conn.sendall(refuse)
        return
    conn.sendall(zmtp.command(zmtp.WELCOME))
    name, data = zmtp.parse_command(read_frame(conn)[1])
    assert name == zmtp.INITIATE
    seen["metadata"] = zmtp.parse_metadata(data)
    conn.sendall(zmtp.command(zmtp.READY, zmtp.metadata([("Socket-Type", b"ROUTER"),
                                                         ("Identity", b"")])))


def echo(peer: ScriptedPeer, messages: int = 1) -> Callable[[socket.socket], None]:
    def script(conn: socket.socket) -> None:
        handshake(peer, conn)
        for _ in range(messages):
            conn.sendall(b"".join(zmtp.message_chunks(read_message(conn))))
        until_closed(conn)

    return script


def dealer(endpoint: str, **kwargs) -> ZmtpDealer:
    settings = {"username": b"drag-diffusion", "password": PASSWORD, "max_frame": 2**20,
                "max_frames": 8, "handshake_timeout": 2.0, **kwargs}
    return ZmtpDealer(endpoint, **settings)


def receive(client: ZmtpDealer, seconds: float = 5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = client.recv(0.2)
        if message is not None:
            return message
    return None


# --- choosing ---------------------------------------------------------------------------------
def test_choose_prefers_pyzmq_and_obeys_the_setting(monkeypatch):
    monkeypatch.delenv(transport.TRANSPORT_ENV, raising=False)
    assert transport.choose() == "pyzmq"  # it loads here
    assert transport.choose("zmtp") == "zmtp"
    monkeypatch.setenv(transport.TRANSPORT_ENV, "ZMTP")
    assert transport.choose() == "zmtp"
    assert transport.choose("pyzmq") == "pyzmq"  # the argument wins over the environment
    monkeypatch.setenv(transport.TRANSPORT_ENV, "carrier-pigeon")
    with pytest.raises(transport.TransportUnavailable, match="use one of auto, pyzmq, zmtp"):
        transport.choose()


def test_without_pyzmq_auto_is_the_pure_transport_and_curve_says_what_to_do(monkeypatch):
    monkeypatch.delenv(transport.TRANSPORT_ENV, raising=False)
    monkeypatch.setattr(transport, "pyzmq_problem", lambda: "ImportError: DLL load failed")
    assert transport.choose() == "zmtp"
    with pytest.raises(transport.TransportUnavailable) as err:
        transport.choose(curve=True)
    message = str(err.value)
    assert "\n" not in message and "DLL load failed" in message
    assert "CURVE" in message and "ssh -L" in message
    with pytest.raises(transport.TransportUnavailable, match="unset it"):
        transport.choose("pyzmq")
    with pytest.raises(transport.TransportUnavailable, match="only the pyzmq transport"):
        transport.choose("zmtp", curve=True)


def test_endpoints_the_pure_transport_cannot_reach_are_refused_at_once():
    for endpoint in ("tcp://*:5557", "tcp://127.0.0.1", "udp://127.0.0.1:5557"):
        with pytest.raises(ValueError, match="cannot connect"):
            dealer(endpoint)


# --- the handshake ----------------------------------------------------------------------------
def test_handshake_logs_in_with_plain_as_a_dealer_and_messages_round_trip():
    peer = ScriptedPeer()
    peer.start(echo(peer))
    client = dealer(peer.endpoint)
    try:
        client.send([b"<DRAG|MSG>", b"", b"x" * 300])
        assert receive(client) == [b"<DRAG|MSG>", b"", b"x" * 300]
    finally:
        client.close()
        peer.close()
    (seen,) = peer.seen
    assert seen["greeting"] == zmtp.Greeting((3, 1), b"PLAIN", False)
    assert (seen["user"], seen["password"]) == (b"drag-diffusion", PASSWORD)
    assert seen["metadata"] == {"socket-type": b"DEALER", "identity": b""}


@pytest.mark.parametrize("refusal", [zmtp.command(zmtp.ERROR, b"\x03400"),
                                     bytes.fromhex("04 09 5e 52 52 4f 52 03 34 30 30")],
                         ids=["spec ERROR", "libzmq ERROR"])
def test_a_refused_login_is_reported(refusal):
    peer = ScriptedPeer()
    peer.start(lambda conn: handshake(peer, conn, refuse=refusal))
    client = dealer(peer.endpoint)
    try:
        client.send([b"hello"])
        with pytest.raises(transport.LoginRefused, match="400"):
            client.recv(2.0)
    finally:
        client.close()
        peer.close()


def test_a_backend_of_another_mechanism_is_a_mismatch_seen_in_its_greeting():
    """N9 on the pure transport: a backend with CURVE on is told apart from a refused key and
    from silence. The client's greeting waits after the version for the backend's: libzmq
    drops a peer whose whole greeting names another mechanism before it writes its own
    mechanism, so a whole greeting at once would only ever see the connection close."""
    peer = ScriptedPeer()

    def curve_backend(conn: socket.socket) -> None:
        head = read_exact(conn, zmtp.GREETING_HEAD)
        conn.settimeout(0.3)
        try:
            early = conn.recv(64)  # nothing more comes before our greeting
        except TimeoutError:
            early = b""
        conn.settimeout(5)
        peer.seen.append({"head": head, "early": early})
        conn.sendall(zmtp.greeting(zmtp.CURVE, as_server=True))
        until_closed(conn)

    peer.start(curve_backend)
    client = dealer(peer.endpoint)
    try:
        client.send([b"hello"])
        with pytest.raises(transport.MechanismMismatch, match="CURVE") as err:
            client.recv(3.0)
    finally:
        client.close()
        peer.close()
    assert err.value.theirs == "CURVE" and isinstance(err.value, transport.LoginRefused)
    assert peer.seen == [{"head": zmtp.greeting(zmtp.PLAIN, False)[:12], "early": b""}]


def test_messages_wait_for_a_backend_that_starts_later():
    """Like libzmq's DEALER: sent before anybody listens, delivered once somebody does."""
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nobody listens there now
    client = dealer(f"tcp://127.0.0.1:{port}")
    try:
        client.send([b"early"])
        assert client.recv(0.3) is None
        peer = ScriptedPeer(port)
        peer.start(echo(peer))
        assert receive(client) == [b"early"]
    finally:
        client.close()
    peer.close()


# --- a peer that misbehaves after the handshake -------------------------------------------------
def test_a_peer_closing_mid_frame_costs_that_message_only():
    """Half of a frame, then the connection closes: nothing is delivered, the transport
    reconnects, and the next connection's message arrives whole."""
    peer = ScriptedPeer()

    def half_then_close(conn):
        handshake(peer, conn)
        read_message(conn)
        conn.sendall(zmtp.frame_header(100_000) + b"y" * 50_000)

    peer.start(half_then_close, echo(peer))
    client = dealer(peer.endpoint)
    try:
        client.send([b"first"])
        assert client.recv(1.0) is None  # the half frame never surfaces
        client.send([b"second"])
        assert receive(client) == [b"second"]
    finally:
        client.close()
        peer.close()
    assert len(peer.seen) == 2


def test_an_oversized_frame_drops_the_connection_before_anything_is_allocated():
    peer = ScriptedPeer()

    def huge(conn):
        handshake(peer, conn)
        read_message(conn)
        conn.sendall(zmtp.frame_header(2**40))  # "a terabyte follows"
        time.sleep(1)

    peer.start(huge, echo(peer))
    client = dealer(peer.endpoint, max_frame=2**20)
    try:
        client.send([b"one"])
        tracemalloc.start()
        assert client.recv(0.5) is None
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 2**20
        client.send([b"two"])
        assert receive(client) == [b"two"]  # a fresh connection serves on
    finally:
        client.close()
        peer.close()


def test_a_message_with_too_many_frames_keeps_only_the_first_ones():
    peer = ScriptedPeer()

    def many(conn):
        handshake(peer, conn)
        read_message(conn)
        conn.sendall(b"".join(zmtp.message_chunks([b"f%d" % i for i in range(10_000)])))
        until_closed(conn)

    peer.start(many)
    client = dealer(peer.endpoint, max_frames=8)
    try:
        client.send([b"go"])
        assert receive(client) == [b"f%d" % i for i in range(8)]
    finally:
        client.close()
        peer.close()


def test_a_ping_is_answered_with_a_pong():
    peer = ScriptedPeer()
    answers = []

    def pinger(conn):
        handshake(peer, conn)
        read_message(conn)
        conn.sendall(zmtp.command(zmtp.PING, b"\x00\x0actx"))
        answers.append(read_frame(conn))
        conn.sendall(b"".join(zmtp.message_chunks([b"after the pong"])))
        until_closed(conn)

    peer.start(pinger)
    client = dealer(peer.endpoint)
    try:
        client.send([b"hi"])
        assert receive(client) == [b"after the pong"]
    finally:
        client.close()
        peer.close()
    assert answers == [(zmtp.COMMAND, b"\x04PONGctx")]


def test_a_large_frame_is_sent_from_the_callers_buffer_and_received_whole():
    peer = ScriptedPeer()
    peer.start(echo(peer))
    pixels = bytearray(range(256)) * (24 * 2**20 // 256)  # 24 MiB
    client = dealer(peer.endpoint, max_frame=2**26)
    try:
        client.send([b"<DRAG|MSG>", memoryview(pixels)])
        message = receive(client, 30)
    finally:
        client.close()
        peer.close()
    assert message[0] == b"<DRAG|MSG>" and message[1] == pixels
    assert isinstance(message[1], bytearray)


def test_a_silent_peer_never_blocks_recv_past_its_timeout():
    peer = ScriptedPeer()

    def mute(conn):
        handshake(peer, conn)
        time.sleep(2)

    peer.start(mute)
    client = dealer(peer.endpoint)
    try:
        client.send([b"anyone?"])
        t0 = time.monotonic()
        assert client.recv(0.3) is None
        assert time.monotonic() - t0 < 0.3 + transport_zmtp.RECONNECT + 0.5
    finally:
        client.close()
        peer.close()


def test_the_handshake_advances_across_short_polls():
    """The plug-in polls every 0.2 s (heartbeat waits can be 1 ms): a slow handshake must
    proceed across those calls instead of being restarted by each one."""
    peer = ScriptedPeer()

    def slow(conn):
        time.sleep(0.3)
        handshake(peer, conn)
        conn.sendall(b"".join(zmtp.message_chunks(read_message(conn))))
        until_closed(conn)

    peer.start(slow)
    client = dealer(peer.endpoint)
    try:
        client.send([b"patience"])
        polls = 0
        while (message := client.recv(0.01)) is None:
            polls += 1
            assert polls < 500
    finally:
        client.close()
        peer.close()
    assert message == [b"patience"] and polls > 10
    assert len(peer.seen) == 1  # one connection, one handshake
