"""DragDiffusion (Shi et al., CVPR 2024), as the official code runs it (docs/algorithms.md §2).

Optimise one latent at t* with motion supervision and point tracking until every handle is
within reach, then denoise it together with the original latent under reference attention.
"""

from __future__ import annotations

import torch

from backend.engine.attention import denoise_with_reference
from backend.engine.context import DragContext, DragRun
from backend.engine.diffusion import ddim_step, denoise
from backend.engine.motion import (
    all_reached,
    dragdiffusion_motion_loss,
    masked_latent_loss,
    track_points,
)
from backend.engine.types import GridPoint


def reference(ctx: DragContext, z_star: torch.Tensor,
              use_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """F⁰ (the undragged features at t*) and, for the mask term, DDIM(z_t*): one forward,
    cached with the image (``DragContext.cached``)."""
    runner, schedule, t = ctx.runner, ctx.schedule, ctx.schedule.t_star
    runner.work.phase = "reference"

    @torch.no_grad()
    def compute():
        eps0, feat0 = runner.eps_and_features(z_star, t, ctx.grid, need_eps=use_mask)
        return feat0, ddim_step(schedule, z_star, eps0, t) if use_mask else None

    return ctx.cached(("reference", t, ctx.grid, use_mask), compute)


def prepare(ctx: DragContext, z_star: torch.Tensor, masked: bool) -> None:
    """What a drag of this image reads before its first step, computed ahead into the memo (a
    prepare): the reference of an edit with (``masked``) or without a mask."""
    reference(ctx, z_star, masked and ctx.params.lam > 0)


def drag_latent(ctx: DragContext, z_star: torch.Tensor) -> tuple[torch.Tensor, list[GridPoint]]:
    """The latent-optimisation loop (docs/algorithms.md §2, step 2).

    Returns the edited z_{t*} and the tracked handles.
    """
    p, runner, schedule = ctx.params, ctx.runner, ctx.schedule
    t = schedule.t_star
    use_mask = ctx.keep is not None and p.lam > 0
    feat0, x_prev0 = reference(ctx, z_star, use_mask)

    z = z_star.clone().float().requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=p.latent_lr)
    handles_init = list(ctx.handles)
    handles = list(ctx.handles)
    steps_run = 0
    for k in range(p.drag_steps):
        ctx.step("drag", k, p.drag_steps)
        with ctx.autocast():
            eps, feat = runner.eps_and_features(z, t, ctx.grid, need_eps=use_mask)
            if k > 0:
                handles = track_points(feat0, feat, handles, handles_init, p.r_p)
            if all_reached(handles, ctx.targets, p.reach_threshold):
                break
            loss = dragdiffusion_motion_loss(feat, handles, ctx.targets, p.r_m, p.reach_threshold)
            if use_mask:
                loss = loss + p.lam * masked_latent_loss(ddim_step(schedule, z, eps, t), x_prev0,
                                                         ctx.keep)
        ctx.optimiser_step(loss, optimiser)
        steps_run += 1
    early = steps_run < p.drag_steps  # the tracker put every handle within reach
    ctx.drag = DragRun(steps_run, stopped_inside=early, stop="reached" if early else None)
    return z.detach(), handles


def run(ctx: DragContext, z_star: torch.Tensor) -> tuple[torch.Tensor, list[GridPoint]]:
    """Drag, then denoise [original, edited] from t* to 0. Returns (clean edited latent, handles)."""
    z_edit, handles = drag_latent(ctx, z_star)
    p = ctx.params
    steps = ctx.schedule.denoise_timesteps

    def on_x0(i: int, x0: torch.Tensor) -> None:
        ctx.show("denoise", i, x0)

    if not p.reference_attention:
        return denoise(ctx.runner, ctx.schedule, z_edit, steps,
                       lambda i, n: ctx.step("denoise", i, n), on_x0), handles

    # [original, edited]; a re-drag serves the original branch from the cache (ctx.memo)
    z = denoise_with_reference(ctx.runner, ctx.schedule, z_star, z_edit, steps,
                               p.ref_start_layer, lambda i, n: ctx.step("denoise", i, n),
                               on_x0, active=lambda i: i >= p.ref_start_step,
                               memo=ctx.memo)
    return z, handles
