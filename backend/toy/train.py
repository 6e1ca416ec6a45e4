"""Train the toy Stable-Diffusion-architecture model on procedural shape images.

Two stages, each resumable from a checkpoint in ``--work-dir``:

1. ``vae``: AutoencoderKL (4× downsampling, 128 px → 32×32×4 latent, no attention, so fully
   convolutional) on random 64 px crops of 128 px images; MSE + a small image-gradient L1 + a
   tiny KL term. Its latent scale is then measured and stored as ``scaling_factor`` (like SD's
   0.18215), and the latents of ``--latent-cache`` images are cached from the frozen encoder.
2. ``unet``: UNet2DConditionModel (no attention at the full-resolution level) with
   ε-prediction on SD1.5's noise schedule, conditioned on short captions through a frozen tiny
   CLIP text encoder; an EMA of its weights is what gets exported.
3. ``decoder``: the VAE decoder alone, fine-tuned on full 128 px images with the encoder frozen
   (so the latent space the UNet learned stays the same). Its state lives in its own file,
   ``decoder.pt``, so this stage can also run beside stage 2 (``--stage decoder``).

``export`` writes a diffusers ``StableDiffusionPipeline`` folder (safetensors) that loads
through the same code as SD1.5.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backend.engine.sd15 import SD15_SCHEDULER
from backend.engine.tiny import build_text_encoder, write_tokenizer_files
from backend.toy import shapes

DEFAULT_WORK_DIR = Path(".cache/toy-train")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"


@dataclass
class TrainConfig:
    seed: int = 0
    vae_steps: int = 2000
    vae_batch: int = 4
    vae_crop: int = 64
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    grad_weight: float = 0.5
    unet_steps: int = 3000
    unet_batch: int = 16
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    decoder_steps: int = 1500
    decoder_batch: int = 2
    decoder_lr: float = 1e-3
    caption_dropout: float = 0.2
    latent_cache: int = 6144
    warmup: int = 100
    checkpoint_minutes: float = 3.0


# ---------------------------------------------------------------- model definitions


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        # ≥ 4 channels per GroupNorm group: with 2 the output layers cannot carry the colour of
        # a flat region (it is normalised away), which capped the first attempt at ~18 dB.
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=0.18215,
        mid_block_add_attention=False,
    )


def build_unet():
    """SD1.5-shaped: 4 levels, attention only on the two middle levels.

    ``up_blocks[2]`` (CrossAttnUpBlock2D, upsampling to the full latent resolution) is the
    feature block, exactly as in SD1.5.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        write_tokenizer_files(Path(tok_dir))
        return CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """SD-style prompt embedding: pad to 77 tokens, last hidden state."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0]


# ---------------------------------------------------------------- data


def image_batch(seed: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` random scenes as a [-1, 1] tensor (n, 3, 128, 128) and their captions."""
    rng = np.random.default_rng(seed)
    imgs, caps = [], []
    for _ in range(n):
        scene = shapes.random_scene(rng)
        imgs.append(shapes.render(scene))
        caps.append(scene.caption())
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, caps


def random_crops(x: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """One random ``size``² crop per image (the VAE is fully convolutional)."""
    if size >= x.shape[-1]:
        return x
    gen = torch.Generator().manual_seed(seed)
    offs = torch.randint(0, x.shape[-1] - size + 1, (x.shape[0], 2), generator=gen).tolist()
    return torch.stack([img[:, y:y + size, x0:x0 + size] for img, (y, x0) in zip(x, offs,
                                                                               strict=True)])


def step_seed(seed: int, stage: str, step: int) -> int:
    stages = {"vae": 1, "cache": 2, "unet": 3, "eval": 4, "decoder": 5}
    return (seed * 1_000_003 + stages[stage]
            * 100_000_007 + step) % (2**63)


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


# ---------------------------------------------------------------- training state


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
        with torch.no_grad():  # start near-deterministic (posterior std ≈ 0.05), else the
            self.vae.quant_conv.bias[4:].fill_(-6.0)  # sampling noise swamps the code
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
        self.decoder_step = 0
        self._decoder_state: dict | None = None
        self.seconds = 0.0
        self.log: list[dict] = []

    @property
    def ckpt_path(self) -> Path:
        return self.work_dir / "checkpoint.pt"

    @property
    def decoder_path(self) -> Path:
        return self.work_dir / "decoder.pt"

    def save(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "cfg": dataclasses.asdict(self.cfg),
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "unet_opt": self.unet_opt.state_dict(),
            "vae_step": self.vae_step,
            "unet_step": self.unet_step,
            "seconds": self.seconds,
            "scaling_factor": self.vae.config.scaling_factor,
            "log": self.log,
        }
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.ckpt_path)

    def load(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        self.vae.load_state_dict(state["vae"])
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.vae_step = state["vae_step"]
        self.unet_step = state["unet_step"]
        self.seconds = state["seconds"]
        self.log = state["log"]
        self.vae.register_to_config(scaling_factor=state["scaling_factor"])
        self.decoder_step = 0
        if self.decoder_path.exists():
            dec = torch.load(self.decoder_path, map_location=self.device, weights_only=False)
            self.vae.load_state_dict(dec["vae"])
            self.decoder_step = dec["step"]
            self._decoder_state = dec
        return True

    # ------------------------------------------------------------ stages

    def train_vae(self, deadline: float) -> bool:
        """Run VAE steps until done or ``deadline``; True when the stage is complete."""
        from tqdm import tqdm

        cfg = self.cfg
        self.vae.train()
        last_ckpt = time.time()
        bar = tqdm(total=cfg.vae_steps, initial=self.vae_step, desc="vae", dynamic_ncols=True,
                   mininterval=5)
        while self.vae_step < cfg.vae_steps:
            if time.time() > deadline:
                bar.close()
                return False
            t0 = time.time()
            for g in self.vae_opt.param_groups:
                g["lr"] = cfg.vae_lr * lr_factor(self.vae_step, cfg.vae_steps, cfg.warmup)
            seed = step_seed(cfg.seed, "vae", self.vae_step)
            x = random_crops(image_batch(seed, cfg.vae_batch)[0], cfg.vae_crop, seed)
            x = x.to(self.device)
            post = self.vae.encode(x).latent_dist
            y = self.vae.decode(post.sample()).sample
            mse = F.mse_loss(y, x)
            loss = mse + cfg.grad_weight * image_gradient_l1(y, x)
            loss = loss + cfg.kl_weight * post.kl().mean()
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.vae_opt.step()
            self.vae_step += 1
            self.seconds += time.time() - t0
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
            bar.set_postfix(mse=f"{mse.item():.4f}", psnr=f"{psnr:.1f}")
            bar.update()
            if self.vae_step % 50 == 0:
                self.log.append({"stage": "vae", "step": self.vae_step, "mse": mse.item(),
                                 "psnr": psnr, "seconds": self.seconds})
            if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
                self.save()
                last_ckpt = time.time()
        bar.close()
        self.vae.eval()
        self.set_scaling_factor()
        self.save()
        return True

    @torch.no_grad()
    def set_scaling_factor(self) -> None:
        """1 / std of the posterior-mean latents of 256 images (SD's 0.18215 analogue)."""
        x, _ = image_batch(step_seed(self.cfg.seed, "eval", 10**6), 256)
        z = torch.cat([self.vae.encode(c.to(self.device)).latent_dist.mean for c in x.split(32)])
        self.vae.register_to_config(scaling_factor=float(1.0 / z.std()))

    @torch.no_grad()
    def latent_cache(self) -> dict[str, torch.Tensor]:
        """Scaled posterior mean/std and prompt embeddings of the cached training images."""
        from tqdm import tqdm

        path = self.work_dir / "latents.pt"
        if path.exists():
            return torch.load(path, map_location=self.device)
        self.vae.eval()
        sf = self.vae.config.scaling_factor
        means, stds, ctxs = [], [], []
        chunk = 64
        for i in tqdm(range(0, self.cfg.latent_cache, chunk), desc="latent cache"):
            x, caps = image_batch(step_seed(self.cfg.seed, "cache", i), chunk)
            post = self.vae.encode(x.to(self.device)).latent_dist
            means.append(post.mean * sf)
            stds.append(post.std * sf)
            ctxs.append(encode_prompts(self.tokenizer, self.text_encoder, caps))
        cache = {"mean": torch.cat(means), "std": torch.cat(stds), "ctx": torch.cat(ctxs),
                 "empty": encode_prompts(self.tokenizer, self.text_encoder, [""])}
        torch.save(cache, path)
        return cache

    def train_unet(self, deadline: float) -> bool:
        from diffusers import DDPMScheduler
        from tqdm import tqdm

        cfg = self.cfg
        cache = self.latent_cache()
        noise_sched = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER.items()
                                       if k not in ("set_alpha_to_one",)})
        n = cache["mean"].shape[0]
        self.unet.train()
        last_ckpt = time.time()
        bar = tqdm(total=cfg.unet_steps, initial=self.unet_step, desc="unet", dynamic_ncols=True,
                   mininterval=5)
        while self.unet_step < cfg.unet_steps:
            if time.time() > deadline:
                bar.close()
                return False
            t0 = time.time()
            for g in self.unet_opt.param_groups:
                g["lr"] = cfg.unet_lr * lr_factor(self.unet_step, cfg.unet_steps, cfg.warmup)
            gen = torch.Generator().manual_seed(step_seed(cfg.seed, "unet", self.unet_step))
            idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
            eps_post = torch.randn(cache["mean"][idx].shape, generator=gen)
            z0 = cache["mean"][idx] + cache["std"][idx] * eps_post.to(self.device)
            noise = torch.randn(z0.shape, generator=gen).to(self.device)
            t = torch.randint(0, 1000, (cfg.unet_batch,), generator=gen).to(self.device)
            drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
            ctx = cache["ctx"][idx].clone()
            ctx[drop] = cache["empty"][0]
            zt = noise_sched.add_noise(z0, noise, t)
            pred = self.unet(zt, t, encoder_hidden_states=ctx).sample
            loss = F.mse_loss(pred, noise)
            self.unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
            self.unet_opt.step()
            self.unet_step += 1
            decay = min(cfg.ema_decay, (1 + self.unet_step) / (10 + self.unet_step))
            with torch.no_grad():
                for pe, p in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
                    pe.lerp_(p, 1 - decay)
            self.seconds += time.time() - t0
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update()
            if self.unet_step % 50 == 0:
                self.log.append({"stage": "unet", "step": self.unet_step, "loss": loss.item(),
                                 "seconds": self.seconds})
            if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
                self.save()
                last_ckpt = time.time()
        bar.close()
        self.save()
        return True

    def train_decoder(self, deadline: float) -> bool:
        """Fine-tune ``post_quant_conv`` + decoder on full images; the encoder stays frozen."""
        from tqdm import tqdm

        cfg = self.cfg
        params = [*self.vae.post_quant_conv.parameters(), *self.vae.decoder.parameters()]
        opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
        if self._decoder_state is not None:
            opt.load_state_dict(self._decoder_state["opt"])

        def save() -> None:
            tmp = self.decoder_path.with_suffix(".tmp")
            torch.save({"vae": self.vae.state_dict(), "opt": opt.state_dict(),
                        "step": self.decoder_step, "vae_step": self.vae_step}, tmp)
            tmp.replace(self.decoder_path)

        self.vae.train()
        last_ckpt = time.time()
        bar = tqdm(total=cfg.decoder_steps, initial=self.decoder_step, desc="decoder",
                   dynamic_ncols=True, mininterval=5)
        while self.decoder_step < cfg.decoder_steps:
            if time.time() > deadline:
                bar.close()
                save()
                return False
            for g in opt.param_groups:
                g["lr"] = cfg.decoder_lr * lr_factor(self.decoder_step, cfg.decoder_steps,
                                                     cfg.warmup)
            x, _ = image_batch(step_seed(cfg.seed, "decoder", self.decoder_step),
                               cfg.decoder_batch)
            x = x.to(self.device)
            with torch.no_grad():
                z = self.vae.encode(x).latent_dist.sample()
            y = self.vae.decode(z).sample
            mse = F.mse_loss(y, x)
            loss = mse + cfg.grad_weight * image_gradient_l1(y, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            self.decoder_step += 1
            bar.set_postfix(psnr=f"{10 * math.log10(4.0 / max(mse.item(), 1e-10)):.1f}")
            bar.update()
            if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
                save()
                last_ckpt = time.time()
        bar.close()
        self.vae.eval()
        save()
        return True

    def pipeline(self):
        """The current weights (EMA UNet) as a StableDiffusionPipeline on the CPU."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        unet = build_unet()
        unet.load_state_dict({k: v.cpu() for k, v in self.ema.state_dict().items()})
        vae = build_vae()
        vae.load_state_dict({k: v.cpu() for k, v in self.vae.state_dict().items()})
        vae.register_to_config(scaling_factor=self.vae.config.scaling_factor)
        text_encoder = build_text_encoder(self.tokenizer)
        text_encoder.load_state_dict(
            {k: v.cpu() for k, v in self.text_encoder.state_dict().items()})
        return StableDiffusionPipeline(
            vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=self.tokenizer,
            unet=unet.eval(), scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )

    def export(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline().save_pretrained(out_dir, safe_serialization=True)
        return out_dir


def train(cfg: TrainConfig, work_dir: Path, device: str, resume: bool, max_minutes: float,
          out_dir: Path | None, stage: str = "all") -> Trainer:
    """Run (or resume) the stages within ``max_minutes``; export when all are done.

    ``stage="decoder"`` runs only the decoder fine-tune (it needs a finished VAE stage).
    """
    trainer = Trainer(cfg, work_dir, device)
    if resume and trainer.load():
        print(f"resumed: vae step {trainer.vae_step}, unet step {trainer.unet_step}, "
              f"{trainer.seconds / 60:.1f} min trained so far", flush=True)
    deadline = time.time() + max_minutes * 60
    if stage == "decoder":
        if trainer.vae_step < cfg.vae_steps:
            raise SystemExit("the decoder stage needs a finished VAE stage (run --stage all)")
        trainer.train_decoder(deadline)
        return trainer
    done = (trainer.train_vae(deadline) and trainer.train_unet(deadline)
            and trainer.train_decoder(deadline))
    trainer.save()
    if done and out_dir is not None:
        print(f"exported to {trainer.export(out_dir)}", flush=True)
    elif not done:
        print("time budget reached; run again with --resume to continue", flush=True)
    return trainer


# ---------------------------------------------------------------- reconstruction quality


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def ddim_invert_denoise(pipe, z0: torch.Tensor, ctx: torch.Tensor, strength: float = 0.7,
                        steps: int = 50) -> torch.Tensor:
    """DragDiffusion-style DDIM inversion to ``strength`` then deterministic denoising back."""
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    n = round(steps * strength)
    timesteps = sched.timesteps[steps - n:]  # t* ... 1
    ac = sched.alphas_cumprod
    stride = sched.config.num_train_timesteps // steps
    z = z0
    for t in reversed(timesteps):
        eps = pipe.unet(z, t, encoder_hidden_states=ctx).sample
        tp = int(t) - stride
        a_prev = ac[tp] if tp >= 0 else sched.final_alpha_cumprod
        x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        z = ac[int(t)].sqrt() * x0 + (1 - ac[int(t)]).sqrt() * eps
    for t in timesteps:
        eps = pipe.unet(z, t, encoder_hidden_states=ctx).sample
        z = sched.step(eps, t, z).prev_sample
    return z


@torch.no_grad()
def reconstruction_quality(pipe, n: int = 16, seed: int = 12345,
                           strength: float = 0.7) -> dict[str, float]:
    """Mean PSNR (dB) of held-out images after a VAE round trip and after DDIM inversion."""
    x, caps = image_batch(seed, n)
    ref = to_uint8(x)
    sf = pipe.vae.config.scaling_factor
    z0 = pipe.vae.encode(x).latent_dist.mean * sf
    vae_rt = to_uint8(pipe.vae.decode(z0 / sf).sample)
    ctx = encode_prompts(pipe.tokenizer, pipe.text_encoder, caps)
    zr = ddim_invert_denoise(pipe, z0, ctx, strength)
    inv = to_uint8(pipe.vae.decode(zr / sf).sample)
    return {
        "vae_psnr": float(np.mean([psnr(a, b) for a, b in zip(ref, vae_rt, strict=True)])),
        "inversion_psnr": float(np.mean([psnr(a, b) for a, b in zip(ref, inv, strict=True)])),
        "inversion_vs_vae_psnr": float(
            np.mean([psnr(a, b) for a, b in zip(vae_rt, inv, strict=True)])),
    }
