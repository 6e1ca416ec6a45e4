"""The engine's data contract: what a drag edit takes and gives back."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backend.engine.errors import Cancelled

# The method a request runs when it names none, and the one a dialog or command line offers
# first (a server's hello announces it as ``default_method``): Inpaint4Drag, seconds instead of
# minutes and the closest to the target on every benchmark set (docs/algorithms.md section 6).
# Served models that cannot run it (``params.MethodTable.default_method``, the one place that
# decides) fall back to the first method they run.
DEFAULT_METHOD = "inpaint4drag"

# progress(phase, step, total): phases are "load", "lora", "inversion", "drag", "denoise",
# "decode".
ProgressFn = Callable[[str, int, int], None]
# preview(phase, step, rgb): a rough h×w×3 uint8 picture of the edit while it forms.
PreviewFn = Callable[[str, int, np.ndarray], None]

# Two coordinate systems, two names (docs/algorithms.md §1, Coordinates):
ImagePoint = tuple[float, float]  # (x, y) continuous image pixels, as GIMP path anchors
GridPoint = tuple[float, float]  # (row, col) on the supervision grid (half the working size)


@dataclass
class DragRequest:
    """One drag edit.

    ``image`` is H×W×C uint8, uint16 or float32 (nominally 0–1, may exceed) with C in 1 (gray),
    2 (gray+alpha), 3 (RGB) or 4 (RGBA); the result has the same dtype, and outside the
    (feathered) mask the same bits.
    ``handles``/``targets`` are continuous (x, y) image coordinates, as GIMP's path anchors:
    (0, 0) is the top-left corner of the top-left pixel, pixel i spans [i, i + 1) and its
    centre is i + 0.5. The engine converts them once to the official codes' pixel index
    (x − 0.5) and grid cell (docs/algorithms.md §1, Coordinates).
    ``mask`` is H×W uint8, >0 where the image may change; ``None`` means everything may change
    (for Inpaint4Drag: >0 on the region that moves, required).
    ``method`` names a method or preset; empty: the engine's default (its table's
    ``default_method``, ``DEFAULT_METHOD`` where the served models run it).
    ``params`` overrides the method's defaults (see ``backend.engine.params``).
    """

    image: np.ndarray
    handles: list[ImagePoint]
    targets: list[ImagePoint]
    mask: np.ndarray | None = None
    method: str = ""
    prompt: str = ""
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DragResult:
    """The edited image (same shape and dtype as the input) and where the handles ended.

    ``handles`` use the request's convention (continuous (x, y), see ``DragRequest``).
    ``warnings`` are sentences for the user about how the request was interpreted.
    """

    image: np.ndarray
    handles: list[ImagePoint]
    timings: dict[str, float]
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PrepareResult:
    """What a prepare did (``Engine.prepare_image``): seconds per phase, and ``stats`` such as
    the work per phase and what was found in the caches."""

    timings: dict[str, float]
    stats: dict[str, Any] = field(default_factory=dict)


class CancelToken:
    """Cooperative cancellation: the engine calls ``check()`` once per step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("the edit was cancelled")
