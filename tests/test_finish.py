"""Back to full resolution: bounding-box finish, a blend scaled to the image, any pixel dtype."""

from __future__ import annotations

import numpy as np
import pytest

from backend.engine import imageops
from backend.engine.errors import InvalidInput

DTYPES = [np.uint8, np.uint16, np.float32]


def ellipse_mask(height: int, width: int, area: float = 0.36) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    s = (area / (np.pi / 4)) ** 0.5
    inside = ((xx + 0.5 - width / 2) / (width * s / 2)) ** 2 \
        + ((yy + 0.5 - height / 2) / (height * s / 2)) ** 2 < 1
    return inside.astype(np.uint8) * 255


def random_image(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.float32:  # float images may leave [0, 1]
        return rng.uniform(-0.2, 1.5, shape).astype(np.float32)
    return rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def whole_image_reference(image, edited, mask, feather) -> np.ndarray:
    """The same blend computed over the whole image (resize everything, feather everything)."""
    height, width = image.shape[:2]
    scale = imageops.PIXEL_SCALE[image.dtype]
    full = imageops.resize_float(edited, (width, height)) * scale
    if image.dtype == np.uint8:  # the 8-bit path resizes the 8-bit edit
        from PIL import Image

        small = imageops.quantize(edited * 255.0, np.dtype(np.uint8))
        full = np.asarray(Image.fromarray(small, "RGB").resize((width, height), Image.BILINEAR))
    weights = imageops.feather_weights(mask, feather)
    out = image.copy()
    out[..., :3] = imageops.composite(image[..., :3], full, weights)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_bounding_box_finish_equals_a_whole_image_finish(dtype):
    image = random_image((300, 400, 4), dtype)
    mask = ellipse_mask(300, 400)
    edited = np.random.default_rng(1).random((48, 64, 3), dtype=np.float32)
    out = imageops.paste_edit(image, edited, mask, 9)
    ref = whole_image_reference(image, edited, mask, 9)
    assert out.dtype == image.dtype and out.shape == image.shape
    outside = mask == 0
    assert out[outside].tobytes() == image[outside].tobytes()  # bit for bit, floats too
    assert out[..., 3].tobytes() == image[..., 3].tobytes()  # alpha untouched
    # The box's resize samples where the whole image's does; its coefficients differ in the
    # last float bits, which can flip one rounding (before and after the blend): 2 levels.
    tolerance = 1e-5 if dtype == np.float32 else 2
    assert np.abs(out.astype(np.float64) - ref.astype(np.float64)).max() <= tolerance
    assert not np.array_equal(out[~outside], image[~outside])


@pytest.mark.parametrize("scale", [1.0, 5.0, 7.8])
def test_the_blend_at_the_selection_edge_is_smooth_and_scales_with_the_image(scale):
    """Black outside, the edit white inside: a row across the edge ramps without a seam."""
    feather = imageops.feather_width(3, scale)
    assert feather == round(3 * scale)
    image = np.zeros((200, 400, 3), np.uint8)
    mask = np.zeros((200, 400), np.uint8)
    mask[:, 100:] = 255  # a vertical edge at column 100
    edited = np.ones((25, 50, 3), np.float32)
    row = imageops.paste_edit(image, edited, mask, feather)[100, :, 0].astype(int)
    assert (row[:100] == 0).all()  # outside the selection: the input, exactly
    assert (row[100 + feather :] == 255).all()  # past the blend: the edit
    ramp = row[99 : 101 + feather]
    assert (np.diff(ramp) >= 0).all()  # monotone
    # The steepest step of a smoothstep over ``feather`` px is 1.5 / feather of the range:
    # no seam, whatever the scale (a 3-px blend pasted into a 5× larger image steps by ~85).
    assert np.diff(ramp).max() <= 255 * 1.5 / feather + 8
    assert row[100] < 255 * 0.1  # starts near the input at the edge


def test_a_small_selection_still_gets_the_edit():
    image = np.zeros((200, 200, 3), np.uint8)
    mask = np.zeros((200, 200), np.uint8)
    mask[100:112, 100:112] = 255  # 12 px: a 23-px blend would never reach the edit
    out = imageops.paste_edit(image, np.ones((25, 25, 3), np.float32), mask, 23)
    assert out[106, 106, 0] == 255 and out[100, 100, 0] < 255
    assert (out[mask == 0] == 0).all()


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gray_images_stay_gray_and_keep_their_alpha(channels, dtype):
    image = random_image((40, 50, channels), dtype)
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 10:40] = 255
    edited = np.zeros((8, 10, 3), np.float32)
    edited[..., 1] = 1.0  # pure green → luma 0.587
    out = imageops.paste_edit(image, edited, mask, 2)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert out[mask == 0].tobytes() == image[mask == 0].tobytes()
    if channels == 2:
        assert out[..., 1].tobytes() == image[..., 1].tobytes()
    expected = 0.587 * imageops.PIXEL_SCALE[np.dtype(dtype)]
    assert out[20, 25, 0] == pytest.approx(expected, rel=0.01)


def test_without_a_mask_the_whole_colour_image_is_the_edit():
    image = random_image((30, 40, 4), np.uint16)
    out = imageops.paste_edit(image, np.full((8, 8, 3), 0.5, np.float32), None, 3)
    assert (out[..., :3] == 32768).all()
    assert out[..., 3].tobytes() == image[..., 3].tobytes()


def test_the_model_sees_16_bit_and_float_precision():
    base = np.full((16, 16, 3), 30000, np.uint16)
    finer = base + 1  # differs below 8-bit precision
    a, b = imageops.model_rgb(base, (8, 8)), imageops.model_rgb(finer, (8, 8))
    assert a.dtype == np.float32 and a.shape == (8, 8, 3)
    assert (b > a).all() and a[0, 0, 0] == pytest.approx(30000 / 65535 * 2 - 1, abs=1e-6)
    hdr = np.full((16, 16, 3), 3.0, np.float32)
    assert (imageops.model_rgb(hdr, (8, 8)) == 1.0).all()  # clipped to the model's range
    u8 = np.full((16, 16, 3), 255, np.uint8)
    assert (imageops.model_rgb(u8, (8, 8)) == 1.0).all()


def test_validation_accepts_the_three_dtypes_and_refuses_others():
    args = ([(1.0, 1.0)], [(2.0, 2.0)], None)
    for dtype in DTYPES:
        imageops.validate_request(np.zeros((20, 20, 3), dtype), *args)
    with pytest.raises(InvalidInput, match="uint8, uint16 or float32"):
        imageops.validate_request(np.zeros((20, 20, 3), np.float64), *args)
    bad = np.zeros((20, 20, 3), np.float32)
    bad[3, 4, 1] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        imageops.validate_request(bad, *args)


def test_feather_weights_are_exact_at_both_ends():
    mask = np.zeros((80, 80), np.uint8)
    mask[10:70, 10:80] = 255
    w = imageops.feather_weights(mask, 6)
    assert (w[mask == 0] == 0).all()
    assert (w[16:64, 16:80] == 1).all()  # 6 px inside, and no fade along the image border
    assert 0 < w[10, 40] < 0.1 and 0 < w[13, 40] < 1
    soft = mask // 2
    assert w.dtype == np.float32
    assert imageops.feather_weights(soft, 6)[40, 40] == pytest.approx(127 / 255)


def test_the_finish_benchmark_prints_both_timings():
    from backend.tools.bench import bench_finish

    row = bench_finish(400, 300, "uint16", repeat=1)
    assert row["finish"] == "400x300" and row["working"] == [512, 384]
    assert row["mask_area"] == pytest.approx(0.36, abs=0.01) and row["box_area"] < 0.5
    assert row["box_s"] > 0 and row["whole_image_s"] > 0
