"""The engine on PyTorch's meta device: a device mismatch fails here as it would on a GPU.

Every pure engine function runs with its inputs on ``meta`` (see ``fixtures_device``); the full
SD1.5 architecture runs there at no compute cost, so feature extraction, reference attention,
both drag loops, LoRA training and a whole ``DragEngine`` edit are checked for tensors left on
the CPU. A static check makes every tensor factory in the engine name its device.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_device import FACTORIES, MetaRun, sd15_unet

from backend.engine import dragdiffusion, gooddrag
from backend.engine.attention import reference_attention
from backend.engine.context import DragContext
from backend.engine.diffusion import Schedule, UNetRunner, ddim_step, denoise, inversion_step
from backend.engine.motion import (
    bilinear_sample,
    dragdiffusion_motion_loss,
    gooddrag_motion_loss,
    masked_latent_loss,
    patch_offsets,
    track_points,
)
from backend.engine.params import PRESETS
from backend.engine.sd15 import ddim_scheduler

META = torch.device("meta")
ENGINE = Path(__file__).resolve().parents[1] / "backend" / "engine"


def meta(*shape: int, grad: bool = False) -> torch.Tensor:
    return torch.zeros(*shape, device=META, requires_grad=grad)


@pytest.fixture(scope="module")
def unet():
    """SD1.5's UNet on meta (the real layout: features at up_blocks[2], 640 channels)."""
    return sd15_unet()


@pytest.fixture(scope="module")
def cond():
    return meta(1, 77, 768)


# --- pure functions --------------------------------------------------------------------------


def test_bilinear_sample_and_patch_offsets_stay_on_the_device():
    feat = meta(1, 640, 32, 32, grad=True)
    dr, dc = patch_offsets([(4, 5)], 2, (32, 32), META)
    assert dr.device == META and dr.shape == (5, 5)
    out = bilinear_sample(feat, 4 + dr + 0.3, 5 + dc - 0.7)
    assert out.device == META and out.shape == (640, 5, 5)
    out.sum().backward()
    assert feat.grad.device == META


def test_patch_offsets_clamp_at_the_edge_without_a_device_sync():
    with MetaRun() as run:
        dr, dc = patch_offsets([(0, 31), (1, 30)], 2, (32, 32), META)
    assert dr.shape == dc.shape == (3, 3) and dr.device == META
    assert run.reads_in("motion.py") == 0
    dr, dc = patch_offsets([(0, 31), (1, 30)], 2, (32, 32), "cpu")
    assert dr[:, 0].tolist() == [0, 1, 2]  # row 0 − 1 would leave the map
    assert dc[0].tolist() == [-2, -1, 0]  # col 31 + 1 would leave it


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_motion_losses_run_on_the_device(method):
    """Fails on a loss that mixes CPU index or weight tensors into device features."""
    feat = meta(1, 640, 64, 64, grad=True)
    handles, targets = [(10.0, 12.0), (0.0, 63.0)], [(20.0, 12.0), (8.0, 50.0)]
    if method == "dragdiffusion":
        loss = dragdiffusion_motion_loss(feat, handles, targets, radius=1)
    else:
        loss = gooddrag_motion_loss(feat, meta(1, 640, 64, 64), handles, handles, targets)
    assert loss.device == META and loss.shape == ()
    loss.backward()
    assert feat.grad.device == META


def test_masked_latent_loss_runs_on_the_device():
    latent = meta(1, 4, 64, 64, grad=True)
    loss = masked_latent_loss(latent, meta(1, 4, 64, 64), meta(1, 1, 64, 64))
    loss.backward()
    assert loss.device == META and latent.grad.device == META


def test_tracking_runs_on_the_device_and_reads_back_once():
    feat0, feat = meta(1, 640, 64, 64), meta(1, 640, 64, 64)
    handles = [(10.0, 10.0), (0.0, 63.0), (40.0, 30.0)]
    with MetaRun() as run:
        tracked = track_points(feat0, feat, handles, handles, radius=3)
    assert len(tracked) == 3 and all(isinstance(v, float) for p in tracked for v in p)
    assert run.reads_in("motion.py") == 1  # one host read for all handles, not one each


def test_ddim_steps_run_on_the_device():
    schedule = Schedule.from_scheduler(ddim_scheduler(), 50, 0.7)
    z, eps = meta(2, 4, 64, 64), meta(2, 4, 64, 64)
    t = schedule.t_star
    assert ddim_step(schedule, z, eps, t).device == META
    assert inversion_step(schedule, z, eps, t).device == META


# --- the SD1.5 UNet ---------------------------------------------------------------------------


def test_sd15_features_and_timesteps_on_the_device(unet, cond):
    runner = UNetRunner(unet, cond)
    z = meta(1, 4, 64, 64, grad=True)
    seen = []
    hook = unet.time_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with MetaRun() as run:
            eps, feat = runner.eps_and_features(z, 681, (256, 256))
            none, feat2 = runner.eps_and_features(z, 681, (256, 256), need_eps=False)
    finally:
        hook.remove()
    assert eps.device == META and eps.shape == (1, 4, 64, 64)
    assert feat.shape == feat2.shape == (1, 640, 256, 256) and none is None
    # The timestep went in as a device tensor, made once for both calls.
    assert len(seen) == 2 and all(t.device == META for t in seen)
    assert runner.timestep(681, META) is runner.timestep(681, META)
    assert not run.factories_without_device
    (feat.sum() + eps.sum()).backward()
    assert z.grad.device == META


def test_reference_attention_denoise_on_the_device(unet, cond):
    runner = UNetRunner(unet, cond)
    schedule = Schedule.from_scheduler(ddim_scheduler(), 50, 0.7)
    with reference_attention(unet, 10) as state:
        state["active"] = True
        z = denoise(runner, schedule, meta(2, 4, 64, 64), schedule.denoise_timesteps[:2])
    assert z.device == META and z.shape == (2, 4, 64, 64) and runner.passes == 2


def _context(unet, cond, method: str, **overrides) -> DragContext:
    params = PRESETS[method].replace(**overrides)
    schedule = Schedule.from_scheduler(ddim_scheduler(), params.n_inference_steps,
                                       params.inversion_strength)
    return DragContext(
        runner=UNetRunner(unet, cond), schedule=schedule, params=params, grid=(256, 256),
        handles=[(100.0, 100.0), (0.0, 255.0)], targets=[(100.0, 140.0), (30.0, 200.0)],
        keep=meta(1, 1, 64, 64),
    )


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_drag_loops_run_on_the_device(unet, cond, method):
    """Both algorithms end to end (drag, tracking, mask term, reference-attention denoise)."""
    ctx = _context(unet, cond, method, n_inference_steps=8, drag_steps=2, drag_end_step=1,
                   track_per_denoise=1, max_drag_per_track=2)
    with MetaRun() as run:
        z, handles = {"dragdiffusion": dragdiffusion.run, "gooddrag": gooddrag.run}[method](
            ctx, meta(1, 4, 64, 64))
    assert z.device == META and z.shape == (1, 4, 64, 64) and len(handles) == 2
    assert ctx.drag.steps >= 1
    assert not run.factories_without_device


# --- a whole edit -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_model():
    """The whole SD1.5 model (UNet, VAE, text encoder, tokenizer, scheduler) on meta."""
    from backend.engine.random_sd15 import random_sd15

    return random_sd15("meta")


@pytest.fixture(scope="module")
def meta_engine(meta_model, tmp_path_factory):
    from backend.engine.lora import LoraCache
    from backend.engine.pipeline import DragEngine

    return DragEngine(meta_model, LoraCache(tmp_path_factory.mktemp("lora")))


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_a_whole_sd15_edit_runs_on_the_device(meta_engine, method):
    """VAE, prompt, LoRA training, inversion, drag, denoise and decode, all on meta at 512²."""
    from backend.engine.types import DragRequest

    image = np.full((512, 512, 3), 120, np.uint8)
    mask = np.zeros((512, 512), np.uint8)
    mask[100:400, 100:400] = 255
    request = DragRequest(image=image, handles=[(200.0, 200.0)], targets=[(260.0, 200.0)],
                          mask=mask, method=method, params={
                              "lora_steps": 2, "n_inference_steps": 6, "drag_steps": 2,
                              "drag_end_step": 1, "track_per_denoise": 1})
    with MetaRun() as run:
        result = meta_engine.run(request)
    assert result.image.shape == image.shape
    assert (result.image[mask == 0] == 120).all()  # outside the mask: the input's pixels
    assert not run.factories_without_device, run.factories_without_device


# --- every factory names its device ------------------------------------------------------------


def factory_calls_without_device(source: str) -> list[tuple[int, str]]:
    """(line, name) of ``torch.<factory>(...)`` calls in ``source`` with no ``device=``."""
    names = {f.__name__ for f in FACTORIES}
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and node.func.attr in names
                and not any(k.arg == "device" for k in node.keywords)):
            found.append((node.lineno, node.func.attr))
    return found


def test_the_static_check_sees_a_factory_without_device():
    assert factory_calls_without_device("torch.arange(3)\ntorch.zeros(2, device=d)") == [
        (1, "arange")]


def test_every_tensor_factory_in_the_engine_names_its_device():
    """On a GPU a factory without ``device=`` makes a CPU tensor; say "cpu" where one is meant."""
    offenders = {
        path.name: calls
        for path in sorted(ENGINE.glob("*.py"))
        if (calls := factory_calls_without_device(path.read_text("utf-8")))
    }
    assert not offenders, offenders


# --- no per-step device → host reads or host → device copies ------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 4.0])
def test_gooddrag_reads_the_loss_back_only_when_a_threshold_needs_it(unet, cond, threshold):
    ctx = _context(unet, cond, "gooddrag", n_inference_steps=8, drag_end_step=1,
                   track_per_denoise=2, max_drag_per_track=3, drag_loss_threshold=threshold)
    ctx.handles, ctx.targets = [(100.0, 100.0)], [(100.0, 140.0)]
    with MetaRun() as run:
        gooddrag.run(ctx, meta(1, 4, 64, 64))
    adam_steps = ctx.drag.steps
    assert adam_steps >= 2
    assert run.reads_in("gooddrag.py") == (adam_steps if threshold else 0)


def test_the_host_side_threshold_test_matches_the_loss():
    """At threshold 0, "loss <= 0" holds exactly when no handle adds a motion term."""
    from backend.engine.gooddrag import _at_most

    feat = torch.randn(1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    cases = [([(5.0, 5.0)], [(5.0, 5.0)], 0.0), ([(5.0, 5.0)], [(5.0, 6.0)], 2.0),
             ([(5.0, 5.0)], [(5.0, 9.0)], 2.0), ([(5.0, 5.0), (9.0, 9.0)], [(5.0, 5.0), (9.0, 20.0)], 0.0)]
    for handles, targets, reach in cases:
        loss = gooddrag_motion_loss(feat, feat.roll(1, 2), handles, handles, targets, reach=reach)
        assert _at_most(loss, 0.0, handles, targets, reach) == (float(loss) <= 0.0)


def test_lora_training_copies_to_the_device_once_not_per_step(meta_model):
    from backend.engine.lora import remove_lora, train_lora

    model = meta_model
    image = torch.zeros(1, 3, 512, 512, device="cpu")
    uploads = []
    for steps in (2, 5):
        with MetaRun() as run:
            state = train_lora(model, image, "", steps=steps, lr=5e-4, rank=4, batch=2,
                               fixed_crops=False)
        remove_lora(model)
        assert state and all(v.device.type == "cpu" for v in state.values())
        uploads.append(run.uploads_in("lora.py"))
    assert uploads[0] == uploads[1], uploads


def test_dragdiffusion_reads_back_only_the_tracked_handles(unet, cond):
    ctx = _context(unet, cond, "dragdiffusion", n_inference_steps=8, drag_steps=4)
    with MetaRun() as run:
        dragdiffusion.drag_latent(ctx, meta(1, 4, 64, 64))
    steps = ctx.drag.steps
    assert steps >= 2
    assert run.reads_in("dragdiffusion.py") == 0
    assert run.reads_in("motion.py") == steps - 1  # one tracking per step after the first
