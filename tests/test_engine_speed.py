"""Engine speed work on the tiny random model: counted UNet work, re-drag cache, LoRA residency.

Plumbing only (random weights); the counts are exact, so they are asserted exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.engine.pipeline import DragEngine
from backend.engine.types import DragRequest

# 10 DDIM steps at strength 0.7 → 7 inversion steps; reach 0: the drag never stops early.
FAST = {"work_size": 64, "lora_steps": 2, "lora_batch": 2, "n_inference_steps": 10,
        "drag_steps": 3, "drag_end_step": 2, "track_per_denoise": 1, "max_drag_per_track": 2,
        "reach_threshold": 0.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def engine(tiny_model_dir, tmp_path):
    return DragEngine.load(str(tiny_model_dir), device="cpu", lora_cache_dir=str(tmp_path))


def make_request(method: str = "dragdiffusion", targets=((40.0, 25.0),), **kw) -> DragRequest:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[8:40, 10:56] = 255
    fields = dict(image=image, handles=[(20.0, 25.0)], targets=list(targets), mask=mask,
                  method=method, prompt="a red disc", seed=3, params=dict(FAST))
    params = kw.pop("params", {})
    fields.update(kw)
    fields["params"] = {**FAST, **params}
    return DragRequest(**fields)


def test_first_edit_work_is_counted_per_phase_and_matches_the_official_count(engine):
    work = engine.run(make_request("dragdiffusion")).stats["work"]
    # LoRA 2 steps × batch 2 × 2; 7 inversion steps; F⁰; 3 drag steps × 2; 7 steps × [orig, edit].
    assert work["fe"] == {"lora": 8, "inversion": 7, "reference": 1, "drag": 6, "denoise": 14}
    assert work["official_fe"] == work["fe"] and work["ratio"] == 1.0
    assert work["total"] == 36 and work["official_defaults_total"] == 906


def test_gooddrag_work_is_counted_and_saves_the_official_redundant_passes(engine):
    work = engine.run(make_request("gooddrag")).stats["work"]
    # Strength 0.75 → round(7.5) = 8 steps. 2 dragged timesteps × 1 tracking × 2 Adam steps
    # × 2; the original trajectory has 2 steps (the official code records 3); while dragging
    # only the edited branch is denoised (the original's next latent is on its trajectory).
    assert work["fe"] == {"lora": 8, "inversion": 8, "reference": 2, "drag": 8,
                          "denoise": 2 + 2 * 6}
    assert work["official_fe"] == {"lora": 8, "inversion": 8, "reference": 3, "drag": 8,
                                   "denoise": 16}
    assert work["official_defaults_total"] == 1102


def test_without_a_mask_the_forwards_stop_after_the_feature_block(engine):
    work = engine.run(make_request("dragdiffusion", mask=None,
                                   params={"lora_steps": 0})).stats["work"]
    assert work["truncated"] == 1 + 3  # F⁰ and every drag forward: the loss needs no ε
    assert work["fe"]["drag"] == 6  # counted as whole forwards (an upper bound)
