"""Fitting the LoRA training into the memory there is: micro-batches, then gradient checkpointing.

LoRA training at batch 4 is an edit's memory peak (``python -m backend memory``: SD1.5 at 512²
in fp16 ≈ 6.9 GB of tensors, against ≈ 4 GB for the drag). When a training step runs out of
memory it is redone with the batch split into micro-batches whose gradients are accumulated
(the same gradient, up to float rounding), halving the micro-batch down to 1, and then with the
UNet's gradient checkpointing (activations recomputed in the backward pass instead of kept:
about a third more compute). What worked is remembered on the model for the next edits; on a
GPU under 10 GB training starts two images at a time, which keeps an edit's peak at the drag's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from backend.engine.oom import OOM_ADVICE, is_oom

logger = logging.getLogger(__name__)


@dataclass
class MemoryHints:
    """What the last out-of-memory taught about this model on this device."""

    lora_micro_batch: int | None = None  # None: the whole batch at once
    checkpointing: bool = False


# Below this much device memory, LoRA training starts two images at a time: the whole batch of 4
# needs ≈ 6.9 GB of tensors at 512² in fp16 plus the CUDA context and the allocator's rounding
# (``python -m backend memory``), two at a time ≈ 4.5 GB.
SMALL_GPU_BYTES = 10 * 10**9


def initial_hints(device: torch.device) -> MemoryHints:
    """Where a model on ``device`` starts: micro-batches of 2 on a GPU under 10 GB."""
    if device.type != "cuda":
        return MemoryHints()
    if torch.cuda.get_device_properties(device).total_memory < SMALL_GPU_BYTES:
        return MemoryHints(lora_micro_batch=2)
    return MemoryHints()


def free_memory(device: torch.device) -> None:
    """Hand cached, unused device memory back (after an out-of-memory error)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def fit_step(step: Callable[[int], None], batch: int, hints: MemoryHints, unet,
             device: torch.device, reset: Callable[[], None]) -> None:
    """Run ``step(micro_batch)``; on out-of-memory, ``reset()`` and retry smaller (see above).

    Raises the last out-of-memory error when even micro-batch 1 with checkpointing fails.
    """
    while True:
        micro = min(batch, hints.lora_micro_batch or batch)
        if hints.checkpointing:
            unet.enable_gradient_checkpointing()
        try:
            step(micro)
            return
        except Exception as exc:
            if not is_oom(exc) or (micro == 1 and hints.checkpointing):
                raise
        reset()
        free_memory(device)
        if micro > 1:
            hints.lora_micro_batch = micro // 2
            logger.warning("out of memory in a LoRA step: retrying %d image(s) at a time",
                           hints.lora_micro_batch)
        else:
            hints.checkpointing = True
            logger.warning("out of memory in a LoRA step: retrying with gradient checkpointing")


_PHASE_NAMES = {"load": "encoding the image", "lora": "LoRA training",
                "inversion": "DDIM inversion", "drag": "the drag", "denoise": "denoising",
                "decode": "decoding the result"}


def oom_message(phase: str) -> str:
    """What to tell the user after running out of memory in ``phase`` of an edit."""
    where = _PHASE_NAMES.get(phase, phase)
    if phase == "lora":
        advice = ("even one image at a time with gradient checkpointing did not fit; set "
                  "lora_steps 0 to skip the LoRA, or " + OOM_ADVICE)
    else:
        advice = OOM_ADVICE
    return f"the device ran out of memory during {where}; this edit was stopped: {advice}"
