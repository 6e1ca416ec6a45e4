"""DragEngine: one drag edit from input pixels to output pixels, top to bottom.

DragDiffusion and GoodDrag: prepare inputs → encode prompt and image → identity LoRA → DDIM
inversion → drag → denoise → decode → back to full resolution and composite.
Inpaint4Drag (``engine.inpaint4drag``): warp the region at full resolution → inpaint what it
left behind with the inpainting model, or with the plain model's blended-latent filler.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from backend.engine import dragdiffusion, gooddrag, imageops, inpaint4drag
from backend.engine.cancel import cancellable
from backend.engine.context import DragContext, DragRun
from backend.engine.devices import (
    autocast,
    grad_scaler,
    is_oom,
    memory_info,
    reset_peak_memory,
)
from backend.engine.diffusion import Schedule, UNetRunner, compiled_unet_forward, run_inversion
from backend.engine.errors import EngineError, OutOfMemory
from backend.engine.fillers import BlendedLatentFiller, Filler
from backend.engine.lora import LoraCache, LoraLineage, PreparedLora, prepare_lora
from backend.engine.lora_merge import MergedLora
from backend.engine.memory import free_memory, oom_message
from backend.engine.models import DEFAULT_MODEL, LoadedModel, load_model
from backend.engine.params import (
    LATENT_METHODS,
    DragParams,
    MethodTable,
    served_algorithms,
)
from backend.engine.redrag import RedragCache, RedragEntry, image_digest, redrag_key
from backend.engine.types import (
    CancelToken,
    DragRequest,
    DragResult,
    PrepareResult,
    PreviewFn,
    ProgressFn,
)
from backend.engine.work import WorkCounter, official_defaults, official_work

ALGORITHMS = {"dragdiffusion": dragdiffusion.run, "gooddrag": gooddrag.run}
# What each algorithm derives from z_t* alone before it reads the points (into the re-drag
# cache's memo): a prepare computes it ahead.
MEMOS = {"dragdiffusion": dragdiffusion.prepare, "gooddrag": gooddrag.prepare}
assert set(ALGORITHMS) == set(MEMOS) == set(LATENT_METHODS)

# Approximate RGB of an SD1.5 latent (scaled by the VAE factor): cheap previews without the VAE.
LATENT_TO_RGB = torch.tensor(device="cpu", data=[
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
])

SELECTION_TOO_SMALL = (
    "The selection is smaller than the model's 8-pixel cell (about {cell:.3g} image pixels at "
    "this working size), so it was ignored while dragging: nothing outside it was held in "
    "place. Pixels outside the selection are still kept exactly. Select a larger area to "
    "guide the edit."
)


@dataclass
class _Prepared:
    """The request at working resolution."""

    size: tuple[int, int]  # full (W, H)
    working_size: tuple[int, int]  # the size the model edits at (w, h)
    image: np.ndarray  # the input pixels (H×W×C, uint8, uint16 or float32)
    pixels: torch.Tensor  # [1, 3, h, w] in [-1, 1]
    mask_full: np.ndarray | None  # H×W uint8, >0 editable
    mask_working: np.ndarray | None  # h×w bool, at the working size


@dataclass
class _Started:
    """An edit up to the points: its inputs, LoRA, UNet runner, schedule and z_t*."""

    prep: _Prepared
    lora: PreparedLora
    runner: UNetRunner
    schedule: Schedule
    entry: RedragEntry


def latent_preview(latent: torch.Tensor,
                   latent_to_rgb: torch.Tensor | list | None = None) -> np.ndarray:
    """[1, C, h, w] latent → h×w×3 uint8 through a fixed linear map (no VAE decode): SD1.5's,
    or the model's own C×3 ``latent_to_rgb`` (from its ``preset.json``)."""
    matrix = LATENT_TO_RGB if latent_to_rgb is None else torch.as_tensor(latent_to_rgb,
                                                                         device="cpu")
    rgb = torch.einsum("chw,cr->hwr", latent[0].float().cpu(), matrix.float())
    return ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()


class PreviewThrottle:
    """At most one preview per ``interval`` seconds, decided before anything leaves the device
    (the latent → RGB map and its copy to the host run only for the previews shown)."""

    def __init__(self, preview: PreviewFn, interval: float,
                 latent_to_rgb: torch.Tensor | None = None) -> None:
        self.preview, self.interval, self.latent_to_rgb = preview, interval, latent_to_rgb
        self.shown = 0
        self._last = -math.inf

    def __call__(self, phase: str, step: int, latent: torch.Tensor) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        self.shown += 1
        self.preview(phase, step, latent_preview(latent, self.latent_to_rgb))


def _rgb_map(model: LoadedModel | None) -> torch.Tensor | None:
    """The model's own latent → RGB map (its ``preset.json``), or None: SD1.5's."""
    rgb_map = model.preset.get("latent_to_rgb") if model is not None else None
    return None if rgb_map is None else torch.tensor(rgb_map, dtype=torch.float32, device="cpu")


def _own_params(model: LoadedModel | None, inpainter) -> dict:
    """The loaded models' own parameter defaults: a plain model's ``preset.json``, then the
    inpainting model's (e.g. SDXL inpainting's strength); usually none."""
    params: dict = {}
    for m in (model, inpainter):
        if m is not None:
            params.update(m.preset.get("params", {}))
    return params


def _reporter(progress: ProgressFn | None, cancel: CancelToken | None) -> ProgressFn:
    """The progress callback the phases call at each step: it checks the cancel first."""

    def report(phase: str, step: int, total: int) -> None:
        if cancel is not None:
            cancel.check()
        if progress is not None:
            progress(phase, step, total)

    return report


class DragEngine:
    """Holds the loaded models and runs drag edits on them (one at a time).

    ``model`` is a plain text-to-image model (SD1.5 or the demo model) for every method;
    ``inpainter`` an optional inpainting model for Inpaint4Drag. Either may be missing: without
    an inpainter Inpaint4Drag fills with the plain model's blended-latent filler; without a
    plain model only Inpaint4Drag runs.
    """

    def __init__(self, model: LoadedModel | None, lora_cache: LoraCache | None = None, *,
                 redrag: RedragCache | None = None, reuse: bool = True,
                 compile_unet: bool | str = False, inpainter=None) -> None:
        """``reuse`` false turns off the re-drag cache and keeps no LoRA merged between edits
        (each edit then inverts again and merges its LoRA from the disk cache).
        ``compile_unet`` runs the UNet through ``torch.compile`` (True: inductor, or a backend
        name): the LoRA training's forward and backward, the inversion, the drag and the
        denoising. ``inpainter`` is an ``inpaint_models.InpaintModel``."""
        if model is None and inpainter is None:
            raise EngineError("no model to serve: give a plain model, an inpainting model or both")
        self.model = model
        self.inpainter = inpainter
        self.unet_forward = None
        if compile_unet:
            self.unet_forward = compiled_unet_forward(
                compile_unet if isinstance(compile_unet, str) else "inductor")
        try:  # what this engine runs: the algorithms its models run (without a plain model,
            # only Inpaint4Drag), their defaults with the models' own applied
            self.table = MethodTable(_own_params(model, inpainter),
                                     served_algorithms(plain_model=model is not None))
        except EngineError as exc:
            source = model.source if model is not None else inpainter.source
            raise EngineError(f"the preset.json of {source} is not valid: {exc}") from None
        self.lora_cache = lora_cache if lora_cache is not None else LoraCache()
        self.redrag = (redrag if redrag is not None else RedragCache()) if reuse else None
        self.keep_lora = reuse
        self.merged_lora = MergedLora(model) if model is not None else None
        self.lineage = LoraLineage()  # the LoRA each recent result inherits (chains of drags)
        self._filler: Filler | None = None

    @property
    def filler(self) -> Filler:
        """What fills Inpaint4Drag's holes: the inpainting model, else the plain model (made on
        first use, then kept with its empty-prompt embedding)."""
        if self._filler is None:
            if self.inpainter is not None:
                from backend.engine.inpaint_models import InpaintModelFiller

                self._filler = InpaintModelFiller(self.inpainter)
            else:
                self._filler = BlendedLatentFiller(self.model)
        return self._filler

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        vae: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        lora_cache_dir: str | None = None,
        reuse: bool = True,
        compile_unet: bool | str = False,
        inpaint_model: str | None = None,
        lcm_lora: str | None = None,
        tiny_vae: str | None = None,
    ) -> DragEngine:
        """``model`` None serves only the inpainting model ``inpaint_model`` (with the optional
        ``lcm_lora`` fused and ``tiny_vae`` as its VAE)."""
        loaded = load_model(model, vae=vae, device=device, dtype=dtype) if model else None
        inpainter = None
        if inpaint_model:
            from backend.engine.inpaint_models import load_inpaint_model

            inpainter = load_inpaint_model(inpaint_model, lcm_lora=lcm_lora, tiny_vae=tiny_vae,
                                           device=device, dtype=dtype)
        return cls(loaded, LoraCache(lora_cache_dir) if lora_cache_dir else None, reuse=reuse,
                   compile_unet=compile_unet, inpainter=inpainter)

    def info(self) -> dict:
        m = self.model if self.model is not None else self.inpainter
        dtype = m.dtype if self.model is not None else m.precision.weights
        return {
            "model": m.name,
            "model_source": str(m.source),
            "inpaint_model": self.inpainter.describe() if self.inpainter is not None else None,
            "filler": self.filler.name,
            "device": str(m.device),
            "dtype": str(dtype).removeprefix("torch."),
            "precision": m.precision.name,
            "memory": memory_info(m.device),
        }

    # -- the edit -------------------------------------------------------------------------

    def run(
        self,
        request: DragRequest,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
        preview: PreviewFn | None = None,
        preview_interval: float = 0.0,
    ) -> DragResult:
        """Run one edit. Raises ``EngineError`` subclasses with actionable messages.

        ``preview(phase, step, rgb)`` receives rough previews of the edited image while denoising
        (latent resolution, h×w×3 uint8, colours approximated without the VAE), at most one per
        ``preview_interval`` seconds: the others are never copied off the device.
        """
        imageops.validate_request(request.image, request.handles, request.targets, request.mask)
        height, width = request.image.shape[:2]
        algorithm, params = self.table.resolve(request.method, request.params, (width, height))
        phase = ["load"]  # the phase an out-of-memory error is reported in

        def tracked(name: str, step: int, total: int) -> None:
            phase[0] = name
            if progress is not None:
                progress(name, step, total)

        # A compiled forward cannot run Python between blocks: it keeps the per-step checks.
        within = cancel if self.unet_forward is None else None
        try:
            if algorithm == "inpaint4drag":
                modules = self._filler_modules()
                with cancellable(within, *modules):
                    return self._run_inpaint4drag(request, params, tracked, cancel, preview,
                                                  preview_interval)
            with cancellable(within, self.model.unet, self.model.vae):
                return self._run(request, algorithm, params, tracked, cancel, preview,
                                 preview_interval)
        except EngineError:
            raise
        except Exception as exc:
            if is_oom(exc):
                self._free_memory()
                raise OutOfMemory(oom_message(phase[0])) from exc
            raise
        finally:
            if self.model is not None:
                self.model.unet.zero_grad(set_to_none=True)

    def prepare_image(self, request: DragRequest, progress: ProgressFn | None = None,
                      cancel: CancelToken | None = None, masked: bool = True) -> PrepareResult:
        """An edit's work before it reads the points, kept in the caches for the edit that
        follows (the protocol's ``prepare``): for DragDiffusion and GoodDrag the LoRA (merged,
        and in the disk cache), z_t* and the algorithm's memo (the re-drag cache); an edit of
        the same image, method, settings, prompt and seed then starts at the drag. For
        Inpaint4Drag, whose work all depends on the points, it only builds the filler (the
        first time: the plain model's empty-prompt embedding). ``masked``: whether the edit
        will have a mask (DragDiffusion's cached reference has the mask term's latent then)."""
        imageops.validate_image(request.image)
        height, width = request.image.shape[:2]
        algorithm, params = self.table.resolve(request.method, request.params, (width, height))
        timings: dict[str, float] = {}
        if algorithm == "inpaint4drag":
            start = time.perf_counter()
            _ = self.filler
            timings["load"] = round(time.perf_counter() - start, 4)
            return PrepareResult(timings, {"work": {"fe": {}, "total": 0}})
        within = cancel if self.unet_forward is None else None
        try:
            with cancellable(within, self.model.unet, self.model.vae):
                return self._prepare_latent(request, algorithm, params, progress, cancel,
                                            masked, timings)
        except EngineError:
            raise
        except Exception as exc:
            if is_oom(exc):
                self._free_memory()
                raise OutOfMemory(oom_message("prepare")) from exc
            raise
        finally:
            self.model.unet.zero_grad(set_to_none=True)

    def _prepare_latent(self, request: DragRequest, algorithm: str, params: DragParams,
                        progress: ProgressFn | None, cancel: CancelToken | None, masked: bool,
                        timings: dict[str, float]) -> PrepareResult:
        torch.manual_seed(request.seed)
        report = _reporter(progress, cancel)
        work = WorkCounter()
        try:
            started = self._start(request, algorithm, params, report, cancel, timings, work)
            with self._timed(timings, "reference"):
                ctx = self.drag_context(started.prep, params, started.runner, started.schedule,
                                        request, report)
                ctx.memo = started.entry.memo
                MEMOS[algorithm](ctx, started.entry.z_star, masked)
        finally:
            if not self.keep_lora:
                self.merged_lora.restore()
            if self.redrag is not None:
                self.redrag.trim()
        return PrepareResult(timings, {
            "work": {"fe": dict(work.fe), "total": work.total},
            "reused": {"lora": started.lora.key is not None and not started.lora.trained,
                       "inversion": started.entry.reused},
            "lora_inherited": started.lora.inherited,
            "why_not_inherited": started.lora.why_not_inherited,
            "work_size": list(started.prep.working_size)})

    def _filler_modules(self) -> tuple[torch.nn.Module, ...]:
        """The UNet and VAE Inpaint4Drag's filler runs: the inpainting model's, else the plain
        model's (the cancel is checked at their blocks)."""
        if self.inpainter is not None:
            return self.inpainter.pipe.unet, self.inpainter.pipe.vae
        return self.model.unet, self.model.vae

    def _run_inpaint4drag(self, request: DragRequest, params: DragParams,
                          progress: ProgressFn | None, cancel: CancelToken | None,
                          preview: PreviewFn | None, preview_interval: float) -> DragResult:
        """Warp at full resolution, inpaint with ``self.filler`` (``engine.inpaint4drag``)."""
        device = (self.inpainter or self.model).device
        reset_peak_memory(device)
        torch.manual_seed(request.seed)
        report = _reporter(progress, cancel)
        if self.inpainter is None:  # the plain model fills: without an earlier edit's LoRA
            self.merged_lora.restore()
        show = None
        if preview is not None:
            throttle = PreviewThrottle(preview, preview_interval,
                                       _rgb_map(self.model if self.inpainter is None else None))
            show = lambda step, latent: throttle("denoise", step, latent)  # noqa: E731
        scale = (self.inpainter or self.model).vae_scale_factor
        start = time.perf_counter()
        result = inpaint4drag.run(request, params, self.filler, report, show, vae_scale=scale)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.timings["total"] = round(time.perf_counter() - start, 4)
        result.stats["memory"] = memory_info(device)
        return result

    def _run(self, request: DragRequest, algorithm: str, params: DragParams,
             progress: ProgressFn | None, cancel: CancelToken | None,
             preview: PreviewFn | None, preview_interval: float) -> DragResult:
        model = self.model
        timings: dict[str, float] = {}
        reset_peak_memory(model.device)
        torch.manual_seed(request.seed)
        report = _reporter(progress, cancel)
        work = WorkCounter()
        try:
            started = self._start(request, algorithm, params, report, cancel, timings, work)
            prep, lora, runner = started.prep, started.lora, started.runner
            schedule, entry = started.schedule, started.entry
            ctx = self.drag_context(prep, params, runner, schedule, request, report)
            ctx.memo = entry.memo
            if lora.why_not_inherited:
                ctx.warnings.append(f"Slower than it could be: {lora.why_not_inherited}.")
            throttle = None
            if preview is not None:
                throttle = PreviewThrottle(preview, preview_interval, _rgb_map(model))
                ctx.preview = throttle
            with self._timed(timings, "drag+denoise"):
                z_edit, handles = ALGORITHMS[algorithm](ctx, entry.z_star)
            if (~torch.isfinite(z_edit)).any():  # diverged: fail, never a black "success"
                raise EngineError(f"the edit diverged (the latent became NaN or infinite); "
                                  f"lower latent_lr (now {params.latent_lr:g}) or lora_lr "
                                  f"(now {params.lora_lr:g}) and try again")
        finally:
            if not self.keep_lora:
                self.merged_lora.restore()
            if self.redrag is not None:
                self.redrag.trim()

        with self._timed(timings, "decode"):
            report("decode", 0, 1)
            image = self.finish(prep, self.decode_latents(z_edit), params)
        if lora.key is not None:  # a drag on this result inherits the LoRA
            self.lineage.record(self.working_pixels(image, prep.working_size), lora.header,
                                lora.key)
        stats = {
            **ctx.drag.as_stats(),
            "unet_passes": runner.passes,
            "work": self.work_stats(algorithm, params, schedule, work, ctx.drag, lora.trained),
            "reused": {"lora": lora.resident, "inversion": entry.reused},
            "lora_inherited": lora.inherited,
            "work_size": list(prep.working_size),
            "t_star": schedule.t_star,
            "previews": throttle.shown if throttle is not None else 0,
            "memory": memory_info(model.device),
        }
        final = imageops.from_grid(handles, prep.size, prep.working_size, ctx.grid)
        return DragResult(image=image, handles=final, timings=timings, stats=stats,
                          warnings=list(ctx.warnings))

    # -- named steps ----------------------------------------------------------------------

    def _start(self, request: DragRequest, algorithm: str, params: DragParams,
               report: ProgressFn, cancel: CancelToken | None, timings: dict[str, float],
               work: WorkCounter) -> _Started:
        """What an edit does before it reads the points: working inputs and prompt, the LoRA
        (trained, from the disk cache, or already merged), z_t* (inverted, or from the re-drag
        cache). The caller restores the LoRA and trims the re-drag cache afterwards."""
        model = self.model
        with self._timed(timings, "load"):
            report("load", 0, 1)
            prep = self.prepare(request, params)
            cond = model.encode_prompt(request.prompt)
        lora = PreparedLora()
        if params.lora_steps > 0:
            if self.redrag is not None:  # another image's memos stay out of the LoRA's peak
                self.redrag.drop_other_images(image_digest(prep.pixels))
            with self._timed(timings, "lora"):
                lora = prepare_lora(model, prep.pixels, request.prompt, params, self.lora_cache,
                                    method=algorithm, merged=self.merged_lora,
                                    seed=request.seed, progress=report, cancel=cancel,
                                    lineage=self.lineage, forward=self.unet_forward)
            if lora.trained:
                work.add("lora", 2 * params.lora_steps * params.lora_batch)
        else:
            self.merged_lora.restore()
        runner = UNetRunner(model.unet, cond, params.feature_block, work,
                            autocast=lambda: autocast(model.device, model.precision),
                            forward=self.unet_forward)
        schedule = Schedule.from_scheduler(model.scheduler, params.n_inference_steps,
                                           params.inversion_strength)
        with self._timed(timings, "inversion"):
            entry = self.invert(prep, request.prompt, lora.key, params, runner, schedule, report)
        return _Started(prep, lora, runner, schedule, entry)

    def prepare(self, request: DragRequest, params: DragParams) -> _Prepared:
        """Split channels, resize the image and mask to the working resolution."""
        height, width = request.image.shape[:2]
        working = imageops.working_size(width, height, params.work_size, params.work_max_side)
        pixels = self.working_pixels(request.image, working)
        mask = request.mask
        if mask is not None and mask.ndim == 3:
            mask = mask[..., 0]
        mask_working = imageops.resize_mask_nearest(mask, working) if mask is not None else None
        return _Prepared((width, height), working, request.image, pixels, mask, mask_working)

    @staticmethod
    def working_pixels(image: np.ndarray, working: tuple[int, int]) -> torch.Tensor:
        """An image's colour at the working size, [1, 3, h, w] in [-1, 1]."""
        color, _alpha = imageops.split_channels(image)
        return torch.from_numpy(imageops.model_rgb(color, working)).permute(2, 0, 1)[None]

    def drag_context(self, prep: _Prepared, params: DragParams, runner: UNetRunner,
                     schedule: Schedule, request: DragRequest, report: ProgressFn) -> DragContext:
        """Points on the supervision grid and the keep-mask at latent resolution."""
        w, h = prep.working_size
        grid = (h // 2, w // 2)
        keep, warnings = None, []
        if prep.mask_working is not None:
            # As both official codes: mask → nearest to the grid → nearest to the latent size,
            # with F.interpolate's sampling (imageops.nearest_indices).
            sup = imageops.resize_mask_nearest(prep.mask_working, (grid[1], grid[0]))
            vsf = self.model.vae_scale_factor
            lat = imageops.resize_mask_nearest(sup, (w // vsf, h // vsf))
            if lat.any():
                keep = torch.from_numpy(~lat).float()[None, None].to(self.model.device)
            else:  # as the official: a mask that vanishes at latent size regularises nothing
                warnings.append(SELECTION_TOO_SMALL.format(cell=vsf * prep.size[0] / w))
        device, precision = self.model.device, self.model.precision
        return DragContext(
            runner=runner,
            schedule=schedule,
            params=params,
            grid=grid,
            handles=imageops.to_grid(request.handles, prep.size, prep.working_size, grid),
            targets=imageops.to_grid(request.targets, prep.size, prep.working_size, grid),
            keep=keep,
            warnings=warnings,
            progress=report,
            autocast=lambda: autocast(device, precision),
            scaler=grad_scaler(device, precision),
        )

    def invert(self, prep: _Prepared, prompt: str, lora_key: str | None, params: DragParams,
               runner: UNetRunner, schedule: Schedule, report: ProgressFn) -> RedragEntry:
        """z_t* of the working image: from the re-drag cache, else VAE-encoded and inverted."""
        key = redrag_key(self.model, prep.pixels, prompt, lora_key, params)
        entry = self.redrag.lookup(key) if self.redrag is not None else None
        if entry is not None:
            entry.reused = True
            report("inversion", schedule.n_actual, schedule.n_actual)
            return entry
        z_star = run_inversion(runner, schedule, self.encode_image(prep.pixels),
                               lambda i, n: report("inversion", i, n))
        if self.redrag is not None:
            return self.redrag.put(key, z_star, image_digest(prep.pixels))
        return RedragEntry(z_star, memo=None)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean × scaling factor (as the reference's ``image2latent``)."""
        vae = self.model.vae
        posterior = vae.encode(pixels.to(self.model.device, vae.dtype)).latent_dist
        return posterior.mean.float() * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Latent → h×w×3 float32 in [0, 1] (not rounded: 16-bit and float images keep the
        VAE's precision)."""
        vae = self.model.vae
        image = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        image = (image.float().clamp(-1, 1) + 1) / 2
        return image[0].permute(1, 2, 0).cpu().numpy()

    def finish(self, prep: _Prepared, edited: np.ndarray, params: DragParams) -> np.ndarray:
        """Back to full resolution over the mask's bounding box only: the rest of the result is
        the input's bytes, and so is everything outside the (feathered) mask, in its own dtype.

        The blend is ``params.feather`` working pixels wide, scaled to the full image.
        """
        scale = max(prep.size[0] / prep.working_size[0], prep.size[1] / prep.working_size[1])
        feather = imageops.feather_width(params.feather, scale)
        return imageops.paste_edit(prep.image, edited, prep.mask_full, feather)

    @staticmethod
    def work_stats(algorithm: str, params: DragParams, schedule: Schedule, work: WorkCounter,
                   drag: DragRun, lora_trained: bool) -> dict:
        """Our forward-equivalents per phase next to the official code's for the same settings
        and drag steps, and the official count at its defaults (see ``engine.work``)."""
        official = official_work(
            algorithm, lora_steps=params.lora_steps, lora_batch=params.lora_batch,
            n_actual=schedule.n_actual, drag_steps=drag.steps,
            stopped_early=drag.stopped_inside,
            drag_end_step=params.drag_end_step, lora_trained=lora_trained,
        )
        defaults = sum(official_defaults(algorithm, lora_trained).values())
        return {
            "fe": dict(work.fe), "total": work.total, "truncated": work.truncated,
            "official_fe": official, "official_total": sum(official.values()),
            "ratio": round(work.total / max(1, sum(official.values())), 4),
            "official_defaults_total": defaults,
            "ratio_to_official_defaults": round(work.total / defaults, 4),
        }

    # -- helpers --------------------------------------------------------------------------

    @contextmanager
    def _timed(self, timings: dict[str, float], name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
            timings[name] = round(time.perf_counter() - start, 4)

    def _free_memory(self) -> None:
        if self.redrag is not None:
            self.redrag.clear()
        free_memory((self.model or self.inpainter).device)

    def release_caches(self) -> None:
        """Drop the re-drag cache (inverted latents and memos) and give its device memory
        back: a Ray Serve replica does so when the image they belong to is evicted
        (``server.ray_app``). The LoRA cache on disk stays."""
        self._free_memory()

    @property
    def cached_bytes(self) -> int:
        """Bytes the re-drag cache holds on the device now."""
        return self.redrag.nbytes if self.redrag is not None else 0

