"""Train the demo Stable-Diffusion-architecture model on photo crops and random-colour shapes.

Two stages, each resumable from the checkpoint in ``--work-dir``; every batch is a pure function
of the seed and the step, so a run reproduces from its seed:

1. ``vae``: AutoencoderKL on random 48 px crops (``data.training_batch``); MSE + a small
   image-gradient L1 + a tiny KL term. Its latent scale is then measured and stored as
   ``scaling_factor`` (SD's 0.18215 analogue).
2. ``unet``: UNet2DConditionModel with ε-prediction on SD1.5's noise schedule, on latents the
   frozen encoder makes of fresh training images (128 px, every fourth step 256 px, so the
   working size's latent is seen too), conditioned on short captions through the frozen tiny
   CLIP text encoder. An EMA of its weights is what gets exported.

``export`` writes a diffusers ``StableDiffusionPipeline`` folder (safetensors, fp16 weights to
keep the repository small; the loader casts them to the run dtype) that loads through the same
code as SD1.5, plus the model's own drag preset (``preset.json``, see ``backend/demo/preset.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from backend.demo import data
from backend.demo.architecture import (
    add_reference_channels,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    encode_prompts,
)
from backend.engine.sd15 import SD15_SCHEDULER
from backend.model_choice import DEMO_MODEL_DIR

DEFAULT_WORK_DIR = Path(".cache/toy-train")
DEFAULT_MODEL_DIR = DEMO_MODEL_DIR  # training writes the model that ships


@dataclass
class TrainConfig:
    seed: int = 0
    vae_steps: int = 6000
    vae_batch: int = 16
    vae_crop: int = 48
    vae_lr: float = 4e-4
    kl_weight: float = 1e-6
    grad_weight: float = 0.5
    unet_steps: int = 5000
    unet_batch: int = 8
    unet_size: int = 128
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    caption_dropout: float = 0.2
    warmup: int = 100
    checkpoint_minutes: float = 3.0


def step_seed(seed: int, stage: str, step: int) -> int:
    stages = {"vae": 1, "unet": 3, "scale": 4}
    return (seed * 1_000_003 + stages[stage] * 100_000_007 + step) % (2**63)


def image_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, constant, then a linear decay to 10 % over the last 20 % of steps."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * 0.8)
    if step < decay_start:
        return 1.0
    return max(0.1, 1.0 - 0.9 * (step - decay_start) / max(1, total - decay_start))


def _psnr(mse: float) -> float:
    return 10 * math.log10(4.0 / max(mse, 1e-10))  # images in [-1, 1]


@torch.no_grad()
def _ema_update(ema, model, decay: float, step: int) -> None:
    """EMA of ``model``'s weights (decay warmed up over the first steps)."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p, 1 - d)


class Trainer:
    """Holds the models, optimisers and progress; saves and restores all of it."""

    def __init__(self, cfg: TrainConfig, work_dir: Path, device: str) -> None:
        self.cfg = cfg
        self.work_dir = work_dir
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer()
        self.text_encoder = build_text_encoder(self.tokenizer).to(self.device).eval()
        self.vae = build_vae().to(self.device)
        n_lat = self.vae.config.latent_channels
        with torch.no_grad():  # start near-deterministic (posterior std ≈ 0.05), else the
            self.vae.quant_conv.bias[n_lat:].fill_(-6.0)  # sampling noise swamps the code
        add_reference_channels(self.vae)
        self.vae_ema = build_vae().to(self.device)  # what the UNet stage and export use
        self.vae_ema.load_state_dict(self.vae.state_dict())
        self.vae_ema.requires_grad_(False).eval()
        self.unet = build_unet().to(self.device)
        self.ema = build_unet().to(self.device)
        self.ema.load_state_dict(self.unet.state_dict())
        self.ema.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.unet_opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.unet_lr,
                                          weight_decay=1e-2)
        self.vae_step = 0
        self.unet_step = 0
        self.seconds = 0.0
        self.log: list[dict] = []

    @property
    def ckpt_path(self) -> Path:
        return self.work_dir / "checkpoint.pt"

    def save(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "cfg": dataclasses.asdict(self.cfg),
            "vae": self.vae.state_dict(),
            "vae_ema": self.vae_ema.state_dict(),
            "unet": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "unet_opt": self.unet_opt.state_dict(),
            "vae_step": self.vae_step,
            "unet_step": self.unet_step,
            "seconds": self.seconds,
            "scaling_factor": self.vae_ema.config.scaling_factor,
            "log": self.log,
        }
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.ckpt_path)

    def load(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        self.vae.load_state_dict(state["vae"])
        self.vae_ema.load_state_dict(state["vae_ema"])
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.vae_step = state["vae_step"]
        self.unet_step = state["unet_step"]
        self.seconds = state["seconds"]
        self.log = state["log"]
        self.vae_ema.register_to_config(scaling_factor=state["scaling_factor"])
        return True

    def _progress(self, stage: str, step: int, total: int, t_start: float, first_step: int,
                  values: dict[str, float]) -> None:
        """One log line (and a log entry) every 50 steps."""
        if step % 50 and step != total:
            return
        self.log.append({"stage": stage, "step": step, "seconds": self.seconds, **values})
        rate = (time.time() - t_start) / max(1, step - first_step)
        figures = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        print(f"{stage} {step}/{total} {figures} ({rate:.2f} s/step, "
              f"{self.seconds / 60:.1f} min trained)", flush=True)

    # ------------------------------------------------------------ stages

    def _run_stage(self, stage: str, total: int, step_once: Callable[[], dict[str, float]],
                   deadline: float, after_step: Callable[[int], None] | None = None) -> bool:
        """Call ``step_once`` until ``self.<stage>_step`` reaches ``total`` or ``deadline``
        passes, logging and checkpointing on the way; True when the stage is complete."""
        last_ckpt = t_start = time.time()
        first_step = getattr(self, f"{stage}_step")
        while getattr(self, f"{stage}_step") < total:
            if time.time() > deadline:
                return False
            t0 = time.time()
            figures = step_once()
            self.seconds += time.time() - t0
            step = getattr(self, f"{stage}_step")
            self._progress(stage, step, total, t_start, first_step, figures)
            if after_step is not None:
                after_step(step)
            if time.time() - last_ckpt > self.cfg.checkpoint_minutes * 60:
                self.save()
                last_ckpt = time.time()
        return True

    def train_vae(self, deadline: float) -> bool:
        """Run VAE steps until done or ``deadline``; True when the stage is complete."""
        def held_out(step: int) -> None:
            if step % 250 == 0:
                print(f"vae {step} EMA on held-out images: {self.held_out_psnr()}", flush=True)

        self.vae.train()
        if not self._run_stage("vae", self.cfg.vae_steps, lambda: {"psnr": self.vae_step_once()},
                               deadline, held_out):
            return False
        self.set_scaling_factor()
        self.save()
        return True

    def vae_step_once(self) -> float:
        """One VAE optimiser step, a pure function of the seed and the step; its batch PSNR."""
        cfg = self.cfg
        for g in self.vae_opt.param_groups:
            g["lr"] = cfg.vae_lr * lr_factor(self.vae_step, cfg.vae_steps, cfg.warmup)
        seed = step_seed(cfg.seed, "vae", self.vae_step)
        x, _ = data.training_batch(seed, cfg.vae_batch, cfg.vae_crop)
        x = x.to(self.device)
        post = self.vae.encode(x).latent_dist
        # the posterior's noise from the step's own generator, so a resumed run is a straight one
        y = self.vae.decode(post.sample(generator=torch.Generator().manual_seed(seed))).sample
        mse = F.mse_loss(y, x)
        loss = mse + cfg.grad_weight * image_gradient_l1(y, x)
        loss = loss + cfg.kl_weight * post.kl().mean()
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.vae_opt.step()
        self.vae_step += 1
        _ema_update(self.vae_ema, self.vae, cfg.ema_decay, self.vae_step)
        return _psnr(mse.item())

    @torch.no_grad()
    def held_out_psnr(self) -> dict[str, float]:
        """VAE (EMA) round-trip PSNR on the held-out photographs and unseen-colour scenes."""
        from backend.demo.evaluate import evaluation_sets
        from backend.demo.metrics import psnr

        out = {}
        for name, img in evaluation_sets().items():
            x = data.to_tensor(img[None]).to(self.device)
            y = self.vae_ema.decode(self.vae_ema.encode(x).latent_dist.mean).sample
            out[name] = round(psnr(img, data.to_uint8(y)[0]), 2)
        return out

    @torch.no_grad()
    def set_scaling_factor(self) -> None:
        """1 / std of the posterior-mean latents of 256 training images (SD's 0.18215)."""
        x, _ = data.training_batch(step_seed(self.cfg.seed, "scale", 0), 256, 128)
        enc = self.vae_ema.encode
        z = torch.cat([enc(c.to(self.device)).latent_dist.mean for c in x.split(32)])
        self.vae_ema.register_to_config(scaling_factor=float(1.0 / z.std()))

    @torch.no_grad()
    def _latents(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Scaled posterior samples of the frozen encoder."""
        post = self.vae_ema.encode(x.to(self.device)).latent_dist
        eps = torch.randn(post.mean.shape, generator=gen).to(self.device)
        return (post.mean + post.std * eps) * self.vae_ema.config.scaling_factor

    def train_unet(self, deadline: float) -> bool:
        """Run UNet steps until done or ``deadline``; True when the stage is complete."""
        self.unet.train()
        if not self._run_stage("unet", self.cfg.unet_steps,
                               lambda: {"loss": self.unet_step_once()}, deadline):
            return False
        self.save()
        return True

    def unet_step_once(self) -> float:
        """One UNet optimiser step (ε-prediction), a pure function of the seed and the step."""
        cfg = self.cfg
        for g in self.unet_opt.param_groups:
            g["lr"] = cfg.unet_lr * lr_factor(self.unet_step, cfg.unet_steps, cfg.warmup)
        seed = step_seed(cfg.seed, "unet", self.unet_step)
        gen = torch.Generator().manual_seed(seed)
        big = self.unet_step % 4 == 3  # the working size's latents, at a quarter batch
        size, batch = (2 * cfg.unet_size, max(1, cfg.unet_batch // 4)) if big else (
            cfg.unet_size, cfg.unet_batch)
        x, caps = data.training_batch(seed, batch, size)
        z0 = self._latents(x, gen)
        ctx = encode_prompts(self.tokenizer, self.text_encoder, caps)
        drop = torch.rand(batch, generator=gen) < cfg.caption_dropout
        ctx[drop] = self._empty_prompt[0]
        noise = torch.randn(z0.shape, generator=gen).to(self.device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(self.device)
        pred = self.unet(self._noise_schedule.add_noise(z0, noise, t), t,
                         encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        self.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.unet_opt.step()
        self.unet_step += 1
        _ema_update(self.ema, self.unet, cfg.ema_decay, self.unet_step)
        return loss.item()

    @functools.cached_property
    def _empty_prompt(self) -> torch.Tensor:
        """The empty caption's embedding (the frozen text encoder's), for caption dropout."""
        return encode_prompts(self.tokenizer, self.text_encoder, [""])

    @functools.cached_property
    def _noise_schedule(self):
        """SD1.5's training noise schedule (DDPM, the same betas as its DDIM sampler)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER.items()
                                if k != "set_alpha_to_one"})

    def pipeline(self):
        """The current weights (EMA UNet) as a StableDiffusionPipeline on the CPU."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        unet = build_unet()
        unet.load_state_dict({k: v.cpu() for k, v in self.ema.state_dict().items()})
        vae = build_vae()
        vae.load_state_dict({k: v.cpu() for k, v in self.vae_ema.state_dict().items()})
        vae.register_to_config(scaling_factor=self.vae_ema.config.scaling_factor)
        text_encoder = build_text_encoder(self.tokenizer)
        text_encoder.load_state_dict(
            {k: v.cpu() for k, v in self.text_encoder.state_dict().items()})
        return StableDiffusionPipeline(
            vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=self.tokenizer,
            unet=unet.eval(), scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )

    def export(self, out_dir: Path) -> Path:
        """Write the diffusers folder (fp16 UNet/VAE weights) and the model's drag preset."""
        from backend.demo import preset

        out_dir.mkdir(parents=True, exist_ok=True)
        pipe = self.pipeline()
        preset.write(out_dir, pipe.vae)  # fitted on the fp32 VAE, before the weights are cast
        pipe.unet.to(torch.float16)
        pipe.vae.to(torch.float16)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        return out_dir


def train(cfg: TrainConfig, work_dir: Path, device: str, resume: bool, max_minutes: float,
          out_dir: Path | None) -> Trainer:
    """Run (or resume) both stages within ``max_minutes``; export when they are done."""
    trainer = Trainer(cfg, work_dir, device)
    if resume and trainer.load():
        print(f"resumed: vae step {trainer.vae_step}, unet step {trainer.unet_step}, "
              f"{trainer.seconds / 60:.1f} min trained so far", flush=True)
    deadline = time.time() + max_minutes * 60
    done = trainer.train_vae(deadline) and trainer.train_unet(deadline)
    trainer.save()
    if done and out_dir is not None:
        print(f"trained {trainer.seconds / 60:.1f} min; exported to {trainer.export(out_dir)}",
              flush=True)
    elif not done:
        print("time budget reached; run again with --resume to continue", flush=True)
    return trainer
