"""Benchmark: a large result (and a large upload) through libzmq's ROUTER (what the server
used with ``--curve`` until its own spoke CURVE; here bare, without the server's login check)
and the server's pure-Python one (``zmtp_router.py``), to a pyzmq DEALER and to the
pure-Python ZmtpDealer.

    .venv/bin/python tests/bench_router.py [MiB] [repeats] [--curve]

``--curve``: both routers with CURVE (keys made in a temporary folder), to a pyzmq DEALER
with CURVE (the pure-Python client has no CURVE).

Prints, per pair, the best and median seconds from ``send`` to the whole frame received, and
the rate, for the server's send and for the client's (an upload: until the router hands the
message out). Loopback TCP, both ends in this process (the client in a thread).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from backend.server.curve_server import ServerKeys
from backend.server.endpoint import CurveServer, Inbound
from backend.server.zmtp_router import ZmtpRouter
from protocol import wire
from protocol.curve import CurveClient, generate_keypair, load_keypair
from protocol.transport_pyzmq import PyzmqDealer
from protocol.transport_zmtp import ZmtpDealer

KEY = b"b" * 32


class LibzmqRouter:
    """libzmq's ROUTER with the router interface this benchmark uses; PLAIN checked by pyzmq's
    ZAP handler (libzmq's PLAIN needs one), CURVE open to any client key."""

    def __init__(self, bind: str, key: bytes, limits: wire.Limits,
                 curve: CurveServer | None = None) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.maxmsgsize = limits.max_frame_bytes
        if curve is not None:
            keys = ServerKeys.from_file(curve.secret_key_file)
            self.sock.curve_secretkey = z85.encode(keys.secret)
            self.sock.curve_publickey = z85.encode(keys.public)
            self.sock.curve_server = True
        else:
            self.auth = ThreadAuthenticator(self.context)
            self.auth.start()
            self.auth.configure_plain(domain="*", passwords={
                wire.TRANSPORT_USER.decode(): wire.transport_password(key).decode()})
            self.sock.plain_server = True
        self.bind = bind

    def open(self) -> str:
        self.sock.bind(self.bind.replace(":0", ":*"))
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def poll(self, timeout_ms: int) -> None:
        self.sock.poll(timeout_ms)

    def receive(self):
        while self.sock.poll(0):
            identity, *frames = self.sock.recv_multipart(copy=False)
            yield Inbound(identity.bytes, [frame.buffer for frame in frames], len(frames))

    def send(self, identity: bytes, frames, what: str) -> None:
        self.sock.send_multipart([identity, *frames], copy=False)

    def close(self, term: bool = False) -> None:
        self.sock.close(linger=0)
        if hasattr(self, "auth"):
            self.auth.stop()
        self.context.term()


def curve_keys(folder: Path) -> tuple[CurveServer, CurveClient]:
    """A server key pair, a client pair and an allow-list holding the client's key."""
    _, server_secret = generate_keypair(folder / "server", "server")
    client_public, client_secret = generate_keypair(folder / "client", "client")
    allowed = folder / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes(client_public.read_bytes())
    return (CurveServer(server_secret, allowed),
            CurveClient.from_files(load_keypair(server_secret)[0], client_secret))


def one_pair(router_kind: type, client_kind: type, size: int, repeats: int,
             curve: tuple[CurveServer, CurveClient] | None = None,
             ) -> tuple[list[float], list[float]]:
    limits = wire.Limits(max_frame_bytes=size + 2**20)
    router = router_kind("tcp://127.0.0.1:0", KEY, limits,
                         **({"curve": curve[0]} if curve else {}))
    router.open()
    login = ({"curve": curve[1]} if curve else
             {"username": wire.TRANSPORT_USER, "password": wire.transport_password(KEY)})
    login["max_frame"] = size + 2**20
    extra = {"max_frames": 8, "handshake_timeout": 5.0} if client_kind is ZmtpDealer else {}
    client = client_kind(router.endpoint, **login, **extra)
    payload = memoryview(bytearray(size))
    times: list[float] = []
    uploads: list[float] = []
    try:
        client.send([b"hello"])
        identity = None
        while identity is None:  # the router's loop until the client's first message
            router.poll(10)
            if client_kind is ZmtpDealer:
                client.recv(0.01)  # its login advances as it reads
            for inbound in router.receive():
                identity = inbound.identity
        for _ in range(repeats):
            got = threading.Event()

            def receive(got: threading.Event = got) -> None:
                frames = client.recv(60.0)
                assert frames is not None and len(frames[0]) == size
                got.set()

            reader = threading.Thread(target=receive)
            reader.start()
            t0 = time.perf_counter()
            router.send(identity, [payload], "result")
            while not got.is_set():
                router.poll(1)
                list(router.receive())
            times.append(time.perf_counter() - t0)
            reader.join()
        for _ in range(repeats):
            t0 = time.perf_counter()
            writer = threading.Thread(target=client.send, args=([payload],))
            writer.start()
            got_upload = False
            while not got_upload:
                router.poll(1)
                for inbound in router.receive():
                    got_upload = len(inbound.frames[0]) == size
            uploads.append(time.perf_counter() - t0)
            writer.join()
    finally:
        client.close()
        router.close(term=True)
    return times, uploads


def main() -> None:
    args = [arg for arg in sys.argv[1:] if arg != "--curve"]
    with_curve = "--curve" in sys.argv[1:]
    mib = int(args[0]) if args else 256
    repeats = int(args[1]) if len(args) > 1 else 5
    size = mib * 2**20
    clients = (PyzmqDealer,) if with_curve else (PyzmqDealer, ZmtpDealer)
    folder = tempfile.TemporaryDirectory()
    curve = curve_keys(Path(folder.name)) if with_curve else None
    for router_kind in (LibzmqRouter, ZmtpRouter):
        for client_kind in clients:
            sends, uploads = one_pair(router_kind, client_kind, size, repeats, curve)
            for arrow, times in (("->", sends), ("<-", uploads)):
                best, median = min(times), statistics.median(times)
                print(f"{'CURVE ' if curve else ''}{router_kind.__name__:>10} {arrow} {client_kind.__name__:<11} {mib} MiB: "
                      f"best {best:.3f} s ({mib / best:.0f} MiB/s), median {median:.3f} s")


if __name__ == "__main__":
    main()
