"""``python -m backend bench``: per-phase wall time, UNet work and peak memory as JSON.

Runs real edits through ``DragEngine`` on a synthetic image: per method a first edit, then
``--redrags`` drags of the same image to new targets (what a user does next). Each run reports
UNet forward-equivalents per phase (``engine.work``: forward + backward = 2) next to the
official code's count for the same settings, so the ratios hold on any machine. Models:
``tiny`` (random tiny SD, the default), ``sd15-random`` (the full SD1.5 architecture with random
weights: same cost as the real model, no download), or any model path/id the loader accepts.

``--prepare-seconds N`` measures the dialog's prepare (protocol 1.2) instead: per method, the
first edit's time from OK to the result without a prepare, and with a prepare that started N
seconds before OK (the user in the dialog), and the work left after OK in both.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from backend.cli import UsageError
from backend.tools.options import add_model_option, add_run_options, model_source, run_options

QUICK = {"lora_steps": 5, "n_inference_steps": 10, "drag_steps": 5, "drag_end_step": 2,
         "track_per_denoise": 2}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time a drag edit per phase and report UNet passes and peak memory (JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(p, "random-tiny")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")
    p.add_argument("--dtype", default=None, help="precision: auto (default), fp16, bf16, fp32, "
                   "fp16-mixed, bf16-mixed")
    add_run_options(p, QUICK)
    p.add_argument("--redrags", type=int, default=1, help="drags of the same image to new "
                   "targets after the first edit, per method (default 1)")
    p.add_argument("--baseline", action="store_true", help="first run every method without "
                   "reuse (no re-drag cache, no resident LoRA, no LoRA inherited by a result: "
                   "the behaviour before them) and print the ratios measured in the same run")
    p.add_argument("--on-result", action="store_true", help="after the re-drags, drag the "
                   "first edit's result (a chain of drags: the result inherits its source's "
                   "LoRA, its inversion runs)")
    p.add_argument("--finish", metavar="WxH", help="instead: time the full-resolution finish "
                   "alone at this size (e.g. 4000x3000) with a 36 %%-area elliptical mask, "
                   "against the same blend computed over the whole image")
    p.add_argument("--warp", type=int, metavar="SIDE", help="instead: time Inpaint4Drag's warp "
                   "alone on a SIDE×SIDE image (e.g. 512) for a few region sizes and drags "
                   "(best and median of --repeat)")
    p.add_argument("--repeat", type=int, default=7, help="runs per --warp case (default 7)")
    p.add_argument("--prepare-seconds", metavar="N[,N…]", help="instead: the first edit from "
                   "OK to the result without a prepare and with one started N seconds before "
                   "OK (the dialog's prepare, protocol 1.2), per method; a list gives a row "
                   "per N; 'all' waits for the prepare to finish")
    p.set_defaults(func=run_bench)


def redrag_targets(size: int, n: int) -> list[tuple[float, float]]:
    """The n-th re-drag's target: the same disc dragged another way (left, up, down, …)."""
    moves = [(-1, 0), (0, -1), (0, 1), (1, 1), (-1, -1)]
    dx, dy = moves[(n - 1) % len(moves)]
    return [(size * (0.4 + 0.125 * dx), size * (0.5 + 0.125 * dy))]


def synthetic_case(size: int) -> tuple[np.ndarray, np.ndarray, list, list]:
    """A disc on a gradient, a drag of size/8 to the right, and a centred editable mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.stack([xx / size * 200, yy / size * 200, np.full_like(xx, 90)], axis=2)
    disc = (xx - size * 0.4) ** 2 + (yy - size * 0.5) ** 2 < (size * 0.12) ** 2
    image[disc] = (230, 40, 40)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 5 : size * 4 // 5, size // 5 : size * 4 // 5] = 255
    handle = (size * 0.4, size * 0.5)
    target = (size * 0.525, size * 0.5)
    return image.astype(np.uint8), mask, [handle], [target]


def bench_warp(side: int, repeat: int = 7) -> list[dict]:
    """Milliseconds of ``warp.bi_warp`` (Inpaint4Drag's warp, the live preview's work) on a
    ``side``² canvas: a disc of ~8 % of the area dragged by one pair and by three, and a blob of
    ~24 % by two (best and median of ``repeat``, after one warm-up)."""
    import torch

    from backend.engine.warp import bi_warp

    yy, xx = np.mgrid[0:side, 0:side]
    s = side / 512
    disc = (xx - 200 * s) ** 2 + (yy - 250 * s) ** 2 < (80 * s) ** 2
    blob = (xx - 256 * s) ** 2 + 1.3 * (yy - 256 * s) ** 2 < (150 * s) ** 2

    def pts(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(round(x * s), round(y * s)) for x, y in points]

    cases = {
        "disc, 1 pair": (disc, pts([(200, 250)]), pts([(260, 240)])),
        "disc, 3 pairs": (disc, pts([(200, 250), (150, 250), (220, 300)]),
                          pts([(260, 240), (150, 230), (240, 330)])),
        "blob, 2 pairs": (blob, pts([(256, 256), (200, 200)]), pts([(300, 280), (230, 190)])),
    }
    rows = []
    for name, (mask, handles, targets) in cases.items():
        bi_warp(mask, handles, targets)
        times = []
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            bi_warp(mask, handles, targets)
            times.append(time.perf_counter() - t0)
        times.sort()
        rows.append({"warp": f"{side}x{side}", "case": name, "region_px": int(mask.sum()),
                     "best_ms": round(times[0] * 1000, 1),
                     "median_ms": round(times[len(times) // 2] * 1000, 1),
                     "torch_threads": torch.get_num_threads()})
    return rows


def disc_mask(size: int) -> np.ndarray:
    """The synthetic case's disc, the region that moves for Inpaint4Drag."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    disc = (xx - size * 0.4) ** 2 + (yy - size * 0.5) ** 2 < (size * 0.12) ** 2
    return disc.astype(np.uint8) * 255


def build_engine(args: argparse.Namespace):
    from backend.engine.pipeline import DragEngine

    cache = tempfile.mkdtemp(prefix="drag-bench-lora-")
    source = model_source(args.model, Path(tempfile.mkdtemp(prefix="drag-bench-model-")))
    if source is None:  # SD1.5's architecture (860 M-parameter UNet) with random weights
        from backend.engine.lora import LoraCache
        from backend.engine.random_sd15 import random_sd15

        return DragEngine(random_sd15(args.device, args.dtype), LoraCache(cache))
    return DragEngine.load(source, device=args.device, dtype=args.dtype, lora_cache_dir=cache)


def bench_finish(width: int, height: int, dtype: str = "uint8", area: float = 0.36,
                 repeat: int = 3) -> dict:
    """Seconds of ``imageops.paste_edit`` (the mask's bounding box only) and of the same blend
    over the whole image (resize it all, feather it all, composite it all), best of ``repeat``,
    interleaved so both see the same machine load."""
    from PIL import Image

    from backend.engine import imageops

    rng = np.random.default_rng(0)
    kind = np.dtype(dtype)
    if kind == np.float32:
        image = rng.random((height, width, 3), dtype=np.float32)
    else:
        image = rng.integers(0, np.iinfo(kind).max + 1, (height, width, 3), dtype=kind)
    yy, xx = np.ogrid[0:height, 0:width]
    s = (area / (np.pi / 4)) ** 0.5
    mask = (((xx + 0.5 - width / 2) / (width * s / 2)) ** 2
            + ((yy + 0.5 - height / 2) / (height * s / 2)) ** 2 < 1).astype(np.uint8) * 255
    working = imageops.working_size(width, height, 512)
    edited = rng.random((working[1], working[0], 3), dtype=np.float32)
    feather = imageops.feather_width(3, width / working[0])

    def whole() -> np.ndarray:
        if kind == np.uint8:
            small = imageops.quantize(edited * 255.0, kind)
            full = np.asarray(Image.fromarray(small, "RGB").resize((width, height),
                                                                   Image.BILINEAR))
        else:
            full = imageops.resize_float(edited, (width, height)) * imageops.PIXEL_SCALE[kind]
        return imageops.composite(image, full, imageops.feather_weights(mask, feather))

    times: dict[str, list[float]] = {"box": [], "whole": []}
    for _ in range(repeat):
        for name, fn in (("whole", whole),
                         ("box", lambda: imageops.paste_edit(image, edited, mask, feather))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows, cols = imageops.mask_box(mask)
    box, full = min(times["box"]), min(times["whole"])
    return {"finish": f"{width}x{height}", "dtype": dtype, "working": list(working),
            "feather_px": feather, "mask_area": round(float((mask > 0).mean()), 3),
            "box_area": round((rows.stop - rows.start) * (cols.stop - cols.start)
                              / (width * height), 3),
            "box_s": round(box, 3), "whole_image_s": round(full, 3),
            "whole_over_box": round(full / box, 1)}


def run_bench(args: argparse.Namespace) -> int:
    import torch

    if args.warp:
        for row in bench_warp(args.warp, args.repeat):
            print(json.dumps(row), flush=True)
        return 0
    if args.finish:
        try:
            width, height = (int(v) for v in args.finish.lower().split("x"))
        except ValueError:
            raise UsageError(f"--finish wants WIDTHxHEIGHT, got {args.finish!r}") from None
        for dtype in ("uint8", "uint16", "float32"):
            print(json.dumps(bench_finish(width, height, dtype)), flush=True)
        return 0

    from backend.engine.errors import EngineError
    from backend.engine.lora import LoraCache, LoraLineage
    from backend.engine.pipeline import DragEngine

    options = run_options(args, QUICK)
    waits = prepare_waits(args.prepare_seconds) if args.prepare_seconds else None
    start = time.perf_counter()
    try:
        engine = build_engine(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - start
    if waits is not None:
        rows = [row for method in options.methods
                for row in bench_prepare(engine, method, args, options.overrides, waits)]
        print(json.dumps({"model_load_s": round(load_s, 2), "torch": torch.__version__,
                          "runs": len(rows), "ok_to_result_ratios": {
                              f"{r['method']} OK {r['ok_after']}": r["ratio_s"]
                              for r in rows}}))
        return 0
    engines = [engine]
    if args.baseline:  # the same model without reuse, its own LoRA cache: first edits train
        cold = LoraCache(tempfile.mkdtemp(prefix="drag-bench-lora-"))
        before = DragEngine(engine.model, cold, reuse=False)
        before.lineage = LoraLineage(max_entries=0)  # a result trains its own LoRA
        engines.insert(0, before)
    rows = []
    for method in options.methods:
        for eng in engines:
            rows += bench_method(eng, method, args, options.overrides)
            eng.merged_lora.restore()  # the engines share the model's weights
    summary = {"model_load_s": round(load_s, 2), "torch": torch.__version__,
               "python": platform.python_version(), "runs": len(rows),
               "ratios": ratios(rows)}
    print(json.dumps(summary))
    return 0


def bench_method(engine, method: str, args: argparse.Namespace, overrides: dict) -> list[dict]:
    """A first edit of the synthetic image, then ``args.redrags`` drags to other targets."""
    from backend.engine.params import PRESET_METHOD
    from backend.engine.types import DragRequest

    image, mask, handles, targets = synthetic_case(args.size)
    if PRESET_METHOD.get(method) == "inpaint4drag":  # its mask is the region that moves
        mask = disc_mask(args.size)
    rows = []
    runs = 1 + max(0, args.redrags)
    first_result = image
    for run in range(runs + bool(getattr(args, "on_result", False))):
        kind = "first" if run == 0 else "redrag" if run < runs else "on-result"
        request = DragRequest(image=first_result if kind == "on-result" else image,
                              handles=handles,
                              targets=redrag_targets(args.size, run) if run else targets,
                              mask=mask, method=method, prompt="a red disc", seed=0,
                              params={"work_size": args.size, **overrides})
        t0 = time.perf_counter()
        result = engine.run(request)
        total = time.perf_counter() - t0
        if run == 0:
            first_result = result.image
        memory = result.stats["memory"]
        work = result.stats["work"]
        rows.append({
            "method": method,
            "run": run,
            "kind": kind,
            "lora_inherited": bool(result.stats.get("lora_inherited")),
            "reuse": engine.redrag is not None,
            "model": args.model,
            "device": str(engine.model.device),
            "dtype": str(engine.model.dtype).removeprefix("torch."),
            "size": args.size,
            "overrides": overrides,
            "phases_s": result.timings,
            "total_s": round(total, 3),
            "fe": work["fe"],
            "fe_total": work["total"],
            "official_fe": work["official_fe"],
            "official_fe_total": work["official_total"],
            "ratio_to_official": work["ratio"],
            "official_defaults_fe_total": work["official_defaults_total"],
            "unet_passes": result.stats["unet_passes"],
            "drag_steps": result.stats.get("drag_steps"),
            "peak_memory_mb": round(memory.get("peak", 0) / 2**20, 1),
            "handles": [[round(x, 1), round(y, 1)] for x, y in result.handles],
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def prepare_waits(text: str) -> list[float | None]:
    """``--prepare-seconds``: seconds in the dialog before OK (None: until the prepare ends)."""
    try:
        return [None if part.strip() == "all" else float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--prepare-seconds wants seconds (e.g. 5,30) or all, got "
                         f"{text!r}") from None


def fresh_caches(engine) -> None:
    """Forget every LoRA and inversion: the next edit is an image's first."""
    from backend.engine.lora import LoraCache

    engine.lora_cache = LoraCache(tempfile.mkdtemp(prefix="drag-bench-lora-"))
    if engine.redrag is not None:
        engine.redrag.clear()
    engine.merged_lora.restore()


def prepared_fe(phase: str, step: int, lora_fe_per_step: int, lora_fe: int) -> int:
    """UNet forward-equivalents a prepare has done when it reports ``step`` of ``phase``."""
    if phase == "lora":
        return step * lora_fe_per_step
    if phase == "inversion":
        return lora_fe + step
    return 0


def start_prepare(engine, ahead) -> tuple[threading.Thread, list, list]:
    """The dialog's prepare in a thread: the thread, its progress ``(time, phase, step)`` as it
    comes, and (once it ended) its ``PrepareResult``."""
    seen: list[tuple[float, str, int]] = []
    done: list = []

    def prepare() -> None:
        done.append(engine.prepare_image(ahead, progress=lambda phase, step, _total: seen.append(
            (time.perf_counter(), phase, step))))

    thread = threading.Thread(target=prepare, name="bench-prepare")
    thread.start()
    return thread, seen, done


def bench_prepare(engine, method: str, args: argparse.Namespace, overrides: dict,
                  waits: list[float | None]) -> list[dict]:
    """The first edit of the synthetic image from OK to the result: without a prepare, then for
    each wait with a prepare started that many seconds before OK (``None``: OK when it ended).
    The submit joins the prepare (waits for its end, as the server does), then runs; the work
    after OK is the edit's plus what the prepare had not done yet."""
    from backend.engine.params import PRESET_METHOD
    from backend.engine.types import DragRequest

    image, mask, handles, targets = synthetic_case(args.size)
    if PRESET_METHOD.get(method) == "inpaint4drag":
        mask = disc_mask(args.size)
    params = {"work_size": args.size, **overrides}
    request = DragRequest(image=image, handles=handles, targets=targets, mask=mask,
                          method=method, prompt="a red disc", seed=0, params=params)
    ahead = DragRequest(image=image, handles=[], targets=[], method=method,
                        prompt="a red disc", seed=0, params=params)
    _, resolved = engine.table.resolve(method, params)
    per_step = 2 * resolved.lora_batch if resolved.lora_steps else 0
    fresh_caches(engine)
    t0 = time.perf_counter()
    plain = engine.run(request)
    plain_s = time.perf_counter() - t0
    plain_fe = plain.stats.get("work", {}).get("total", 0)
    rows = []
    for wait in waits:
        fresh_caches(engine)
        start = time.perf_counter()
        thread, seen, done = start_prepare(engine, ahead)
        if wait is None:
            thread.join()
        else:
            thread.join(wait)  # the user in the dialog (returns early if it ended)
            time.sleep(max(0.0, wait - (time.perf_counter() - start)))
        ok = time.perf_counter()
        ended = not thread.is_alive()
        last = [e for e in seen if e[0] <= ok]
        thread.join()  # the submit joins the prepare
        result = engine.run(request)
        finish = time.perf_counter()
        prepared = done[0].stats["work"]
        left = 0 if ended else prepared["total"] - (
            prepared_fe(last[-1][1], last[-1][2], per_step, prepared["fe"].get("lora", 0))
            if last else 0)
        fe_after = result.stats.get("work", {}).get("total", 0) + left
        row = {"method": method, "model": args.model, "size": args.size,
               "device": str((engine.model or engine.inpainter).device),
               "overrides": overrides,
               # the wait asked for ("at once", "after N s", "when prepared") and the one measured
               "ok_after": ("at once" if wait == 0 else "when prepared" if wait is None
                            else f"after {wait:g} s"),
               "dialog_s": round(ok - start, 2),
               "prepare_s": round(sum(done[0].timings.values()), 2),
               "prepared_at_ok": ended,
               "no_prepare_s": round(plain_s, 2), "ok_to_result_s": round(finish - ok, 2),
               "ratio_s": round((finish - ok) / plain_s, 3),
               "no_prepare_fe": plain_fe, "fe_after_ok": fe_after,
               "fe_before_ok": prepared["total"] - left,
               "prepare_fe": prepared["fe"], "edit_fe_after_prepare":
                   result.stats.get("work", {}).get("fe", {})}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per method (and ``<method> no-reuse`` with ``--baseline``), measured in this run: seconds
    and work of the first edit and the mean re-drag, re-drag / first, and with ``--baseline``
    the reuse / no-reuse ratios."""
    out: dict[str, dict[str, float]] = {}
    for method, reuse in dict.fromkeys((r["method"], r["reuse"]) for r in rows):
        group = [r for r in rows if r["method"] == method and r["reuse"] == reuse]
        first = next(r for r in group if r["kind"] == "first")
        redrags = [r for r in group if r["kind"] == "redrag"]
        entry = {"first_s": first["total_s"], "first_fe": first["fe_total"],
                 "first_official_fe": first["official_fe_total"]}
        if redrags:
            seconds = sum(r["total_s"] for r in redrags) / len(redrags)
            fe = sum(r["fe_total"] for r in redrags) / len(redrags)
            official = sum(r["official_fe_total"] for r in redrags) / len(redrags)
            entry.update({"redrag_s": round(seconds, 3), "redrag_fe": fe,
                          "redrag_official_fe": official,
                          "redrag_over_first_s": round(seconds / first["total_s"], 3),
                          "redrag_over_first_fe": round(fe / first["fe_total"], 3)})
        on_result = next((r for r in group if r["kind"] == "on-result"), None)
        if on_result is not None:
            entry.update({"on_result_s": on_result["total_s"],
                          "on_result_fe": on_result["fe_total"]})
        out[method if reuse else f"{method} no-reuse"] = entry
    for method in list(out):
        before = out.get(f"{method} no-reuse")
        if before is None:
            continue
        after = out[method]
        for name in ("first_s", "first_fe", "redrag_s", "redrag_fe", "on_result_s",
                     "on_result_fe"):
            if name in after and before.get(name):
                after[f"{name}_vs_no_reuse"] = round(after[name] / before[name], 3)
    return out
