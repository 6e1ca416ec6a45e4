"""Motion supervision and point tracking: the heart of both drag methods.

Points are (row, col) on the supervision grid (half the working resolution); feature maps are
[1, C, H', W'] on that grid. Everything here is pure torch and differentiable where it must be.

Fixes over the reference code (drag-methods.md §2.8, §3.4, §3.5): patches and tracking windows
are clamped to the map, and shifted patches sample with border clamping, so points on or near
the image edge work instead of raising shape errors or wrapping around.
"""

from __future__ import annotations

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
    centers: list[tuple[int, int]], radius: int, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer offsets (dr, dc) of a (2r+1)² window kept where every centre + offset is inside."""
    height, width = shape
    rng = torch.arange(-radius, radius + 1)
    keep_r = torch.ones_like(rng, dtype=torch.bool)
    keep_c = torch.ones_like(rng, dtype=torch.bool)
    for r, c in centers:
        keep_r &= (r + rng >= 0) & (r + rng < height)
        keep_c &= (c + rng >= 0) & (c + rng < width)
    dr, dc = torch.meshgrid(rng[keep_r], rng[keep_c], indexing="ij")
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
    """DragDiffusion's motion supervision (drag-methods.md §2.2 step 4).

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
        dr, dc = patch_offsets([(hr, hc)], radius, shape)
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
    """GoodDrag's information-preserving motion supervision (drag-methods.md §3.4).

    The template is the *original trajectory's* features at the *original* handle at the same
    timestep (never the current latent, so it cannot drift); the current features are sampled
    at the handle shifted by min(beta, distance) towards the target. Scaled by (2r)².
    """
    loss = feat.new_zeros(())
    shape = feat.shape[-2:]
    for handle, start, target in zip(handles, handles_init, targets, strict=True):
        dy, dx, dist = _step(handle, target, beta)
        if dist < reach or dist == 0:  # reached (or exactly on target: no direction)
            continue
        hr, hc = int(handle[0]), int(handle[1])
        sr, sc = int(start[0]), int(start[1])
        dr, dc = patch_offsets([(hr, hc), (sr, sc)], radius, shape)
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
    the current handle, clamped to the map (drag-methods.md §2.4, §3.5).
    """
    _, _, height, width = feat.shape
    tracked: list[GridPoint] = []
    for handle, start in zip(handles, handles_init, strict=True):
        template = feat_orig[0, :, int(start[0]), int(start[1])]
        hr, hc = int(handle[0]), int(handle[1])
        r0, r1 = max(0, hr - radius), min(height, hr + radius + 1)
        c0, c1 = max(0, hc - radius), min(width, hc + radius + 1)
        window = feat[0, :, r0:r1, c0:c1]
        cost = (window - template[:, None, None]).abs().sum(dim=0)
        best = int(torch.argmin(cost))
        tracked.append((float(r0 + best // (c1 - c0)), float(c0 + best % (c1 - c0))))
    return tracked


def all_reached(handles: list[GridPoint], targets: list[GridPoint], reach: float) -> bool:
    """True when every handle is strictly within ``reach`` grid pixels of its target."""
    return all(
        ((h[0] - t[0]) ** 2 + (h[1] - t[1]) ** 2) ** 0.5 < reach
        for h, t in zip(handles, targets, strict=True)
    )
