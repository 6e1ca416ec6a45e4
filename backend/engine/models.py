"""Loading Stable Diffusion 1.5-family checkpoints.

``load_model`` accepts, in this order:

1. a diffusers folder (one with ``model_index.json``);
2. a single-file checkpoint (``.safetensors``, or ``.ckpt``/``.pt``/``.pth``/``.bin`` read with
   torch's weights-only loader, so nothing but tensors is ever unpickled). Its architecture comes
   from the configs embedded by ``save_single_file``, else from ``config=<diffusers folder>``,
   else from the SD1.5 configs shipped in ``configs/sd15`` (no network needed);
3. a Hugging Face id, taken from the local Hugging Face cache. Loading never downloads: the
   catalogue's sets come through ``backend/hub`` (the dialog's Download, ``python -m backend
   models get``), other repositories through ``hf download`` (the error gives the line).

Weights use the dtype of the precision ``devices.resolve_precision`` picks (fp16 on CUDA,
including the VAE: SD1.5's VAE decodes fine in fp16). No safety checker and no classifier-free
guidance are loaded.

(Near 500 lines: one loader for four kinds of source, each with its own actionable errors.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backend.engine.checkpoint import CONFIG_METADATA_KEY
from backend.engine.devices import (
    OOM_ADVICE,
    Precision,
    is_oom,
    precision_for_weights,
    resolve_precision,
)
from backend.engine.errors import EngineError, ModelNotFound, OutOfMemory
from backend.engine.memory import MemoryHints, initial_hints
from backend.engine.sd15 import SD15_CONFIG_DIR, NotEpsilonModel, ddim_scheduler, sd15_tokenizer
from backend.engine.types import ProgressFn

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

_MODEL_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
_VAE_FILES = [
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


@dataclass(eq=False)
class LoadedModel:
    """The SD1.5 components the drag engine uses, on one device, weights in one dtype.

    ``precision`` says how it computes (``devices.PRECISIONS``); by default the one its weights'
    dtype implies (fp16 weights → fp16 autocast, fp32 → no autocast).
    """

    name: str
    source: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    precision: Precision | None = None
    memory: MemoryHints | None = None  # what fits in the device's memory (``engine.memory``)
    # The model folder's own ``preset.json`` (see ``read_preset``); empty for other models.
    preset: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision is None:
            self.precision = precision_for_weights(self.dtype)
        if self.memory is None:
            self.memory = initial_hints(self.device)

    def cast(self, precision: Precision) -> None:
        """Switch to ``precision``, casting the weights in place (fp32 → fp16 loses bits)."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(dtype=precision.weights)
        self.dtype, self.precision = precision.weights, precision

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """CLIP's last hidden state for ``prompt``, shape [1, 77, D] (no negative prompt)."""
        length = self.text_encoder.config.max_position_embeddings
        ids = self.tokenizer(
            prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]


# ---------------------------------------------------------------------------------------------
# Entry point


def load_model(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    vae: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | None = None,
    config: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
) -> LoadedModel:
    """Load an SD1.5-family model (see the module docstring for what ``model`` may be).

    ``vae`` replaces the model's VAE (a folder, single file or Hugging Face id such as
    ``stabilityai/sd-vae-ft-mse``). ``config`` is a diffusers folder describing the architecture
    of a single-file checkpoint that is not SD1.5-shaped. Raises ``ModelNotFound`` (one sentence
    saying what was tried and how to fix it), ``EngineError`` for an unreadable checkpoint,
    ``InvalidInput`` for a bad device/dtype and ``OutOfMemory``.
    """
    dev, precision = resolve_precision(device, dtype)
    dt = precision.weights
    report = progress or (lambda phase, step, total: None)
    report("load", 0, 3)
    try:
        kind, path = locate(str(model), what="model")
        if kind == "file":
            parts = _load_single_file(path, dt, config)
        else:
            parts = _load_folder(path, dt)
        report("load", 1, 3)
        fingerprint_files = parts.pop("files")
        if vae is not None:
            vae_kind, vae_path = locate(str(vae), what="VAE")
            parts["vae"], vae_files = _load_vae(vae_kind, vae_path, dt, config)
            fingerprint_files += [(f"vae override {label}", f) for label, f in vae_files]
        report("load", 2, 3)
        loaded = LoadedModel(
            name=str(model),
            source=str(path) + (f" + VAE {vae}" if vae is not None else ""),
            device=dev,
            dtype=dt,
            fingerprint=_fingerprint(fingerprint_files),
            precision=precision,
            **parts,
        )
        _check_compatible(loaded)
        for module in (loaded.unet, loaded.vae, loaded.text_encoder):
            module.requires_grad_(False)
            module.eval()
            module.to(dev)
    except Exception as exc:
        if is_oom(exc):
            raise OutOfMemory(f"not enough memory to load {model}: {OOM_ADVICE}") from exc
        raise
    report("load", 3, 3)
    return loaded


# ---------------------------------------------------------------------------------------------
# Finding the model


# What a missing model is called in messages → the serve option that takes it and an example.
_HINTS = {
    "model": ("--model", DEFAULT_MODEL),
    "VAE": ("--vae", "stabilityai/sd-vae-ft-mse"),
    "inpainting model": ("--inpaint-model", "stable-diffusion-v1-5/stable-diffusion-inpainting"),
    "LoRA": ("--lcm-lora", "latent-consistency/lcm-lora-sdv1-5"),
    "tiny VAE": ("--tiny-vae", "madebyollin/taesd"),
}


def download_command(repo_id: str = DEFAULT_MODEL, what: str = "model",
                     patterns: list[str] | None = None) -> str:
    """The shell command that puts into the Hugging Face cache just the files the engine loads
    (``patterns``; by default a plain model's or a VAE's).
    ``hf`` is huggingface_hub's command line (this project's venv has it: ``.venv/bin/hf``)."""
    patterns = patterns or (_MODEL_FILES if what == "model" else _VAE_FILES)
    return f"hf download {repo_id} " + " ".join(f'--include "{p}"' for p in patterns)


def _fix_hint(what: str, repo_id: str | None = None, patterns: list[str] | None = None) -> str:
    """How to give or get a missing model: its option with a path, or the ``hf download``
    line for ``repo_id`` (by default the option's example)."""
    flag, example = _HINTS.get(what, _HINTS["VAE"])
    return (
        f"pass {flag} /path/to/a-diffusers-folder-or-file.safetensors, or put it into the "
        f"Hugging Face cache first: `{download_command(repo_id or example, what, patterns)}` "
        "(hf: huggingface_hub's command line, in this project's .venv/bin)"
    )


def _looks_like_path(name: str) -> bool:
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(CHECKPOINT_SUFFIXES)
    )


def locate(name: str, what: str = "model") -> tuple[str, Path]:
    """Return ("folder" | "file", path) for a local path or a Hugging Face id in the local
    cache, without reading any weights; else ``ModelNotFound`` says what was tried and how to
    fix it. Nothing is downloaded here (see ``_from_cache``)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file() or (what == "VAE" and (path / "config.json").is_file()):
            return "folder", path
        raise ModelNotFound(
            f"the folder {path} is not a diffusers {what} (it has no "
            f"{'model_index.json' if what == 'model' else 'config.json'})", _fix_hint(what)
        )
    if path.is_file():
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            return "file", path
        raise ModelNotFound(
            f"{path} is not a checkpoint (expected a diffusers folder or a "
            f"{'/'.join(CHECKPOINT_SUFFIXES)} file)", _fix_hint(what)
        )
    if _looks_like_path(name):
        raise ModelNotFound(f"the {what} {name} was not found: no such folder or file", _fix_hint(what))
    return "folder", _from_cache(name, what)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _from_cache(repo_id: str, what: str, patterns: list[str] | None = None) -> Path:
    """The snapshot folder of a Hugging Face repository in the local cache.

    Loading never downloads: the catalogue's sets come through ``backend/hub`` (the dialog's
    Download, ``python -m backend models get``: its file choice, progress, Cancel, resume and
    checksums), any other repository through ``hf download`` (the hint gives the line, with the
    files the engine loads: ``patterns``, by default a plain model's or a VAE's)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except HFValidationError:
        raise ModelNotFound(
            f"the {what} {repo_id!r} is neither an existing folder or file nor a valid "
            "Hugging Face id", _fix_hint(what, None, patterns)
        ) from None
    except Exception:
        pass
    raise ModelNotFound(
        f"the {what} {repo_id!r} is not here: not a folder or file, and not in the Hugging "
        f"Face cache at {constants.HF_HUB_CACHE} (the backend never downloads while loading)",
        _fix_hint(what, repo_id, patterns),
    )


# ---------------------------------------------------------------------------------------------
# Diffusers folders


def _variant(folder: Path) -> str | None:
    """``"fp16"`` when a component folder only has fp16-variant weights (common in HF caches)."""
    names = [p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin")]
    if names and all(".fp16." in n for n in names):
        return "fp16"
    return None


def _weight_files(folder: Path, component: str) -> list[tuple[str, Path]]:
    """(label, path) of a component folder's weight files, for the fingerprint."""
    files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
    return [(f"{component}/{p.name}", p) for p in files]


PRESET_FILE = "preset.json"


def read_preset(folder: Path) -> dict[str, Any]:
    """A model folder's own drag preset, ``preset.json``: ``{"params": {knob: value},
    "latent_to_rgb": [[r, g, b] per latent channel]}`` (both optional). ``params`` become that
    model's defaults for every method (a request's own values still win); ``latent_to_rgb``
    replaces SD1.5's preview map. Models without the file behave as before."""
    file = folder / PRESET_FILE
    if not file.is_file():
        return {}
    try:
        preset = json.loads(file.read_text("utf-8"))
        if not isinstance(preset, dict) or not isinstance(preset.get("params", {}), dict):
            raise ValueError("expected an object with a 'params' object")
    except ValueError as exc:
        raise EngineError(f"the model's {file} is not a valid preset ({_first_line(exc)}); "
                          "fix or delete it") from None
    return preset


def _load_folder(path: Path, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    try:
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", torch_dtype=dtype, local_files_only=True,
            variant=_variant(path / "unet"),
        )
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", torch_dtype=dtype, local_files_only=True,
            variant=_variant(path / "vae"),
        )
        text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=dtype, local_files_only=True,
            variant=_variant(path / "text_encoder"),
        )
        tokenizer = _load_tokenizer(path)
    except Exception as exc:
        raise _load_error(exc, path) from exc
    files = [f for sub in ("unet", "vae", "text_encoder") for f in _weight_files(path / sub, sub)]
    preset = read_preset(path)
    if preset:
        files.append((PRESET_FILE, path / PRESET_FILE))
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=_ddim_scheduler(path),
        files=files,
        preset=preset,
    )


def _load_error(exc: Exception, path: Path) -> Exception:
    if is_oom(exc) or isinstance(exc, EngineError):
        return exc
    reason = _first_line(exc)
    return EngineError(
        f"could not load a Stable Diffusion 1.5 model from {path} ({reason}); check that it is "
        "a complete SD1.5-family model (re-download it if a file is damaged)"
    )


def _ddim_scheduler(config_dir: Path | None):
    """SD1.5's DDIM scheduler for this checkpoint; refuses a non-ε-prediction model."""
    try:
        return ddim_scheduler(config_dir)
    except NotEpsilonModel as exc:
        raise EngineError(
            f"this model predicts {exc.args[0]!r}, but drag editing needs an "
            "epsilon-prediction Stable Diffusion 1.5 model"
        ) from None


def _load_tokenizer(config_dir: Path):
    """The folder's CLIP tokenizer, or SD1.5's (rebuilt from the shipped merges) if it has none."""
    from transformers import CLIPTokenizer

    folder = config_dir / "tokenizer"
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(config_dir, subfolder="tokenizer", local_files_only=True)
    return sd15_tokenizer()


# ---------------------------------------------------------------------------------------------
# Single files


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a single-file checkpoint, loading nothing but tensors."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118
        except Exception as exc:
            raise EngineError(
                f"{path} is not a readable .safetensors file ({exc}); it may be damaged or "
                "incompletely downloaded: download it again"
            ) from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise EngineError(
            f"refusing to load {path}: it contains Python objects besides tensors, and only "
            "weights-only checkpoints are read for safety; use a .safetensors version of this "
            "model instead"
        ) from exc
    except Exception as exc:
        raise EngineError(
            f"{path} is not a readable PyTorch checkpoint ({exc}); it may be damaged: download "
            "it again, or use a .safetensors version"
        ) from exc
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise EngineError(f"{path} does not hold a state dict of model weights")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}


@contextmanager
def _config_dir(metadata: dict[str, str], config: str | os.PathLike | None) -> Iterator[Path]:
    """Where the architecture configs of a single file come from (see the module docstring)."""
    if config is not None:
        path = Path(config).expanduser()
        if not (path / "unet" / "config.json").is_file():
            raise ModelNotFound(
                f"the config folder {path} has no unet/config.json; pass a diffusers model folder"
            )
        yield path
    elif CONFIG_METADATA_KEY in metadata:
        with tempfile.TemporaryDirectory(prefix="sd-config-") as tmp:
            for rel, text in json.loads(metadata[CONFIG_METADATA_KEY]).items():
                target = Path(tmp, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, "utf-8")
            yield Path(tmp)
    else:
        yield SD15_CONFIG_DIR


def _load_single_file(
    path: Path, dtype: torch.dtype, config: str | os.PathLike | None
) -> dict[str, Any]:
    state_dict, metadata = read_checkpoint(path)
    with _config_dir(metadata, config) as cfg:
        parts = _load_single_file_parts(state_dict, cfg, dtype, path)
    return {**parts, "files": [("single file", path)]}


def _load_single_file_parts(state_dict: dict[str, torch.Tensor], cfg: Path,
                            dtype: torch.dtype, path: Path,
                            in_channels: int | None = None) -> dict[str, Any]:
    """UNet, VAE, text encoder, tokenizer and DDIM scheduler of an original-layout SD1.5
    checkpoint, the architecture from ``cfg`` (``in_channels`` overrides the UNet's: 9 for an
    inpainting checkpoint)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    unet_overrides = {} if in_channels is None else {"in_channels": in_channels}
    try:
        unet = UNet2DConditionModel.from_single_file(
            state_dict, config=str(cfg), subfolder="unet", torch_dtype=dtype,
            local_files_only=True, **unet_overrides,
        )
        vae = AutoencoderKL.from_single_file(
            state_dict, config=str(cfg), subfolder="vae", torch_dtype=dtype,
            local_files_only=True,
        )
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state_dict, config=str(cfg), subfolder="text_encoder",
            torch_dtype=dtype, local_files_only=True,
        )
        tokenizer = _load_tokenizer(cfg)
        scheduler = _ddim_scheduler(cfg)
    except Exception as exc:
        if is_oom(exc) or isinstance(exc, EngineError):
            raise
        raise _single_file_error(path, exc) from exc
    for name, module in (("UNet", unet), ("VAE", vae), ("text encoder", text_encoder)):
        _check_complete(module, name, path)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler)


def _single_file_error(path: Path, exc: Exception) -> EngineError:
    reason = _first_line(exc)
    return EngineError(
        f"could not load {path.name} as a Stable Diffusion 1.5 checkpoint ({reason[:300]}); "
        "it may be another model family (SD2, SDXL, an inpainting model) or damaged"
    )


def _check_complete(module: torch.nn.Module, name: str, path: Path) -> None:
    """Weights the file lacked stay on the meta device; refuse such a half-loaded model."""
    missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if missing:
        raise EngineError(
            f"{path.name} has no weights for part of the {name} (e.g. {missing[0]}); it is not a "
            "complete Stable Diffusion 1.5 checkpoint"
        )


def _load_vae(kind: str, path: Path, dtype: torch.dtype, config: str | os.PathLike | None):
    """A replacement VAE: a diffusers VAE or model folder, or a single file."""
    from diffusers import AutoencoderKL

    if kind == "folder":
        sub = "vae" if (path / "model_index.json").is_file() else None
        folder = path / sub if sub else path
        try:
            vae = AutoencoderKL.from_pretrained(
                path, subfolder=sub, torch_dtype=dtype, local_files_only=True,
                variant=_variant(folder),
            )
        except Exception as exc:
            raise _load_error(exc, path) from exc
        return vae, _weight_files(folder, "vae")
    state_dict, metadata = read_checkpoint(path)
    with _config_dir(metadata, config) as cfg:
        try:
            vae = AutoencoderKL.from_single_file(
                state_dict, config=str(cfg), subfolder="vae", torch_dtype=dtype,
                local_files_only=True,
            )
        except Exception as exc:
            if is_oom(exc):
                raise
            raise _single_file_error(path, exc) from exc
    _check_complete(vae, "VAE", path)
    return vae, [("single file", path)]


def _check_compatible(model: LoadedModel) -> None:
    unet = model.unet.config
    latent = model.vae.config.latent_channels
    if unet.in_channels != latent or unet.out_channels != latent:
        raise EngineError(
            f"{model.name} is not a plain text-to-image SD1.5 model (UNet input has "
            f"{unet.in_channels} channels, its VAE's latent {latent}, e.g. an inpainting model); "
            "use a standard SD1.5 model"
        )
    if unet.cross_attention_dim != model.text_encoder.config.hidden_size:
        raise EngineError(
            f"{model.name} does not fit together: the UNet expects {unet.cross_attention_dim}-wide "
            f"text features but the text encoder gives {model.text_encoder.config.hidden_size}; "
            "is it an SD1.5-family model?"
        )


# ---------------------------------------------------------------------------------------------
# Fingerprint


def _fingerprint(files: list[tuple[str, Path]]) -> str:
    """A short stable hash of the weights: each file's size plus 64 KiB samples of its bytes.

    Reads about 0.6 MB per file, so it is instant even for multi-GB checkpoints, and it follows
    the content (a moved or copied file keeps its fingerprint; a different fine-tune changes it).
    """
    digest = hashlib.sha256()
    block, samples = 1 << 16, 9
    for label, path in files:
        size = path.stat().st_size
        digest.update(f"{label}:{size};".encode())
        with open(path, "rb") as f:
            for i in range(samples):
                f.seek(max(0, (size - block) * i // (samples - 1)))
                digest.update(f.read(block))
    return digest.hexdigest()[:16]
