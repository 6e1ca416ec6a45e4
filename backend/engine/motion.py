"""Motion supervision and point tracking: the heart of both drag methods.

Points are (row, col) on the supervision grid (half the working resolution); feature maps are
[1, C, H', W'] on that grid. Everything here is pure torch and differentiable where it must be.

Fixes over the reference code (docs/algorithms.md §4, border clamping): patches and tracking
windows are clamped to the map, and shifted patches sample with border clamping, so points on
or near the image edge work instead of raising shape errors or wrapping around.
"""

from __future__ import annotations

import math

import torch

from backend.engine.types import GridPoint


def bilinear_sample(feat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Sample ``feat`` [1, C, H, W] at real-valued (rows, cols) (any equal shapes) → [C, *shape].

    Positions are clamped into the map (border padding). Bilinear weights are computed from the
    fractional parts exactly as the reference's ``interpolate_feature_patch``.
    """
    _, _, height, width = feat.shape
    rows = rows.clamp(0, height - 1)
    cols = cols.clamp(0, width - 1)
    r0 = rows.floor().long().clamp(max=height - 1)
    c0 = cols.floor().long().clamp(max=width - 1)
    r1 = (r0 + 1).clamp(max=height - 1)
    c1 = (c0 + 1).clamp(max=width - 1)
    wr = (rows - r0).to(feat.dtype)
    wc = (cols - c0).to(feat.dtype)
    f = feat[0]
    return (
        f[:, r0, c0] * (1 - wr) * (1 - wc)
        + f[:, r0, c1] * (1 - wr) * wc
        + f[:, r1, c0] * wr * (1 - wc)
        + f[:, r1, c1] * wr * wc
    )


def patch_offsets(
    centers: list[tuple[float, float]], radius: int, shape: tuple[int, int],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer offsets (dr, dc) of a (2r+1)² window kept where every centre + offset is inside.

    Centres may be real-valued (a bilinear read): inside means within [0, size − 1]. The kept
    range is worked out on the host and created on ``device`` (the feature map's), so indexing
    and weights stay on it without a boolean mask that would need a device sync.
    """
    height, width = shape
    lo_r = max([-radius] + [math.ceil(-r) for r, _ in centers])
    hi_r = min([radius] + [math.floor(height - 1 - r) for r, _ in centers])
    lo_c = max([-radius] + [math.ceil(-c) for _, c in centers])
    hi_c = min([radius] + [math.floor(width - 1 - c) for _, c in centers])
    rows = torch.arange(lo_r, max(lo_r, hi_r + 1), device=device)
    cols = torch.arange(lo_c, max(lo_c, hi_c + 1), device=device)
    dr, dc = torch.meshgrid(rows, cols, indexing="ij")
    return dr, dc


def _step(handle: GridPoint, target: GridPoint, max_len: float | None) -> tuple[float, float, float]:
    """Unit direction handle→target scaled to 1 (``max_len`` None) or min(max_len, distance).

    Returns (dy, dx, distance); the step is (0, 0) when the handle is on its target.
    """
    dy, dx = target[0] - handle[0], target[1] - handle[1]
    dist = (dy * dy + dx * dx) ** 0.5
    if dist == 0:
        return 0.0, 0.0, 0.0
    length = 1.0 if max_len is None else min(max_len, dist)
    return dy / dist * length, dx / dist * length, dist


def dragdiffusion_motion_loss(
    feat: torch.Tensor,
    handles: list[GridPoint],
    targets: list[GridPoint],
    radius: int = 1,
    reach: float = 2.0,
) -> torch.Tensor:
    """DragDiffusion's motion supervision (docs/algorithms.md §2, step 2.4).

    For each handle not yet within ``reach`` of its target: the (2r+1)² patch of the *current*
    features at the handle (stop-gradient) must match the same patch shifted one grid pixel
    towards the target (bilinear). Scaled by (2r+1)² times the mean absolute difference.
    """
    loss = feat.new_zeros(())
    shape = feat.shape[-2:]
    for handle, target in zip(handles, targets, strict=True):
        dy, dx, dist = _step(handle, target, None)
        if dist < reach or dist == 0:  # reached (or exactly on target: no direction)
            continue
        hr, hc = int(handle[0]), int(handle[1])
        dr, dc = patch_offsets([(hr, hc)], radius, shape, feat.device)
        src = feat[0][:, hr + dr, hc + dc].detach()
        shifted = bilinear_sample(feat, hr + dr + dy, hc + dc + dx)
        loss = loss + (2 * radius + 1) ** 2 * (src - shifted).abs().mean()
    return loss


def gooddrag_motion_loss(
    feat: torch.Tensor,
    feat_orig: torch.Tensor,
    handles: list[GridPoint],
    handles_init: list[GridPoint],
    targets: list[GridPoint],
    radius: int = 4,
    beta: float = 4.0,
    reach: float = 2.0,
) -> torch.Tensor:
    """GoodDrag's information-preserving motion supervision (docs/algorithms.md §3, step 4).

    The template is the *original trajectory's* features at the *original* handle at the same
    timestep (never the current latent, so it cannot drift); the current features are sampled
    at the handle shifted by min(beta, distance) towards the target. Scaled by (2r)².
    Near the border only the offsets whose reads fall outside the map are dropped (template
    around the original handle, samples around handle + step); where the official code reads
    inside, this is its loss exactly.
    """
    loss = feat.new_zeros(())
    shape = feat.shape[-2:]
    for handle, start, target in zip(handles, handles_init, targets, strict=True):
        dy, dx, dist = _step(handle, target, beta)
        if dist < reach or dist == 0:  # reached (or exactly on target: no direction)
            continue
        hr, hc = int(handle[0]), int(handle[1])
        sr, sc = int(start[0]), int(start[1])
        dr, dc = patch_offsets([(sr, sc), (hr + dy, hc + dx)], radius, shape, feat.device)
        src = feat_orig[0][:, sr + dr, sc + dc].detach()
        shifted = bilinear_sample(feat, hr + dr + dy, hc + dc + dx)
        loss = loss + (2 * radius) ** 2 * (src - shifted).abs().mean()
    return loss


def masked_latent_loss(
    latent: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """Σ |(latent − reference) ⊙ keep|: pulls the region that must not change back to the original.

    ``keep`` is 1 where the image must stay (1 − editable mask) at latent resolution, [1,1,h,w].
    """
    diff = latent - reference.detach()
    if keep is not None:
        diff = diff * keep
    return diff.abs().sum()


@torch.no_grad()
def track_points(
    feat_orig: torch.Tensor,
    feat: torch.Tensor,
    handles: list[GridPoint],
    handles_init: list[GridPoint],
    radius: int,
) -> list[GridPoint]:
    """Move each handle to the best L1 match of its original feature within a clamped window.

    Template: ``feat_orig`` at the *original* handle. Search: (2r+1)² window of ``feat`` around
    the current handle, clamped to the map (docs/algorithms.md §2 step 2.2, §3 step 6).
    """
    _, _, height, width = feat.shape
    corners, best = [], []
    for handle, start in zip(handles, handles_init, strict=True):
        template = feat_orig[0, :, int(start[0]), int(start[1])]
        hr, hc = int(handle[0]), int(handle[1])
        r0, r1 = max(0, hr - radius), min(height, hr + radius + 1)
        c0, c1 = max(0, hc - radius), min(width, hc + radius + 1)
        window = feat[0, :, r0:r1, c0:c1]
        cost = (window - template[:, None, None]).abs().sum(dim=0)
        corners.append((r0, c0, c1 - c0))
        best.append(torch.argmin(cost))
    if not best:
        return []
    flat = torch.stack(best).tolist()  # one device → host read for all handles
    return [(float(r0 + i // w), float(c0 + i % w)) for (r0, c0, w), i in zip(corners, flat, strict=True)]


def all_reached(handles: list[GridPoint], targets: list[GridPoint], reach: float) -> bool:
    """True when every handle is strictly within ``reach`` grid pixels of its target.

    A handle exactly on its target has arrived whatever ``reach`` is (also 0): the motion losses
    have no direction to pull it in, so with every handle there nothing is left to optimise.
    """
    return all(
        (dist := ((h[0] - t[0]) ** 2 + (h[1] - t[1]) ** 2) ** 0.5) < reach or dist == 0
        for h, t in zip(handles, targets, strict=True)
    )
