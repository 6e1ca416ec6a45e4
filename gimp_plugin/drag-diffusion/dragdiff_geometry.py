"""Pure geometry for the Drag Diffusion plug-in: paths → drag pairs, selection → mask.

Nothing here imports gi or numpy, so it runs in any Python 3.10+ (GIMP's bundled Python on
Windows has no numpy) and is unit-tested without GIMP. Coordinates are GIMP's: (0, 0) is the
top-left corner of the top-left pixel; "image" coordinates are canvas coordinates, "layer"
coordinates are relative to the layer's top-left corner (image = layer + offsets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Point = tuple[float, float]


class InputError(ValueError):
    """Something the user has to fix in the image (path, selection, arguments)."""


@dataclass(frozen=True)
class Rect:
    """An axis-aligned rectangle with integer corner and size; empty when width or height <= 0."""

    x: int
    y: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.x + self.width

    @property
    def bottom(self) -> int:
        return self.y + self.height

    @property
    def empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def intersect(self, other: Rect) -> Rect:
        x, y = max(self.x, other.x), max(self.y, other.y)
        return Rect(x, y, max(0, min(self.right, other.right) - x),
                    max(0, min(self.bottom, other.bottom) - y))

    def translate(self, dx: int, dy: int) -> Rect:
        return Rect(self.x + dx, self.y + dy, self.width, self.height)


# --- paths -------------------------------------------------------------------------------------

WHAT_TO_DRAW = (
    "Draw a path with the Paths tool: click the handle (the point to move), then its target; "
    "for several drags either start a new stroke per drag (Shift+click) or keep clicking "
    "handle, target, handle, target."
)


def stroke_anchors(control_points: Sequence[float]) -> list[Point]:
    """Anchor points of one Bézier stroke from ``Gimp.Path.stroke_get_points``.

    GIMP lists three control points per anchor (in-handle, anchor, out-handle), six floats.
    """
    if len(control_points) % 6:
        raise InputError(f"unexpected stroke data: {len(control_points)} coordinates "
                         "(expected 6 per anchor)")
    return [(float(control_points[i + 2]), float(control_points[i + 3]))
            for i in range(0, len(control_points), 6)]


def pair_anchors(strokes: Sequence[Sequence[Point]]) -> tuple[list[Point], list[Point]]:
    """Turn each stroke's anchors into handle→target pairs: anchors 1→2, 3→4, …

    Raises ``InputError`` for a stroke with an odd number of anchors or no anchors at all.
    """
    handles: list[Point] = []
    targets: list[Point] = []
    for number, anchors in enumerate(strokes, start=1):
        if len(anchors) % 2:
            raise InputError(
                f"Stroke {number} of the path has {len(anchors)} anchor"
                f"{'' if len(anchors) == 1 else 's'}; each drag needs two (handle, then "
                f"target), so every stroke needs an even number of anchors. {WHAT_TO_DRAW}")
        handles.extend(anchors[0::2])
        targets.extend(anchors[1::2])
    if not handles:
        raise InputError(f"The path has no anchors. {WHAT_TO_DRAW}")
    return handles, targets


def pick_path(paths: Sequence[Any], selected: Sequence[Any]) -> Any:
    """The path to read drags from: the one selected path, else the image's only path."""
    if len(selected) == 1:
        return selected[0]
    if len(selected) > 1:
        raise InputError(f"{len(selected)} paths are selected; select only the path that holds "
                         "the drags in the Paths dialog.")
    if len(paths) == 1:
        return paths[0]
    if not paths:
        raise InputError(f"The image has no path. {WHAT_TO_DRAW}")
    raise InputError(f"The image has {len(paths)} paths and none is selected; select the one "
                     "that holds the drags in the Paths dialog.")


def to_layer(points: Sequence[Point], offsets: tuple[int, int]) -> list[Point]:
    """Image (canvas) coordinates → layer coordinates."""
    ox, oy = offsets
    return [(x - ox, y - oy) for x, y in points]


def to_image(points: Sequence[Point], offsets: tuple[int, int]) -> list[Point]:
    """Layer coordinates → image (canvas) coordinates."""
    ox, oy = offsets
    return [(x + ox, y + oy) for x, y in points]


def check_inside(handles: Sequence[Point], targets: Sequence[Point],
                 width: int, height: int) -> None:
    """Raise ``InputError`` naming every handle or target (layer coordinates) off the layer."""
    problems = []
    for number, (handle, target) in enumerate(zip(handles, targets, strict=True), start=1):
        for role, (x, y) in (("handle", handle), ("target", target)):
            if not (0 <= x <= width and 0 <= y <= height):
                problems.append(f"drag {number} {role} at ({x:g}, {y:g})")
    if problems:
        raise InputError(
            f"Points outside the layer ({width}×{height}, in layer coordinates): "
            f"{'; '.join(problems)}. Move them onto the layer or select the layer they "
            "belong to.")


# --- selection → mask ---------------------------------------------------------------------------

SELECT_MOVING = ("With Inpaint4Drag the selection is the region that moves: select the object "
                 "you drag (its handles must lie inside it)")


def selection_region(bounds: Rect | None, layer: Rect, moves: bool = False) -> Rect | None:
    """Part of the selection's bounding box (image coordinates) that lies on the layer.

    ``bounds`` is None when there is no selection: returns None (everything may change; with
    ``moves``, the selection being the region that moves, that is an ``InputError``).
    Raises ``InputError`` when the selection misses the layer entirely.
    """
    if bounds is None or bounds.empty:
        if moves:
            raise InputError(f"Nothing is selected. {SELECT_MOVING}.")
        return None
    region = bounds.intersect(layer)
    if region.empty:
        what = (SELECT_MOVING + " on this layer." if moves else
                "Select the area that may change on this layer, or Select › None to let the "
                "whole layer change.")
        raise InputError(
            f"The selection ({bounds.width}×{bounds.height} at {bounds.x},{bounds.y}) does not "
            f"touch the layer ({layer.width}×{layer.height} at {layer.x},{layer.y}). {what}")
    return region


def place_mask(region_pixels: bytes, region: Rect, width: int, height: int) -> bytes:
    """A width×height u8 mask, zero except ``region`` (layer coordinates) filled row by row."""
    if len(region_pixels) != region.width * region.height:
        raise ValueError(f"region has {len(region_pixels)} bytes, expected "
                         f"{region.width * region.height}")
    if region.x < 0 or region.y < 0 or region.right > width or region.bottom > height:
        raise ValueError(f"region {region} is not inside {width}×{height}")
    if region == Rect(0, 0, width, height):
        return bytes(region_pixels)
    mask = bytearray(width * height)
    for row in range(region.height):
        start = (region.y + row) * width + region.x
        mask[start:start + region.width] = region_pixels[row * region.width:
                                                         (row + 1) * region.width]
    return bytes(mask)


def mask_or_none(mask: bytes, moves: bool = False) -> bytes | None:
    """The mask to send: None when the whole layer is fully selected (everything may change);
    with ``moves`` (the selection is the region that moves) always the mask.

    Raises ``InputError`` when nothing on the layer is selected.
    """
    if not any(mask):
        if moves:
            raise InputError(f"The selection is empty on this layer. {SELECT_MOVING}.")
        raise InputError("The selection is empty on this layer (fully unselected); select the "
                         "area that may change, or Select › None to let the whole layer change.")
    if moves:
        return mask
    return None if mask.count(255) == len(mask) else mask
