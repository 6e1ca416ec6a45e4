"""Helpers for the device tests (the meta-device tools themselves are ``backend.tools.meta_device``)."""

from __future__ import annotations

import torch

from backend.tools.meta_device import FACTORIES, MetaRun

__all__ = ["FACTORIES", "MetaRun", "sd15_unet"]


def sd15_unet(device: str | torch.device = "meta", **overrides):
    """The full SD1.5 UNet architecture (random or, on meta, no weights)."""
    from diffusers import UNet2DConditionModel

    from backend.engine.sd15 import SD15_CONFIG_DIR

    config = {**UNet2DConditionModel.load_config(SD15_CONFIG_DIR, subfolder="unet"), **overrides}
    with torch.device(device):
        return UNet2DConditionModel.from_config(config).eval().requires_grad_(False)
