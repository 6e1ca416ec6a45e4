"""What one large layer costs on its way through client, server and back (issues 13.3, 21).

    .venv/bin/python tests/bench_server_copies.py [--transport pyzmq|zmtp|both]
                                                  [--size 4000x3000] [--repeat 5]

An engine that returns its input unchanged serves a WIDTH×HEIGHT RGBA image (default
4000×3000, 45.8 MiB, a 48 MB layer), with the server in this process (a thread) and the
client on the chosen transport(s) (protocol/transport.py). Per transport it prints, for each
direction, the median and the best of ``--repeat`` runs:

- submit (client → backend): ``Client.submit`` from call to reply: signing, sending,
  the server's reading and signature check, and the reply;
- finished (backend → client): from the engine's return to the client holding the
  ``finished`` event: the server's signing and sending, the client's reading and check;

then Python's allocations (tracemalloc peak, one traced run) from submit to the result's
pixels, for the zero-copy ``Event.buffer`` and for ``Event.image`` (bytes, copied once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import numpy as np  # noqa: E402
from fixtures_server import TRANSPORTS, client_for, running_server  # noqa: E402

from backend.engine.types import DragResult  # noqa: E402


class Identity:
    """Returns the request's pixels as the result and notes when it returned."""

    def __init__(self) -> None:
        self.returned = 0.0

    def info(self) -> dict:
        return {"model": "identity", "device": "cpu"}

    def run(self, request, progress=None, cancel=None, preview=None,
            preview_interval=0.0) -> DragResult:
        result = DragResult(image=request.image, handles=list(request.targets), timings={})
        self.returned = time.perf_counter()
        return result


def one_edit(client, engine: Identity, image: np.ndarray, how: str = "buffer"):
    """(submit seconds, finished seconds, the result's pixels)."""
    h, w, c = image.shape
    t0 = time.perf_counter()
    job = client.submit(image, w, h, c, [(1, 1)], [(2, 2)])
    submitted = time.perf_counter()
    done = list(client.events(job, timeout=300))[-1]
    arrived = time.perf_counter()
    assert done.type == "finished", done.type
    return submitted - t0, arrived - engine.returned, getattr(done, how)


def bench(transport: str, image: np.ndarray, repeat: int) -> None:
    h, w, c = image.shape
    mib = image.nbytes / 2**20
    engine = Identity()
    with running_server(engine) as server, \
            client_for(server, transport=transport, timeout=60) as client:
        client.hello()
        one_edit(client, engine, image)  # warm up: connection, first allocations
        ups, downs = [], []
        for _ in range(repeat):
            up, down, pixels = one_edit(client, engine, image)
            assert memoryview(pixels) == memoryview(image).cast("B")
            ups.append(up)
            downs.append(down)
        for direction, times in (("submit   (client → backend)", ups),
                                 ("finished (backend → client)", downs)):
            print(f"{transport:6} {w}x{h}x{c} ({mib:.1f} MiB) {direction}: median "
                  f"{statistics.median(times):.3f} s, best {min(times):.3f} s "
                  f"({mib / statistics.median(times):.0f} MiB/s)")
        for how in ("buffer", "image"):
            tracemalloc.start()
            t0 = time.perf_counter()
            *_, pixels = one_edit(client, engine, image, how)
            elapsed = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert memoryview(pixels) == memoryview(image).cast("B")
            print(f"{transport:6} via Event.{how}: round trip {elapsed:.3f} s (traced), "
                  f"Python allocations peak {peak / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=[*TRANSPORTS, "both"], default="both")
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT (RGBA)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    image = np.random.default_rng(0).integers(0, 256, (h, w, 4), dtype=np.uint8)
    for transport in TRANSPORTS if args.transport == "both" else [args.transport]:
        bench(transport, image, args.repeat)


if __name__ == "__main__":
    main()
