"""DDIM inversion and denoising, and UNet decoder features from the same forward pass.

The scheduler logic is written out (docs/algorithms.md §1: Schedule, Inversion, Features)
instead of hidden in ``DDIMScheduler.step`` so the inversion, the one-step-denoised latent of
the mask term and the denoising loop visibly use the same formulas.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backend.engine.errors import InvalidInput
from backend.engine.work import WorkCounter


@dataclass(frozen=True)
class Schedule:
    """DDIM timesteps of an ``n_steps`` run and the slice an inversion strength selects."""

    timesteps: list[int]  # descending, e.g. [981, 961, …, 1] for 50 steps
    alphas_cumprod: torch.Tensor  # float64 on CPU
    final_alpha: float
    ratio: int  # timestep stride (20 for 50 steps)
    n_actual: int  # inversion steps = round(n_steps · strength)

    @classmethod
    def from_scheduler(cls, scheduler, n_steps: int, strength: float) -> Schedule:
        scheduler.set_timesteps(n_steps)
        timesteps = [int(t) for t in scheduler.timesteps]
        alphas = scheduler.alphas_cumprod.double().cpu()
        final = 1.0 if scheduler.config.set_alpha_to_one else float(alphas[0])
        n_actual = round(n_steps * strength)  # Python rounding, as the reference (37.5 → 38)
        ratio = scheduler.config.num_train_timesteps // n_steps
        return cls(timesteps, alphas, final, ratio, max(1, min(n_actual, n_steps)))

    @property
    def start_index(self) -> int:
        """Index of t* in ``timesteps`` (the latent the drag optimises)."""
        return len(self.timesteps) - self.n_actual

    @property
    def t_star(self) -> int:
        return self.timesteps[self.start_index]

    @property
    def inversion_timesteps(self) -> list[int]:
        """Ascending timesteps the inversion visits: 1, 21, …, t*."""
        return self.timesteps[self.start_index :][::-1]

    @property
    def denoise_timesteps(self) -> list[int]:
        """Descending timesteps from t* to the end: t*, t* − 20, …, 1."""
        return self.timesteps[self.start_index :]

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha


def ddim_step(schedule: Schedule, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from ``t`` to ``t − ratio``."""
    a_t, a_prev = schedule.alpha(t), schedule.alpha(t - schedule.ratio)
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def inversion_step(schedule: Schedule, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """One DDIM inversion step from ``t − ratio`` up to ``t`` using ε predicted at ``t``."""
    a_t, a_prev = schedule.alpha(t), schedule.alpha(t - schedule.ratio)
    x0 = (z - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
    return a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps


class UNetRunner:
    """Calls the UNet and captures one decoder block's output from the same forward pass.

    ``feature_block`` indexes ``unet.up_blocks``; −1 picks the first decoder block whose output
    is at full latent resolution (SD1.5: ``up_blocks[2]``, 640 channels, as both official codes).
    Counts UNet calls (``passes``) and forward-equivalents per phase (``work``). Every call runs
    inside ``autocast()`` (the model's precision, ``devices.autocast``).
    """

    def __init__(self, unet, cond: torch.Tensor, feature_block: int = -1,
                 work: WorkCounter | None = None,
                 autocast: Callable[[], AbstractContextManager] = nullcontext,
                 forward: Callable | None = None) -> None:
        self.unet = unet
        self.cond = cond
        self.autocast = autocast
        self.forward = forward or unet_forward  # e.g. a torch.compile'd unet_forward
        self.block = resolve_feature_block(unet, feature_block)
        self.passes = 0
        self.work = work if work is not None else WorkCounter()
        self._timesteps: dict[tuple[int, torch.device], torch.Tensor] = {}

    def timestep(self, t: int, device: torch.device) -> torch.Tensor:
        """``t`` as a 0-dim tensor on ``device``, made once per runner (no copy per UNet call)."""
        key = (t, device)
        if key not in self._timesteps:
            self._timesteps[key] = torch.tensor(t, dtype=torch.long, device=device)
        return self._timesteps[key]

    def _call(self, z: torch.Tensor, t: int, block: int | None,
              stop: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        self.passes += 1
        self.work.forward(z.shape[0])
        dtype = self.unet.dtype
        cond = self.cond.to(dtype).expand(z.shape[0], -1, -1)
        with self.autocast():
            eps, feat = self.forward(self.unet, z.to(dtype), self.timestep(t, z.device), cond,
                                     block, stop)
        return (None if eps is None else eps.float()), feat

    def eps(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """ε prediction for a batch of latents (the text condition is repeated to the batch)."""
        return self._call(z, t, None, False)[0]

    def eps_and_features(
        self, z: torch.Tensor, t: int, grid: tuple[int, int] | None, need_eps: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(ε, features upsampled bilinearly to ``grid``) from one forward pass.

        With ``grid=None`` the features come as the block made them (latent resolution, the
        UNet's dtype: 1/16 of the grid map's memory at SD1.5's sizes); ``on_grid`` upsamples
        them later to exactly the same values. With ``need_eps=False`` the forward stops right
        after the feature block (the motion loss alone does not need the rest of the decoder).
        """
        eps, feat = self._call(z, t, self.block, not need_eps)
        if not need_eps:
            self.work.truncated += z.shape[0]
        return eps, (feat if grid is None else on_grid(feat, grid))


def unet_forward(unet, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                 block: int | None = None,
                 stop: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """diffusers' ``UNet2DConditionModel.forward`` for what the engine passes, with features.

    The same modules in the same order (no attention masks, ControlNet residuals or adapters,
    which the engine never uses), so ε is bit for bit the library's. Returns (ε, the output of
    ``up_blocks[block]``); with ``stop`` it returns (None, features) right after that block.
    Plain control flow, no hook and no exception: ``torch.compile`` traces it as one graph.
    """
    upsample_any = any(s % 2**unet.num_upsamplers for s in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    class_emb = unet.get_class_embed(sample=sample, class_labels=None)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat \
            else emb + class_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    cond = unet.process_encoder_hidden_states(encoder_hidden_states=cond, added_cond_kwargs=None)
    sample = unet.conv_in(sample)
    residuals: tuple[torch.Tensor, ...] = (sample,)
    for down in unet.down_blocks:
        if getattr(down, "has_cross_attention", False):
            sample, res = down(hidden_states=sample, temb=emb, encoder_hidden_states=cond)
        else:
            sample, res = down(hidden_states=sample, temb=emb)
        residuals += res
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=cond)
        else:
            sample = unet.mid_block(sample, emb)
    feat, size = None, None
    for i, up in enumerate(unet.up_blocks):
        res, residuals = residuals[-len(up.resnets):], residuals[:-len(up.resnets)]
        if i < len(unet.up_blocks) - 1 and upsample_any:
            size = residuals[-1].shape[2:]
        if getattr(up, "has_cross_attention", False):
            sample = up(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                        encoder_hidden_states=cond, upsample_size=size)
        else:
            sample = up(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                        upsample_size=size)
        if i == block:
            feat = sample
            if stop:
                return None, feat
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample), feat


def compiled_unet_forward(backend: str = "inductor") -> Callable:
    """``unet_forward`` through ``torch.compile`` (opt-in: the first call of each shape, batch
    and phase compiles for a while; later calls run the compiled graph)."""
    import torch._dynamo

    # One graph per phase variant (inversion, drag with and without ε, reference attention...).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    return torch.compile(unet_forward, backend=backend, dynamic=False)


def on_grid(feat: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Block features bilinearly upsampled to the supervision grid, in fp32 (as both codes)."""
    return F.interpolate(feat.float(), size=grid, mode="bilinear", align_corners=False)


def resolve_feature_block(unet, feature_block: int) -> int:
    """Validate ``feature_block`` or pick the default (see ``UNetRunner``)."""
    n_up = len(unet.up_blocks)
    if feature_block >= 0:
        if feature_block >= n_up:
            raise InvalidInput(
                f"feature_block {feature_block} does not exist: this UNet has {n_up} up blocks "
                "(use -1 for the default)"
            )
        return feature_block
    # Up blocks with an upsampler halve the distance to full resolution; the first one without
    # a preceding pending upsample is at full latent resolution.
    n_upsamplers = sum(1 for b in unet.up_blocks if getattr(b, "upsamplers", None))
    seen = 0
    for i, block in enumerate(unet.up_blocks):
        if getattr(block, "upsamplers", None):
            seen += 1
        if seen == n_upsamplers:
            return i
    return n_up - 1


def run_inversion(
    runner: UNetRunner,
    schedule: Schedule,
    z0: torch.Tensor,
    step_callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DDIM-invert the clean latent ``z0`` up to t* (docs/algorithms.md §1, Inversion)."""
    z = z0
    steps = schedule.inversion_timesteps
    with torch.no_grad():
        for i, t in enumerate(steps):
            if step_callback:
                step_callback(i, len(steps))
            z = inversion_step(schedule, z, runner.eps(z, t), t)
    return z


def predicted_x0(schedule: Schedule, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """The clean latent the model currently predicts from ``z`` at ``t``."""
    a_t = schedule.alpha(t)
    return (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5


def denoise(
    runner: UNetRunner,
    schedule: Schedule,
    z: torch.Tensor,
    timesteps: list[int],
    step_callback: Callable[[int, int], None] | None = None,
    x0_callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """DDIM-denoise a batch of latents over ``timesteps`` (descending).

    With reference attention installed the batch is [original, edited]: both branches go
    through one UNet call per step so the edited branch can read the original's keys/values.
    ``x0_callback(i, x0)`` receives the last batch element's predicted clean latent (previews).
    """
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            if step_callback:
                step_callback(i, len(timesteps))
            eps = runner.eps(z, t)
            if x0_callback:
                x0_callback(i, predicted_x0(schedule, z[-1:], eps[-1:], t))
            z = ddim_step(schedule, z, eps, t)
    return z
