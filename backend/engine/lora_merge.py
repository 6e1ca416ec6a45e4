"""A LoRA merged into the UNet's weights and kept there between edits, with an exact restore.

Activating a LoRA through peft wraps every targeted ``Linear`` (128 of them in SD1.5) and adds
two small matmuls to each of them in every forward; unloading puts the layers back. Doing that
per edit costs 0.3–0.6 s of CPU on SD1.5 and a re-drag of the same image would redo it for the
same weights. ``MergedLora`` instead adds ``B·A`` (scale ``alpha / rank`` = 1, as both official
codes) into the base weights once and keeps it there while edits use the same LoRA key. The base
weights of the layers it touches are copied to the CPU the first time, so ``restore`` puts them
back bit for bit (subtracting ``B·A`` again would not be exact in floating point).
"""

from __future__ import annotations

import torch

_SUFFIX_A, _SUFFIX_B = ".lora_A.weight", ".lora_B.weight"


class MergedLora:
    """The LoRA (if any) merged into ``model.unet``: its key, and the base weights it replaced."""

    def __init__(self, model) -> None:
        self.model = model
        self.key: str | None = None
        self._base: dict[str, torch.Tensor] = {}  # layer name → its base weight (CPU copy)

    def _pairs(self, state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Layer name → (A, B), checked against the UNet; ``ValueError`` when it does not fit."""
        names = {k.removesuffix(_SUFFIX_A) for k in state_dict if k.endswith(_SUFFIX_A)}
        if not names or {f"{n}{s}" for n in names for s in (_SUFFIX_A, _SUFFIX_B)} != set(state_dict):
            raise ValueError("the LoRA weights do not match this model")
        pairs = {}
        for name in names:
            a, b = state_dict[name + _SUFFIX_A], state_dict[name + _SUFFIX_B]
            try:
                layer = self.model.unet.get_submodule(name)
            except AttributeError:
                raise ValueError("the LoRA weights do not match this model") from None
            weight = getattr(layer, "weight", None)
            if (not isinstance(layer, torch.nn.Linear) or a.ndim != 2 or b.ndim != 2
                    or weight.shape != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]):
                raise ValueError("the LoRA weights do not match this model")
            pairs[name] = (a, b)
        return pairs

    @torch.no_grad()
    def merge(self, key: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Make ``state_dict`` (peft LoRA weights, as ``train_lora`` returns) the merged LoRA.

        A no-op when ``key`` is already merged. Raises ``ValueError`` (and changes nothing)
        when the weights do not fit the UNet.
        """
        if key == self.key:
            return
        pairs = self._pairs(state_dict)
        self.restore()
        self.key = key  # set first, so that a failure half-way is undone by ``restore``
        try:
            for name, (a, b) in pairs.items():
                weight = self.model.unet.get_submodule(name).weight
                if name not in self._base:
                    self._base[name] = weight.detach().to("cpu", copy=True)
                delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
                weight.copy_((weight.float() + delta).to(weight.dtype))
        except BaseException:
            self.restore()
            raise

    @torch.no_grad()
    def restore(self) -> None:
        """Put the base weights back exactly (no-op when nothing is merged)."""
        if self.key is None:
            return
        for name, base in self._base.items():
            self.model.unet.get_submodule(name).weight.copy_(base)
        self.key = None
