"""The settings dialog's live warp preview for Inpaint4Drag: what to ask the backend for, and
when to ask again.

The dialog reads the layer, the selection and the drags scaled down to ``PREVIEW_SIDE`` (GIMP
scales while reading), sends them with the protocol's ``warp`` request (no model runs: the
backend answers in a fraction of a second) and shows the warped layer with the area that will
be inpainted painted as a grid. A timer compares what the image and the dialog hold now with
what the preview shows (``PreviewState``) and asks again when anything changed: a moved anchor,
a new selection, another layer, the inpainting kernel. No gi and no numpy here: tested outside
GIMP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Point = tuple[float, float]

PREVIEW_SIDE = 512  # the long side of the layer as the preview warps it (px)
POLL_MS = 300  # how often the dialog looks for changes
WARP_VERSION = (1, 1)  # the protocol version that has the ``warp`` request
METHOD = "inpaint4drag"  # the algorithm whose selection is the region that moves


def preview_scale(width: int, height: int, side: int = PREVIEW_SIDE) -> float:
    """The factor that brings a width×height layer's long side to ``side`` (never above 1)."""
    return min(1.0, side / max(width, height, 1))


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def scale_points(points: Sequence[Point], scale: float, width: int,
                 height: int) -> list[Point]:
    """Points (layer coordinates) on the scaled layer of ``width``×``height``, kept on it."""
    return [(min(width, max(0.0, x * scale)), min(height, max(0.0, y * scale)))
            for x, y in points]


def supports_warp(info: Mapping[str, Any] | None) -> bool:
    """Whether a backend's hello says it answers ``warp`` requests (protocol 1.1 or later)."""
    version = str((info or {}).get("protocol_version") or "0.0")
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= WARP_VERSION


def region_moves(algorithm: str) -> bool:
    """Whether the selection is the region that moves (Inpaint4Drag) rather than the area that
    may change (DragDiffusion, GoodDrag)."""
    return algorithm == METHOD


def warp_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs the warp reads, from the parameters an edit would send."""
    return {k: v for k, v in params.items() if k == "inpaint_kernel"}


@dataclass(frozen=True)
class PreviewInputs:
    """What the preview warps: the scaled layer (8-bit), the scaled selection, the drags."""

    pixels: bytes
    width: int
    height: int
    channels: int
    mask: bytes | None  # width × height bytes; None when nothing is selected
    handles: list[Point]
    targets: list[Point]

    def key(self) -> tuple:
        """Equal for inputs that give the same warp (the pixels' bytes are left out: the
        layer does not change while its dialog is open, and reading them is the slow part)."""
        return (self.width, self.height, self.channels, self.mask, tuple(self.handles),
                tuple(self.targets))


class PreviewState:
    """What the preview shows now, to tell whether it must be asked for again."""

    def __init__(self) -> None:
        self._shown: tuple | None = None

    def changed(self, inputs_key: tuple, method: str, params: Mapping[str, Any]) -> bool:
        key = (inputs_key, method, tuple(sorted(warp_params(params).items())))
        if key == self._shown:
            return False
        self._shown = key
        return True

    def forget(self) -> None:
        """Show again at the next look (e.g. after the backend came back)."""
        self._shown = None


def caption(figures: Mapping[str, Any], scale: float) -> str:
    """The line under the preview: what moves and what will be inpainted."""
    moved = int(figures.get("moved_pixels", 0) / max(scale * scale, 1e-9))
    hole = int(figures.get("inpaint_pixels", 0) / max(scale * scale, 1e-9))
    text = (f"Warp preview: about {moved:,} pixels move; the grid ({hole:,} pixels) is "
            "inpainted when you press OK.")
    warnings = [str(w) for w in figures.get("warnings") or []]
    return text + (" " + " ".join(warnings) if warnings else "")


NOT_INPAINT4DRAG = ("The warp preview is shown for Inpaint4Drag; the other methods show their "
                    "live preview while they run.")
NO_BACKEND = ("The warp preview appears once the backend runs (it starts when you press OK).")
OLD_BACKEND = ("This backend is too old for the warp preview (it needs protocol 1.1); update "
               "it to see the warp before you press OK.")
NO_SELECTION = ("Select the region that moves (the object to drag) to see the warp.")
