"""The demo model's own drag preset, written into its model folder as ``preset.json``.

SD1.5's defaults are sized for a 512 px working resolution that this small model on a CPU does
not need; the knobs below are the ones measured to work on it (see ``docs/algorithms.md``,
"The demo model's preset"). The engine applies ``params`` when this model is loaded; a request's
own parameters still override them. ``latent_to_rgb`` is the least-squares linear map from this
VAE's scaled latents to RGB, for the engine's cheap live previews (SD1.5's map assumes its
4-channel latent).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from backend.demo import data
from backend.engine.params import DragParams

FILENAME = "preset.json"
WORK_SIZE = 128
# Parameters the engine applies to every method when this model is loaded: its working size, and
# the official arrival radius (2 cells of the 256-cell grid at 512 px) scaled to that size.
_OFFICIAL = DragParams()
PARAMS: dict[str, int | float | bool] = {
    "work_size": WORK_SIZE,
    "reach_threshold": _OFFICIAL.reach_threshold * WORK_SIZE / _OFFICIAL.work_size,
}


@torch.no_grad()
def fit_latent_to_rgb(vae, n: int = 64, seed: int = 99) -> list[list[float]]:
    """C×3 matrix M with RGB ≈ latent · M (both per latent pixel, RGB in [-1, 1])."""
    x, _ = data.training_batch(seed, n, 128)
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    rgb = F.avg_pool2d(x, vae_scale(vae))
    a = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    b = rgb.permute(0, 2, 3, 1).reshape(-1, 3).double()
    m = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)
    return [[round(float(v), 5) for v in row] for row in m]


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def write(model_dir: Path, vae) -> Path:
    path = Path(model_dir) / FILENAME
    body = {"params": PARAMS, "latent_to_rgb": fit_latent_to_rgb(vae.float().eval())}
    path.write_text(json.dumps(body, indent=1) + "\n", "utf-8")
    return path
