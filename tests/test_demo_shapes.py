"""The procedural scenes and ground-truth drag cases (backend/demo/shapes.py)."""

from __future__ import annotations

import math

import numpy as np

from backend.demo import shapes


def test_random_scenes_are_deterministic():
    a = [shapes.render(shapes.random_scene(np.random.default_rng(7))) for _ in range(2)]
    b = shapes.render(shapes.random_scene(np.random.default_rng(8)))
    assert a[0].shape == (128, 128, 3) and a[0].dtype == np.uint8
    assert np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], b)


def test_cases_are_deterministic_and_cover_every_kind():
    first, again = shapes.make_cases(12, seed=3), shapes.make_cases(12, seed=3)
    for a, b in zip(first, again, strict=True):
        assert a.name == b.name and a.handles == b.handles and a.targets == b.targets
        for field in ("image", "correct", "mask"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(first[0].image, shapes.make_cases(1, seed=4)[0].image)
    kinds = {c.name.split("-", 1)[1] for c in first}
    assert kinds == set(shapes.CASE_KINDS)


def test_correct_result_changes_only_inside_the_mask():
    for case in shapes.make_cases(12, seed=0):
        inside = case.mask > 0
        assert np.array_equal(case.image[~inside], case.correct[~inside]), case.name
        assert not np.array_equal(case.image, case.correct), case.name
        assert case.image.shape == case.correct.shape == (128, 128, 3)
        assert case.mask.shape == (128, 128) and case.mask.dtype == np.uint8


def test_case_geometry():
    cases = {c.name.split("-", 1)[1]: c for c in shapes.make_cases(6, seed=1)}
    two = cases["two-shapes"]
    assert len(two.handles) == 2 and len({m.shape for m in two.motions}) == 2
    stretch = cases["stretch-vertex"]
    motion = stretch.motions[0]
    assert motion.vertex is not None
    assert stretch.before.shapes[0].vertices[motion.vertex] == stretch.handles[0]
    assert stretch.after.shapes[0].vertices[motion.vertex] == stretch.targets[0]
    border = cases["near-border"]
    hx, hy = border.handles[0]
    assert min(hx, hy, 128 - hx, 128 - hy) < 8
    small, large = cases["translate-small"], cases["translate-large"]
    assert math.dist(small.handles[0], small.targets[0]) < 12
    assert math.dist(large.handles[0], large.targets[0]) > 25
    similar = cases["mask-excludes-similar"]
    twin = shapes.coverage(similar.before, 1) > 0
    assert twin.any() and not (twin & (similar.mask > 0)).any()
    a, b = similar.before.shapes
    assert a.kind == b.kind and a.fill == b.fill and a.radius == b.radius


def test_antialiased_edges():
    scene = shapes.Scene(shapes.Background("plain", (0.0, 0.0, 0.0)),
                         (shapes.Shape("disc", "white", (64.0, 64.0), 20.3,
                                       shapes.Fill((1.0, 1.0, 1.0))),))
    img = shapes.render(scene)[..., 0]
    assert ((img > 0) & (img < 255)).sum() > 50  # partial coverage along the rim
    area = img.astype(np.float64).sum() / 255
    assert abs(area - math.pi * 20.3**2) < 0.01 * math.pi * 20.3**2
