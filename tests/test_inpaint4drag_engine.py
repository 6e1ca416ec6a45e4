"""Inpaint4Drag through DragEngine: the warp at the layer's resolution, the crop the model
sees, the paste back (exact outside the inpainting mask, in the layer's dtype), the filler it
names, progress and cancel. The tiny random model proves the plumbing; the shipped demo model
that content really moves."""

from __future__ import annotations

import numpy as np
import pytest
import warp_cases as wc

from backend.engine.errors import Cancelled, InvalidInput
from backend.engine.inpaint4drag import grid_overlay, kernel_for, plan_crop, warp_layer
from backend.engine.pipeline import DragEngine
from backend.engine.types import CancelToken, DragRequest
from backend.engine.warp import bi_warp
from backend.model_choice import DEMO_MODEL_DIR

FAST = {"work_size": 64, "inpaint_steps": 3}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return DragEngine.load(str(tiny_model_dir), device="cpu")


def request_for(image: np.ndarray, **kw) -> DragRequest:
    h, w = image.shape[:2]
    mask = (wc.disc((h, w), 30, 24, 10) * 255).astype(np.uint8)
    fields = dict(image=image, handles=[(30.5, 24.5)], targets=[(52.5, 30.5)], mask=mask,
                  method="inpaint4drag", seed=1, params=dict(FAST))
    fields.update(kw)
    return DragRequest(**fields)


@pytest.mark.parametrize("dtype,channels", [(np.uint8, 3), (np.uint16, 4), (np.float32, 2)])
def test_moved_pixels_are_the_input_s_and_the_rest_is_exact_outside_the_hole(engine, dtype,
                                                                             channels):
    rng = np.random.default_rng(0)
    shape = (50, 75, channels)  # not a multiple of 8, smaller than the working size
    if dtype == np.float32:
        image = rng.random(shape, dtype=np.float32)
    else:
        image = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
    request = request_for(image)
    events = []
    result = engine.run(request, progress=lambda *e: events.append(e))
    assert result.image.shape == image.shape and result.image.dtype == image.dtype
    _, params = engine.table.resolve("inpaint4drag", FAST)
    layer = warp_layer(image, request.mask, request.handles, request.targets, params)
    outside = ~layer.hole
    np.testing.assert_array_equal(result.image[outside], layer.image[outside])
    moved = layer.warp.target
    kept = outside[moved[:, 1], moved[:, 0]]  # moved pixels not under the outline band
    src = layer.warp.source[kept]
    np.testing.assert_array_equal(result.image[moved[kept, 1], moved[kept, 0]],
                                  image[src[:, 1], src[:, 0]])
    assert not np.array_equal(result.image[layer.hole], image[layer.hole])  # it was filled
    if channels in (2, 4):  # alpha moves with the content and is never inpainted
        np.testing.assert_array_equal(result.image[..., -1], layer.image[..., -1])
    phases = [e[0] for e in events]
    assert phases[0] == "load" and "denoise" in phases and phases[-1] == "decode"
    assert all(0 <= step < total for _, step, total in events)
    assert result.stats["work"]["total"] == 3  # one UNet pass per step, no guidance batch
    assert "blended-latent" in result.stats["filler"]
    assert result.handles == request.targets


def test_the_model_sees_only_a_crop_around_the_hole_at_the_working_size():
    hole = np.zeros((3000, 4000), bool)
    hole[1000:1100, 2000:2300] = True
    crop = plan_crop(hole, work_size=512)
    x0, y0, x1, y1 = crop.box
    assert (x0, y0, x1, y1) == (1894, 794, 2406, 1306)  # 512 px around it: native resolution
    assert crop.work == (512, 512)
    big = np.zeros((3000, 4000), bool)
    big[200:2800, 500:3500] = True
    crop = plan_crop(big, work_size=512)
    assert crop.box == (0, 0, 4000, 3000) and crop.work == (512, 384)  # shrunk to 512
    small = np.zeros((300, 200), bool)
    small[100:120, 50:60] = True
    assert plan_crop(small, work_size=512).box == (0, 0, 200, 300)  # the whole small image
    assert plan_crop(small, work_size=512).work == (200, 304)  # multiples of 8, rounded


def test_the_kernel_is_the_official_one_on_a_512_px_canvas():
    assert [kernel_for(5, size) for size in ((512, 384), (128, 128), (1024, 700),
                                             (4000, 3000))] == [5, 1, 11, 39]
    assert kernel_for(0, (4000, 3000)) == 0


def test_without_a_selection_it_asks_for_the_region_that_moves(engine):
    request = request_for(np.zeros((50, 75, 3), np.uint8), mask=None)
    with pytest.raises(InvalidInput, match="select the region that moves"):
        engine.run(request)


def test_a_handle_off_the_selection_is_refused_before_any_work(engine):
    request = request_for(np.zeros((50, 75, 3), np.uint8), handles=[(5.5, 5.5)])
    with pytest.raises(InvalidInput, match=r"handle 1 at pixel \(5, 5\) is not on the selection"):
        engine.run(request)


def test_cancel_stops_the_fill(engine):
    token = CancelToken()

    def progress(phase, step, total):
        if phase == "denoise":
            token.cancel()

    with pytest.raises(Cancelled):
        engine.run(request_for(np.zeros((50, 75, 3), np.uint8)), progress=progress,
                   cancel=token)


def test_preview_overlay_paints_the_official_grid():
    rgb = np.full((30, 30, 3), 77, np.uint8)
    hole = np.zeros((30, 30), bool)
    hole[5:25, 5:25] = True
    out = grid_overlay(rgb, hole)
    assert (out[~hole] == 77).all()
    assert (out[10, 10] == 0).all() and (out[11, 12] == 255).all()  # lines every 10 px


@pytest.mark.slow
def test_the_demo_model_moves_a_shape_and_fills_behind_it(one_thread):
    """The shipped demo model with its preset: a disc dragged 20 px lands within 1 px of its
    target, and what it leaves behind is background again (measured 0.2 px, 34 dB)."""
    from backend.demo import metrics
    from backend.demo.shapes import coverage, make_cases

    engine = DragEngine.load(str(DEMO_MODEL_DIR), device="cpu")
    case = make_cases(2, seed=0)[1]  # translate-large
    region = coverage(case.before, case.motions[0].shape) > 0
    result = engine.run(DragRequest(image=case.image, handles=case.handles,
                                    targets=case.targets, mask=region.astype(np.uint8) * 255,
                                    method="inpaint4drag"))
    score = metrics.score(case, result.image)
    assert score.handle_error < 1.0
    assert score.psnr_in > 25.0  # the no-op scores 13 dB inside this mask
    warp = bi_warp(region, [(int(x), int(y)) for x, y in case.handles],
                   [(int(x), int(y)) for x, y in case.targets], kernel=1)
    assert result.stats["moved_pixels"] == len(warp.target)
