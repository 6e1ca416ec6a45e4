"""The full SD1.5 architecture with random weights: the real model's cost, no download.

For ``gpu-check``, the benchmarks and the device tests. On ``meta`` the model has no weights at
all (shapes only), which lets tests run the whole engine's device logic at no compute cost.
"""

from __future__ import annotations

import torch

from backend.engine.devices import PRECISIONS, resolve_precision
from backend.engine.models import LoadedModel
from backend.engine.sd15 import SD15_CONFIG_DIR, ddim_scheduler, sd15_tokenizer


def random_sd15(device: str | None = None, dtype: str | None = None, seed: int = 0) -> LoadedModel:
    """SD1.5's UNet, VAE and text encoder from the shipped configs, random weights from ``seed``.

    ``device`` and ``dtype`` are what ``resolve_precision`` accepts, or ``device="meta"`` (any
    ``PRECISIONS`` name, no checks). The modules are created
    directly on the target device (random initialisation on a GPU takes a fraction of a second
    instead of ~10 s on the CPU).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if device == "meta":
        dev, precision = torch.device("meta"), PRECISIONS[dtype or "fp32"]
    else:
        dev, precision = resolve_precision(device, dtype)
    dt = precision.weights
    cfg = SD15_CONFIG_DIR
    torch.manual_seed(seed)
    with torch.device(dev):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
    for module in (unet, vae, text_encoder):
        module.to(dev, dt).eval().requires_grad_(False)
    return LoadedModel(name="sd15-random", source=str(cfg), unet=unet, vae=vae,
                       text_encoder=text_encoder, tokenizer=sd15_tokenizer(),
                       scheduler=ddim_scheduler(cfg), device=dev, dtype=dt,
                       fingerprint=f"sd15-random-seed{seed}", precision=precision)
