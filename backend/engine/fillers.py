"""What fills the area an Inpaint4Drag warp leaves behind.

Two fillers behind one interface (``Filler``):

- ``InpaintModelFiller`` (``engine.inpaint_models``): a diffusers inpainting model (9-channel
  UNet: SD1.5-inpainting family or SDXL-inpainting) with LCM, as the official code runs it.
- ``BlendedLatentFiller``: any plain text-to-image model of the SD architecture (the shipped
  demo model, SD1.5): DDIM from noise where the hole is, and at every step the known latent
  re-noised to that step everywhere else (blended latent diffusion / RePaint without
  resampling), so the fill grows out of its surroundings; the known latent itself at the end.

Both take the crop at the working size with the hole pre-filled by ``smooth_fill`` (a smooth
extension of the surroundings, which is what the model sees through the hole before noise
covers it) and return it filled, h×w×3 float32 in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from backend.engine.diffusion import Schedule, UNetRunner, ddim_step, predicted_x0
from backend.engine.work import WorkCounter

StepFn = Callable[[int, int], None]  # (step, total), called before each step
PreviewFn = Callable[[int, torch.Tensor], None]  # (step, predicted clean latent)


@dataclass
class FillRequest:
    """The crop to fill at the working size."""

    pixels: torch.Tensor  # [1, 3, h, w] in [−1, 1], hole pre-filled
    hole: torch.Tensor  # [1, 1, h, w] float, 1 where the model paints
    steps: int
    strength: float
    seed: int


class Filler(Protocol):
    """Fills a hole; ``name`` says which model and how (reported with every result)."""

    name: str

    def fill(self, request: FillRequest, work: WorkCounter, step: StepFn,
             preview: PreviewFn | None) -> np.ndarray:
        """h×w×3 float32 in [0, 1]: the crop with the hole filled. UNet passes are booked in
        ``work``; ``step`` is called before every step (it raises ``Cancelled``)."""
        ...


def smooth_fill(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """``image`` (h×w×c float32) with the ``hole`` pixels replaced by a smooth extension of the
    others (push–pull: known pixels averaged down a 2× pyramid until nothing is missing, then
    the coarse values fill the holes on the way back up). Known pixels are kept."""
    known = (~hole).astype(np.float32)
    if known.all() or not known.any():
        return image.copy()
    levels = [(image * known[..., None], known)]
    while levels[-1][1].min() == 0 and min(levels[-1][1].shape) > 1:
        values, weight = levels[-1]
        h, w = weight.shape
        ph, pw = h + h % 2, w + w % 2
        values = np.pad(values, ((0, ph - h), (0, pw - w), (0, 0)))
        weight = np.pad(weight, ((0, ph - h), (0, pw - w)))
        values = values.reshape(ph // 2, 2, pw // 2, 2, -1).sum((1, 3))
        weight = weight.reshape(ph // 2, 2, pw // 2, 2).sum((1, 3))
        levels.append((values, weight))
    values, weight = levels[-1]
    filled = values / np.maximum(weight, 1e-8)[..., None]
    if weight.min() == 0:  # a 1-pixel level with no known pixel cannot happen (known.any())
        filled[weight == 0] = filled[weight > 0].mean(0)
    for values, weight in reversed(levels[:-1]):
        h, w = weight.shape
        up = np.repeat(np.repeat(filled, 2, 0), 2, 1)[:h, :w]
        mean = values / np.maximum(weight, 1e-8)[..., None]
        coverage = np.minimum(weight, 1.0)[..., None]
        filled = coverage * mean + (1 - coverage) * up
    out = image.copy()
    out[hole] = filled[hole]
    return out


def latent_hole(hole: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The pixel hole at latent size (h, w): a latent cell is in the hole when any of its
    pixels is."""
    return (F.adaptive_max_pool2d(hole.float(), size) > 0).float()


class BlendedLatentFiller:
    """Inpaints with a plain SD-architecture model (no inpainting weights): see the module
    docstring. DDIM on the model's own schedule, ``steps`` steps, starting at the strength's
    timestep; no classifier-free guidance; the empty prompt's embedding computed once."""

    def __init__(self, model) -> None:
        self.model = model
        self.name = (f"{model.name}: blended-latent DDIM (plain model, the known latent "
                     "re-noised at every step)")
        self._cond: torch.Tensor | None = None

    def _empty_prompt(self) -> torch.Tensor:
        if self._cond is None:
            self._cond = self.model.encode_prompt("")
        return self._cond

    @torch.no_grad()
    def fill(self, request: FillRequest, work: WorkCounter, step: StepFn,
             preview: PreviewFn | None) -> np.ndarray:
        from backend.engine.devices import autocast

        model = self.model
        vae, device = model.vae, model.device
        runner = UNetRunner(model.unet, self._empty_prompt(), -1, work,
                            autocast=lambda: autocast(device, model.precision))
        work.phase = "denoise"
        posterior = vae.encode(request.pixels.to(device, vae.dtype)).latent_dist
        known = posterior.mean.float() * vae.config.scaling_factor
        hole = latent_hole(request.hole.to(device), tuple(known.shape[-2:]))
        schedule = Schedule.from_scheduler(model.scheduler, request.steps, request.strength)
        generator = torch.Generator(device="cpu").manual_seed(request.seed)

        def noise() -> torch.Tensor:
            return torch.randn(known.shape, generator=generator, device="cpu").to(device)

        timesteps = schedule.denoise_timesteps
        a_start = schedule.alpha(timesteps[0])
        z = a_start ** 0.5 * known + (1 - a_start) ** 0.5 * noise()
        for i, t in enumerate(timesteps):
            step(i, len(timesteps))
            eps = runner.eps(z, t)
            if preview is not None:
                preview(i, hole * predicted_x0(schedule, z, eps, t) + (1 - hole) * known)
            z = ddim_step(schedule, z, eps, t)
            a_prev = schedule.alpha(t - schedule.ratio)
            background = a_prev ** 0.5 * known + (1 - a_prev) ** 0.5 * noise()
            z = hole * z + (1 - hole) * background
        z = hole * z + (1 - hole) * known
        image = vae.decode((z / vae.config.scaling_factor).to(vae.dtype)).sample
        return ((image.float().clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 0).cpu().numpy()
