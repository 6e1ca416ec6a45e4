"""Run engine code on PyTorch's ``meta`` device: device audits and memory estimates.

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
import weakref
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ENGINE_DIR = str(Path(__file__).resolve().parent.parent / "engine")

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
        if "/torch/" not in name and name != __file__:
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
            to_kwargs = {k: v for k, v in kwargs.items() if k != "copy"}  # not parsed there
            device, dtype, *_ = torch._C._nn._parse_to(*args[1:], **to_kwargs)
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


# --- memory estimates ------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storage on meta, its peak overall and per phase.

    Every operator's outputs are registered with the storage they use; a storage counts until it
    is freed (autograd's saved tensors keep theirs alive, as on a GPU). Register tensors that
    existed before (weights) with ``add``. ``phase`` names where new peaks are booked.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.phase = "start"
        self.phase_peaks: dict[str, int] = {}

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)
        return out


# Ops autocast runs in the low-precision dtype, and ops it runs in fp32 (CUDA's lists, abridged
# to what SD1.5 uses).
_LOW = {torch.conv2d, torch._C._nn.linear, torch.matmul, torch.bmm, torch.baddbmm, torch.addmm,
        torch.mm}
_FP32 = {F.group_norm, F.layer_norm, torch.group_norm, torch.layer_norm, torch.softmax,
         torch.Tensor.softmax, F.softmax, F.mse_loss}


class EmulatedAutocast(TorchFunctionMode):
    """Autocast's casts on meta tensors (``torch.autocast`` has no meta backend).

    Casts the floating inputs of matmul-like ops to ``dtype`` and of norms, softmax and losses
    to fp32, above autograd as autocast does, so backward saves the cast copies it would save on
    a GPU. Attention runs as the GPU's memory-efficient kernel (no tokens² matrix saved).
    """

    def __init__(self, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (self._cast(t, self.dtype) for t in args[:3])
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, grad)[0]
        if self.dtype is not None and func in _LOW:
            args = tuple(self._cast(a, self.dtype) for a in args)
        elif self.dtype is not None and func in _FP32:
            args = tuple(self._cast(a, torch.float32) for a in args)
        return func(*args, **kwargs)

    @staticmethod
    def _cast(value, dtype: torch.dtype | None):
        if (dtype is not None and isinstance(value, torch.Tensor)
                and value.is_floating_point() and value.dtype != dtype):
            return value.to(dtype)
        return value
