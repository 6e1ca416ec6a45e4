"""Method defaults and named presets.

Defaults follow the official code's current settings (DragDiffusion @ebe659a, GoodDrag
@fc01bc1); ``dragdiffusion-paper`` reproduces the first published DragDiffusion settings.
Every field can be overridden per request.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from backend.engine.errors import InvalidInput

METHODS = ("dragdiffusion", "gooddrag")


@dataclass(frozen=True)
class DragParams:
    # Working resolution, as both official codes: width ``work_size``, height from the aspect
    # ratio, both rounded down to multiples of 8. ``work_max_side`` > 0 caps the long side
    # (aspect kept), for small GPUs; 0: no cap.
    work_size: int = 512
    work_max_side: int = 0
    # Identity-preserving LoRA (0 steps disables it).
    lora_steps: int = 80
    lora_lr: float = 5e-4
    lora_rank: int = 16
    lora_batch: int = 4
    # DDIM inversion.
    n_inference_steps: int = 50
    inversion_strength: float = 0.7
    guidance_scale: float = 1.0
    # Latent optimisation (shared names).
    latent_lr: float = 0.01
    lam: float = 0.1
    # UNet up_blocks index whose output is supervised; -1: the first decoder block at full latent
    # resolution (SD1.5: up_blocks[2], 640 channels, as both official codes).
    feature_block: int = -1
    reach_threshold: float = 2.0  # grid pixels (grid = half the working resolution)
    # DragDiffusion.
    drag_steps: int = 80
    r_m: int = 1
    r_p: int = 3
    # GoodDrag (AlDD).
    drag_end_step: int = 7
    track_per_denoise: int = 10
    max_drag_per_track: int = 3
    r1: int = 4
    r2: int = 12
    beta: float = 4.0
    max_track_no_change: int = 10
    drag_loss_threshold: float = 0.0
    # Reference (mutual self-) attention while denoising.
    reference_attention: bool = True
    ref_start_layer: int = 10
    ref_start_step: int = 0
    # Blend at the selection's edge, inside it: working-resolution pixels, scaled to the full
    # image (3 px of a 512-px edit are 23 px of a 4000-px image). Outside the mask: the input.
    feather: int = 3

    def replace(self, **overrides: Any) -> DragParams:
        return dataclasses.replace(self, **overrides)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, DragParams] = {
    "dragdiffusion": DragParams(),
    "gooddrag": DragParams(
        lora_steps=70,
        inversion_strength=0.75,
        latent_lr=0.02,
        lam=0.2,
    ),
    # DragDiffusion v0.0.0 (paper): LoRA rank 16, AdamW 2e-4, 200 steps, batch 1; optimise the
    # latent of the 40th of 50 DDIM steps with Adam lr 0.01, r1 = 1, r2 = 3, λ = 0.1, no CFG,
    # 40 drag steps, no reference attention.
    "dragdiffusion-paper": DragParams(
        lora_steps=200,
        lora_lr=2e-4,
        lora_batch=1,
        inversion_strength=0.8,
        drag_steps=40,
        reference_attention=False,
    ),
}

# Which algorithm each preset runs.
PRESET_METHOD = {"dragdiffusion": "dragdiffusion", "gooddrag": "gooddrag",
                 "dragdiffusion-paper": "dragdiffusion"}

_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(DragParams)}
_CASTS = {"int": int, "float": float, "bool": bool}


def resolve(method: str, overrides: dict[str, Any] | None = None) -> tuple[str, DragParams]:
    """Return (algorithm, params) for a method or preset name plus overrides.

    Raises ``InvalidInput`` for an unknown method, an unknown knob or a value of the wrong type.
    """
    if method not in PRESETS:
        raise InvalidInput(
            f"unknown method {method!r}; choose one of: {', '.join(PRESETS)}"
        )
    params = PRESETS[method]
    clean: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_")
        if key not in _FIELD_TYPES:
            raise InvalidInput(f"unknown parameter {key!r} for method {method!r}")
        kind = _FIELD_TYPES[key]
        if kind == "bool":
            if not isinstance(value, bool):
                raise InvalidInput(f"parameter {key!r} must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"parameter {key!r} must be a number, got {value!r}")
        elif kind == "int" and float(value) != int(value):
            raise InvalidInput(f"parameter {key!r} must be an integer, got {value!r}")
        clean[key] = _CASTS[kind](value)
    params = params.replace(**clean)
    _validate(params)
    return PRESET_METHOD[method], params


def _validate(p: DragParams) -> None:
    checks = [
        (64 <= p.work_size <= 2048, "work_size must be between 64 and 2048"),
        (p.work_max_side == 0 or 64 <= p.work_max_side <= 4096,
         "work_max_side must be 0 (no cap) or between 64 and 4096"),
        (0 <= p.lora_steps <= 2000, "lora_steps must be between 0 and 2000"),
        (1 <= p.lora_rank <= 256, "lora_rank must be between 1 and 256"),
        (1 <= p.lora_batch <= 16, "lora_batch must be between 1 and 16"),
        (p.lora_lr > 0 and p.latent_lr > 0, "learning rates must be positive"),
        (2 <= p.n_inference_steps <= 1000, "n_inference_steps must be between 2 and 1000"),
        (0.0 < p.inversion_strength <= 1.0, "inversion_strength must be in (0, 1]"),
        (p.lam >= 0, "lam must be >= 0"),
        (0 <= p.drag_steps <= 5000, "drag_steps must be between 0 and 5000"),
        (p.r_m >= 0 and p.r_p >= 0 and p.r1 >= 1 and p.r2 >= 0, "radii must be >= 0 (r1 >= 1)"),
        (p.beta > 0, "beta must be positive"),
        (p.drag_end_step >= 0, "drag_end_step must be >= 0"),
        (p.track_per_denoise >= 1 and p.max_drag_per_track >= 1,
         "track_per_denoise and max_drag_per_track must be >= 1"),
        (p.max_track_no_change >= 1, "max_track_no_change must be >= 1"),
        (p.reach_threshold >= 0, "reach_threshold must be >= 0"),
        (p.feature_block >= -1, "feature_block must be -1 (automatic) or an up-block index"),
        (0 <= p.feather <= 64, "feather must be between 0 and 64"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidInput(message)


def defaults_table() -> dict[str, dict[str, Any]]:
    """Every preset's full parameter set (for the protocol's hello reply and --help)."""
    return {name: {"method": PRESET_METHOD[name], **p.as_dict()} for name, p in PRESETS.items()}
