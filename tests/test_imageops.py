"""Working resolution, point/mask mapping, channels and exact compositing."""

from __future__ import annotations

import numpy as np
import pytest

from backend.engine import imageops
from backend.engine.errors import InvalidInput


@pytest.mark.parametrize(
    ("size", "width", "cap", "expected"),
    [((512, 512), 512, 0, (512, 512)), ((4000, 3000), 512, 0, (512, 384)),
     ((600, 800), 512, 0, (512, 680)), ((75, 50), 64, 0, (64, 40)),
     ((37, 301), 512, 0, (512, 4160)), ((900, 3), 512, 0, (512, 8)),
     ((600, 800), 512, 512, (384, 512)), ((37, 301), 512, 512, (64, 512)),
     ((3, 900), 128, 128, (8, 128)), ((4000, 3000), 512, 1024, (512, 384))],
)
def test_working_size_is_the_official_width_rule_with_an_optional_long_side_cap(
        size, width, cap, expected):
    assert imageops.working_size(*size, width, cap) == expected


def test_working_size_covers_the_official_latent_for_every_aspect_ratio():
    # The official UIs resize to 512 × int(512·h/w); their VAE's latent is ⌊·/8⌋ cells.
    for w in range(40, 1200, 37):
        for h in (w // 3, w // 2, w - 1, w, w + 5, 4 * w // 3, 2 * w):
            official = (512 // 8, int(512 * h / w) // 8)
            ours = imageops.working_size(w, h)
            assert (ours[0] // 8, ours[1] // 8) == official and ours[1] % 8 == 0, (w, h)


def test_points_map_to_the_half_resolution_grid_and_back():
    grid = (128, 192)  # working 384×256 → grid rows 128, cols 192
    pts = imageops.to_grid([(10.0, 20.0), (1200.0, 800.0), (0.0, 0.0)], (1200, 800), (384, 256),
                           grid)
    assert pts == [(3.0, 1.0), (127.0, 191.0), (0.0, 0.0)]  # edge points stay on the grid
    back = imageops.from_grid([(64.0, 96.0)], (1200, 800), (384, 256), grid)
    assert back[0] == pytest.approx((601.5625, 401.5625))  # centre of working pixel (192, 128)


def test_an_anchor_at_a_pixel_centre_lands_on_the_official_grid_cell_and_back():
    torch = pytest.importorskip("torch")
    size = (128, 128)
    anchors = [(i + 0.5, 127 - i + 0.5) for i in range(128)]  # centre of pixel i, every column
    cells = imageops.to_grid(anchors, size, size, (64, 64))
    # The official codes take the clicked pixel index i and round(i / H · sup_res) (torch.round).
    # The last index rounds to cell 64, outside the official 64-cell grid: we clamp it to 63.
    official = [(min(63.0, float(torch.round(torch.tensor((127 - i) / 128 * 64)))),
                 min(63.0, float(torch.round(torch.tensor(i / 128 * 64))))) for i in range(128)]
    assert cells == official
    assert [c for _, c in cells] == [float(min(63, round(i / 2))) for i in range(128)]
    # Back: a cell comes back as the centre of its official pixel index (2·col, 2·row) …
    grid_cells = [(float(r), float(c)) for r in range(64) for c in range(64)]
    back = imageops.from_grid(grid_cells, size, size, (64, 64))
    assert back == [(2 * c + 0.5, 2 * r + 0.5) for r, c in grid_cells]
    # … and maps onto the same cell again, also through a resize to the working size.
    assert imageops.to_grid(back, size, size, (64, 64)) == grid_cells
    big = imageops.from_grid(grid_cells, (300, 300), size, (64, 64))
    assert imageops.to_grid(big, (300, 300), size, (64, 64)) == grid_cells


def test_validation_names_the_problem():
    img = np.zeros((40, 60, 3), np.uint8)
    with pytest.raises(InvalidInput, match="outside the 60×40 image"):
        imageops.validate_request(img, [(61.0, 5.0)], [(1.0, 1.0)], None)
    with pytest.raises(InvalidInput, match="pairs"):
        imageops.validate_request(img, [(1.0, 1.0)], [], None)
    with pytest.raises(InvalidInput, match="same size"):
        imageops.validate_request(img, [(1.0, 1.0)], [(2.0, 2.0)], np.ones((60, 40), np.uint8))
    with pytest.raises(InvalidInput, match="empty"):
        imageops.validate_request(img, [(1.0, 1.0)], [(2.0, 2.0)], np.zeros((40, 60), np.uint8))
    with pytest.raises(InvalidInput, match="uint8"):
        imageops.validate_request(img.astype(np.float64), [(1.0, 1.0)], [(2.0, 2.0)], None)
    with pytest.raises(InvalidInput, match="C = 1"):
        imageops.validate_request(np.zeros((40, 60, 5), np.uint8), [(1.0, 1.0)], [(2.0, 2.0)], None)
    imageops.validate_request(img, [(60.0, 40.0)], [(0.0, 0.0)], None)  # edges are inside


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_channels_split_into_rgb_and_alpha(channels):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 7, channels), dtype=np.uint8)
    rgb, alpha = imageops.split_channels(image)
    assert rgb.shape == (6, 7, 3)
    assert (alpha is not None) == (channels in (2, 4))
    np.testing.assert_array_equal(rgb[..., 0], image[..., 0])
    if alpha is not None:
        np.testing.assert_array_equal(alpha, image[..., -1])


def test_feather_is_zero_outside_and_ramps_inside():
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 5:40] = 255  # touches the right border
    w = imageops.feather_weights(mask, 3)
    assert (w[mask == 0] == 0).all()
    assert w[20, 20] == 1.0 and 0 < w[10, 20] < 1 and w[13, 20] == 1.0
    assert w[20, 39] == 1.0  # no fade along the image border
    soft = (mask // 2).astype(np.uint8)
    assert imageops.feather_weights(soft, 3)[20, 20] == pytest.approx(127 / 255)


def test_composite_keeps_input_pixels_exactly_outside_the_mask():
    rng = np.random.default_rng(1)
    original = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    edited = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    mask = np.zeros((30, 30), np.uint8)
    mask[5:25, 5:25] = 255
    out = imageops.composite(original, edited, imageops.feather_weights(mask, 2))
    np.testing.assert_array_equal(out[mask == 0], original[mask == 0])
    np.testing.assert_array_equal(out[10:20, 10:20], edited[10:20, 10:20])
    assert imageops.composite(original, edited, None) is edited


@pytest.mark.parametrize(("n_in", "n_out"), [(512, 256), (256, 64), (341, 85), (75, 64), (64, 75),
                                             (100, 37), (37, 100), (8, 16), (96, 96), (682, 680)])
def test_mask_resize_samples_exactly_like_torch_interpolate_nearest(n_in, n_out):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(n_in * 1000 + n_out)
    mask = rng.random((n_in, n_in + 3)) > 0.5
    ours = imageops.resize_mask_nearest(mask.astype(np.uint8) * 255, (n_out + 1, n_out))
    ref = F.interpolate(torch.from_numpy(mask).float()[None, None], (n_out, n_out + 1),
                        mode="nearest")[0, 0].numpy() > 0
    np.testing.assert_array_equal(ours, ref)
