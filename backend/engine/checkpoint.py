"""Writing a pipeline as one original-layout Stable Diffusion checkpoint (``.safetensors``).

The inverse of diffusers' single-file conversion, for tests and ``make-tiny-model``: the keys
follow the original checkpoints so the file loads through the same single-file path as a
downloaded SD1.5 checkpoint, and the diffusers configs ride along in the metadata.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from backend.engine.errors import EngineError

# safetensors metadata key under which ``save_single_file`` stores the diffusers configs.
CONFIG_METADATA_KEY = "gimp_drag_diffusion.diffusers_config"


_UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)
_VAE_ATTENTION_RENAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _unet_prefixes(config) -> dict[str, tuple[str, bool]]:
    """diffusers prefix → (original LDM prefix, is a resnet) for an SD-style UNet."""
    n = config.layers_per_block + 1
    table: dict[str, tuple[str, bool]] = {
        "time_embedding.linear_1.": ("time_embed.0.", False),
        "time_embedding.linear_2.": ("time_embed.2.", False),
        "conv_in.": ("input_blocks.0.0.", False),
        "conv_norm_out.": ("out.0.", False),
        "conv_out.": ("out.2.", False),
        "mid_block.resnets.0.": ("middle_block.0.", True),
        "mid_block.attentions.0.": ("middle_block.1.", False),
        "mid_block.resnets.1.": ("middle_block.2.", True),
    }
    for i in range(len(config.down_block_types)):
        for j in range(config.layers_per_block):
            table[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{n * i + j + 1}.0.", True)
            table[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{n * i + j + 1}.1.", False)
        table[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{n * (i + 1)}.0.op.", False)
    for i, kind in enumerate(config.up_block_types):
        for j in range(n):
            table[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{n * i + j}.0.", True)
            table[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{n * i + j}.1.", False)
        upsampler = 2 if "CrossAttn" in kind else 1
        table[f"up_blocks.{i}.upsamplers.0.conv."] = (f"output_blocks.{n * i + n - 1}.{upsampler}.conv.", False)
    return table


def _vae_prefixes(config) -> dict[str, tuple[str, str]]:
    """diffusers prefix → (original LDM prefix, kind) for an SD-style AutoencoderKL."""
    blocks = len(config.block_out_channels)
    table: dict[str, tuple[str, str]] = {}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", "plain")
        table[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", "resnet")
        table[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", "resnet")
        table[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", "attention")
    for i in range(blocks):
        for j in range(config.layers_per_block):
            table[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", "resnet")
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", "plain")
        k = blocks - 1 - i
        for j in range(config.layers_per_block + 1):
            table[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{k}.block.{j}.", "resnet")
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{k}.upsample.conv.", "plain")
    return table


def _match_prefix(key: str, table: dict[str, Any]) -> tuple[str, Any] | None:
    parts = key.split(".")
    for length in range(min(len(parts) - 1, 6), 0, -1):
        prefix = ".".join(parts[:length]) + "."
        if prefix in table:
            return prefix, table[prefix]
    return None


def _unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    table = _unet_prefixes(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        match = _match_prefix(key, table)
        if match is None:
            raise EngineError(f"cannot write UNet weight {key} in the original SD layout")
        prefix, (ldm_prefix, is_resnet) = match
        rest = key[len(prefix):]
        if is_resnet:
            for old, new in _UNET_RESNET_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
        out["model.diffusion_model." + ldm_prefix + rest] = value
    return out


def _vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    table = _vae_prefixes(vae.config)
    out = {}
    for key, value in vae.state_dict().items():
        match = _match_prefix(key, table)
        if match is None:  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
            out["first_stage_model." + key] = value
            continue
        prefix, (ldm_prefix, kind) = match
        rest = key[len(prefix):]
        if kind == "resnet":
            rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        elif kind == "attention":
            for old, new in _VAE_ATTENTION_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            if value.ndim == 2:  # the original uses 1×1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + ldm_prefix + rest] = value
    return out


def _text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    prefix = "cond_stage_model.transformer."
    return {
        prefix + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in text_encoder.state_dict().items()
    }


def _configs_metadata(pipe) -> str:
    """The pipeline's diffusers configs (and tokenizer files) as one JSON string."""
    files = {
        "unet/config.json": pipe.unet.to_json_string(),
        "vae/config.json": pipe.vae.to_json_string(),
        "text_encoder/config.json": pipe.text_encoder.config.to_json_string(),
        "scheduler/scheduler_config.json": pipe.scheduler.to_json_string(),
    }
    with tempfile.TemporaryDirectory(prefix="sd-tokenizer-") as tmp:
        pipe.tokenizer.save_pretrained(tmp)
        for item in sorted(Path(tmp).iterdir()):
            files[f"tokenizer/{item.name}"] = item.read_text("utf-8")
    return json.dumps(files)


def save_single_file(pipe, path: str | os.PathLike) -> Path:
    """Write ``pipe``'s UNet, VAE and text encoder as one original-layout ``.safetensors``.

    Keys follow the original Stable Diffusion checkpoints (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.transformer.*``), so the file loads through the
    same single-file path as a downloaded SD1.5 checkpoint. The diffusers configs are embedded
    in the metadata, which lets ``load_model`` rebuild a non-SD1.5-sized architecture (such as
    the tiny test model) offline.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        **_unet_to_ldm(pipe.unet),
        **_vae_to_ldm(pipe.vae),
        **_text_encoder_to_ldm(pipe.text_encoder),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: _configs_metadata(pipe)})
    return path
