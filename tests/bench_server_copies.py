"""How much one large job allocates on its way through server and client (issue 13.3).

    .venv/bin/python tests/bench_server_copies.py [WIDTH HEIGHT]

An engine that returns its input unchanged serves a WIDTH×HEIGHT RGBA image (default
4000×3000, 45.8 MiB); the figures are Python's allocations (tracemalloc peak) from submit to
the result's pixels, and the time, for the zero-copy ``Event.buffer`` and for ``Event.image``
(bytes, copied once).
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import numpy as np  # noqa: E402
from fixtures_server import client_for, running_server  # noqa: E402

from backend.engine.types import DragResult  # noqa: E402


class Identity:
    def info(self) -> dict:
        return {"model": "identity", "device": "cpu"}

    def run(self, request, progress=None, cancel=None, preview=None) -> DragResult:
        return DragResult(image=request.image, handles=list(request.targets), timings={})


def main() -> None:
    w, h = (int(v) for v in sys.argv[1:3]) if len(sys.argv) >= 3 else (4000, 3000)
    image = np.random.default_rng(0).integers(0, 256, (h, w, 4), dtype=np.uint8)
    with running_server(Identity()) as server, client_for(server, timeout=60) as client:
        client.hello()
        for how in ("buffer", "image", "buffer", "image"):
            tracemalloc.start()
            t0 = time.perf_counter()
            done = list(client.events(client.submit(image, w, h, 4, [(1, 1)], [(2, 2)]),
                                      timeout=300))[-1]
            pixels = getattr(done, how)
            elapsed = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert memoryview(pixels) == memoryview(image).cast("B")
            print(f"{w}x{h} RGBA ({image.nbytes / 2**20:.1f} MiB) via Event.{how}: "
                  f"{elapsed:.3f} s, Python allocations peak {peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
