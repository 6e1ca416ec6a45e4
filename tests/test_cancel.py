"""Cancellation inside a model pass (``backend.engine.cancel``): long attention calls in slices.

The per-block checks are exercised on the whole engine in ``test_engine``
(``test_a_cancel_stops_a_pass_within_one_block``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backend.engine import cancel as cancel_module
from backend.engine.cancel import cancellable
from backend.engine.errors import Cancelled
from backend.engine.types import CancelToken


@pytest.fixture
def small_slices(monkeypatch):
    """Slices of 256 query rows from 1,024 keys on: a long call at test sizes."""
    monkeypatch.setattr(cancel_module, "ATTENTION_PAIRS", 256 * 1024)


def qkv(tokens: int = 3000, channels: int = 40, grad: bool = False) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 8, tokens, channels, generator=generator, requires_grad=grad)
            for _ in range(3)]


def test_a_sliced_attention_call_gives_the_whole_ones_result(small_slices, monkeypatch):
    q, k, v = qkv(grad=True)
    torchs = cancel_module._sdpa
    whole = torchs(q, k, v)
    grad = torch.randn_like(whole)
    whole_grads = torch.autograd.grad(whole, (q, k, v), grad)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape[-2])
        return torchs(*args, **kwargs)

    monkeypatch.setattr(cancel_module, "_sdpa", counting)
    with cancellable(CancelToken()):
        sliced = F.scaled_dot_product_attention(q, k, v)
        sliced_grads = torch.autograd.grad(sliced, (q, k, v), grad)
    assert calls == [256] * 11 + [184]  # 3,000 query rows
    assert torch.equal(sliced, whole)
    assert torch.equal(sliced_grads[0], whole_grads[0])  # each query's gradient: its own row
    for sliced_grad, whole_grad in zip(sliced_grads[1:], whole_grads[1:], strict=True):
        # keys' and values' gradients add up every slice's share: the same sum, in another
        # order (float rounding only)
        torch.testing.assert_close(sliced_grad, whole_grad, rtol=1e-5, atol=1e-6)


def test_a_cancel_stops_a_long_attention_call_between_slices(small_slices, monkeypatch):
    cancel = CancelToken()
    torchs = cancel_module._sdpa
    done = []

    def slice_then_cancel(*args, **kwargs):
        done.append(args[0].shape[-2])
        if len(done) == 2:
            cancel.cancel()
        return torchs(*args, **kwargs)

    monkeypatch.setattr(cancel_module, "_sdpa", slice_then_cancel)
    with cancellable(cancel), pytest.raises(Cancelled):
        F.scaled_dot_product_attention(*qkv())
    assert len(done) == 2  # of 12 slices


def test_a_cancel_stops_a_long_attention_backward_between_slices(small_slices):
    cancel = CancelToken()
    q, k, v = qkv(grad=True)
    with cancellable(cancel):
        out = F.scaled_dot_product_attention(q, k, v)
        cancel.cancel()
        with pytest.raises(Cancelled):
            out.sum().backward()
    assert q.grad is None  # stopped at the first slice's gradient


def test_outside_an_edit_attention_is_torchs_own(small_slices):
    torchs = F.scaled_dot_product_attention
    with cancellable(CancelToken()):
        assert F.scaled_dot_product_attention is not torchs
        with cancellable(CancelToken()):  # another edit, e.g. on another thread
            pass
        assert F.scaled_dot_product_attention is not torchs
    assert F.scaled_dot_product_attention is torchs
    with cancellable(None):  # no token: nothing installed, nothing checked
        assert F.scaled_dot_product_attention is torchs
