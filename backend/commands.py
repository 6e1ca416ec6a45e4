"""Command-line edits: ``drag`` (one edit with a progress bar) and ``make-tiny-model``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import numpy as np

from backend.engine.errors import InvalidInput
from backend.engine.params import PRESETS, parse_assignments

POINTS_HELP = (
    'handle→target pairs in image pixels, "x1,y1:x2,y2;x3,y3:x4,y4" '
    "(x to the right, y down, origin at the top-left corner of the image; the centre of pixel "
    "column i is x = i+0.5, so to point at pixel (120, 80) give 120.5,80.5)"
)


class UsageError(Exception):
    """Bad command-line input; the message is printed as is."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "drag",
        help="drag image content from handle points to target points",
        description="Edit one image: move the content at each handle point to its target point "
        "with DragDiffusion or GoodDrag. Only the region given by --mask may change.",
    )
    p.add_argument("--image", help="input image (PNG, JPEG, …; gray/RGB, with "
                   "or without alpha)")
    p.add_argument("--points", help=POINTS_HELP)
    p.add_argument("--mask", help="editable region: an image of the same size, white = may "
                   "change; default: the whole image may change")
    p.add_argument("--out", help="where to write the result (PNG keeps alpha)")
    p.add_argument("--method", default="dragdiffusion", choices=list(PRESETS),
                   help="algorithm or preset (default: %(default)s)")
    p.add_argument("--prompt", default="", help="text describing the image (optional)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--model", default=None, help="SD1.5-family model: diffusers folder, "
                   "single .safetensors/.ckpt file or Hugging Face id (default: SD 1.5)")
    p.add_argument("--vae", default=None, help="separate VAE (folder, file or Hugging Face id)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=None, help="precision: auto (default), fp16, bf16, fp32, "
                   "fp16-mixed or bf16-mixed (fp32 weights under autocast)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method parameter, e.g. --set drag_steps=40 --set "
                   "work_size=384 (see --list-params)")
    p.add_argument("--list-params", action="store_true",
                   help="print every parameter: its default per method, range and what it "
                   "does (with --json: as JSON), then exit")
    p.add_argument("--lora-cache", default=None, help="LoRA cache folder")
    p.add_argument("--json", action="store_true", help="print the result summary as JSON")
    p.set_defaults(func=run_drag)

    t = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight SD-architecture model (for tests)",
        description="Write a tiny Stable-Diffusion-architecture pipeline with random weights "
        "in diffusers format (and optionally as one .safetensors file). Nothing is downloaded.",
    )
    t.add_argument("directory", help="output folder")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--single-file", action="store_true",
                   help="also write DIR/tiny-sd.safetensors (original SD layout)")
    t.set_defaults(func=run_make_tiny_model)


# -- parsing --------------------------------------------------------------------------------

def parse_points(text: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """'x1,y1:x2,y2;…' → (handles, targets)."""
    handles, targets = [], []
    for i, pair in enumerate(p for p in text.replace(" ", "").split(";") if p):
        try:
            a, b = pair.split(":")
            hx, hy = (float(v) for v in a.split(","))
            tx, ty = (float(v) for v in b.split(","))
        except ValueError:
            raise UsageError(f"--points: pair {i + 1} {pair!r} is not 'x1,y1:x2,y2'") from None
        handles.append((hx, hy))
        targets.append((tx, ty))
    if not handles:
        raise UsageError("--points: give at least one pair, e.g. --points '120,80:160,80'")
    return handles, targets


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items → knob values (``params.parse_assignments``)."""
    try:
        return parse_assignments(items, "--set")
    except InvalidInput as exc:
        raise UsageError(str(exc)) from None


def read_image(path: str) -> np.ndarray:
    """Any PIL-readable file → H×W×C uint8 with C in 1–4 (palette and 16-bit converted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise UsageError(f"cannot read {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"cannot read {path}: not an image PIL understands ({exc})") from None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8))
    elif img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.mode else "RGB")
    array = np.asarray(img)
    return array[..., None] if array.ndim == 2 else array


def read_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    mask = read_image(path)
    gray = np.asarray(Image.fromarray(mask[..., :3] if mask.shape[2] >= 3 else mask[..., 0])
                      .convert("L"))
    if (gray.shape[1], gray.shape[0]) != size:
        raise UsageError(f"--mask is {gray.shape[1]}×{gray.shape[0]} but the image is "
                         f"{size[0]}×{size[1]}; they must be the same size")
    return gray


def write_image(path: str, image: np.ndarray) -> None:
    from PIL import Image

    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[image.shape[2]]
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image, mode).save(path)


def format_params(defaults: dict[str, dict], specs: dict[str, dict]) -> str:
    """Every knob with its default per method, its range and what it does (``--list-params``)."""
    methods = list(defaults)
    lines = ["defaults per method: " + ", ".join(methods), ""]
    for name, spec in specs.items():
        values = [defaults[m][name] for m in methods]
        shown = (f"{values[0]}" if len(set(map(str, values))) == 1
                 else " / ".join(str(v) for v in values))
        allowed = ("true/false" if spec["type"] == "bool"
                   else f"{spec['type']} {spec['min']:g}..{spec['max']:g}")
        lines.append(f"{name} = {shown}  ({allowed})")
        lines.append(f"    {spec['help']}")
    return "\n".join(lines)


# -- commands ---------------------------------------------------------------------------------

def run_drag(args: argparse.Namespace) -> int:
    from backend.engine.params import defaults_table, spec_table

    if args.list_params:
        if args.json:
            print(json.dumps({"defaults": defaults_table(), "specs": spec_table()}, indent=2))
        else:
            print(format_params(defaults_table(), spec_table()))
        return 0
    try:
        return _drag(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _drag(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before torch is imported (fast errors).
    from backend.engine.errors import EngineError
    from backend.engine.imageops import validate_request
    from backend.engine.params import resolve

    missing = [f"--{n}" for n in ("image", "points", "out") if not getattr(args, n)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (see --help)")
    handles, targets = parse_points(args.points)
    overrides = parse_overrides(args.overrides)
    image = read_image(args.image)
    size = (image.shape[1], image.shape[0])
    mask = read_mask(args.mask, size) if args.mask else None
    if not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"--out: folder {Path(args.out).parent} does not exist")
    try:
        resolve(args.method, overrides)
        validate_request(image, handles, targets, mask)
    except EngineError as exc:
        raise UsageError(str(exc)) from None

    from backend.cli_progress import PhaseBars
    from backend.engine.errors import Cancelled
    from backend.engine.models import DEFAULT_MODEL
    from backend.engine.pipeline import DragEngine
    from backend.engine.types import CancelToken, DragRequest

    try:
        print(f"loading {args.model or DEFAULT_MODEL} …", file=sys.stderr)
        engine = DragEngine.load(args.model or DEFAULT_MODEL, vae=args.vae, device=args.device,
                                 dtype=args.dtype, lora_cache_dir=args.lora_cache)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    cancel = CancelToken()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.cancel())
    bars = PhaseBars(sys.stderr)
    request = DragRequest(image=image, handles=handles, targets=targets, mask=mask,
                          method=args.method, prompt=args.prompt, seed=args.seed,
                          params=overrides)
    try:
        result = engine.run(request, progress=bars, cancel=cancel)
        bars.close()
    except Cancelled:
        print("\ncancelled: nothing was written", file=sys.stderr)
        return 130
    except EngineError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        bars.close(done=False)
        signal.signal(signal.SIGINT, previous)
    write_image(args.out, result.image)
    for warning in result.warnings:  # said once, before the summary
        print(f"warning: {warning}", file=sys.stderr)
    summary = {
        "out": args.out,
        "handles": [[round(x, 2), round(y, 2)] for x, y in result.handles],
        "targets": [list(t) for t in targets],
        "timings": result.timings,
        "unet_passes": result.stats.get("unet_passes"),
        "warnings": result.warnings,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}; handles ended at {summary['handles']} "
              f"(targets {summary['targets']}); times {result.timings}")
    return 0


def run_make_tiny_model(args: argparse.Namespace) -> int:
    from backend.engine.random_tiny import make_tiny_model

    path = make_tiny_model(args.directory, seed=args.seed, single_file=args.single_file)
    print(path)
    return 0
