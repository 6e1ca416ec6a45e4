"""Training data and real-photo drag cases of the toy model (photos, data, photo_cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backend.demo import data, photo_cases, photos


def test_photos_come_from_the_installed_wheel_and_the_split_is_disjoint():
    assert not set(photos.TRAIN_PHOTOS) & set(photos.HELD_OUT_PHOTOS)
    for name in ("astronaut", "camera", "logo", "chelsea"):
        img = photos.load(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    left, right, disp = photos.stereo_pair()
    assert left.shape == right.shape and disp.shape == left.shape[:2]


def test_training_batches_are_deterministic_and_in_range():
    a, caps = data.training_batch(7, 6, 64)
    b, _ = data.training_batch(7, 6, 64)
    c, _ = data.training_batch(8, 6, 64)
    assert a.shape == (6, 3, 64, 64) and len(caps) == 6
    assert (a == b).all() and not (a == c).all()
    assert a.min() >= -1 and a.max() <= 1


def test_held_out_hues_are_never_a_training_colour():
    rng = np.random.default_rng(0)
    assert not any(data.is_held_out_color(data.random_color(rng)) for _ in range(3000))
    assert all(data.is_held_out_color(data.random_color(rng, held_out=True))
               for _ in range(300))


def test_locate_finds_a_known_shift():
    img = photos.fit_long_side(photos.load("astronaut"), 128)
    moved = np.roll(img, (3, -5), axis=(0, 1))  # content moves 5 px left, 3 px down
    found = photo_cases.locate(img, moved, (64.5, 64.5), (59.5, 67.5))
    assert math.dist(found, (59.5, 67.5)) < 0.3
    assert math.dist(photo_cases.locate(img, img, (64.5, 64.5), (59.5, 67.5)), (64.5, 64.5)) < 0.3


@pytest.mark.parametrize("kind", ["stereo", "paste"])
def test_photo_cases_score_the_answer_and_the_no_op(kind):
    cases = photo_cases.stereo_cases(4) if kind == "stereo" else photo_cases.paste_cases(4)
    assert len(cases) == 4
    for case in cases:
        drag = math.dist(case.handles[0], case.targets[0])
        assert drag > 2 and case.valid.any() and not (case.valid & (case.mask == 0)).any()
        right = photo_cases.score(case, case.correct)
        assert right["handle_error"] < 1.0 and right["psnr_in"] == math.inf, case.name
        noop = photo_cases.score(case, photo_cases.noop(case))
        assert noop["handle_error"] == pytest.approx(drag, abs=1.0), case.name
        assert noop["psnr_out"] == math.inf and noop["psnr_in"] < 25
        naive = photo_cases.score(case, photo_cases.shift_paste(case))
        assert naive["handle_error"] < 1.5 and naive["psnr_out"] == math.inf, case.name


def test_stereo_targets_follow_the_disparity():
    case = photo_cases.stereo_cases(1)[0]
    (hx, hy), (tx, ty) = case.handles[0], case.targets[0]
    assert ty == hy and tx < hx  # the right view sees a point further left
