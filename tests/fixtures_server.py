"""Helpers for the protocol/server tests: a scriptable fake engine and an in-thread server.

Run as a script (``python tests/fixtures_server.py CONNECTION_FILE``) it serves the fake
engine in its own process, for the tests that kill a backend.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zmq

if __name__ == "__main__":  # make the repository importable when run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.engine.errors import OutOfMemory
from backend.engine.interface import Engine
from backend.engine.params import MethodTable
from backend.engine.types import (
    CancelToken,
    DragRequest,
    DragResult,
    PrepareResult,
    PreviewFn,
    ProgressFn,
)
from backend.server.server import Server
from protocol import wire
from protocol.client import Client


class FakeEngine(Engine):
    """Runs 'phases' of sleep steps; the prompt scripts it: ``steps=N delay=S raise=oom|crash
    warn=A,B prepare=N`` (a prepare's steps).

    The result is the inverted input; the final handles are the targets. It checks the cancel
    token before every step, like the real engine, and records what it ran.
    """

    def __init__(self, steps: int = 3, delay: float = 0.0,
                 table: MethodTable | None = None) -> None:
        self.table = table if table is not None else MethodTable()
        self.steps = steps
        self.delay = delay
        self.runs: list[DragRequest] = []
        self.prepares: list[DragRequest] = []  # every prepare started (again after yielding)
        self.prepared: list[DragRequest] = []  # the prepares that ran to their end
        self.calls: list[str] = []  # "run <prompt>" / "prepare <prompt>", in the order started
        self.steps_after_cancel: list[int] = []
        self.step_started = threading.Event()  # set at each step; tests clear it

    def info(self) -> dict[str, Any]:
        return {"model": "fake-model", "device": "cpu", "memory": {"total": np.int64(1 << 30)}}

    @staticmethod
    def script(request: DragRequest) -> dict[str, str]:
        return dict(word.split("=", 1) for word in request.prompt.split() if "=" in word)

    def prepare_image(self, request: DragRequest, progress: ProgressFn | None = None,
                      cancel: CancelToken | None = None, masked: bool = True) -> PrepareResult:
        """'lora' steps of the prompt's ``prepare=N`` (default ``steps``) and ``delay``; a
        prepare whose last step ran is recorded in ``prepared``."""
        self.prepares.append(request)
        self.calls.append(f"prepare {request.prompt}")
        cancel = cancel or CancelToken()
        progress = progress or (lambda phase, step, total: None)
        script = self.script(request)
        steps = int(script.get("prepare", script.get("steps", self.steps)))
        delay = float(script.get("delay", self.delay))
        after_cancel = 0
        try:
            for step in range(steps):
                cancel.check()
                self.step_started.set()
                progress("lora", step, steps)
                time.sleep(delay)
                after_cancel += cancel.cancelled
        finally:
            self.steps_after_cancel.append(after_cancel)
        self.prepared.append(request)
        return PrepareResult({"lora": steps * delay}, {"work": {"fe": {"lora": steps}}})

    def run(self, request: DragRequest, progress: ProgressFn | None = None,
            cancel: CancelToken | None = None, preview: PreviewFn | None = None,
            preview_interval: float = 0.0) -> DragResult:
        self.runs.append(request)
        self.calls.append(f"run {request.prompt}")
        cancel = cancel or CancelToken()
        progress = progress or (lambda phase, step, total: None)
        script = self.script(request)
        steps, delay = int(script.get("steps", self.steps)), float(script.get("delay", self.delay))
        if script.get("raise") == "oom":
            raise OutOfMemory("the device ran out of memory: lower work_size")
        if script.get("raise") == "crash":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if script.get("raise") == "bug":
            raise ValueError("something broke")
        timings = {}
        after_cancel = 0
        try:
            for phase in ("inversion", "drag"):
                t0 = time.monotonic()
                for step in range(steps):  # like the engine: the step now starting
                    cancel.check()
                    self.step_started.set()
                    progress(phase, step, steps)
                    if preview is not None:
                        preview(phase, step, request.image)
                    time.sleep(delay)
                    after_cancel += cancel.cancelled
                timings[phase] = time.monotonic() - t0
        finally:
            self.steps_after_cancel.append(after_cancel)
        warnings = script["warn"].split(",") if "warn" in script else []
        return DragResult(image=255 - request.image, handles=list(request.targets),
                          timings=timings, stats={"steps": np.int32(steps), "shape": (1, 2)},
                          warnings=warnings)


def on_one_thread(load: Callable[[], Any]) -> Any:
    """``load()`` with torch on one intra-op thread (a Ray replica's loader, for the Ray tier's
    throughput figure: one core per replica)."""
    import torch

    torch.set_num_threads(1)
    return load()


@contextmanager
def running_server(engine: Any = None, *, load: Callable[[], Any] | None = None,
                   connection_file: Path | None = None, **kwargs: Any) -> Iterator[Server]:
    """A started server serving in a background thread; stopped (and checked) on exit."""
    server = Server(load or (lambda: engine), model_name="fake-model",
                    bind=kwargs.pop("bind", "tcp://127.0.0.1:0"),
                    connection_file=connection_file, **kwargs)
    server.start()
    thread = threading.Thread(target=server.serve_forever, name="test-server", daemon=True)
    thread.start()
    assert server.ready.wait(30), "the server did not load its engine"
    try:
        yield server
    finally:
        server.stop()
        thread.join(15)
        assert not thread.is_alive(), "the server did not stop"


# The client's two transports (protocol/transport.py): tests that take a ``transport``
# parameter run once with libzmq's DEALER and once with the pure-Python ZMTP one.
TRANSPORTS = ("pyzmq", "zmtp")


def client_for(server: Server, **kwargs: Any) -> Client:
    """A client of ``server``; ``transport=`` picks pyzmq or the pure-Python ZMTP one."""
    kwargs.setdefault("timeout", 2.0)
    kwargs.setdefault("retries", 1)
    return Client(server.endpoint, server.key, **kwargs)


def image(width: int = 8, height: int = 6, channels: int = 3) -> bytes:
    return bytes(range(256)) * (width * height * channels // 256) + bytes(
        width * height * channels % 256)


def submit(client: Client, **kwargs: Any) -> str:
    """Submit a small valid DragDiffusion job (its work is what the canvas checks count);
    keyword arguments override."""
    args: dict[str, Any] = {"image": image(), "width": 8, "height": 6, "channels": 3,
                            "handles": [(1, 1)], "targets": [(4, 3)], "method": "dragdiffusion"}
    args.update(kwargs)
    return client.submit(**args)


class RawPeer:
    """A bare DEALER plus a protocol session, to send arbitrary frames to a server."""

    def __init__(self, server: Server, key: bytes | None = None,
                 login: bytes | None = None) -> None:
        """``key`` signs the messages; ``login`` is the key for the transport login (default:
        the server's key; ``b""``: connect without logging in)."""
        self.session = wire.Session(key or server.key, me="test", peer="the backend")
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.linger = 0
        login = server.key if login is None else login
        if login:
            self.socket.plain_username = wire.TRANSPORT_USER
            self.socket.plain_password = wire.transport_password(login)
        self.socket.connect(server.endpoint)

    def frames(self, msg_type: str, content: dict[str, Any], **kwargs: Any) -> list[bytes]:
        return [bytes(f) for f in self.session.serialize(msg_type, content, **kwargs)[1]]

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def recv(self, timeout: float = 2.0) -> wire.Message | None:
        """The next message that verifies, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.socket.poll(int(left * 1000) + 1):
                return None
            frames = self.socket.recv_multipart()
            try:
                message = self.session.parse(frames)
            except wire.ProtocolError:
                continue
            wire.check_content(message)
            return message
        return None

    def request(self, msg_type: str, content: dict[str, Any], **kwargs: Any) -> wire.Message:
        """Send a valid request and return its reply (skipping events)."""
        header, frames = self.session.serialize(msg_type, content, **kwargs)
        self.socket.send_multipart(frames)
        while True:
            message = self.recv()
            assert message is not None, f"no reply to {msg_type}"
            if message.parent.get("msg_id") == header["msg_id"]:
                return message

    def close(self) -> None:
        self.socket.close()


def _serve_fake(connection_file: str) -> None:
    """Serve a FakeEngine (1 s per step) until SIGTERM or shutdown."""
    import signal

    server = Server(lambda: FakeEngine(steps=1000, delay=1.0), model_name="fake-model",
                    bind="tcp://127.0.0.1:0", connection_file=Path(connection_file),
                    on_ready=lambda s: print(f"READY {s.endpoint} {connection_file}",
                                             flush=True))
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop("signal"))
    server.serve_forever()


if __name__ == "__main__":
    _serve_fake(sys.argv[1])
