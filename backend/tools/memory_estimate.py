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
from backend.engine.params import LATENT_METHODS
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
    add_run_options(p, algorithms=LATENT_METHODS)
    p.add_argument("--lora-micro-batch", type=int, default=None,
                   help="as after an out-of-memory fallback: LoRA images per pass")
    p.add_argument("--json", action="store_true", help="one JSON line per method")
    p.add_argument("--arrangements", action="store_true",
                   help="instead: the resident weights and the edit's peak of each way to serve "
                   "the models (SD1.5, an inpainting model, both; see ARRANGEMENTS)")
    p.set_defaults(func=main)


# Ways to serve the models (``serve --model/--inpaint-model``) and what each runs.
ARRANGEMENTS = {
    "sd15": "SD1.5 alone: DragDiffusion, GoodDrag, Inpaint4Drag with the blended-latent filler",
    "sd15-inpainting": "SD1.5-inpainting + LCM-LoRA (fused) + TAESD alone: Inpaint4Drag only",
    "sd15+sd15-inpainting": "SD1.5 beside SD1.5-inpainting + LCM-LoRA + TAESD: every method",
    "sdxl-inpainting": "SDXL-inpainting + LCM-LoRA-SDXL (fused) + TAESDXL alone, at 1024²",
}


def inpainter_on_meta(layout: str, precision: str):
    """The modules an inpainting model keeps after load (UNet, tiny VAE; the text encoders are
    freed once the empty prompt is encoded), full size, on the meta device."""
    import torch
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from backend.engine.devices import PRECISIONS
    from backend.engine.sd15 import SD15_CONFIG_DIR

    folder = (SD15_CONFIG_DIR if layout == "sd15"
              else SD15_CONFIG_DIR.parent / "sdxl-inpainting")
    config = {**UNet2DConditionModel.load_config(folder / "unet"), "in_channels": 9}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        vae = AutoencoderTiny()  # TAESD and TAESDXL share this architecture
    dtype = PRECISIONS[precision].weights
    return unet.to(dtype).eval().requires_grad_(False), vae.to(dtype).eval().requires_grad_(False)


def inpaint_peak(layout: str, precision: str, size: int) -> dict:
    """Weights and peak live bytes of one Inpaint4Drag inpaint at ``size``² on the meta device:
    the masked image encoded, one UNet pass on [latent, mask, masked latent] (guidance 1: batch
    1; every step is the same), the result decoded."""
    import torch

    from backend.engine.devices import PRECISIONS
    from backend.tools.meta_device import EmulatedAutocast, LiveBytes, MetaRun

    unet, vae = inpainter_on_meta(layout, precision)
    dtype = PRECISIONS[precision].weights
    latent = size // 8
    with MetaRun(), EmulatedAutocast(PRECISIONS[precision].autocast), LiveBytes() as live:
        for module in (unet, vae):
            for tensor in [*module.parameters(), *module.buffers()]:
                live.add(tensor)
        weights = live.current
        with torch.no_grad():
            masked = vae.encode(torch.zeros(1, 3, size, size, device="meta", dtype=dtype)).latents
            sample = torch.zeros(1, 9, latent, latent, device="meta", dtype=dtype)
            width = unet.config.cross_attention_dim
            extra = {}
            if layout == "sdxl":
                extra = {"added_cond_kwargs": {
                    "text_embeds": torch.zeros(1, 1280, device="meta", dtype=dtype),
                    "time_ids": torch.zeros(1, 6, device="meta", dtype=dtype)}}
            eps = unet(sample, torch.tensor(500, device="meta"),
                       torch.zeros(1, 77, width, device="meta", dtype=dtype), **extra).sample
            image = vae.decode(eps).sample
            del masked, sample, eps, image
    gb = 1e9
    return {"weights_gb": round(weights / gb, 3), "peak_gb": round(live.peak / gb, 3)}


def arrangements(precision: str = "fp16", size: int = 512) -> list[dict]:
    """Every ``ARRANGEMENTS`` entry: resident weights and the largest edit's peak (GB)."""
    latent = {method: estimate(method, precision, size, {}) for method in
              ("dragdiffusion", "gooddrag")}
    sd15_peak = max(row["peak_gb"] for row in latent.values())
    sd15_weights = latent["dragdiffusion"]["weights_gb"]
    sd15_inpaint = inpaint_peak("sd15", precision, size)
    sdxl_inpaint = inpaint_peak("sdxl", precision, 2 * size)
    both_peak = max(sd15_peak + sd15_inpaint["weights_gb"],
                    sd15_inpaint["peak_gb"] + sd15_weights)
    rows = [
        ("sd15", sd15_weights, sd15_peak, f"{size}²"),
        ("sd15-inpainting", sd15_inpaint["weights_gb"], sd15_inpaint["peak_gb"], f"{size}²"),
        ("sd15+sd15-inpainting", round(sd15_weights + sd15_inpaint["weights_gb"], 3),
         round(both_peak, 3), f"{size}²"),
        ("sdxl-inpainting", sdxl_inpaint["weights_gb"], sdxl_inpaint["peak_gb"],
         f"{2 * size}²"),
    ]
    return [{"arrangement": name, "what": ARRANGEMENTS[name], "precision": precision,
             "size": at, "weights_gb": weights, "peak_gb": peak}
            for name, weights, peak, at in rows]


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

    options = run_options(args, algorithms=LATENT_METHODS,
                          instead="Inpaint4Drag's memory depends on the models served: see "
                          "memory --arrangements")
    if args.precision not in PRECISIONS:
        raise UsageError(f"unknown precision {args.precision!r}; use {', '.join(PRECISIONS)}")
    if args.arrangements:
        for row in arrangements(args.precision, args.size):
            print(json.dumps(row) if args.json else
                  f"{row['arrangement']} ({row['precision']}, {row['size']}): weights "
                  f"{row['weights_gb']:.2f} GB, peak {row['peak_gb']:.2f} GB — {row['what']}",
                  flush=True)
        return 0
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
