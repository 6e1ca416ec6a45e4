"""Device and precision choice, memory figures and out-of-memory detection.

A *precision* is the dtype of the weights plus the dtype of the autocast regions every UNet pass
runs in (``PRECISIONS``). With fp16 autocast, the passes that back-propagate (LoRA training, the
latent optimisation) scale the loss with a ``GradScaler`` so small gradients do not underflow;
bf16 has fp32's exponent range and needs none. Every branch runs on any device type that has
autocast (CUDA, MPS, CPU), which is how CI exercises the GPU's branches on a CPU.

Automatic choice: CUDA in fp16 (fp16 weights, fp16 autocast, GradScaler; see docs/benchmarks.md,
'Precision', for the measured drift from fp32), then Apple MPS in fp32, then the CPU in fp32.
MPS runs fp32 by default because fp16 on MPS is prone to NaNs and missing kernels in the
backward pass that the latent optimisation and the LoRA training need; ask for fp16 to trade
that risk for speed and memory.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from backend.engine.errors import InvalidInput
from backend.engine.oom import OOM_ADVICE as OOM_ADVICE  # re-exported for the engine
from backend.engine.oom import is_oom as is_oom


@dataclass(frozen=True)
class Precision:
    """How a model computes: its weights' dtype and its autocast dtype (None: no autocast)."""

    name: str
    weights: torch.dtype
    autocast: torch.dtype | None

    @property
    def scaled(self) -> bool:
        """Whether backward passes need a GradScaler (fp16 compute)."""
        return self.autocast == torch.float16


PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, None),
    # Half-size weights, half-precision compute (norms and softmax in fp32 under autocast).
    "fp16": Precision("fp16", torch.float16, torch.float16),
    "bf16": Precision("bf16", torch.bfloat16, torch.bfloat16),
    # fp32 weights under fp16/bf16 autocast: the official codes' optimisation loops.
    "fp16-mixed": Precision("fp16-mixed", torch.float32, torch.float16),
    "bf16-mixed": Precision("bf16-mixed", torch.float32, torch.bfloat16),
}
_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32",
            "float": "fp32"}
_BY_WEIGHTS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def precision_for_weights(dtype: torch.dtype) -> Precision:
    """The precision a model with ``dtype`` weights runs in unless told otherwise."""
    return PRECISIONS[_BY_WEIGHTS[dtype]]


def default_precision(device: torch.device) -> Precision:
    """The automatic choice per device type (see the module docstring)."""
    return PRECISIONS["fp16" if device.type == "cuda" else "fp32"]


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def _parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InvalidInput(
            f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(
                f"device {device!r} was asked for but this PyTorch ({torch.__version__}) sees no "
                "CUDA GPU; install a CUDA build of PyTorch and an NVIDIA driver, or use --device cpu"
            )
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise InvalidInput(
                f"device {device!r} was asked for but only {torch.cuda.device_count()} CUDA "
                "device(s) exist; use cuda:0 or --device cpu"
            )
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not _mps_available():
            raise InvalidInput(
                f"device {device!r} was asked for but Apple MPS is not available here "
                "(it needs an Apple-silicon Mac and macOS 12.3+); use --device cpu"
            )
        return torch.device("mps")
    if dev.type == "cpu":
        return torch.device("cpu")
    raise InvalidInput(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def resolve_precision(
    device: str | None = None, dtype: str | None = None
) -> tuple[torch.device, Precision]:
    """Pick the device and precision: ``None``/``"auto"`` chooses, anything else is checked.

    ``dtype`` is a ``PRECISIONS`` name (or an alias such as ``float16``). Raises
    ``InvalidInput`` for an unknown or unavailable device or an unusable precision.
    """
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
        elif _mps_available():
            dev = torch.device("mps")
        else:
            dev = torch.device("cpu")
    else:
        dev = _parse_device(device)

    if dtype in (None, "", "auto"):
        return dev, default_precision(dev)
    name = _ALIASES.get(dtype, dtype)
    if name not in PRECISIONS:
        raise InvalidInput(
            f"unknown dtype {dtype!r}; use auto, {', '.join(PRECISIONS)}"
        )
    chosen = PRECISIONS[name]
    if dev.type == "cpu" and chosen.autocast == torch.float16:
        raise InvalidInput("fp16 is not supported on the CPU; use fp32 (or bf16)")
    if (dev.type == "cuda" and chosen.autocast == torch.bfloat16
            and not torch.cuda.is_bf16_supported()):
        raise InvalidInput("this GPU does not support bf16; use fp16 or fp32")
    return dev, chosen


def memory_info(device: torch.device | str) -> dict[str, int]:
    """Memory figures in bytes: free/total/peak for CUDA, allocated for MPS, RSS for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {
            "free": int(free),
            "total": int(total),
            "allocated": int(torch.cuda.memory_allocated(device)),
            "peak": int(torch.cuda.max_memory_allocated(device)),
        }
    if device.type == "mps":
        info = {
            "allocated": int(torch.mps.current_allocated_memory()),
            "driver": int(torch.mps.driver_allocated_memory()),
        }
        if hasattr(torch.mps, "recommended_max_memory"):
            info["total"] = int(torch.mps.recommended_max_memory())
        return info
    return _process_memory()


def _process_memory() -> dict[str, int]:
    try:
        import psutil
    except ImportError:
        psutil = None
    info: dict[str, int] = {}
    if psutil is not None:
        mem = psutil.Process().memory_info()
        info["rss"] = int(mem.rss)
        if hasattr(mem, "peak_wset"):  # Windows
            info["peak"] = int(mem.peak_wset)
        info["total"] = int(psutil.virtual_memory().total)
        info["free"] = int(psutil.virtual_memory().available)
    try:
        import resource
    except ImportError:  # Windows
        return info
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    info["peak"] = int(max_rss if sys.platform == "darwin" else max_rss * 1024)
    info.setdefault("rss", info["peak"])
    return info


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory measurement (CUDA only; a no-op elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


_AUTOCAST_DEVICES = ("cuda", "cpu", "mps")


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: Precision | torch.dtype) -> Iterator[None]:
    """``torch.autocast`` in the precision's autocast dtype on this device; nothing for fp32.

    A bare dtype means the precision models with such weights run in.
    """
    device = torch.device(device)
    if isinstance(precision, torch.dtype):
        precision = precision_for_weights(precision)
    if precision.autocast is None or device.type not in _AUTOCAST_DEVICES:
        yield
        return
    with torch.autocast(device.type, dtype=precision.autocast):
        yield


def grad_scaler(device: torch.device | str, precision: Precision) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 backward passes on this device, else None."""
    device = torch.device(device)
    if not precision.scaled or device.type not in _AUTOCAST_DEVICES:
        return None
    return torch.amp.GradScaler(device.type)
