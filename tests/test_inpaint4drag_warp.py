"""The Inpaint4Drag warp against the official code, value for value.

Every expected value below was computed by OpenCV 4.8.0 (``opencv-python-headless==4.8.0.76``,
the official code's pin) and by the official ``bi_warp`` (Visual-AI/Inpaint4Drag @126ac0c,
``utils/drag.py``, on the CPU) from the inputs built in ``tests/warp_cases.py``, in a separate
environment; neither is a dependency of this project. Masks and point lists are compared
through ``warp_cases.digest`` (the first 16 hex digits of a sha256) with their pixel counts;
contours and a few points are written out.
"""

from __future__ import annotations

import numpy as np
import pytest
import warp_cases as wc

from backend.engine import raster
from backend.engine.errors import InvalidInput
from backend.engine.warp import bi_warp, odd_kernel, pixel_index

# cv2.findContours(mask, RETR_EXTERNAL, CHAIN_APPROX_SIMPLE), [x, y] points
CONTOURS = {'checker': [[[0, 0], [0, 2], [2, 2], [3, 3], [3, 5], [2, 6], [0, 6], [0, 8], [2, 8], [3, 9],
              [3, 11], [2, 12], [0, 12], [0, 14], [2, 14], [3, 15], [5, 15], [6, 14], [8, 14],
              [9, 15], [11, 15], [12, 14], [14, 14], [15, 15], [17, 15], [15, 15], [14, 14],
              [14, 12], [15, 11], [17, 11], [17, 9], [15, 9], [14, 8], [14, 6], [15, 5], [17, 5],
              [17, 3], [15, 3], [14, 2], [14, 0], [12, 0], [12, 2], [11, 3], [9, 3], [8, 2],
              [8, 0], [6, 0], [6, 2], [5, 3], [3, 3], [2, 2], [2, 0]]],
 'disc': [[[10, 5], [9, 6], [8, 6], [7, 7], [7, 8], [6, 9], [6, 15], [8, 17], [9, 17], [10, 18],
           [15, 18], [16, 17], [17, 17], [17, 16], [19, 14], [19, 9], [15, 5]]],
 'edges': [[[9, 10], [9, 15], [15, 15], [15, 10]], [[0, 0], [0, 15], [4, 15], [4, 0]]],
 'ring-with-island': [[[9, 4], [7, 6], [6, 6], [6, 7], [4, 9], [4, 10], [3, 11], [3, 17], [4, 18],
                       [4, 19], [6, 21], [6, 22], [7, 22], [9, 24], [18, 24], [20, 22], [21, 22],
                       [21, 21], [23, 19], [23, 18], [24, 17], [24, 11], [23, 10], [23, 9],
                       [21, 7], [21, 6], [20, 6], [18, 4]]],
 'star': [[[24, 5], [23, 6], [22, 6], [22, 7], [21, 8], [21, 9], [20, 10], [20, 12], [19, 13],
           [19, 16], [18, 17], [13, 12], [12, 12], [11, 11], [7, 11], [7, 13], [8, 14], [8, 15],
           [9, 16], [10, 16], [12, 18], [13, 18], [14, 19], [16, 19], [17, 20], [16, 21],
           [15, 21], [14, 22], [13, 22], [12, 23], [11, 23], [7, 27], [7, 30], [10, 30], [11, 29],
           [12, 29], [14, 27], [15, 27], [16, 26], [16, 25], [18, 23], [19, 24], [19, 27],
           [20, 28], [20, 31], [21, 32], [21, 33], [23, 35], [25, 35], [25, 28], [24, 27],
           [24, 26], [23, 25], [23, 24], [22, 23], [23, 22], [26, 22], [27, 23], [31, 23],
           [32, 22], [34, 22], [35, 21], [35, 20], [33, 18], [24, 18], [23, 19], [22, 18],
           [22, 17], [24, 15], [24, 13], [25, 12], [25, 6]]],
 'thin-diagonal': [[[2, 0], [13, 11], [14, 11], [3, 0]]],
 'two-blobs-and-a-pixel': [[[3, 16]], [[14, 3], [14, 8], [21, 8], [21, 3]],
                           [[6, 2], [5, 3], [4, 3], [3, 4], [3, 5], [2, 6], [3, 7], [3, 8],
                            [4, 9], [5, 9], [6, 10], [7, 9], [8, 9], [9, 8], [9, 7], [10, 6],
                            [9, 5], [9, 4], [8, 3], [7, 3]]]}
# cv2.dilate(mask, np.ones((5, 5))): (digest, pixels)
DILATED = {'checker': ('9eff83f5cb547706', 356),
 'disc': ('b79e7f948ad5de9d', 290),
 'edges': ('5ca85c2f666d6a37', 184),
 'ring-with-island': ('794899078e03f91f', 566),
 'star': ('c688d052af832462', 696),
 'thin-diagonal': ('d57f591c868fb9ab', 107),
 'two-blobs-and-a-pixel': ('5a09cc0647e63a08', 277)}
# cv2.drawContours(canvas, [polygon], -1, 1, cv2.FILLED) on POLYGON_CANVAS
FILLED = {'concave': ('5f621f6738aa8cb9', 191),
 'off-canvas': ('08484844b95beec3', 459),
 'point': ('009bc8eee6de7f6c', 1),
 'segment': ('094a4fcf06c8c270', 4),
 'self-crossing': ('1d76f4a07c876b41', 146),
 'triangle': ('4cf6fa4f356d5b5f', 134)}
# cv2.drawContours(canvas, [polygon], -1, 1, thickness)
THICK = {('concave', 1): ('23449c950b80ea9c', 70),
 ('concave', 2): ('5863bef9689c9d67', 237),
 ('concave', 3): ('fe76968f3c1f24d7', 323),
 ('concave', 5): ('b62c08ed4ad09c49', 415),
 ('off-canvas', 1): ('a6c295e73f92a5a8', 25),
 ('off-canvas', 2): ('3d58069ca29d9fc6', 100),
 ('off-canvas', 3): ('e0a44baa0c3a23b3', 156),
 ('off-canvas', 5): ('12406aa9f93f35ef', 221),
 ('point', 1): ('009bc8eee6de7f6c', 1),
 ('point', 2): ('0db16176ac893f0c', 5),
 ('point', 3): ('f008d14b5efb99ca', 13),
 ('point', 5): ('a7f874052cdee3e9', 29),
 ('segment', 1): ('bfa2cb6babd7ca52', 3),
 ('segment', 2): ('3b9492355f64d833', 10),
 ('segment', 3): ('c77a5815fd423e18', 26),
 ('segment', 5): ('f80e354f7fdb0c1d', 46),
 ('self-crossing', 1): ('eade90f762329a5a', 62),
 ('self-crossing', 2): ('b6ffa040ef7deaa9', 204),
 ('self-crossing', 3): ('457bc9eeef1c31cf', 294),
 ('self-crossing', 5): ('020383607e0b533d', 371),
 ('triangle', 1): ('a5bb5d9c3021e13e', 42),
 ('triangle', 2): ('04e9ffd3a7310696', 139),
 ('triangle', 3): ('c736fb1ebb949b97', 204),
 ('triangle', 5): ('97d3031451ef9640', 295)}

# the official bi_warp(mask, [h1, t1, h2, t2, …], kernel): its source and target points,
# their count, the inpainting mask and its pixels, the first three pairs
WARPS = {'one-pair-translation': {'n': 249,
                          'source': '5dc6a5bba83c1a21',
                          'target': 'f9c251bb8c8e91a5',
                          'inpaint': '6882ab5f60eb4356',
                          'inpaint_px': 642,
                          'first': [[[16, 14], [17, 14], [18, 14]],
                                    [[29, 19], [30, 19], [31, 19]]]},
 'two-pairs-stretch': {'n': 564,
                       'source': '26a865e556215ccb',
                       'target': '19b9f30545c15553',
                       'inpaint': 'b683a1d396e191ea',
                       'inpaint_px': 680,
                       'first': [[[10, 12], [12, 12], [13, 12]], [[8, 9], [9, 9], [10, 9]]]},
 'two-regions': {'n': 379,
                 'source': '9949f4d3d38075b2',
                 'target': '63240cc46ee62bef',
                 'inpaint': '89fffeda65c39022',
                 'inpaint_px': 1033,
                 'first': [[[48, 19], [49, 19], [47, 20]], [[50, 23], [51, 23], [49, 24]]]},
 'ring-pull': {'n': 697,
               'source': '2c156886158df4b1',
               'target': '0fe2be107e232a47',
               'inpaint': 'dba67eb9e0bd66e8',
               'inpaint_px': 709,
               'first': [[[30, 12], [31, 12], [32, 12]], [[30, 5], [31, 5], [32, 5]]]},
 'partly-off-canvas': {'n': 73,
                       'source': 'a92187dcd371d099',
                       'target': 'ea2ee4857d225aeb',
                       'inpaint': '0fee171ee98318df',
                       'inpaint_px': 267,
                       'first': [[[7, 33], [8, 33], [9, 33]], [[0, 39], [1, 39], [2, 39]]]},
 'checker-many-holes': {'n': 2494,
                        'source': '99c91e28f0858e39',
                        'target': '766c476173ddd471',
                        'inpaint': '14fed6581b5452f1',
                        'inpaint_px': 1441,
                        'first': [[[0, 0], [1, 0], [2, 0]], [[4, 2], [5, 2], [6, 2]]]},
 'two-regions-kernel-1': {'n': 379,
                          'source': '9949f4d3d38075b2',
                          'target': '63240cc46ee62bef',
                          'inpaint': 'd4e54a7eba8e92df',
                          'inpaint_px': 346,
                          'first': [[[48, 19], [49, 19], [47, 20]],
                                    [[50, 23], [51, 23], [49, 24]]]},
 'ring-pull-kernel-0': {'n': 697,
                        'source': '2c156886158df4b1',
                        'target': '0fe2be107e232a47',
                        'inpaint': 'bebb7fb7140d36d9',
                        'inpaint_px': 95,
                        'first': [[[30, 12], [31, 12], [32, 12]], [[30, 5], [31, 5], [32, 5]]]},
 'big-512': {'n': 23236,
             'source': '725cd31a079587be',
             'target': 'f678afd599a8708d',
             'inpaint': '32be2e46e3155c3d',
             'inpaint_px': 21083,
             'first': [[[380, 326], [381, 326], [382, 326]],
                       [[340, 366], [341, 366], [342, 366]]]}}

# the filled two-point polygon, [row, col]
SEGMENT_FILL = [[10, 3], [11, 3], [11, 4], [12, 4]]


# --------------------------------------------------------------------------- raster


@pytest.mark.parametrize("name", sorted(CONTOURS))
def test_external_contours_are_opencv_s(name):
    found = raster.external_contours(wc.RASTER_MASKS[name]())
    assert [contour.tolist() for contour, _filled in found] == CONTOURS[name]


@pytest.mark.parametrize("name", sorted(CONTOURS))
def test_a_filled_contour_is_the_component_with_its_holes(name):
    mask = wc.RASTER_MASKS[name]()
    found = raster.external_contours(mask)
    union = np.zeros_like(mask)
    for _contour, filled in found:
        assert not (union & filled).any()  # regions never overlap
        union |= filled
    assert (union >= mask).all()  # every pixel of the mask is in a region


@pytest.mark.parametrize("name", sorted(FILLED))
def test_polygon_fill_is_opencv_s(name):
    filled = raster.fill_polygon(wc.POLYGON_CANVAS, np.array(wc.POLYGONS[name]))
    assert (wc.digest(filled), int(filled.sum())) == FILLED[name]


def test_a_two_point_polygon_fills_opencv_s_pixels():
    filled = raster.fill_polygon(wc.POLYGON_CANVAS, np.array(wc.POLYGONS["segment"]))
    assert np.argwhere(filled).tolist() == SEGMENT_FILL


@pytest.mark.parametrize("name,thickness", sorted(THICK))
def test_thick_outline_is_opencv_s(name, thickness):
    drawn = raster.draw_closed_polyline(wc.POLYGON_CANVAS, np.array(wc.POLYGONS[name]),
                                        thickness)
    assert (wc.digest(drawn), int(drawn.sum())) == THICK[(name, thickness)]


@pytest.mark.parametrize("name", sorted(DILATED))
def test_square_dilation_is_opencv_s(name):
    grown = raster.dilate_square(wc.RASTER_MASKS[name](), 5)
    assert (wc.digest(grown), int(grown.sum())) == DILATED[name]


# --------------------------------------------------------------------------- the warp


def _cases():
    return {**wc.warp_cases(), "big-512": wc.big_case()}


@pytest.mark.parametrize("name", list(WARPS))
def test_warp_equals_the_official_bi_warp(name):
    mask, handles, targets, kernel = _cases()[name]
    warp = bi_warp(mask, handles, targets, kernel=kernel)
    expected = WARPS[name]
    assert len(warp.source) == expected["n"]
    assert [warp.source[:3].tolist(), warp.target[:3].tolist()] == expected["first"]
    assert wc.digest(warp.source) == expected["source"]
    assert wc.digest(warp.target) == expected["target"]
    assert int(warp.inpaint.sum()) == expected["inpaint_px"]
    assert wc.digest(warp.inpaint) == expected["inpaint"]
    assert warp.warnings == []


def test_every_target_pixel_is_written_once_and_the_moved_region_has_no_holes():
    mask, handles, targets, _ = wc.warp_cases()["two-pairs-stretch"]
    warp = bi_warp(mask, handles, targets)
    flat = warp.target[:, 1] * mask.shape[1] + warp.target[:, 0]
    assert len(np.unique(flat)) == len(flat)
    written = np.zeros_like(mask)
    written[warp.target[:, 1], warp.target[:, 0]] = True
    assert np.array_equal(written, warp.moved)  # the whole filled target region, no gaps


def test_apply_copies_pixels_bit_for_bit_in_any_dtype():
    mask, handles, targets, _ = wc.warp_cases()["one-pair-translation"]
    warp = bi_warp(mask, handles, targets)
    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 65536, (*mask.shape, 4), dtype=np.uint16),
                  rng.random((*mask.shape, 2), dtype=np.float32)):
        out = warp.apply(image)
        assert out.dtype == image.dtype
        src, dst = warp.source, warp.target
        assert np.array_equal(out[dst[:, 1], dst[:, 0]], image[src[:, 1], src[:, 0]])
        untouched = ~warp.moved
        assert np.array_equal(out[untouched], image[untouched])


def test_a_translation_moves_the_region_by_its_vector():
    mask = wc.disc((40, 40), 15, 15, 6)
    warp = bi_warp(mask, [(15, 15)], [(22, 19)])
    assert (warp.target - warp.source == [7, 4]).all()
    shifted = np.zeros_like(mask)
    shifted[4:, 7:] = mask[:-4, :-7]
    assert np.array_equal(warp.moved, shifted)
    assert warp.inpaint[15, 10] and not warp.inpaint[19, 22]  # revealed vs covered


def test_a_handle_on_no_region_is_an_error_naming_it():
    mask = wc.disc((30, 30), 10, 10, 5)
    with pytest.raises(InvalidInput, match=r"handle 2 at pixel \(25, 25\)"):
        bi_warp(mask, [(10, 10), (25, 25)], [(12, 12), (20, 20)])


def test_a_region_without_a_handle_stays_and_says_so():
    s = (30, 50)
    mask = wc.disc(s, 10, 10, 5) | wc.disc(s, 38, 15, 6)
    warp = bi_warp(mask, [(10, 10)], [(14, 20)])
    assert not warp.inpaint[:, 30:].any()  # the second disc neither moves nor is inpainted
    assert len(warp.warnings) == 1 and "no handle" in warp.warnings[0]


def test_a_region_dragged_off_the_canvas_is_inpainted_away():
    """The official code silently leaves such a region in place (docs/algorithms.md)."""
    mask = wc.disc((30, 30), 5, 15, 4)
    warp = bi_warp(mask, [(5, 15)], [(0, 15)], kernel=0)
    assert len(warp.source) > 0  # partly still on the canvas
    far = bi_warp(wc.disc((30, 60), 5, 15, 4), [(5, 15)], [(0, 15)])
    assert far.inpaint.sum() >= mask.sum()
    gone = bi_warp(wc.box((20, 20), 0, 0, 3, 3), [(2, 2)], [(0, 0)], kernel=0)
    assert len(gone.source) > 0


def test_points_and_kernel_follow_the_official_conventions():
    assert pixel_index((10.5, 3.5), 20, 10) == (10, 3)  # a pixel centre is that pixel
    assert pixel_index((20.0, 10.0), 20, 10) == (19, 9)  # the far edge is the last pixel
    assert [odd_kernel(k) for k in (0, 1, 4, 5, -3)] == [0, 1, 5, 5, 0]
