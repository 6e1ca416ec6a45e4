"""Drag-quality metrics and baselines (backend/demo/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backend.demo import metrics, shapes
from backend.demo.shapes import Scene, apply_motion, render

CASES = shapes.make_cases(6, seed=0)


def _drag(case):
    return [math.dist(h, t) for h, t in zip(case.handles, case.targets, strict=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_exact_result_scores_perfectly(case):
    s = metrics.score(case, case.correct)
    assert s.handle_error == 0.0
    assert s.psnr_in == math.inf and s.psnr_out == math.inf


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_noop_scores_the_drag_length(case):
    s = metrics.score(case, metrics.noop(case))
    assert [p.error for p in s.pairs] == pytest.approx(_drag(case), abs=1e-9)
    assert s.psnr_in < 25 and s.psnr_out == math.inf


def test_partial_move_scores_the_remaining_distance():
    case = CASES[1]  # translate-large
    (h, t), m = (case.handles[0], case.targets[0]), case.motions[0]
    half = (h[0] + 0.5 * (t[0] - h[0]), h[1] + 0.5 * (t[1] - h[1]))
    moved = list(case.before.shapes)
    moved[m.shape] = apply_motion(moved[m.shape], m, h, half)
    out = render(Scene(case.before.background, tuple(moved)))
    s = metrics.score(case, out)
    assert s.handle_error == pytest.approx(0.5 * _drag(case)[0], abs=0.2)
    assert s.pairs[0].match_psnr > 40


def test_cut_and_paste_baseline():
    for case in CASES:
        out = metrics.cut_and_paste(case)
        s = metrics.score(case, out)
        assert s.psnr_out == math.inf
        if case.motions[0].vertex is None:
            assert s.handle_error < 1.0, case.name
        assert s.handle_error < metrics.score(case, metrics.noop(case)).handle_error


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert metrics.psnr(a, a) == math.inf
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(48))
    where = np.zeros((4, 4), bool)
    where[1:] = True
    assert metrics.psnr(a, b, where) == math.inf
