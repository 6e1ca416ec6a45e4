"""Which model a command serves: the one asked for, else Stable Diffusion 1.5, else the demo.

One decision for ``serve``, ``drag`` and install.py. A ``--model`` that is missing is an error to
fix. The default model (SD1.5) that is missing — not in the Hugging Face cache and not
downloadable — is replaced by the small demo model that ships in ``backend/demo/model``, and the
user is told so (``Fallback.notice``).

Torch is imported only by the functions that read a model folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.engine.errors import ModelNotFound

if TYPE_CHECKING:
    from backend.engine.params import MethodTable

# The trained demo model that ships with the project (a diffusers folder with its preset.json).
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo" / "model"
DEMO_NAME = "backend/demo/model"
DEMO_HINT = ("to edit photos, put Stable Diffusion 1.5 where the backend finds it (the Hugging "
             "Face cache, see the README, section 'Models') or give --model PATH (an SD1.5 "
             "diffusers folder or .safetensors/.ckpt file)")



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


def demo_fallback(requested: str | None, load: Callable[[str], Any]) -> Fallback | None:
    """The demo model as the stand-in for the model ``requested``, loaded by ``load(path)``:
    only for the default model (None); a ``--model`` that is missing is an error to fix."""
    if requested is not None:
        return None
    return Fallback(DEMO_NAME, lambda: load(str(DEMO_MODEL_DIR)))


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
        why = str(exc)
    try:
        return fallback.load(), why
    except Exception as exc:
        raise ModelNotFound(f"{why}; and {fallback.name} failed to load: "
                            f"{type(exc).__name__}: {exc}") from exc


def expected_model(requested: str | None) -> tuple[str, MethodTable]:
    """The model that loading ``requested`` (None: the default) will serve, and its defaults
    (``MethodTable``), read from its folder without loading it: the demo model with its own
    when SD1.5 is missing and may not be downloaded; none of its own for SD1.5 or a file.

    A server announces the table while its model loads, install.py records it for the dialog,
    ``drag --list-params`` prints it. The loaded engine's ``table`` is the same unless loading
    takes another turn (a download that fails), which the server then handles.
    """
    from backend.engine.errors import EngineError
    from backend.engine.models import DEFAULT_MODEL, hub_offline, locate, read_preset
    from backend.engine.params import MethodTable

    name = requested or DEFAULT_MODEL
    try:
        kind, path = locate(name, download=False)
    except ModelNotFound:
        if requested is None and hub_offline():
            name, kind, path = DEMO_NAME, "folder", DEMO_MODEL_DIR
        else:  # it will be downloaded (SD1.5 has no preset), or loading reports the error
            return name, MethodTable()
    try:
        return name, MethodTable(read_preset(path).get("params", {}) if kind == "folder"
                                 else {})
    except EngineError:  # loading reports the bad preset.json
        return name, MethodTable()


def expected_table(requested: str | None) -> MethodTable:
    """``expected_model``'s table."""
    return expected_model(requested)[1]
