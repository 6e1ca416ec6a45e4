"""Inpaint4Drag (Lu & Han, ICCV 2025), as one edit: warp the region at the layer's own
resolution, inpaint what it left behind at the working size, paste that back.

1. **Warp** (``engine.warp``, the official ``bi_warp``): the request's mask is the region that
   moves; handles and targets are taken to the pixels they lie in; every target pixel copies
   its source pixel, bit for bit, in the layer's own dtype (alpha included).
2. **Inpaint** only the inpainting mask's neighbourhood: a crop around it at least the working
   size wide (an image no larger than that is inpainted whole, as the official code does at
   512 px), resized to the working size (long side ``work_size``, multiples of 8), the hole
   pre-filled smoothly, through a ``Filler`` (an inpainting model with LCM, or the plain model's
   blended-latent filler).
3. **Paste** the filled crop back over the inpainting mask only (``imageops.paste_edit``):
   outside it the result is the warped layer, exactly.

Numbers (the official app): 8 LCM steps, strength 1.0 (0.99 for SDXL), guidance 1, dilation
and outline 5 px on its 512-px canvas (scaled with the layer's long side here), a hard paste
(``feather`` 0).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from backend.engine import imageops
from backend.engine.errors import InvalidInput
from backend.engine.fillers import Filler, FillRequest, smooth_fill
from backend.engine.params import DragParams
from backend.engine.types import DragRequest, DragResult, ProgressFn
from backend.engine.warp import CANVAS, WarpMap, bi_warp, odd_kernel, pixel_index
from backend.engine.work import WorkCounter, inpaint_passes, official_defaults

NO_SELECTION = ("Inpaint4Drag needs a selection: select the region that moves (the object to "
                "drag), then run it again")
CONTEXT = 0.25  # context around the inpainting mask, a fraction of its size on each side
GRID = 10  # the official preview's grid pattern over the inpainting mask (pixels)


@dataclass
class WarpedLayer:
    """A layer after the warp, before inpainting."""

    image: np.ndarray  # the input with the region's pixels moved (its own dtype)
    hole: np.ndarray  # H×W bool: the inpainting mask
    warp: WarpMap
    kernel: int  # the inpainting mask's dilation and outline at this resolution
    seconds: float


def kernel_for(kernel: int, size: tuple[int, int]) -> int:
    """The official kernel, meant for the official 512-px canvas, at an image of ``size`` =
    (W, H): scaled with the long side, at least 1, made odd (5 at 512 px, 1 at 128, 11 at
    1024)."""
    if kernel <= 0:
        return 0
    return odd_kernel(max(1, round(kernel * max(size) / CANVAS)))


def points_to_pixels(points: list[tuple[float, float]], width: int,
                     height: int) -> list[tuple[int, int]]:
    return [pixel_index(p, width, height) for p in points]


def warp_layer(image: np.ndarray, mask: np.ndarray | None, handles: list[tuple[float, float]],
               targets: list[tuple[float, float]], params: DragParams) -> WarpedLayer:
    """Step 1 on the whole layer (continuous points, see ``DragRequest``)."""
    if mask is None:
        raise InvalidInput(NO_SELECTION)
    if mask.ndim == 3:
        mask = mask[..., 0]
    height, width = image.shape[:2]
    kernel = kernel_for(params.inpaint_kernel, (width, height))
    start = time.perf_counter()
    warp = bi_warp(mask > 0, points_to_pixels(handles, width, height),
                   points_to_pixels(targets, width, height), kernel)
    warped = warp.apply(image)
    return WarpedLayer(warped, warp.inpaint, warp, kernel, time.perf_counter() - start)


def grid_overlay(rgb: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """An 8-bit preview: ``rgb`` with the inpainting mask painted white with a black grid every
    ``GRID`` pixels, as the official app previews the warp."""
    out = rgb.copy()
    pattern = np.full(hole.shape, 255, np.uint8)
    pattern[::GRID] = 0
    pattern[:, ::GRID] = 0
    out[hole] = pattern[hole][:, None]
    return out


@dataclass(frozen=True)
class Crop:
    """Where the model works: ``box`` = (x0, y0, x1, y1) in the layer, ``work`` = (w, h)."""

    box: tuple[int, int, int, int]
    work: tuple[int, int]

    def rows(self) -> slice:
        return slice(self.box[1], self.box[3])

    def cols(self) -> slice:
        return slice(self.box[0], self.box[2])


def plan_crop(hole: np.ndarray, work_size: int, max_side: int = 0, multiple: int = 8) -> Crop:
    """The crop around the inpainting mask (its box with ``CONTEXT`` on every side, grown to at
    least ``work_size`` per side where the image allows) and its working size: long side
    ``work_size`` (or the crop's own when smaller), ``max_side`` capping it, both sides
    multiples of ``multiple``."""
    height, width = hole.shape
    rows, cols = imageops.mask_box(hole)

    def span(lo: int, hi: int, n: int) -> tuple[int, int]:
        margin = max(4, round((hi - lo) * CONTEXT))
        lo, hi = max(0, lo - margin), min(n, hi + margin)
        want = min(n, work_size)
        if hi - lo < want:  # grow to the working size, centred, kept inside the image
            lo = max(0, min(n - want, lo - (want - (hi - lo)) // 2))
            hi = lo + want
        return lo, hi

    x0, x1 = span(cols.start, cols.stop, width)
    y0, y1 = span(rows.start, rows.stop, height)
    long_side = max(x1 - x0, y1 - y0)
    target = min(work_size, long_side)
    if max_side > 0:
        target = min(target, max_side)
    scale = target / long_side

    def snap(v: int) -> int:
        return max(multiple, round(v * scale / multiple) * multiple)

    return Crop((x0, y0, x1, y1), (snap(x1 - x0), snap(y1 - y0)))


def work_stats(work: WorkCounter, params: DragParams) -> dict:
    """UNet forward-equivalents of this edit next to the official app's for the same steps
    and strength, and at its defaults (the shape of the other methods' ``stats["work"]``); the
    VAE runs once each way (not UNet work)."""
    passes = inpaint_passes(params.inpaint_steps, params.inpaint_strength)
    defaults = sum(official_defaults("inpaint4drag").values())
    return {"fe": dict(work.fe), "total": work.total, "truncated": 0,
            "official_fe": {"denoise": passes}, "official_total": passes,
            "ratio": round(work.total / passes, 4), "official_defaults_total": defaults,
            "ratio_to_official_defaults": round(work.total / defaults, 4),
            "vae": {"encode": 1 if work.total else 0, "decode": 1 if work.total else 0}}


def _hole_at(hole: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The hole resized to (w, h): a working pixel is in it when any layer pixel under it is."""
    if (hole.shape[1], hole.shape[0]) == size:
        return hole.copy()
    area = np.asarray(Image.fromarray(hole.astype(np.uint8) * 255, "L").resize(size, Image.BOX))
    return area > 0


def run(request: DragRequest, params: DragParams, filler: Filler,
        report: ProgressFn, preview: Callable[[int, torch.Tensor], None] | None = None,
        vae_scale: int = 8) -> DragResult:
    """One Inpaint4Drag edit (see the module docstring). ``report(phase, step, total)`` is
    called at every step (it raises ``Cancelled``)."""
    timings: dict[str, float] = {}
    report("load", 0, 1)
    layer = warp_layer(request.image, request.mask, request.handles, request.targets, params)
    timings["warp"] = round(layer.seconds, 4)
    work = WorkCounter(phase="denoise")
    stats: dict = {"filler": filler.name, "moved_pixels": len(layer.warp.target),
                   "inpaint_pixels": int(layer.hole.sum()), "kernel": layer.kernel}
    image = layer.image
    if layer.hole.any():
        crop = plan_crop(layer.hole, params.work_size, params.work_max_side,
                         multiple=max(8, vae_scale))
        start = time.perf_counter()
        colour, _alpha = imageops.split_channels(image[crop.rows(), crop.cols()])
        pixels = imageops.model_rgb(colour, crop.work)
        hole_work = _hole_at(layer.hole[crop.rows(), crop.cols()], crop.work)
        pixels = smooth_fill(pixels, hole_work)
        fill = FillRequest(
            pixels=torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None],
            hole=torch.from_numpy(hole_work.astype(np.float32))[None, None],
            steps=params.inpaint_steps, strength=params.inpaint_strength, seed=request.seed)
        filled = filler.fill(fill, work, lambda i, n: report("denoise", i, n), preview)
        timings["inpaint"] = round(time.perf_counter() - start, 4)
        start = time.perf_counter()
        report("decode", 0, 1)
        box_hole = layer.hole[crop.rows(), crop.cols()]
        scale = max((crop.box[2] - crop.box[0]) / crop.work[0],
                    (crop.box[3] - crop.box[1]) / crop.work[1])
        feather = imageops.feather_width(params.feather, scale)
        image = image.copy()
        image[crop.rows(), crop.cols()] = imageops.paste_edit(
            image[crop.rows(), crop.cols()], filled, box_hole.astype(np.uint8) * 255, feather)
        timings["paste"] = round(time.perf_counter() - start, 4)
        stats.update(crop=list(crop.box), work_size=list(crop.work))
    stats["work"] = work_stats(work, params)
    stats["unet_passes"] = work.total
    warnings = list(layer.warp.warnings)
    return DragResult(image=image, handles=[(float(x), float(y)) for x, y in request.targets],
                      timings=timings, stats=stats, warnings=warnings)


def preview_warp(image: np.ndarray, mask: np.ndarray, handles: list[tuple[float, float]],
                 targets: list[tuple[float, float]], overrides: dict | None = None,
                 overlay: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """The warp alone, for a live preview (the protocol's ``warp``): (the warped image in the
    input's dtype, the inpainting mask as H×W uint8 0/255, figures). With ``overlay`` the
    inpainting mask is painted into the image as the official preview's grid (opaque).
    Raises ``InvalidInput`` for what an edit would refuse."""
    from backend.engine.params import resolve

    imageops.validate_request(image, handles, targets, mask)
    _, params = resolve("inpaint4drag", overrides or {})
    layer = warp_layer(image, mask, handles, targets, params)
    out = layer.image
    if overlay and layer.hole.any():
        top = imageops.PIXEL_SCALE[out.dtype]
        colour = 3 if out.shape[2] >= 3 else 1
        pattern = np.full(layer.hole.shape, top, np.float32)
        pattern[::GRID] = 0
        pattern[:, ::GRID] = 0
        out = out.copy()
        out[layer.hole, :colour] = pattern[layer.hole][:, None].astype(out.dtype)
        if out.shape[2] in (2, 4):
            out[layer.hole, -1] = np.array(top).astype(out.dtype)
    figures = {"moved_pixels": len(layer.warp.target), "inpaint_pixels": int(layer.hole.sum()),
               "seconds": round(layer.seconds, 4), "warnings": list(layer.warp.warnings)}
    return out, layer.hole.astype(np.uint8) * 255, figures
