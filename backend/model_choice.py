"""Which models a command serves: the ones asked for, else the catalogue's installed sets,
else Stable Diffusion 1.5, else the demo.

One decision for ``serve``, ``drag`` and install.py. A ``--model`` that is missing is an error to
fix; ``--model none`` (with an inpainting model) serves no plain model, only Inpaint4Drag. The
default model (SD1.5, the catalogue's ``sd15``) that is missing from the Hugging Face cache is
replaced by the small demo model that ships in ``backend/demo/model``, and the user is told once
how to get SD1.5 (``Fallback.notice``: the dialog's Download or ``python -m backend models get
sd15``). Nothing here downloads: serving starts at once, and a download (the dialog's, through
the backend's ``download`` request, or the command's) is one code with progress, Cancel and
checksums, after which the backend loads the set without a restart. Without ``--inpaint-model`` Inpaint4Drag runs on
the first installed inpainting set of the catalogue (``instant``, then ``instant-xl``: the
model, its LCM-LoRA and tiny VAE), else fills with the plain model (``serve_plan``).

Torch is imported only by the functions that read a model folder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.engine.errors import ModelNotFound
from backend.hub.catalogue import get_hint

if TYPE_CHECKING:
    from backend.engine.params import MethodTable
    from backend.hub.store import Store

# The trained demo model that ships with the project (a diffusers folder with its preset.json).
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo" / "model"
DEMO_NAME = "backend/demo/model"
# ``--model none``: no plain model; an inpainting model (``--inpaint-model``) serves Inpaint4Drag.
NO_PLAIN_MODEL = "none"
PLAIN_SET = "sd15"  # the catalogue's set of the default plain model
DEMO_HINT = (f"to edit photos, get Stable Diffusion 1.5: {get_hint(PLAIN_SET)} (docs/models.md), "
             "or give --model PATH (an SD1.5 diffusers folder or .safetensors/.ckpt file)")


@dataclass(frozen=True)
class Fallback:
    """What stands in when the default model is missing: the demo model that ships with the
    project. ``load`` loads it; ``hint`` tells the user how to get the real model."""

    name: str
    load: Callable[[], Any]
    hint: str = DEMO_HINT

    def notice(self, verb: str = "serving") -> str:
        """One line for the user while it stands in."""
        return f"{verb} the demo model {self.name}, fit for simple shapes only: {self.hint}"


def default_plain_model() -> str:
    """The default plain model: the repository of the catalogue's ``sd15`` set (the engine's
    ``DEFAULT_MODEL``, unless ``DRAG_DIFFUSION_CATALOGUE`` points the set elsewhere)."""
    from backend.hub.catalogue import load_catalogue

    piece = load_catalogue().get(PLAIN_SET).piece("model")
    assert piece is not None, "the catalogue's sd15 set has no plain model"
    return piece.repo


def plain_model(requested: str | None) -> str | None:
    """The plain model to load for ``--model requested``: SD1.5 when none is given, None for
    ``--model none``."""
    if requested is None:
        return default_plain_model()
    return requested if serves_plain_model(requested) else None


@dataclass(frozen=True)
class ServePlan:
    """What a command loads: the plain model (None: none), the inpainting model with its
    LCM-LoRA and tiny VAE (None: Inpaint4Drag fills with the plain model), and the catalogue
    sets they come from (``hello_reply.models``: which sets are served)."""

    plain: str | None
    inpaint_model: str | None = None
    lcm_lora: str | None = None
    tiny_vae: str | None = None
    sets: tuple[str, ...] = ()

    @property
    def inpainting(self) -> dict[str, str | None]:
        """The keyword arguments ``DragEngine.load`` takes for the inpainting model."""
        return {"inpaint_model": self.inpaint_model, "lcm_lora": self.lcm_lora,
                "tiny_vae": self.tiny_vae}

    @property
    def name(self) -> str:
        return self.plain or self.inpaint_model or NO_PLAIN_MODEL


def serve_plan(model: str | None = None, inpaint_model: str | None = None,
               lcm_lora: str | None = None, tiny_vae: str | None = None,
               store: Store | None = None) -> ServePlan:
    """The models for ``--model``, ``--inpaint-model``, ``--lcm-lora`` and ``--tiny-vae``, as
    now installed (asked again after a download, it may answer more). ``--inpaint-model`` may
    name a catalogue set (``instant``, ``instant-xl``: its three pieces) or ``none``; left out,
    the first installed inpainting set of the catalogue is taken. Reads only the filesystem."""
    from backend.hub.store import Store

    store = store or Store()
    plain = plain_model(model)
    sets = (PLAIN_SET,) if model is None and store.installed(PLAIN_SET) else ()
    plan = ServePlan(plain, sets=sets)
    if inpaint_model is not None and inpaint_model.strip().lower() == NO_PLAIN_MODEL:
        return plan
    if inpaint_model is not None and inpaint_model not in store.catalogue.sets:
        return replace(plan, inpaint_model=inpaint_model, lcm_lora=lcm_lora, tiny_vae=tiny_vae)
    name = inpaint_model or next((n for n in store.catalogue.methods.get("inpaint4drag", ())
                                  if _inpainting_set(store, n) and store.installed(n)), None)
    if name is None:  # nothing installed: Inpaint4Drag fills with the plain model
        return plan
    if not _inpainting_set(store, name):
        raise ModelNotFound(f"the model set {name} has no inpainting model; give "
                            "--inpaint-model instant, instant-xl or a model's folder or id")
    pieces = {p.role: p.repo for p in store.catalogue.get(name).pieces}
    return replace(plan, inpaint_model=pieces["inpaint_model"],
                   lcm_lora=lcm_lora or pieces.get("lcm_lora"),
                   tiny_vae=tiny_vae or pieces.get("tiny_vae"),
                   sets=(*plan.sets, name) if store.installed(name) else plan.sets)


def _inpainting_set(store: Store, name: str) -> bool:
    return store.catalogue.get(name).piece("inpaint_model") is not None


def serves_plain_model(requested: str | None) -> bool:
    """Whether ``--model requested`` loads a plain model (all but ``--model none``)."""
    return requested is None or requested.strip().lower() != NO_PLAIN_MODEL


def expected_algorithms(requested: str | None) -> tuple[str, ...]:
    """The algorithms loading ``--model requested`` will run (``params.served_algorithms``):
    all of them with a plain model, Inpaint4Drag alone for ``--model none``. Torch-free, for a
    command's defaults before anything loads."""
    from backend.engine.params import served_algorithms

    return served_algorithms(plain_model=serves_plain_model(requested))


def demo_fallback(requested: str | None, load: Callable[[str], Any]) -> Fallback | None:
    """The demo model as the stand-in for the model ``requested``, loaded by ``load(path)``:
    only for the default model (None); a ``--model`` that is missing is an error to fix."""
    if requested is not None:
        return None
    return Fallback(DEMO_NAME, functools.partial(load, str(DEMO_MODEL_DIR)))  # picklable when
    # ``load`` is: a Ray replica loads it (``serve --ray``)


def load_or_demo(load: Callable[[], Any], fallback: Fallback | None) -> tuple[Any, str | None]:
    """``load()``, or — when its model is missing and a ``fallback`` may stand in (only for
    the default model) — ``fallback.load()``, with why the first is not served (None when it
    is).

    Raises what ``load`` raises otherwise, and ``ModelNotFound`` naming both failures when the
    fallback fails to load too.
    """
    try:
        return load(), None
    except ModelNotFound as exc:
        if fallback is None:
            raise
        why = exc.reason  # the fallback's hint says how to get the model
    try:
        return fallback.load(), why
    except Exception as exc:
        raise ModelNotFound(f"{why}; and {fallback.name} failed to load: "
                            f"{type(exc).__name__}: {exc}") from exc


def expected_model(requested: str | None) -> tuple[str, MethodTable]:
    """The model that loading ``requested`` (None: the default) will serve, and its defaults
    (``MethodTable``), read from its folder without loading it: the demo model with its own
    when SD1.5 is missing; none of its own for SD1.5 or a file;
    for ``--model none`` only Inpaint4Drag's (the inpainting model's own defaults, such as SDXL
    inpainting's strength, come with the loaded engine's table).

    A server announces the table while its model loads, install.py records it for the dialog,
    ``drag --list-params`` prints it. The loaded engine's ``table`` is the same unless loading
    takes another turn (a file that fails to load), which the server then handles.
    """
    from backend.engine.errors import EngineError
    from backend.engine.models import locate, read_preset
    from backend.engine.params import MethodTable

    if not serves_plain_model(requested):  # only the inpainting model: Inpaint4Drag alone
        return NO_PLAIN_MODEL, MethodTable(algorithms=expected_algorithms(requested))
    name = requested or default_plain_model()
    try:
        kind, path = locate(name)
    except ModelNotFound:
        if requested is None:
            name, kind, path = DEMO_NAME, "folder", DEMO_MODEL_DIR
        else:  # loading reports the error
            return name, MethodTable()
    try:
        return name, MethodTable(read_preset(path).get("params", {}) if kind == "folder"
                                 else {})
    except EngineError:  # loading reports the bad preset.json
        return name, MethodTable()


def expected_table(requested: str | None) -> MethodTable:
    """``expected_model``'s table."""
    return expected_model(requested)[1]
