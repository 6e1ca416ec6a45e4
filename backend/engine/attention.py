"""Reference ("mutual self-") attention used while denoising the edited latent.

The batch is [original, edited]. In the chosen self-attention layers the edited branch keeps its
own queries but reads keys and values from the original branch, so appearance flows from the
input image into the edit (MasaCtrl-style; docs/algorithms.md §1, Reference attention). The
original branch attends to itself and reconstructs unchanged. Cross-attention and earlier
layers are untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

SD15_TRANSFORMER_BLOCKS = 16


class ReferenceAttnProcessor:
    """Self-attention whose K/V come from the first half of the batch (the original)."""

    def __init__(self, state: dict[str, bool]) -> None:
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **_kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("reference attention applies to plain self-attention only")
        if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
            raise ValueError("unsupported attention layout for reference attention")
        batch, tokens, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if self.state["active"] and batch % 2 == 0:
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
    state = {"active": True}
    original = dict(unet.attn_processors)
    processors = dict(original)
    shared = ReferenceAttnProcessor(state)
    for name in layers[first:]:
        processors[name] = shared
    unet.set_attn_processor(processors)
    try:
        yield state
    finally:
        unet.set_attn_processor(original)
