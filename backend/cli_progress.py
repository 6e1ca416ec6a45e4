"""The command line's progress display: one tqdm bar per engine phase.

The engine reports ``(phase, step, total)`` with ``step`` the step now starting. Each phase
gets its own bar, created when the phase starts and closed when the next one starts, so its
elapsed time, rate and ETA are the phase's own. A phase that ends is counted up to its last
reported step, which ran (as the plug-in counts): a drag that stops early stays where it
stopped instead of jumping to 100 %, and ``early_stop`` says why, under the bars.
"""

from __future__ import annotations

from typing import IO, Any

from tqdm import tqdm

PHASE_LABELS = {"load": "loading", "lora": "LoRA fine-tune", "inversion": "DDIM inversion",
                "drag": "drag", "denoise": "denoise", "decode": "decode"}

# Why a drag ends before its last step (the engine's ``stats["drag_stop"]``).
STOP_REASONS = {
    "reached": "the tracker put every handle within reach of its target (reach_threshold)",
    "no_change": "the tracker saw no handle move for max_track_no_change trackings",
}


class PhaseBars:
    """A ``ProgressFn`` that draws one bar per phase on ``file`` (stderr by default)."""

    def __init__(self, file: IO[str] | None = None, **tqdm_args: Any) -> None:
        self.file = file
        self.tqdm_args = {"unit": "step", "dynamic_ncols": True, "leave": True, **tqdm_args}
        self.phase: str | None = None
        self.bar: tqdm | None = None
        self.bars = 0  # how many bars were made (one per phase)
        self.started = 0  # the step of the current phase that started last

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
        self.started = step
        self.bar.update(max(0, min(step, self.bar.total) - self.bar.n))

    def close(self, done: bool = True) -> None:
        """Close the current phase's bar; when the phase is ``done``, its last started step
        ran and counts (a phase that ended early is left short of 100 %)."""
        if self.bar is not None:
            if done:
                self.bar.update(max(0, min(self.started + 1, self.bar.total) - self.bar.n))
            self.bar.close()
            self.bar = None


def early_stop(stats: dict[str, Any]) -> str | None:
    """The line that says a drag ended before its last step, and why (None if it ran them
    all), from the engine's result ``stats``."""
    reason = stats.get("drag_stop")
    if not reason:
        return None
    steps = int(stats.get("drag_steps", 0))
    return (f"drag stopped early (at step {steps + 1}, after {steps} optimisation steps): "
            f"{STOP_REASONS.get(reason, reason)}")
