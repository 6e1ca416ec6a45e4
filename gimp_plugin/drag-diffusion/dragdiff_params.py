"""The dialog's parameters: which knobs it shows, their per-method defaults and specs, and the
overrides sent to the backend.

The plug-in keeps no copy of the backend's defaults. They come, newest first, from the
backend's ``hello`` reply, from the copy of the last ``hello`` kept in the plug-in's state
file, or from the table install.py recorded in install.json. A knob at -1 (the PDB value for
"the method's default") shows that method's real default in the dialog. Every value the dialog
shows is sent, so the edit runs at the values the user saw, defaults included; only a knob left
at -1 (a script's call) is left to the backend. No gi here: tested outside GIMP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT = -1  # PDB value of a knob meaning "the chosen method's default"
# What the Method menu (and every line naming a method) calls each method; others by their name.
METHOD_LABELS = {"inpaint4drag": "Inpaint4Drag (instant)", "dragdiffusion": "DragDiffusion",
                 "gooddrag": "GoodDrag", "dragdiffusion-paper": "DragDiffusion (paper settings)",
                 "fast": "Fast"}


def method_label(method: str) -> str:
    """The method's name for people, as the Method menu shows it."""
    return METHOD_LABELS.get(method, method)
# The working width of both official codes: the estimate's width when no backend's table is
# known (a table's own value wins; the demo model's is 128).
OFFICIAL_WORK_SIZE = 512


class ParamsError(ValueError):
    """The settings the user typed can't be used; the text says what to write instead."""


@dataclass(frozen=True)
class Knob:
    """One numeric dialog knob: its GIMP property, engine parameter and PDB range."""

    prop: str
    param: str
    nick: str
    is_int: bool
    pdb_max: float
    advanced: bool = False
    only: str | None = None  # the one algorithm that uses it, if only one does


KNOBS = (
    Knob("lora-steps", "lora_steps", "LoR_A steps", True, 2000),
    Knob("drag-steps", "drag_steps", "_Drag steps", True, 5000, only="dragdiffusion"),
    Knob("inversion-strength", "inversion_strength", "_Inversion strength", False, 1.0),
    Knob("work-size", "work_size", "_Working width (px)", True, 2048),
    Knob("latent-lr", "latent_lr", "Latent lear_ning rate", False, 1.0, advanced=True),
    Knob("lam", "lam", "Mask-keepin_g weight (λ)", False, 100.0, advanced=True),
    Knob("n-inference-steps", "n_inference_steps", "Di_ffusion steps", True, 1000,
         advanced=True),
    Knob("inpaint-steps", "inpaint_steps", "Inpaint step_s", True, 50, only="inpaint4drag"),
    Knob("inpaint-kernel", "inpaint_kernel", "Inpaint ma_rgin (px at 512)", True, 25,
         advanced=True, only="inpaint4drag"),
)
KNOB_BY_PROP = {k.prop: k for k in KNOBS}


@dataclass(frozen=True)
class Spec:
    """What the backend says about one parameter: range, dialog step, one-line help."""

    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    help: str = ""
    methods: tuple[str, ...] | None = None  # the algorithms that read it (protocol 1.1)

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Spec:
        def number(name: str) -> float | None:
            value = data.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            return None

        methods = data.get("methods")
        return cls(number("min"), number("max"), number("step"), str(data.get("help") or ""),
                   tuple(str(m) for m in methods) if isinstance(methods, list) else None)


@dataclass
class ParamTable:
    """Per-method defaults, parameter specs and method descriptions, from one source."""

    methods: dict[str, dict[str, Any]]
    specs: dict[str, Spec] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    default_method: str = ""  # the backend's; else the table's first method
    source: str = ""

    @classmethod
    def parse(cls, data: Mapping[str, Any], source: str) -> ParamTable | None:
        """From a ``hello`` reply (or the same fields as recorded); None when it has no table."""
        methods = data.get("methods")
        if not isinstance(methods, Mapping) or not methods:
            return None
        specs = data.get("parameters") or {}
        descriptions = data.get("descriptions") or {}
        return cls(
            methods={str(k): dict(v) for k, v in methods.items() if isinstance(v, Mapping)},
            specs={str(k): Spec.parse(v) for k, v in specs.items() if isinstance(v, Mapping)},
            descriptions={str(k): str(v) for k, v in descriptions.items()},
            default_method=str(data.get("default_method") or next(iter(methods))),
            source=source)

    def default(self, method: str, param: str) -> float | None:
        value = self.methods.get(method, {}).get(param)
        return float(value) if isinstance(value, (int, float)) else None

    def resolved(self, method: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The method's full parameters with ``overrides`` applied (for estimates)."""
        return {**self.methods.get(method, {}), **overrides}

    def algorithm(self, method: str) -> str:
        return str(self.methods.get(method, {}).get("method") or method)

    def uses(self, knob: Knob, method: str) -> bool:
        """Whether ``method``'s algorithm reads ``knob`` (the backend's spec says, else the
        knob's own ``only``); the dialog greys out the others."""
        algorithm = self.algorithm(method)
        spec = self.specs.get(knob.param)
        if spec is not None and spec.methods is not None:
            return algorithm in spec.methods
        return knob.only is None or knob.only == algorithm

    def describe(self, method: str) -> str:
        return self.descriptions.get(method, "")

    def knob_range(self, knob: Knob) -> tuple[float, float, float]:
        """(lower, upper, step) for the dialog widget: the spec's, inside the PDB range."""
        spec = self.specs.get(knob.param, Spec())
        lower = max(0.0, spec.minimum if spec.minimum is not None else 0.0)
        upper = min(knob.pdb_max, spec.maximum if spec.maximum is not None else knob.pdb_max)
        step = spec.step or (1.0 if knob.is_int else _float_step(self.methods, knob.param))
        return lower, max(lower, upper), step


def working_width(resolved: Mapping[str, Any]) -> float:
    """The working width of an edit with these parameters (``ParamTable.resolved``, or the
    bare overrides when no table is known)."""
    value = resolved.get("work_size")
    return float(value) if isinstance(value, (int, float)) else float(OFFICIAL_WORK_SIZE)


def _float_step(methods: Mapping[str, Mapping[str, Any]], param: str) -> float:
    """A step one decimal below the smallest default, e.g. 0.001 for 0.01 (no spec known)."""
    values = [abs(float(m[param])) for m in methods.values()
              if isinstance(m.get(param), (int, float)) and m[param]]
    if not values:
        return 0.01
    return 10.0 ** (math.floor(math.log10(min(values))) - 1)


def load_table(hello: Mapping[str, Any] | None, state: Mapping[str, Any],
               install: Mapping[str, Any]) -> ParamTable | None:
    """The newest table available: live ``hello``, the state file's copy, install.json's."""
    for data, source in ((hello, "backend"), (state.get("hello"), "last backend contact"),
                         (install.get("parameters"), "install.json")):
        if isinstance(data, Mapping):
            table = ParamTable.parse(data, source)
            if table is not None:
                return table
    return None


# --- knob values ---------------------------------------------------------------------------------

def shown_values(table: ParamTable, method: str, values: Mapping[str, float]) -> dict[str, float]:
    """Knob values for the dialog: a knob at -1 shows the method's real default."""
    out = dict(values)
    for knob in KNOBS:
        if out.get(knob.prop, DEFAULT) < 0:
            default = table.default(method, knob.param)
            if default is not None:
                out[knob.prop] = default
    return out


def follow_method(table: ParamTable, old: str, new: str,
                  values: Mapping[str, float]) -> dict[str, float]:
    """Knob values after the method changed: a knob showing the old method's default moves to
    the new method's default; a value the user typed stays."""
    out = dict(values)
    for knob in KNOBS:
        value = out.get(knob.prop, DEFAULT)
        before, after = table.default(old, knob.param), table.default(new, knob.param)
        if after is not None and (value < 0 or (before is not None and _same(value, before))):
            out[knob.prop] = after
    return out


def stored_values(table: ParamTable | None, method: str,
                  values: Mapping[str, float]) -> dict[str, float]:
    """Knob values to remember: -1 where the knob shows the method's default, so a later
    change of the backend's defaults is followed."""
    out = dict(values)
    for knob in KNOBS:
        default = table.default(method, knob.param) if table else None
        if default is not None and _same(out.get(knob.prop, DEFAULT), default):
            out[knob.prop] = DEFAULT
    return out


def overrides(values: Mapping[str, float], advanced: str) -> dict[str, Any]:
    """The parameters to send: every knob that holds a value (the dialog shows each method's
    default as a value, so a value equal to the default is sent and runs as shown; -1 leaves
    the knob to the backend), then the ``advanced`` JSON object (any other engine parameter)
    merged over them."""
    params: dict[str, Any] = {}
    for knob in KNOBS:
        value = values.get(knob.prop, DEFAULT)
        if value >= 0:
            params[knob.param] = round(value) if knob.is_int else float(value)
    params.update(parse_advanced(advanced))
    return params


def parse_advanced(advanced: str) -> dict[str, Any]:
    advanced = advanced.strip()
    if not advanced:
        return {}
    try:
        extra = json.loads(advanced)
    except json.JSONDecodeError as exc:
        raise ParamsError(f"The advanced settings are not valid JSON ({exc.msg} at character "
                          f"{exc.pos}); write an object such as "
                          '{"r_m": 1, "feather": 5}.') from None
    if not isinstance(extra, dict):
        raise ParamsError('The advanced settings must be a JSON object such as '
                          '{"r_m": 1, "feather": 5}.')
    return {str(k).replace("-", "_"): v for k, v in extra.items()}


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


# --- the plug-in's state file --------------------------------------------------------------------

def read_state(path: Path) -> dict[str, Any]:
    """The plug-in's remembered state (last hello, typed values, measured speed); {} if none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(path: Path, **changes: Any) -> None:
    """Update some top-level entries of the state file (written atomically)."""
    state = read_state(path)
    state.update(changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
    tmp.replace(path)
