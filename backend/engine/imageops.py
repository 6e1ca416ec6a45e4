"""Image-side geometry: working resolution, point and mask mapping, channels, compositing.

Pure numpy/PIL (no torch): the engine edits at a working resolution and maps everything back,
so any size and aspect ratio works and pixels outside the mask stay exactly the input's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from backend.engine.errors import InvalidInput
from backend.engine.types import GridPoint, ImagePoint


def working_size(width: int, height: int, work_width: int = 512, max_side: int = 0,
                 multiple: int = 8) -> tuple[int, int]:
    """(w, h) the engine edits at, both multiples of ``multiple``.

    As both official codes (their UIs' ``store_img``): width ``work_width`` and height
    ``int(work_width · height / width)``, then rounded down to a multiple of 8, which is the
    size their VAE's latent covers (a 512×682 image has an 85-row latent, 680 pixels). With
    ``max_side`` > 0 and a longer side than that, the long side is fitted to ``max_side``
    instead (aspect kept, rounded to a multiple of 8), for GPUs with little memory.
    """
    w = max(multiple, work_width // multiple * multiple)
    h = max(multiple, int(work_width * height / width) // multiple * multiple)
    if max_side <= 0 or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(width, height)

    def snap(v: float) -> int:
        return max(multiple, round(v * scale / multiple) * multiple)

    return snap(width), snap(height)


def validate_request(image: np.ndarray, handles: list[ImagePoint], targets: list[ImagePoint],
                     mask: np.ndarray | None) -> None:
    """Raise ``InvalidInput`` with a precise sentence for anything the engine cannot use."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise InvalidInput("the image must be 8-bit (uint8) pixels")
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise InvalidInput(
            "the image must be H×W×C with C = 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA), "
            f"got shape {tuple(image.shape)}"
        )
    height, width = image.shape[:2]
    if min(height, width) < 8:
        raise InvalidInput(f"the image is too small ({width}×{height}); it needs at least 8×8")
    if len(handles) != len(targets):
        raise InvalidInput(f"{len(handles)} handles but {len(targets)} targets: give them in pairs")
    if not handles:
        raise InvalidInput("no drag given: add at least one handle→target pair")
    for kind, points in (("handle", handles), ("target", targets)):
        for i, (x, y) in enumerate(points):
            if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= width and 0 <= y <= height):
                raise InvalidInput(
                    f"{kind} {i + 1} at ({x:g}, {y:g}) is outside the {width}×{height} image"
                )
    if mask is not None:
        if mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[..., 0]
        if mask.shape != (height, width):
            raise InvalidInput(
                f"the mask is {mask.shape[1] if mask.ndim > 1 else '?'}×{mask.shape[0]} but the "
                f"image is {width}×{height}; they must be the same size"
            )
        if not mask.any():
            raise InvalidInput("the mask is empty: nothing may change (select a region to edit)")


def split_channels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB (H×W×3) for the model and the alpha channel (or None), from 1–4 channel input."""
    channels = image.shape[2]
    color = image[..., :3] if channels >= 3 else np.repeat(image[..., :1], 3, axis=2)
    alpha = image[..., -1] if channels in (2, 4) else None
    return color, alpha


def merge_channels(rgb: np.ndarray, alpha: np.ndarray | None, channels: int) -> np.ndarray:
    """Back to the input's channel layout (gray via ITU-R 601 luma, as PIL's "L")."""
    if channels >= 3:
        out = rgb
    else:
        out = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))[..., None]
    if alpha is not None:
        out = np.concatenate([out, alpha[..., None]], axis=2)
    return np.ascontiguousarray(out)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an H×W×3 uint8 array to (w, h) (PIL, antialiased when shrinking)."""
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    return np.asarray(Image.fromarray(rgb, "RGB").resize(size, Image.BILINEAR))


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` outputs when resizing ``n_in`` samples nearest-neighbour.

    Exactly the index ``torch.nn.functional.interpolate(mode="nearest")`` reads, which both
    official codes use for the mask: floor(i · n_in / n_out) in float32, clamped to the input
    (OpenCV's ``INTER_NEAREST``, used for the first resize in their UIs, is the same floor rule).
    Not the pixel-centre sampling of PIL's ``NEAREST``.
    """
    out = np.arange(n_out, dtype=np.int64)
    if n_out == n_in:
        return out
    if n_out == 2 * n_in:
        return out >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(out.astype(np.float32) * scale).astype(np.int64), n_in - 1)


def resize_mask_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an H×W mask to (w, h), binarised (>0 editable)."""
    rows = nearest_indices(mask.shape[0], size[1])
    cols = nearest_indices(mask.shape[1], size[0])
    return mask[rows[:, None], cols[None, :]] > 0


def to_grid(points: list[ImagePoint], image_size: tuple[int, int], work_size: tuple[int, int],
            grid: tuple[int, int]) -> list[GridPoint]:
    """Continuous image (x, y) → (row, col) cell of the supervision grid, as the official codes
    round a click (docs/algorithms.md, "Coordinates").

    The point is scaled to the working image, turned into the official pixel index (x − 0.5:
    pixel i spans [i, i + 1), its centre i + 0.5 is index i) and mapped to the grid with the
    official ``round(index / size · grid)`` (float32, half to even, as ``torch.round``), i.e.
    ``round(i / 2)``. Unlike the official code, cells are clamped into the grid.
    """
    (width, height), (w, h), (rows, cols) = image_size, work_size, grid

    def cell(v: float, scale: float, size: int, n: int) -> float:
        index = v * scale - 0.5
        return float(min(n - 1, max(0, int(np.rint(np.float32(index / size * n))))))

    return [(cell(y, h / height, h, rows), cell(x, w / width, w, cols)) for x, y in points]


def from_grid(points: list[GridPoint], image_size: tuple[int, int], work_size: tuple[int, int],
              grid: tuple[int, int]) -> list[ImagePoint]:
    """(row, col) on the grid → continuous image (x, y): the centre of the official pixel index
    ``col · w / cols`` (GoodDrag's ``get_original_points``) scaled back to the full image."""
    (width, height), (w, h), (rows, cols) = image_size, work_size, grid
    return [((c * w / cols + 0.5) * width / w, (r * h / rows + 0.5) * height / h)
            for r, c in points]


def feather_weights(mask: np.ndarray, feather: int) -> np.ndarray:
    """Blend weight in [0, 1]: 0 wherever ``mask`` is 0, ramping up over ``feather`` px inside.

    The ramp lies entirely inside the mask, so pixels outside it keep exactly the input's values.
    ``mask`` may be soft (0–255, e.g. a feathered GIMP selection); its values scale the weight.
    """
    soft = mask.astype(np.float32) / 255.0 if mask.dtype == np.uint8 else mask.astype(np.float32)
    inside = soft > 0
    if feather <= 0:
        return soft
    size = 2 * feather + 1
    padded = np.pad(inside.astype(np.float32), feather, mode="edge")
    # Box filter via cumulative sums (separable), then a ramp that is 0 at the mask's edge.
    c = np.cumsum(np.pad(padded, ((1, 0), (0, 0))), axis=0)
    rows = (c[size:] - c[:-size]) / size
    c = np.cumsum(np.pad(rows, ((0, 0), (1, 0))), axis=1)
    box = (c[:, size:] - c[:, :-size]) / size
    ramp = np.clip(2.0 * box - 1.0, 0.0, 1.0)
    return np.where(inside, ramp * soft, 0.0).astype(np.float32)


def composite(original: np.ndarray, edited: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """weights·edited + (1 − weights)·original, exactly ``original`` where weights == 0."""
    if weights is None:
        return edited
    w = weights[..., None]
    blended = np.rint(w * edited.astype(np.float32) + (1.0 - w) * original.astype(np.float32))
    out = blended.clip(0, 255).astype(np.uint8)
    return np.where(w > 0, out, original)
