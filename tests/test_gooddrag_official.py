"""GoodDrag's stops and border handling against the official code's control flow and loss."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import DDIMScheduler

from backend.engine import attention, gooddrag, motion
from backend.engine.context import DragContext
from backend.engine.diffusion import Schedule
from backend.engine.params import PRESETS
from backend.engine.work import WorkCounter

SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class StillRunner:
    """A UNet stand-in whose features never change: every tracking finds the handle unmoved."""

    def __init__(self, feat: torch.Tensor) -> None:
        self.feat = feat
        self.calls: list[tuple[str, int, int, bool, bool]] = []  # kind, t, batch, grad, ref
        self.reference = False
        self.unet = None
        self.passes = 0
        self.work = WorkCounter()

    def eps_and_features(self, z, t, grid, need_eps=True):
        self.calls.append(("features", t, z.shape[0], z.requires_grad, self.reference))
        return 0.1 * z, self.feat + 0.0 * z.mean()

    def eps(self, z, t):
        self.calls.append(("eps", t, z.shape[0], z.requires_grad, self.reference))
        return 0.1 * z


def _context(monkeypatch, **params) -> tuple[DragContext, StillRunner]:
    feat = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    runner = StillRunner(feat)

    @contextmanager
    def fake_reference_attention(_unet, _start_layer):
        runner.reference = True
        yield {"active": True}

    # gooddrag denoises the rest through attention.denoise_with_reference
    monkeypatch.setattr(attention, "reference_attention", fake_reference_attention)
    schedule = Schedule.from_scheduler(DDIMScheduler(**SCHEDULER), 10, 0.8)
    p = PRESETS["gooddrag"].replace(**params)
    ctx = DragContext(runner=runner, schedule=schedule, params=p, grid=(16, 16),
                      handles=[(8.0, 4.0)], targets=[(8.0, 12.0)], keep=None)
    return ctx, runner


def test_no_change_limit_at_a_timesteps_last_tracking_stops_before_the_next_timestep(monkeypatch):
    # 2 trackings per timestep, each unchanged: the counter reaches 2 at the first timestep's
    # last tracking. The official loop then neither drags nor re-tracks at the next timestep
    # and registers reference attention before denoising it.
    ctx, runner = _context(monkeypatch, drag_end_step=3, track_per_denoise=2,
                           max_drag_per_track=1, max_track_no_change=2)
    ts = ctx.schedule.denoise_timesteps
    z_star = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    gooddrag.run(ctx, z_star)
    drag_forwards = [c[1] for c in runner.calls if c[0] == "features" and c[3]]
    assert drag_forwards == [ts[0], ts[0]]  # 2 Adam steps at the first timestep only
    assert ctx.drag.timesteps == 1 and ctx.drag.steps == 2
    denoise = [(t, batch, ref) for kind, t, batch, grad, ref in runner.calls if kind == "eps"]
    assert denoise[0] == (ts[0], 1, False)  # the dragged timestep: edited branch alone
    assert denoise[1:] == [(t, 2, True) for t in ts[1:]]  # reference attention from ts[1]


def test_no_change_limit_mid_timestep_stops_at_once(monkeypatch):
    ctx, runner = _context(monkeypatch, drag_end_step=3, track_per_denoise=4,
                           max_drag_per_track=1, max_track_no_change=2)
    ts = ctx.schedule.denoise_timesteps
    gooddrag.run(ctx, torch.zeros(1, 4, 2, 2))
    drag_forwards = [c[1] for c in runner.calls if c[0] == "features" and c[3]]
    assert drag_forwards == [ts[0]] * 3  # 2 Adam steps, then the forward that sees the limit
    assert ctx.drag.timesteps == 1 and ctx.drag.steps == 2


def official_style_loss(feat, feat_orig, handle, start, target, r=4, beta=4.0):
    """GoodDrag's per-handle loss computed the official way: the template is the plain slice of
    the original features around the original handle; the moved patch is four stacked integer
    slices at floor / floor + 1 of handle + step, blended with scalar bilinear weights."""
    h, g = torch.tensor(handle, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    dist = (g - h).norm()
    y, x = h + (g - h) / dist * min(beta, float(dist))
    y0, x0 = int(torch.floor(y)), int(torch.floor(x))
    fy, fx = float(y) - y0, float(x) - x0
    sr, sc = int(start[0]), int(start[1])
    template = feat_orig[:, :, sr - r:sr + r + 1, sc - r:sc + r + 1]

    def at(row: int, col: int) -> torch.Tensor:
        return feat[:, :, row - r:row + r + 1, col - r:col + r + 1]

    moved = ((1 - fx) * (1 - fy) * at(y0, x0) + (1 - fx) * fy * at(y0 + 1, x0)
             + fx * (1 - fy) * at(y0, x0 + 1) + fx * fy * at(y0 + 1, x0 + 1))
    return (2 * r) ** 2 * (template - moved).abs().mean()


def test_border_clamp_reads_only_the_template_and_the_moved_patch():
    gen = torch.Generator().manual_seed(5)
    feat, feat_orig = torch.randn(1, 16, 32, 32, generator=gen), torch.randn(1, 16, 32, 32,
                                                                           generator=gen)
    # The handle is within r1 = 4 of the left edge, but handle + step ± r1 and the template
    # around the original handle are inside: the official code reads a full 9×9 patch.
    cases = [((16.0, 2.0), (16.0, 10.0), (19.0, 20.0)),  # current handle near the left edge
             ((29.0, 16.0), (20.0, 16.0), (5.0, 13.0)),  # near the bottom edge, moving up
             ((12.0, 12.0), (12.0, 12.0), (15.0, 14.0))]  # well inside (no clamp at all)
    for handle, start, target in cases:
        ours = motion.gooddrag_motion_loss(feat, feat_orig, [handle], [start], [target])
        ref = official_style_loss(feat, feat_orig, handle, start, target)
        torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)


def test_border_clamp_still_fixes_what_crashes_the_official_code():
    gen = torch.Generator().manual_seed(6)
    feat = torch.randn(1, 16, 32, 32, generator=gen, requires_grad=True)
    feat_orig = torch.randn(1, 16, 32, 32, generator=gen)
    # Template and moved patch both cross the left edge: the official slices go negative.
    loss = motion.gooddrag_motion_loss(feat, feat_orig, [(16.0, 3.0)], [(16.0, 1.0)],
                                       [(16.0, 0.0)])
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and feat.grad.abs().sum() > 0
