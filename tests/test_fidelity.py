"""The engine against the official codes' exact behaviour (masks, points, working size, stops).

Reference behaviour is computed here the way the official codes compute it (torch ops on the same
inputs), not copied from them.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.engine.devices import PRECISIONS
from backend.engine.params import DragParams
from backend.engine.pipeline import DragEngine
from backend.engine.types import DragRequest


def _engine() -> DragEngine:
    """An engine whose model is only what ``prepare``/``drag_context`` read (no weights)."""
    model = SimpleNamespace(vae_scale_factor=8, device=torch.device("cpu"), dtype=torch.float32,
                            precision=PRECISIONS["fp32"], preset={})
    return DragEngine(model)  # type: ignore[arg-type]


def _context(request: DragRequest, params: DragParams):
    engine = _engine()
    prep = engine.prepare(request, params)
    ctx = engine.drag_context(prep, params, None, None, request, lambda *a: None)
    return prep, ctx


def _official_keep(mask_work: np.ndarray, work: tuple[int, int]) -> torch.Tensor:
    """1 − nearest(nearest(mask, sup_res), latent) with F.interpolate, as both official codes."""
    w, h = work
    m = torch.from_numpy(mask_work.astype(np.float32))[None, None]
    m = F.interpolate(m, (int(0.5 * h), int(0.5 * w)), mode="nearest")
    m = F.interpolate(m, (h // 8, w // 8), mode="nearest")
    return 1.0 - m


@pytest.mark.parametrize(("rows", "cols"), [((13, 61), (21, 70)), ((5, 90), (3, 29)),
                                            ((35, 77), (9, 90))])
def test_keep_mask_is_the_official_nearest_chain_for_edges_off_the_8_pixel_lattice(rows, cols):
    image = np.zeros((96, 96, 3), np.uint8)
    mask = np.zeros((96, 96), np.uint8)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = 255
    params = DragParams(work_size=96)
    prep, ctx = _context(DragRequest(image, [(40.0, 40.0)], [(50.0, 40.0)], mask), params)
    assert prep.working_size == (96, 96)
    torch.testing.assert_close(ctx.keep, _official_keep(mask > 0, prep.working_size), rtol=0, atol=0)


def test_mask_resized_to_the_working_size_samples_as_the_official_nearest():
    image = np.zeros((150, 150, 3), np.uint8)
    mask = np.zeros((150, 150), np.uint8)
    mask[17:93, 41:121] = 255
    params = DragParams(work_size=64)
    prep, ctx = _context(DragRequest(image, [(40.0, 40.0)], [(50.0, 40.0)], mask), params)
    ref = F.interpolate(torch.from_numpy(mask > 0).float()[None, None], (64, 64), mode="nearest")
    np.testing.assert_array_equal(prep.mask_working, ref[0, 0].numpy() > 0)
    torch.testing.assert_close(ctx.keep, _official_keep(prep.mask_working, prep.working_size), rtol=0, atol=0)


def test_a_selection_that_vanishes_at_latent_size_regularises_nothing_and_says_so():
    image = np.zeros((96, 96, 3), np.uint8)
    mask = np.zeros((96, 96), np.uint8)
    mask[30:31, 44:58] = 255  # a 1-px strip: present at the grid, gone at latent size
    request = DragRequest(image, [(40.0, 40.0)], [(50.0, 40.0)], mask)
    _, ctx = _context(request, DragParams(work_size=96))
    assert _official_keep(mask > 0, (96, 96)).min() == 1  # the official mask term sees no mask
    assert ctx.keep is None
    assert len(ctx.warnings) == 1 and "smaller than the model's 8-pixel cell" in ctx.warnings[0]
    mask[30:40, 44:58] = 255  # a real selection: kept, no warning
    _, ctx = _context(request, DragParams(work_size=96))
    assert ctx.keep is not None and ctx.keep.min() == 0 and ctx.warnings == []


def test_a_portrait_runs_at_the_official_width_not_fitted_into_512():
    image = np.zeros((800, 600, 3), np.uint8)
    request = DragRequest(image, [(300.0, 400.0)], [(320.0, 400.0)])
    prep, ctx = _context(request, DragParams())
    assert prep.working_size == (512, 680)  # official 512×682 → an 85-row latent = 680 pixels
    assert ctx.grid == (340, 256)
    prep, _ = _context(request, DragParams(work_max_side=512))  # the small-GPU cap
    assert prep.working_size == (384, 512)
