"""An edit's progress as the user sees it: phase, step, elapsed time, time left, and the
estimate shown before a run starts.

Work is counted in *cost units* (about one UNet forward pass at the working size): a phase's
share of the bar is its steps times the cost of one of its steps, so the bar moves at a steady
speed and "time left" is the remaining units at the speed measured so far. The speed of
earlier edits (seconds per unit per working megapixel, per backend device and model) gives
the estimate before the first step. No gi here: tested outside GIMP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

PHASE_ORDER = ("starting", "queued", "load", "lora", "inversion", "drag", "denoise", "decode")
PHASE_LABELS = {
    "starting": "Starting the backend", "queued": "Waiting in the backend's queue",
    "load": "Preparing", "lora": "Fine-tuning LoRA", "inversion": "Inverting (DDIM)",
    "drag": "Dragging", "denoise": "Denoising", "decode": "Decoding",
}
# Cost of one step in UNet-forward equivalents: LoRA and drag steps add a backward pass
# (DragDiffusion's mask term backpropagates through the noise prediction too); denoising with
# reference attention runs the original and the edited latent together.
STEP_COST = {"load": 1.0, "lora": 2.0, "inversion": 1.0, "drag": 2.5, "denoise": 1.5,
             "decode": 1.0}
# Seconds per cost unit per working megapixel when nothing was measured yet: SD1.5, from the
# project's CPU benchmark (2 cores, about 5.6 s per UNet pass at 512×512) and typical GPUs.
FIRST_GUESS = {"cpu": 21.0, "cuda": 0.4, "mps": 3.0}


def plan_steps(params: Mapping[str, Any]) -> dict[str, int]:
    """Steps each phase will take at most for resolved method parameters (drags may stop
    early; a cached LoRA skips its phase). Inpaint4Drag: the warp (``load``), its inpainting
    steps (``denoise``), the paste (``decode``)."""
    if params.get("method") == "inpaint4drag":
        return {"load": 1, "denoise": max(1, int(params.get("inpaint_steps", 8))),
                "decode": 1}
    n = max(1, min(int(params.get("n_inference_steps", 50)),
                   round(params.get("n_inference_steps", 50)
                         * params.get("inversion_strength", 0.7))))
    if params.get("method") == "gooddrag":
        drag = (min(int(params.get("drag_end_step", 7)), n) * int(params.get("track_per_denoise",
                10)) * int(params.get("max_drag_per_track", 3)))
    else:
        drag = int(params.get("drag_steps", 80))
    return {"load": 1, "lora": int(params.get("lora_steps", 0)), "inversion": n, "drag": drag,
            "denoise": n, "decode": 1}


def units(plan: Mapping[str, int]) -> float:
    return sum(STEP_COST.get(phase, 1.0) * steps for phase, steps in plan.items())


def working_megapixels(width: int, height: int, work_size: float, max_side: float = 0) -> float:
    """Megapixels the engine edits a layer at: width ``work_size``, height from the aspect
    ratio, both rounded down to multiples of 8; with ``max_side`` > 0 the long side is fitted
    to it instead when longer (as backend/engine/imageops.working_size)."""
    work = int(work_size)
    w = max(8, work // 8 * 8)
    h = max(8, int(work * height / max(width, 1)) // 8 * 8)
    if 0 < max_side < max(w, h):
        scale = max_side / max(width, height, 1)
        w, h = (max(8, round(v * scale / 8) * 8) for v in (width, height))
    return w * h / 1e6


def speed_key(device: str, model: str) -> str:
    return f"{device.split(':')[0]}|{model}"


def estimate_seconds(plan: Mapping[str, int], megapixels: float,
                     speed: float | None) -> float | None:
    return None if speed is None else units(plan) * speed * megapixels


def first_guess(device: str) -> float | None:
    return FIRST_GUESS.get(device.split(":")[0])


def remember_speed(speeds: dict[str, float], key: str, measured: float) -> dict[str, float]:
    """Blend a new measurement into the remembered speed (new edits count for half)."""
    old = speeds.get(key)
    return {**speeds, key: measured if old is None else (old + measured) / 2}


class Tracker:
    """Turns progress events into the bar's fraction and the texts shown with it."""

    def __init__(self, plan: Mapping[str, int], *, sequential: bool = True,
                 drag_end_step: int | None = None, speed: float | None = None,
                 megapixels: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan = {p: max(0, int(s)) for p, s in plan.items()}
        self.done = dict.fromkeys(self.plan, 0)
        self.seen: set[str] = set()  # phases that reported at least one step
        self.sequential = sequential  # False for GoodDrag: drag and denoise steps interleave
        self.drag_end_step = drag_end_step
        self.speed = speed  # seconds per unit per megapixel, from earlier edits
        self.megapixels = megapixels
        self.clock = clock
        self.started = clock()
        self.working_since: float | None = None
        self.phase = "starting"
        self.step = self.total = 0

    def update(self, phase: str, step: int, total: int) -> None:
        """``step`` of ``total`` in ``phase`` is starting (``step`` steps are done)."""
        self.phase, self.step, self.total = phase, step, total
        if phase not in self.plan:
            return
        if self.working_since is None:
            self.working_since = self.clock()
        self.plan[phase] = max(total, 1)
        self.done[phase] = max(self.done[phase], min(step, self.plan[phase]))
        self.seen.add(phase)
        index = PHASE_ORDER.index(phase)
        for earlier in PHASE_ORDER[:index]:
            interleaved = not self.sequential and earlier == "drag" and phase == "denoise"
            if earlier in self.plan and not interleaved:
                self._finish(earlier)
        if (phase == "denoise" and not self.sequential and self.drag_end_step is not None
                and step >= self.drag_end_step):
            self._finish("drag")

    def _finish(self, phase: str) -> None:
        """A phase is over: its last reported step ran; what it did not run (early stop,
        cached LoRA) leaves the plan."""
        if phase in self.seen:
            self.done[phase] = min(self.plan[phase], self.done[phase] + 1)
            self.seen.discard(phase)
        self.plan[phase] = self.done[phase]

    def finish(self) -> None:
        for phase in self.plan:
            self.done[phase] = self.plan[phase]

    @property
    def fraction(self) -> float:
        total = units(self.plan)
        return min(1.0, units(self.done) / total) if total > 0 else 0.0

    def elapsed(self) -> float:
        return self.clock() - self.started

    def seconds_per_unit(self) -> float | None:
        """Measured in this edit once a few units ran, else from earlier edits."""
        done = units(self.done)
        if self.working_since is not None and done >= 2:
            return (self.clock() - self.working_since) / done
        if self.speed is not None and self.megapixels > 0:
            return self.speed * self.megapixels
        return None

    def remaining(self) -> float | None:
        rate = self.seconds_per_unit()
        return None if rate is None else max(0.0, units(self.plan) - units(self.done)) * rate

    def measured_speed(self) -> float | None:
        """Seconds per unit per megapixel of this edit (to remember), None if too short."""
        done = units(self.done)
        if self.working_since is None or done < 2 or self.megapixels <= 0:
            return None
        return (self.clock() - self.working_since) / done / self.megapixels

    def phase_text(self) -> str:
        label = PHASE_LABELS.get(self.phase, self.phase.capitalize())
        if self.total > 1:
            return f"{label}: step {min(self.step + 1, self.total)} of {self.total}"
        return f"{label}…"

    def time_text(self) -> str:
        text = f"{clock_time(self.elapsed())} elapsed"
        left = self.remaining()
        if left is not None and self.phase not in ("starting", "queued"):
            text += f" · about {clock_time(left)} left"
        return text


def clock_time(seconds: float) -> str:
    """0:42, 12:05, 1:02:03."""
    seconds = round(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def duration_words(seconds: float) -> str:
    """'about 40 seconds', 'about 3 minutes', 'about 1.5 hours'."""
    if seconds < 90:
        return f"about {max(5, round(seconds / 5) * 5)} seconds"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} minutes"
    return f"about {seconds / 3600:.1f} hours"


def advice(seconds: float | None, device: str, work_size: float, measured: bool,
           fast_preset: bool) -> str:
    """What the dialog says before a run: how long, and what makes it faster (if long)."""
    on = device.split(":")[0] or "?"
    if seconds is None:
        head = (f"The backend runs on the {on.upper()}: an edit takes a while."
                if on == "cpu" else "")
    else:
        how = "from earlier edits" if measured else "a rough first guess for SD 1.5"
        head = f"Estimated time: {duration_words(seconds)} on {on.upper()} ({how})."
    if on != "cpu" and (seconds is None or seconds <= 60):
        return head
    faster = [f"a smaller Working width (now {int(work_size)} px; half the width takes about "
              "a quarter of the time)", "fewer LoRA or Drag steps"]
    if fast_preset:
        faster.append("the 'fast' method")
    return f"{head} Faster: {', '.join(faster[:-1])} or {faster[-1]}.".strip()


def inpaint_advice(seconds: float | None, device: str) -> str:
    """The dialog's line for Inpaint4Drag: few model steps, so no advice on making it faster."""
    on = (device.split(":")[0] or "?").upper()
    if seconds is None:
        return (f"Inpaint4Drag on the {on}: the warp is shown below at once; OK inpaints in a "
                "few model steps (seconds with the demo model or on a GPU, up to about a "
                "minute with Stable Diffusion on a CPU).")
    return f"Estimated time: {duration_words(seconds)} on {on} (from earlier edits)."
