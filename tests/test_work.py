"""Work accounting: the official codes' forward-equivalents, and ours counted per phase."""

from __future__ import annotations

import pytest

from backend.engine.diffusion import Schedule
from backend.engine.params import PRESETS
from backend.engine.work import WorkCounter, official_defaults, official_work


def test_official_counts_at_the_official_defaults():
    # DragDiffusion: LoRA 80 × batch 4 × (fwd + bwd) = 640; 35 inversion steps; F⁰ at t*;
    # 80 drag steps × 2; 35 denoising steps on [original, edited].
    dd = official_defaults("dragdiffusion")
    assert dd == {"lora": 640, "inversion": 35, "reference": 1, "drag": 160, "denoise": 70}
    assert sum(dd.values()) == 906
    assert sum(official_defaults("dragdiffusion", lora_trained=False).values()) == 266
    # GoodDrag: LoRA 70 × 4 × 2 = 560; 38 inversion steps; the original trajectory records
    # t2 + 1 = 8 steps; 7 timesteps × 30 Adam steps × 2 = 420; 38 denoising steps × 2.
    gd = official_defaults("gooddrag")
    assert gd == {"lora": 560, "inversion": 38, "reference": 8, "drag": 420, "denoise": 76}
    assert sum(gd.values()) == 1102
    assert sum(official_defaults("gooddrag", lora_trained=False).values()) == 542
    # The 1,094 / 534 leave out the trajectory's 8 forwards.
    assert sum(gd.values()) - gd["reference"] == 1094


@pytest.mark.parametrize(("method", "strength", "n_actual"),
                         [("dragdiffusion", 0.7, 35), ("gooddrag", 0.75, 38)])
def test_official_defaults_follow_from_the_presets(method, strength, n_actual):
    """The same numbers from our presets (which are the official defaults) and the schedule."""
    from diffusers import DDIMScheduler

    from backend.engine.random_tiny import SD15_SCHEDULER

    p = PRESETS[method]
    assert p.inversion_strength == strength
    schedule = Schedule.from_scheduler(DDIMScheduler(**SD15_SCHEDULER), p.n_inference_steps,
                                       p.inversion_strength)
    assert schedule.n_actual == n_actual
    adam = p.drag_steps if method == "dragdiffusion" else (
        p.drag_end_step * p.track_per_denoise * p.max_drag_per_track)
    counted = official_work(method, lora_steps=p.lora_steps, lora_batch=p.lora_batch,
                            n_actual=schedule.n_actual, drag_steps=adam,
                            drag_end_step=p.drag_end_step)
    assert counted == official_defaults(method)


def test_an_early_stop_costs_one_forward_and_the_trajectory_is_capped():
    base = dict(lora_steps=0, lora_batch=4, n_actual=5, drag_steps=10)
    assert official_work("dragdiffusion", **base)["drag"] == 20
    assert official_work("dragdiffusion", **base, stopped_early=True)["drag"] == 21
    assert official_work("gooddrag", **base, drag_end_step=7)["reference"] == 5
    with pytest.raises(ValueError):
        official_work("draggan", **base)


def test_counter_books_batches_and_backwards_to_phases():
    w = WorkCounter()
    w.forward(1)  # inversion by default
    w.phase = "denoise"
    w.forward(2)
    w.phase = "drag"
    w.forward(1, truncated=True)
    w.backward()
    w.add("lora", 8)
    assert w.fe == {"lora": 8, "inversion": 1, "reference": 0, "drag": 2, "denoise": 2}
    assert w.total == 13 and w.truncated == 1


def test_the_fast_preset_is_a_quarter_of_the_official_work():
    from diffusers import DDIMScheduler

    from backend.engine.params import resolve
    from backend.engine.random_tiny import SD15_SCHEDULER

    algorithm, p = resolve("fast")
    assert algorithm == "dragdiffusion"
    schedule = Schedule.from_scheduler(DDIMScheduler(**SD15_SCHEDULER), p.n_inference_steps,
                                       p.inversion_strength)
    assert schedule.t_star == 681  # the same timestep as the faithful default
    fast = official_work(algorithm, lora_steps=p.lora_steps, lora_batch=p.lora_batch,
                         n_actual=schedule.n_actual, drag_steps=p.drag_steps)
    assert sum(fast.values()) == 215  # at most (the drag may stop earlier)
    assert sum(official_defaults("dragdiffusion").values()) / sum(fast.values()) > 4
    redrag = {**fast, "lora": 0, "inversion": 0, "reference": 0}  # with the re-drag cache
    assert sum(redrag.values()) == 116
