"""A tiny Stable-Diffusion-architecture pipeline with random weights, for tests.

Same component classes and folder layout as SD1.5 (UNet2DConditionModel with SD1.5's block
layout and cross-attention, AutoencoderKL with an 8× downsampling, CLIP text encoder, a locally
written BPE tokenizer, the SD1.5 DDIM scheduler), so it loads through the same code path as a
real checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from backend.engine.checkpoint import save_single_file
from backend.engine.sd15 import SD15_SCHEDULER, bytes_to_unicode

# SD1.5's UNet layout with small channels: 4 down and 4 up blocks, cross-attention in the three
# highest-resolution stages, 2 layers per block, so 16 transformer blocks in the same order and
# under the same names as SD1.5's. The official settings (features of up_blocks[2], reference
# attention from transformer block 10) therefore run literally on it. Keep test latents small
# (a 64-px image is an 8×8 latent) rather than dropping attention anywhere.
TINY_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

# A few whole words get their own tokens so that short prompts tokenize compactly.
_WORDS = ["a", "the", "red", "green", "blue", "disc", "square", "triangle", "star", "photo", "of"]


def write_tokenizer_files(directory: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of a small CLIP-style BPE tokenizer."""
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
                if merged not in vocab_list:
                    vocab_list.append(merged)
            pieces = [merged, *pieces[2:]]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", "utf-8")


def build_text_encoder(tokenizer):
    """A 2-layer, 32-wide CLIP text encoder sized to ``tokenizer`` (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_tiny_pipeline(seed: int = 0, tmp_dir: Path | None = None):
    """Build the tiny pipeline in memory (random weights drawn from ``seed``)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.18215,
    )
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tok_dir:
        write_tokenizer_files(Path(tok_dir))
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = build_text_encoder(tokenizer)
    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_model(directory: str | Path, seed: int = 0, single_file: bool = False) -> Path:
    """Save the tiny pipeline as a diffusers folder (or also as one ``.safetensors`` file).

    Returns the path that ``load_model`` accepts: the folder, or the single file.
    """
    directory = Path(directory)
    pipe = build_tiny_pipeline(seed)
    pipe.save_pretrained(directory, safe_serialization=True)
    if not single_file:
        return directory
    return save_single_file(pipe, directory / "tiny-sd.safetensors")


# --- inpainting models (Inpaint4Drag) --------------------------------------------------------

# SDXL's layout with small channels, as diffusers' own SDXL-inpainting tests build it: two
# stages, linear attention projections, the "text_time" added embedding (pooled text of the
# second encoder + six size/crop ids of 8 dims each: 32 + 6·8 = 80), two 32-wide text encoders
# whose hidden states concatenate to the 64-wide cross-attention.
TINY_SDXL_UNET = dict(
    sample_size=32,
    in_channels=9,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=64,
    norm_num_groups=32,
)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=256,
        scaling_factor=0.18215)


def _tiny_tokenizer(tmp_dir: Path | None = None):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(dir=tmp_dir) as tok_dir:
        write_tokenizer_files(Path(tok_dir))
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer.model_max_length = 77  # the pipelines pad prompts to it (saved with the folder)
    return tokenizer


def build_tiny_inpaint_pipeline(layout: str = "sd15", seed: int = 0):
    """A tiny random inpainting pipeline of the SD1.5-inpainting (``sd15``: SD1.5's tiny layout
    with a 9-channel UNet) or SDXL-inpainting (``sdxl``) layout."""
    from diffusers import (
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    tokenizer = _tiny_tokenizer()
    if layout == "sd15":
        return StableDiffusionInpaintPipeline(
            vae=_tiny_vae(), text_encoder=build_text_encoder(tokenizer), tokenizer=tokenizer,
            unet=UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9}), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if layout != "sdxl":
        raise ValueError(f"unknown layout {layout!r}")
    tokenizer_2 = _tiny_tokenizer()
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77,
                            vocab_size=len(tokenizer_2), projection_dim=32,
                            bos_token_id=tokenizer_2.bos_token_id,
                            eos_token_id=tokenizer_2.eos_token_id,
                            pad_token_id=tokenizer_2.pad_token_id)
    return StableDiffusionXLInpaintPipeline(
        vae=_tiny_vae(), text_encoder=build_text_encoder(tokenizer), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**TINY_SDXL_UNET), scheduler=scheduler,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)


def make_tiny_inpaint_model(directory: str | Path, layout: str = "sd15", seed: int = 0,
                            single_file: bool = False) -> Path:
    """Save a tiny inpainting pipeline as a diffusers folder (and, for ``sd15``, also as one
    original-layout ``.safetensors``). Returns what ``load_inpaint_model`` accepts."""
    directory = Path(directory)
    pipe = build_tiny_inpaint_pipeline(layout, seed)
    pipe.save_pretrained(directory, safe_serialization=True)
    if not single_file:
        return directory
    if layout != "sd15":
        raise ValueError("single files are written for the sd15 layout only")
    return save_single_file(pipe, directory / "tiny-sd-inpainting.safetensors")


def make_tiny_lcm_lora(directory: str | Path, layout: str = "sd15", seed: int = 0,
                       rank: int = 4) -> Path:
    """A random LoRA on the attention projections of a tiny inpainting UNet (``layout``),
    saved as diffusers saves an LCM-LoRA (``pytorch_lora_weights.safetensors``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = build_tiny_inpaint_pipeline(layout, seed)
    torch.manual_seed(seed + 1)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = get_peft_model_state_dict(pipe.unet)
    saver = StableDiffusionXLPipeline if layout == "sdxl" else StableDiffusionPipeline
    saver.save_lora_weights(str(directory), unet_lora_layers=layers, safe_serialization=True)
    return Path(directory)


def make_tiny_taesd(directory: str | Path, seed: int = 0) -> Path:
    """A tiny random ``AutoencoderTiny`` (TAESD's architecture: 8× down, 4 latent channels)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=(16, 16, 16, 16),
                          decoder_block_out_channels=(16, 16, 16, 16),
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    vae.save_pretrained(directory, safe_serialization=True)
    return Path(directory)
