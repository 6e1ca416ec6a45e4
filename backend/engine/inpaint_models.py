"""Loading an inpainting model for Inpaint4Drag, and the filler that runs it.

Any diffusers inpainting checkpoint with a 9-channel UNet (latent, mask, masked-image latent):
the SD1.5-inpainting family or SDXL-inpainting, as

1. a diffusers folder (``model_index.json``; the pipeline class in it picks the layout);
2. a Hugging Face id, from the local cache (loading never downloads: see ``models._from_cache``);
3. a single ``.safetensors`` file of the SD1.5-inpainting layout (architecture from its
   embedded configs, else the shipped SD1.5 configs with a 9-channel UNet).

Optionally an LCM-LoRA fused into the UNet (a folder, file or id that
``load_lora_weights`` reads) and a tiny autoencoder (``AutoencoderTiny``, e.g. TAESD) in place of
the VAE. Then, as the official ``setup_pipeline``: ``LCMScheduler`` from the model's scheduler
config, the empty prompt's embeddings computed once, no safety checker, guidance 1 (no
classifier-free guidance), 8 steps, strength 1.0 (0.99 for SDXL, this model's default). Unlike
the official code the text encoders are freed once the empty prompt is encoded (nothing else is
ever encoded): 0.25 GB less for SD1.5, 1.6 GB for SDXL, in fp16.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.engine.devices import OOM_ADVICE, Precision, is_oom, resolve_precision
from backend.engine.errors import EngineError, ModelNotFound, OutOfMemory
from backend.engine.fillers import FillRequest, PreviewFn, StepFn
from backend.engine.work import WorkCounter, inpaint_passes

SDXL_STRENGTH = 0.99  # the official strength for the SDXL inpainting model
_PIPELINES = {"sd15": "StableDiffusionInpaintPipeline",
              "sdxl": "StableDiffusionXLInpaintPipeline"}
_FILES = ["model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*",
          "text_encoder/config.json", "text_encoder/*.safetensors",
          "text_encoder_2/config.json", "text_encoder_2/*.safetensors",
          "unet/config.json", "unet/*.safetensors", "vae/config.json", "vae/*.safetensors"]


@dataclass(eq=False)
class InpaintModel:
    """A loaded inpainting pipeline and what the engine needs to know about it."""

    name: str
    source: str
    layout: str  # "sd15" or "sdxl"
    pipe: Any
    device: torch.device
    precision: Precision
    lcm_lora: str | None = None
    tiny_vae: str | None = None
    prompt_embeds: dict[str, torch.Tensor] = field(default_factory=dict)
    # The model's own knob defaults (as a folder's preset.json for plain models).
    preset: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def describe(self) -> str:
        extras = [part for part in (f"LCM-LoRA {self.lcm_lora}" if self.lcm_lora else "",
                                    f"tiny VAE {self.tiny_vae}" if self.tiny_vae else "")
                  if part]
        kind = "SDXL inpainting" if self.layout == "sdxl" else "SD1.5 inpainting"
        return f"{self.name} ({kind}{', ' if extras else ''}{', '.join(extras)})"


def _locate(name: str) -> tuple[str, Path]:
    """("folder" | "file", path) of a local folder/file or a Hugging Face id."""
    from backend.engine import models

    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() in models.CHECKPOINT_SUFFIXES:
        return "file", path
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "folder", path
        raise ModelNotFound(f"the folder {path} is not a diffusers inpainting model (it has no "
                            "model_index.json); pass its folder, a .safetensors file or a "
                            "Hugging Face id such as stable-diffusion-v1-5/stable-diffusion-"
                            "inpainting")
    if models._looks_like_path(name):
        raise ModelNotFound(f"the inpainting model {name} was not found: no such folder or "
                            "file")
    return "folder", models._from_cache(name, "inpainting model", patterns=_FILES)


def layout_of(folder: Path) -> str:
    """"sdxl" or "sd15" from the folder's pipeline class (or its UNet's config)."""
    index = json.loads((folder / "model_index.json").read_text("utf-8"))
    if index.get("_class_name") == _PIPELINES["sdxl"] or "text_encoder_2" in index:
        return "sdxl"
    return "sd15"


def _pipeline_class(layout: str):
    import diffusers

    return getattr(diffusers, _PIPELINES[layout])


def _check_nine_channels(pipe, source: str) -> None:
    channels = pipe.unet.config.in_channels
    if channels != 9:
        raise EngineError(
            f"{source} is not an inpainting model: its UNet takes {channels} channels, an "
            "inpainting UNet takes 9 (latent, mask and masked image); use e.g. "
            "stable-diffusion-v1-5/stable-diffusion-inpainting, or leave --inpaint-model out to "
            "fill with the plain model")


def _load_pipeline(kind: str, path: Path, dtype: torch.dtype):
    from backend.engine import models

    if kind == "folder":
        layout = layout_of(path)
        no_checker = {"safety_checker": None, "feature_extractor": None,
                      "requires_safety_checker": False}
        pipe = _pipeline_class(layout).from_pretrained(
            path, torch_dtype=dtype, local_files_only=True, variant=models._variant(path / "unet"),
            **(no_checker if layout == "sd15" else {}))
        return layout, pipe
    from diffusers import StableDiffusionInpaintPipeline

    state_dict, metadata = models.read_checkpoint(path)
    with models._config_dir(metadata, None) as cfg:
        parts = models._load_single_file_parts(state_dict, cfg, dtype, path, in_channels=9)
    pipe = StableDiffusionInpaintPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        unet=parts["unet"], scheduler=parts["scheduler"], safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    return "sd15", pipe


def load_inpaint_model(model: str | os.PathLike, *, lcm_lora: str | None = None,
                       tiny_vae: str | None = None, device: str | None = None,
                       dtype: str | None = None) -> InpaintModel:
    """Load an inpainting model (see the module docstring). Raises ``ModelNotFound``,
    ``EngineError`` (not an inpainting model, unreadable LoRA or VAE) or ``OutOfMemory``."""
    from diffusers import AutoencoderTiny, LCMScheduler

    dev, precision = resolve_precision(device, dtype)
    try:
        kind, path = _locate(str(model))
        try:
            layout, pipe = _load_pipeline(kind, path, precision.weights)
        except EngineError:
            raise
        except Exception as exc:
            if is_oom(exc):
                raise
            raise EngineError(f"could not load an inpainting model from {path} "
                              f"({_first_line(exc)}); check that it is a complete diffusers "
                              "inpainting model") from exc
        _check_nine_channels(pipe, str(model))
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        if lcm_lora:
            _fuse_lora(pipe, lcm_lora)
        if tiny_vae:
            vae_path = _locate_vae(tiny_vae)
            pipe.vae = AutoencoderTiny.from_pretrained(vae_path, torch_dtype=precision.weights,
                                                       local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(dev)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder,
                       getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False).eval()
        loaded = InpaintModel(name=str(model), source=str(path), layout=layout, pipe=pipe,
                              device=dev, precision=precision, lcm_lora=lcm_lora,
                              tiny_vae=tiny_vae)
        if layout == "sdxl":
            loaded.preset = {"params": {"inpaint_strength": SDXL_STRENGTH}}
        loaded.prompt_embeds = empty_prompt_embeds(loaded)
        drop_text_encoders(pipe)
    except Exception as exc:
        if is_oom(exc):
            raise OutOfMemory(f"not enough memory to load {model}: {OOM_ADVICE}") from exc
        raise
    return loaded


def drop_text_encoders(pipe) -> None:
    """Free the text encoders once the empty prompt is encoded: every edit reuses its
    embeddings (SDXL's two encoders hold 817 M parameters, 1.6 GB in fp16)."""
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _fuse_lora(pipe, lora: str) -> None:
    """Load a LoRA (e.g. LCM-LoRA: a file, a folder or a Hugging Face id, found as models
    are) into the pipeline and fuse it into the weights."""
    from backend.engine import models

    path = Path(lora).expanduser()
    if not path.exists():
        if models._looks_like_path(lora):
            raise ModelNotFound(f"the LoRA {lora} was not found: no such folder or file")
        path = models._from_cache(lora, "LoRA", patterns=["*.safetensors", "*.json"])
    try:
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        else:
            pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    except Exception as exc:
        raise EngineError(f"could not load the LoRA {lora} ({_first_line(exc)}); pass an "
                          "LCM-LoRA folder, .safetensors file or Hugging Face id made for this "
                          "model family (latent-consistency/lcm-lora-sdv1-5 or -sdxl)") from exc


def _locate_vae(name: str) -> Path:
    """The folder of a tiny autoencoder: local, or a Hugging Face id."""
    from backend.engine import models

    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists() or models._looks_like_path(name):
        raise ModelNotFound(f"the tiny VAE {name} is not a diffusers AutoencoderTiny folder "
                            "(with config.json); pass e.g. madebyollin/taesd")
    return models._from_cache(name, "tiny VAE", patterns=["config.json", "*.safetensors"])


def empty_prompt_embeds(model: InpaintModel) -> dict[str, torch.Tensor]:
    """The empty prompt's embeddings, computed once (the official caches them at setup)."""
    pipe = model.pipe
    with torch.no_grad():
        out = pipe.encode_prompt("", device=model.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    if model.layout == "sdxl":
        return {"prompt_embeds": out[0], "pooled_prompt_embeds": out[2]}
    return {"prompt_embeds": out[0]}


class InpaintModelFiller:
    """Runs the inpainting pipeline on the crop (guidance 1, LCM steps, strength), one UNet pass
    per step counted as one forward-equivalent."""

    def __init__(self, model: InpaintModel) -> None:
        self.model = model
        self.name = model.describe()

    @torch.no_grad()
    def fill(self, request: FillRequest, work: WorkCounter, step: StepFn,
             preview: PreviewFn | None) -> np.ndarray:
        model = self.model
        height, width = request.pixels.shape[-2:]
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        image = ((request.pixels + 1) / 2).clamp(0, 1)

        total = inpaint_passes(request.steps, request.strength)

        def on_step(pipe, i: int, t, tensors: dict) -> dict:
            work.forward(1, phase="denoise")
            if preview is not None:
                preview(i, tensors["latents"])
            if i + 1 < total:
                step(i + 1, total)
            return tensors

        step(0, total)
        out = model.pipe(
            image=image.to(model.device), mask_image=request.hole.to(model.device),
            height=height, width=width, guidance_scale=1.0,
            num_inference_steps=request.steps, strength=request.strength,
            generator=generator, output_type="np", callback_on_step_end=on_step,
            **model.prompt_embeds)
        return np.asarray(out.images[0], np.float32)
