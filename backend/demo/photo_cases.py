"""Drag cases on real photographs whose correct result is known, and their scores.

Two kinds, both on photographs held out of the demo model's training:

* ``stereo``: the Middlebury motorcycle pair. Handles are textured points of the left view; each
  target is its handle displaced by the ground-truth disparity (a left pixel at column x shows
  the point the right view shows at x − d). The input is the left view, the answer inside the
  mask is the right view; answer pixels with no visible counterpart in the left view
  (occlusions, unknown disparity) are left out of the scores.
* ``paste``: an object (a disc or polygon cut from another photograph, anti-aliased) pasted on a
  background photograph; the answer is the same composite with the object moved by the drag.

Handle error is found by patch matching, not colour: the input's patch around each handle is
searched for in the output around the target (normalised cross-correlation, sub-pixel peak), and
the error is the distance from the best match to the target. The exact answer scores ≈ 0; the
unchanged input scores the drag length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from backend.demo import photos, shapes
from backend.demo.metrics import psnr

CASE_SIDE = 256  # long side of the case images, in pixels
PATCH = 7  # patch radius for matching (15×15 px)


@dataclass
class PhotoCase:
    name: str
    image: np.ndarray  # H×W×3 uint8 input
    correct: np.ndarray  # the answer (valid where ``valid``)
    mask: np.ndarray  # H×W uint8, >0 editable
    valid: np.ndarray  # H×W bool: answer known here
    handles: list[tuple[float, float]]
    targets: list[tuple[float, float]]
    prompt: str = "a photo"


# ---------------------------------------------------------------- case generation


def _segment_mask(shape: tuple[int, int], pairs, radius: float) -> np.ndarray:
    """Pixels within ``radius`` of any handle→target segment."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    out = np.zeros(shape, bool)
    for (hx, hy), (tx, ty) in pairs:
        vx, vy = tx - hx, ty - hy
        t = np.clip(((xx - hx) * vx + (yy - hy) * vy) / max(vx * vx + vy * vy, 1e-9), 0, 1)
        out |= (xx - hx - t * vx) ** 2 + (yy - hy - t * vy) ** 2 <= radius**2
    return out


def _cornerness(img: np.ndarray) -> np.ndarray:
    """Smallest eigenvalue of the 7×7 structure tensor (Shi–Tomasi) of the grey image."""
    g = img.astype(np.float64).mean(-1)
    gy, gx = np.gradient(g)

    def box(a: np.ndarray, r: int = 3) -> np.ndarray:
        c = np.cumsum(np.cumsum(np.pad(a, r + 1, mode="edge"), 0), 1)
        k = 2 * r + 1
        return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k])[: a.shape[0], : a.shape[1]]

    a, b, c = box(gx * gx), box(gx * gy), box(gy * gy)
    return (a + c) / 2 - np.sqrt(((a - c) / 2) ** 2 + b * b)


def stereo_cases(n: int = 4, side: int = CASE_SIDE) -> list[PhotoCase]:
    """``n`` one-handle cases on the motorcycle pair at long side ``side``."""
    left, right, disp = photos.stereo_pair()
    h0, w0 = left.shape[:2]
    s = side / max(h0, w0)
    size = (round(w0 * s) // 8 * 8, round(h0 * s) // 8 * 8)
    sx, sy = size[0] / w0, size[1] / h0
    L, R = photos.resize(left, size), photos.resize(right, size)
    # disparity at the case size: nearest sample at each pixel centre, scaled
    ys = np.minimum(((np.arange(size[1]) + 0.5) / sy).astype(int), h0 - 1)
    xs = np.minimum(((np.arange(size[0]) + 0.5) / sx).astype(int), w0 - 1)
    D = disp[np.ix_(ys, xs)] * sx
    known = np.isfinite(D)
    D = np.where(known, D, 0.0)
    # right-view pixels with a visible left-view counterpart (forward warp of known pixels,
    # keeping the nearest surface where two land on one pixel)
    seen = np.zeros(L.shape[:2], bool)
    yy, xx = np.nonzero(known)
    xr = np.floor(xx + 0.5 - D[yy, xx]).astype(int)
    ok = (xr >= 0) & (xr < size[0])
    seen[yy[ok], xr[ok]] = True
    seen[:, 1:-1] |= seen[:, :-2] & seen[:, 2:]  # close 1 px rounding holes
    # candidate handles: strong corners with known, smooth disparity, well inside the frame
    score = _cornerness(L)
    flat = np.abs(np.gradient(D, axis=1)) + np.abs(np.gradient(D, axis=0))
    score[~known | (flat > 0.5)] = 0
    m = 24
    score[:m], score[-m:], score[:, :m], score[:, -m:] = 0, 0, 0, 0
    cases, taken = [], []
    order = np.argsort(score, axis=None)[::-1]
    for idx in order:
        if len(cases) == n or score.flat[idx] <= 0:
            break
        y, x = np.unravel_index(idx, score.shape)
        if any(math.hypot(x - a, y - b) < 40 for a, b in taken):
            continue
        taken.append((x, y))
        handle = (x + 0.5, y + 0.5)
        target = (x + 0.5 - float(D[y, x]), y + 0.5)
        mask = _segment_mask(L.shape[:2], [(handle, target)], 20)
        cases.append(PhotoCase(
            name=f"stereo-{len(cases):02d}", image=L, correct=R,
            mask=(mask * 255).astype(np.uint8), valid=mask & seen,
            handles=[handle], targets=[target], prompt="a photo of a motorcycle"))
    return cases


def _composite(bg: np.ndarray, tex: np.ndarray, shape: shapes.Shape,
               shift: tuple[float, float]) -> np.ndarray:
    """``bg`` with ``shape`` filled by ``tex`` moved by ``shift`` (the texture moves along)."""
    h, w = bg.shape[:2]
    cov = shapes.shape_layer(shape, (0, 0, w, h))[1][..., None]
    shifted = np.roll(tex, (round(shift[1]), round(shift[0])), axis=(0, 1))
    return shapes.quantize(bg * (1 - cov) + shifted * cov)


def paste_cases(n: int = 4, seed: int = 0, side: int = CASE_SIDE) -> list[PhotoCase]:
    """``n`` cases: a photo-textured shape moved over a held-out background photograph."""
    rng = np.random.default_rng(seed)
    backgrounds = [photos.fit_long_side(photos.load(k), side) for k in ("chelsea",
                                                                          "motorcycle_right")]
    textures = [photos.load(k) for k in ("chelsea", "motorcycle_left")]
    cases = []
    for i in range(n):
        bg = backgrounds[i % len(backgrounds)]
        h, w = (bg.shape[0] // 8) * 8, (bg.shape[1] // 8) * 8
        bg = np.ascontiguousarray(bg[:h, :w])
        tex = photos.random_crop(rng, textures[(i + 1) % len(textures)], max(h, w), 256, 512)
        tex = tex[:h, :w].astype(np.float64)
        r = float(rng.uniform(16, 26))
        dist = float(rng.uniform(12, 28))
        a = float(rng.uniform(0, 2 * math.pi))
        d = (round(dist * math.cos(a)), round(dist * math.sin(a)))
        lo = r + 4
        c = (math.floor(rng.uniform(lo + max(0, -d[0]), w - lo - max(0, d[0]))) + 0.5,
             math.floor(rng.uniform(lo + max(0, -d[1]), h - lo - max(0, d[1]))) + 0.5)
        kind = ("disc", "hexagon", "square", "pentagon")[i % 4]
        verts = None if kind == "disc" else shapes.regular_polygon(
            kind, c, r, float(rng.uniform(0, 2 * math.pi)))
        obj = shapes.Shape(kind, "photo", c, r, shapes.Fill((0.0, 0.0, 0.0)), verts)

        before = _composite(bg, tex, obj, (0, 0))
        after = _composite(bg, tex, obj.translated(*d), d)
        target = (c[0] + d[0], c[1] + d[1])
        mask = np.zeros((h, w), bool)
        for t in np.linspace(0, 1, 9):
            moved = obj.translated(t * d[0], t * d[1])
            mask |= shapes.shape_layer(moved, (0, 0, w, h), 2)[1] > 0
        mask = shapes.dilate(mask, 6)
        cases.append(PhotoCase(
            name=f"paste-{i:02d}-{kind}", image=before, correct=after,
            mask=(mask * 255).astype(np.uint8), valid=mask.copy(), handles=[c],
            targets=[target], prompt="a photo"))
    return cases


# ---------------------------------------------------------------- scores


def locate(image: np.ndarray, output: np.ndarray, handle, target, r: int = PATCH,
           margin: float = 8.0) -> tuple[float, float]:
    """Where the input's patch around ``handle`` is in ``output``: the sub-pixel peak of the
    zero-mean normalised cross-correlation, searched over the box spanning handle and target
    plus ``margin``."""
    h, w = image.shape[:2]
    hx, hy = int(handle[0]), int(handle[1])
    tpl = image[hy - r:hy + r + 1, hx - r:hx + r + 1].astype(np.float64)
    tpl = tpl - tpl.mean()
    tn = np.sqrt((tpl**2).sum()) + 1e-9
    x0 = max(r, math.floor(min(handle[0], target[0]) - margin))
    x1 = min(w - r - 1, math.ceil(max(handle[0], target[0]) + margin))
    y0 = max(r, math.floor(min(handle[1], target[1]) - margin))
    y1 = min(h - r - 1, math.ceil(max(handle[1], target[1]) + margin))
    out = output.astype(np.float64)
    best, score = (hx, hy), -np.inf
    ncc = np.full((y1 - y0 + 1, x1 - x0 + 1), -1.0)
    for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
            p = out[y - r:y + r + 1, x - r:x + r + 1]
            p = p - p.mean()
            v = float((p * tpl).sum() / (np.sqrt((p**2).sum()) * tn + 1e-9))
            ncc[y - y0, x - x0] = v
            if v > score:
                best, score = (x, y), v
    bx, by = best

    def parabola(m: float, c: float, p: float) -> float:
        den = m - 2 * c + p
        return 0.0 if den >= 0 else float(np.clip(0.5 * (m - p) / den, -0.5, 0.5))

    iy, ix = by - y0, bx - x0
    dx = parabola(ncc[iy, ix - 1], ncc[iy, ix], ncc[iy, ix + 1]) if 0 < ix < ncc.shape[1] - 1 \
        else 0.0
    dy = parabola(ncc[iy - 1, ix], ncc[iy, ix], ncc[iy + 1, ix]) if 0 < iy < ncc.shape[0] - 1 \
        else 0.0
    return bx + dx + 0.5, by + dy + 0.5


def score(case: PhotoCase, output: np.ndarray) -> dict[str, float]:
    """Handle error (px), PSNR inside the mask vs the answer, PSNR outside vs the input."""
    inside = case.mask > 0
    errors = []
    for h, t in zip(case.handles, case.targets, strict=True):
        found = locate(case.image, output, h, t)
        errors.append(math.dist(found, t))
    return {
        "handle_error": float(np.mean(errors)),
        "psnr_in": psnr(output, case.correct, inside & case.valid),
        "psnr_out": psnr(output, case.image, ~inside),
    }


# ---------------------------------------------------------------- baselines


def noop(case: PhotoCase) -> np.ndarray:
    return case.image.copy()


def shift_paste(case: PhotoCase) -> np.ndarray:
    """Naive baseline from what a user gives: every masked pixel takes the input pixel one
    rounded drag vector back (the vector of its nearest handle→target segment)."""
    h, w = case.mask.shape
    inside = case.mask > 0
    yy, xx = np.nonzero(inside)
    best = np.full(len(yy), np.inf)
    src_x, src_y = xx.copy(), yy.copy()
    for (hx, hy), (tx, ty) in zip(case.handles, case.targets, strict=True):
        dist = (xx + 0.5 - (hx + tx) / 2) ** 2 + (yy + 0.5 - (hy + ty) / 2) ** 2
        closer = dist < best
        best[closer] = dist[closer]
        src_x[closer] = np.clip(xx[closer] - round(tx - hx), 0, w - 1)
        src_y[closer] = np.clip(yy[closer] - round(ty - hy), 0, h - 1)
    out = case.image.copy()
    out[yy, xx] = case.image[src_y, src_x]
    return out


BASELINES = {"no-op": noop, "cut-paste": shift_paste}
