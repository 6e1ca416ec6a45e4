"""Hostile input, property-based: the server answers (or drops) every message and keeps serving.

Each property sends one bad message and then a ping on the same socket; it asserts that the
bad message got exactly one reply of the expected kind before the pong. Run with ``-s`` to see
how many cases ran.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import zmq
from fixtures_server import (
    TRANSPORTS,
    FakeEngine,
    RawPeer,
    client_for,
    image,
    running_server,
    submit,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from limits import fired, safety_net

from backend.engine.errors import InvalidInput
from backend.engine.params import SPECS, resolve
from protocol import wire
from protocol.client import LIVENESS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = 200
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROTOCOL_FAULTS = {wire.BAD_MESSAGE, wire.BAD_SIGNATURE}
REPLIES = {wire.ERROR, wire.HELLO_REPLY, wire.SUBMIT_REPLY, wire.ATTACH_REPLY,
           wire.CANCEL_REPLY, wire.PONG, wire.SHUTDOWN_REPLY}

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def server():
    with running_server(FakeEngine()) as server:
        yield server


@pytest.fixture(scope="module")
def peer(server):
    peer = RawPeer(server)
    yield peer
    peer.close()


def replies_before_pong(peer: RawPeer, sent_id: str | None = None) -> list[wire.Message]:
    """Ping, and return the replies (not job events) received before the pong."""
    header, frames = peer.session.serialize(wire.PING, {})
    peer.send(frames)
    replies = []
    while True:
        message = peer.recv(5.0)
        assert message is not None, "the server stopped answering"
        if message.parent.get("msg_id") == header["msg_id"]:
            assert message.msg_type == wire.PONG
            return replies
        if message.msg_type in REPLIES and (sent_id is None
                                            or message.parent.get("msg_id") == sent_id):
            replies.append(message)


def one_error(peer: RawPeer, codes: set[str], sent_id: str | None = None) -> str:
    replies = replies_before_pong(peer, sent_id)
    assert len(replies) == 1, [r.content for r in replies]
    assert replies[0].msg_type == wire.ERROR, replies[0].content
    code = replies[0].content["code"]
    assert code in codes, replies[0].content
    return code


def valid_submit(peer: RawPeer, job_id: str = "fuzz") -> list[bytes]:
    content = {"job_id": job_id, "width": 8, "height": 6, "channels": 3, "handles": [[1, 1]],
               "targets": [[2, 2]], "method": "dragdiffusion"}
    return peer.frames(wire.SUBMIT, content, job_id=job_id, buffers=[image()])


def report(name: str, count: int) -> None:
    print(f"\nfuzz {name}: {count} cases")
    assert count >= EXAMPLES // 2


def test_random_frames(server, peer):
    count = 0

    @SETTINGS
    @given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=9),
           with_delimiter=st.booleans())
    def check(frames, with_delimiter):
        nonlocal count
        count += 1
        peer.send([wire.DELIMITER, *frames] if with_delimiter else frames)
        one_error(peer, PROTOCOL_FAULTS)

    check()
    report("random frames", count)


def test_truncated_messages(server, peer):
    count = 0

    @SETTINGS
    @given(data=st.data())
    def check(data):
        nonlocal count
        count += 1
        frames = valid_submit(peer)
        keep = data.draw(st.integers(1, len(frames)), "frames kept")
        frames = frames[:keep]
        last = frames[-1]
        frames[-1] = last[:data.draw(st.integers(0, max(0, len(last) - 1)), "bytes kept")]
        peer.send(frames)
        one_error(peer, PROTOCOL_FAULTS)

    check()
    report("truncated messages", count)


def test_wrong_types(server, peer):
    count = 0
    fields = ["job_id", "width", "height", "channels", "has_mask", "handles", "targets",
              "method", "params", "prompt", "seed", "preview", "client"]
    msg_types = st.sampled_from([t for t in wire.SCHEMAS if t != wire.SHUTDOWN]) | st.text(
        min_size=1, max_size=32)

    @SETTINGS
    @given(msg_type=msg_types, changes=st.dictionaries(st.sampled_from(fields), msgpack_values,
                                                       min_size=1, max_size=4),
           buffers=st.lists(st.binary(max_size=200), max_size=2))
    def check(msg_type, changes, buffers):
        nonlocal count
        count += 1
        content = {"job_id": f"wt{count}", "width": 8, "height": 6, "channels": 3,
                   "handles": [[1, 1]], "targets": [[2, 2]], "method": "dragdiffusion",
                   **changes}
        header, frames = peer.session.serialize(msg_type, content, buffers=buffers,
                                                job_id=f"wt{count}")
        peer.send(frames)
        # Exactly one reply: an error, or a normal reply if the changes happened to be valid.
        replies = replies_before_pong(peer, header["msg_id"])
        assert len(replies) == 1, [r.content for r in replies]

    check()
    report("wrong types", count)


def test_huge_declared_sizes(server, peer):
    count = 0
    big = st.integers(0, 2**64 - 1) | st.integers(-2**63, 0) | st.integers(9000, 2**20)

    @SETTINGS
    @given(width=big, height=big, channels=big, buffer=st.binary(max_size=64))
    def check(width, height, channels, buffer):
        nonlocal count
        count += 1
        content = {"job_id": f"huge{count}", "width": width, "height": height,
                   "channels": channels, "handles": [[1, 1]], "targets": [[2, 2]],
                   "method": "dragdiffusion"}
        header, frames = peer.session.serialize(wire.SUBMIT, content, job_id=f"huge{count}",
                                                buffers=[buffer])
        t0 = time.monotonic()
        peer.send(frames)
        one_error(peer, {wire.INVALID_INPUT}, header["msg_id"])
        assert time.monotonic() - t0 < 2.0  # refused without allocating anything

    check()
    report("huge declared sizes", count)


def test_bad_signatures(server, peer):
    count = 0

    @SETTINGS
    @given(data=st.data())
    def check(data):
        nonlocal count
        count += 1
        frames = valid_submit(peer, "sig")  # fixed sizes, so draws are reproducible
        how = data.draw(st.sampled_from(["flip", "random", "other key", "empty"]))
        if how == "flip":
            index = data.draw(st.integers(1, len(frames) - 1), "frame")
            changed = bytearray(frames[index])
            position = data.draw(st.integers(0, len(changed) - 1), "byte")
            changed[position] ^= 1 << data.draw(st.integers(0, 7), "bit")
            frames[index] = bytes(changed)
        elif how == "random":
            frames[1] = data.draw(st.binary(min_size=64, max_size=64)
                                  | st.text("0123456789abcdef", min_size=64, max_size=64)
                                  .map(str.encode))
        elif how == "other key":
            other = wire.Session(data.draw(st.binary(min_size=1, max_size=64)), me="x",
                                 peer="y")
            frames = [bytes(f) for f in other.serialize(wire.PING, {})[1]]
        else:
            frames[1] = b""
        peer.send(frames)
        code = one_error(peer, PROTOCOL_FAULTS | {wire.REPLAYED})
        assert code == wire.BAD_SIGNATURE or (how == "other key" and code == wire.REPLAYED)

    check()
    report("bad signatures", count)


def test_replayed_messages(server, peer):
    count = 0

    @SETTINGS
    @given(msg_type=st.sampled_from([wire.PING, wire.HELLO, wire.ATTACH, wire.SUBMIT]),
           repeats=st.integers(1, 3), note=st.text(max_size=30))
    def check(msg_type, repeats, note):
        nonlocal count
        count += 1
        job_id = f"replay{count}"
        content = {"job_id": job_id} if msg_type == wire.ATTACH else {}
        buffers = []
        if msg_type == wire.SUBMIT:
            content = {"job_id": job_id, "width": 8, "height": 6, "channels": 3,
                       "handles": [[1, 1]], "targets": [[2, 2]], "method": "dragdiffusion",
                       "prompt": "steps=1"}
            buffers = [image()]
        content["note"] = note  # unknown fields are ignored; varies the signed bytes
        header, frames = peer.session.serialize(msg_type, content, job_id=job_id,
                                                buffers=buffers)
        frames = [bytes(f) for f in frames]
        peer.send(frames)  # the original is served normally
        (first,) = replies_before_pong(peer, header["msg_id"])
        assert first.msg_type in REPLIES
        for _ in range(repeats):
            peer.send(frames)
            assert one_error(peer, {wire.REPLAYED}, header["msg_id"]) == wire.REPLAYED

    check()
    report("replayed messages", count)


def test_hostile_msgpack_in_a_signed_frame(server, peer):
    count = 0

    @SETTINGS
    @given(content=st.binary(max_size=400) | msgpack_values.map(msgpack.packb))
    def check(content):
        nonlocal count
        count += 1
        header = peer.session.header(wire.PING)
        h, p = msgpack.packb(header), msgpack.packb({})
        sig = wire.signature(peer.session.key, h, p, content)[0]
        peer.send([wire.DELIMITER, sig, h, p, content])
        replies_before_pong(peer)  # answered (error or pong) or refused; never stuck

    check()
    report("hostile msgpack", count)


hostile_numbers = st.sampled_from([math.nan, math.inf, -math.inf, 2**64 - 1, -2**63, 1e308,
                                   -1e-308, 0, -1, 0.5, True, False])
param_values = hostile_numbers | msgpack_values


def test_hostile_parameters_are_invalid_input(server, peer):
    """Every bad ``params`` map is refused as ``invalid_input`` naming the knob (issue 11.1)."""
    count = 0
    knobs = st.sampled_from(sorted(SPECS))
    names = knobs | st.text(max_size=12) | st.binary(min_size=1, max_size=12)

    @SETTINGS
    @given(params=st.dictionaries(names, param_values, min_size=1, max_size=4))
    def check(params):
        nonlocal count
        count += 1
        job_id = f"param{count}"
        content = {"job_id": job_id, "width": 8, "height": 6, "channels": 3,
                   "handles": [[1, 1]], "targets": [[2, 2]], "method": "gooddrag",
                   "params": params, "prompt": "steps=1"}
        header, frames = peer.session.serialize(wire.SUBMIT, content, job_id=job_id,
                                                buffers=[image()])
        peer.send(frames)
        (reply,) = replies_before_pong(peer, header["msg_id"])
        try:
            resolve("gooddrag", params)
        except InvalidInput as exc:
            assert reply.msg_type == wire.ERROR, reply.content
            assert reply.content["code"] == wire.INVALID_INPUT, reply.content
            assert reply.content["message"] == str(exc)
            named = [k.replace("-", "_") for k in params if isinstance(k, str)]  # as read
            bad = [k for k in named if k in SPECS and f"{k!r}" in str(exc)]
            assert bad or any(s in str(exc) for s in ("parameter names", "unknown parameter",
                                                      "UNet passes"))
        else:
            assert reply.msg_type == wire.SUBMIT_REPLY, reply.content

    check()
    report("hostile parameters", count)


def test_oversized_frame_is_dropped_and_the_server_serves_on():
    with running_server(FakeEngine(), limits=wire.Limits(max_frame_bytes=2**20)) as server:
        bully = RawPeer(server)
        bully.send([wire.DELIMITER, b"0" * 64, b"x", b"x", b"x" * (2 * 2**20)])
        assert bully.recv(0.5) is None  # disconnected at the frame's size field: no answer
        bully.close()
        with client_for(server) as client:
            assert client.ping()["queued"] == 0


def test_an_oversized_frame_from_the_pure_transport_costs_its_connection_only():
    """The pure-Python transport sending past max_frame_bytes (its client checks first; this
    one does not): the server drops that connection, the transport reconnects and serves on."""
    from protocol.transport_zmtp import ZmtpDealer

    with running_server(FakeEngine(), limits=wire.Limits(max_frame_bytes=2**20)) as server:
        session = wire.Session(server.key, me="test", peer="the backend")
        bully = ZmtpDealer(server.endpoint, username=wire.TRANSPORT_USER,
                           password=wire.transport_password(server.key), max_frame=2**20,
                           max_frames=8, handshake_timeout=2.0)
        try:
            bully.send(session.serialize(wire.PING, {}, buffers=[b"x" * (2 * 2**20)])[1])
            assert bully.recv(0.5) is None  # dropped: no answer
            bully.send(session.serialize(wire.PING, {})[1])
            reply = session.parse(bully.recv(5.0))
        finally:
            bully.close()
        assert reply.msg_type == wire.PONG


# A separate process, so its sending does not share this process's GIL with the server. It
# speaks ZMTP 3.0 over a plain TCP socket: a greeting without a login (NULL mechanism), then,
# once the server has greeted back, one message of a million empty frames (2 MB).
_FLOOD = """
import socket, sys, time
host, port = sys.argv[1].removeprefix("tcp://").rsplit(":", 1)
greeting = b"\\xff" + bytes(7) + b"\\x01\\x7f\\x03\\x00" + b"NULL".ljust(20, b"\\0") + bytes(32)
body = b"\\x05READY\\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
ready = b"\\x04" + bytes([len(body)]) + body
frames = b"\\x01\\x00" * (int(sys.argv[2]) - 1) + b"\\x00\\x00"
with socket.create_connection((host, int(port))) as sock:
    print("sending", flush=True)
    try:
        sock.sendall(greeting)
        peer = b""
        while len(peer) < 64 and (data := sock.recv(64 - len(peer))):
            peer += data
        sock.sendall(ready + frames)
        print("sent", flush=True)
        time.sleep(60)  # closing now could reset the connection before the server reads it
    except OSError as exc:
        print("refused:", exc, flush=True)
"""


def flood(server, frames: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _FLOOD, server.endpoint, str(frames)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "sending"
    return proc


def ping_times(client, seconds: float) -> list[float]:
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        client.ping()
        times.append(time.monotonic() - t0)
        time.sleep(0.02)
    return times


def test_a_keyless_million_frame_message_never_stalls_other_clients():
    """Issue 11.2: one unauthenticated 2 MB message (a million empty frames) used to stall
    every client for ~40 s. Without the key it cannot complete the handshake now."""
    with running_server(FakeEngine()) as server, client_for(server, timeout=5.0) as client:
        client.ping()
        attacker = flood(server, 10**6)
        try:
            times = ping_times(client, 5.0)
        finally:
            attacker.kill()
            outcome = attacker.communicate()[0].strip()
    times.sort()
    print(f"\nping while a keyless client sends 10**6 frames: {len(times)} pings, median "
          f"{times[len(times) // 2] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms; "
          f"attacker: {outcome}")
    assert times[-1] < 1.0  # the old server needed tens of seconds for this message


def test_a_key_holders_many_frames_are_dropped_while_read():
    """A message with too many frames is read frame by frame, dropped, and refused once."""
    FRAMES = 200_000
    with running_server(FakeEngine()) as server, client_for(server, timeout=30.0) as client:
        peer = RawPeer(server)
        frames = [b""] * FRAMES
        tracemalloc.start()
        t0 = time.monotonic()
        peer.send(frames)
        reply = peer.recv(120)
        elapsed = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert reply is not None and reply.content["code"] == wire.BAD_MESSAGE
        assert f"too many frames ({FRAMES})" in reply.content["message"]
        assert client.ping()["queued"] == 0
        peer.close()
    print(f"\na key holder's {FRAMES}-frame message: sent, drained and refused in {elapsed:.1f} s; "
          f"Python memory peak while it was read: {peak / 2**20:.1f} MiB")
    assert peak < 10 * 2**20  # reading them into a list took ~60 MiB


# A key holder in its own process (so its sending does not share the server's GIL): it logs in
# with the key and sends ``count`` messages of ``frames`` empty frames each, through libzmq's
# DEALER (pyzmq: one call per frame, so 3,000,000 frames take it seconds), or as raw ZMTP bytes
# written at once after the pure-Python DEALER's login (raw: 10,000,000 frames in a moment).
_KEY_HOLDER_FLOOD = """
import sys, time
from protocol import wire
endpoint, key, sender = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
frames, count = map(int, sys.argv[4:])
if sender == "pyzmq":
    import zmq
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.plain_username = wire.TRANSPORT_USER
    sock.plain_password = wire.transport_password(key)
    sock.connect(endpoint)
    message = [b""] * frames
    print("sending", flush=True)
    for _ in range(count):
        sock.send_multipart(message)
else:
    from protocol import transport_zmtp
    dealer = transport_zmtp.ZmtpDealer(
        endpoint, username=wire.TRANSPORT_USER, password=wire.transport_password(key),
        max_frame=2**20, max_frames=8, handshake_timeout=60.0)
    deadline = time.monotonic() + 60
    while dealer._state != transport_zmtp.OPEN and time.monotonic() < deadline:
        dealer.recv(0.05)  # the login
    message = b"\\x01\\x00" * (frames - 1) + b"\\x00\\x00"  # MORE, empty; then the last
    dealer._sock.settimeout(None)  # the login left a short one
    print("sending", flush=True)
    for _ in range(count):
        dealer._sock.sendall(message)
print("sent", flush=True)
time.sleep(120)
"""

# Another client, in a process of its own as an artist's plug-in is: it pings every 20 ms
# until its standard input closes, then prints each ping's round trip. argv: endpoint, HMAC key,
# and with CURVE the server's public key (Z85) and the client's secret key file.
_OTHER_CLIENT = """
import json, sys, threading, time
from protocol.client import Client
from protocol.curve import CurveClient
endpoint, key, curve = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3:5]
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
times = []
with Client(endpoint, key, timeout=30.0,
            curve=CurveClient.from_files(*curve) if curve else None) as client:
    client.ping()
    print("ready", flush=True)
    while not done.is_set():
        t0 = time.monotonic()
        client.ping()
        times.append(time.monotonic() - t0)
        time.sleep(0.02)
print(json.dumps(times), flush=True)
"""


def others_pings_during_flood(server, other_args: list[str], flood_script: str,
                              flood_args: list[str], count: int, what: str,
                              limit: float) -> tuple[list[float], float, int]:
    """Start the other client (``_OTHER_CLIENT`` with ``other_args``) and a key holder's flood
    (``flood_script``, argv: the endpoint then ``flood_args``) in processes of their own; wait
    until the server has refused the flood's ``count`` messages. Returns the other client's
    ping round trips (sorted), the seconds from the flood's first send until the server had
    read it all, and the refusals counted."""

    def refusals() -> int:
        return server._refusals._logged + sum(server._refusals._suppressed.values())

    def start(script: str, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, server.endpoint, *args],
                                cwd=ROOT, text=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)

    other = start(_OTHER_CLIENT, [server.key.hex(), *other_args])
    flood = start(flood_script, flood_args)
    try:
        assert other.stdout.readline().strip() == "ready"
        assert flood.stdout.readline().strip() == "sending"
        started = time.monotonic()
        while refusals() < count:  # the server has read every message to its end
            assert time.monotonic() - started < safety_net(limit), fired(what, limit)
            time.sleep(0.05)
        flood_seconds = time.monotonic() - started
        time.sleep(0.5)
        times = sorted(json.loads(other.communicate("", timeout=safety_net(60))[0]))
    finally:
        for process in (flood, other):
            process.kill()
            process.wait()
    return times, flood_seconds, refusals()


@pytest.mark.parametrize("sender, frames", [("pyzmq", 3 * 10**6), ("raw", 10**7)])
def test_a_key_holders_multi_million_frame_messages_do_not_stall_other_clients(sender, frames):
    """N6: a key holder's message of a million empty frames stalled the server loop 17–19 s
    (dropped one Python call per frame): another client's ping waited 10.4 s, past the 6 s
    after which a plug-in reports the backend gone. With libzmq's ROUTER dropping the rest
    of such a message inside libzmq (7f26585), the others still waited for the whole message,
    about 0.2-0.3 µs a frame: 0.6-1.1 s for 3,000,000 frames, 2.6-3.0 s for 10,000,000. The
    server's own ROUTER (``zmtp_router``) reads each connection for one budget a turn, so
    the others wait one budget (a few ms) at most, whatever the message's length. The other
    client is a process of its own, as a plug-in is; timed from the key holder's first send."""
    count = 2
    with running_server(FakeEngine()) as server:
        times, flood_seconds, refused = others_pings_during_flood(
            server, [], _KEY_HOLDER_FLOOD, [server.key.hex(), sender, str(frames), str(count)],
            count, "the key holder's flood", 180)
    print(f"\nanother client's ping while a key holder sends {count} messages of {frames:,} "
          f"empty frames ({sender}): {len(times)} pings, median "
          f"{times[len(times) // 2] * 1000:.1f} ms, max {times[-1] * 1000:.0f} ms (goal: "
          f"100 ms); the server had read them {flood_seconds:.1f} s after the first send")
    assert refused == count
    assert times[-1] < LIVENESS / 3  # a plug-in reports the backend gone after LIVENESS
    if sender == "raw":  # 2.6-3.0 s with libzmq's ROUTER: a hang guard's margin both ways
        assert times[-1] < safety_net(1.0)


# A CURVE key holder (pyzmq's DEALER): argv endpoint, server key (Z85), client secret file,
# frames, count.
_CURVE_FLOOD = """
import sys, time
import zmq
from protocol.curve import CurveClient
endpoint, server_key, secret = sys.argv[1:4]
frames, count = map(int, sys.argv[4:])
sock = zmq.Context.instance().socket(zmq.DEALER)
CurveClient.from_files(server_key, secret).apply(sock)
sock.connect(endpoint)
message = [b""] * frames
print("sending", flush=True)
for _ in range(count):
    sock.send_multipart(message)
print("sent", flush=True)
time.sleep(120)
"""


def test_a_curve_key_holders_multi_million_frame_messages_do_not_stall_other_clients(
        tmp_path):
    """N6 with ``--curve``: libzmq's ROUTER served CURVE until the server's own ROUTER spoke
    it, so an allow-listed client's message of 3,000,000 empty frames still held the others
    for the whole message (~0.3 µs a frame). Now each MESSAGE frame is one wire frame: a
    connection is read for one budget a turn, and frames past ``wire.MAX_FRAMES`` are opened
    (their MORE bit is inside the box) but never kept. Both clients are processes of their
    own, with allow-listed keys. Another client's max ping: 828-892 ms with libzmq's CURVE
    ROUTER, 15-30 ms with this one (median 0.8-0.9 and 2.4 ms: opening the boxes costs)."""
    from backend.server.endpoint import CurveServer
    from protocol.curve import generate_keypair, load_keypair

    _, server_secret = generate_keypair(tmp_path / "server", "server")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secrets = []
    for name in ("flood", "other"):
        public, secret = generate_keypair(tmp_path / name, name)
        (allowed / f"{name}.key").write_bytes(public.read_bytes())
        secrets.append(str(secret))
    server_key = load_keypair(server_secret)[0].decode("ascii")
    count, frames = 2, 3 * 10**6
    with running_server(FakeEngine(), curve=CurveServer(server_secret, allowed)) as server:
        times, flood_seconds, refused = others_pings_during_flood(
            server, [server_key, secrets[1]], _CURVE_FLOOD,
            [server_key, secrets[0], str(frames), str(count)], count, "the CURVE flood", 300)
    print(f"\nanother CURVE client's ping while a CURVE key holder sends {count} messages of "
          f"{frames:,} empty frames: {len(times)} pings, median "
          f"{times[len(times) // 2] * 1000:.1f} ms, max {times[-1] * 1000:.0f} ms (goal: "
          f"100 ms); the server had read them {flood_seconds:.1f} s after the first send")
    assert refused == count
    assert times[-1] < LIVENESS / 3  # a plug-in reports the backend gone after LIVENESS
    # libzmq's CURVE ROUTER (the server's until this ROUTER spoke CURVE): 828-892 ms here,
    # 0.6-1.1 s for the same flood with PLAIN; this ROUTER: 15-30 ms. A guard both ways.
    assert times[-1] < safety_net(0.5)


def test_still_serves_a_real_job_afterwards(server):
    with client_for(server) as client:
        events = list(client.events(submit(client), timeout=30))
    assert events[-1].type == "finished"


def test_a_flood_of_refused_messages_is_summarised_not_logged_line_by_line(caplog):
    """11.3: each refused message used to write a log line (~1 GB/hour under a flood)."""
    caplog.set_level("INFO", logger="backend.server")
    with running_server(FakeEngine(), refusal_log_interval=600.0) as server:
        wrong_key = RawPeer(server, login=b"another key")
        # Once its login was refused libzmq has no pipe left to queue on: EAGAIN (a race that
        # made this test flaky); either way nothing gets through.
        with contextlib.suppress(zmq.Again):
            wrong_key.socket.send(b"nothing gets through", zmq.NOBLOCK)
        peer = RawPeer(server)
        for _ in range(300):
            peer.send([wire.DELIMITER, b"0" * 64, b"x", b"x", b"x"])  # bad signature
        for _ in range(300):  # the 300 error replies
            assert peer.recv(30.0) is not None
        deadline = time.monotonic() + 30
        while server._transport.gate.denied == 0:  # the wrong key's login was refused
            assert time.monotonic() < deadline
            time.sleep(0.05)
        peer.close()
        wrong_key.close()
    # The summary comes at the end of each interval, and when the server stops.
    lines = [r.getMessage() for r in caplog.records if r.name == "backend.server"]
    single = [line for line in lines if line.startswith("refused a message")]
    (summary,) = [line for line in lines if "more refused messages" in line]
    assert len(single) == 5
    assert "295 more refused messages (bad_signature: 295)" in summary
    assert int(summary.split("), ")[1].split()[0]) >= 1 and "logins with a wrong key" in summary


def test_client_strings_cannot_forge_log_lines():
    """11.3: a key holder could write fake log lines through ``hello.client``."""
    import io
    import logging

    from backend.server.log import OneLineFormatter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("backend.server")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel("INFO")
    try:
        with running_server(FakeEngine()) as server:
            forged = "gimp\n2030-01-01 INFO backend.server: job x finished\u2028"
            with client_for(server, name=forged) as client:
                client.hello()
            peer = RawPeer(server)
            peer.session.session_id = "ab\ncd\r\x1b[2J"
            peer.request(wire.PING, {})
            peer.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = out.getvalue().splitlines()
    (hello,) = [line for line in lines if line.startswith("INFO hello from")]
    assert "gimp\\n2030-01-01 INFO backend.server: job x finished\\u2028" in hello
    assert not [line for line in lines if line.startswith("2030")]
    assert all(line.startswith(("INFO", "WARNING", "ERROR", "DEBUG")) for line in lines)


# Characters that reorder or hide the text around them: the bidi embeddings and overrides
# (U+202A–E) and isolates (U+2066–9), the Arabic letter mark, zero-width characters and marks,
# the byte-order mark, a tag character, and a Hangul filler (a letter that draws nothing).
REORDER_OR_HIDE = ("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u061c\u200b\u200e"
                   "\u200f\u2060\ufeff\U000e0041\u3164\u00ad")


def test_log_lines_escape_every_character_that_reorders_or_hides_text():
    """N7: bidi controls reached the log as they were, so a client name could make a log
    viewer show a line in another order than it was written ("job x finished" reversed…)."""
    import io
    import logging

    from backend.server.log import OneLineFormatter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("backend.server")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel("INFO")
    try:
        with running_server(FakeEngine()) as server:
            with client_for(server, name=f"gimp {REORDER_OR_HIDE} end") as client:
                client.hello()
            try:
                raise ValueError(f"bad field {REORDER_OR_HIDE}")
            except ValueError:
                logger.exception("a traceback quoting a client's text")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = out.getvalue()
    shown = [c for c in REORDER_OR_HIDE if c in text]
    assert not shown, [f"U+{ord(c):04X}" for c in shown]
    (hello,) = [line for line in text.splitlines() if line.startswith("INFO hello from")]
    assert "gimp \\u202a\\u202b\\u202c\\u202d\\u202e\\u2066" in hello and hello.endswith("end)")
    assert "\\U000e0041\\u3164\\xad end" in hello


def test_a_key_holder_dating_messages_ahead_cannot_lock_other_clients_out():
    """N2: one key holder's pings dated now + 290 s, more of them than the replay guard keeps,
    made every honest message ``replayed`` for ~5 minutes. Now such messages are refused (at
    most 10 s ahead), and an eviction raises only the sender's own session's floor."""
    capacity = 500
    with running_server(FakeEngine(), replay_capacity=capacity) as server, \
            client_for(server) as honest:
        honest.ping()
        bully = RawPeer(server)
        refused = Counter()
        for ahead in (290.0, 9.0):  # as far as the window allowed, then as far as allowed now
            for _ in range(capacity + 100):
                header = bully.session.header(wire.PING)
                header["time"] += ahead
                h, p, c = msgpack.packb(header), msgpack.packb({}), msgpack.packb({})
                bully.send([wire.DELIMITER, wire.signature(server.key, h, p, c)[0], h, p, c])
            for _ in range(capacity + 100):
                reply = bully.recv(10.0)
                assert reply is not None
                refused[(ahead, reply.content.get("code"))] += 1
        pongs = [honest.ping()["queued"] for _ in range(20)]  # JobFailed(replayed) before
        bully.close()
    print(f"\nreplies to the key holder's pings: {dict(refused)}; honest pings after: "
          f"{len(pongs)} pongs")
    assert refused == {(290.0, wire.REPLAYED): capacity + 100, (9.0, None): capacity + 100}
    assert pongs == [0] * 20


def test_a_heartbeat_waiting_behind_other_clients_messages_still_counts():
    """N10: a client heart-beating every second had its running job cancelled as "client gone"
    during another client's burst. The TTL was checked against the messages read so far, after
    each batch of 64: when the loop had been busy for longer than the TTL and more than 64
    messages of other connections came first in the socket's round robin, the client's
    heartbeat sat there unread, and its job was cancelled. Here one loop turn is held for
    2.5 s (the TTL is 1 s) while 100 other connections and then the client send a message
    each (with the old check: cancelled, reason client_gone)."""
    engine = FakeEngine(steps=100_000, delay=0.01)
    with running_server(engine, client_ttl=1.0) as server:
        honest, staller = RawPeer(server), RawPeer(server)
        others = [RawPeer(server) for _ in range(100)]
        for peer in others:  # all connected and idle
            peer.request(wire.PING, {})
        content = {"job_id": "mine", "width": 8, "height": 6, "channels": 3,
                   "handles": [[1, 1]], "targets": [[2, 2]], "method": "dragdiffusion"}
        assert honest.request(wire.SUBMIT, content, job_id="mine",
                              buffers=[image()]).msg_type == wire.SUBMIT_REPLY
        assert engine.step_started.wait(10)
        original = server._on_hello

        def slow_hello(message, identity):  # one long loop turn, as a busy machine makes
            if message.content["client"] == "stall":
                time.sleep(2.5)
            original(message, identity)

        server._on_hello = slow_hello

        def heartbeat() -> None:
            honest.send(honest.frames(wire.ATTACH, {"job_id": "mine"}, job_id="mine"))

        heartbeat()
        time.sleep(0.1)
        staller.send(staller.frames(wire.HELLO, {"client": "stall"}))
        staller.send(staller.frames(wire.PING, {}))  # its connection stays first to be read
        time.sleep(0.3)
        for peer in others:
            peer.send(peer.frames(wire.PING, {}))
        time.sleep(0.3)
        heartbeat()  # 0.7 s after the last one: well inside the TTL, but behind 100 others
        for _ in range(12):  # through the stall and after it, every 0.25 s
            time.sleep(0.25)
            heartbeat()
        job = server._jobs.get("mine")
        state, reason = job.state, job.cancel_reason if job.cancel.cancelled else None
        for peer in [honest, staller, *others]:
            peer.close()
    assert (state, reason) == ("running", None)


def _zmtp_login(endpoint: str, key: bytes):
    """A raw TCP connection that completed the real server's PLAIN handshake."""
    import socket

    from protocol import zmtp

    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(zmtp.greeting(zmtp.PLAIN, as_server=False))

    def read(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            assert chunk, "the server closed the connection during the handshake"
            data += chunk
        return data

    def command() -> bytes:
        flags, size = read(2)
        assert flags == zmtp.COMMAND
        return zmtp.parse_command(read(size))[0]

    assert zmtp.parse_greeting(read(64)).mechanism == zmtp.PLAIN
    sock.sendall(zmtp.plain_hello(wire.TRANSPORT_USER, wire.transport_password(key)))
    assert command() == zmtp.WELCOME
    sock.sendall(zmtp.command(zmtp.INITIATE, zmtp.metadata([("Socket-Type", b"DEALER")])))
    assert command() == zmtp.READY
    return sock


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_that_closes_mid_frame_costs_nothing(transport):
    """A logged-in peer sends the envelope and half of a 4 MiB pixel frame, then vanishes:
    the server drops the half message (never handled) and serves every client on."""
    from protocol import zmtp

    with running_server(FakeEngine()) as server:
        session = wire.Session(server.key, me="test", peer="the backend")
        frames = session.serialize(wire.PING, {})[1]
        sock = _zmtp_login(server.endpoint, server.key)
        sock.sendall(b"".join(zmtp.frame_header(len(f), zmtp.MORE) + f for f in frames))
        sock.sendall(zmtp.frame_header(4 * 2**20) + bytes(2 * 2**20))  # half of it
        sock.close()
        with client_for(server, transport=transport) as client:
            assert client.ping()["queued"] == 0
            assert list(client.events(submit(client), timeout=30))[-1].type == "finished"
