"""Command-line edits: ``drag`` (one edit with a progress bar) and ``make-random-tiny-model``.

Images keep their precision: 8-bit gray or colour (with or without alpha), 16-bit gray and
32-bit float gray are read and written as they are. PIL, the image library, has no mode for
16-bit or float colour: it reads such a file reduced to 8 bits (or not at all), so the command
refuses it and says why, rather than lose bits the GIMP plug-in would keep.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import sys
from pathlib import Path

import numpy as np

from backend.cli import UsageError, parse_overrides
from backend.engine.params import PRESET_METHOD, PRESETS
from backend.engine.types import DEFAULT_METHOD

POINTS_HELP = (
    'handle→target pairs in image pixels, "x1,y1:x2,y2;x3,y3:x4,y4" '
    "(x to the right, y down, origin at the top-left corner of the image; the centre of pixel "
    "column i is x = i+0.5, so to point at pixel (120, 80) give 120.5,80.5)"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "drag",
        help="drag image content from handle points to target points",
        description="Edit one image: move the content at each handle point to its target point "
        "with Inpaint4Drag, DragDiffusion or GoodDrag. With Inpaint4Drag --mask is the region "
        "that moves (required); with the others only the region given by --mask may change.",
    )
    p.add_argument("--image", help="input image (PNG, JPEG, TIFF, …): 8-bit gray or RGB, with "
                   "or without alpha, or 16-bit or 32-bit float gray, kept in its precision")
    p.add_argument("--points", help=POINTS_HELP)
    p.add_argument("--mask", help="an image of the same size: for inpaint4drag white = the "
                   "region that moves (required); for the others white = may change (default: "
                   "the whole image may change)")
    p.add_argument("--out", help="where to write the result, in the input's precision (PNG "
                   "keeps alpha and 16 bits; 32-bit float needs TIFF)")
    p.add_argument("--method", default=None, choices=list(PRESETS),
                   help=f"algorithm or preset (default: the engine's, {DEFAULT_METHOD}, where "
                   "the models loaded run it; else the first method they run)")
    p.add_argument("--prompt", default="", help="text describing the image (optional)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--model", default=None, help="SD1.5-family model: diffusers folder, "
                   "single .safetensors/.ckpt file or Hugging Face id (default: SD 1.5; when "
                   "it is not on this machine, the small demo model backend/demo/model, "
                   "fit for simple shapes only; 'none' with --inpaint-model: only inpaint4drag)")
    p.add_argument("--vae", default=None, help="separate VAE (folder, file or Hugging Face id)")
    p.add_argument("--inpaint-model", default=None, help="inpainting model for inpaint4drag "
                   "(9-channel UNet; folder, file or id); without it the plain model fills")
    p.add_argument("--lcm-lora", default=None, help="LCM-LoRA fused into the inpainting model")
    p.add_argument("--tiny-vae", default=None, help="tiny VAE for the inpainting model (TAESD)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=None, help="precision: auto (default), fp16, bf16, fp32, "
                   "fp16-mixed or bf16-mixed (fp32 weights under autocast)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method parameter, e.g. --set drag_steps=40 --set "
                   "work_size=384 (see --list-params)")
    p.add_argument("--list-params", action="store_true",
                   help="print every parameter: its default per method on the model that "
                   "--model (or the default) loads, range and what it does (with --json: as "
                   "JSON), then exit")
    p.add_argument("--lora-cache", default=None, help="LoRA cache folder")
    p.add_argument("--json", action="store_true", help="print the result summary as JSON")
    p.set_defaults(func=run_drag)

    t = sub.add_parser(
        "make-random-tiny-model", aliases=["make-tiny-model"],
        help="write a tiny random-weight model in SD1.5's layout (for tests; not the demo "
        "model)",
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


# Full-precision PIL modes: 16-bit gray, and 32-bit float gray.
_GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: str | io.BytesIO) -> np.ndarray:
    """Any PIL-readable file (or buffer) → H×W×C with C in 1–4: uint8 (gray/RGB, with or without alpha;
    palette and other colour modes converted), uint16 (16-bit gray) or float32 (float gray).

    A file with 16 bits or floats per channel in colour (or gray with alpha) is refused: PIL
    would read it reduced to 8 bits.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        rawmodes = str([tile[3] for tile in img.tile])  # what the file holds, before decoding
        img.load()
    except FileNotFoundError:
        raise UsageError(f"cannot read {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"cannot read {path}: not an image PIL understands ({exc}); 16-bit "
                         "or float colour TIFFs are among them (PIL has no mode for them)") \
            from None
    if img.mode in _GRAY16_MODES:
        array = np.asarray(img).astype(np.uint16)
    elif img.mode == "F":
        array = np.asarray(img, dtype=np.float32)
    elif img.mode == "I":  # 32-bit integers: 16-bit gray as some formats decode it
        array = np.asarray(img)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise UsageError(f"cannot read {path}: its 32-bit integer pixels do not fit 16 "
                             "bits; save it as 16-bit or 8-bit")
        array = array.astype(np.uint16)
    elif ";16" in rawmodes or ";32" in rawmodes:
        raise UsageError(
            f"cannot edit {path} without losing its precision: it has 16 bits per channel "
            f"in colour or with alpha, which PIL (this command's image reader) reads reduced to "
            "8 bits; edit it in GIMP, whose plug-in keeps 16-bit and float layers, or save "
            "it as 8-bit (or as 16-bit gray) first")
    else:
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode not in ("L", "LA", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.mode else ("L" if img.mode == "1" else "RGB"))
        array = np.asarray(img)
    return array[..., None] if array.ndim == 2 else array


def read_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    """The editable region as H×W uint8, 255 = may change (any image; 16-bit and float masks
    are scaled to 8 bits: a mask needs no more)."""
    from PIL import Image

    mask = read_image(path)
    if mask.dtype == np.uint16:
        mask = (mask.astype(np.float64) / 257).round().astype(np.uint8)
    elif mask.dtype == np.float32:
        mask = (np.clip(mask, 0, 1) * 255).round().astype(np.uint8)
    gray = np.asarray(Image.fromarray(mask[..., :3] if mask.shape[2] >= 3 else mask[..., 0])
                      .convert("L"))
    if (gray.shape[1], gray.shape[0]) != size:
        raise UsageError(f"--mask is {gray.shape[1]}×{gray.shape[0]} but the image is "
                         f"{size[0]}×{size[1]}; they must be the same size")
    return gray


def _pil_image(image: np.ndarray):
    """The PIL image of an H×W×C array in its own precision."""
    from PIL import Image

    if image.dtype == np.uint8:
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[image.shape[2]]
        return Image.fromarray(image[..., 0] if image.shape[2] == 1 else image, mode)
    return Image.fromarray(np.ascontiguousarray(image[..., 0]))  # "I;16" or "F"


def _pixel_kind(dtype: np.dtype, channels: int) -> str:
    depth = {np.dtype(np.uint8): "8-bit", np.dtype(np.uint16): "16-bit",
             np.dtype(np.float32): "32-bit float"}[np.dtype(dtype)]
    return f"{depth} {['gray', 'gray+alpha', 'RGB', 'RGBA'][channels - 1]}"


def check_writable(path: str, dtype: np.dtype, channels: int) -> None:
    """Refuse, before any work, an ``--out`` whose format cannot hold the result's pixels
    exactly (JPEG and alpha, PNG and float, an unknown extension …): a 1-pixel probe of the
    same kind must come back from that format unchanged."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None:
        raise UsageError(f"--out {path}: unknown image extension {suffix or '(none)'}; use "
                         ".png or .tif")
    probe = np.zeros((1, 1, channels), dtype)
    probe.flat[0] = 1000 if dtype == np.uint16 else (0.123 if dtype == np.float32 else 7)
    buffer = io.BytesIO()
    try:
        _pil_image(probe).save(buffer, format=fmt)
        buffer.seek(0)
        back = read_image(buffer)
    except (OSError, ValueError, KeyError, UsageError):
        back = None
    if back is None or back.dtype != probe.dtype or not np.array_equal(back, probe):
        kind = _pixel_kind(dtype, channels)
        better = ".tif" if dtype == np.float32 else ".png or .tif"
        raise UsageError(f"--out {path}: {fmt} cannot hold the result's {kind} pixels "
                         f"exactly (the input's precision); use {better}")


def write_image(path: str, image: np.ndarray) -> None:
    """The result in its own precision (``check_writable`` said the format holds it)."""
    _pil_image(image).save(path)


def format_params(model: str, defaults: dict[str, dict], specs: dict[str, dict]) -> str:
    """Every knob with its default per method on ``model``, its range and what it does
    (``--list-params``)."""
    methods = list(defaults)
    lines = [f"defaults on {model}, per method: " + ", ".join(methods), ""]
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
    """A ``UsageError`` is printed by ``backend.cli.main`` as one line (exit status 2)."""
    return _list_params(args) if args.list_params else _drag(args)


def _list_params(args: argparse.Namespace) -> int:
    """Every knob's default per method on the model the command would load, without loading
    it (``model_choice.expected_table``)."""
    from backend.engine.errors import EngineError
    from backend.engine.params import spec_table
    from backend.model_choice import expected_model

    try:
        model, table = expected_model(args.model)
    except EngineError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps({"model": model, "defaults": table.methods(), "specs": spec_table()},
                         indent=2))
    else:
        print(format_params(model, table.methods(), spec_table()))
    return 0


def default_method(model: str | None) -> str:
    """The method an edit runs without ``--method``: the engine's table decides for the models
    ``--model`` loads (``MethodTable.default_method``), before any of them loads."""
    from backend.engine.params import MethodTable
    from backend.model_choice import expected_algorithms

    return MethodTable(algorithms=expected_algorithms(model)).default_method


def _load_engine(args: argparse.Namespace):
    """The engine for ``--model``; without it SD1.5, or the demo model where SD1.5 is missing
    (the same decision as ``serve``: ``model_choice``), said on stderr."""
    from backend.engine.pipeline import DragEngine
    from backend.model_choice import demo_fallback, load_or_demo, serve_plan

    plan = serve_plan(args.model, args.inpaint_model, args.lcm_lora, args.tiny_vae)
    model = plan.plain  # None: --model none, only the inpainting model
    inpainting = plan.inpainting
    fallback = demo_fallback(args.model, lambda path: DragEngine.load(
        path, device=args.device, lora_cache_dir=args.lora_cache, **inpainting))
    print(f"loading {plan.name} …", file=sys.stderr)
    engine, why = load_or_demo(lambda: DragEngine.load(
        model, vae=args.vae, device=args.device, dtype=args.dtype,
        lora_cache_dir=args.lora_cache, **inpainting), fallback)
    if why is not None and fallback is not None:
        print(f"note: {why}", file=sys.stderr)
        print(f"note: {fallback.notice('using')}", file=sys.stderr)
    return engine


def _drag(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before torch is imported (fast errors); the
    # method's parameters are checked by the engine, with its model's defaults.
    from backend.engine.errors import EngineError
    from backend.engine.imageops import validate_request
    from backend.model_choice import serve_plan, serves_plain_model

    missing = [f"--{n}" for n in ("image", "points", "out") if not getattr(args, n)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (see --help)")
    if not serves_plain_model(args.model) and not args.inpaint_model and \
            serve_plan(args.model).inpaint_model is None:
        raise UsageError("--model none needs --inpaint-model (the model Inpaint4Drag runs on; "
                         "or get the instant set: python -m backend models get instant)")
    handles, targets = parse_points(args.points)
    method = args.method or default_method(args.model)
    overrides = parse_overrides(args.overrides)
    image = read_image(args.image)
    size = (image.shape[1], image.shape[0])
    mask = read_mask(args.mask, size) if args.mask else None
    if not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"--out: folder {Path(args.out).parent} does not exist")
    check_writable(args.out, image.dtype, image.shape[2])
    try:
        algorithm = PRESET_METHOD[method]
        validate_request(image, handles, targets, mask)
        if algorithm == "inpaint4drag":  # its warp needs no model: check the points first
            from backend.engine.inpaint4drag import preview_warp

            if mask is None:
                from backend.engine.inpaint4drag import NO_SELECTION
                raise UsageError(f"--mask: {NO_SELECTION}")
            preview_warp(image, mask, handles, targets, overrides)
    except EngineError as exc:
        raise UsageError(str(exc)) from None

    from backend.cli_progress import PhaseBars, early_stop
    from backend.engine.errors import Cancelled
    from backend.engine.types import CancelToken, DragRequest

    try:
        engine = _load_engine(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    cancel = CancelToken()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.cancel())
    bars = PhaseBars(sys.stderr)
    request = DragRequest(image=image, handles=handles, targets=targets, mask=mask,
                          method=method, prompt=args.prompt, seed=args.seed,
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
    stopped = early_stop(result.stats)
    if stopped:
        print(stopped, file=sys.stderr)
    for warning in result.warnings:  # said once, before the summary
        print(f"warning: {warning}", file=sys.stderr)
    tracked = "drag_stop" in result.stats  # Inpaint4Drag warps the region: no tracker runs
    summary = {
        "out": args.out,
        # where the point tracker last saw the handles: its estimate, not a measurement of
        # where the content went (None for a method without a tracker)
        "tracked_handles": ([[round(x, 2), round(y, 2)] for x, y in result.handles]
                            if tracked else None),
        "targets": [list(t) for t in targets],
        "drag_stop": result.stats.get("drag_stop"),
        "timings": result.timings,
        "unet_passes": result.stats.get("unet_passes"),
        "warnings": result.warnings,
    }
    if args.json:
        print(json.dumps(summary))
    elif tracked:
        print(f"wrote {args.out}; the tracker's final handle positions "
              f"{summary['tracked_handles']} (targets {summary['targets']}; the tracker's "
              f"estimate, not a measurement of the result); times {result.timings}")
    else:
        print(f"wrote {args.out}; the selection was warped from the handles to the targets "
              f"{summary['targets']} and the area it left inpainted; times {result.timings}")
    return 0


def run_make_tiny_model(args: argparse.Namespace) -> int:
    from backend.engine.random_tiny import make_tiny_model

    path = make_tiny_model(args.directory, seed=args.seed, single_file=args.single_file)
    print(path)
    return 0
