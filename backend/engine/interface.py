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
from backend.engine.types import CancelToken, DragRequest, DragResult, PreviewFn, ProgressFn


class Engine(Protocol):
    """A loaded model that runs drag edits, one at a time."""

    # What it runs: every method's defaults with this model's own applied; what a server
    # announces, and what a request is checked against before it is accepted.
    table: MethodTable

    def info(self) -> dict[str, Any]:
        """``model``, ``device``, ``memory`` (bytes) and whatever else describes the engine."""
        ...

    def run(self, request: DragRequest, progress: ProgressFn | None = None,
            cancel: CancelToken | None = None,
            preview: PreviewFn | None = None) -> DragResult:
        """One edit. ``progress(phase, step, total)`` at every step, ``cancel`` checked there,
        ``preview`` (optional) a few times while denoising. Raises ``EngineError`` subclasses
        with messages a user can act on (``Cancelled`` when cancelled)."""
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
