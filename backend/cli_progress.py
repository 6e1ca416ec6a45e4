"""The command line's progress display: one tqdm bar per engine phase.

The engine reports ``(phase, step, total)`` with ``step`` the step now starting. Each phase
gets its own bar, created when the phase starts and closed (at 100 %) when the next one
starts, so its elapsed time, rate and ETA are the phase's own.
"""

from __future__ import annotations

from typing import IO, Any

from tqdm import tqdm

PHASE_LABELS = {"load": "loading", "lora": "LoRA fine-tune", "inversion": "DDIM inversion",
                "drag": "drag", "denoise": "denoise", "decode": "decode"}


class PhaseBars:
    """A ``ProgressFn`` that draws one bar per phase on ``file`` (stderr by default)."""

    def __init__(self, file: IO[str] | None = None, **tqdm_args: Any) -> None:
        self.file = file
        self.tqdm_args = {"unit": "step", "dynamic_ncols": True, "leave": True, **tqdm_args}
        self.phase: str | None = None
        self.bar: tqdm | None = None
        self.bars = 0  # how many bars were made (one per phase)

    def __call__(self, phase: str, step: int, total: int) -> None:
        if phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=max(total, 1), desc=PHASE_LABELS.get(phase, phase),
                            file=self.file, **self.tqdm_args)
            self.bars += 1
        assert self.bar is not None
        if total != self.bar.total:
            self.bar.total = max(total, 1)
        # ``step`` is starting, so ``step`` steps are done.
        self.bar.update(max(0, min(step, self.bar.total) - self.bar.n))

    def close(self, done: bool = True) -> None:
        """Close the current phase's bar, first filling it when the phase is ``done``."""
        if self.bar is not None:
            if done:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None
