"""Every precision branch, emulated on the CPU: fp16 weights + autocast + GradScaler, bf16, fp32.

CPU autocast (``torch.autocast("cpu", dtype=...)``), ``torch.amp.GradScaler("cpu")`` and fp16/bf16
weights take the same code paths the GPU takes; only the kernels differ.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from backend.engine import devices
from backend.engine.context import DragContext
from backend.engine.devices import PRECISIONS, autocast, grad_scaler, resolve_precision
from backend.engine.errors import InvalidInput
from backend.engine.lora import LoraCache
from backend.engine.models import load_model
from backend.engine.pipeline import DragEngine
from backend.engine.types import DragRequest
from backend.engine.work import WorkCounter

CPU = torch.device("cpu")


# --- choosing a precision ----------------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend one CUDA GPU exists (bf16 support switchable) for the choice logic only."""
    state = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state["bf16"])
    return state


def test_automatic_precision_per_device(fake_gpu, monkeypatch):
    dev, precision = resolve_precision()
    assert dev == torch.device("cuda", 0) and precision == devices.default_precision(dev)
    assert resolve_precision("cuda", "fp16-mixed")[1] == PRECISIONS["fp16-mixed"]
    assert resolve_precision("cuda", "float16")[1] == PRECISIONS["fp16"]
    fake_gpu["bf16"] = False
    with pytest.raises(InvalidInput, match="bf16"):
        resolve_precision("cuda", "bf16")
    assert resolve_precision("cpu")[1] == PRECISIONS["fp32"]
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_precision("mps")[1] == PRECISIONS["fp32"]


def test_cpu_refuses_fp16_compute_and_unknown_names():
    for name in ("fp16", "fp16-mixed"):
        with pytest.raises(InvalidInput, match="fp16 is not supported on the CPU"):
            resolve_precision("cpu", name)
    with pytest.raises(InvalidInput, match="unknown dtype"):
        resolve_precision("cpu", "int8")
    assert resolve_precision("cpu", "bf16-mixed")[1].weights == torch.float32


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_autocast_and_scaler_follow_the_precision(name):
    precision = PRECISIONS[name]
    with autocast(CPU, precision):
        enabled = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu")
    assert enabled == (precision.autocast is not None)
    if enabled:
        assert dtype == precision.autocast
    scaler = grad_scaler(CPU, precision)
    assert (scaler is not None) == (precision.autocast == torch.float16)


def test_the_scaled_optimiser_step_skips_a_step_with_overflowing_gradients():
    """DragContext's fp16 branch: a GradScaler step, which skips inf gradients."""
    z = torch.zeros(3, requires_grad=True)
    optimiser = torch.optim.Adam([z], lr=0.1)
    ctx = DragContext(runner=SimpleNamespace(work=WorkCounter()), schedule=None, params=None, grid=(1, 1), handles=[],
                      targets=[], keep=None, scaler=grad_scaler(CPU, PRECISIONS["fp16"]))
    ctx.optimiser_step((z * torch.tensor([1.0, 2.0, float("inf")])).sum(), optimiser)
    assert torch.equal(z.detach(), torch.zeros(3))  # overflow: step skipped, scale lowered
    ctx.optimiser_step((z * torch.tensor([1.0, 2.0, 3.0])).sum(), optimiser)
    assert (z.detach() < 0).all()


# --- a whole edit per branch -------------------------------------------------------------------


@pytest.fixture(scope="module")
def case():
    from backend.tools.bench import synthetic_case

    return synthetic_case(64)


class _AutocastSpy:
    """Records, per UNet call, whether autocast was on and in which dtype."""

    def __init__(self, unet) -> None:
        self.seen: set[tuple[bool, torch.dtype | None]] = set()
        self.handle = unet.conv_in.register_forward_pre_hook(self)

    def __call__(self, _module, _args) -> None:
        on = torch.is_autocast_enabled("cpu")
        self.seen.add((on, torch.get_autocast_dtype("cpu") if on else None))


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "fp16-mixed"])
def test_a_whole_edit_runs_in_each_precision(tiny_model_dir, tmp_path, monkeypatch, case,
                                             name, method):
    precision = PRECISIONS[name]
    model = load_model(tiny_model_dir, device="cpu")
    model.cast(precision)
    assert model.unet.dtype == precision.weights and model.precision is precision
    scaled, update = [], torch.amp.GradScaler.update
    monkeypatch.setattr(torch.amp.GradScaler, "update",
                        lambda self, *a, **k: scaled.append(1) or update(self, *a, **k))
    spy = _AutocastSpy(model.unet)
    image, mask, handles, targets = case
    result = DragEngine(model, LoraCache(tmp_path)).run(DragRequest(
        image=image, handles=handles, targets=targets, mask=mask, method=method, params={
            "work_size": 64, "lora_steps": 2, "n_inference_steps": 6, "drag_steps": 3,
            "drag_end_step": 1, "track_per_denoise": 1}))
    spy.handle.remove()
    # Every UNet pass (LoRA, inversion, drag, denoise) ran in the precision's autocast.
    assert spy.seen == {(precision.autocast is not None, precision.autocast)}
    # fp16 compute scales its backward passes (2 LoRA steps + the drag's Adam steps).
    steps = result.stats["drag_steps"]
    assert len(scaled) == (2 + steps if precision.scaled else 0)
    assert result.image.dtype == np.uint8 and result.image.shape == image.shape
    assert (result.image[mask == 0] == image[mask == 0]).all()


def test_precision_bench_on_the_toy_model_compares_branches_with_fp32(tmp_path, monkeypatch):
    """``python -m backend precision`` end to end on the toy model (its preset.json sets the
    working size): fp32 is its own reference, bf16 differs but stays finite and close."""
    import json

    from backend.cli import main

    sizes = []  # (the bench's work_size override, the model's preset) per edit
    run = DragEngine.run
    monkeypatch.setattr(DragEngine, "run", lambda self, request, *a, **k: sizes.append(
        (request.params.get("work_size"), self.table.model_params.get("work_size")))
        or run(self, request, *a, **k))
    out = tmp_path / "rows.json"
    assert main(["precision", "--model", "demo", "--method", "dragdiffusion", "--cases", "1",
                 "--branches", "bf16", "--lora-steps", "0", "--set", "n_inference_steps=10",
                 "--set", "drag_steps=3", "--json", str(out)]) == 0
    fp32, bf16 = json.loads(out.read_text())
    assert (fp32["branch"], bf16["branch"]) == ("fp32", "bf16")
    assert fp32["mean_latent_rel_l2"] == 0.0 and fp32["min_image_psnr_db"] == float("inf")
    assert 0.0 < bf16["mean_latent_rel_l2"] < 0.5 and 20.0 < bf16["min_image_psnr_db"] < 200.0
    assert fp32["mean_handle_error_px"] >= 0.0  # scored against the case's correct result
    assert sizes == [(None, 128)] * 2  # the toy model's own working size, no bench override
