"""Identity LoRA: trains only LoRA weights, changes the output, unloads exactly, caches on disk."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from backend.engine.errors import Cancelled
from backend.engine.lora import (
    LoraCache,
    PreparedLora,
    default_cache_dir,
    prepare_lora,
    remove_lora,
    train_lora,
)
from backend.engine.lora_merge import MergedLora
from backend.engine.models import load_model
from backend.engine.params import DragParams
from backend.engine.types import CancelToken

PROMPT = "a red disc"
PARAMS = DragParams(work_size=64, lora_steps=3, lora_batch=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # two trainings are compared bit for bit


@contextmanager
def lora_for_one_edit(model, image, prompt, params, cache, **kwargs):
    """``prepare_lora`` for a ``with`` block, then the base weights back (as an engine without
    reuse leaves the UNet after an edit, also after an error or a cancellation)."""
    merged = MergedLora(model)
    try:
        yield prepare_lora(model, image, prompt, params, cache, merged=merged, **kwargs)
    finally:
        merged.restore()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def image():
    """A 64×48 working image (non-square, so random crops matter)."""
    return torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1


@pytest.fixture(scope="module")
def probe(model):
    """A fixed UNet input and its output with the base weights."""
    x = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    cond = model.encode_prompt(PROMPT)

    def run():
        with torch.no_grad():
            return model.unet(x, t, encoder_hidden_states=cond).sample

    return run, run()


@pytest.fixture(scope="module")
def trained(model, image, probe):
    """One DragDiffusion-style training run: (state dict, output with the adapter, base weights)."""
    run, _ = probe
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    calls = []
    state = train_lora(
        model, image, PROMPT, steps=PARAMS.lora_steps, lr=PARAMS.lora_lr, rank=PARAMS.lora_rank,
        batch=PARAMS.lora_batch, fixed_crops=False, seed=0,
        progress=lambda *a: calls.append(a),
    )
    active = {k: v.clone() for k, v in model.unet.state_dict().items()}
    output = run()
    remove_lora(model)
    return state, output, base, active, calls


def test_training_changes_only_lora_weights(trained):
    state, _, base, active, calls = trained
    assert calls == [("lora", i, PARAMS.lora_steps) for i in range(PARAMS.lora_steps + 1)]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    # 16 transformer blocks × (self, cross) × (to_q, to_k, to_v, to_out.0) × (A, B)
    assert len(state) == 16 * 2 * 4 * 2
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)  # B starts at 0
    lora_keys = [k for k in active if "lora_" in k]
    assert lora_keys
    for key, value in active.items():
        if "lora_" in key:
            continue
        assert torch.equal(value, base[key.replace(".base_layer", "")]), key


def test_adapter_changes_the_output_and_unloads_exactly(model, trained, probe):
    run, base_output = probe
    _, lora_output, base, _, _ = trained
    assert (lora_output - base_output).abs().max() > 1e-4
    after = model.unet.state_dict()
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)
    assert torch.equal(run(), base_output)


def test_cache_hit_skips_training_and_matches(model, image, probe, trained, tmp_path):
    run, base_output = probe
    cache = LoraCache(tmp_path)
    first_calls, second_calls = [], []
    with lora_for_one_edit(model, image, PROMPT, PARAMS, cache, method="dragdiffusion",
                      progress=lambda *a: first_calls.append(a)) as info:
        assert info.trained and info.key is not None
        first = run()
    assert len(first_calls) == PARAMS.lora_steps + 1
    # Seeded training repeats: same weights as the fixture's run. The edit runs with the LoRA
    # merged into the weights, which rounds differently from peft's separate low-rank branch.
    torch.testing.assert_close(first, trained[1], rtol=0, atol=1e-5)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    with lora_for_one_edit(model, image, PROMPT, PARAMS, cache, method="dragdiffusion",
                      progress=lambda *a: second_calls.append(a)) as info:
        assert not info.trained and not info.resident  # from the disk cache
        assert torch.equal(run(), first)
    assert second_calls == [("lora", PARAMS.lora_steps, PARAMS.lora_steps)]
    assert torch.equal(run(), base_output)

    merged = MergedLora(model)
    other = prepare_lora(model, image, "a blue square", PARAMS.replace(lora_steps=1), cache,
                         method="dragdiffusion", merged=merged)
    assert other.trained and other.key != info.key and merged.key == other.key
    again = prepare_lora(model, image, "a blue square", PARAMS.replace(lora_steps=1), cache,
                         method="dragdiffusion", merged=merged)
    assert again == PreparedLora(other.key, trained=False, resident=True)
    merged.restore()
    assert torch.equal(run(), base_output)


def test_merged_lora_refuses_weights_that_do_not_fit(model, trained, probe):
    run, base_output = probe
    merged = MergedLora(model)
    state = dict(trained[0])
    bad = {**state, next(iter(state)): torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="do not match"):
        merged.merge("bad", bad)
    with pytest.raises(ValueError, match="do not match"):
        merged.merge("bad", {"not.a.layer.lora_A.weight": torch.zeros(1, 1),
                             "not.a.layer.lora_B.weight": torch.zeros(1, 1)})
    assert merged.key is None and torch.equal(run(), base_output)
    merged.merge("good", state)
    merged.merge("good", {})  # same key: kept as is, the weights are not even looked at
    torch.testing.assert_close(run(), trained[1], rtol=0, atol=1e-5)
    merged.restore()
    assert torch.equal(run(), base_output)


def test_gooddrag_crops_and_a_different_seed_give_other_weights(model, image, trained):
    state = train_lora(
        model, image, PROMPT, steps=PARAMS.lora_steps, lr=PARAMS.lora_lr, rank=PARAMS.lora_rank,
        batch=PARAMS.lora_batch, fixed_crops=True, seed=1,
    )
    remove_lora(model)
    assert state.keys() == trained[0].keys()
    assert any(not torch.equal(state[k], trained[0][k]) for k in state)


def test_no_lora_steps_means_no_adapter(model, image, probe, tmp_path):
    run, base_output = probe
    with lora_for_one_edit(model, image, PROMPT, PARAMS.replace(lora_steps=0), LoraCache(tmp_path),
                      method="gooddrag") as info:
        assert info == PreparedLora(key=None, trained=False, resident=False)
        assert not getattr(model.unet, "peft_config", None)
        assert torch.equal(run(), base_output)
    assert not any(tmp_path.iterdir())


def test_cancel_during_training_restores_the_base_unet(model, image, probe):
    run, base_output = probe
    token = CancelToken()

    def progress(phase, step, total):
        if step == 1:
            token.cancel()

    with pytest.raises(Cancelled), lora_for_one_edit(model, image, PROMPT, PARAMS, None,
                                                method="dragdiffusion", progress=progress,
                                                cancel=token):
        pass
    assert not getattr(model.unet, "peft_config", None)
    assert torch.equal(run(), base_output)


def test_cache_ignores_damaged_files_and_stays_bounded(tmp_path):
    cache = LoraCache(tmp_path, max_entries=2)
    weights = {"a.lora_A.weight": torch.ones(2, 2)}
    cache.put("damaged", weights)
    cache.path("damaged").write_bytes(b"garbage")
    assert cache.get("damaged") is None
    assert not cache.path("damaged").exists()

    for i, key in enumerate(("k1", "k2", "k3")):
        cache.put(key, {k: v * i for k, v in weights.items()})
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == ["k2", "k3"]
    assert torch.equal(cache.get("k3")["a.lora_A.weight"], weights["a.lora_A.weight"] * 2)
    assert not list(tmp_path.glob("*.tmp"))


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "gimp-drag-diffusion" / "lora"
    assert LoraCache().directory == default_cache_dir()


@pytest.mark.slow  # ~45 s of tracing on one CPU thread
def test_a_compiled_lora_step_trains_the_same_weights(model, image):
    """``--compile`` covers the LoRA's forward and backward: trained through torch.compile of
    the engine's UNet forward (aot_eager: the forward and backward graphs AOTAutograd makes,
    run eagerly, as on a GPU before the inductor's kernels), in one graph, the weights are
    the eager ones within float tolerance."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from backend.engine.diffusion import compiled_unet_forward

    settings = dict(steps=2, lr=PARAMS.lora_lr, rank=4, batch=2, fixed_crops=False, seed=5)
    try:
        eager = train_lora(model, image, PROMPT, **settings)
        remove_lora(model)
        torch._dynamo.reset()
        counters.clear()
        compiled = train_lora(model, image, PROMPT, forward=compiled_unet_forward("aot_eager"),
                              **settings)
        graphs, autograd = dict(counters["stats"]), dict(counters["aot_autograd"])
    finally:
        remove_lora(model)
        torch._dynamo.reset()
    assert graphs.get("unique_graphs") == 1 and autograd.get("ok", 0) >= 1  # fwd + bwd graphs
    assert eager.keys() == compiled.keys() and eager
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in eager.items() if "lora_B" in k)
