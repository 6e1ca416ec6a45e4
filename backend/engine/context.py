"""What a drag algorithm needs besides the latent: model runner, schedule, points and knobs."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from backend.engine.diffusion import Schedule, UNetRunner
from backend.engine.params import DragParams
from backend.engine.types import GridPoint, ProgressFn


@dataclass
class DragRun:
    """What a drag loop ran: the pipeline's work accounting and the result's stats read it."""

    steps: int = 0  # optimisation (Adam) steps that ran
    # it ended inside a drag step, after that step's forward pass (the official codes count one
    # more forward then: engine.work)
    stopped_inside: bool = False
    stop: str | None = None  # why it ended before its last step: "reached" or "no_change"
    timesteps: int | None = None  # GoodDrag: the denoising steps it dragged at

    def as_stats(self) -> dict[str, Any]:
        """The result's ``stats`` fields (msgpack/JSON-safe)."""
        stats = {"drag_steps": self.steps, "drag_stopped": self.stopped_inside,
                 "drag_stop": self.stop}
        if self.timesteps is not None:
            stats["dragged_timesteps"] = self.timesteps
        return stats


@dataclass
class DragContext:
    runner: UNetRunner
    schedule: Schedule
    params: DragParams
    grid: tuple[int, int]  # supervision grid (rows, cols) = half the working resolution
    handles: list[GridPoint]
    targets: list[GridPoint]
    keep: torch.Tensor | None  # [1,1,h,w] at latent size: 1 where the image must stay; None: no mask
    progress: ProgressFn | None = None
    autocast: Callable[[], AbstractContextManager] = nullcontext
    scaler: torch.amp.GradScaler | None = None
    # preview(phase, step, x0): the edited branch's predicted clean latent, for live previews.
    preview: Callable[[str, int, torch.Tensor], None] | None = None
    drag: DragRun = field(default_factory=DragRun)  # what the drag loop ran, filled by it
    warnings: list[str] = field(default_factory=list)  # for the user (DragResult.warnings)
    # Values derived from z_t* alone, kept for a re-drag of the same image (engine.redrag).
    memo: dict | None = None

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, or what it returned in an earlier edit of the same image and settings
        (``key`` names everything besides z_t* that the value depends on)."""
        if self.memo is None:
            return compute()
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def step(self, phase: str, step: int, total: int) -> None:
        """Report progress (called once per step; the pipeline's ``progress`` also raises
        ``Cancelled`` when the edit was cancelled)."""
        self.runner.work.phase = phase  # UNet work from here on is booked to this phase
        if self.progress is not None:
            self.progress(phase, step, total)

    def show(self, phase: str, step: int, x0: torch.Tensor) -> None:
        if self.preview is not None:
            self.preview(phase, step, x0)

    def optimiser_step(self, loss: torch.Tensor, optimiser: torch.optim.Optimizer) -> None:
        """backward + Adam step, with loss scaling when running fp16 on CUDA."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimiser)
            self.scaler.update()
        else:
            loss.backward()
            optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        self.runner.work.backward()
