"""An edit's progress as the user sees it: phase, step, elapsed time, time left, and the
estimate shown before a run starts.

Work is counted in *cost units* (one UNet forward pass over one latent at the working size;
a backward is one more): a phase's share of the bar is its steps times the cost of one of its
steps (``step_costs``), so the bar moves at a steady speed. "Time left" adds up, per phase,
the steps still to run times that phase's own measured seconds per step (``StepTimes``; a
phase not yet started: its cost at the seconds per unit measured so far), less the part of
the running step already spent: a phase that runs slower or faster than its cost says changes
its own share only, and the estimate falls steadily instead of jumping when one ends. The
dialog's prepare (protocol 1.2) hands over the steps it did and their times. The speed of
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
# Cost of one step in UNet-forward equivalents (the engine's work count, engine/work.py): a
# LoRA step is a forward and a backward per image (``step_costs``: times ``lora_batch``), a drag
# step a forward and a backward, a denoising step with reference attention runs the original
# and the edited latent together.
STEP_COST = {"load": 1.0, "lora": 2.0, "inversion": 1.0, "drag": 2.0, "denoise": 2.0,
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


def step_costs(params: Mapping[str, Any]) -> dict[str, float]:
    """``STEP_COST`` for resolved method parameters: a LoRA step trains ``lora_batch`` images;
    denoising without reference attention (or Inpaint4Drag's inpainting) runs one latent."""
    costs = dict(STEP_COST)
    costs["lora"] = STEP_COST["lora"] * max(1, int(params.get("lora_batch", 1)))
    if params.get("method") == "inpaint4drag" or not params.get("reference_attention", True):
        costs["denoise"] = 1.0
    return costs


def units(plan: Mapping[str, int], costs: Mapping[str, float] = STEP_COST) -> float:
    return sum(costs.get(phase, 1.0) * steps for phase, steps in plan.items())


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


def estimate_seconds(plan: Mapping[str, int], megapixels: float, speed: float | None,
                     costs: Mapping[str, float] = STEP_COST) -> float | None:
    return None if speed is None else units(plan, costs) * speed * megapixels


def first_guess(device: str) -> float | None:
    return FIRST_GUESS.get(device.split(":")[0])


def remember_speed(speeds: dict[str, float], key: str, measured: float) -> dict[str, float]:
    """Blend a new measurement into the remembered speed (new edits count for half)."""
    old = speeds.get(key)
    return {**speeds, key: measured if old is None else (old + measured) / 2}


# Phases whose steps are UNet work (the others, the working inputs and the final decode, say
# little about the speed of the rest).
UNET_PHASES = ("lora", "inversion", "drag", "denoise")


class StepTimes:
    """Seconds per step of each phase, measured from progress events (``step`` of a phase is
    starting). The time from one event to the next belongs to the earlier event's phase, so
    phases that interleave (GoodDrag's drag and denoising steps) are timed apart; events the
    backend left out (it sends at most 20 a second, always a phase's last step) count the
    steps they skipped. A phase's first timed step carries one-time work (allocation, the
    LoRA's set-up, warm-up): the later steps alone give its speed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        self.first: dict[str, tuple[float, int]] = {}  # phase -> its first timed interval
        self.last: tuple[str, int, float] | None = None  # the step running now: phase, step, since

    def event(self, phase: str, step: int, now: float) -> None:
        if self.last is not None:
            before, before_step, since = self.last
            if phase == before and step <= before_step:
                return  # the same step again: it started at the earlier event
            ran = step - before_step if phase == before else 1
            self.first.setdefault(before, (now - since, ran))
            self.seconds[before] = self.seconds.get(before, 0.0) + now - since
            self.steps[before] = self.steps.get(before, 0) + ran
        self.last = (phase, step, now)

    def _steady(self, phase: str) -> tuple[float, int]:
        """(seconds, steps) of the phase after its first interval: (0, 0) until one follows."""
        seconds, steps = self.seconds.get(phase, 0.0), self.steps.get(phase, 0)
        first_seconds, first_steps = self.first.get(phase, (0.0, 0))
        return seconds - first_seconds, steps - first_steps

    def per_step(self, phase: str) -> float | None:
        seconds, steps = self._steady(phase)
        return seconds / steps if steps else None

    def per_unit(self, costs: Mapping[str, float]) -> float | None:
        """Seconds per cost unit over the UNet phases' timed steps."""
        spent = done = 0.0
        for phase in UNET_PHASES:
            seconds, steps = self._steady(phase)
            spent, done = spent + seconds, done + costs.get(phase, 1.0) * steps
        return spent / done if done > 0 and spent > 0 else None

    def handed_over(self) -> StepTimes:
        """The times measured so far, for another job that goes on from here (the edit that
        joins the dialog's prepare): the step running now is not timed (its end is unseen)."""
        times = StepTimes()
        times.seconds, times.steps = dict(self.seconds), dict(self.steps)
        times.first = dict(self.first)
        return times


class Tracker:
    """Turns progress events into the bar's fraction and the texts shown with it.

    ``costs``: ``step_costs`` of the method; ``prepared``: steps per phase the dialog's prepare
    already did and ``prepared_times`` their ``StepTimes`` (the edit joins that prepare)."""

    def __init__(self, plan: Mapping[str, int], *, sequential: bool = True,
                 drag_end_step: int | None = None, speed: float | None = None,
                 megapixels: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 costs: Mapping[str, float] = STEP_COST,
                 prepared: Mapping[str, int] | None = None,
                 prepared_times: StepTimes | None = None) -> None:
        self.plan = {p: max(0, int(s)) for p, s in plan.items()}
        self.costs = dict(costs)
        self.done = dict.fromkeys(self.plan, 0)
        for phase, steps in (prepared or {}).items():
            if phase in self.plan:
                self.done[phase] = min(self.plan[phase], max(0, int(steps)))
        self.seen: set[str] = set()  # phases that reported at least one step
        self.sequential = sequential  # False for GoodDrag: drag and denoise steps interleave
        self.drag_end_step = drag_end_step
        self.speed = speed  # seconds per unit per megapixel, from earlier edits
        self.megapixels = megapixels
        self.clock = clock
        self.times = prepared_times.handed_over() if prepared_times is not None else StepTimes()
        self.started = clock()
        self.phase = "starting"
        self.step = self.total = 0

    def update(self, phase: str, step: int, total: int) -> None:
        """``step`` of ``total`` in ``phase`` is starting (``step`` steps are done)."""
        previous = self.phase
        self.phase, self.step, self.total = phase, step, total
        if phase not in self.plan:
            return
        self.times.event(phase, step, self.clock())
        self.plan[phase] = max(total, 1)
        if phase not in self.seen:  # this job's own count replaces what a prepare said
            self.done[phase] = min(step, self.plan[phase])
        self.done[phase] = max(self.done[phase], min(step, self.plan[phase]))
        self.seen.add(phase)
        index = PHASE_ORDER.index(phase)
        for earlier in PHASE_ORDER[:index]:
            interleaved = not self.sequential and earlier == "drag" and phase == "denoise"
            if earlier in self.plan and not interleaved:
                self._finish(earlier)
        # GoodDrag drags before each of its first denoising steps until it stops for good:
        # a denoising step that follows another one (or drag_end_step) ends the drag
        if phase == "denoise" and not self.sequential and (
                previous == "denoise" or (self.drag_end_step is not None
                                          and step >= self.drag_end_step)):
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
        total = units(self.plan, self.costs)
        return min(1.0, units(self.done, self.costs) / total) if total > 0 else 0.0

    def elapsed(self) -> float:
        return self.clock() - self.started

    def seconds_per_unit(self) -> float | None:
        """Measured in this edit (and its prepare) once a step ran, else from earlier edits."""
        measured = self.times.per_unit(self.costs)
        if measured is not None:
            return measured
        if self.speed is not None and self.megapixels > 0:
            return self.speed * self.megapixels
        return None

    def remaining(self) -> float | None:
        """The steps left in each phase at that phase's measured seconds per step (a phase not
        timed yet: its cost at the seconds per unit measured so far), less the time the running
        step has already taken (at most its own estimate)."""
        unit = self.seconds_per_unit()
        if unit is None:
            return None
        left = 0.0
        for phase, planned in self.plan.items():
            steps = planned - self.done[phase]
            if steps > 0:
                left += steps * self._per_step(phase, unit)
        running = self.times.last
        if running is not None and running[0] in self.plan:
            phase, _, since = running
            left -= min(self.clock() - since, self._per_step(phase, unit))
        return max(0.0, left)

    def _per_step(self, phase: str, unit: float) -> float:
        measured = self.times.per_step(phase)
        return measured if measured is not None else unit * self.costs.get(phase, 1.0)

    def measured_speed(self) -> float | None:
        """Seconds per unit per megapixel of this edit (to remember), None if too short."""
        measured = self.times.per_unit(self.costs)
        if measured is None or self.megapixels <= 0:
            return None
        return measured / self.megapixels

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
