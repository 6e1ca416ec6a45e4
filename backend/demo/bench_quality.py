"""``python -m backend bench-quality``: drag methods vs baselines on cases with known answers.

Three case sets: ``shapes`` (procedural scenes, the correct result rendered exactly, handle error
from re-rendered hypotheses: ``metrics``), ``stereo`` (the motorcycle stereo pair) and ``paste``
(an object moved over a photograph; both ``photo_cases``, handle error by patch matching). Every
case runs through the baselines (no-op, cut-and-paste, Inpaint4Drag's warp alone and the warp
with a model-free smooth fill) and the chosen engine methods or presets (default: the three
methods and the ``fast`` preset, each with its own defaults and the model's ``preset.json``);
the command prints a summary and per-case tables and writes ``table.md``, ``results.json`` and
one ``grid-<set>.png`` per set (input with mask and arrows / correct / each result) to ``--out``.

Masks: a case's ``mask`` is the region that may change (DragDiffusion, GoodDrag, the PSNR
inside/outside split for every method); Inpaint4Drag is given the region that moves instead, the
case's ``region`` from its ground truth (a shape's own pixels, the pasted object, the stereo
surface at the handle's depth).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from backend.demo import metrics, photo_cases
from backend.demo.photo_cases import PhotoCase
from backend.demo.shapes import DragCase, make_cases
from backend.engine.errors import InvalidInput
from backend.engine.params import PRESET_METHOD, PRESETS, parse_assignments, resolve

CASE_SETS = ("shapes", "stereo", "paste")
Case = DragCase | PhotoCase


def default_methods() -> list[str]:
    return ["inpaint4drag", "dragdiffusion", "gooddrag", *(["fast"] if "fast" in PRESETS else [])]


def warp_only(case: Case) -> np.ndarray:
    """Inpaint4Drag's warp alone: the region's pixels moved, what it left not yet filled."""
    from backend.engine.inpaint4drag import warp_layer

    _, params = resolve("inpaint4drag")
    return warp_layer(case.image, case.region, list(case.handles), list(case.targets),
                      params).image


def warp_smooth(case: Case) -> np.ndarray:
    """The warp with the inpainting mask filled by a smooth extension of its surroundings (no
    model): what a filler must beat."""
    from backend.engine.fillers import smooth_fill
    from backend.engine.inpaint4drag import warp_layer

    _, params = resolve("inpaint4drag")
    layer = warp_layer(case.image, case.region, list(case.handles), list(case.targets),
                       params)
    filled = smooth_fill(layer.image.astype(np.float32), layer.hole)
    return np.clip(np.rint(filled), 0, 255).astype(np.uint8)


WARP_BASELINES = {"warp-only": warp_only, "warp+smooth-fill": warp_smooth}


def make_case_sets(names: list[str], n_shapes: int = 6, n_photo: int = 4,
                   seed: int = 0) -> dict[str, list[Case]]:
    makers = {"shapes": lambda: make_cases(n_shapes, seed=seed),
              "stereo": lambda: photo_cases.stereo_cases(n_photo),
              "paste": lambda: photo_cases.paste_cases(n_photo, seed=seed)}
    return {name: makers[name]() for name in names}


def score(case: Case, image: np.ndarray) -> dict[str, float]:
    """Handle error (px), PSNR inside the mask vs the answer, PSNR outside vs the input."""
    if isinstance(case, PhotoCase):
        return photo_cases.score(case, image)
    s = metrics.score(case, image)
    return {"handle_error": s.handle_error, "psnr_in": s.psnr_in, "psnr_out": s.psnr_out,
            "match_psnr": float(np.mean([metrics.capped(p.match_psnr) for p in s.pairs]))}


def baseline(name: str) -> Callable[[Case], np.ndarray]:
    def run(case: Case) -> np.ndarray:
        if name in WARP_BASELINES:
            return WARP_BASELINES[name](case)
        table = photo_cases.BASELINES if isinstance(case, PhotoCase) else metrics.BASELINES
        return table[name](case)

    return run


BASELINE_NAMES = (*metrics.BASELINES, *WARP_BASELINES)


def engine_runner(engine, method: str, params: dict, seed: int = 0) -> Callable:
    """A function case → (output image, extra) running ``method`` on ``engine``."""
    from backend.engine.types import DragRequest

    moves = PRESET_METHOD.get(method) == "inpaint4drag"  # the mask is the region that moves

    def run(case: Case) -> tuple[np.ndarray, dict]:
        request = DragRequest(image=case.image, handles=list(case.handles),
                              targets=list(case.targets),
                              mask=case.region if moves else case.mask, method=method,
                              prompt=case.prompt, seed=seed, params=dict(params))
        result = engine.run(request)
        stats = {k: v for k, v in result.stats.items() if isinstance(v, (int, float, str))}
        stats["fe"] = result.stats["work"]["total"]  # UNet forward-equivalents (engine.work)
        return result.image, {"tracked": result.handles, "timings": result.timings,
                              "stats": stats}

    return run


def evaluate(cases: list[Case], run: Callable,
             log: Callable[[str], None] | None = None) -> list[dict]:
    """Score ``run`` on every case; one row per case (``log`` gets a line per case)."""
    rows = []
    for case in cases:
        start = time.perf_counter()
        out = run(case)
        seconds = time.perf_counter() - start
        image, extra = out if isinstance(out, tuple) else (out, {})
        s = score(case, image)
        drag = float(np.mean([math.dist(h, t) for h, t in zip(case.handles, case.targets,
                                                                strict=True)]))
        rows.append({"case": case.name, "drag_px": drag, **s, "seconds": seconds,
                     "image": image, **extra})
        if log is not None:
            log(f"  {case.name}: handle error {s['handle_error']:.2f} px (drag {drag:.1f}), "
                f"PSNR in {_fmt(s['psnr_in'])} dB, {seconds:.1f} s")
    return rows


def summary(rows: list[dict]) -> dict:
    return {
        "handle_error": float(np.mean([r["handle_error"] for r in rows])),
        "drag_px": float(np.mean([r["drag_px"] for r in rows])),
        "psnr_in": float(np.mean([metrics.capped(r["psnr_in"]) for r in rows])),
        "psnr_out": float(np.mean([metrics.capped(r["psnr_out"]) for r in rows])),
        "exact_outside": all(math.isinf(r["psnr_out"]) for r in rows),
        "seconds": float(np.mean([r["seconds"] for r in rows])),
        "fe": float(np.mean([r.get("stats", {}).get("fe", 0) for r in rows])),
    }


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def summary_table(results: dict[str, dict[str, list[dict]]]) -> str:
    """Markdown: one row per set and method (means over the set's cases)."""
    lines = ["| set | method | handle error px | PSNR in mask dB | outside mask | UNet FE / case "
             "| s / case |",
             "|---|---|---:|---:|---|---:|---:|"]
    for set_name, by_method in results.items():
        for method, rows in by_method.items():
            s = summary(rows)
            outside = "exact" if s["exact_outside"] else f"{s['psnr_out']:.1f} dB"
            lines.append(f"| {set_name} | {method} | {s['handle_error']:.2f} | "
                         f"{s['psnr_in']:.1f} | {outside} | {s['fe']:.0f} | "
                         f"{s['seconds']:.2f} |")
    return "\n".join(lines)


def case_table(title: str, rows: list[dict]) -> str:
    lines = [f"### {title}", "",
             "| case | drag px | handle err px | PSNR in mask dB | PSNR outside dB | s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['drag_px']:.1f} | {r['handle_error']:.2f} | "
                     f"{_fmt(r['psnr_in'])} | {_fmt(r['psnr_out'])} | {r['seconds']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- picture


def draw_case(img: np.ndarray, case: Case, scale: int, mask: bool) -> Image.Image:
    """``img`` enlarged ``scale``×, optionally with the mask lightened, red handle → blue
    target arrows."""
    h, w = img.shape[:2]
    im = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
    if mask:
        tint = np.asarray(im).astype(np.float64)
        m = np.kron(case.mask > 0, np.ones((scale, scale), dtype=bool))
        tint[m] = 0.75 * tint[m] + 0.25 * np.array([255, 255, 255])
        im = Image.fromarray(tint.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for (hx, hy), (tx, ty) in zip(case.handles, case.targets, strict=True):
        a, b = (hx * scale, hy * scale), (tx * scale, ty * scale)
        draw.line([a, b], fill=(255, 255, 255), width=3)
        draw.line([a, b], fill=(20, 20, 20), width=1)
        draw.ellipse([a[0] - 4, a[1] - 4, a[0] + 4, a[1] + 4], fill=(230, 30, 30))
        draw.ellipse([b[0] - 4, b[1] - 4, b[0] + 4, b[1] + 4], fill=(30, 90, 230))
    return im


def make_grid(cases: list[Case], results: dict[str, list[dict]], scale: int = 2) -> Image.Image:
    """Rows: cases. Columns: input (mask lightened, red handle → blue target), correct, methods."""
    names = list(results)
    h, w = cases[0].image.shape[:2]
    cw, ch = w * scale, h * scale
    pad, head = 4, 18
    grid = Image.new("RGB", ((2 + len(names)) * (cw + pad) + pad,
                             head + len(cases) * (ch + head)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(["input + mask + drag", "correct", *names]):
        draw.text((pad + c * (cw + pad), 3), title, fill=(0, 0, 0))
    for r, case in enumerate(cases):
        y = head + r * (ch + head)
        draw.text((pad, y + 2), case.name, fill=(0, 0, 0))
        y += head - 4
        grid.paste(draw_case(case.image, case, scale, mask=True), (pad, y))
        grid.paste(draw_case(case.correct, case, scale, mask=False), (2 * pad + cw, y))
        for c, name in enumerate(names):
            row = results[name][r]
            x = pad + (2 + c) * (cw + pad)
            grid.paste(draw_case(row["image"], case, scale, mask=False), (x, y))
            draw.text((x + cw // 2, y - head + 6), f"err {row['handle_error']:.1f}px",
                      fill=(0, 0, 0))
    return grid


# ---------------------------------------------------------------- command


def run_bench(case_sets: dict[str, list[Case]], methods: list[str], model: str | None,
              params: dict, log: Callable[[str], None] = print,
              baselines: bool = True) -> dict[str, dict[str, list[dict]]]:
    """results[set][method] = rows: baselines (unless turned off) and the engine ``methods``."""
    results: dict[str, dict[str, list[dict]]] = {name: {} for name in case_sets}
    for set_name, cases in case_sets.items():
        for name in BASELINE_NAMES if baselines else ():
            results[set_name][name] = evaluate(cases, baseline(name))
    if methods:
        from backend.engine.pipeline import DragEngine

        # A fresh LoRA cache, so a case's seconds are a first edit's; the stereo cases share one
        # photograph, so after the first of them its LoRA and inversion come from the caches.
        with tempfile.TemporaryDirectory(prefix="bench-quality-lora-") as lora_dir:
            engine = DragEngine.load(model, device="cpu", lora_cache_dir=lora_dir)
            for method in methods:
                for set_name, cases in case_sets.items():
                    log(f"running {method} on {len(cases)} {set_name} cases ...")
                    results[set_name][method] = evaluate(cases, engine_runner(engine, method,
                                                                              params), log)
    return results


def checked_params(methods: list[str], items: list[str], lora_steps: int | None) -> dict:
    """``--param``/``--lora-steps`` → overrides, checked with every method before the model
    loads; a bad name or value exits with the engine's message instead of a traceback."""
    try:
        params = parse_assignments(items, "--param")
        if lora_steps is not None:
            params.update(parse_assignments([f"lora_steps={lora_steps}"], "--lora-steps"))
        for method in methods:
            resolve(method, params)
    except InvalidInput as exc:
        raise SystemExit(f"bench-quality: {exc}") from None
    return params


def main(args: argparse.Namespace) -> int:
    methods = default_methods() if args.method == "all" else args.method.split(",")
    methods = [m for m in methods if m not in (*BASELINE_NAMES, "", "none")]
    params = checked_params(methods, args.param, args.lora_steps)
    sets = args.sets.split(",")
    unknown = set(sets) - set(CASE_SETS)
    if unknown:
        raise SystemExit(f"unknown case set(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(CASE_SETS)}")
    case_sets = make_case_sets(sets, args.cases, args.photo_cases, args.seed)
    results = run_bench(case_sets, methods, args.model, params, lambda m: print(m, flush=True),
                        baselines=not args.no_baselines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = [f"model: {args.model}; seed {args.seed}; parameter overrides: "
            f"{json.dumps(params) if params else 'none (method defaults + model preset)'}", "",
            summary_table(results), ""]
    for set_name, by_method in results.items():
        for name, rows in by_method.items():
            text += [case_table(f"{set_name}: {name}", rows), ""]
    table = "\n".join(text)
    print(table)
    (out / "table.md").write_text(table + "\n", "utf-8")
    serial = {s: {n: [{k: v for k, v in r.items() if k != "image"} for r in rows]
                  for n, rows in by_method.items()} for s, by_method in results.items()}
    means = {s: {n: summary(rows) for n, rows in by_method.items()}
             for s, by_method in results.items()}
    (out / "results.json").write_text(json.dumps(
        {"params": params, "seed": args.seed, "model": args.model, "results": serial,
         "mean": means}, indent=1, default=str), "utf-8")
    for set_name, by_method in results.items():
        make_grid(case_sets[set_name], by_method).save(out / f"grid-{set_name}.png")
        for i, case in enumerate(case_sets[set_name]):
            if case.name == args.figure:  # one case's row alone (the README picture)
                rows = {name: [rows[i]] for name, rows in by_method.items()}
                make_grid([case], rows).save(out / "figure.png")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'} and the grids in {out}")
    return 0
