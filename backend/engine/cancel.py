"""Cancellation inside a model pass: a cancel ends an edit within one block, not one step.

The engine checks its ``CancelToken`` at every step (``progress``), and a step is a whole UNet
forward (and backward) at the working size: on a CPU up to a minute at 512², far longer on a
large canvas. ``cancellable`` also checks it before every block of the given models (each
resnet, transformer block, attention and up/down sampler: about 76 checks per SD1.5 UNet
forward) and, in a backward pass, when each block's output gradient has been computed. So a
cancel ends any phase (LoRA training, inversion, drag, denoising, the VAE's encode and decode)
within the time of one block, forward or backward, at the working canvas.

One attention call over a large canvas is itself long (65,536 tokens: 4·65,536²·320 FLOP,
2.7 TFLOP, a minute or more on a CPU), so while inside, ``scaled_dot_product_attention`` with
more than ``ATTENTION_PAIRS`` query-key pairs runs on slices of its queries, with a check
before each slice and at each slice's gradient. Every query's row is computed from all the
keys as before, by the same kernel, so the output is bit for bit the same (a slice only
chooses which rows one call computes); the keys' and values' gradients add the slices' shares
in another order (float rounding). Canvases up to 512² (4,096 tokens, 2^24 pairs) never reach
the limit.

The block checks only read a flag: no number changes. They run Python between blocks, which a
``torch.compile``'d forward cannot trace without breaking its graph, so an engine that compiles
its UNet keeps the per-step checks only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from backend.engine.types import CancelToken

# diffusers' building blocks, by class name (UNet2DConditionModel and AutoencoderKL alike).
BLOCKS = frozenset({"ResnetBlock2D", "BasicTransformerBlock", "Attention", "Downsample2D",
                    "Upsample2D"})


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` before and after which a cancel is checked."""
    return [m for m in model.modules() if type(m).__name__ in BLOCKS]


# Query-key pairs of one attention call between two checks: 2^26, 86 GFLOP at SD1.5's
# top level (320 channels), about a second on one CPU core.
ATTENTION_PAIRS = 2**26

_active = threading.local()  # the token of the edit this thread runs, if any
_sdpa = F.scaled_dot_product_attention  # torch's own
_installed = {"edits": 0}  # edits inside ``cancellable`` now, all threads together
_install_lock = threading.Lock()


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, **kwargs: Any) -> torch.Tensor:
    """``scaled_dot_product_attention``, on slices of the queries inside ``cancellable``."""
    cancel: CancelToken | None = getattr(_active, "cancel", None)
    rows, keys = query.shape[-2], key.shape[-2]
    if (cancel is None or rows * keys <= ATTENTION_PAIRS or attn_mask is not None
            or is_causal or dropout_p):
        return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                     is_causal=is_causal, **kwargs)
    step = max(256, ATTENTION_PAIRS // keys // 256 * 256)  # whole blocks of the kernels' rows
    parts = []
    for start in range(0, rows, step):
        cancel.check()
        part = _sdpa(query[..., start:start + step, :], key, value, **kwargs)
        if part.requires_grad:
            part.register_hook(lambda _grad: cancel.check())
        parts.append(part)
    return torch.cat(parts, dim=-2)


@contextmanager
def cancellable(cancel: CancelToken | None, *models: torch.nn.Module) -> Iterator[None]:
    """Check ``cancel`` at every block of ``models`` and between slices of a long attention
    call while inside (see the module doc); a cancel raises ``Cancelled`` from the forward or
    backward pass that saw it. One edit per thread."""
    if cancel is None:
        yield
        return

    def before(_module: torch.nn.Module, _args: Any) -> None:
        cancel.check()

    def on_gradient(_grad: torch.Tensor) -> None:
        cancel.check()

    def after(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(on_gradient)

    handles = []
    with _install_lock:  # torch's function is replaced while any edit is inside
        _installed["edits"] += 1
        F.scaled_dot_product_attention = _attention
    _active.cancel = cancel  # ...and slices only on the threads of those edits
    try:
        for model in models:
            for block in blocks(model):
                handles.append(block.register_forward_pre_hook(before))
                handles.append(block.register_forward_hook(after))
        yield
    finally:
        _active.cancel = None
        for handle in handles:
            handle.remove()
        with _install_lock:
            _installed["edits"] -= 1
            if not _installed["edits"]:
                F.scaled_dot_product_attention = _sdpa
