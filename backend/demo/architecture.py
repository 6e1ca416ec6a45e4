"""The demo model's architecture: Stable Diffusion's component classes at a small size.

``AutoencoderKL`` (4× downsampling, 8 latent channels, no attention, so fully convolutional),
``UNet2DConditionModel`` shaped like SD1.5's (four levels, cross-attention on the two middle
levels, ``up_blocks[2]`` the first decoder block at full latent resolution: the feature block
both drag methods supervise) and the tiny CLIP text encoder of ``engine/random_tiny.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from backend.engine.random_tiny import build_text_encoder, write_tokenizer_files

LATENT_CHANNELS = 8

__all__ = ["build_text_encoder", "build_tokenizer", "build_unet", "build_vae", "encode_prompts"]


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        # 8 channels at 4× (6:1 compression of the pixels, SD's 4 at 8× is 48:1): the capacity
        # a ≥ 28 dB round trip on photographs needs; the UNet and engine take any count.
        latent_channels=LATENT_CHANNELS,
        # ≥ 4 channels per GroupNorm group: with fewer the output layers cannot carry the colour
        # of a flat region (it is normalised away).
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=0.18215,  # replaced by the measured value after the VAE stage
        mid_block_add_attention=False,
    )


@torch.no_grad()
def add_reference_channels(vae, level: float = 10.0) -> None:
    """Training-start initialisation: one large constant channel in every GroupNorm group that
    feeds the encoder's and the decoder's output layers, with that norm's scale set to undo it.

    A GroupNorm divides each group by its spread over the whole image, so a flat colour reaches
    the output only through the pattern across a group's channels, and early in training the
    reconstruction comes out grey. With a constant much larger than the signal in each group,
    the norm's statistics barely depend on the content and it passes levels through linearly
    (in a pilot with a smaller VAE: 3–4 dB better on a held-out photograph after 250–750
    steps). Only the initial values change; the architecture stays SD's.
    """
    for block, norm in ((vae.encoder.mid_block.resnets[-1], vae.encoder.conv_norm_out),
                        (vae.decoder.up_blocks[-1].resnets[-1], vae.decoder.conv_norm_out)):
        k = norm.num_channels // norm.num_groups
        ref = torch.arange(0, norm.num_channels, k)
        block.conv2.bias[ref] += level
        norm.weight.fill_(level * (k - 1) ** 0.5 / k)  # the group's spread due to the constant
        norm.weight[ref] = 0.0
        norm.bias.fill_(level / k + 3.0)  # undo the group mean; SiLU near its linear range
        norm.bias[ref] = 0.0


def build_unet():
    """SD1.5-shaped UNet; ``up_blocks[2]`` (128 channels) is the drag feature block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(64, 128, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        write_tokenizer_files(Path(tok_dir))
        return CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """SD-style prompt embedding: pad to 77 tokens, last hidden state."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0]
