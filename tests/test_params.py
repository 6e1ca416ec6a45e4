"""The parameter table: every knob typed and bounded, every override checked before any work."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from backend.engine.errors import InvalidInput
from backend.engine.imageops import working_size
from backend.engine.params import (
    DESCRIPTIONS,
    MAX_MEMORY,
    MAX_WORK,
    PRESET_METHOD,
    PRESETS,
    SPECS,
    VAE_ATTENTION_SHARE,
    VAE_PASSES,
    DragParams,
    MethodTable,
    check_canvas,
    estimated_memory,
    estimated_work,
    method_descriptions,
    parse_assignments,
    pass_cost,
    resolve,
    served_algorithms,
    spec_table,
)
from backend.engine.types import DEFAULT_METHOD


def test_every_knob_has_a_spec_and_every_preset_fits_it():
    assert set(SPECS) == {f.name for f in dataclasses.fields(DragParams)}
    for name, preset in PRESETS.items():
        for knob, value in preset.as_dict().items():
            assert SPECS[knob].check(knob, value) == value, (name, knob)
        assert estimated_work(PRESET_METHOD[name], preset) < MAX_WORK / 20
    for spec in SPECS.values():
        assert spec.help and "\n" not in spec.help
        if spec.kind != "bool":
            assert spec.low < spec.high and 0 < spec.step <= spec.high - spec.low


def test_every_preset_has_a_one_line_description():
    descriptions = method_descriptions()
    assert set(descriptions) == set(PRESETS)
    assert all(text and "\n" not in text for text in descriptions.values())


def test_spec_table_is_plain_data():
    table = spec_table()
    assert table["work_size"] == {"type": "int", "min": 64, "max": 2048, "step": 64,
                                  "help": SPECS["work_size"].help,
                                  "methods": ["dragdiffusion", "gooddrag", "inpaint4drag"]}
    assert table["reference_attention"]["type"] == "bool"
    assert "min" not in table["reference_attention"]
    # which algorithms read a knob (the dialog greys out the rest)
    assert table["drag_steps"]["methods"] == ["dragdiffusion"]
    assert table["lora_steps"]["methods"] == ["dragdiffusion", "gooddrag"]
    assert table["inpaint_steps"]["methods"] == ["inpaint4drag"]


def test_inpaint4drag_is_the_official_app_s_settings():
    algorithm, params = resolve("inpaint4drag")
    assert algorithm == "inpaint4drag"
    assert (params.inpaint_steps, params.inpaint_strength, params.inpaint_kernel) == (8, 1.0, 5)
    assert params.feather == 0  # the official pastes the inpainted area back hard
    # work: its inpainting steps and the VAE's encode and decode on the working canvas
    assert estimated_work("inpaint4drag", params) == pytest.approx(8 + VAE_PASSES)
    # twice the area costs more than twice the passes: attention's square of the tokens
    tall = estimated_work("inpaint4drag", params, (512, 1024))
    assert tall == pytest.approx(8 * pass_cost((512, 1024))
                                 + VAE_PASSES * pass_cost((512, 1024), VAE_ATTENTION_SHARE))
    assert tall > 2 * (8 + VAE_PASSES)


def test_work_estimate_matches_the_official_pass_counts():
    # Counted from the official codes at 512² with defaults (issue 13): ≈ 906 and ≈ 1,094.
    assert estimated_work("dragdiffusion", PRESETS["dragdiffusion"]) == pytest.approx(906, 0.01)
    assert estimated_work("gooddrag", PRESETS["gooddrag"]) == pytest.approx(1094, 0.01)


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"work_size": math.nan}, "'work_size' must be an integer from 64 to 2048, got nan"),
    ({"work_size": math.inf}, "'work_size' must be an integer from 64 to 2048"),
    ({"latent_lr": math.inf}, "'latent_lr' must be a number from 1e-05 to 1"),
    ({"latent_lr": 0.0}, "'latent_lr' must be a number from 1e-05 to 1"),
    ({"inversion_strength": math.nan}, "'inversion_strength' must be a number from 0.01 to 1"),
    ({"guidance_scale": 7.5}, "unknown parameter 'guidance_scale'"),  # no CFG: not a knob
    ({"lora_lr": math.inf}, "'lora_lr'"),
    ({"beta": math.inf}, "'beta'"),
    ({"lam": -math.inf}, "'lam'"),
    ({"reach_threshold": math.inf}, "'reach_threshold'"),
    ({"drag_loss_threshold": math.nan}, "'drag_loss_threshold'"),
    ({"track_per_denoise": 10**18}, "'track_per_denoise' must be an integer from 1 to 100"),
    ({"drag_steps": 2.5}, "'drag_steps' must be an integer"),
    ({"drag_steps": True}, "'drag_steps' must be an integer"),
    ({"drag_steps": "40"}, "'drag_steps' must be an integer"),
    ({"reference_attention": 1}, "'reference_attention' must be true or false"),
    ({b"work_size": 64}, "parameter names must be text"),
    ({"no_such": 1}, "unknown parameter 'no_such'"),
    ({"lora_steps": 2000, "lora_batch": 16}, "UNet passes, more than the limit"),
])
def test_bad_overrides_name_the_knob_and_its_range(overrides, fragment):
    with pytest.raises(InvalidInput) as err:
        resolve("gooddrag", overrides)
    assert fragment in str(err.value)


def test_good_overrides_are_cast_to_the_knob_type():
    algorithm, params = resolve("dragdiffusion-paper", {"work-size": 256.0, "lam": 1,
                                                        "reference_attention": True})
    assert algorithm == "dragdiffusion"
    assert params.work_size == 256 and isinstance(params.work_size, int)
    assert params.lam == 1.0 and isinstance(params.lam, float)
    with pytest.raises(InvalidInput, match="unknown method"):
        resolve(b"gooddrag", {})  # type: ignore[arg-type]


def test_parse_assignments_uses_the_knob_types():
    assert parse_assignments(["work_size=384", "latent-lr=0.02", "reference_attention=false",
                              "lam=1e-1"]) == {"work_size": 384, "latent_lr": 0.02,
                                               "reference_attention": False, "lam": 0.1}
    for item, fragment in [("drag_steps", "use KEY=VALUE"), ("=3", "use KEY=VALUE"),
                           ("drag_stepz=3", "unknown parameter 'drag_stepz'"),
                           ("drag_steps=many", "'drag_steps' must be an integer"),
                           ("latent_lr=nan", "'latent_lr' must be a number from"),
                           ("reference_attention=maybe", "must be true or false")]:
        with pytest.raises(InvalidInput, match=fragment):
            parse_assignments([item], "--param")


def test_a_diverged_edit_fails_instead_of_returning_black(tiny_model_dir, monkeypatch):
    import numpy as np

    from backend.engine import pipeline
    from backend.engine.errors import EngineError
    from backend.engine.types import DragRequest

    real = pipeline.ALGORITHMS["dragdiffusion"]

    def diverging(ctx, z_star):  # what an optimiser that blew up leaves behind
        z, handles = real(ctx, z_star)
        return z * float("inf"), handles

    monkeypatch.setitem(pipeline.ALGORITHMS, "dragdiffusion", diverging)
    engine = pipeline.DragEngine.load(str(tiny_model_dir), device="cpu")
    image = np.full((32, 32, 3), 200, np.uint8)
    request = DragRequest(image=image, handles=[(8.0, 8.0)], targets=[(12.0, 8.0)],
                          method="dragdiffusion",
                          params={"work_size": 64, "lora_steps": 0, "n_inference_steps": 4,
                                  "drag_steps": 1})
    with pytest.raises(EngineError, match="lower latent_lr") as err:
        engine.run(request)
    assert type(err.value) is EngineError and err.value.code == "engine_error"


def test_a_tall_canvas_counts_its_height_and_names_the_cap_that_fits():
    p = PRESETS["dragdiffusion"]
    square = estimated_work("dragdiffusion", p)
    assert estimated_work("dragdiffusion", p, (512, 512)) == pytest.approx(square)
    # four times the area, more than four times the work (attention: see the next test)
    assert estimated_work("dragdiffusion", p, (512, 2048)) == pytest.approx(5.82 * square, 0.01)
    check_canvas("dragdiffusion", p, working_size(3000, 4000))  # a portrait photo: fine
    # a 1:100 strip: 512 wide and 51,200 tall at the default width, ~90,000 UNet passes
    with pytest.raises(InvalidInput, match=r"51200.*work_max_side \(at most (\d+)\)") as exc:
        check_canvas("dragdiffusion", p, working_size(60, 6000))
    fits = int(re.search(r"at most (\d+)", str(exc.value)).group(1))
    # the cap named is one the knob takes (it once named 34,000, beyond work_max_side's 4096)
    assert fits == SPECS["work_max_side"].high
    capped = p.replace(work_max_side=fits)
    check_canvas("dragdiffusion", capped, working_size(60, 6000, 512, fits))
    MethodTable().resolve("dragdiffusion", {"work_max_side": fits}, (60, 6000))


def test_a_pass_costs_attentions_square_of_the_tokens():
    """N1: the estimate counted a pass in proportion to the canvas's area, but attention grows
    with the square of the token count: an 8×8192 image at work_size 64 (a 64×65,536 canvas,
    65,536 latent tokens) was accepted and ran 9 min 42 s without finishing."""
    # SD1.5's FLOP counts (meta device): 803, 4,674 and 42,206 GFLOP at latents of 64², 128²
    # and 8×8192; the model's pass costs agree within 1 %.
    assert pass_cost((512, 512)) == pytest.approx(1.0)
    assert pass_cost((1024, 1024)) == pytest.approx(4674 / 803.3, 0.01)
    assert pass_cost((64, 65536)) == pytest.approx(42206 / 803.3, 0.01)
    assert pass_cost((65536, 64)) == pass_cost((1024, 4096))  # tokens count, not the shape
    p = PRESETS["dragdiffusion"].replace(work_size=64)
    strip = working_size(8, 8192, 64)
    assert strip == (64, 65536)
    need = estimated_work("dragdiffusion", p, strip)
    assert need > MAX_WORK > 16 * estimated_work("dragdiffusion", p, (512, 512))  # area alone
    with pytest.raises(InvalidInput, match=r"64×65536.*UNet passes.*work_max_side \(at most"):
        check_canvas("dragdiffusion", p, strip)


def test_a_canvas_that_needs_more_memory_than_the_limit_is_refused():
    """N1: a cap on memory as well as work. Few steps on a huge canvas ask for little work but
    need all the memory of one pass over it."""
    p = PRESETS["dragdiffusion"].replace(work_size=2048, lora_steps=0, n_inference_steps=2,
                                        inversion_strength=0.05, drag_steps=0)
    tall = working_size(1000, 4000, 2048)  # 2048×8192
    assert estimated_work("dragdiffusion", p, tall) < MAX_WORK
    assert estimated_memory(tall) == pytest.approx(125e9, 0.01)
    assert estimated_memory((512, 512)) == pytest.approx(4.2e9, 0.02)  # as measured
    assert estimated_memory((1024, 1024)) == pytest.approx(9.9e9, 0.02)
    with pytest.raises(InvalidInput, match=r"2048×8192.*125 GB.*80 GB.*at most (\d+)") as exc:
        check_canvas("dragdiffusion", p, tall)
    fits = int(re.search(r"at most (\d+)", str(exc.value)).group(1))
    check_canvas("dragdiffusion", p.replace(work_max_side=fits),
                 working_size(1000, 4000, 2048, fits))
    # the cap named is the knob's largest value: with any cap it takes, the largest working
    # canvas (2048 wide, 4096 tall) needs about 64 GB, under the limit
    assert fits == SPECS["work_max_side"].high
    assert estimated_memory((2048, 4096)) < MAX_MEMORY


def test_heavy_settings_name_a_cap_that_is_not_needlessly_small():
    p = PRESETS["dragdiffusion"].replace(lora_steps=400, lora_batch=8)
    with pytest.raises(InvalidInput, match=r"at most (\d+)") as exc:
        check_canvas("dragdiffusion", p, working_size(512, 4096))
    fits = int(re.search(r"at most (\d+)", str(exc.value)).group(1))
    assert fits < SPECS["work_max_side"].high
    capped = p.replace(work_max_side=fits)
    check_canvas("dragdiffusion", capped, working_size(512, 4096, 512, fits))
    assert estimated_work("dragdiffusion", capped, working_size(512, 4096, 512, fits)) > 0.5 * MAX_WORK


def test_the_method_table_applies_the_models_defaults_and_checks_the_canvas():
    """One table: the model's own defaults under every preset, a request's values over them,
    the canvas checked on the request's image."""
    demo = MethodTable({"work_size": 128, "reach_threshold": 0.5})
    assert demo.methods()["gooddrag"]["work_size"] == 128
    assert demo.methods()["gooddrag"]["lora_steps"] == PRESETS["gooddrag"].lora_steps
    assert demo.resolve("gooddrag")[1] == PRESETS["gooddrag"].replace(work_size=128,
                                                                      reach_threshold=0.5)
    assert demo.resolve("gooddrag", {"work-size": 512})[1].work_size == 512
    hello = demo.as_hello()
    assert hello["default_method"] == DEFAULT_METHOD in hello["methods"]
    assert hello["parameters"] == spec_table() and hello["descriptions"] == method_descriptions()
    # 60×3000 is 128×6400 on the demo model (fine) and 512×25600 on SD1.5 (too much)
    demo.resolve("dragdiffusion", {}, (60, 3000))
    with pytest.raises(InvalidInput, match="work_max_side"):
        MethodTable().resolve("dragdiffusion", {}, (60, 3000))
    with pytest.raises(InvalidInput, match="unknown parameter 'no_such'"):
        MethodTable({"no_such": 1})
    with pytest.raises(InvalidInput, match="'work_size' must be"):
        MethodTable({"work_size": 1})
    assert MethodTable({"work_size": 128.0}).model_params == {"work_size": 128}  # typed


def test_the_table_decides_the_default_method_from_what_the_models_run():
    """One decision: the engine's DEFAULT_METHOD (Inpaint4Drag) where the served models run it,
    else the first method they run; a request that names none runs it, and a method the models
    cannot run is refused naming those they can."""
    assert DEFAULT_METHOD == "inpaint4drag"
    full = MethodTable()
    assert full.default_method == DEFAULT_METHOD and full.resolve("")[0] == "inpaint4drag"
    assert full.names == list(PRESETS)
    inpainting_only = MethodTable(algorithms=served_algorithms(plain_model=False))
    assert inpainting_only.names == ["inpaint4drag"] == list(inpainting_only.methods())
    assert inpainting_only.as_hello()["default_method"] == "inpaint4drag"
    assert list(inpainting_only.as_hello()["descriptions"]) == ["inpaint4drag"]
    with pytest.raises(InvalidInput, match="serves only the inpainting model: choose "
                                           "inpaint4drag"):
        inpainting_only.resolve("gooddrag")
    latent_only = MethodTable(algorithms=("dragdiffusion", "gooddrag"))  # no Inpaint4Drag
    assert latent_only.default_method == "dragdiffusion" == latent_only.resolve("")[0]
    assert latent_only.as_hello()["default_method"] in latent_only.as_hello()["methods"]
    assert "inpaint4drag" not in latent_only.names
    with pytest.raises(InvalidInput, match="does not run inpaint4drag: choose dragdiffusion"):
        latent_only.resolve("inpaint4drag")
    with pytest.raises(ValueError, match="algorithms must be"):
        MethodTable(algorithms=())


def test_the_models_own_defaults_are_checked_for_every_method_they_run():
    """A preset.json whose values fit Inpaint4Drag's work but not DragDiffusion's is refused
    at load, not at the first DragDiffusion edit."""
    heavy = {"lora_steps": 2000, "lora_batch": 16}
    with pytest.raises(InvalidInput, match="UNet passes"):
        MethodTable(heavy)
    assert MethodTable(heavy, served_algorithms(plain_model=False)).model_params == heavy


def test_only_the_default_methods_description_calls_itself_the_default():
    """The dialog shows these lines; one said "the default" after the default had changed."""
    claims = {name for name, text in DESCRIPTIONS.items() if re.search(r"\bdefault\b", text)}
    assert claims <= {DEFAULT_METHOD}, f"{sorted(claims)} say they are the default"
