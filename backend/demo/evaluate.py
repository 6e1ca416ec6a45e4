"""Reconstruction quality of a model: VAE round trip and DDIM inversion + denoise.

Runs the engine's own steps (``DragEngine.encode_image``/``decode_latents``, and the DDIM
formulas of ``engine/diffusion.py``), so the figures are what a drag edit starts from: an
inversion that cannot reconstruct the image bounds every edit's quality.
"""

from __future__ import annotations

import numpy as np
import torch

from backend.demo import data
from backend.demo.metrics import psnr
from backend.engine.diffusion import Schedule, UNetRunner, denoise, run_inversion


@torch.no_grad()
def reconstruct(engine, image: np.ndarray, prompt: str = "", strength: float = 0.7,
                steps: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(VAE round trip, DDIM inversion to ``strength`` then denoising) of an H×W×3 uint8 image
    whose sides are multiples of the VAE factor."""
    model = engine.model
    z0, vae_rt = vae_round_trip(engine, image)
    runner = UNetRunner(model.unet, model.encode_prompt(prompt))
    schedule = Schedule.from_scheduler(model.scheduler, steps, strength)
    z = run_inversion(runner, schedule, z0)
    inverted = _uint8(engine.decode_latents(denoise(runner, schedule, z,
                                                    schedule.denoise_timesteps)))
    return vae_rt, inverted


@torch.no_grad()
def vae_round_trip(engine, image: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """An H×W×3 uint8 image's latent (the engine's encoding) and that latent decoded, as uint8."""
    z0 = engine.encode_image(data.to_tensor(image[None]))
    return z0, _uint8(engine.decode_latents(z0))


def _uint8(image: np.ndarray) -> np.ndarray:
    """The engine's float [0, 1] decode → uint8, rounded as an 8-bit edit is."""
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)


def quality(engine, images: dict[str, np.ndarray], strength: float = 0.7) -> dict[str, dict]:
    """Per image: PSNR (dB) of the VAE round trip and of inversion + denoise vs the image."""
    out = {}
    for name, img in images.items():
        vae_rt, inverted = reconstruct(engine, img, strength=strength)
        out[name] = {"vae_psnr": psnr(img, vae_rt), "inversion_psnr": psnr(img, inverted)}
    return out


def evaluation_sets(n_scenes: int = 4) -> dict[str, np.ndarray]:
    """Held-out photographs at working size (long side 256) and shape scenes (128 px) whose
    colours lie in the hue band no training shape or background used."""
    sets = {f"photo:{k}": v for k, v in data.held_out_photos(256).items()}
    for i, img in enumerate(data.unseen_color_scenes(n_scenes)):
        sets[f"unseen-colours:{i}"] = img
    return sets


def summary(per_image: dict[str, dict]) -> dict[str, float]:
    """Mean PSNRs over the photographs and over the unseen-colour scenes."""
    out = {}
    for group in ("photo", "unseen-colours"):
        rows = [v for k, v in per_image.items() if k.startswith(group + ":")]
        for key in ("vae_psnr", "inversion_psnr"):
            out[f"{group}/{key}"] = float(np.mean([r[key] for r in rows]))
    return out
