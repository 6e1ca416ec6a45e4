"""Inpaint4Drag's bidirectional warp: where every pixel of a dragged region goes, and what is left
to inpaint.

As the official ``utils/drag.py`` (``bi_warp``) computes it (docs/algorithms.md, Inpaint4Drag):

1. Each external contour of the region mask, filled (holes included), is one region; the
   handle/target pairs whose handle lies on its pixels drive it.
2. Every contour point and every region pixel moves by the inverse-distance-weighted mean of the
   drag vectors of its 4 nearest handles (weights 1 / (d + 1e-6); over 100 handles, 100 of them
   picked with ``linspace``; one handle moves everything by its vector), rounded to pixels.
3. The moved contour, filled, is the target region. Each target pixel's source is found the
   other way: its own position moved by the same weighting over the forward-mapped region
   pixels and their way back, so the target has no holes.
4. Inpainting mask = (source ∧ ¬target) dilated by a k×k square, ∪ the moved contour drawn
   k pixels thick (k = 5).

Integer pixel indices (x, y) throughout; the distances, weights and rounding run in float32
torch exactly as the official code's (``torch.cdist``, ``torch.topk``), on the CPU. The
OpenCV parts are ``engine.raster``. Deviations (docs/algorithms.md): a handle on no region is an
error, not ignored; a region whose target falls entirely outside the image is inpainted away
instead of silently staying.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from backend.engine import raster
from backend.engine.errors import InvalidInput

EPS = 1e-6  # added to distances before inverting them (official)
NEIGHBOURS = 4  # control points that weigh in each pixel's move (official)
MAX_REFERENCES = 100  # more control points than this are subsampled (official)
KERNEL = 5  # official dilation size and outline thickness of the inpainting mask …
CANVAS = 512  # … on the official app's canvas (its long side)
CHUNK = 1 << 16  # rows of the distance matrix computed at once (bounds memory)


@dataclass
class WarpMap:
    """The result of the warp on an H×W canvas.

    ``source`` and ``target`` are (N, 2) int64 (x, y) pixel indices: ``target[i]`` takes the
    pixel at ``source[i]``. ``inpaint`` is the H×W bool inpainting mask; ``moved`` the union of
    the target regions; ``region_of`` the region index (0-based, contours in OpenCV's order)
    driven by each handle.
    """

    source: np.ndarray
    target: np.ndarray
    inpaint: np.ndarray
    moved: np.ndarray
    region_of: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """``image`` (H×W×C, any dtype) with every target pixel replaced by its source pixel:
        copies, bit for bit, nothing interpolated."""
        out = image.copy()
        if len(self.source):
            out[self.target[:, 1], self.target[:, 0]] = image[self.source[:, 1],
                                                               self.source[:, 0]]
        return out


def pixel_index(point: tuple[float, float], width: int, height: int) -> tuple[int, int]:
    """A continuous image point (pixel i spans [i, i + 1)) → the pixel it lies in, (x, y);
    a point on the right or bottom edge belongs to the last pixel."""
    x, y = point
    return min(width - 1, max(0, int(np.floor(x)))), min(height - 1, max(0, int(np.floor(y))))


def odd_kernel(size: int) -> int:
    """The official rule: a positive even size is made odd by adding one; 0 stays 0."""
    size = max(0, int(size))
    return size + 1 if size > 0 and size % 2 == 0 else size


def interpolate(points: torch.Tensor, references: torch.Tensor,
                vectors: torch.Tensor) -> torch.Tensor:
    """Move ``points`` (N×2 float32) by the inverse-distance-weighted mean of ``vectors`` at
    their ``NEIGHBOURS`` nearest ``references``, rounded to whole pixels (the official
    ``interpolate_points_with_weighted_directions``, row chunks for bounded memory)."""
    if len(points) == 0 or len(references) == 0:
        return points
    if len(references) == 1:
        return points + vectors
    if len(references) > MAX_REFERENCES:
        picked = torch.linspace(0, len(references) - 1, MAX_REFERENCES, device="cpu").long()
        references, vectors = references[picked], vectors[picked]
    k = min(NEIGHBOURS, len(references))
    moved = []
    for start in range(0, len(points), CHUNK):
        part = points[start:start + CHUNK]
        nearest, which = torch.topk(torch.cdist(part, references), k=k, dim=1, largest=False)
        weights = 1.0 / (nearest + EPS)
        weights = weights / weights.sum(dim=1, keepdim=True)
        shift = (weights.unsqueeze(-1) * vectors[which]).sum(dim=1)
        moved.append((part + shift).round().float())
    return torch.cat(moved)


def _region_points(filled: np.ndarray) -> torch.Tensor:
    """The filled region's pixels as (x, y) float32, in raster order (as ``np.where``)."""
    ys, xs = np.nonzero(filled)
    return torch.from_numpy(np.stack([xs, ys], axis=1).astype(np.float32))


def _inside(points: torch.Tensor, width: int, height: int) -> torch.Tensor:
    x, y = points[:, 0], points[:, 1]
    return (x >= 0) & (x < width) & (y >= 0) & (y < height)


def bi_warp(region_mask: np.ndarray, handles: list[tuple[int, int]],
            targets: list[tuple[int, int]], kernel: int = KERNEL) -> WarpMap:
    """The warp of the regions of ``region_mask`` (H×W, >0 moves) along integer pixel
    ``handles`` → ``targets``; ``kernel`` sizes the inpainting mask's dilation and outline.

    Raises ``InvalidInput`` naming the first handle that lies on no region.
    """
    height, width = region_mask.shape
    shape = (height, width)
    kernel = odd_kernel(kernel)
    sources_all = torch.tensor(handles, dtype=torch.float32, device="cpu").reshape(-1, 2)
    targets_all = torch.tensor(targets, dtype=torch.float32, device="cpu").reshape(-1, 2)
    found = raster.external_contours(region_mask > 0)
    region_of = [-1] * len(handles)
    for index, (_contour, filled) in enumerate(found):
        for i, (x, y) in enumerate(handles):
            if region_of[i] < 0 and filled[y, x]:
                region_of[i] = index
    for i, owner in enumerate(region_of):
        if owner < 0:
            x, y = handles[i]
            raise InvalidInput(
                f"handle {i + 1} at pixel ({x}, {y}) is not on the selection: with "
                "Inpaint4Drag the selection is the region that moves, so each handle must lie "
                "inside it (select the object, or move the handle onto it)")

    source_union = np.zeros(shape, bool)
    target_union = np.zeros(shape, bool)
    outline = np.zeros(shape, bool)
    gone = np.zeros(shape, bool)  # regions dragged entirely off the canvas (deviation)
    sources, destinations, warnings = [], [], []
    for index, (contour, filled) in enumerate(found):
        mine = [i for i, owner in enumerate(region_of) if owner == index]
        if not mine:
            warnings.append(f"a selected region (around pixel {tuple(contour[0].tolist())}) "
                            "has no handle on it, so it stays where it is")
            continue
        region = _region_points(filled)
        control = sources_all[mine]
        vectors = targets_all[mine] - control
        moved_contour = interpolate(torch.from_numpy(contour.astype(np.float32)), control,
                                    vectors)
        moved_region = interpolate(region, control, vectors)
        moved_contour_px = moved_contour.int().numpy()
        target_filled = raster.fill_polygon(shape, moved_contour_px)
        if not target_filled.any():
            gone |= filled
            continue
        if kernel > 0:
            outline |= raster.draw_closed_polyline(shape, moved_contour_px, kernel)
        target_pixels = _region_points(target_filled)
        back = interpolate(target_pixels, moved_region, region - moved_region)
        valid = _inside(back, width, height)
        if not bool(valid.any()):
            gone |= filled
            continue
        sources.append(back[valid])
        destinations.append(target_pixels[valid])
        source_union |= filled
        target_union |= target_filled

    inpaint = (source_union | gone) & ~target_union
    if kernel > 0:
        inpaint = raster.dilate_square(inpaint, kernel)
    inpaint |= outline
    if not sources:
        empty = np.zeros((0, 2), np.int64)
        return WarpMap(empty, empty, inpaint, target_union, region_of, warnings)
    return WarpMap(torch.cat(sources).numpy().astype(np.int64),
                   torch.cat(destinations).numpy().astype(np.int64),
                   inpaint, target_union, region_of, warnings)
