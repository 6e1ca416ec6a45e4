"""Identity-preserving LoRA (DragDiffusion and GoodDrag ``utils/lora_utils.py``), with a disk cache.

Before dragging, both methods fine-tune a rank-16 LoRA on the UNet's attention projections
(``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every attention, self and cross) so that the model
reconstructs the input image: ε-prediction MSE at t ~ U{0..999}, AdamW (lr 5e-4, betas
0.9/0.999, weight decay 1e-2, eps 1e-8, constant), batch 4, conditioned on the user's prompt.

Training data, per method:

* DragDiffusion: every step, every batch item takes a fresh random square crop of the working
  image and VAE-encodes it (``latent_dist.sample()``). The reference first resizes the short side
  to 512 and then crops 512×512; our working image already has its final scale (width =
  ``work_size``), so we crop a square of the short side at that scale. For square and portrait
  images (short side = width = 512) the two are identical. The VAE encoder is
  deterministic, so each crop position is encoded once and only the posterior sample is redrawn.
* GoodDrag: ``batch`` crops are drawn once and encoded once; each step redraws only the sample.

Training uses a peft adapter inside the attention ``Linear`` layers. For the edit itself the
trained weights are merged into those layers (``lora_merge.MergedLora``), so any attention
processor that calls ``attn.to_q(...)`` includes them at no extra cost per forward, and they stay
merged between edits with the same LoRA key. ``prepare_lora`` does one edit's worth: train (or
load from the cache) and merge; ``MergedLora.restore`` puts the exact base weights back.

(Near 470 lines: training, its cache key and the cache are one unit; the key must name
exactly what the training reads.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from backend.engine.devices import autocast, grad_scaler
from backend.engine.diffusion import unet_forward
from backend.engine.errors import InvalidInput
from backend.engine.lora_merge import MergedLora
from backend.engine.memory import fit_step
from backend.engine.models import LoadedModel
from backend.engine.params import DragParams
from backend.engine.types import CancelToken, ProgressFn

logger = logging.getLogger(__name__)

ADAPTER_NAME = "identity"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
CACHE_FORMAT = 1  # bump when training changes in a way that invalidates cached LoRAs


# ---------------------------------------------------------------------------------------------
# Adapter handling


def _add_adapter(model: LoadedModel, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """Attach a fresh LoRA (B = 0, A ~ N(0, 1/rank) drawn from ``seed``); return its params.

    The LoRA parameters are kept in fp32 even when the UNet is fp16, as diffusers' training
    scripts do, so the optimiser updates them at full precision.
    """
    from peft import LoraConfig

    remove_lora(model)
    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES
    )
    model.unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    generator = torch.Generator().manual_seed(seed)
    params = []
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if "lora_" not in name:
                continue
            param.data = param.data.float()
            if "lora_A" in name:  # peft's gaussian init, but from our generator
                param.copy_(torch.randn(param.shape, generator=generator, device="cpu") / rank)
            params.append(param)
    return params


def _freeze_adapter(model: LoadedModel) -> None:
    """The drag optimises the latent only: no gradients for the LoRA weights."""
    for name, param in model.unet.named_parameters():
        if "lora_" in name:
            param.requires_grad_(False)
            param.grad = None


def remove_lora(model: LoadedModel) -> None:
    """Unload any LoRA from the UNet, putting the original layers back (no-op if none)."""
    if getattr(model.unet, "peft_config", None):
        model.unet.unload_lora()


# ---------------------------------------------------------------------------------------------
# Training


def _random_offset(height: int, width: int, side: int, generator: torch.Generator) -> tuple[int, int]:
    top = int(torch.randint(0, height - side + 1, (1,), generator=generator, device="cpu"))
    left = int(torch.randint(0, width - side + 1, (1,), generator=generator, device="cpu"))
    return top, left


# Random draws moved to the device in one copy per chunk of steps of at most this many bytes.
_DRAW_CHUNK_BYTES = 64 * 2**20


@dataclass
class _Draws:
    """Every random draw of the training loop, made up front on the CPU in the loop's order.

    The CPU generator keeps the LoRA the same on every device; moving the draws to the device a
    chunk at a time (one copy at the defaults) avoids a blocking host→device copy per step.
    """

    offsets: list[list[tuple[int, int]]]  # per step, per batch item
    sample_noise: torch.Tensor  # [steps, batch, 4, h, w] for the posterior sample
    noise: torch.Tensor  # [steps, batch, 4, h, w] the noise the UNet predicts
    timesteps: torch.Tensor  # [steps, batch]

    @classmethod
    def make(cls, generator: torch.Generator, steps: int, fixed: list[tuple[int, int]] | None,
             crop: tuple[int, int, int], latent_shape: tuple[int, ...], train_timesteps: int):
        height, width, side = crop
        offsets, sample_noise, noise, timesteps = [], [], [], []
        for _ in range(steps):
            offsets.append(fixed if fixed is not None else [
                _random_offset(height, width, side, generator) for _ in range(latent_shape[0])
            ])
            sample_noise.append(torch.randn(latent_shape, generator=generator, device="cpu"))
            noise.append(torch.randn(latent_shape, generator=generator, device="cpu"))
            timesteps.append(torch.randint(0, train_timesteps, (latent_shape[0],),
                                           generator=generator, device="cpu"))
        return cls(offsets, torch.stack(sample_noise), torch.stack(noise), torch.stack(timesteps))

    def chunks(self, device: torch.device) -> Iterator[tuple[int, torch.Tensor, torch.Tensor,
                                                              torch.Tensor]]:
        """(step, sample noise, noise, timesteps) on ``device``, copied a chunk at a time."""
        steps = len(self.offsets)
        per_step = 2 * self.noise[0].numel() * self.noise.element_size()
        size = max(1, _DRAW_CHUNK_BYTES // max(1, per_step))
        for start in range(0, steps, size):
            part = slice(start, start + size)
            chunk = [t[part].to(device) for t in (self.sample_noise, self.noise, self.timesteps)]
            for i in range(chunk[0].shape[0]):
                yield start + i, chunk[0][i], chunk[1][i], chunk[2][i]


def _backward(model: LoadedModel, noisy: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor, cond: torch.Tensor,
              scaler: torch.amp.GradScaler | None, forward: Callable, micro: int) -> None:
    """Gradients of the batch's noise-prediction MSE, computed ``micro`` images at a time.

    ``forward`` is ``diffusion.unet_forward`` (diffusers' UNet forward, ε bit for bit) or the
    engine's ``torch.compile`` of it: compiled, the LoRA's forward and backward (the peft
    adapters in every attention projection) run as compiled graphs too."""
    unet, batch = model.unet, noisy.shape[0]
    for start in range(0, batch, micro):
        part = slice(start, start + micro)
        with autocast(model.device, model.precision):
            pred, _ = forward(unet, noisy[part].to(unet.dtype), timesteps[part], cond[part])
        loss = F.mse_loss(pred.float(), noise[part].float())
        if pred.shape[0] != batch:  # a micro-batch's share of the batch mean
            loss = loss * (pred.shape[0] / batch)
        (loss if scaler is None else scaler.scale(loss)).backward()


def train_lora(
    model: LoadedModel,
    image: torch.Tensor,
    prompt: str,
    *,
    steps: int,
    lr: float,
    rank: int,
    batch: int,
    fixed_crops: bool,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    forward: Callable | None = None,
) -> dict[str, torch.Tensor]:
    """Train the identity LoRA on ``image`` ([1, 3, H, W] in [-1, 1], H and W multiples of 8).

    ``fixed_crops`` selects GoodDrag's data (crops drawn once) over DragDiffusion's (fresh
    crops every step). The trained adapter stays active on ``model.unet`` (frozen); the
    returned state dict (CPU, fp32) can be cached and given to ``MergedLora.merge``.
    ``forward``: the UNet forward to train through (default ``diffusion.unet_forward``; the
    engine's compiled one with ``--compile``).
    """
    from peft.utils import get_peft_model_state_dict

    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise InvalidInput(f"the LoRA image must be [1, 3, H, W], got {list(image.shape)}")
    height, width = image.shape[-2:]
    vsf = model.vae_scale_factor
    if height % vsf or width % vsf:
        raise InvalidInput(f"the LoRA image size {width}×{height} must be a multiple of {vsf}")
    side = min(height, width)
    device = model.device
    unet, vae, scheduler = model.unet, model.vae, model.scheduler
    generator = torch.Generator().manual_seed(seed)

    params = _add_adapter(model, rank, seed)
    try:
        optimizer = torch.optim.AdamW(
            params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        scaler = grad_scaler(device, model.precision)
        cond = model.encode_prompt(prompt).expand(batch, -1, -1)
        pixels = image.to(device, vae.dtype)
        posteriors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

        def posterior(offset: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
            if offset not in posteriors:
                top, left = offset
                crop = pixels[:, :, top : top + side, left : left + side]
                with torch.no_grad():
                    dist = vae.encode(crop).latent_dist
                posteriors[offset] = (dist.mean.float(), dist.std.float())
            return posteriors[offset]

        fixed = [_random_offset(height, width, side, generator) for _ in range(batch)]
        train_timesteps = scheduler.config.num_train_timesteps
        latent_side = side // vsf
        draws = _Draws.make(generator, steps, fixed if fixed_crops else None, (height, width, side),
                            (batch, vae.config.latent_channels, latent_side, latent_side),
                            train_timesteps)
        if progress is not None:
            progress("lora", 0, steps)
        for step, sample_noise, noise, timesteps in draws.chunks(device):
            if cancel is not None:
                cancel.check()
            offsets = draws.offsets[step]
            mean, std = (torch.cat(t) for t in zip(*(posterior(o) for o in offsets), strict=True))
            latents = (mean + std * sample_noise) * vae.config.scaling_factor
            noisy = scheduler.add_noise(latents, noise, timesteps)
            optimizer.zero_grad(set_to_none=True)
            fit_step(partial(_backward, model, noisy, noise, timesteps, cond, scaler,
                             forward or unet_forward), batch,
                     model.memory, unet, device, lambda: optimizer.zero_grad(set_to_none=True))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if progress is not None:
                progress("lora", step + 1, steps)
    except BaseException:
        remove_lora(model)
        raise
    finally:
        if model.memory.checkpointing:
            unet.disable_gradient_checkpointing()
    _freeze_adapter(model)
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    """``<user cache>/gimp-drag-diffusion/lora``: LOCALAPPDATA on Windows, else XDG_CACHE_HOME
    or ``~/.cache``."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gimp-drag-diffusion" / "lora"


def lora_cache_key(
    model: LoadedModel,
    image: torch.Tensor,
    prompt: str,
    *,
    rank: int,
    lr: float,
    steps: int,
    batch: int,
    fixed_crops: bool,
    seed: int,
) -> str:
    """sha256 over everything that determines the trained LoRA (the image as 8-bit pixels)."""
    header = lora_header(model, image, prompt, rank=rank, lr=lr, steps=steps, batch=batch,
                         fixed_crops=fixed_crops, seed=seed)
    return _key(header, lora_pixels(image))


def lora_pixels(image: torch.Tensor) -> bytes:
    """The working image as the LoRA's key reads it: 8-bit pixels."""
    pixels = ((image.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.numpy().tobytes()


def _key(header: str, pixels: bytes) -> str:
    digest = hashlib.sha256(header.encode())
    digest.update(pixels)
    return digest.hexdigest()


def lora_header(model: LoadedModel, image: torch.Tensor, prompt: str, *, rank: int, lr: float,
                steps: int, batch: int, fixed_crops: bool, seed: int) -> str:
    """Everything of ``lora_cache_key`` but the pixels: the model, the image's working size,
    the prompt and the training settings (JSON)."""
    return json.dumps(
        {
            "format": CACHE_FORMAT,
            "shape": list(image.shape),
            "prompt": prompt,
            "model": model.fingerprint,
            "precision": model.precision.name,
            "rank": rank,
            "lr": repr(float(lr)),
            "steps": steps,
            "batch": batch,
            "fixed_crops": fixed_crops,
            "seed": seed,
        },
        sort_keys=True,
    )


# How a LoRA setting is named when it keeps a result from inheriting its source's LoRA.
_SETTING_NAMES = {"shape": "working size", "prompt": "prompt", "model": "model",
                  "precision": "precision", "rank": "lora_rank", "lr": "lora_lr",
                  "steps": "lora_steps", "batch": "lora_batch",
                  "fixed_crops": "method (GoodDrag's LoRA crops differ from DragDiffusion's)",
                  "seed": "seed", "format": "LoRA format"}


class LoraLineage:
    """Which LoRA the result of a recent edit inherits: the LoRA of the image it was dragged
    from. A drag on a result layer (a chain of drags) then reuses it instead of training one
    on the result, which differs from its source only where the edit changed it: the
    identity the LoRA keeps is the source's. Only with the same model, working size, prompt
    and LoRA settings (so for the same method: DragDiffusion's and GoodDrag's crops differ);
    otherwise ``source`` says which setting differs. Results are known by their working pixels
    (8-bit, as the LoRA's key reads them), the last ``max_entries`` of them, in memory."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._results: dict[str, tuple[str, str]] = {}  # pixels digest -> (header, LoRA key)

    @staticmethod
    def _digest(pixels: bytes) -> str:
        return hashlib.sha256(pixels).hexdigest()

    def record(self, result: torch.Tensor, header: str, key: str) -> None:
        """``result`` (the edit's output at the working size, [1, 3, h, w] in [-1, 1]) was
        made with the LoRA ``key`` of settings ``header``."""
        digest = self._digest(lora_pixels(result))
        self._results.pop(digest, None)
        self._results[digest] = (header, key)
        while len(self._results) > self.max_entries:
            self._results.pop(next(iter(self._results)))

    def source(self, pixels: bytes, header: str) -> tuple[str | None, str | None]:
        """(the inherited LoRA key, None) for a known result with these settings; (None, why
        not) for a known result with other settings; (None, None) for any other image."""
        known = self._results.get(self._digest(pixels))
        if known is None:
            return None, None
        theirs, key = known
        if theirs == header:
            return key, None
        ours, old = json.loads(header), json.loads(theirs)
        differ = [_SETTING_NAMES.get(name, name) for name in sorted(ours)
                  if ours[name] != old.get(name)]
        return None, ("this layer is the result of an earlier drag, but its LoRA was trained "
                      f"with another {', '.join(differ)}, so this edit trained a new one (keep "
                      "the settings to reuse it)")


class LoraCache:
    """Trained LoRA weights on disk, ``<directory>/<key>.safetensors``, least recently used
    evicted beyond ``max_entries`` files or ``max_bytes`` bytes. Unreadable files count as
    misses (and are deleted); failures to write only log a warning."""

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        *,
        max_bytes: int = 2 * 1024**3,
        max_entries: int = 64,
    ) -> None:
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()
        self.max_bytes = max_bytes
        self.max_entries = max_entries

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            state = load_file(str(path))
            os.utime(path)  # mark as recently used
        except Exception as exc:
            logger.warning("ignoring unreadable cached LoRA %s (%s)", path, exc)
            path.unlink(missing_ok=True)
            return None
        return state

    def put(self, key: str, state_dict: dict[str, torch.Tensor], info: dict | None = None) -> None:
        from safetensors.torch import save_file

        tmp_name = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".tmp", delete=False) as tmp:
                tmp_name = tmp.name
            metadata = {"info": json.dumps(info or {}, sort_keys=True), "format": str(CACHE_FORMAT)}
            tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
            save_file(tensors, tmp_name, metadata=metadata)
            os.replace(tmp_name, self.path(key))
            tmp_name = None
            self._prune()
        except OSError as exc:
            logger.warning("could not write the LoRA cache in %s (%s)", self.directory, exc)
        finally:
            if tmp_name is not None:
                Path(tmp_name).unlink(missing_ok=True)

    def _prune(self) -> None:
        stale = time.time() - 3600
        for leftover in self.directory.glob("*.tmp"):
            if leftover.stat().st_mtime < stale:
                leftover.unlink(missing_ok=True)
        entries = sorted(
            ((p, p.stat()) for p in self.directory.glob("*.safetensors")),
            key=lambda item: item[1].st_mtime_ns,
            reverse=True,
        )
        total = 0
        for count, (path, stat) in enumerate(entries):
            total += stat.st_size
            if count >= self.max_entries or total > self.max_bytes:
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# One edit's LoRA


@dataclass(frozen=True)
class PreparedLora:
    """The LoRA an edit runs with (``prepare_lora``)."""

    key: str | None = None  # its cache key; None: no LoRA (lora_steps 0)
    trained: bool = False  # trained for this edit (else cached, already merged, or none)
    resident: bool = False  # already merged by the previous edit with the same key
    inherited: bool = False  # the LoRA of the image this one was dragged from (a chain)
    # its settings (``lora_header``, for ``LoraLineage.record``; follows from the key)
    header: str | None = field(default=None, compare=False)
    why_not_inherited: str | None = None  # a known result that could not inherit, and why


def lora_settings(params: DragParams, method: str, seed: int) -> dict:
    """The training settings of ``train_lora`` (and of ``lora_cache_key``) for an edit."""
    return dict(rank=params.lora_rank, lr=params.lora_lr, steps=params.lora_steps,
                batch=params.lora_batch, fixed_crops=method == "gooddrag", seed=seed)


def prepare_lora(
    model: LoadedModel,
    image: torch.Tensor,
    prompt: str,
    params: DragParams,
    cache: LoraCache | None = None,
    *,
    method: str,
    merged: MergedLora,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    lineage: LoraLineage | None = None,
    forward: Callable | None = None,
) -> PreparedLora:
    """Make the LoRA for this image and prompt the one merged into the UNet.

    Kept as is when ``merged`` already holds it (``resident``), else loaded from ``cache`` or
    trained. ``method`` is "dragdiffusion" or "gooddrag" (their crop schemes). When
    ``lineage`` knows the image as an earlier edit's result with the same settings, that
    edit's LoRA is used (``inherited``) if it is merged or cached. With
    ``params.lora_steps == 0`` the base weights are restored (no key). ``merged.restore()``
    undoes it.
    """
    if params.lora_steps == 0:
        remove_lora(model)
        merged.restore()
        return PreparedLora()
    settings = lora_settings(params, method, seed)
    header = lora_header(model, image, prompt, **settings)
    pixels = lora_pixels(image)
    source, why_not = lineage.source(pixels, header) if lineage is not None else (None, None)
    if source is not None:
        if merged.key == source:
            return _done(PreparedLora(source, resident=True, inherited=True, header=header),
                         params, progress)
        state = cache.get(source) if cache is not None else None
        if state is not None and _merge_cached(merged, source, state):
            return _done(PreparedLora(source, inherited=True, header=header), params, progress)
        why_not = ("this layer is the result of an earlier drag, but that drag's LoRA is no "
                   "longer in the LoRA cache, so this edit trained a new one")
    key = _key(header, pixels)
    resident = merged.key == key
    if not resident:
        merged.restore()
        state = cache.get(key) if cache is not None else None
        if state is None or not _merge_cached(merged, key, state):
            state = train_lora(model, image, prompt, progress=progress, cancel=cancel,
                               forward=forward, **settings)
            remove_lora(model)
            merged.merge(key, state)
            if cache is not None:
                cache.put(key, state,
                          {"model": model.name, "prompt": prompt, "method": method, **settings})
            return PreparedLora(key, trained=True, header=header, why_not_inherited=why_not)
    return _done(PreparedLora(key, resident=resident, header=header,
                              why_not_inherited=why_not), params, progress)


def _done(lora: PreparedLora, params: DragParams, progress: ProgressFn | None) -> PreparedLora:
    """A LoRA that needed no training: its phase reported as done."""
    if progress is not None:
        progress("lora", params.lora_steps, params.lora_steps)
    return lora


def _merge_cached(merged: MergedLora, key: str, state: dict[str, torch.Tensor]) -> bool:
    try:
        merged.merge(key, state)
    except ValueError:
        logger.warning("cached LoRA %s does not fit the model; training again", key[:12])
        return False
    return True
