"""The engine interface the server (and the command line) program against.

``backend.engine.pipeline.DragEngine`` implements it; so does the tests' fake engine. Torch-free,
so the server can be typed against it without loading the engine. ``load_preview_warp`` gives
Inpaint4Drag's warp alone, which needs no model (a server answers ``warp`` requests with it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from backend.engine.params import MethodTable
from backend.engine.types import (
    CancelToken,
    DragRequest,
    DragResult,
    PrepareResult,
    PreviewFn,
    ProgressFn,
)


class Engine(Protocol):
    """A loaded model that runs drag edits, one at a time."""

    # What it runs: every method's defaults with this model's own applied; what a server
    # announces, and what a request is checked against before it is accepted.
    table: MethodTable

    def info(self) -> dict[str, Any]:
        """``model``, ``device``, ``memory`` (bytes) and whatever else describes the engine."""
        ...

    def run(self, request: DragRequest, progress: ProgressFn | None = None,
            cancel: CancelToken | None = None, preview: PreviewFn | None = None,
            preview_interval: float = 0.0) -> DragResult:
        """One edit. ``progress(phase, step, total)`` at every step, ``cancel`` checked there,
        ``preview`` (optional) while denoising, at most one per ``preview_interval`` seconds
        (the engine skips the others before copying anything off the device). Raises
        ``EngineError`` subclasses with messages a user can act on (``Cancelled`` when
        cancelled)."""
        ...

    def prepare_image(self, request: DragRequest, progress: ProgressFn | None = None,
                      cancel: CancelToken | None = None, masked: bool = True) -> PrepareResult:
        """What an edit of ``request``'s image with its method, settings, prompt and seed does
        before it reads the points (its LoRA and inversion), kept in the engine's caches for
        the edit that follows; ``request.handles`` may be empty. ``masked``: the edit will
        have a mask (what DragDiffusion's cached reference depends on). Progress, cancel and
        errors as in ``run``."""
        ...


# warp(image, region, handles, targets, knobs, overlay=...) -> (warped image, inpainting mask
# H×W uint8 0/255, figures {moved_pixels, inpaint_pixels, seconds, warnings}); raises
# ``InvalidInput`` for what an edit would refuse (``engine.inpaint4drag.preview_warp``).
WarpFn = Callable[..., tuple[np.ndarray, np.ndarray, dict]]


def load_preview_warp() -> WarpFn:
    """Inpaint4Drag's warp alone, for ``warp`` requests: it needs no model. Imported when first
    asked for (it brings torch)."""
    from backend.engine.inpaint4drag import preview_warp

    return preview_warp
