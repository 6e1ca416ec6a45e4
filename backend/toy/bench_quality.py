"""``python -m backend bench-quality``: drag methods vs baselines on ground-truth cases.

Runs every case through the no-op and cut-and-paste baselines and the chosen engine methods on
the toy model, prints one table per method (per case and the mean), and writes
``results.json``, ``table.md`` and ``grid.png`` (input with mask and arrows / correct result /
each method's result) to ``--out``.
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

from backend.engine.params import parse_assignments
from backend.toy import metrics
from backend.toy.shapes import DragCase, make_cases

ENGINE_METHODS = ("dragdiffusion", "gooddrag")
TOY_PARAMS = {"work_size": 128}


def engine_runner(engine, method: str, params: dict, seed: int = 0) -> Callable:
    """A function case → (output image, stats) running ``method`` on ``engine``."""
    from backend.engine.types import DragRequest

    def run(case: DragCase) -> tuple[np.ndarray, dict]:
        request = DragRequest(image=case.image, handles=list(case.handles),
                              targets=list(case.targets), mask=case.mask, method=method,
                              prompt=case.prompt, seed=seed, params=dict(params))
        result = engine.run(request)
        stats = {k: v for k, v in result.stats.items() if isinstance(v, (int, float))}
        stats["fe"] = result.stats["work"]["total"]  # UNet forward-equivalents (engine.work)
        return result.image, {"tracked": result.handles, "timings": result.timings,
                              "stats": stats}

    return run


def evaluate(cases: list[DragCase], run: Callable,
             log: Callable[[str], None] | None = None) -> list[dict]:
    """Score ``run`` on every case; one row per case (``log`` gets a line per case)."""
    rows = []
    for case in cases:
        start = time.perf_counter()
        out = run(case)
        seconds = time.perf_counter() - start
        image, extra = out if isinstance(out, tuple) else (out, {})
        s = metrics.score(case, image)
        drag = float(np.mean([math.dist(h, t) for h, t in zip(case.handles, case.targets,
                                                                strict=True)]))
        rows.append({
            "case": case.name, "drag_px": drag, "handle_error": s.handle_error,
            "psnr_in": s.psnr_in, "psnr_out": s.psnr_out,
            "match_psnr": float(np.mean([metrics.capped(p.match_psnr) for p in s.pairs])),
            "displacements": [p.displacement for p in s.pairs], "seconds": seconds,
            "image": image, **extra,
        })
        if log is not None:
            log(f"  {case.name}: handle error {s.handle_error:.2f} px (drag {drag:.1f}), "
                f"PSNR in {_fmt(s.psnr_in)} dB, {seconds:.1f} s")
    return rows


def summary(rows: list[dict]) -> dict:
    return {
        "handle_error": float(np.mean([r["handle_error"] for r in rows])),
        "psnr_in": float(np.mean([metrics.capped(r["psnr_in"]) for r in rows])),
        "psnr_out": float(np.mean([metrics.capped(r["psnr_out"]) for r in rows])),
        "match_psnr": float(np.mean([r["match_psnr"] for r in rows])),
        "seconds": float(np.mean([r["seconds"] for r in rows])),
    }


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def format_table(method: str, rows: list[dict]) -> str:
    """Markdown table: per case and the mean."""
    lines = [f"### {method}", "",
             "| case | drag px | handle err px | PSNR in mask vs correct dB | "
             "PSNR outside mask vs input dB | shape match dB | s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['drag_px']:.1f} | {r['handle_error']:.2f} | "
                     f"{_fmt(r['psnr_in'])} | {_fmt(r['psnr_out'])} | {r['match_psnr']:.1f} | "
                     f"{r['seconds']:.2f} |")
    s = summary(rows)
    drag = np.mean([r["drag_px"] for r in rows])
    lines.append(f"| **mean** | {drag:.1f} | **{s['handle_error']:.2f}** | {s['psnr_in']:.1f} | "
                 f"{s['psnr_out']:.1f} | {s['match_psnr']:.1f} | {s['seconds']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- picture


def _arrows(img: np.ndarray, case: DragCase, scale: int, mask: bool) -> Image.Image:
    im = Image.fromarray(img).resize((img.shape[1] * scale,) * 2, Image.NEAREST)
    if mask:
        tint = np.asarray(im).astype(np.float64)
        m = np.kron(case.mask > 0, np.ones((scale, scale), dtype=bool))
        tint[m] = 0.75 * tint[m] + 0.25 * np.array([255, 255, 255])
        im = Image.fromarray(tint.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for (hx, hy), (tx, ty) in zip(case.handles, case.targets, strict=True):
        h = (hx * scale, hy * scale)
        t = (tx * scale, ty * scale)
        draw.line([h, t], fill=(255, 255, 255), width=3)
        draw.line([h, t], fill=(20, 20, 20), width=1)
        draw.ellipse([h[0] - 4, h[1] - 4, h[0] + 4, h[1] + 4], fill=(230, 30, 30))
        draw.ellipse([t[0] - 4, t[1] - 4, t[0] + 4, t[1] + 4], fill=(30, 90, 230))
    return im


def make_grid(cases: list[DragCase], results: dict[str, list[dict]], scale: int = 2) -> Image.Image:
    """Rows: cases. Columns: input (mask lightened, red handle → blue target), correct, methods."""
    names = list(results)
    cell = cases[0].image.shape[0] * scale
    pad, head = 4, 18
    cols = 2 + len(names)
    grid = Image.new("RGB", (cols * (cell + pad) + pad, head + len(cases) * (cell + head)),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(["input + mask + drag", "correct", *names]):
        draw.text((pad + c * (cell + pad), 3), title, fill=(0, 0, 0))
    for r, case in enumerate(cases):
        y = head + r * (cell + head)
        draw.text((pad, y + 2), case.name, fill=(0, 0, 0))
        y += head - 4
        grid.paste(_arrows(case.image, case, scale, mask=True), (pad, y))
        grid.paste(_arrows(case.correct, case, scale, mask=False), (2 * pad + cell, y))
        for c, name in enumerate(names):
            row = results[name][r]
            x = pad + (2 + c) * (cell + pad)
            grid.paste(_arrows(row["image"], case, scale, mask=False), (x, y))
            draw.text((x + cell // 2, y - head + 6), f"err {row['handle_error']:.1f}px",
                      fill=(0, 0, 0))
    return grid


# ---------------------------------------------------------------- command


def run_bench(cases: list[DragCase], methods: list[str], model: str | None, params: dict,
              log: Callable[[str], None] = print,
              baselines: bool = True) -> dict[str, list[dict]]:
    """Baselines (unless ``baselines`` is false) plus ``methods`` (engine method or preset
    names) on ``cases``."""
    results: dict[str, list[dict]] = {}
    for name, fn in metrics.BASELINES.items() if baselines else ():
        results[name] = evaluate(cases, fn)
    if methods:
        from backend.engine.pipeline import DragEngine

        # A fresh LoRA cache: every case trains its LoRA, so the seconds are an edit's.
        with tempfile.TemporaryDirectory(prefix="bench-quality-lora-") as lora_dir:
            engine = DragEngine.load(model, device="cpu", lora_cache_dir=lora_dir)
            for method in methods:
                log(f"running {method} on {len(cases)} cases ...")
                results[method] = evaluate(cases, engine_runner(engine, method, params), log)
    return results


def main(args: argparse.Namespace) -> int:
    methods = list(ENGINE_METHODS) if args.method == "all" else args.method.split(",")
    methods = [m for m in methods if m not in metrics.BASELINES]
    params = {**TOY_PARAMS, "lora_steps": args.lora_steps, **parse_assignments(args.param, "--param")}
    cases = make_cases(args.cases, seed=args.seed)
    results = run_bench(cases, methods, args.model, params, lambda m: print(m, flush=True),
                        baselines=not args.no_baselines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = [f"cases: {len(cases)} (seed {args.seed}); model: {args.model}; "
            f"engine params: {json.dumps(params)}", ""]
    for name, rows in results.items():
        text += [format_table(name, rows), ""]
    table = "\n".join(text)
    print(table)
    (out / "table.md").write_text(table + "\n", "utf-8")
    serial = {name: [{k: v for k, v in r.items() if k != "image"} for r in rows]
              for name, rows in results.items()}
    (out / "results.json").write_text(json.dumps(
        {"params": params, "seed": args.seed, "model": args.model, "results": serial,
         "mean": {n: summary(r) for n, r in results.items()}}, indent=1, default=str), "utf-8")
    make_grid(cases, results).save(out / "grid.png")
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'grid.png'}")
    return 0
