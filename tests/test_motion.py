"""Motion supervision, bilinear patches and point tracking against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from backend.engine.motion import (
    all_reached,
    bilinear_sample,
    dragdiffusion_motion_loss,
    gooddrag_motion_loss,
    masked_latent_loss,
    patch_offsets,
    track_points,
)


def direct_bilinear(feat: torch.Tensor, r: float, c: float) -> torch.Tensor:
    """Textbook bilinear interpolation at one point (no clamping needed inside)."""
    r0, c0 = math.floor(r), math.floor(c)
    a, b = r - r0, c - c0
    f = feat[0]
    return ((1 - a) * (1 - b) * f[:, r0, c0] + (1 - a) * b * f[:, r0, c0 + 1]
            + a * (1 - b) * f[:, r0 + 1, c0] + a * b * f[:, r0 + 1, c0 + 1])


def blob(shape: tuple[int, int], center: tuple[float, float], sigma: float = 1.5) -> torch.Tensor:
    rows = torch.arange(shape[0]).float()[:, None]
    cols = torch.arange(shape[1]).float()[None, :]
    return torch.exp(-((rows - center[0]) ** 2 + (cols - center[1]) ** 2) / (2 * sigma**2))


def test_bilinear_sample_matches_direct_computation_at_subpixel_offsets():
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 5, 12, 9, generator=gen)
    rows = torch.tensor([[1.25, 3.5], [7.75, 10.0]])
    cols = torch.tensor([[0.5, 2.125], [6.9, 4.0]])
    sampled = bilinear_sample(feat, rows, cols)
    assert sampled.shape == (5, 2, 2)
    for i in range(2):
        for j in range(2):
            expected = direct_bilinear(feat, float(rows[i, j]), float(cols[i, j]))
            torch.testing.assert_close(sampled[:, i, j], expected)


def test_bilinear_sample_clamps_at_the_border():
    feat = torch.arange(12.0).view(1, 1, 3, 4)
    out = bilinear_sample(feat, torch.tensor([-0.7, 2.0, 2.6]), torch.tensor([3.4, 3.0, -1.0]))
    torch.testing.assert_close(out[0], torch.tensor([3.0, 11.0, 8.0]))


def test_patch_offsets_keep_only_positions_inside_for_every_centre():
    dr, dc = patch_offsets([(0, 5), (3, 8)], 2, (10, 9))
    assert dr.unique().tolist() == [0, 1, 2]  # row 0 − 1 would leave the map
    assert dc.unique().tolist() == [-2, -1, 0]  # col 8 + 1 would leave the map


def test_tracking_finds_a_planted_feature():
    shape = (20, 20)
    feat0 = torch.randn(1, 8, *shape, generator=torch.Generator().manual_seed(1))
    start = (10.0, 10.0)
    feat = torch.randn(1, 8, *shape, generator=torch.Generator().manual_seed(2))
    feat[0, :, 12, 8] = feat0[0, :, 10, 10]  # the handle's content now sits at (12, 8)
    assert track_points(feat0, feat, [start], [start], radius=3) == [(12.0, 8.0)]
    # Out of the search window: not found there.
    feat2 = feat.clone()
    feat2[0, :, 12, 8] = 0
    feat2[0, :, 2, 2] = feat0[0, :, 10, 10]
    assert track_points(feat0, feat2, [start], [start], radius=3) != [(2.0, 2.0)]


def test_tracking_window_is_clamped_at_the_image_edge():
    feat0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    feat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    feat[0, :, 7, 6] = feat0[0, :, 7, 7]
    assert track_points(feat0, feat, [(7.0, 7.0)], [(7.0, 7.0)], radius=12) == [(7.0, 6.0)]


@pytest.mark.parametrize("direction", [(0, 1), (0, -1), (1, 0), (-1, 0)])
def test_dragdiffusion_loss_gradient_moves_content_towards_the_target(direction):
    shape = (24, 24)
    handle = (12.0, 12.0)
    target = (12.0 + 6 * direction[0], 12.0 + 6 * direction[1])
    feat = blob(shape, handle)[None, None].repeat(1, 3, 1, 1).requires_grad_(True)
    loss = dragdiffusion_motion_loss(feat, [handle], [target], radius=1)
    loss.backward()
    # One gradient-descent step on the features: mass moves along the drag direction.
    moved = (feat - 0.5 * feat.grad).detach()[0, 0]
    rows = torch.arange(shape[0]).float()[:, None]
    cols = torch.arange(shape[1]).float()[None, :]
    before = feat.detach()[0, 0]

    def centroid(m: torch.Tensor) -> tuple[float, float]:
        return float((m * rows).sum() / m.sum()), float((m * cols).sum() / m.sum())

    shift = [a - b for a, b in zip(centroid(moved), centroid(before), strict=True)]
    along = shift[0] * direction[0] + shift[1] * direction[1]
    across = shift[0] * direction[1] - shift[1] * direction[0]
    assert along > 0.01
    assert abs(across) < 1e-4


def test_dragdiffusion_loss_skips_reached_handles_and_scales_by_patch_area():
    feat = torch.randn(1, 6, 10, 10, generator=torch.Generator().manual_seed(5))
    assert float(dragdiffusion_motion_loss(feat, [(5.0, 5.0)], [(5.0, 6.5)], reach=2.0)) == 0.0
    loss = dragdiffusion_motion_loss(feat, [(5.0, 5.0)], [(5.0, 9.0)], radius=1)
    src = feat[0, :, 4:7, 4:7]
    shifted = feat[0, :, 4:7, 5:8]  # unit step along +col is an integer shift here
    torch.testing.assert_close(loss, 9 * (src - shifted).abs().mean())


def test_a_handle_on_its_target_adds_no_loss_even_with_reach_zero():
    feat = torch.randn(1, 4, 10, 10, generator=torch.Generator().manual_seed(9))
    same = [(4.0, 4.0)]
    assert float(dragdiffusion_motion_loss(feat, same, same, reach=0.0)) == 0.0
    assert float(gooddrag_motion_loss(feat, feat, same, same, same, reach=0.0)) == 0.0
    moving = dragdiffusion_motion_loss(feat, [(4.0, 4.0), (2.0, 2.0)], [(4.0, 4.0), (2.0, 8.0)],
                                       reach=0.0)
    assert float(moving) > 0


def test_motion_losses_work_for_points_on_the_edge():
    feat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6)).requires_grad_()
    for handle, target in [((0.0, 0.0), (0.0, 10.0)), ((15.0, 15.0), (15.0, 0.0)),
                           ((15.0, 0.0), (0.0, 15.0))]:
        dd = dragdiffusion_motion_loss(feat, [handle], [target])
        gd = gooddrag_motion_loss(feat, feat.detach(), [handle], [handle], [target])
        (dd + gd).backward()
        assert torch.isfinite(feat.grad).all() and dd.item() > 0 and gd.item() > 0
        feat.grad = None


def test_gooddrag_template_comes_from_the_original_features_at_the_original_handle():
    gen = torch.Generator().manual_seed(7)
    feat_orig = torch.randn(1, 4, 20, 20, generator=gen)
    feat = torch.randn(1, 4, 20, 20, generator=gen)
    start, handle, target = (5.0, 5.0), (8.0, 8.0), (8.0, 18.0)
    loss = gooddrag_motion_loss(feat, feat_orig, [handle], [start], [target], radius=2, beta=4.0)
    src = feat_orig[0, :, 3:8, 3:8]
    shifted = feat[0, :, 6:11, 10:15]  # handle + β·d̂ = (8, 12): integer shift
    torch.testing.assert_close(loss, 16 * (src - shifted).abs().mean())
    # The step is capped by the remaining distance.
    near = gooddrag_motion_loss(feat, feat_orig, [(8.0, 12.0)], [start], [(8.0, 14.0)], radius=2,
                                beta=4.0)
    torch.testing.assert_close(near, 16 * (src - feat[0, :, 6:11, 12:17]).abs().mean())


def test_mask_term_gradient_is_zero_in_the_editable_region():
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8)).requires_grad_()
    reference = torch.zeros(1, 4, 8, 8)
    keep = torch.ones(1, 1, 8, 8)
    keep[..., 2:6, 2:6] = 0  # editable square
    masked_latent_loss(latent, reference, keep).backward()
    grad = latent.grad
    assert (grad[..., 2:6, 2:6] == 0).all()
    outside = keep.expand_as(grad).bool()
    assert (grad[outside].abs() == 1).all()


def test_all_reached_is_strict():
    assert all_reached([(0.0, 0.0)], [(0.0, 1.9)], 2.0)
    assert not all_reached([(0.0, 0.0), (5.0, 5.0)], [(0.0, 1.0), (5.0, 7.0)], 2.0)


def test_a_handle_on_its_target_has_arrived_even_with_reach_zero():
    # With reach 0 nothing is strictly within reach, but a handle exactly on its target gives
    # the motion loss no direction: treating it as not arrived left a loss without a gradient.
    assert all_reached([(3.0, 4.0)], [(3.0, 4.0)], 0.0)
    assert not all_reached([(3.0, 4.0), (1.0, 1.0)], [(3.0, 4.0), (1.0, 2.0)], 0.0)
