"""Stable Diffusion 1.5 facts the loader, the tiny test model and the benchmarks share.

The DDIM settings both reference repositories use, the scheduler config built from them, the
shipped SD1.5 architecture configs (``configs/sd15``), and CLIP's tokenizer rebuilt offline.
Nothing here loads weights.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

SD15_CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"

# SD1.5's DDIM settings, the same in both reference repos (docs/algorithms.md §1, Schedule).
DDIM_SETTINGS = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

# The whole scheduler config of SD1.5 (used when a checkpoint ships none).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    **DDIM_SETTINGS,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


class NotEpsilonModel(ValueError):
    """The scheduler config says the model predicts something other than ε."""


def ddim_scheduler(config_dir: Path | None = None):
    """A DDIM scheduler from ``config_dir/scheduler`` (else SD1.5's), forced to the DDIM settings.

    Raises ``NotEpsilonModel`` for a v-prediction (or other non-ε) model.
    """
    from diffusers import DDIMScheduler

    config: dict[str, Any] = dict(SD15_SCHEDULER)
    if config_dir is not None and (config_dir / "scheduler" / "scheduler_config.json").is_file():
        config = dict(DDIMScheduler.load_config(config_dir, subfolder="scheduler"))
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise NotEpsilonModel(prediction)
    config.update(DDIM_SETTINGS, prediction_type="epsilon")
    return DDIMScheduler.from_config(config)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def sd15_tokenizer():
    """SD1.5's CLIP ViT-L/14 tokenizer, built offline from ``configs/sd15/tokenizer``."""
    from transformers import CLIPTokenizer

    with gzip.open(SD15_CONFIG_DIR / "tokenizer" / "clip-merges.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
