"""``python -m backend memory``: peak tensor memory per phase of one edit, estimated without a GPU.

Runs a whole edit of the full SD1.5 architecture on PyTorch's ``meta`` device (shapes, no data)
and counts the bytes of every live tensor storage (``meta_device.LiveBytes``): weights, LoRA and
optimiser state, activations autograd saves, gradients, the drag's feature maps. Autocast's
casts are emulated (``meta_device.EmulatedAutocast``) and attention runs as the GPU's
memory-efficient kernel. Not counted: the CUDA context (~0.3–0.5 GB outside PyTorch's figures),
kernel workspaces and the caching allocator's rounding, which on a GPU add roughly 10–20 % to
``torch.cuda.max_memory_allocated``. Gradient checkpointing cannot be estimated this way (its
recomputation in the backward pass runs outside the meta tools' function modes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import TYPE_CHECKING

import numpy as np

from backend.cli import UsageError
from backend.tools.options import add_run_options, run_options

if TYPE_CHECKING:
    from backend.engine.memory import MemoryHints

# Step counts cut to what reaches every phase's peak (the first LoRA step allocates the AdamW
# state, GoodDrag keeps one feature map per dragged timestep).
SHORT = {"lora_steps": 2, "drag_steps": 3, "track_per_denoise": 1, "max_drag_per_track": 2}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="estimate peak memory per phase on the meta device",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="fp16", help="a devices.PRECISIONS name (default fp16)")
    p.add_argument("--size", type=int, default=512, help="square image side (default 512)")
    add_run_options(p)
    p.add_argument("--lora-micro-batch", type=int, default=None,
                   help="as after an out-of-memory fallback: LoRA images per pass")
    p.add_argument("--json", action="store_true", help="one JSON line per method")
    p.set_defaults(func=main)


def estimate(method: str, precision: str, size: int, overrides: dict,
             hints: MemoryHints | None = None) -> dict:
    """Peak live tensor bytes overall and per progress phase for one meta-device edit."""

    from backend.engine.devices import PRECISIONS
    from backend.engine.lora import LoraCache
    from backend.engine.memory import MemoryHints
    from backend.engine.pipeline import DragEngine
    from backend.engine.random_sd15 import random_sd15
    from backend.engine.types import DragRequest
    from backend.tools.meta_device import EmulatedAutocast, LiveBytes, MetaRun

    prec = PRECISIONS[precision]
    model = random_sd15("meta", precision)
    model.memory = hints or MemoryHints()
    image = np.full((size, size, 3), 128, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 5: size * 4 // 5, size // 5: size * 4 // 5] = 255
    request = DragRequest(image=image, handles=[(size * 0.4, size * 0.5)],
                          targets=[(size * 0.55, size * 0.5)], mask=mask, method=method,
                          params={**SHORT, **overrides})
    with tempfile.TemporaryDirectory() as tmp:
        engine = DragEngine(model, LoraCache(tmp))
        with MetaRun(), EmulatedAutocast(prec.autocast), LiveBytes() as live:
            for module in (model.unet, model.vae, model.text_encoder):
                for tensor in [*module.parameters(), *module.buffers()]:
                    live.add(tensor)
            weights = live.current

            def progress(phase: str, _step: int, _total: int) -> None:
                live.phase = phase

            engine.run(request, progress=progress)
    gb = 1e9
    return {"method": method, "precision": precision, "size": size,
            "params": {**SHORT, **overrides}, "memory_hints": vars(model.memory),
            "weights_gb": round(weights / gb, 3),
            "peak_gb": round(live.peak / gb, 3),
            "phase_peak_gb": {k: round(v / gb, 3) for k, v in live.phase_peaks.items()}}


def main(args: argparse.Namespace) -> int:
    from backend.engine.devices import PRECISIONS
    from backend.engine.memory import MemoryHints

    options = run_options(args)
    if args.precision not in PRECISIONS:
        raise UsageError(f"unknown precision {args.precision!r}; use {', '.join(PRECISIONS)}")
    for method in options.methods:
        hints = MemoryHints(lora_micro_batch=args.lora_micro_batch)
        row = estimate(method, args.precision, args.size, options.overrides, hints)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in row["phase_peak_gb"].items())
            print(f"{method} {args.precision} {args.size}²: peak {row['peak_gb']:.2f} GB "
                  f"(weights {row['weights_gb']:.2f}); per phase: {phases}", flush=True)
    return 0
