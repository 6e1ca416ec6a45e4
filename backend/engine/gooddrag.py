"""GoodDrag (Zhang et al., ICLR 2025), as the official code runs it (docs/algorithms.md §3).

Alternating Drag and Denoising (AlDD): at each of the first ``drag_end_step`` denoising steps
the latent is dragged a little (information-preserving motion supervision against the original
trajectory), then denoised one step. Reference attention starts once dragging has ended.
"""

from __future__ import annotations

import math

import torch

from backend.engine.attention import denoise_with_reference
from backend.engine.context import DragContext, DragRun
from backend.engine.diffusion import ddim_step, denoise, on_grid, predicted_x0
from backend.engine.motion import (
    all_reached,
    gooddrag_motion_loss,
    masked_latent_loss,
    track_points,
)
from backend.engine.types import GridPoint


def original_trajectory(ctx: DragContext, z_star: torch.Tensor, n: int):
    """Features F⁰_t and next latents z⁰_{t−1} of the undragged trajectory for the first n steps.

    The features are kept at the block's own resolution (SD1.5 at 512²: 5 MB each in fp16
    instead of a 168 MB fp32 grid map, 7 of them by default) and put on the grid when used.
    """
    feats, latents = [], []
    z = z_star
    ctx.runner.work.phase = "reference"
    with torch.no_grad():
        for t in ctx.schedule.denoise_timesteps[:n]:
            eps, feat = ctx.runner.eps_and_features(z, t, None)
            z = ddim_step(ctx.schedule, z, eps, t)
            feats.append(feat)
            latents.append(z)
    return feats, latents


class _Tracker:
    """Handle bookkeeping shared across timesteps (tracking and the no-change early stop)."""

    def __init__(self, handles: list[GridPoint]) -> None:
        self.init = list(handles)
        self.handles = list(handles)
        self.no_change = 0
        self.adam_steps = 0
        self.stop: str | None = None  # why dragging ended early: "reached" or "no_change"

    def track(self, feat0: torch.Tensor, feat: torch.Tensor, radius: int, count: bool) -> None:
        new = track_points(feat0, feat, self.handles, self.init, radius)
        if count:
            self.no_change = self.no_change + 1 if new == self.handles else 0
        self.handles = new


def drag_at_timestep(
    ctx: DragContext, z: torch.Tensor, t: int, feat0: torch.Tensor, z0_prev: torch.Tensor,
    tracker: _Tracker, total_adam: int,
) -> tuple[torch.Tensor, bool]:
    """One AlDD drag phase at timestep t (docs/algorithms.md §3).

    Returns (dragged latent, keep dragging?).
    """
    p, runner = ctx.params, ctx.runner
    z = z.clone().float().requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=p.latent_lr)  # fresh moments at every timestep
    track_num, since_track, first = 0, 0, True
    threshold = p.drag_loss_threshold * (2 * p.r1) ** 2
    # Unlike the reference, no mask means no regularisation (everything may change), as in
    # DragDiffusion: a user who selects nothing expects the whole image to be editable.
    use_mask = ctx.keep is not None and p.lam > 0
    while track_num < p.track_per_denoise:
        ctx.step("drag", tracker.adam_steps, total_adam)
        with ctx.autocast():
            eps, feat = runner.eps_and_features(z, t, ctx.grid, need_eps=use_mask)
            if first:
                tracker.track(feat0, feat, p.r2, count=False)
                first = False
            if all_reached(tracker.handles, ctx.targets, p.reach_threshold):
                tracker.stop = "reached"
                return z.detach(), False
            if tracker.no_change >= p.max_track_no_change:
                tracker.stop = "no_change"
                return z.detach(), False
            drag_loss = gooddrag_motion_loss(feat, feat0, tracker.handles, tracker.init,
                                             ctx.targets, p.r1, p.beta, p.reach_threshold)
            loss = drag_loss
            if use_mask:
                loss = loss + p.lam * masked_latent_loss(ddim_step(ctx.schedule, z, eps, t),
                                                         z0_prev, ctx.keep)
        ctx.optimiser_step(loss, optimiser)
        tracker.adam_steps += 1
        since_track += 1
        if since_track == p.max_drag_per_track or _at_most(drag_loss, threshold, tracker.handles,
                                                           ctx.targets, p.reach_threshold):
            track_num += 1
            since_track = 0
            # Tracking uses this iteration's features, computed before the Adam update.
            tracker.track(feat0, feat.detach(), p.r2, count=True)
    return z.detach(), True


def _at_most(loss: torch.Tensor, threshold: float, handles: list, targets: list,
             reach: float) -> bool:
    """``loss <= threshold``, without a device → host read of the loss at threshold 0.

    The motion loss sums non-negative terms, one per handle that is neither within ``reach`` nor
    exactly on its target, so at threshold 0 the test only holds when no handle adds a term (or
    every patch matches exactly, which a float loss does not do): the host knows that already.
    """
    if threshold != 0:
        return float(loss.detach()) <= threshold
    return all(math.dist(h, t) < reach or tuple(h) == tuple(t)
               for h, t in zip(handles, targets, strict=True))


def dragged_timesteps(ctx: DragContext) -> int:
    """How many of the denoising steps may drag: ``drag_end_step``, at most all of them."""
    return min(ctx.params.drag_end_step, len(ctx.schedule.denoise_timesteps))


def cached_trajectory(ctx: DragContext, z_star: torch.Tensor):
    """``original_trajectory`` over the dragged timesteps, cached with the image."""
    n_drag = dragged_timesteps(ctx)
    return ctx.cached(("trajectory", n_drag, ctx.grid),
                      lambda: original_trajectory(ctx, z_star, n_drag))


def prepare(ctx: DragContext, z_star: torch.Tensor, masked: bool) -> None:
    """What a drag of this image reads before its first step, computed ahead into the memo (a
    prepare): the original trajectory (the mask does not change it)."""
    cached_trajectory(ctx, z_star)


def run(ctx: DragContext, z_star: torch.Tensor) -> tuple[torch.Tensor, list[GridPoint]]:
    """AlDD over the denoising steps. Returns (clean edited latent, tracked handles)."""
    p, schedule, runner = ctx.params, ctx.schedule, ctx.runner
    timesteps = schedule.denoise_timesteps
    n_drag = dragged_timesteps(ctx)
    feats0, latents0 = cached_trajectory(ctx, z_star)
    tracker = _Tracker(ctx.handles)
    total_adam = n_drag * p.track_per_denoise * p.max_drag_per_track

    total = len(timesteps)
    z_orig, z_edit = z_star, z_star
    dragging, i = n_drag > 0, 0
    # As the official loop: a no-change counter that hit its limit at the previous timestep's
    # last tracking ends dragging before this timestep (no re-tracking, reference attention
    # from here on); reaching the limit mid-timestep stops inside drag_at_timestep.
    while i < n_drag and dragging and tracker.no_change < p.max_track_no_change:
        t = timesteps[i]
        z_edit, dragging = drag_at_timestep(ctx, z_edit, t, on_grid(feats0[i], ctx.grid),
                                            latents0[i], tracker, total_adam)
        # No reference attention yet: the branches are independent and the original branch's
        # next latent is already known from its recorded trajectory.
        ctx.step("denoise", i, total)
        with torch.no_grad():
            eps = runner.eps(z_edit, t)
            ctx.show("denoise", i, predicted_x0(schedule, z_edit, eps, t))
            z_edit = ddim_step(schedule, z_edit, eps, t)
        z_orig = latents0[i]
        i += 1
    if tracker.stop is None and i < n_drag:  # the no-change limit, between two timesteps
        tracker.stop = "no_change"
    ctx.drag = DragRun(tracker.adam_steps, stopped_inside=n_drag > 0 and not dragging,
                       stop=tracker.stop, timesteps=i)
    return _denoise_rest(ctx, z_orig, z_edit, timesteps[i:], total), tracker.handles


def _denoise_rest(ctx: DragContext, z_orig, z_edit, timesteps: list[int], total: int):
    """Denoise the remaining steps, reference attention from the first (algorithms.md §3, 3)."""
    offset = total - len(timesteps)

    def on_step(j: int, _n: int) -> None:
        ctx.step("denoise", offset + j, total)

    def on_x0(j: int, x0: torch.Tensor) -> None:
        ctx.show("denoise", offset + j, x0)

    if not ctx.params.reference_attention:
        return denoise(ctx.runner, ctx.schedule, z_edit, timesteps, on_step, on_x0)
    # [original, edited]; a re-drag serves the original branch from the cache (ctx.memo)
    return denoise_with_reference(ctx.runner, ctx.schedule, z_orig, z_edit, timesteps,
                                  ctx.params.ref_start_layer, on_step, on_x0, memo=ctx.memo)
