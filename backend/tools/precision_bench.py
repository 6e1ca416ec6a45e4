"""``python -m backend precision``: how far each precision moves a drag from fp32.

Runs the same edits (same image, points, seed, LoRA draws) once per precision branch
(``devices.PRECISIONS``) and prints, per method and branch, the difference from the fp32 run:
the drag's stop step, where the tracked handles ended, the edited latent (relative L2) and the
decoded image (PSNR), plus the handle error against the known correct result on the demo model.

Models: ``demo`` (the trained demo model with its own ``preset.json``, the default: its drags
move content, so the figures mean something), ``random-tiny`` (random weights), ``sd15-random``
(the full architecture, for a GPU), or a model path. Every branch starts from freshly loaded fp32 weights.
On the CPU the fp16 branches are emulated (fp16 weights and CPU autocast with a CPU GradScaler):
the roundings are the GPU's formats, the kernels and their accumulation order are the CPU's.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from backend.cli import UsageError
from backend.tools.options import add_model_option, add_run_options, model_source, run_options

BRANCHES = ("fp32", "fp16", "bf16", "fp16-mixed", "bf16-mixed")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("precision", help="how far each precision moves a drag from fp32",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p, "demo")
    p.add_argument("--device", default="cpu", help="cpu (default, fp16 emulated), cuda, mps")
    p.add_argument("--branches", default=",".join(BRANCHES),
                   help="comma-separated precisions (default: all; fp32 always runs first)")
    p.add_argument("--cases", type=int, default=3, help="demo model shape cases (default 3)")
    p.add_argument("--size", type=int, default=128, help="image side for other models")
    p.add_argument("--lora-steps", type=int, default=20, help="LoRA steps per edit (default 20)")
    add_run_options(p)
    p.add_argument("--json", help="also write the raw figures to this file")
    p.set_defaults(func=main)


def _engine_class():
    from backend.engine.pipeline import DragEngine

    class Capturing(DragEngine):
        """A DragEngine that keeps the last edited latent (for the latent difference)."""

        latent = None

        def decode_latents(self, latents):
            self.latent = latents.detach().float().cpu().clone()
            return super().decode_latents(latents)

    return Capturing


def load_branch(source: str | None, device: str, branch: str):
    """The model (``options.model_source``) with fresh fp32 weights, cast to ``branch``
    (emulation allowed on the CPU)."""
    from backend.engine.devices import PRECISIONS
    from backend.engine.models import load_model

    if source is None:
        from backend.engine.random_sd15 import random_sd15

        loaded = random_sd15(device, "fp32")
    else:
        loaded = load_model(source, device=device, dtype="fp32")
    loaded.cast(PRECISIONS[branch])
    return loaded


def _cases(args: argparse.Namespace) -> list[dict]:
    if args.model == "demo":
        from backend.demo.shapes import make_cases

        return [{"name": c.name, "image": c.image, "mask": c.mask, "handles": list(c.handles),
                 "targets": list(c.targets), "prompt": c.prompt, "case": c}
                for c in make_cases(args.cases)]
    from backend.tools.bench import synthetic_case

    image, mask, handles, targets = synthetic_case(args.size)
    return [{"name": "disc", "image": image, "mask": mask, "handles": handles,
             "targets": targets, "prompt": "a red disc", "case": None}]


def run_branch(engine, cases: list[dict], method: str, params: dict) -> list[dict]:
    from backend.engine.types import DragRequest

    out = []
    for c in cases:
        start = time.perf_counter()
        result = engine.run(DragRequest(image=c["image"], handles=c["handles"],
                                        targets=c["targets"], mask=c["mask"], method=method,
                                        prompt=c["prompt"], seed=0, params=dict(params)))
        row = {"seconds": time.perf_counter() - start, "latent": engine.latent,
               "image": result.image, "handles": result.handles,
               "drag_steps": result.stats.get("drag_steps", 0)}
        if c["case"] is not None:
            from backend.demo.metrics import score

            row["handle_error"] = score(c["case"], result.image).handle_error
        out.append(row)
    return out


def compare(ref: dict, run: dict) -> dict:
    """How far ``run`` is from the fp32 run ``ref`` of the same case."""
    diff = (run["latent"] - ref["latent"]).float()
    mse = float(np.mean((run["image"].astype(np.float64) - ref["image"]) ** 2))
    return {
        "stop_step_diff": run["drag_steps"] - ref["drag_steps"],
        "handle_shift_px": max(math.dist(a, b) for a, b in zip(run["handles"], ref["handles"],
                                                               strict=True)),
        "latent_rel_l2": float(diff.norm() / ref["latent"].norm().clamp_min(1e-12)),
        "latent_max_abs": float(diff.abs().max()),
        "image_psnr_db": math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse),
    }


def summarise(method: str, branch: str, runs: list[dict], ref: list[dict]) -> dict:
    diffs = [compare(r0, r) for r0, r in zip(ref, runs, strict=True)]
    row = {"method": method, "branch": branch, "cases": len(runs),
           "stop_steps": [r["drag_steps"] for r in runs],
           "mean_abs_stop_step_diff": float(np.mean([abs(d["stop_step_diff"]) for d in diffs])),
           "max_handle_shift_px": max(d["handle_shift_px"] for d in diffs),
           "mean_latent_rel_l2": float(np.mean([d["latent_rel_l2"] for d in diffs])),
           "max_latent_abs": max(d["latent_max_abs"] for d in diffs),
           "min_image_psnr_db": min(d["image_psnr_db"] for d in diffs),
           "seconds_per_edit": float(np.mean([r["seconds"] for r in runs]))}
    if "handle_error" in runs[0]:
        row["mean_handle_error_px"] = float(np.mean([r["handle_error"] for r in runs]))
    return row


def format_row(row: dict) -> str:
    psnr = row["min_image_psnr_db"]
    err = row.get("mean_handle_error_px")
    return (f"| {row['method']} | {row['branch']} | {row['stop_steps']} | "
            f"{row['mean_abs_stop_step_diff']:.1f} | {row['max_handle_shift_px']:.1f} | "
            f"{row['mean_latent_rel_l2']:.4f} | {'exact' if math.isinf(psnr) else f'{psnr:.1f}'}"
            f" | {'—' if err is None else f'{err:.2f}'} | {row['seconds_per_edit']:.1f} |")


HEADER = ("| method | precision | stop steps | mean abs. stop-step diff | max handle shift px | "
          "latent rel. L2 | min image PSNR vs fp32 dB | handle error px | s/edit |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|")


def main(args: argparse.Namespace) -> int:
    import torch

    from backend.engine.lora import LoraCache

    options = run_options(args)
    overrides = options.overrides
    branches = ["fp32"] + [b for b in args.branches.split(",") if b and b != "fp32"]
    unknown = [b for b in branches if b not in BRANCHES]
    if unknown:
        raise UsageError(f"unknown precision {unknown[0]!r}; use {', '.join(BRANCHES)}")
    torch.manual_seed(0)
    cases = _cases(args)
    engine_cls = _engine_class()
    rows = []
    with tempfile.TemporaryDirectory(prefix="precision-bench-") as tmp:
        source = model_source(args.model, Path(tmp))
        print(f"model {args.model}, device {args.device}, {len(cases)} case(s), "
              f"LoRA {args.lora_steps} steps; differences from fp32 on the same inputs\n")
        print(HEADER, flush=True)
        for method in options.methods:
            # the demo model's own preset.json sets its working size; others run at --size
            size = {} if args.model == "demo" else {"work_size": args.size}
            params = {**size, "lora_steps": args.lora_steps, **overrides}
            ref = None
            for branch in branches:
                model = load_branch(source, args.device, branch)
                engine = engine_cls(model, LoraCache(Path(tmp) / f"lora-{branch}"))
                runs = run_branch(engine, cases, method, params)
                ref = runs if ref is None else ref
                rows.append(summarise(method, branch, runs, ref))
                print(format_row(rows[-1]), flush=True)
                del engine, model
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0
