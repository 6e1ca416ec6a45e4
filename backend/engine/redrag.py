"""Re-drag cache: what a second drag of the same image reuses instead of computing again.

The inverted latent z_t* depends on the working image, the prompt, the model, the LoRA, the
number of DDIM steps and the inversion strength, never on the points. A user who drags an image,
looks, and drags it again differently would otherwise pay for LoRA, VAE encoding and inversion
every time. An entry keeps z_t* plus *memos*: values an algorithm derives from z_t* alone
(DragDiffusion's F⁰ at t*, GoodDrag's original trajectory, the denoising's original
branch under reference attention: ``attention.denoise_with_reference``), stored in whatever form the
algorithm computes them (``DragContext.cached``), so this module does not care how features are
stored. Everything stays on the model's device.

Entries are kept most recently used first, at most ``max_entries`` (default 1: the image being
edited); a miss evicts before the new inversion runs, so an entry never competes with the next
image's work for memory. When the entries hold more than ``max_bytes`` their memos are dropped
(z_t* alone is a few hundred kB).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

FORMAT = 1  # bump when what an entry holds changes meaning


@dataclass
class RedragEntry:
    z_star: torch.Tensor
    memo: dict[Any, Any] | None = field(default_factory=dict)  # None: not kept
    reused: bool = False  # set when an edit found it in the cache
    image: str = ""  # image_digest of its working pixels

    @property
    def nbytes(self) -> int:
        return _nbytes(self.z_star) + _nbytes(self.memo or {})


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def image_digest(pixels: torch.Tensor) -> str:
    """sha256 of the working pixels alone (which entries belong to the image being edited)."""
    return hashlib.sha256(pixels.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def redrag_key(model, pixels: torch.Tensor, prompt: str, lora_key: str | None, params) -> str:
    """sha256 over everything z_t* and its memos depend on (the working pixels exactly)."""
    header = json.dumps({
        "format": FORMAT,
        "model": model.fingerprint,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "precision": model.precision.name,
        "prompt": prompt,
        "lora": lora_key,
        "steps": params.n_inference_steps,
        "strength": repr(float(params.inversion_strength)),
        "working_size": list(pixels.shape),
        "feature_block": params.feature_block,
    }, sort_keys=True)
    digest = hashlib.sha256(header.encode())
    digest.update(pixels.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RedragCache:
    """Recent images' inverted latents and memos, by ``redrag_key``."""

    def __init__(self, max_entries: int = 1, max_bytes: int = 2 * 1024**3) -> None:
        self.max_entries = max(1, max_entries)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, RedragEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> RedragEntry | None:
        """The entry for ``key`` (now the most recent), or None after evicting the least recent
        entries to leave room for the one the caller is about to ``put``."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key, last=False)
            return entry
        while len(self._entries) >= self.max_entries:
            self._entries.popitem()
        return None

    def put(self, key: str, z_star: torch.Tensor, image: str = "") -> RedragEntry:
        entry = RedragEntry(z_star.detach(), image=image)
        self._entries[key] = entry
        self._entries.move_to_end(key, last=False)
        while len(self._entries) > self.max_entries:
            self._entries.popitem()
        return entry

    def trim(self) -> None:
        """Drop memos, least recent entries first, until everything fits in ``max_bytes``."""
        for entry in reversed(self._entries.values()):
            if self.nbytes <= self.max_bytes:
                return
            if entry.memo:
                entry.memo.clear()

    def drop_other_images(self, image: str) -> None:
        """Drop the memos of entries of other images than ``image`` (its ``image_digest``):
        called before a LoRA is trained, the edit's memory peak, so that another image's
        memos (the denoising's original branch: 0.41 GB in fp16 at 512²) do not add to it."""
        for entry in self._entries.values():
            if entry.image != image and entry.memo:
                entry.memo.clear()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
