"""The tiny test model has SD1.5's UNet layout, so the official settings run on it literally."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from backend.engine.attention import ReferenceAttnProcessor, reference_attention
from backend.engine.diffusion import UNetRunner, resolve_feature_block
from backend.engine.params import PRESETS
from backend.engine.random_tiny import build_tiny_pipeline

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


@pytest.fixture(scope="module")
def unet():
    return build_tiny_pipeline(seed=0).unet


@pytest.fixture(scope="module")
def sd15():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET)


def test_tiny_unet_has_sd15_blocks_and_attention_layers_under_the_same_names(unet, sd15):
    for key in ("down_block_types", "up_block_types"):
        assert tuple(unet.config[key]) == tuple(sd15.config[key])
    assert unet.config.layers_per_block == sd15.config.layers_per_block == 2
    assert list(unet.attn_processors) == list(sd15.attn_processors)  # 16 × (attn1, attn2)
    assert len(unet.attn_processors) == 32


def test_the_official_feature_block_is_up_blocks_2_at_full_latent_resolution(unet):
    defaults = PRESETS["dragdiffusion"]
    assert (defaults.feature_block, PRESETS["gooddrag"].feature_block) == (-1, -1)
    assert resolve_feature_block(unet, -1) == 2  # as both official codes' feature index 3
    seen = {}
    hook = unet.up_blocks[2].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    try:
        runner = UNetRunner(unet, torch.zeros(1, 77, 32))
        with torch.no_grad():
            _, feat = runner.eps_and_features(torch.zeros(1, 4, 8, 10), 681, grid=(16, 20))
    finally:
        hook.remove()
    assert seen["out"].shape[-2:] == (8, 10)  # up_blocks[2]'s output (after its upsampler)
    torch.testing.assert_close(feat, torch.nn.functional.interpolate(
        seen["out"], size=(16, 20), mode="bilinear", align_corners=False))


def test_reference_attention_from_layer_10_covers_exactly_up_blocks_2_and_3(unet):
    assert PRESETS["dragdiffusion"].ref_start_layer == PRESETS["gooddrag"].ref_start_layer == 10
    with reference_attention(unet, 10):
        replaced = sorted(name for name, proc in unet.attn_processors.items()
                          if isinstance(proc, ReferenceAttnProcessor))
    expected = sorted(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.processor"
                      for b in (2, 3) for a in range(3))
    assert replaced == expected  # transformer blocks 10–15, no rescaling of the index
    assert not any(isinstance(p, ReferenceAttnProcessor) for p in unet.attn_processors.values())
