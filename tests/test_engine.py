"""End-to-end DragEngine runs on the tiny random model (plumbing, not quality: see test_toy*)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.engine.cancel import blocks
from backend.engine.errors import Cancelled, InvalidInput
from backend.engine.pipeline import DragEngine
from backend.engine.types import CancelToken, DragRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # same seed, same pixels: bit for bit

FAST = {"work_size": 64, "lora_steps": 2, "lora_batch": 1, "n_inference_steps": 10,
        "drag_steps": 4, "drag_end_step": 2, "track_per_denoise": 2}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    return DragEngine.load(str(tiny_model_dir), device="cpu",
                           lora_cache_dir=str(tmp_path_factory.mktemp("lora-cache")))


def make_request(method: str, **kw) -> DragRequest:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 75, 4), dtype=np.uint8)  # non-square, not a multiple of 8
    mask = np.zeros((50, 75), np.uint8)
    mask[8:42, 10:66] = 255
    fields = dict(image=image, handles=[(20.0, 25.0), (60.0, 30.0)],
                  targets=[(40.0, 25.0), (50.0, 20.0)], mask=mask, method=method,
                  prompt="a red disc", seed=3, params=dict(FAST))
    fields.update(kw)
    return DragRequest(**fields)


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_edit_runs_at_full_resolution_and_keeps_unmasked_pixels(engine, method):
    events = []
    request = make_request(method)
    result = engine.run(request, progress=lambda *e: events.append(e))
    assert result.image.shape == request.image.shape and result.image.dtype == np.uint8
    outside = request.mask == 0
    np.testing.assert_array_equal(result.image[outside], request.image[outside])
    np.testing.assert_array_equal(result.image[..., 3], request.image[..., 3])  # alpha untouched
    assert not np.array_equal(result.image[~outside], request.image[~outside])
    phases = [e[0] for e in events]
    for phase in ("load", "lora", "inversion", "drag", "denoise", "decode"):
        assert phase in phases, phase
    # Phases come in pipeline order.
    firsts = [phases.index(p) for p in ("load", "lora", "inversion", "drag", "decode")]
    assert firsts == sorted(firsts)
    assert len(result.handles) == 2
    for x, y in result.handles:
        assert 0 <= x <= 75 and 0 <= y <= 50
    assert result.stats["unet_passes"] > 0 and set(result.timings) >= {"lora", "inversion"}
    assert result.warnings == []


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_a_selection_below_one_latent_cell_warns_and_still_keeps_the_outside(engine, method):
    request = make_request(method, params={**FAST, "lora_steps": 0})
    request.mask[:] = 0
    request.mask[20:23, 30:33] = 255  # 3×3 px: less than one 8-px cell of the 64×40 working size
    result = engine.run(request)
    assert len(result.warnings) == 1 and "8-pixel cell" in result.warnings[0]
    outside = request.mask == 0
    np.testing.assert_array_equal(result.image[outside], request.image[outside])


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_same_seed_same_result(engine, method):
    a = engine.run(make_request(method))
    b = engine.run(make_request(method))
    c = engine.run(make_request(method))
    # b and c are re-drags: their denoising's original branch comes from the re-drag cache
    # (the edited branch runs alone), so they agree bit for bit with each other and with a
    # up to float rounding (test_engine_speed's re-drag test bounds it)
    np.testing.assert_array_equal(b.image, c.image)
    assert np.abs(a.image.astype(int) - b.image).max() <= 1
    assert a.handles == b.handles == c.handles


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_cancel_stops_within_one_step(engine, method):
    cancel = CancelToken()
    seen = []

    def progress(phase, step, total):
        seen.append((phase, step))
        if phase == "drag" and step == 1:
            cancel.cancel()

    with pytest.raises(Cancelled):
        engine.run(make_request(method, params={**FAST, "lora_steps": 0}), progress=progress,
                   cancel=cancel)
    assert seen[-1] == ("drag", 1)  # nothing ran after the step that saw the cancel
    # The engine is usable afterwards (no LoRA or attention processor left behind).
    engine.run(make_request(method, params={**FAST, "lora_steps": 0}))


class BlockWatch:
    """Counts the UNet and VAE blocks that run (forward) and whose gradients are computed
    (backward) once a cancel was asked; it asks for the cancel itself at the ``at``-th block of
    ``phase`` (forward, or backward: when that block's output gradient is computed)."""

    def __init__(self, engine, cancel: CancelToken, phase: str, at: int, backward: bool):
        self.cancel, self.phase, self.at, self.backward = cancel, phase, at, backward
        self.current, self.seen, self.after = None, 0, 0
        modules = [*blocks(engine.model.unet), *blocks(engine.model.vae)]
        self.handles = [m.register_forward_pre_hook(self.before) for m in modules]
        self.handles += [m.register_forward_hook(self.ran) for m in modules]

    def progress(self, phase, step, total):
        self.current = phase

    def _tick(self) -> None:
        if self.current == self.phase and not self.cancel.cancelled:
            self.seen += 1
            if self.seen == self.at:
                self.cancel.cancel()

    def before(self, module, args):
        if not self.backward:
            self._tick()

    def ran(self, module, args, output):
        self.after += self.cancel.cancelled  # a block that ran to its end after the cancel
        if self.backward and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self.gradient)

    def gradient(self, grad):
        self.after += self.cancel.cancelled
        self._tick()

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(("method", "phase", "backward"), [
    ("dragdiffusion", "lora", True), ("dragdiffusion", "inversion", False),
    ("dragdiffusion", "drag", False), ("dragdiffusion", "drag", True),
    ("gooddrag", "drag", True), ("gooddrag", "denoise", False),
    ("dragdiffusion", "decode", False),
])
def test_a_cancel_stops_a_pass_within_one_block(engine, method, phase, backward):
    """N1/N5: the cancel was seen only at the next step, after the whole UNet pass (and its
    backward) had run: up to a minute on a CPU at 512², hours on a large canvas. Now no block
    of the UNet or the VAE runs, forward or backward, after the one that saw the cancel."""
    cancel = CancelToken()
    watch = BlockWatch(engine, cancel, phase, at=5, backward=backward)
    params = {**FAST, "lora_steps": 2 if phase == "lora" else 0}
    try:
        with pytest.raises(Cancelled):
            engine.run(make_request(method, params=params, prompt=f"a {phase} {backward}"),
                       progress=watch.progress, cancel=cancel)  # (no re-drag cache hit)
    finally:
        watch.remove()
    assert cancel.cancelled and watch.current == phase
    assert watch.after == 0  # the old engine finished the pass: dozens of blocks
    engine.run(make_request(method, params={**FAST, "lora_steps": 0}))  # usable afterwards


def test_no_mask_lets_everything_change_and_gray_stays_gray(engine):
    gray = np.random.default_rng(1).integers(0, 256, (40, 33, 1), dtype=np.uint8)
    result = engine.run(DragRequest(image=gray, handles=[(10.0, 10.0)], targets=[(20.0, 12.0)],
                                    method="dragdiffusion", params=FAST))
    assert result.image.shape == (40, 33, 1)
    assert (result.image != gray).mean() > 0.5


def test_bad_requests_are_refused_before_any_work(engine):
    with pytest.raises(InvalidInput, match="outside"):
        engine.run(make_request("dragdiffusion", handles=[(80.0, 5.0), (1.0, 1.0)]))
    with pytest.raises(InvalidInput, match="unknown method"):
        engine.run(make_request("dragganx"))
    with pytest.raises(InvalidInput, match="unknown parameter"):
        engine.run(make_request("gooddrag", params={"drag_stepz": 3}))
    strip = np.zeros((4000, 8, 3), np.uint8)  # 1:500: at the default width a 512×256000 canvas
    with pytest.raises(InvalidInput, match=r"512×256000.*work_max_side"):
        engine.run(make_request("dragdiffusion", image=strip, mask=None, params={},
                                handles=[(4.0, 100.0)], targets=[(4.0, 120.0)]))


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_previews_show_the_denoising_edit(engine, method):
    frames = []
    engine.run(make_request(method, params={**FAST, "lora_steps": 0}),
               preview=lambda phase, step, rgb: frames.append((phase, step, rgb)))
    assert frames and all(phase == "denoise" for phase, _, _ in frames)
    steps = [step for _, step, _ in frames]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    rgb = frames[-1][2]
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 8, 3)  # latent size of a 64×40 working image


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_the_result_says_why_the_drag_ended_early(engine, method):
    """``stats["drag_stop"]``: "reached" when the tracker found every handle in reach (here at
    once: 64 grid px), "no_change" when GoodDrag's tracker saw nothing move, None when every
    step ran (what the command line's early-stop line reads)."""
    fast = {**FAST, "lora_steps": 0}
    reached = engine.run(make_request(method, params={**fast, "reach_threshold": 64}))
    assert reached.stats["drag_stop"] == "reached" and reached.stats["drag_steps"] == 0
    full = engine.run(make_request(method, params={**fast, "reach_threshold": 0}))
    assert full.stats["drag_stop"] is None
    if method == "gooddrag":  # one tracking without movement is enough to stop
        still = engine.run(make_request(method, params={**fast, "reach_threshold": 0,
                                                        "max_track_no_change": 1,
                                                        "r2": 0}))
        assert still.stats["drag_stop"] == "no_change"
