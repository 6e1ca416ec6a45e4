"""``python -m backend gpu-check``: prove an accelerator runs the whole engine. Run it first.

Builds the full SD1.5 architecture with random weights directly on the device (no download;
random weights cost the same as real ones), then runs one complete edit of each method at 512²
with the default settings and prints, per phase: wall time, UNet forward-equivalents and peak
device memory; then whether the edited latent is finite and the pixels outside the mask are
exactly the input's. Exits 1 if any check fails. ``--max-memory-gb 8`` caps what PyTorch may
allocate on a CUDA GPU, so the run shows the edit fits 8 GB (with the automatic LoRA
fallbacks, which it reports). On a CPU it runs too, slowly: use ``--size 64 --quick``.

``--compile`` also runs every method through ``torch.compile`` (the UNet runner of the
inversion, drag and denoising, and the LoRA training's forward and backward), twice: the first
run includes compiling; it reports both, per phase next to the eager edit, with the speed-up of
the second run and how many UNet calls of each phase went through the compiled forward.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from backend.engine.params import LATENT_METHODS
from backend.tools.options import (
    add_model_option,
    add_run_options,
    model_source,
    run_options,
)

QUICK = {"lora_steps": 2, "n_inference_steps": 8, "drag_steps": 3, "drag_end_step": 2,
         "track_per_denoise": 1}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu-check", help="one full SD1.5 edit per method on the accelerator: "
                       "time, work, memory and correctness per phase",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="auto (default), cuda, cuda:N, mps, cpu")
    p.add_argument("--dtype", default=None, help="auto (default) or a precision name")
    add_model_option(p, "sd15-random")
    p.add_argument("--size", type=int, default=512, help="square image side (default 512)")
    add_run_options(p, QUICK, LATENT_METHODS)
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="cap PyTorch's CUDA allocations (e.g. 8) to prove the edit fits")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also run each method through torch.compile (UNet runner and LoRA "
                   "training), twice, and report both next to the eager edit (BACKEND: "
                   "inductor, the default; aot_eager or eager to check it on a CPU)")
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(func=main)


def _engine_class():
    from backend.engine.pipeline import DragEngine

    class Checked(DragEngine):
        """A DragEngine that keeps the last edited latent, to check it is finite."""

        latent = None

        def decode_latents(self, latents):
            self.latent = latents.detach().float().cpu().clone()
            return super().decode_latents(latents)

    return Checked


class PhaseClock:
    """Wall time and peak device memory per progress phase (the device synchronised at each
    boundary, so queued GPU work is booked to the phase that queued it)."""

    def __init__(self, device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self.phase: str | None = None
        self.start = time.perf_counter()

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def __call__(self, phase: str, _step: int = 0, _total: int = 0) -> None:
        if phase == self.phase:
            return
        self.close()
        self.phase = phase

    def close(self) -> None:
        import torch

        self._sync()
        now = time.perf_counter()
        if self.phase is not None:
            self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.start
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
                self.peak_bytes[self.phase] = max(self.peak_bytes.get(self.phase, 0), peak)
                torch.cuda.reset_peak_memory_stats(self.device)
        self.start = now


def build_model(args: argparse.Namespace, tmp: Path):
    source = model_source(args.model, tmp)
    if source is None:
        from backend.engine.random_sd15 import random_sd15

        return random_sd15(args.device, args.dtype)
    from backend.engine.models import load_model

    return load_model(source, device=args.device, dtype=args.dtype)


def check_edit(engine, method: str, size: int, params: dict, lora_dir: Path) -> dict:
    """One edit with a phase clock (its LoRA trained, in a fresh cache ``lora_dir``); the
    figures and the two correctness checks. A compiled engine's UNet calls are counted per
    phase (``compiled_calls``: LoRA training's included)."""
    from backend.engine.lora import LoraCache
    from backend.engine.types import DragRequest
    from backend.tools.bench import synthetic_case

    image, mask, handles, targets = synthetic_case(size)
    clock = PhaseClock(engine.model.device)
    engine.lora_cache = LoraCache(lora_dir)
    calls: dict[str, int] = {}
    compiled = engine.unet_forward
    if compiled is not None:
        def counted(*args, **kwargs):
            calls[clock.phase] = calls.get(clock.phase, 0) + 1
            return compiled(*args, **kwargs)
        engine.unet_forward = counted
    start = time.perf_counter()
    result = engine.run(DragRequest(image=image, handles=handles, targets=targets, mask=mask,
                                    method=method, prompt="a red disc", seed=0,
                                    params={"work_size": size, **params}), progress=clock)
    clock.close()
    engine.unet_forward = compiled
    work = result.stats["work"]
    return {
        "method": method, "total_s": round(time.perf_counter() - start, 2),
        "phase_s": {k: round(v, 2) for k, v in clock.seconds.items()},
        "fe": work["fe"], "fe_total": work["total"], "official_fe_total": work["official_total"],
        "peak_gb": {k: round(v / 1e9, 2) for k, v in clock.peak_bytes.items()},
        "rss_peak_gb": round(result.stats["memory"].get("peak", 0) / 1e9, 2)
        if engine.model.device.type == "cpu" else None,
        "drag_steps": result.stats.get("drag_steps"),
        "finite": bool(engine.latent is not None and np.isfinite(engine.latent.numpy()).all()),
        "unmasked_exact": bool((result.image[mask == 0] == image[mask == 0]).all()),
        "compiled_calls": calls,
    }


def compare_compiled(engine, compiled, method: str, size: int, params: dict,
                     tmp: Path) -> dict:
    """The eager edit's row with the compiled engine's two runs (the first compiles) and the
    second run's speed-up per phase."""
    row = check_edit(engine, method, size, params, tmp / f"{method}-eager")
    first = check_edit(compiled, method, size, params, tmp / f"{method}-compiled-1")
    second = check_edit(compiled, method, size, params, tmp / f"{method}-compiled-2")
    row["compiled_first"], row["compiled"] = first, second
    row["compiled_speedup"] = {phase: round(seconds / second["phase_s"][phase], 2)
                               for phase, seconds in row["phase_s"].items()
                               if second["phase_s"].get(phase)}
    for run in (first, second):
        row["finite"] &= run["finite"]
        row["unmasked_exact"] &= run["unmasked_exact"]
    return row


def describe(model) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(),
            "device": str(model.device), "precision": model.precision.name}
    if model.device.type == "cuda":
        props = torch.cuda.get_device_properties(model.device)
        info.update(gpu=props.name, total_gb=round(props.total_memory / 1e9, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    bf16=torch.cuda.is_bf16_supported())
    return info


def format_row(row: dict) -> str:
    phases = " ".join(f"{k} {v:.1f}s/{row['fe'].get(k, 0)}FE" for k, v in row["phase_s"].items())
    memory = " ".join(f"{k} {v:.2f}" for k, v in row["peak_gb"].items()) or "-"
    ok = "ok" if row["finite"] and row["unmasked_exact"] else "FAILED"
    return (f"{row['method']}: {ok} in {row['total_s']:.1f} s, {row['fe_total']} FE "
            f"(official {row['official_fe_total']}), drag steps {row['drag_steps']}\n"
            f"  per phase: {phases}\n  peak GB per phase: {memory}"
            + (f"\n  peak RSS GB: {row['rss_peak_gb']}" if row["rss_peak_gb"] else "")
            + f"\n  finite latent: {row['finite']}, unmasked pixels exact: "
              f"{row['unmasked_exact']}" + _compiled_lines(row))


def _compiled_lines(row: dict) -> str:
    if "compiled" not in row:
        return ""
    lines = []
    for name in ("compiled_first", "compiled"):
        run = row[name]
        phases = " ".join(f"{k} {v:.1f}s" for k, v in run["phase_s"].items())
        lines.append(f"\n  {'compiled, 1st (compiling)' if name == 'compiled_first' else 'compiled, 2nd'}: "
                     f"{run['total_s']:.1f} s: {phases}")
    speedup = " ".join(f"{k} {v:.2f}x" for k, v in row["compiled_speedup"].items())
    calls = " ".join(f"{k} {v}" for k, v in row["compiled"]["compiled_calls"].items())
    return "".join(lines) + f"\n  compiled speed-up (2nd run): {speedup}" + \
        f"\n  compiled UNet calls per phase: {calls}"


def main(args: argparse.Namespace) -> int:
    import torch

    from backend.engine.errors import EngineError
    from backend.engine.lora import LoraCache

    options = run_options(args, QUICK, LATENT_METHODS)
    methods, params = options.methods, options.overrides
    report: dict = {"params": params, "size": args.size, "runs": []}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        start = time.perf_counter()
        try:
            model = build_model(args, Path(tmp))
        except EngineError as exc:
            print(f"error: {exc}")
            return 2
        report["build_s"] = round(time.perf_counter() - start, 1)
        report["system"] = describe(model)
        if args.max_memory_gb and model.device.type == "cuda":
            total = torch.cuda.get_device_properties(model.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_memory_gb * 1e9 / total),
                                                       model.device)
            report["memory_cap_gb"] = args.max_memory_gb
        print(json.dumps(report["system"]), f"model built in {report['build_s']} s", flush=True)
        engine = _engine_class()(model, LoraCache(Path(tmp) / "lora"), reuse=False)
        compiled = (_engine_class()(model, LoraCache(Path(tmp) / "lora"), reuse=False,
                                    compile_unet=args.compile) if args.compile else None)
        failed = False
        for method in methods:
            try:
                if compiled is None:
                    row = check_edit(engine, method, args.size, params,
                                     Path(tmp) / f"lora-{method}")
                else:
                    row = compare_compiled(engine, compiled, method, args.size, params,
                                           Path(tmp))
            except EngineError as exc:
                print(f"{method}: FAILED: {exc}", flush=True)
                report["runs"].append({"method": method, "error": str(exc)})
                failed = True
                continue
            row["memory_fallbacks"] = vars(model.memory).copy()
            report["runs"].append(row)
            failed |= not (row["finite"] and row["unmasked_exact"])
            print(format_row(row), flush=True)
        if any(vars(model.memory).values()):
            print(f"LoRA memory settings in the end (engine.memory): {vars(model.memory)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0
