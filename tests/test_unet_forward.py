"""The engine's UNet forward: the library's ε bit for bit, features without hooks, and plain
enough for ``torch.compile`` to trace in one graph (the opt-in compiled UNet)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.engine.diffusion import UNetRunner, unet_forward
from backend.engine.lora import LoraCache
from backend.engine.models import load_model
from backend.engine.pipeline import DragEngine
from backend.engine.random_tiny import build_tiny_pipeline
from backend.engine.types import DragRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # runs compared bit for bit


@pytest.fixture(scope="module")
def unet():
    return build_tiny_pipeline(seed=0).unet.eval().requires_grad_(False)


def _inputs(batch: int, height: int, width: int):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, height, width, generator=gen), torch.tensor(481),
            torch.randn(batch, 77, 32, generator=gen))


@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 8, 11)])  # 11: upsample sizes passed down
def test_eps_is_the_library_forward_bit_for_bit(unet, shape):
    z, t, cond = _inputs(*shape)
    with torch.no_grad():
        eps, feat = unet_forward(unet, z, t, cond)
        assert torch.equal(eps, unet(z, t, encoder_hidden_states=cond).sample) and feat is None


def test_features_are_the_blocks_output_and_stop_skips_the_rest(unet):
    z, t, cond = _inputs(1, 8, 10)
    seen = []
    hooks = [unet.up_blocks[2].register_forward_hook(lambda _m, _i, out: seen.append(out)),
             unet.conv_out.register_forward_hook(lambda *_: seen.append("conv_out"))]
    try:
        with torch.no_grad():
            _, feat = unet_forward(unet, z, t, cond, block=2)
            none, early = unet_forward(unet, z, t, cond, block=2, stop=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert none is None and torch.equal(feat, seen[0]) and torch.equal(early, feat)
    assert seen.count("conv_out") == 1  # the stopped pass never reached the last layer


def test_torch_compile_traces_the_forward_as_one_graph(unet):
    """fullgraph=True fails on any graph break (a hook raising to stop early would be one)."""
    z, t, cond = _inputs(1, 8, 8)
    compiled = torch.compile(unet_forward, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        eps, feat = compiled(unet, z, t, cond, 2, False)
        ref_eps, ref_feat = unet_forward(unet, z, t, cond, 2, False)
    assert torch.equal(eps, ref_eps) and torch.equal(feat, ref_feat)


@pytest.mark.slow  # a few minutes of tracing on a CPU: one graph per phase variant
def test_a_compiled_engine_gives_the_same_edit(tiny_model_dir, tmp_path):
    from backend.tools.bench import synthetic_case

    model = load_model(tiny_model_dir, device="cpu")
    image, mask, handles, targets = synthetic_case(64)
    request = DragRequest(image=image, handles=handles, targets=targets, mask=mask,
                          method="gooddrag", params={"work_size": 64, "lora_steps": 0,
                                                     "n_inference_steps": 6, "drag_end_step": 1,
                                                     "track_per_denoise": 1})
    plain = DragEngine(model, LoraCache(tmp_path), reuse=False).run(request)
    engine = DragEngine(model, LoraCache(tmp_path), reuse=False, compile_unet="eager")
    assert engine.unet_forward is not None
    compiled = engine.run(request)
    np.testing.assert_array_equal(compiled.image, plain.image)
    assert compiled.handles == plain.handles


def test_the_runner_uses_the_forward_it_is_given(unet):
    calls = []

    def forward(*args):
        calls.append(args[4:])
        return unet_forward(*args)

    runner = UNetRunner(unet, torch.zeros(1, 77, 32), forward=forward)
    with torch.no_grad():
        runner.eps(torch.zeros(1, 4, 8, 8), 681)
        runner.eps_and_features(torch.zeros(1, 4, 8, 8), 681, (16, 16), need_eps=False)
    assert calls == [(None, False), (runner.block, True)]
