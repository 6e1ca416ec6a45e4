"""Out-of-memory detection and advice, without torch (the server imports this too)."""

from __future__ import annotations

_OOM_MARKERS = (
    "out of memory",  # CUDA and MPS ("MPS backend out of memory")
    "can't allocate memory",  # CPU allocator
    "not enough memory",  # CPU allocator on Windows
)

OOM_ADVICE = (
    "try a smaller work_size or lora_batch, close other programs using the GPU, or run the "
    "backend on the CPU with --device cpu"
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is the device (or the CPU) running out of memory.

    ``torch.OutOfMemoryError`` (alias ``torch.cuda.OutOfMemoryError``) is recognised by its
    class name, so this module needs no torch.
    """
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MARKERS)
