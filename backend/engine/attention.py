"""Reference ("mutual self-") attention used while denoising the edited latent.

The batch is [original, edited]. In the chosen self-attention layers the edited branch keeps its
own queries but reads keys and values from the original branch, so appearance flows from the
input image into the edit (MasaCtrl-style; docs/algorithms.md §1, Reference attention). The
original branch attends to itself and reconstructs unchanged. Cross-attention and earlier
layers are untouched.

The original branch therefore depends on z_t* alone: ``denoise_with_reference`` records its
self-attention inputs at every denoising step of an image's first edit (into the re-drag
cache's memo) and serves them to a re-drag of the same image, which then runs the edited branch
alone (half the denoising work). SD1.5 at 512² keeps 6 layers' inputs per step (from
``start_layer`` 10: 3 × 1,024 × 640 + 3 × 4,096 × 320 values: 11.8 MB in fp16, 23.6 MB in
fp32), 413 MB in fp16 for DragDiffusion's 35 steps (826 MB in fp32 on a CPU), at most 448 MB
for GoodDrag's 38 (it records only the steps after its drag). The cache drops them when over
its byte budget, and before another image's LoRA is trained (the edit's memory peak). A
re-drag's result agrees with denoising both branches within float rounding (one branch
instead of a batch of two): tests/test_engine_speed.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from backend.engine.diffusion import Schedule, UNetRunner, ddim_step, predicted_x0

SD15_TRANSFORMER_BLOCKS = 16


class ReferenceAttnProcessor:
    """Self-attention whose K/V come from the first half of the batch (the original).

    With ``state["record"]`` a dict it keeps the original half's input there under its layer
    ``name``; with ``state["replay"]`` a dict the batch is the edited branch alone and the
    original's input comes from there (``denoise_with_reference``)."""

    def __init__(self, state: dict[str, Any], name: str = "") -> None:
        self.state = state
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **_kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("reference attention applies to plain self-attention only")
        if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
            raise ValueError("unsupported attention layout for reference attention")
        batch, tokens, _ = hidden_states.shape
        replay, record = self.state.get("replay"), self.state.get("record")
        if record is not None:
            # a copy: the first half's view would keep the whole batch's storage alive
            record[self.name] = hidden_states[: batch // 2].detach().clone()
        # the original branch's input: recorded at an earlier edit, or the batch's first half
        source = replay[self.name] if replay is not None else hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(source)
        value = attn.to_v(source)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if replay is not None and not self.state["active"]:  # the edited branch on its own
            key, value = heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        elif replay is None and self.state["active"] and batch % 2 == 0:
            half = batch // 2
            key = key[:half].repeat(2, 1, 1, 1)
            value = value[:half].repeat(2, 1, 1, 1)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, tokens, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _order_key(name: str) -> tuple[int, ...]:
    """Execution order of a UNet attention processor name: down blocks, mid block, up blocks."""
    part = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[name.split(".")[0]]
    return (part, *(int(n) for n in re.findall(r"\.(\d+)", name)))


def self_attention_layers(unet) -> list[str]:
    """Names of the self-attention (attn1) processors in execution order."""
    names = [n for n in unet.attn_processors if ".attn1." in n]
    return sorted(names, key=_order_key)


@contextmanager
def reference_attention(unet, start_layer: int = 10) -> Iterator[dict[str, bool]]:
    """Install reference attention on transformer blocks ``start_layer`` and later.

    ``start_layer`` counts transformer blocks in execution order as in SD1.5 (16 blocks; 10 →
    the two highest-resolution decoder stages). For a UNet with another block count the index
    is scaled proportionally. Yields a state dict; set ``state["active"]`` per denoising step.
    The UNet's own processors are restored on exit.
    """
    layers = self_attention_layers(unet)
    first = round(start_layer * len(layers) / SD15_TRANSFORMER_BLOCKS)
    state: dict[str, Any] = {"active": True, "record": None, "replay": None}
    original = dict(unet.attn_processors)
    processors = dict(original)
    for name in layers[first:]:
        processors[name] = ReferenceAttnProcessor(state, name)
    unet.set_attn_processor(processors)
    try:
        yield state
    finally:
        unet.set_attn_processor(original)


@torch.no_grad()
def denoise_with_reference(
    runner: UNetRunner,
    schedule: Schedule,
    z_orig: torch.Tensor,
    z_edit: torch.Tensor,
    timesteps: list[int],
    start_layer: int,
    step_callback: Callable[[int, int], None] | None = None,
    x0_callback: Callable[[int, torch.Tensor], None] | None = None,
    active: Callable[[int], bool] = lambda _i: True,
    memo: dict | None = None,
) -> torch.Tensor:
    """DDIM-denoise the edited latent beside the original one under reference attention (from
    ``start_layer``, at the steps ``active`` says); returns the edited branch.

    Both branches run as one batch [original, edited], as ``diffusion.denoise``. With a
    ``memo`` (the re-drag cache's), each step records the original branch's self-attention
    inputs and next latent (keyed by the layer and the timestep: the original branch is a
    function of z_t* alone); a step found there runs the edited branch alone, the original's
    keys and values computed from what was recorded (the same values up to float rounding).
    """
    with reference_attention(runner.unet, start_layer) as state:
        for i, t in enumerate(timesteps):
            if step_callback:
                step_callback(i, len(timesteps))
            state["active"] = active(i)
            key = ("original branch", start_layer, t)
            known = memo.get(key) if memo is not None else None
            if known is not None:
                state["replay"], z_next = known
                try:
                    eps = runner.eps(z_edit, t)
                finally:
                    state["replay"] = None
                if x0_callback:
                    x0_callback(i, predicted_x0(schedule, z_edit, eps, t))
                z_orig, z_edit = z_next, ddim_step(schedule, z_edit, eps, t)
                continue
            recorded: dict[str, torch.Tensor] | None = {} if memo is not None else None
            state["record"] = recorded
            try:
                z = torch.cat([z_orig, z_edit])
                eps = runner.eps(z, t)
            finally:
                state["record"] = None
            if x0_callback:
                x0_callback(i, predicted_x0(schedule, z[-1:], eps[-1:], t))
            z = ddim_step(schedule, z, eps, t)
            z_orig, z_edit = z[:1], z[1:]
            if memo is not None:
                memo[key] = (recorded, z_orig)
    return z_edit
