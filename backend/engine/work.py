"""Work accounting: UNet forward-equivalents per phase, ours and the official codes'.

A *forward-equivalent* (FE) is one UNet forward pass over one latent at the working size. A
batch of n latents counts n; a backward pass counts as one more forward, so a training or drag
step (forward + backward) on one latent is 2 FE. The count is the same on any machine, so a
change in it is a change in work, not in load or hardware.

A forward that stops right after the feature block (the motion loss alone needs nothing after
it: no mask term) is counted as a whole forward, an upper bound; ``truncated`` says how many
there were. What it saves depends on the model and the size: SD1.5 stopped after
``up_blocks[2]`` does 606 of 803 GFLOP at 512² and 143 of 180 at 256² (torch's FLOP counter on
the meta device), about three quarters of a forward.

Phases: ``lora`` (identity LoRA training), ``inversion`` (DDIM inversion to t*),
``reference`` (the undragged features: DragDiffusion's F⁰ at t*, GoodDrag's original
trajectory), ``drag`` (motion-supervision forwards and backwards) and ``denoise``.

``official_work`` counts what the official code (DragDiffusion @ebe659a, GoodDrag @fc01bc1,
docs/algorithms.md §2 and §3) runs for the same settings and the same number of drag steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("lora", "inversion", "reference", "drag", "denoise")


@dataclass
class WorkCounter:
    """Forward-equivalents per phase; ``phase`` is where plain forwards are booked."""

    phase: str = "inversion"
    fe: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    truncated: int = 0

    def forward(self, batch: int, *, truncated: bool = False, phase: str | None = None) -> None:
        self.fe[phase or self.phase] += batch
        self.truncated += batch if truncated else 0

    def backward(self, batch: int = 1, phase: str | None = None) -> None:
        self.fe[phase or self.phase] += batch

    def add(self, phase: str, fe: int) -> None:
        self.fe[phase] += fe

    @property
    def total(self) -> int:
        return sum(self.fe.values())


OFFICIAL_INPAINT_STEPS = 8  # Inpaint4Drag's app (ui_utils.inpaint; its evaluation script: 4)


def inpaint_passes(steps: int, strength: float) -> int:
    """UNet passes of one Inpaint4Drag inpaint: diffusers' inpainting pipelines keep
    ``int(steps · strength)`` of the scheduler's steps (the official app: 8 at strength 1.0, 7
    for SDXL's 0.99), one pass each (guidance 1: no classifier-free batch)."""
    return max(1, min(int(steps * strength), steps))


def official_work(
    method: str,
    *,
    lora_steps: int,
    lora_batch: int,
    n_actual: int,
    drag_steps: int,
    stopped_early: bool = False,
    drag_end_step: int = 7,
    lora_trained: bool = True,
) -> dict[str, int]:
    """Forward-equivalents per phase of the official code for one edit.

    ``n_actual`` is the number of inversion steps (round(n_inference_steps · strength));
    ``drag_steps`` the Adam steps that ran (each a forward and a backward); ``stopped_early``
    whether the drag ended on a stop test, which costs one more forward without a backward.
    ``lora_trained`` false is a re-drag: the official UIs train the LoRA once per image and
    reuse the saved weights, but they invert again on every run.

    DragDiffusion (``run_drag``): LoRA ``steps`` × ``batch`` forward+backward; ``n_actual``
    inversion forwards; one forward for F⁰ and the mask term's DDIM(z⁰) at t*; the drag; then
    ``n_actual`` denoising steps on the batch [original, edited].

    GoodDrag (``good_drag``): the same LoRA and inversion; the original trajectory
    (``get_original_features``) records steps i ≤ t2, i.e. t2 + 1 forwards (one more than the
    t2 steps it drags); the drag; then ``n_actual`` denoising steps on [original, edited].
    """
    if method not in ("dragdiffusion", "gooddrag"):
        raise ValueError(f"unknown method {method!r}")
    reference = 1 if method == "dragdiffusion" else min(drag_end_step + 1, n_actual)
    return {
        "lora": 2 * lora_steps * lora_batch if lora_trained else 0,
        "inversion": n_actual,
        "reference": reference,
        "drag": 2 * drag_steps + (1 if stopped_early else 0),
        "denoise": 2 * n_actual,
    }


def official_defaults(method: str, lora_trained: bool = True) -> dict[str, int]:
    """``official_work`` at the official defaults, 512² and no early stop.

    DragDiffusion: 906 FE per first edit (LoRA 640 of them), 266 per re-drag. GoodDrag: 1,102
    and 542 (70 LoRA steps, strength 0.75 → 38 steps, 7 dragged timesteps × 30 Adam steps).
    Inpaint4Drag: 8 (its LCM steps; plus one VAE encode and one decode, not UNet work).
    """
    if method == "inpaint4drag":
        return {"denoise": OFFICIAL_INPAINT_STEPS}
    if method == "dragdiffusion":
        return official_work(method, lora_steps=80, lora_batch=4, n_actual=35, drag_steps=80,
                             lora_trained=lora_trained)
    return official_work(method, lora_steps=70, lora_batch=4, n_actual=38, drag_steps=7 * 10 * 3,
                         drag_end_step=7, lora_trained=lora_trained)
