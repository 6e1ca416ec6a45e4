"""Drag-quality metrics against the analytically known correct result, and two baselines.

Handle error (image px). For each handle→target pair we ask where the dragged content ended up.
The hypotheses are the drag itself executed with every displacement ``d``: the scene with the
pair's shape translated by ``d`` (translation pairs) or with the handle's vertex moved by ``d``
(vertex pairs), with the other dragged shapes at their correct places. Each hypothesis is rendered
exactly (same renderer as the ground truth) and compared with the output by mean squared error
over a window around the pair's swept area, leaving out pixels that other pairs' shapes sweep.
The best ``d`` (searched coarse-to-fine: 1 px over a box spanning 0 and the drag vector plus a
margin, at 2 px, then 0.5 px and 1/8 px; ``0`` and the exact drag vector are always candidates) locates
the handle's content at ``handle + d``; the error is ``‖handle + d − target‖``. The exact correct
result scores 0; the unchanged input scores the drag length. ``match_psnr`` (the PSNR of the best
hypothesis in that window) says how much the content still looks like the dragged shape.

PSNR inside the mask is against the correct result; PSNR outside the mask is against the input
(exact compositing gives ``inf``). Means cap PSNR at ``PSNR_CAP`` dB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from backend.demo.shapes import (
    DragCase,
    Scene,
    apply_motion,
    dilate,
    render_float,
    shape_layer,
    swept_mask,
)

PSNR_CAP = 99.0


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR in dB of two uint8 images, optionally over the pixels where ``where`` is true."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    if where is not None:
        if not where.any():
            return float("nan")
        diff = diff[where]
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@dataclass
class PairScore:
    displacement: tuple[float, float]
    error: float
    match_psnr: float


@dataclass
class CaseScore:
    handle_error: float  # mean over pairs, image px
    psnr_in: float
    psnr_out: float
    pairs: list[PairScore]


class _PairLocator:
    """Renders hypotheses for one pair inside a fixed window and scores them."""

    def __init__(self, case: DragCase, pair: int) -> None:
        self.case = case
        self.pair = pair
        motion = case.motions[pair]
        size = case.before.size
        self.handle = case.handles[pair]
        self.target = case.targets[pair]
        self.shape = case.before.shapes[motion.shape]
        self.motion = motion
        region = dilate(swept_mask(self.shape, motion, self.handle, self.target, size, 0), 6)
        for j, (h, t, m) in enumerate(zip(case.handles, case.targets, case.motions, strict=True)):
            if j != pair:
                other = case.before.shapes[m.shape]
                region &= ~swept_mask(other, m, h, t, size, 2)
        ys, xs = np.nonzero(region)
        self.window = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        x0, y0, x1, y1 = self.window
        self.region = region[y0:y1, x0:x1]
        # everything except this pair's shape, with the other pairs done correctly
        others = list(case.after.shapes)
        others.pop(motion.shape)
        base_scene = Scene(case.before.background, tuple(others), size)
        self.base = {ss: render_float(base_scene, self.window, ss) for ss in (1, 2, 4)}

    def render(self, d: tuple[float, float], ss: int) -> np.ndarray:
        p = (self.handle[0] + d[0], self.handle[1] + d[1])
        shape = apply_motion(self.shape, self.motion, self.handle, p)
        col, a = shape_layer(shape, self.window, ss)
        img = self.base[ss] * (1 - a[..., None]) + col * 255.0
        return np.clip(np.rint(img), 0, 255)

    def cost(self, out: np.ndarray, d: tuple[float, float], ss: int) -> float:
        diff = self.render(d, ss) - out
        return float(np.mean(diff[self.region] ** 2))

    def locate(self, output: np.ndarray) -> PairScore:
        x0, y0, x1, y1 = self.window
        out = output[y0:y1, x0:x1].astype(np.float64)
        dx, dy = self.target[0] - self.handle[0], self.target[1] - self.handle[1]
        margin = max(4.0, 0.3 * math.hypot(dx, dy))
        xs = np.arange(math.floor(min(0, dx) - margin), math.ceil(max(0, dx) + margin) + 1, 2)
        ys = np.arange(math.floor(min(0, dy) - margin), math.ceil(max(0, dy) + margin) + 1, 2)
        cands = [(float(a), float(b)) for b in ys for a in xs]
        best = min(cands, key=lambda d: self.cost(out, d, 1))
        for step, ss in ((0.5, 2), (0.125, 4)):
            span = np.arange(-4, 5) * step
            cands = [(best[0] + a, best[1] + b) for b in span for a in span]
            best = min(cands, key=lambda d: self.cost(out, d, ss))
        finals = [best, (0.0, 0.0), (dx, dy)]
        costs = [self.cost(out, d, 4) for d in finals]
        k = int(np.argmin(costs))
        d = finals[k]
        mse = costs[k]
        err = math.hypot(self.handle[0] + d[0] - self.target[0],
                         self.handle[1] + d[1] - self.target[1])
        match = float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
        return PairScore(displacement=d, error=err, match_psnr=match)


def score(case: DragCase, output: np.ndarray) -> CaseScore:
    """Handle error, PSNR inside the mask vs the correct result, PSNR outside vs the input."""
    if output.shape != case.image.shape:
        raise ValueError(f"output shape {output.shape} != input shape {case.image.shape}")
    inside = case.mask > 0
    pairs = [_PairLocator(case, i).locate(output) for i in range(len(case.handles))]
    return CaseScore(
        handle_error=float(np.mean([p.error for p in pairs])),
        psnr_in=psnr(output, case.correct, inside),
        psnr_out=psnr(output, case.image, ~inside),
        pairs=pairs,
    )


def capped(v: float) -> float:
    return min(v, PSNR_CAP)


# ---------------------------------------------------------------- baselines


def noop(case: DragCase) -> np.ndarray:
    """Output = input."""
    return case.image.copy()


def _component(seed_mask: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The 4-connected component of ``allowed`` containing ``seed_mask`` (iterated dilation)."""
    comp = seed_mask & allowed
    while True:
        grown = comp.copy()
        grown[1:] |= comp[:-1]
        grown[:-1] |= comp[1:]
        grown[:, 1:] |= comp[:, :-1]
        grown[:, :-1] |= comp[:, 1:]
        grown &= allowed
        if (grown == comp).all():
            return comp
        comp = grown


def cut_and_paste(case: DragCase, threshold: float = 40.0) -> np.ndarray:
    """Naive baseline using only what a user gives (image, mask, points).

    Per pair: the background colour is the median of the mask's boundary ring; the "object" is
    the connected set of in-mask pixels that differ from it by more than ``threshold`` (RGB L2)
    and contains the such pixel nearest the handle, grown by 1 px. Every object is cut (hole
    filled with the background colour) and pasted at the integer-rounded handle→target offset.
    Pixels outside the mask are kept.
    """
    img = case.image.astype(np.float64)
    inside = case.mask > 0
    ring = dilate(~inside, 1) & inside
    bg = np.median(img[ring], axis=0) if ring.any() else np.median(img.reshape(-1, 3), axis=0)
    fg = np.linalg.norm(img - bg, axis=-1) > threshold
    fg &= inside
    out = img.copy()
    pieces = []
    h, w = inside.shape
    yy, xx = np.mgrid[0:h, 0:w]
    for (hx, hy), (tx, ty) in zip(case.handles, case.targets, strict=True):
        if not fg.any():
            continue
        dist = (xx + 0.5 - hx) ** 2 + (yy + 0.5 - hy) ** 2
        dist[~fg] = np.inf
        seed = np.zeros_like(fg)
        seed[np.unravel_index(np.argmin(dist), dist.shape)] = True
        obj = dilate(_component(seed, fg), 1) & inside
        pieces.append((obj, round(tx - hx), round(ty - hy)))
        out[obj] = bg
    for obj, ox, oy in pieces:
        ys, xs = np.nonzero(obj)
        ty, tx = ys + oy, xs + ox
        ok = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        out[ty[ok], tx[ok]] = img[ys[ok], xs[ok]]
    out = np.where(inside[..., None], out, img)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


BASELINES = {"no-op": noop, "cut-paste": cut_and_paste}
