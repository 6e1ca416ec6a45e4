"""The server's pure-Python ROUTER (backend/server/zmtp_router.py) against raw ZMTP peers: the
PLAIN login and its refusal, the limits that drop a connection, PING, fairness between
connections, the outbound cap, routing identities, and large sends without a copy. (The whole
server over it, with both clients: tests/test_server*.py.)"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from fixtures_server import TRANSPORTS, FakeEngine, client_for, running_server

from backend.server import zmtp_router
from backend.server.endpoint import Inbound
from backend.server.zmtp_router import ZmtpRouter
from protocol import wire, zmtp

KEY = b"k" * 32


@pytest.fixture
def router():
    router = ZmtpRouter("tcp://127.0.0.1:0", KEY, wire.Limits(max_frame_bytes=2**20),
                        handshake_seconds=0.5)
    router.open()
    yield router
    router.close()


def pump(router: ZmtpRouter, until: Callable[[list[Inbound]], bool], seconds: float = 5.0,
         got: list[Inbound] | None = None) -> list[Inbound]:
    """Run the router's loop until ``until(messages)`` holds; the messages received."""
    got = [] if got is None else got
    deadline = time.monotonic() + seconds
    while not until(got):
        assert time.monotonic() < deadline, f"gave up waiting; received {len(got)} messages"
        router.poll(10)
        got.extend(router.receive())
    return got


def connect(router: ZmtpRouter) -> socket.socket:
    host, port = router.endpoint.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the router closed the connection"
        data += chunk
    return data


def read_command(sock: socket.socket) -> tuple[bytes, bytes]:
    flags, size = read_exact(sock, 2)
    assert flags == zmtp.COMMAND
    return zmtp.parse_command(read_exact(sock, size))


def read_while_looping(router: ZmtpRouter, sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``sock``, running the router's loop in this thread meanwhile."""
    answer = b""
    deadline = time.monotonic() + 5
    sock.settimeout(0.01)
    while len(answer) < size:
        assert time.monotonic() < deadline
        router.poll(10)
        with contextlib.suppress(TimeoutError):
            answer += sock.recv(4096)
    return answer


def closed(sock: socket.socket, seconds: float = 5.0) -> bool:
    """Whether the peer closes ``sock`` within ``seconds`` (what arrives first is read)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


@contextlib.contextmanager
def looping(router: ZmtpRouter) -> Iterator[None]:
    """The router's loop in a thread meanwhile (no message may arrive)."""
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            router.poll(5)
            assert not list(router.receive())

    runner = threading.Thread(target=loop, daemon=True)
    runner.start()
    try:
        yield
    finally:
        done.set()
        runner.join()


def login(router: ZmtpRouter, password: bytes | None = None,
          identity: bytes = b"") -> socket.socket:
    """A raw connection that sent the whole PLAIN login at once and read the router's
    answers (the router runs meanwhile)."""
    sock = connect(router)
    sock.sendall(zmtp.greeting(zmtp.PLAIN, as_server=False)
                 + zmtp.plain_hello(wire.TRANSPORT_USER,
                                    password or wire.transport_password(KEY))
                 + zmtp.command(zmtp.INITIATE, zmtp.metadata(
                     [(zmtp.SOCKET_TYPE, b"DEALER"), (zmtp.IDENTITY, identity)])))
    with looping(router):
        greeting = zmtp.parse_greeting(read_exact(sock, zmtp.GREETING_SIZE))
        assert greeting.mechanism == zmtp.PLAIN and greeting.as_server
        assert read_command(sock) == (zmtp.WELCOME, b"")
        name, data = read_command(sock)
        assert name == zmtp.READY
        assert zmtp.parse_metadata(data)["socket-type"] == b"ROUTER"
    return sock


def message(*frames: bytes) -> bytes:
    return b"".join(zmtp.message_chunks(list(frames)))


def identities(router: ZmtpRouter) -> set[bytes]:
    return set(router._routes)


def test_a_wrong_password_is_refused_as_libzmq_refuses_it_and_counted(router):
    sock = connect(router)
    sock.sendall(zmtp.greeting(zmtp.PLAIN, as_server=False)
                 + zmtp.plain_hello(wire.TRANSPORT_USER, b"not the key's password"))
    answer = read_while_looping(router, sock, zmtp.GREETING_SIZE + 11)
    # libzmq 4.3.5's own refusal, byte for byte (tests/test_zmtp.py: LIBZMQ_REFUSAL)
    assert answer[zmtp.GREETING_SIZE:] == bytes.fromhex("04 09 5e 52 52 4f 52 03 34 30 30")
    assert router.gate.denied == 1 and router.gate.last_reason == "wrong key"
    assert closed(sock)
    assert not router._connections


def test_the_pure_client_sees_a_refused_login():
    from protocol.transport import LoginRefused
    from protocol.transport_zmtp import ZmtpDealer

    router = ZmtpRouter("tcp://127.0.0.1:0", KEY, wire.Limits())
    router.open()
    done = threading.Event()
    runner = threading.Thread(target=lambda: [router.poll(5) for _ in iter(done.is_set, True)],
                              daemon=True)
    runner.start()
    dealer = ZmtpDealer(router.endpoint, username=wire.TRANSPORT_USER, password=b"wrong",
                        max_frame=2**20, max_frames=8, handshake_timeout=2.0)
    try:
        dealer.send([b"x"])
        with pytest.raises(LoginRefused, match="400"):
            dealer.recv(5.0)
    finally:
        dealer.close()
        done.set()
        runner.join()
        router.close()
    assert router.gate.denied >= 1


def test_a_frame_over_the_limit_drops_that_connection_only(router):
    bully, honest = login(router), login(router)
    bully.sendall(zmtp.frame_header(2**20 + 1, zmtp.MORE) + b"x" * 1000)
    honest.sendall(message(b"hello"))
    got = pump(router, lambda got: len(got) == 1)
    assert [bytes(f) for f in got[0].frames] == [b"hello"]
    assert closed(bully)
    assert len(router._connections) == 1


def test_a_command_over_the_limit_drops_the_connection(router):
    sock = login(router)
    sock.sendall(zmtp.frame_header(zmtp.MAX_COMMAND_BYTES + 1, zmtp.COMMAND))
    pump(router, lambda _: not router._connections)
    assert closed(sock)


def test_a_connection_that_does_not_finish_its_login_is_dropped(router):
    silent = connect(router)
    half = connect(router)
    half.sendall(zmtp.greeting(zmtp.PLAIN, as_server=False))  # and no HELLO
    t0 = time.monotonic()
    pump(router, lambda _: len(router._connections) == 2)
    pump(router, lambda _: not router._connections)
    assert 0.4 < time.monotonic() - t0 < 3.0  # handshake_seconds is 0.5 here
    assert closed(silent) and closed(half)


def test_another_mechanism_is_dropped_at_its_greeting(router):
    sock = connect(router)
    sock.sendall(zmtp.greeting(zmtp.NULL, as_server=False))
    pump(router, lambda _: router._connections)
    pump(router, lambda _: not router._connections)
    assert closed(sock)
    assert router.gate.denied == 0  # no login was tried


def test_a_ping_is_answered_with_a_pong_carrying_its_context(router):
    sock = login(router)
    sock.sendall(zmtp.command(zmtp.PING, b"\x00\x64" + b"ctx-42"))
    answer = read_while_looping(router, sock, 2 + 5 + 6)
    assert zmtp.parse_command(answer[2:]) == (zmtp.PONG, b"ctx-42")


def test_a_flood_delays_another_connections_message_by_one_budget_at_most(router):
    """Two logged-in connections: one sends a message of 400,000 empty frames, the other a
    small message once the router has started on the flood. The small one is handed out by
    the next loop turn, while at most one budget of the flood's frames was read meanwhile;
    the flood ends as one message with its exact frame count and its first frames only."""
    flooder, other = login(router), login(router)
    frames = 400_000
    flood = b"\x01\x00" * (frames - 1) + b"\x00\x00"
    sender = threading.Thread(target=flooder.sendall, args=(flood,), daemon=True)
    sender.start()
    (conn,) = [c for c in router._connections if c.sock.getpeername() == flooder.getsockname()]
    pump(router, lambda _: conn.count > zmtp_router.TURN_FRAMES)
    before = conn.count
    other.sendall(message(b"ping"))
    router.poll(10)
    got = list(router.receive())
    assert [bytes(f) for m in got for f in m.frames] == [b"ping"]
    assert 0 < conn.count - before <= zmtp_router.TURN_FRAMES
    got = pump(router, lambda got: len(got) == 1)
    sender.join()
    assert got[0].count == frames and len(got[0].frames) == wire.MAX_FRAMES


def test_large_frames_are_kept_up_to_the_frame_cap_and_skipped_after_it(router):
    sock = login(router)
    big = bytes(range(256)) * 1024  # 256 KiB: read into a buffer of its own
    sock.sendall(message(*[big] * 9, b"end"))
    (got,) = pump(router, lambda got: len(got) == 1)
    assert got.count == 10 and len(got.frames) == wire.MAX_FRAMES
    assert all(bytes(f) == big for f in got.frames)
    sock.sendall(message(b"next"))
    (got,) = pump(router, lambda got: len(got) == 1)
    assert [bytes(f) for f in got.frames] == [b"next"]


def test_the_send_queue_holds_at_most_send_hwm_messages(router, monkeypatch, caplog):
    monkeypatch.setattr(zmtp_router, "SEND_HWM", 3)
    caplog.set_level(logging.DEBUG, logger="backend.server")
    sock = login(router)  # and never reads
    pump(router, lambda _: len(router._routes) == 1)
    (identity,) = identities(router)
    frame = memoryview(bytearray(16 * 2**20))  # more than the socket buffers take
    for _ in range(10):
        router.send(identity, [frame], "result")
    conn = router._routes[identity]
    assert conn.queued == 3
    router.send(b"\x00gone", [b"x"], "pong")
    drops = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped ")]
    assert drops.count(f"dropped result for {identity.hex()[:8]}: "
                       "Resource temporarily unavailable") == 7
    assert "dropped pong for 00676f6e: No route to host" in drops
    sock.close()


def test_identities_are_unique_and_a_peers_own_is_taken_once(router):
    first, second = login(router), login(router)
    pump(router, lambda _: len(router._routes) == 2)
    two = identities(router)
    assert all(len(i) == 5 and i[0] == 0 for i in two)
    first.close()
    pump(router, lambda _: len(router._routes) == 1)
    third = login(router)
    pump(router, lambda _: len(router._routes) == 2)
    assert len(two | identities(router)) == 3  # the new one is none of the earlier two
    other = ZmtpRouter("tcp://127.0.0.1:0", KEY, wire.Limits())
    other.open()
    try:
        elsewhere = login(other)
        assert not identities(other) & (two | identities(router))  # process-wide
        elsewhere.close()
    finally:
        other.close()
    named = login(router, identity=b"plug-in")
    assert b"plug-in" in identities(router)
    again = connect(router)  # the same identity again: dropped, as libzmq ignores it
    again.sendall(zmtp.greeting(zmtp.PLAIN, as_server=False)
                  + zmtp.plain_hello(wire.TRANSPORT_USER, wire.transport_password(KEY))
                  + zmtp.command(zmtp.INITIATE, zmtp.metadata(
                      [(zmtp.SOCKET_TYPE, b"DEALER"), (zmtp.IDENTITY, b"plug-in")])))
    with looping(router):
        assert closed(again)
    for sock in (second, third, named):
        sock.close()


def test_at_the_connection_cap_a_new_connection_replaces_the_oldest_still_logging_in(
        router, monkeypatch):
    monkeypatch.setattr(zmtp_router, "MAX_CONNECTIONS", 3)
    keyholder = login(router)
    idle = [connect(router) for _ in range(2)]
    pump(router, lambda _: len(router._connections) == 3)
    newcomer = login(router)
    assert closed(idle[0], 2.0) and not closed(idle[1], 0.2)
    assert len(router._connections) == 3
    for sock in (keyholder, *idle, newcomer):
        sock.close()


def test_at_the_cap_with_everyone_logged_in_the_longest_silent_makes_room(router,
                                                                          monkeypatch):
    """A key holder who opens ``MAX_CONNECTIONS`` logged-in connections must not shut the
    others out (issue 22, item 2): the one that has sent nothing for the longest is dropped
    (its DEALER connects again by itself), and the newcomer is served."""
    monkeypatch.setattr(zmtp_router, "MAX_CONNECTIONS", 3)
    first, silent, third = (login(router) for _ in range(3))
    pump(router, lambda _: len(router._routes) == 3)
    for sock in (first, third):  # ``silent`` has said nothing since its login
        sock.sendall(zmtp.frame_header(5) + b"hello")
    pump(router, lambda got: len(got) == 2)
    newcomer = login(router)
    newcomer.sendall(zmtp.frame_header(4) + b"here")
    got = pump(router, lambda got: len(got) == 1)
    assert [bytes(frame) for frame in got[0].frames] == [b"here"]
    assert closed(silent, 2.0)
    assert not closed(first, 0.2) and not closed(third, 0.2)
    assert len(router._connections) == 3
    for sock in (first, third, newcomer):
        sock.close()


def test_a_large_frame_is_sent_from_the_callers_buffer(router):
    sock = login(router)
    pump(router, lambda _: len(router._routes) == 1)
    (identity,) = identities(router)
    payload = bytearray(range(256)) * (256 * 1024)  # 64 MiB
    received = bytearray(len(payload) + 16)
    done = threading.Event()

    def reader() -> None:
        view, got = memoryview(received), 0
        sock.settimeout(10)
        while got < len(payload) + 9:
            got += sock.recv_into(view[got:])
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    tracemalloc.start()
    router.send(identity, [memoryview(payload)], "result")
    deadline = time.monotonic() + 30
    while not done.is_set():
        assert time.monotonic() < deadline
        router.poll(10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    thread.join()
    assert received[:9] == zmtp.frame_header(len(payload))
    assert received[9:9 + len(payload)] == payload
    assert peak < 2**20  # the 64 MiB went out of the caller's buffer


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets here")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_ipc_bind_serves_both_clients(tmp_path, transport):
    path = tmp_path / "backend.sock"
    with running_server(FakeEngine(), bind=f"ipc://{path}") as server:
        assert server.endpoint == f"ipc://{path}"
        with client_for(server, transport=transport) as client:
            assert client.ping()["queued"] == 0
    assert not path.exists()


def test_an_inproc_bind_is_refused_with_what_to_bind_instead():
    from backend.server.endpoint import ServerError

    router = ZmtpRouter("inproc://drag", KEY, wire.Limits())
    with pytest.raises(ServerError, match=r"tcp://127\.0\.0\.1:PORT"):
        router.open()
    router.close()
