"""Engine speed work on the tiny random model: counted UNet work, re-drag cache, LoRA residency.

Plumbing only (random weights); the counts are exact, so they are asserted exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.engine import pipeline
from backend.engine.attention import denoise_with_reference
from backend.engine.diffusion import Schedule, UNetRunner
from backend.engine.pipeline import DragEngine
from backend.engine.types import DragRequest

# 10 DDIM steps at strength 0.7 → 7 inversion steps; reach 0: the drag never stops early.
FAST = {"work_size": 64, "lora_steps": 2, "lora_batch": 2, "n_inference_steps": 10,
        "drag_steps": 3, "drag_end_step": 2, "track_per_denoise": 1, "max_drag_per_track": 2,
        "reach_threshold": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def engine(tiny_model_dir, tmp_path):
    return DragEngine.load(str(tiny_model_dir), device="cpu", lora_cache_dir=str(tmp_path))


def make_request(method: str = "dragdiffusion", targets=((40.0, 25.0),), **kw) -> DragRequest:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[8:40, 10:56] = 255
    fields = dict(image=image, handles=[(20.0, 25.0)], targets=list(targets), mask=mask,
                  method=method, prompt="a red disc", seed=3, params=dict(FAST))
    params = kw.pop("params", {})
    fields.update(kw)
    fields["params"] = {**FAST, **params}
    return DragRequest(**fields)


def test_first_edit_work_is_counted_per_phase_and_matches_the_official_count(engine):
    work = engine.run(make_request("dragdiffusion")).stats["work"]
    # LoRA 2 steps × batch 2 × 2; 7 inversion steps; F⁰; 3 drag steps × 2; 7 steps × [orig, edit].
    assert work["fe"] == {"lora": 8, "inversion": 7, "reference": 1, "drag": 6, "denoise": 14}
    assert work["official_fe"] == work["fe"] and work["ratio"] == 1.0
    assert work["total"] == 36 and work["official_defaults_total"] == 906


def test_gooddrag_work_is_counted_and_saves_the_official_redundant_passes(engine):
    work = engine.run(make_request("gooddrag")).stats["work"]
    # Strength 0.75 → round(7.5) = 8 steps. 2 dragged timesteps × 1 tracking × 2 Adam steps
    # × 2; the original trajectory has 2 steps (the official code records 3); while dragging
    # only the edited branch is denoised (the original's next latent is on its trajectory).
    assert work["fe"] == {"lora": 8, "inversion": 8, "reference": 2, "drag": 8,
                          "denoise": 2 + 2 * 6}
    assert work["official_fe"] == {"lora": 8, "inversion": 8, "reference": 3, "drag": 8,
                                   "denoise": 16}
    assert work["official_defaults_total"] == 1102


def test_without_a_mask_the_forwards_stop_after_the_feature_block(engine):
    work = engine.run(make_request("dragdiffusion", mask=None,
                                   params={"lora_steps": 0})).stats["work"]
    assert work["truncated"] == 1 + 3  # F⁰ and every drag forward: the loss needs no ε
    assert work["fe"]["drag"] == 6  # counted as whole forwards (an upper bound)


def base_weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.model.unet.state_dict().items()}


def assert_same_weights(engine, expected) -> None:
    now = engine.model.unet.state_dict()
    assert now.keys() == expected.keys()
    assert all(torch.equal(now[k], expected[k]) for k in expected)


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_a_redrag_skips_lora_and_inversion_and_matches_an_uncached_run(engine, method,
                                                                         tiny_model_dir,
                                                                         tmp_path_factory):
    first = engine.run(make_request(method))
    assert first.stats["reused"] == {"lora": False, "inversion": False}
    again = engine.run(make_request(method, targets=[(10.0, 30.0)]))  # new points
    work = again.stats["work"]
    assert again.stats["reused"] == {"lora": True, "inversion": True}
    # Only the drag and the denoising ran: no LoRA, no inversion, no reference features.
    assert work["fe"]["lora"] == work["fe"]["inversion"] == work["fe"]["reference"] == 0
    assert work["fe"]["drag"] > 0 and work["fe"]["denoise"] > 0
    assert work["official_fe"]["inversion"] > 0 and work["official_fe"]["lora"] == 0

    cold = DragEngine.load(str(tiny_model_dir), device="cpu", reuse=False,
                           lora_cache_dir=str(tmp_path_factory.mktemp("cold")))
    fresh = cold.run(make_request(method, targets=[(10.0, 30.0)]))
    assert fresh.stats["work"]["fe"]["inversion"] > 0 and fresh.stats["work"]["fe"]["lora"] > 0
    # The denoising's original branch came from the cache: the edited branch ran alone at
    # every step with reference attention (GoodDrag's 2 dragged steps ran it alone anyway).
    alone = {"dragdiffusion": 7, "gooddrag": 2 + 6}[method]
    assert work["fe"]["denoise"] == alone < fresh.stats["work"]["fe"]["denoise"]
    # The same edit up to float rounding (one branch instead of a batch of two): at most one
    # 8-bit level, on a few pixels.
    difference = np.abs(again.image.astype(int) - fresh.image)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.1
    assert again.handles == fresh.handles


def test_without_the_cache_the_original_branch_is_denoised_beside_the_edit(tiny_model_dir,
                                                                         tmp_path):
    """reuse off (the behaviour before the re-drag cache): every re-drag denoises both
    branches, bit for bit as the first edit's batch."""
    cold = DragEngine.load(str(tiny_model_dir), device="cpu", reuse=False,
                           lora_cache_dir=str(tmp_path))
    cold.run(make_request())
    again = cold.run(make_request(targets=[(10.0, 30.0)]))
    assert again.stats["work"]["fe"]["denoise"] == 14


@pytest.mark.parametrize("change", [
    {"prompt": "a blue square"},
    {"seed": 4},  # the LoRA's seed
    {"params": {"inversion_strength": 0.6}},
    {"params": {"n_inference_steps": 12}},
    {"params": {"work_size": 72}},
    {"params": {"feature_block": 1}},
    {"params": {"lora_steps": 3}},
    {"params": {"lora_steps": 0}},
    {"image": "one pixel"},
])
def test_any_change_the_inversion_depends_on_misses_the_cache(engine, change):
    engine.run(make_request())
    change = dict(change)
    if change.get("image") == "one pixel":
        image = make_request().image.copy()
        image[30, 30, 0] ^= 1
        change["image"] = image
    work = engine.run(make_request(**change)).stats["work"]
    assert work["fe"]["inversion"] > 0


def test_a_cached_lora_stays_merged_and_is_restored_exactly(engine):
    base = base_weights(engine)
    engine.run(make_request())
    merged = engine.merged_lora.key
    assert merged is not None
    changed = engine.model.unet.state_dict()
    assert any(not torch.equal(changed[k], base[k]) for k in base)  # merged into the weights
    assert not any("lora_" in k for k in changed)  # no adapter layers left in the UNet
    # Another image: the first LoRA is replaced (restored, then the new one merged).
    image = make_request().image[::-1].copy()
    engine.run(make_request(image=image))
    assert engine.merged_lora.key not in (None, merged)
    # An edit without LoRA runs on the exact base weights.
    engine.run(make_request(params={"lora_steps": 0}))
    assert engine.merged_lora.key is None
    assert_same_weights(engine, base)


def test_without_reuse_nothing_stays_merged_or_cached(tiny_model_dir, tmp_path):
    engine = DragEngine.load(str(tiny_model_dir), device="cpu", lora_cache_dir=str(tmp_path),
                             reuse=False)
    base = base_weights(engine)
    engine.run(make_request())
    assert_same_weights(engine, base)
    second = engine.run(make_request(targets=[(10.0, 30.0)]))
    assert second.stats["work"]["fe"]["inversion"] > 0  # inverted again
    assert second.stats["work"]["fe"]["lora"] == 0  # but the LoRA came from the disk cache


def test_memos_over_the_byte_budget_are_dropped(engine):
    from backend.engine.redrag import RedragCache

    engine.redrag = RedragCache(max_bytes=1)
    engine.run(make_request("gooddrag"))
    (entry,) = engine.redrag._entries.values()
    assert entry.memo == {}  # the trajectory did not fit; z_t* alone is kept
    work = engine.run(make_request("gooddrag", targets=[(10.0, 30.0)])).stats["work"]
    assert work["fe"]["inversion"] == 0 and work["fe"]["reference"] == 2


def test_another_images_memos_are_dropped_before_a_lora_is_trained(engine, monkeypatch):
    """The denoising's original branch (0.41 GB in fp16 at 512²) must not add to the next
    image's LoRA training, the edit's memory peak."""
    from backend.engine import lora

    engine.redrag.max_entries = 2
    engine.run(make_request())
    (first,) = engine.redrag._entries.values()
    assert any(key[0] == "original branch" for key in first.memo)
    at_training = []
    train = lora.train_lora

    def watching(*args, **kwargs):
        at_training.append(len(first.memo))
        return train(*args, **kwargs)

    monkeypatch.setattr(lora, "train_lora", watching)
    other = make_request()
    other.image = other.image[::-1].copy()
    engine.run(other)
    assert at_training == [0]
    # only the memos went: z_t* stays, so a re-drag of the first image skips its inversion
    again = engine.run(make_request(targets=[(10.0, 30.0)]))
    assert again.stats["work"]["fe"]["inversion"] == 0


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_high_bit_depth_comes_back_in_its_dtype_exact_outside_the_mask(engine, dtype, channels):
    rng = np.random.default_rng(5)
    if dtype == np.float32:
        image = rng.uniform(-0.1, 1.3, (48, 64, channels)).astype(np.float32)
    else:
        image = rng.integers(0, 65536, (48, 64, channels), dtype=np.uint16)
    request = make_request(image=image, params={"lora_steps": 0})
    result = engine.run(request)
    assert result.image.dtype == image.dtype and result.image.shape == image.shape
    outside = request.mask == 0
    assert result.image[outside].tobytes() == image[outside].tobytes()
    if channels == 4:
        assert result.image[..., 3].tobytes() == image[..., 3].tobytes()
    assert not np.array_equal(result.image[~outside], image[~outside])
    if dtype == np.uint16:  # a 16-bit result, not 8-bit values scaled up
        assert (result.image[~outside] % 257 != 0).mean() > 0.5


def test_the_blend_width_follows_the_working_to_full_scale(engine):
    """A 320-px image edited at 64 px: the default 3-px feather becomes 15 px at full size."""
    image = np.zeros((240, 320, 3), np.uint8)
    mask = np.zeros((240, 320), np.uint8)
    mask[:, 160:] = 255
    request = make_request(image=image, mask=mask, handles=[(200.0, 120.0)],
                           targets=[(220.0, 120.0)])
    from backend.engine.params import resolve

    _, params = resolve("dragdiffusion", request.params)
    prep = engine.prepare(request, params)
    assert prep.working_size == (64, 48)
    row = engine.finish(prep, np.ones((48, 64, 3), np.float32), params)[120, :, 0].astype(int)
    assert (row[:160] == 0).all() and (row[175:] == 255).all()
    assert 0 < row[160] < 30 and 100 < row[167] < 155  # half way at half the width
    assert np.diff(row[159:176]).max() <= 30


def test_the_redrag_key_covers_the_model_and_its_precision():
    from types import SimpleNamespace

    from backend.engine.devices import PRECISIONS
    from backend.engine.params import DragParams
    from backend.engine.redrag import redrag_key

    pixels = torch.zeros(1, 3, 8, 8)
    model = SimpleNamespace(fingerprint="a", device=torch.device("cpu"), dtype=torch.float32,
                            precision=PRECISIONS["fp32"])
    key = redrag_key(model, pixels, "p", None, DragParams())
    assert key == redrag_key(model, pixels.clone(), "p", None, DragParams())
    for change in ({"fingerprint": "b"}, {"dtype": torch.float16},
                   {"precision": PRECISIONS["fp16"]}):
        other = SimpleNamespace(**{**vars(model), **change})
        assert redrag_key(other, pixels, "p", None, DragParams()) != key
    assert redrag_key(model, pixels, "p", "lora-key", DragParams()) != key
    assert redrag_key(model, pixels, "p", None, DragParams(drag_steps=3)) == key  # not a key part


# --- prepare (protocol 1.2): the work before the points, ahead of the edit -----------------------

def cache_keys(engine, request) -> tuple[str, str]:
    """The LoRA and re-drag cache keys an edit of ``request`` uses."""
    from backend.engine.lora import lora_cache_key, lora_settings
    from backend.engine.redrag import redrag_key

    algorithm, params = engine.table.resolve(request.method, request.params)
    prep = engine.prepare(request, params)
    lora = lora_cache_key(engine.model, prep.pixels, request.prompt,
                          **lora_settings(params, algorithm, request.seed))
    return lora, redrag_key(engine.model, prep.pixels, request.prompt, lora, params)


def test_the_prepared_knobs_are_exactly_what_the_cache_keys_read(engine):
    """params.PREPARED_KNOBS (what a submit must share with a prepare to join it) names every
    knob that changes the LoRA or the re-drag key, and no other."""
    from backend.engine.params import PREPARED_KNOBS, SPECS

    base = make_request(params={"work_max_side": 0})
    keys = cache_keys(engine, base)
    other = {"work_size": 72, "work_max_side": 48, "lora_steps": 3, "lora_lr": 1e-3,
             "lora_rank": 8, "lora_batch": 1, "n_inference_steps": 12,
             "inversion_strength": 0.5, "feature_block": 1}
    for name, spec in SPECS.items():
        value = other.get(name)
        if value is None:
            value = (not getattr(engine.table.params("dragdiffusion"), name)
                     if spec.kind == "bool" else spec.high)
        changed = cache_keys(engine, make_request(params={**base.params, name: value}))
        differs = [a != b for a, b in zip(changed, keys, strict=True)]
        assert any(differs) == (name in PREPARED_KNOBS), name


@pytest.mark.parametrize("method", ["dragdiffusion", "gooddrag"])
def test_a_prepared_edit_starts_at_the_drag_and_matches_an_unprepared_one(engine, method,
                                                                          tiny_model_dir,
                                                                          tmp_path_factory):
    request = make_request(method)
    ahead = DragRequest(image=request.image, handles=[], targets=[], method=method,
                        prompt=request.prompt, seed=request.seed, params=request.params)
    steps: list[str] = []
    prepared = engine.prepare_image(ahead, progress=lambda phase, step, total: steps.append(phase))
    assert prepared.stats["work"]["fe"]["lora"] == 8 and prepared.stats["work"]["fe"]["reference"]
    assert {"load", "lora", "inversion"} <= set(steps)
    result = engine.run(request)
    assert result.stats["reused"] == {"lora": True, "inversion": True}
    fe = result.stats["work"]["fe"]
    assert fe["lora"] == fe["inversion"] == fe["reference"] == 0 and fe["drag"] > 0

    cold = DragEngine.load(str(tiny_model_dir), device="cpu",
                           lora_cache_dir=str(tmp_path_factory.mktemp("cold")))
    unprepared = cold.run(request)
    np.testing.assert_array_equal(result.image, unprepared.image)
    assert result.handles == unprepared.handles


def test_a_prepare_without_a_mask_leaves_dragdiffusions_masked_reference_to_the_edit(engine):
    request = make_request()
    ahead = DragRequest(image=request.image, handles=[], targets=[], method="dragdiffusion",
                        prompt=request.prompt, seed=request.seed, params=request.params)
    engine.prepare_image(ahead, masked=False)
    fe = engine.run(request).stats["work"]["fe"]
    assert fe["lora"] == fe["inversion"] == 0 and fe["reference"] == 1  # the mask term's


def test_an_inpaint4drag_prepare_only_builds_the_filler(engine):
    ahead = DragRequest(image=make_request().image, handles=[], targets=[],
                        method="inpaint4drag", params={"work_size": 64})
    prepared = engine.prepare_image(ahead)
    assert prepared.stats["work"]["total"] == 0 and engine._filler is not None
    assert engine.merged_lora.key is None


# --- chains of drags: a drag on a result layer inherits its source's LoRA -----------------------

def test_a_drag_on_a_result_inherits_the_lora_of_the_image_it_came_from(engine):
    first = engine.run(make_request())
    assert first.stats["work"]["fe"]["lora"] > 0 and not first.stats["lora_inherited"]
    assert not np.array_equal(first.image, make_request().image)  # a new image
    second = engine.run(make_request(image=first.image, targets=[(10.0, 30.0)]))
    fe = second.stats["work"]["fe"]
    assert second.stats["lora_inherited"] and fe["lora"] == 0 and not second.warnings
    assert fe["inversion"] > 0  # the result itself is inverted: it is another image
    # another image's edit in between takes the merged LoRA's place: the chain goes on from
    # the disk cache, and a prepare of the result inherits it too
    engine.run(make_request(image=make_request().image[::-1].copy()))
    ahead = DragRequest(image=second.image, handles=[], targets=[], method="dragdiffusion",
                        prompt="a red disc", seed=3, params=make_request().params)
    prepared = engine.prepare_image(ahead)
    assert prepared.stats["lora_inherited"] and prepared.stats["work"]["fe"]["lora"] == 0
    third = engine.run(make_request(image=second.image))
    assert third.stats["lora_inherited"] and third.stats["work"]["fe"]["lora"] == 0


@pytest.mark.parametrize(("change", "named"), [
    ({"prompt": "a blue disc"}, "prompt"),
    ({"method": "gooddrag"}, "method (GoodDrag's LoRA crops"),
    ({"params": {"lora_steps": 3}}, "lora_steps"),
])
def test_a_result_dragged_with_other_lora_settings_trains_and_says_why(engine, change, named):
    first = engine.run(make_request())
    other = engine.run(make_request(image=first.image, **change))
    assert not other.stats["lora_inherited"] and other.stats["work"]["fe"]["lora"] > 0
    (warning,) = other.warnings
    assert "result of an earlier drag" in warning and named in warning


@pytest.mark.parametrize("start_step", [0, 3])  # DragDiffusion's ref_start_step: from 0 or later
def test_the_original_branch_served_from_the_memo_agrees_with_denoising_it(engine, start_step):
    """denoise_with_reference: a memo-served (re-drag) denoise gives the edited latent of a
    two-branch denoise within float noise, the first edit's recorded run bit for bit."""
    model = engine.model
    schedule = Schedule.from_scheduler(model.scheduler, 10, 0.7)
    runner = UNetRunner(model.unet, model.encode_prompt("a red disc"))
    gen = torch.Generator().manual_seed(0)
    z_orig, z_edit = torch.randn(2, 4, 6, 8, generator=gen).split(1)
    steps = schedule.denoise_timesteps

    def denoise(memo):
        return denoise_with_reference(runner, schedule, z_orig, z_edit, steps, 10,
                                      active=lambda i: i >= start_step, memo=memo)

    plain = denoise(None)
    memo: dict = {}
    recording = denoise(memo)
    before = runner.work.total
    served = denoise(memo)
    assert len(memo) == len(steps)
    assert runner.work.total - before == len(steps)  # the edited branch alone: 1 FE a step
    torch.testing.assert_close(recording, plain, rtol=0, atol=0)
    # float noise: the edited branch ran as a batch of one instead of two
    torch.testing.assert_close(served, plain, rtol=1e-4, atol=1e-5)


def test_previews_are_throttled_before_the_latent_leaves_the_device(engine, monkeypatch):
    """Only the previews that will be shown are mapped to RGB and copied to the host."""
    copies = []
    real = pipeline.latent_preview

    def counting(latent, matrix=None):
        copies.append(latent.shape)
        return real(latent, matrix)

    monkeypatch.setattr(pipeline, "latent_preview", counting)
    shown = []
    request = make_request(params={"lora_steps": 0})
    engine.run(request, preview=lambda *a: shown.append(a[:2]), preview_interval=0.0)
    every_step = len(copies)
    assert every_step == 7 and len(shown) == every_step  # one per denoising step
    copies.clear()
    shown.clear()
    engine.run(make_request(params={"lora_steps": 0}, targets=[(30.0, 25.0)]),
               preview=lambda *a: shown.append(a[:2]), preview_interval=3600.0)
    assert len(copies) == len(shown) == 1 and shown[0] == ("denoise", 0)
