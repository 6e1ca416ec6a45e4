"""The catalogue of model sets a user can download: ``catalogue.json`` beside this module.

A *set* (``sd15``, ``instant``, ``instant-xl``) is what one Download button or one
``python -m backend models get NAME`` fetches: one or more *pieces*, each a Hugging Face
repository with a *role* in the engine (the plain ``model``, the ``inpaint_model``, its
``lcm_lora``, its ``tiny_vae``: the ``serve`` options of the same names) and the files the
engine loads from it. ``methods`` says which sets each method runs on, best first.

``DRAG_DIFFUSION_CATALOGUE`` names a JSON file of the same shape whose sets replace the
shipped ones of the same name (the tests point the sets at tiny repositories on a local hub).
Standard library only: install.py reads the same file for its size line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CATALOGUE_FILE = Path(__file__).resolve().with_name("catalogue.json")
OVERRIDE_ENV = "DRAG_DIFFUSION_CATALOGUE"
# A piece's role → the serve option that takes it.
ROLES = {"model": "--model", "inpaint_model": "--inpaint-model", "lcm_lora": "--lcm-lora",
         "tiny_vae": "--tiny-vae"}


class CatalogueError(Exception):
    """The catalogue file is malformed, or a set name is unknown; the text says which."""


# A file entry: a path or glob, or alternatives (the first the repository has).
FileSpec = str | tuple[str, ...]


@dataclass(frozen=True)
class Piece:
    """One repository of a set and the files the engine loads from it."""

    role: str
    repo: str
    revision: str
    licence: str
    files: tuple[FileSpec, ...]
    approx_bytes: int  # for messages before the hub is asked (see catalogue.json)

    @property
    def folder_name(self) -> str:
        """Its folder under ``get --to FOLDER``: the repository's name without the owner."""
        return self.repo.split("/")[-1]

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{self.repo}"


@dataclass(frozen=True)
class ModelSet:
    name: str
    title: str
    summary: str
    pieces: tuple[Piece, ...]
    methods: tuple[str, ...]  # the methods that run on it (the catalogue's ``methods``)

    @property
    def approx_bytes(self) -> int:
        return sum(p.approx_bytes for p in self.pieces)

    @property
    def licence(self) -> str:
        """The licences of its pieces, each once, in order."""
        return ", ".join(dict.fromkeys(p.licence for p in self.pieces))

    def piece(self, role: str) -> Piece | None:
        return next((p for p in self.pieces if p.role == role), None)


@dataclass(frozen=True)
class Catalogue:
    sets: dict[str, ModelSet]
    methods: dict[str, tuple[str, ...]]  # method → the sets it runs on, best first

    def get(self, name: str) -> ModelSet:
        try:
            return self.sets[name]
        except KeyError:
            raise CatalogueError(f"unknown model set {name!r}; the catalogue has "
                                 f"{', '.join(self.sets)}") from None

    def names(self) -> list[str]:
        return list(self.sets)


def load_catalogue(path: Path | None = None) -> Catalogue:
    """The shipped catalogue, with the sets of ``$DRAG_DIFFUSION_CATALOGUE`` (or of ``path``)
    in place of those of the same name."""
    data = _read(CATALOGUE_FILE)
    override = path or (Path(os.environ[OVERRIDE_ENV]) if os.environ.get(OVERRIDE_ENV) else None)
    if override is not None:
        extra = _read(override)
        data["sets"] = {**data["sets"], **extra.get("sets", {})}
        data["methods"] = {**data["methods"], **extra.get("methods", {})}
    return _parse(data)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogueError(f"cannot read the model catalogue {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("sets", {}), dict):
        raise CatalogueError(f"the model catalogue {path} is not an object with 'sets'")
    return data


def _parse(data: dict[str, Any]) -> Catalogue:
    methods = {str(m): tuple(str(s) for s in sets) for m, sets in data.get("methods", {}).items()}
    sets = {}
    for name, entry in data["sets"].items():
        try:
            pieces = tuple(_piece(p) for p in entry["pieces"])
            title, summary = str(entry["title"]), str(entry.get("summary", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogueError(f"the catalogue's set {name!r} is malformed ({exc})") from None
        served = tuple(m for m, names in methods.items() if name in names)
        sets[name] = ModelSet(name, title, summary, pieces, served)
    for method, names in methods.items():
        unknown = [n for n in names if n not in sets]
        if unknown:
            raise CatalogueError(f"the catalogue's method {method!r} names unknown sets {unknown}")
    return Catalogue(sets, methods)


def _piece(entry: dict[str, Any]) -> Piece:
    role = entry["role"]
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    files = tuple(tuple(f) if isinstance(f, list) else str(f) for f in entry["files"])
    if not files:
        raise ValueError("no files")
    return Piece(role=role, repo=str(entry["repo"]), revision=str(entry.get("revision", "main")),
                 licence=str(entry.get("licence", "see the repository")), files=files,
                 approx_bytes=int(entry.get("approx_bytes", 0)))


def get_hint(name: str) -> str:
    """How a user gets the set ``name``: the one wording the backend's messages use."""
    return (f"the Download button in the plug-in's dialog, or `python -m backend models get "
            f"{name}`")


def size_text(size: float) -> str:
    """Bytes for people, in powers of 1000 as the hub shows them: ``2.13 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            break
        size /= 1000
    if unit == "B":
        return f"{int(size)} B"
    return f"{size:.3g} {unit}" if size < 100 else f"{size:.0f} {unit}"
