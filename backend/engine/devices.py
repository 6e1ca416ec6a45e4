"""Device and precision choice, memory figures and out-of-memory detection.

Automatic choice: CUDA with fp16 weights (bf16 on request), then Apple MPS in fp32, then the CPU
in fp32. MPS runs fp32 by default because fp16 on MPS is prone to NaNs and missing kernels in
the backward pass that the latent optimisation and the LoRA training need; ask for fp16 to trade
that risk for speed and memory.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from backend.engine.errors import InvalidInput
from backend.engine.oom import OOM_ADVICE as OOM_ADVICE  # re-exported for the engine
from backend.engine.oom import is_oom as is_oom

_DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


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


def resolve_device(
    device: str | None = None, dtype: str | None = None
) -> tuple[torch.device, torch.dtype]:
    """Pick the device and weight dtype: ``None``/``"auto"`` chooses, anything else is checked.

    Raises ``InvalidInput`` for an unknown or unavailable device or an unusable dtype.
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
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise InvalidInput(f"unknown dtype {dtype!r}; use auto, fp16, bf16 or fp32")
    chosen = _DTYPES[dtype]
    if dev.type == "cpu" and chosen == torch.float16:
        raise InvalidInput("fp16 is not supported on the CPU; use fp32 (or bf16)")
    if dev.type == "cuda" and chosen == torch.bfloat16 and not torch.cuda.is_bf16_supported():
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


@contextlib.contextmanager
def autocast(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for the optimisation loops, as the reference code runs them.

    On CUDA with fp16/bf16 weights this is ``torch.autocast`` in that dtype (parameters that are
    trained stay fp32); everywhere else it does nothing.
    """
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            yield
    else:
        yield
