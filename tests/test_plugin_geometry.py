"""Fast tests of the plug-in's pure helpers (no GIMP, no numpy needed by the code under test)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "gimp_plugin" / "drag-diffusion"
_spec = importlib.util.spec_from_file_location("dragdiff_geometry",
                                               PLUGIN_DIR / "dragdiff_geometry.py")
geo = importlib.util.module_from_spec(_spec)
sys.modules["dragdiff_geometry"] = geo
_spec.loader.exec_module(geo)
Rect, InputError = geo.Rect, geo.InputError


def triplets(*anchors: tuple[float, float]) -> list[float]:
    """Control points as GIMP lists them: in-handle, anchor, out-handle per anchor."""
    out: list[float] = []
    for x, y in anchors:
        out += [x - 1, y - 1, x, y, x + 1, y + 1]
    return out


# --- paths -----------------------------------------------------------------------------------

def test_stroke_anchors_takes_the_middle_point_of_each_triplet():
    assert geo.stroke_anchors(triplets((5, 6), (40.5, 30))) == [(5.0, 6.0), (40.5, 30.0)]


def test_stroke_anchors_rejects_partial_triplets():
    with pytest.raises(InputError, match="6 per anchor"):
        geo.stroke_anchors([1, 2, 3, 4])


def test_one_stroke_per_drag():
    handles, targets = geo.pair_anchors([[(1, 1), (2, 2)], [(3, 3), (4, 4)]])
    assert handles == [(1, 1), (3, 3)]
    assert targets == [(2, 2), (4, 4)]


def test_handle_target_handle_target_in_one_stroke():
    handles, targets = geo.pair_anchors([[(1, 1), (2, 2), (3, 3), (4, 4)]])
    assert handles == [(1, 1), (3, 3)]
    assert targets == [(2, 2), (4, 4)]


def test_odd_anchor_count_names_the_stroke_and_says_what_to_draw():
    with pytest.raises(InputError) as info:
        geo.pair_anchors([[(1, 1), (2, 2)], [(3, 3), (4, 4), (5, 5)]])
    message = str(info.value)
    assert "Stroke 2" in message and "3 anchors" in message
    assert "handle" in message and "target" in message


def test_empty_path_is_an_error():
    with pytest.raises(InputError, match="no anchors"):
        geo.pair_anchors([])


@given(st.lists(st.lists(st.tuples(st.integers(-50, 50), st.integers(-50, 50)),
                         min_size=1, max_size=4).map(lambda a: a + a[:1] if len(a) % 2 else a),
                min_size=1, max_size=4))
def test_pairs_keep_every_anchor_in_order(strokes):
    handles, targets = geo.pair_anchors(strokes)
    interleaved = [p for pair in zip(handles, targets, strict=True) for p in pair]
    assert interleaved == [p for stroke in strokes for p in stroke]


def test_pick_path_prefers_the_selected_path():
    assert geo.pick_path(["a", "b"], ["b"]) == "b"
    assert geo.pick_path(["a"], []) == "a"


@pytest.mark.parametrize(("paths", "selected", "match"), [
    ([], [], "no path"),
    (["a", "b"], [], "2 paths and none is selected"),
    (["a", "b"], ["a", "b"], "2 paths are selected"),
])
def test_pick_path_errors(paths, selected, match):
    with pytest.raises(InputError, match=match):
        geo.pick_path(paths, selected)


# --- coordinates -----------------------------------------------------------------------------

def test_image_to_layer_and_back():
    points = [(10.0, 20.0), (0.5, -3.0)]
    layer = geo.to_layer(points, (7, -4))
    assert layer == [(3.0, 24.0), (-6.5, 1.0)]
    assert geo.to_image(layer, (7, -4)) == points


@given(st.tuples(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4)),
       st.tuples(st.integers(-5000, 5000), st.integers(-5000, 5000)))
def test_to_image_inverts_to_layer(point, offsets):
    (x, y), = geo.to_image(geo.to_layer([point], offsets), offsets)
    assert x == pytest.approx(point[0]) and y == pytest.approx(point[1])


def test_points_on_the_layer_edge_are_inside():
    geo.check_inside([(0, 0)], [(64, 48)], 64, 48)


def test_points_off_the_layer_are_listed():
    with pytest.raises(InputError) as info:
        geo.check_inside([(1, 1), (-1, 5)], [(70, 2), (3, 3)], 64, 48)
    message = str(info.value)
    assert "drag 1 target at (70, 2)" in message
    assert "drag 2 handle at (-1, 5)" in message
    assert "drag 1 handle" not in message


# --- selection → mask --------------------------------------------------------------------------

def test_rect_intersection():
    assert Rect(0, 0, 10, 10).intersect(Rect(5, 6, 10, 10)) == Rect(5, 6, 5, 4)
    assert Rect(0, 0, 10, 10).intersect(Rect(20, 0, 5, 5)).empty


def test_no_selection_means_no_mask():
    assert geo.selection_region(None, Rect(0, 0, 64, 48)) is None


def test_selection_is_clipped_to_a_layer_with_offsets():
    # Layer 40×30 at (20, 10); selection 30×30 at (0, 0): only (20..30, 10..30) is on the layer.
    region = geo.selection_region(Rect(0, 0, 30, 30), Rect(20, 10, 40, 30))
    assert region == Rect(20, 10, 10, 20)
    assert region.translate(-20, -10) == Rect(0, 0, 10, 20)


def test_selection_on_a_layer_larger_than_the_canvas():
    # Layer 100×100 at (-20, -20) on a 64×48 canvas: the whole canvas selected.
    region = geo.selection_region(Rect(0, 0, 64, 48), Rect(-20, -20, 100, 100))
    assert region == Rect(0, 0, 64, 48)
    assert region.translate(20, 20) == Rect(20, 20, 64, 48)


def test_selection_missing_the_layer_is_a_clear_error():
    with pytest.raises(InputError, match="does not touch the layer"):
        geo.selection_region(Rect(0, 0, 10, 10), Rect(50, 50, 10, 10))


def test_place_mask_puts_the_region_rows_in_place():
    region = Rect(1, 2, 2, 2)
    mask = geo.place_mask(bytes([1, 2, 3, 4]), region, 4, 5)
    rows = [list(mask[i * 4:(i + 1) * 4]) for i in range(5)]
    assert rows == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 4, 0], [0, 0, 0, 0]]


def test_place_mask_rejects_bad_sizes():
    with pytest.raises(ValueError):
        geo.place_mask(bytes(3), Rect(0, 0, 2, 2), 4, 4)
    with pytest.raises(ValueError):
        geo.place_mask(bytes(4), Rect(3, 3, 2, 2), 4, 4)


@given(st.integers(1, 12), st.integers(1, 12), st.data())
def test_place_mask_matches_a_per_pixel_reference(width, height, data):
    x = data.draw(st.integers(0, width - 1))
    y = data.draw(st.integers(0, height - 1))
    w = data.draw(st.integers(1, width - x))
    h = data.draw(st.integers(1, height - y))
    pixels = bytes(data.draw(st.lists(st.integers(0, 255), min_size=w * h, max_size=w * h)))
    mask = geo.place_mask(pixels, Rect(x, y, w, h), width, height)
    for row in range(height):
        for col in range(width):
            inside = x <= col < x + w and y <= row < y + h
            expected = pixels[(row - y) * w + (col - x)] if inside else 0
            assert mask[row * width + col] == expected


def test_mask_or_none():
    assert geo.mask_or_none(bytes([255] * 6)) is None
    assert geo.mask_or_none(bytes([0, 255, 128])) == bytes([0, 255, 128])
    with pytest.raises(InputError, match="empty on this layer"):
        geo.mask_or_none(bytes(5))
