"""The engine interface the server (and the command line) program against.

``backend.engine.pipeline.DragEngine`` implements it; so does the tests' fake engine. Torch-free,
so the server can be typed against it without loading the engine.
"""

from __future__ import annotations

from typing import Any, Protocol

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
