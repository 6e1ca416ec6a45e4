"""Image-side geometry: working resolution, point and mask mapping, channels, compositing.

Pure numpy/PIL (no torch): the engine edits at a working resolution and maps everything back,
so any size and aspect ratio works and pixels outside the mask stay exactly the input's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from backend.engine.errors import InvalidInput
from backend.engine.types import GridPoint, ImagePoint

# Pixel dtypes the engine accepts, and the value of full intensity in each.
PIXEL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0,
               np.dtype(np.float32): 1.0}
# ITU-R 601 luma, as PIL's "L" conversion, for gray images.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def working_size(width: int, height: int, working_width: int = 512, max_side: int = 0,
                 multiple: int = 8) -> tuple[int, int]:
    """(w, h) the engine edits at, both multiples of ``multiple``.

    As both official codes (their UIs' ``store_img``): width ``working_width`` and height
    ``int(working_width · height / width)``, then rounded down to a multiple of 8, which is the
    size their VAE's latent covers (a 512×682 image has an 85-row latent, 680 pixels). With
    ``max_side`` > 0 and a longer side than that, the long side is fitted to ``max_side``
    instead (aspect kept, rounded to a multiple of 8), for GPUs with little memory.
    """
    w = max(multiple, working_width // multiple * multiple)
    h = max(multiple, int(working_width * height / width) // multiple * multiple)
    if max_side <= 0 or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(width, height)

    def snap(v: float) -> int:
        return max(multiple, round(v * scale / multiple) * multiple)

    return snap(width), snap(height)


def validate_image(image: np.ndarray) -> None:
    """The image alone (``validate_request`` without points and mask: a prepare's input)."""
    if not isinstance(image, np.ndarray) or image.dtype not in PIXEL_SCALE:
        raise InvalidInput(
            "the image pixels must be uint8, uint16 or float32 (8-bit, 16-bit or 32-bit float), "
            f"got {getattr(image, 'dtype', type(image).__name__)}"
        )
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise InvalidInput(
            "the image must be H×W×C with C = 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA), "
            f"got shape {tuple(image.shape)}"
        )
    height, width = image.shape[:2]
    if min(height, width) < 8:
        raise InvalidInput(f"the image is too small ({width}×{height}); it needs at least 8×8")
    if image.dtype == np.float32 and not np.isfinite(image).all():
        raise InvalidInput("the image has NaN or infinite pixel values; replace them first")


def validate_request(image: np.ndarray, handles: list[ImagePoint], targets: list[ImagePoint],
                     mask: np.ndarray | None) -> None:
    """Raise ``InvalidInput`` with a precise sentence for anything the engine cannot use."""
    validate_image(image)
    height, width = image.shape[:2]
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


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an H×W×3 uint8 array to (w, h) (PIL, antialiased when shrinking)."""
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    return np.asarray(Image.fromarray(rgb, "RGB").resize(size, Image.BILINEAR))


def resize_float(image: np.ndarray, size: tuple[int, int],
                 box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Bilinear resize of an H×W×C float32 array to (w, h), channel by channel (PIL mode "F",
    antialiased when shrinking). ``box`` (left, top, right, bottom, in source pixels) resizes
    only that region, sampling exactly as a resize of the whole image would there."""
    channels = [Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), "F")
                for c in range(image.shape[2])]
    return np.stack([np.asarray(ch.resize(size, Image.BILINEAR, box=box)) for ch in channels],
                    axis=2)


def model_rgb(color: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The model's input: ``color`` (H×W×3, any supported dtype) at (w, h), float32 in [-1, 1].

    8-bit images take PIL's 8-bit resize, as the official codes; 16-bit and float images are
    resized in float32 from their own precision (floats clipped to [0, 1] first).
    """
    if color.dtype == np.uint8:
        return resize_rgb(color, size).astype(np.float32) / 127.5 - 1.0
    unit = to_unit(color)
    if (unit.shape[1], unit.shape[0]) != size:
        unit = resize_float(unit, size)
    return unit * 2.0 - 1.0


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """Pixels of any supported dtype as float32 in [0, 1] (float input clipped)."""
    return np.clip(pixels.astype(np.float32) / PIXEL_SCALE[pixels.dtype], 0.0, 1.0)


def quantize(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 values on ``dtype``'s scale (0–255, 0–65535 or 0–1) → that dtype (rounded,
    clipped for the integer types)."""
    if dtype == np.float32:
        return values.astype(np.float32, copy=False)
    top = PIXEL_SCALE[np.dtype(dtype)]
    return np.clip(np.rint(values), 0, top).astype(dtype)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` outputs when resizing ``n_in`` samples nearest-neighbour.

    Exactly the index ``torch.nn.functional.interpolate(mode="nearest")`` reads, which both
    official codes use for the mask: floor(i · n_in / n_out) in float32, clamped to the input
    (OpenCV's ``INTER_NEAREST``, used for the first resize in their UIs, is the same floor rule
    computed in double precision; for a few size pairs one row or column differs).
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


def to_grid(points: list[ImagePoint], image_size: tuple[int, int], working: tuple[int, int],
            grid: tuple[int, int]) -> list[GridPoint]:
    """Continuous image (x, y) → (row, col) cell of the supervision grid, as the official codes
    round a click (docs/algorithms.md §1, Coordinates).

    The point is scaled to the working image, turned into the official pixel index (x − 0.5:
    pixel i spans [i, i + 1), its centre i + 0.5 is index i) and mapped to the grid with the
    official ``round(index / size · grid)`` (float32, half to even, as ``torch.round``), i.e.
    ``round(i / 2)``. Unlike the official code, cells are clamped into the grid.
    """
    (width, height), (w, h), (rows, cols) = image_size, working, grid

    def cell(v: float, scale: float, size: int, n: int) -> float:
        index = v * scale - 0.5
        return float(min(n - 1, max(0, int(np.rint(np.float32(index / size * n))))))

    return [(cell(y, h / height, h, rows), cell(x, w / width, w, cols)) for x, y in points]


def from_grid(points: list[GridPoint], image_size: tuple[int, int], working: tuple[int, int],
              grid: tuple[int, int]) -> list[ImagePoint]:
    """(row, col) on the grid → continuous image (x, y): the centre of the official pixel index
    ``col · w / cols`` (GoodDrag's ``get_original_points``) scaled back to the full image."""
    (width, height), (w, h), (rows, cols) = image_size, working, grid
    return [((c * w / cols + 0.5) * width / w, (r * h / rows + 0.5) * height / h)
            for r, c in points]


def feather_width(feather: int, scale: float) -> int:
    """Blend width in full-resolution pixels: ``feather`` working pixels times the working→full
    scale (never less than ``feather``), so the blend covers the same part of the edit at any
    image size (3 px of a 512-px edit are 23 px of a 4000-px image)."""
    return round(feather * max(1.0, scale))


def _ramp_table() -> np.ndarray:
    """Box-filtered mask value (0–255) → blend weight: 0 at the edge, smoothstep to 1 inside."""
    ramp = np.clip(2.0 * np.arange(256) / 255.0 - 1.0, 0.0, 1.0)
    return (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)


RAMP = _ramp_table()


def feather_weights(mask: np.ndarray, feather: int) -> np.ndarray:
    """Blend weight in [0, 1]: 0 wherever ``mask`` is 0, rising smoothly over ``feather`` px
    inside it.

    The ramp lies entirely inside the mask, so pixels outside it keep exactly the input's
    values. Along a straight edge it is smoothstep(d / feather) of the distance d into the mask
    (from a (2·feather+1)² box filter of the mask, PIL's, at 8-bit precision), so the blend has
    no kink at either end; it is exactly 1 where the box lies inside the mask. ``mask`` may be
    soft (0–255, e.g. a feathered GIMP selection); its values scale the weight. The image border
    is not an edge (the box filter repeats edge pixels, so nothing fades along it).
    """
    if mask.dtype == np.uint8:
        soft = mask if ((mask - np.uint8(1)) < 254).any() else None  # None: only 0 and 255
    else:
        soft = mask.astype(np.float32) * 255.0
    inside = (mask > 0).view(np.uint8) * np.uint8(255)
    if feather <= 0:
        return inside.astype(np.float32) / 255.0 if soft is None else soft.astype(np.float32) / 255
    box = np.asarray(Image.fromarray(inside, "L").filter(ImageFilter.BoxBlur(feather)))
    weights = RAMP[box & inside]  # 0 outside the mask
    if soft is not None:
        weights *= soft.astype(np.float32) / 255.0
    return weights


def composite(original: np.ndarray, edited: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """weights·edited + (1 − weights)·original in ``original``'s dtype.

    ``edited`` is float32 on that dtype's scale, or already in that dtype. Exactly ``original``
    (bit for bit) wherever weights == 0; ``None`` weights take ``edited`` everywhere. Only the
    pixels with 0 < weight < 1 (the feather band) are blended in float; the rest is copied.
    """
    if edited.dtype != original.dtype:
        edited = quantize(edited, original.dtype)
    if weights is None:
        return edited
    full = weights >= 1.0
    out = np.where(full[..., None], edited, original)
    band = np.nonzero((weights > 0.0) & ~full)
    w = weights[band][:, None]
    out[band] = quantize(w * edited[band].astype(np.float32)
                         + (1.0 - w) * original[band].astype(np.float32), original.dtype)
    return out


def mask_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """(rows, cols) slices of the bounding box of ``mask > 0`` (None when it is empty)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def paste_edit(image: np.ndarray, edited: np.ndarray, mask: np.ndarray | None,
               feather: int) -> np.ndarray:
    """The input ``image`` (H×W×C, any supported dtype) with the working-size ``edited`` RGB
    (h×w×3 float32 in [0, 1]) blended in where ``mask`` allows.

    Only the mask's bounding box is touched: the edit is resized for that box alone (sampled as
    a resize of the whole image would be), blended with ``feather`` px of ramp inside the mask
    (at most a quarter of the box's smaller side, so a small selection still gets the edit), and
    written into a copy of the input; every other pixel, and the alpha channel, are the input's
    bytes. ``mask`` None replaces the whole colour image.
    """
    height, width, channels = image.shape
    out = image.copy()
    if mask is not None:
        box = mask_box(mask)
        if box is None:
            return out
    else:
        box = (slice(0, height), slice(0, width))
    rows, cols = box
    weights = None
    if mask is not None:
        feather = min(feather, min(rows.stop - rows.start, cols.stop - cols.start) // 4)
        # The ramp at a pixel looks ``feather`` px around it: weigh the box with that margin.
        r0, r1 = max(0, rows.start - feather), min(height, rows.stop + feather)
        c0, c1 = max(0, cols.start - feather), min(width, cols.stop + feather)
        weights = feather_weights(mask[r0:r1, c0:c1], feather)[
            rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0]
    sx, sy = edited.shape[1] / width, edited.shape[0] / height
    region = (cols.start * sx, rows.start * sy, cols.stop * sx, rows.stop * sy)
    size = (cols.stop - cols.start, rows.stop - rows.start)
    n_color = 3 if channels >= 3 else 1
    if image.dtype == np.uint8:  # an 8-bit result: resize the 8-bit edit (PIL's fast path)
        if n_color == 1:
            edited = (edited @ LUMA)[..., None]
        small = quantize(edited * 255.0, np.dtype(np.uint8))
        mode = "RGB" if n_color == 3 else "L"
        part = np.asarray(Image.fromarray(small if n_color == 3 else small[..., 0], mode)
                          .resize(size, Image.BILINEAR, box=region)).reshape(size[1], size[0], -1)
    else:
        part = resize_float(edited, size, region) * PIXEL_SCALE[image.dtype]
        if n_color == 1:
            part = (part @ LUMA)[..., None]
    out[rows, cols, :n_color] = composite(image[rows, cols, :n_color], part, weights)
    return out
