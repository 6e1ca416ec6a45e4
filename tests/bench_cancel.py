"""How long a cancel takes to stop an edit inside a long phase, on the CPU (issue 22, N1/N5).

    OMP_NUM_THREADS=2 .venv/bin/python tests/bench_cancel.py [SIDE] [PHASE...]
    OMP_NUM_THREADS=2 .venv/bin/python tests/bench_cancel.py attention [TOKENS]

SD1.5 with random weights (its real cost) in single precision on the CPU, a SIDE×SIDE working
canvas (default 512). For each phase (default: lora inversion drag denoise decode) an edit
runs in a thread; one second into the phase's second step (the first, for a one-step phase)
it is cancelled, and the figures are the time from the cancel to the ``Cancelled`` exception,
and how long that phase's first step took: what a cancel used to wait at most, when it was
seen only at the next step.

``attention`` times one self-attention call of SD1.5's top level (8 heads × 40 channels) over
TOKENS tokens (default 65,536: the 64×65,536 strip of issue 22) whole, then sliced inside
``cancellable`` with a cancel one second in (a canvas that large is past the memory limit of
a whole edit here; this is its longest single kernel).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import numpy as np  # noqa: E402

from backend.engine.errors import Cancelled  # noqa: E402
from backend.engine.lora import LoraCache  # noqa: E402
from backend.engine.pipeline import DragEngine  # noqa: E402
from backend.engine.random_sd15 import random_sd15  # noqa: E402
from backend.engine.types import CancelToken, DragRequest  # noqa: E402

PHASES = ("lora", "inversion", "drag", "denoise", "decode")
WAIT = 1.0  # seconds into the step before the cancel


def request(side: int, phase: str) -> DragRequest:
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    params = {"work_size": side, "lora_steps": 2 if phase == "lora" else 0, "lora_batch": 1,
              "n_inference_steps": 4, "inversion_strength": 0.75, "drag_steps": 2}
    return DragRequest(image=image, handles=[(side * 0.4, side * 0.5)],
                       targets=[(side * 0.5, side * 0.5)], method="dragdiffusion",
                       prompt=f"a photo {phase}", params=params)  # no re-drag cache hit


def measure(engine: DragEngine, side: int, phase: str) -> tuple[float, float]:
    """(seconds from the cancel to ``Cancelled``, seconds of the phase's first step)."""
    cancel = CancelToken()
    starts: list[float] = []
    outcome: dict[str, float] = {}

    def progress(name: str, step: int, total: int) -> None:
        if name == phase:
            starts.append(time.monotonic())

    def run() -> None:
        try:
            engine.run(request(side, phase), progress=progress, cancel=cancel)
        except Cancelled:
            outcome["stopped"] = time.monotonic()

    worker = threading.Thread(target=run)
    worker.start()
    one_step = phase == "decode"
    while len(starts) < (1 if one_step else 2) and worker.is_alive():
        time.sleep(0.01)
    step = (starts[1] - starts[0]) if len(starts) > 1 else float("nan")
    time.sleep(WAIT)
    asked = time.monotonic()
    cancel.cancel()
    worker.join()
    return outcome.get("stopped", float("nan")) - asked, step


def attention(tokens: int) -> None:
    import torch
    import torch.nn.functional as F

    from backend.engine import cancel as cancel_module

    q, k, v = (torch.randn(1, 8, tokens, 40) for _ in range(3))
    t0 = time.monotonic()
    cancel_module._sdpa(q, k, v)
    whole = time.monotonic() - t0
    cancel = CancelToken()
    outcome: dict[str, float] = {}

    def run() -> None:
        try:
            with cancel_module.cancellable(cancel):
                F.scaled_dot_product_attention(q, k, v)
        except Cancelled:
            outcome["stopped"] = time.monotonic()

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(WAIT)
    asked = time.monotonic()
    cancel.cancel()
    worker.join()
    rows = max(256, cancel_module.ATTENTION_PAIRS // tokens // 256 * 256)
    print(f"attention over {tokens:,} tokens: {whole:.1f} s as one call; in slices of {rows} "
          f"queries a cancel took effect in {outcome['stopped'] - asked:.2f} s", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["attention"]:
        attention(int(sys.argv[2]) if len(sys.argv) > 2 else 65536)
        return
    side = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    phases = sys.argv[2:] or PHASES
    with tempfile.TemporaryDirectory() as tmp:
        engine = DragEngine(random_sd15("cpu", "fp32"), LoraCache(tmp))
        for phase in phases:
            latency, step = measure(engine, side, phase)
            print(f"{side}² {phase}: cancel took effect in {latency:.2f} s "
                  f"(one step of this phase: {step:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
