"""The layers' pixels (dragdiff_layer.py): formats per GIMP precision, the changed pixels that
are the only ones written into the result layer, preview bytes and the result's name."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plugin_modules import load

lay = load("dragdiff_layer")
ALL = ("u8", "u16", "f32")


@pytest.mark.parametrize(("precision", "supported", "babl", "dtype"), [
    ("u8-non-linear", ALL, "R'G'B'A u8", "u8"),
    ("u8-perceptual", ALL, "R'G'B'A u8", "u8"),
    ("u8-linear", ALL, "R'G'B'A u16", "u16"),
    ("u16-non-linear", ALL, "R'G'B'A u16", "u16"),
    ("u16-linear", ("u8", "f32"), "R'G'B'A u8", "u8"),  # never more than needed
    ("u32-linear", ALL, "R'G'B'A float", "f32"),
    ("half-linear", ALL, "R'G'B'A float", "f32"),
    ("float-linear", ALL, "R'G'B'A float", "f32"),
    ("double-perceptual", ALL, "R'G'B'A float", "f32"),
    ("float-linear", ("u8", "u16"), "R'G'B'A u16", "u16"),
    ("float-linear", ("u8",), "R'G'B'A u8", "u8"),  # a backend from before 16/32-bit support
])
def test_pixel_format_per_precision(precision, supported, babl, dtype):
    fmt = lay.pixel_format(precision, gray=False, alpha=True, supported=supported)
    assert (fmt.babl, fmt.dtype, fmt.channels) == (babl, dtype, 4)
    assert fmt.bytes_per_pixel == 4 * {"u8": 1, "u16": 2, "f32": 4}[dtype]


@pytest.mark.parametrize(("gray", "alpha", "babl", "channels"), [
    (False, False, "R'G'B' u16", 3), (False, True, "R'G'B'A u16", 4),
    (True, False, "Y' u16", 1), (True, True, "Y'A u16", 2),
])
def test_pixel_format_channels(gray, alpha, babl, channels):
    fmt = lay.pixel_format("u16-non-linear", gray, alpha, ALL)
    assert (fmt.babl, fmt.channels) == (babl, channels)


def reference_runs(before: np.ndarray, after: np.ndarray) -> list[tuple[int, int, int]]:
    """Per-pixel reference: runs of differing pixels in each row."""
    differs = (before != after).reshape(before.shape[0], before.shape[1], -1).any(axis=2)
    runs = []
    for y, row in enumerate(differs):
        x = 0
        while x < len(row):
            if row[x]:
                start = x
                while x < len(row) and row[x]:
                    x += 1
                runs.append((y, start, x))
            x += 1
    return runs


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.sampled_from([1, 2, 4, 8, 16]), st.data())
def test_changed_runs_match_a_per_pixel_reference(width, height, bpp, data):
    before = np.frombuffer(data.draw(st.binary(min_size=width * height * bpp,
                                               max_size=width * height * bpp)),
                           np.uint8).reshape(height, width, bpp)
    after = before.copy()
    for _ in range(data.draw(st.integers(0, 12))):
        y, x = data.draw(st.integers(0, height - 1)), data.draw(st.integers(0, width - 1))
        n = data.draw(st.integers(1, width - x))
        after[y, x:x + n, data.draw(st.integers(0, bpp - 1))] ^= data.draw(st.integers(1, 255))
    runs = lay.changed_runs(before.tobytes(), after.tobytes(), width, bpp)
    assert runs == reference_runs(before, after)
    # The same without numpy (GIMP's Python on Windows/macOS may lack it).
    assert lay._runs_pure(before.tobytes(), after.tobytes(), width, bpp) == runs


def test_changed_runs_of_float_pixels_outside_a_mask():
    rng = np.random.default_rng(0)
    before = rng.random((30, 50, 4), dtype=np.float32)
    after = before.copy()
    after[5:20, 10:30] += np.float32(1e-6)  # a tiny change is still a change
    runs = lay.changed_runs(before.tobytes(), after.tobytes(), 50, 16)
    assert runs == [(y, 10, 30) for y in range(5, 20)]
    assert lay._runs_numpy(before.tobytes(), after.tobytes(), 50, 16, band=4) == runs
    assert lay.rectangles(runs) == [(10, 5, 20, 15)]
    assert lay.bounding_box(runs) == (10, 5, 20, 15)
    assert lay.changed_runs(before.tobytes(), before.tobytes(), 50, 16) == []
    assert lay.bounding_box([]) is None


def test_rectangles_keep_rows_with_several_runs_apart():
    runs = [(0, 2, 5), (1, 2, 5), (2, 0, 1), (2, 3, 4), (3, 3, 4), (5, 3, 4)]
    assert lay.rectangles(runs) == [(2, 0, 3, 2), (0, 2, 1, 1), (3, 2, 1, 1), (3, 3, 1, 1),
                                    (3, 5, 1, 1)]


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=30))
def test_rectangles_cover_exactly_the_runs(cells):
    grid = np.zeros((10, 10), bool)
    for y, x in cells:
        grid[y, x] = True
    runs = reference_runs(np.zeros((10, 10), np.uint8), grid.astype(np.uint8))
    covered = np.zeros((10, 10), int)
    for x, y, w, h in lay.rectangles(runs):
        covered[y:y + h, x:x + w] += 1
    assert np.array_equal(covered, grid.astype(int))


def test_changed_runs_rejects_mismatched_buffers():
    with pytest.raises(ValueError):
        lay.changed_runs(bytes(12), bytes(8), 2, 2)
    with pytest.raises(ValueError):
        lay.changed_runs(bytes(10), bytes(10), 3, 1)


def test_preview_rgb_from_gray_rgb_and_rgba():
    assert lay.preview_rgb(bytes([1, 2]), 2, 1, 1) == bytes([1, 1, 1, 2, 2, 2])
    assert lay.preview_rgb(bytes([1, 9, 2, 9]), 2, 1, 2) == bytes([1, 1, 1, 2, 2, 2])
    assert lay.preview_rgb(bytes([1, 2, 3]), 1, 1, 3) == bytes([1, 2, 3])
    assert lay.preview_rgb(bytes([1, 2, 3, 4, 5, 6, 7, 8]), 2, 1, 4) == bytes([1, 2, 3, 5, 6, 7])
    with pytest.raises(ValueError):
        lay.preview_rgb(bytes(5), 2, 1, 3)


def test_fit():
    assert lay.fit(64, 48, 256) == (256, 192)
    assert lay.fit(8, 80, 256) == (26, 256)


def test_result_layer_name():
    assert lay.result_layer_name("Background", "gooddrag", 2) == "Background – gooddrag (2 drags)"
    assert lay.result_layer_name("Cat", "dragdiffusion", 1, demo_model=True) == \
        "Cat – dragdiffusion (1 drag, demo model)"


def test_a_result_layers_name_does_not_grow_with_every_drag():
    first = lay.result_layer_name("Cat – 2", "dragdiffusion", 1)
    second = lay.result_layer_name(first, "gooddrag", 2)
    assert second == "Cat – 2 – gooddrag (2 drags, edit 2)"
    assert lay.result_layer_name(second, "dragdiffusion", 1, demo_model=True) == \
        "Cat – 2 – dragdiffusion (1 drag, demo model, edit 3)"
    # GIMP's " #1" for a name already taken, and the demo note, are read too
    assert lay.result_layer_name("Cat – fast (1 drag, demo model) #1", "fast", 1) == \
        "Cat – fast (1 drag, edit 2)"
    # a name that only looks similar is a source name like any other
    assert lay.result_layer_name("Cat (1 drag)", "fast", 1) == "Cat (1 drag) – fast (1 drag)"
