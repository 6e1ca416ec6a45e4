"""The shipped toy model (backend/toy/model): loads like SD1.5, reconstructs, and drags.

The last tests are the semantic check that random weights cannot pass: on the trained model both
drag methods must move the dragged shape toward its target (lower handle error than leaving the
image unchanged) while the shape stays recognisable.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.toy import metrics
from backend.toy.bench_quality import engine_runner, evaluate, summary
from backend.toy.data import to_tensor, to_uint8
from backend.toy.metrics import psnr
from backend.toy.shapes import make_cases
from backend.toy.train import DEFAULT_MODEL_DIR

# Measured on the shipped weights (VAE round trip ≈ 23 dB, DDIM inversion + denoise at strength
# 0.7 within 0.2 dB of it), minus a margin.
VAE_PSNR_MIN = 20.0
INVERSION_PSNR_MIN = 20.0
# The toy latents move slowly at the SD1.5 default lr 0.01 (80 steps move the handle ~1 px);
# 0.1 is the setting measured to work (see the closing note of issue #5).
DRAG_PARAMS = {"work_size": 128, "lora_steps": 0, "latent_lr": 0.1}
# GoodDrag's radii are set for SD1.5 at 512 px (a 256-pixel grid); at the toy's 128 px (a 64-pixel
# grid) its 9×9 patch and 4-pixel step cover the whole shape. Scaled to the grid they become
# r1 = 1, r2 = 3, beta = 1 (measured: 10.0 px mean handle error on 6 cases vs 18.3 for no-op).
GOODDRAG_PARAMS = {**DRAG_PARAMS, "r1": 1, "r2": 3, "beta": 1}


@pytest.fixture(scope="module")
def loaded():
    from backend.engine.models import load_model

    return load_model(str(DEFAULT_MODEL_DIR), device="cpu")


def test_shipped_model_is_small_and_sd_shaped(loaded):
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file())
    assert size < 15e6
    assert type(loaded.unet).__name__ == "UNet2DConditionModel"
    assert type(loaded.vae).__name__ == "AutoencoderKL"
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.vae_scale_factor == 4
    up = [type(b).__name__ for b in loaded.unet.up_blocks]
    assert up == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    assert loaded.encode_prompt("a red disc").shape == (1, 77, 32)


def test_vae_round_trip(loaded):
    from backend.toy.shapes import random_scene, render

    torch.set_grad_enabled(False)
    rng = np.random.default_rng(2024)
    x = to_tensor(np.stack([render(random_scene(rng)) for _ in range(4)]))
    vae = loaded.vae
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    scores = [psnr(a, b) for a, b in zip(to_uint8(x), to_uint8(y), strict=True)]
    torch.set_grad_enabled(True)
    assert np.mean(scores) > VAE_PSNR_MIN, scores


@pytest.mark.slow
def test_ddim_inversion_reconstructs():
    from backend.engine.pipeline import DragEngine
    from backend.toy.evaluate import reconstruct
    from backend.toy.shapes import random_scene, render

    engine = DragEngine.load(str(DEFAULT_MODEL_DIR), device="cpu")
    img = render(random_scene(np.random.default_rng(2025)))
    _, inverted = reconstruct(engine, img, prompt="a shape", strength=0.7)
    assert psnr(img, inverted) > INVERSION_PSNR_MIN


def _drag_vs_noop(method: str, params: dict) -> tuple[dict, dict]:
    from backend.engine.pipeline import DragEngine

    cases = make_cases(3, seed=0)  # translate small, translate large, two shapes
    engine = DragEngine.load(str(DEFAULT_MODEL_DIR), device="cpu")
    rows = evaluate(cases, engine_runner(engine, method, params))
    return summary(rows), summary(evaluate(cases, metrics.noop))


@pytest.mark.slow
def test_dragdiffusion_moves_content_toward_target():
    got, noop = _drag_vs_noop("dragdiffusion", DRAG_PARAMS)
    assert got["handle_error"] < 0.75 * noop["handle_error"], (got, noop)
    assert got["psnr_out"] == metrics.PSNR_CAP  # outside the mask exactly the input


@pytest.mark.slow
def test_gooddrag_moves_content_toward_target():
    got, noop = _drag_vs_noop("gooddrag", GOODDRAG_PARAMS)
    assert got["handle_error"] < 0.75 * noop["handle_error"], (got, noop)
    assert got["psnr_out"] == metrics.PSNR_CAP
