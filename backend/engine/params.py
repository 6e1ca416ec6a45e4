"""Method defaults and named presets.

Defaults follow the official code's current settings (DragDiffusion @ebe659a, GoodDrag
@fc01bc1, Inpaint4Drag @126ac0c); ``dragdiffusion-paper`` reproduces the first published
DragDiffusion settings.
Every field can be overridden per request; ``SPECS`` says what each knob accepts (type,
range, dialog step, help line), and ``resolve`` checks every override against it.

``MethodTable`` is the one table of what an engine runs: these presets with the served model's
own defaults (its ``preset.json``) applied. A server's ``hello`` sends it, the plug-in shows
and estimates with it, install.py records it, and every request is checked against it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backend.engine.errors import InvalidInput
from backend.engine.imageops import working_size
from backend.engine.types import DEFAULT_METHOD

METHODS = ("dragdiffusion", "gooddrag", "inpaint4drag")
# Methods that optimise a latent of a plain text-to-image model (SD1.5); inpaint4drag warps
# pixels and inpaints (engine/inpaint4drag.py) and reads the mask as the region that moves.
LATENT_METHODS = ("dragdiffusion", "gooddrag")


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
    # Inpaint4Drag: the inpainting mask's dilation and outline width (pixels of the official
    # 512-px canvas, scaled to the layer; odd, as the official), the inpainter's steps and
    # strength (LCM: 8 steps, strength 1.0; SDXL inpainting runs 0.99, its model default).
    inpaint_kernel: int = 5
    inpaint_steps: int = 8
    inpaint_strength: float = 1.0

    def replace(self, **overrides: Any) -> DragParams:
        return dataclasses.replace(self, **overrides)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, DragParams] = {
    # Inpaint4Drag (official app): warp at the layer's resolution, inpaint the revealed area in
    # 8 LCM steps at strength 1.0, pasted back hard (no feather) as the official composite.
    "inpaint4drag": DragParams(lora_steps=0, feather=0),
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
    # DragDiffusion at about a quarter of the work (docs/benchmarks.md, "The fast preset"): an eighth of the LoRA
    # samples (20 steps × batch 2 = 40 against 80 × 4 = 320) at 4× its learning rate, 25 DDIM steps (18 inverted: t* is
    # still 681), at most 40 drag steps at twice the step. ≤ 215 UNet forward-equivalents
    # per first edit instead of 906, ≤ 98 per re-drag instead of 266.
    "fast": DragParams(
        lora_steps=20,
        lora_lr=2e-3,
        lora_batch=2,
        n_inference_steps=25,
        drag_steps=40,
        latent_lr=0.02,
    ),
}

# Which algorithm each preset runs.
PRESET_METHOD = {"dragdiffusion": "dragdiffusion", "gooddrag": "gooddrag",
                 "dragdiffusion-paper": "dragdiffusion", "fast": "dragdiffusion",
                 "inpaint4drag": "inpaint4drag"}

# One line per method or preset: what it does and when to pick it (the dialog shows it).
DESCRIPTIONS = {
    "dragdiffusion": "DragDiffusion: trains a small identity LoRA, then optimises one inverted "
                     "latent; faithful to the paper and steady, about a minute per edit on a GPU.",
    "gooddrag": "GoodDrag: alternates small drags with denoising steps; keeps detail better on "
                "long drags, takes somewhat longer.",
    "dragdiffusion-paper": "DragDiffusion with the paper's first published settings (longer "
                           "LoRA, 40 drag steps, no reference attention); for comparisons.",
    "fast": "DragDiffusion with a short LoRA, 25 DDIM steps and fewer, larger drag steps: about "
            "a quarter of the work, measured to keep the edit on the demo model.",
    "inpaint4drag": "Inpaint4Drag: the selection is the region that moves; its pixels are "
                    "warped along the drags at once, then the area left behind is inpainted in "
                    "a few steps. Seconds instead of minutes; the moved content keeps every "
                    "pixel.",
}


@dataclass(frozen=True)
class ParamSpec:
    """What a knob accepts: its type, closed range [low, high], the dialog's step, a help line."""

    kind: str  # "int", "float" or "bool"
    low: float = 0
    high: float = 0
    step: float = 1
    help: str = ""

    def allowed(self) -> str:
        if self.kind == "bool":
            return "true or false"
        what = "an integer" if self.kind == "int" else "a number"
        return f"{what} from {self.low:g} to {self.high:g}"

    def check(self, name: str, value: Any) -> int | float | bool:
        """``value`` as this knob's type, or ``InvalidInput`` naming the knob and its range."""
        def bad() -> InvalidInput:
            return InvalidInput(f"parameter {name!r} must be {self.allowed()}, got {value!r:.40}")

        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad()
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise bad()
        if self.kind == "int":
            if value != int(value):
                raise bad()
            return int(value)
        return float(value)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "help": self.help}
        if self.kind != "bool":
            out.update(min=self.low, max=self.high, step=self.step)
        return out


def _int(low: int, high: int, step: int, help: str) -> ParamSpec:
    return ParamSpec("int", low, high, step, help)


def _float(low: float, high: float, step: float, help: str) -> ParamSpec:
    return ParamSpec("float", low, high, step, help)


SPECS: dict[str, ParamSpec] = {
    "work_size": _int(64, 2048, 64, "working width in pixels, height from the aspect ratio "
                      "(both rounded down to multiples of 8, as the official codes); larger is "
                      "slower and needs more memory"),
    "work_max_side": _int(0, 4096, 64, "cap on the working long side for small GPUs: a "
                          "working size longer than this (e.g. a tall portrait) is shrunk to "
                          "it, aspect kept (0: no cap)"),
    "lora_steps": _int(0, 2000, 10, "training steps of the identity LoRA that keeps the image "
                       "recognisable (0: no LoRA, fastest, less faithful)"),
    "lora_lr": _float(1e-6, 0.1, 1e-4, "learning rate of the identity LoRA"),
    "lora_rank": _int(1, 256, 1, "rank of the identity LoRA"),
    "lora_batch": _int(1, 16, 1, "images per LoRA step (more: steadier training, more memory)"),
    "n_inference_steps": _int(2, 1000, 1, "DDIM steps of the full schedule"),
    "inversion_strength": _float(0.01, 1.0, 0.05, "how far the image is inverted into noise "
                                 "(fraction of the schedule); higher allows larger changes"),
    "latent_lr": _float(1e-5, 1.0, 0.005, "step size of the latent optimisation; too high "
                        "breaks the image, too low moves little"),
    "lam": _float(0.0, 100.0, 0.05, "weight of the term that keeps the region outside the "
                  "selection unchanged while dragging"),
    "feature_block": _int(-1, 3, 1, "UNet decoder block whose features are supervised "
                          "(-1: automatic, the official choice)"),
    "reach_threshold": _float(0.0, 64.0, 0.5, "a handle this close to its target (feature-grid "
                              "pixels) counts as arrived"),
    "drag_steps": _int(0, 5000, 10, "DragDiffusion: most latent optimisation steps"),
    "r_m": _int(0, 32, 1, "DragDiffusion: radius of the motion-supervision patch"),
    "r_p": _int(0, 64, 1, "DragDiffusion: radius searched when tracking a handle"),
    "drag_end_step": _int(0, 1000, 1, "GoodDrag: denoising steps during which it drags"),
    "track_per_denoise": _int(1, 100, 1, "GoodDrag: point-tracking rounds per denoising step"),
    "max_drag_per_track": _int(1, 100, 1, "GoodDrag: drag steps between two trackings"),
    "r1": _int(1, 32, 1, "GoodDrag: radius of the motion-supervision patch"),
    "r2": _int(0, 64, 1, "GoodDrag: radius searched when tracking a handle"),
    "beta": _float(0.01, 100.0, 0.5, "GoodDrag: how far ahead of a handle the supervision "
                   "looks (feature-grid pixels)"),
    "max_track_no_change": _int(1, 1000, 1, "GoodDrag: stop after this many trackings in which "
                                "no handle moved"),
    "drag_loss_threshold": _float(0.0, 1e6, 0.1, "GoodDrag: a drag loss at or below this ends a "
                                  "tracking round early (0: never)"),
    "reference_attention": ParamSpec("bool", help="while denoising, attend to the original "
                                     "image so the identity is kept"),
    "ref_start_layer": _int(0, 16, 1, "first transformer block (of 16) that uses reference "
                            "attention"),
    "ref_start_step": _int(0, 1000, 1, "first denoising step that uses reference attention"),
    "feather": _int(0, 64, 1, "width in pixels of the blend at the selection's edge "
                    "(Inpaint4Drag: at the inpainted area's edge)"),
    "inpaint_kernel": _int(0, 25, 1, "Inpaint4Drag: how far the inpainted area reaches around "
                           "the revealed pixels and the moved region's outline, in pixels of a "
                           "512-px image (scaled to the layer, made odd; 0: only the revealed "
                           "pixels)"),
    "inpaint_steps": _int(1, 50, 1, "Inpaint4Drag: inpainting steps (8 with an LCM inpainting "
                          "model, as the official; more for the demo model's filler)"),
    "inpaint_strength": _float(0.05, 1.0, 0.01, "Inpaint4Drag: how much of the revealed area's "
                               "old content is replaced (1.0: all of it; SDXL inpainting uses "
                               "0.99)"),
}
assert {f.name: f.type for f in dataclasses.fields(DragParams)} == {
    name: spec.kind for name, spec in SPECS.items()}, "SPECS must describe every DragParams field"

# The algorithms that read each knob (a dialog greys out the others); a knob not listed here is
# read by every algorithm.
_GOODDRAG_ONLY = ("drag_end_step", "track_per_denoise", "max_drag_per_track", "r1", "r2",
                  "beta", "max_track_no_change", "drag_loss_threshold")
USED_BY: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("lora_steps", "lora_lr", "lora_rank", "lora_batch", "n_inference_steps",
                     "inversion_strength", "latent_lr", "lam", "feature_block",
                     "reach_threshold", "reference_attention", "ref_start_layer",
                     "ref_start_step"), LATENT_METHODS),
    **dict.fromkeys(("drag_steps", "r_m", "r_p"), ("dragdiffusion",)),
    **dict.fromkeys(_GOODDRAG_ONLY, ("gooddrag",)),
    **dict.fromkeys(("inpaint_kernel", "inpaint_steps", "inpaint_strength"), ("inpaint4drag",)),
}
assert set(USED_BY) <= set(SPECS)

# The knobs the identity LoRA (``lora.lora_cache_key``) and the inverted latent
# (``redrag.redrag_key``) are computed from, besides the image, the prompt, the seed, the
# algorithm (its LoRA crops) and the model: two requests that agree on these share both, so a
# submit joins a prepare that matches (protocol 1.2, ``prepare``).
PREPARED_KNOBS = ("work_size", "work_max_side", "lora_steps", "lora_lr", "lora_rank",
                  "lora_batch", "n_inference_steps", "inversion_strength", "feature_block")


def prepared_settings(algorithm: str, params: DragParams) -> dict[str, Any]:
    """What a prepare's work depends on besides the image, the prompt and the seed: for the
    latent methods the algorithm and ``PREPARED_KNOBS``; Inpaint4Drag's prepare only warms its
    filler, which depends on nothing of the request."""
    if algorithm not in LATENT_METHODS:
        return {"algorithm": algorithm}
    return {"algorithm": algorithm, **{name: getattr(params, name) for name in PREPARED_KNOBS}}


# The most work one edit may ask for, in UNet forward-pass equivalents at 512×512 (a
# backward pass counts as one more): about 40 times a default DragDiffusion edit (~900).
MAX_WORK = 40_000

# What one UNet pass costs on a working canvas of r = w·h / 512², in passes at 512²: SD1.5 does
# 803 GFLOP at 512² and 4,674 at 1024² (torch's FLOP counter on the meta device), of which the
# self-attention's query-key and attention-value products, 122 GFLOP at 512², grow with the
# square of the token count, the rest with the count: 0.848·r + 0.152·r². A 64×65,536 strip
# (r = 16) costs 52 passes at 512² per pass, not 16.
ATTENTION_SHARE = 0.152
# The VAE's encode and decode of one edit: 1,117 + 2,515 GFLOP at 512², 4.5 UNet passes; the
# attention of their mid blocks is 1.9 % of it (69 GFLOP at 512²), quadratic likewise.
VAE_PASSES, VAE_ATTENTION_SHARE = 4.52, 0.019

# The most memory one edit may need at its peak, estimated for SD1.5 in half precision: the
# memory of the largest single GPU. ``python -m backend memory`` (LoRA one image at a time, as
# the engine falls back to) measures 2.79, 4.20 and 9.81 GB at working canvases of 256², 512²
# and 1024² (GoodDrag 9.96): 2.3 GB (the weights and what every edit keeps) plus 1.92 GB per
# 512² of canvas, all of it the drag's forward and backward (attention runs memory-efficient,
# linear in the tokens). A CPU, in single precision, needs about twice as much.
MAX_MEMORY = 80e9
MEMORY_FIXED, MEMORY_PER_CANVAS = 2.3e9, 1.92e9


def _relative_area(canvas: tuple[float, float]) -> float:
    return canvas[0] * canvas[1] / 512**2


def pass_cost(canvas: tuple[float, float], attention_share: float = ATTENTION_SHARE) -> float:
    """One pass over a ``canvas`` = (w, h), in passes at 512² (see ``ATTENTION_SHARE``)."""
    r = _relative_area(canvas)
    return (1 - attention_share) * r + attention_share * r * r


def estimated_work(algorithm: str, p: DragParams,
                   canvas: tuple[float, float] | None = None) -> float:
    """UNet forward-pass equivalents at 512² an edit with these settings needs, roughly (the
    VAE's encode and decode included): on a ``canvas`` = (w, h) working canvas, or on a square
    one of side ``work_size``. A pass over a larger canvas costs more than its area says:
    attention grows with the square of the tokens (``pass_cost``)."""
    canvas = canvas if canvas is not None else (p.work_size, p.work_size)
    if algorithm == "inpaint4drag":  # the inpainter's steps on the crop at the working size
        return (p.inpaint_steps * pass_cost(canvas)
                + VAE_PASSES * pass_cost(canvas, VAE_ATTENTION_SHARE))
    steps = p.n_inference_steps * p.inversion_strength
    lora = 2 * p.lora_steps * p.lora_batch
    passes = steps  # inversion (no classifier-free guidance, as both official codes)
    passes += steps * (2 if p.reference_attention else 1)  # denoising
    if algorithm == "gooddrag":
        drag = 2 * min(p.drag_end_step, steps) * p.track_per_denoise * p.max_drag_per_track
    else:
        drag = 2 * p.drag_steps
    vae = VAE_PASSES * pass_cost(canvas, VAE_ATTENTION_SHARE)
    return (lora + passes + drag) * pass_cost(canvas) + vae


def estimated_memory(canvas: tuple[float, float]) -> float:
    """Bytes an edit needs at its peak on a ``canvas`` = (w, h) working canvas, SD1.5 in half precision
    (see ``MAX_MEMORY``): the same for every method and setting, as the peak is one image's
    forward and backward pass."""
    return MEMORY_FIXED + MEMORY_PER_CANVAS * _relative_area(canvas)


def _fits(algorithm: str, p: DragParams, canvas: tuple[float, float]) -> bool:
    return (estimated_memory(canvas) <= MAX_MEMORY
            and estimated_work(algorithm, p, canvas) <= MAX_WORK)


def check_canvas(algorithm: str, p: DragParams, canvas: tuple[int, int]) -> None:
    """Refuse an edit whose working canvas (a tall or wide image: the width is ``work_size``,
    the height follows the aspect ratio) needs more memory than ``MAX_MEMORY`` or asks for more
    work than ``MAX_WORK``, naming the cap on its long side that fits (a value ``work_max_side``
    takes); the server runs this, through ``MethodTable.resolve``, before it accepts a job."""
    if _fits(algorithm, p, canvas):
        return
    long, short = max(canvas), min(canvas)

    def capped(side: int) -> tuple[float, float]:
        # the capped short side is rounded to a multiple of 8: allow for it rounding up
        return side, short * side / long + 8

    # the largest multiple of 8 that fits and that the knob takes: binary search
    low, high = 0, min(long, int(SPECS["work_max_side"].high)) // 8
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _fits(algorithm, p, capped(8 * mid)) else (low, mid - 1)
    fix = (f"cap its long side with work_max_side (at most {8 * low})" if low
           else "lower the settings")
    memory, need = estimated_memory(canvas), estimated_work(algorithm, p, canvas)
    if memory > MAX_MEMORY:
        raise InvalidInput(
            f"this image's working canvas is {canvas[0]}×{canvas[1]}, which needs about "
            f"{memory / 1e9:,.0f} GB of memory at its peak, more than the limit of "
            f"{MAX_MEMORY / 1e9:,.0f} GB; {fix} or crop the image")
    raise InvalidInput(
        f"this image's working canvas is {canvas[0]}×{canvas[1]}, which asks for about "
        f"{need:,.0f} UNet passes, more than the limit of {MAX_WORK:,}; {fix} or crop the image")


def checked_knobs(overrides: Mapping[str, Any] | None, method: str = "") -> dict[str, Any]:
    """``overrides`` with each knob's name and value checked against ``SPECS`` (``-`` in a name
    read as ``_``); ``InvalidInput`` names an unknown knob or a value its knob does not take."""
    clean: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if not isinstance(key, str):
            raise InvalidInput(f"parameter names must be text, got {key!r:.40}")
        name = key.replace("-", "_")
        spec = SPECS.get(name)
        if spec is None:
            where = f" for method {method!r}" if method else ""
            raise InvalidInput(f"unknown parameter {name!r:.40}{where}; known: "
                               f"{', '.join(SPECS)}")
        clean[name] = spec.check(name, value)
    return clean


def resolve(method: str, overrides: Mapping[str, Any] | None = None) -> tuple[str, DragParams]:
    """Return (algorithm, params) for a method or preset name plus overrides, on a model without
    defaults of its own (``MethodTable.resolve`` is the engine's, with its model's and the
    image's).

    Raises ``InvalidInput`` naming the problem: an unknown method or knob, a value of the wrong
    type, outside its range (``SPECS``) or not finite, or settings that ask for too much work.
    """
    if not isinstance(method, str) or method not in PRESETS:
        raise InvalidInput(f"unknown method {method!r:.40}; choose one of: {', '.join(PRESETS)}")
    clean = checked_knobs(overrides, method)
    algorithm = PRESET_METHOD[method]
    params = PRESETS[method].replace(**clean)
    need = estimated_work(algorithm, params)
    if need > MAX_WORK:
        raise InvalidInput(
            f"these settings ask for about {need:,.0f} UNet passes, more than the limit of "
            f"{MAX_WORK:,} (the {method} defaults need about "
            f"{estimated_work(algorithm, PRESETS[method]):,.0f}); lower work_size, lora_steps, "
            "lora_batch, drag_steps or (GoodDrag) track_per_denoise × max_drag_per_track")
    return algorithm, params


def parse_assignments(items: list[str], option: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` strings (command-line overrides) → knob values of each knob's type.

    Raises ``InvalidInput`` for a malformed item, an unknown knob or a value that its knob does
    not accept (same checks as ``resolve``).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        name = key.strip().replace("-", "_")
        if not sep or not name:
            raise InvalidInput(f"{option} {item!r}: use KEY=VALUE, e.g. {option} drag_steps=40")
        spec = SPECS.get(name)
        if spec is None:
            raise InvalidInput(f"{option} {item!r}: unknown parameter {name!r}; known: "
                               f"{', '.join(SPECS)}")
        text = text.strip()
        value: Any = text
        if spec.kind == "bool" and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            value = text.lower() in ("true", "1", "yes")
        elif spec.kind != "bool":
            with contextlib.suppress(ValueError):  # not a number: refused by check below
                value = float(text)
        try:
            out[name] = spec.check(name, value)
        except InvalidInput as exc:
            raise InvalidInput(f"{option} {item!r}: {exc}") from None
    return out


def spec_table() -> dict[str, dict[str, Any]]:
    """Every knob's type, range, dialog step, help line and the algorithms that read it
    (msgpack/JSON-safe)."""
    return {name: {**spec.as_dict(), "methods": list(USED_BY.get(name, METHODS))}
            for name, spec in SPECS.items()}


def method_descriptions() -> dict[str, str]:
    """One line per method or preset (empty for a preset nobody described yet)."""
    return {name: DESCRIPTIONS.get(name, "") for name in PRESETS}


def served_algorithms(plain_model: bool) -> tuple[str, ...]:
    """The algorithms a backend runs: all of them with a plain text-to-image model (SD1.5 or the
    demo model; Inpaint4Drag then fills with it when no inpainting model is given), only those
    that need none (Inpaint4Drag, on its inpainting model) without."""
    if plain_model:
        return METHODS
    return tuple(name for name in METHODS if name not in LATENT_METHODS)


@dataclass(frozen=True)
class MethodTable:
    """What an engine runs: the methods and presets of the ``algorithms`` its models run, every
    one's parameters with the served model's own defaults (``model_params``, the ``params`` of
    its ``preset.json``) applied, and the method a client preselects (``default_method``).

    The one table of defaults: ``as_hello`` is what a server announces and install.py records
    (the plug-in shows and estimates with it), and ``resolve`` checks a request against it, on
    the request's own image, and gives the parameters the engine runs. A request that leaves a
    knob out gets the value this table shows for it.
    """

    model_params: Mapping[str, Any] = field(default_factory=dict)
    algorithms: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        algorithms = tuple(self.algorithms)
        if not algorithms or not set(algorithms) <= set(METHODS):
            raise ValueError(f"algorithms must be some of {METHODS}, not {algorithms!r}")
        object.__setattr__(self, "algorithms", algorithms)
        # The model's own defaults must be valid knobs for every algorithm, checked once here
        # (InvalidInput).
        clean = checked_knobs(self.model_params)
        for algorithm in algorithms:
            resolve(algorithm, clean)
        object.__setattr__(self, "model_params", clean)

    @property
    def names(self) -> list[str]:
        """The methods and presets these models run, in ``PRESETS`` order."""
        return [name for name in PRESETS if PRESET_METHOD[name] in self.algorithms]

    @property
    def default_method(self) -> str:
        """The engine's ``DEFAULT_METHOD`` when these models run it, else the first of
        ``METHODS`` they run: the one decision of what a request that names no method runs and
        what a dialog or command line preselects."""
        if PRESET_METHOD[DEFAULT_METHOD] in self.algorithms:
            return DEFAULT_METHOD
        return next(name for name in METHODS if name in self.algorithms)

    def params(self, method: str) -> DragParams:
        """A method's or preset's defaults on this model (``KeyError`` for an unknown name)."""
        return PRESETS[method].replace(**self.model_params)

    def methods(self) -> dict[str, dict[str, Any]]:
        """Every method or preset these models run → ``{method: its algorithm, knob: default,
        …}``."""
        return {name: {"method": PRESET_METHOD[name], **self.params(name).as_dict()}
                for name in self.names}

    def as_hello(self) -> dict[str, Any]:
        """The table as a ``hello`` reply carries it (msgpack/JSON-safe)."""
        descriptions = method_descriptions()
        return {"methods": self.methods(), "parameters": spec_table(),
                "descriptions": {name: descriptions[name] for name in self.names},
                "default_method": self.default_method}

    def resolve(self, method: str, overrides: Mapping[str, Any] | None = None,
                size: tuple[int, int] | None = None) -> tuple[str, DragParams]:
        """(algorithm, params) the engine runs for ``method`` (empty: ``default_method``) with
        ``overrides`` on a ``size`` = (width, height) image: the method must be one these models
        run; knobs left
        out take this table's values; each given one is checked against ``SPECS``; the
        settings must fit ``MAX_WORK`` on that image's working canvas (a tall or wide image
        counts its whole height or width). Raises ``InvalidInput`` naming the problem."""
        method = method or self.default_method
        algorithm, params = resolve(method, {**self.model_params, **checked_knobs(overrides,
                                                                                  method)})
        if algorithm not in self.algorithms:
            raise InvalidInput(self._not_served(method, algorithm))
        if size is not None:
            check_canvas(algorithm, params, working_size(*size, params.work_size,
                                                         params.work_max_side))
        return algorithm, params

    def _not_served(self, method: str, algorithm: str) -> str:
        choose = f"choose {' or '.join(self.names)}"
        if algorithm in LATENT_METHODS:
            return (f"{method} needs a plain Stable Diffusion 1.5 model, and this backend serves "
                    f"only the inpainting model: {choose}, or restart the backend with --model")
        return f"this backend does not run {method}: {choose}"
