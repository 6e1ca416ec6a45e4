"""Helpers for the device tests: run engine code on PyTorch's ``meta`` device and audit it.

A tensor on ``meta`` has a shape, a dtype and a device but no data. PyTorch checks devices on
meta exactly as on CUDA: mixing a CPU tensor (other than a 0-dim scalar) into an operation on
meta tensors raises "Tensor on device cpu is not on the expected device meta!", the error a GPU
user would get. Code that reads values back to the host (``.item()``, ``float()``, ``int()``,
``.tolist()``, ``.cpu()``) cannot run on meta, so ``MetaRun`` answers those reads with zeros
and counts them per call site; everything else runs for real on meta, at no compute cost, even
with the full SD1.5 architecture.

``MetaRun`` also records every tensor factory (``torch.zeros``, ``torch.arange``, …) that engine
code calls without naming a device: on a GPU such a tensor is created on the CPU.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ENGINE_DIR = str(Path(__file__).resolve().parents[1] / "backend" / "engine")

FACTORIES = {
    torch.arange, torch.empty, torch.eye, torch.full, torch.linspace, torch.ones, torch.rand,
    torch.randint, torch.randn, torch.randperm, torch.tensor, torch.as_tensor, torch.zeros,
}
_HOST_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int",
    torch.Tensor.__index__: "int",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
}


def _zeros_list(shape: tuple[int, ...], value):
    if not shape:
        return value
    return [_zeros_list(shape[1:], value) for _ in range(shape[0])]


def _caller() -> tuple[str, int] | None:
    """(engine file name, line) of the nearest engine frame calling into torch, else None."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(ENGINE_DIR):
            return Path(name).name, frame.f_lineno
        if "/torch/" not in name and "fixtures_device" not in name:
            return None  # called from library or test code, not from the engine
        frame = frame.f_back
    return None


class MetaRun(TorchFunctionMode):
    """Run code on meta tensors: host reads give zeros; engine factories without device= noted.

    ``host_reads`` counts reads of meta tensors made by engine code, by (file, line, kind);
    ``factories_without_device`` lists (file, line, factory) of engine calls naming no device;
    ``uploads`` counts host → meta copies (``.to(device)``) made by engine code, by (file, line).
    """

    def __init__(self) -> None:
        super().__init__()
        self.host_reads: Counter[tuple[str, int, str]] = Counter()
        self.factories_without_device: list[tuple[str, int, str]] = []
        self.uploads: Counter[tuple[str, int]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            site = _caller()
            if site is not None:
                self.factories_without_device.append((*site, func.__name__))
        meta = bool(args) and isinstance(args[0], torch.Tensor) and args[0].is_meta
        if meta and func in _HOST_READS:
            return self._host_read(_HOST_READS[func], args[0])
        if func is torch.Tensor.to and isinstance(args[0], torch.Tensor):
            device, dtype, *_ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if meta and device is not None and device.type == "cpu":
                return self._host_read("cpu", args[0]).to(dtype or args[0].dtype)
            if not meta and device is not None and device.type == "meta":
                site = _caller()
                if site is not None:
                    self.uploads[site] += 1
        return func(*args, **kwargs)

    def _host_read(self, kind: str, tensor: torch.Tensor):
        site = _caller()
        if site is not None:
            self.host_reads[(*site, kind)] += 1
        if kind in ("cpu", "numpy"):
            zeros = torch.zeros(tensor.shape, dtype=tensor.dtype, device="cpu")
            return zeros.numpy() if kind == "numpy" else zeros
        value = {"int": 0, "bool": False}.get(kind, 0.0)
        if kind in ("item", "tolist") and not tensor.dtype.is_floating_point:
            value = False if tensor.dtype == torch.bool else 0
        return _zeros_list(tuple(tensor.shape), value) if kind == "tolist" else value

    def reads_in(self, filename: str) -> int:
        """How many host reads engine file ``filename`` made."""
        return sum(n for (f, _line, _kind), n in self.host_reads.items() if f == filename)

    def uploads_in(self, filename: str) -> int:
        """How many host → device copies engine file ``filename`` made."""
        return sum(n for (f, _line), n in self.uploads.items() if f == filename)


def sd15_unet(device: str | torch.device = "meta", **overrides):
    """The full SD1.5 UNet architecture (random or, on meta, no weights)."""
    from diffusers import UNet2DConditionModel

    from backend.engine.sd15 import SD15_CONFIG_DIR

    config = {**UNet2DConditionModel.load_config(SD15_CONFIG_DIR, subfolder="unet"), **overrides}
    with torch.device(device):
        return UNet2DConditionModel.from_config(config).eval().requires_grad_(False)
