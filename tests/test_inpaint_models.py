"""Inpainting models for Inpaint4Drag: tiny random models of both layouts (SD1.5-inpainting,
SDXL-inpainting) built from configs, saved, and loaded through the same path as a real one, with
an LCM-LoRA fused and a tiny VAE; served beside a plain model or instead of it. No download."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.engine.errors import EngineError, InvalidInput, ModelNotFound
from backend.engine.inpaint_models import load_inpaint_model
from backend.engine.pipeline import DragEngine
from backend.engine.random_tiny import (
    make_tiny_inpaint_model,
    make_tiny_lcm_lora,
    make_tiny_model,
    make_tiny_taesd,
)
from backend.engine.types import DragRequest

FAST = {"work_size": 64, "inpaint_steps": 4}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint-models")
    return {
        "sd15": make_tiny_inpaint_model(root / "sd15", "sd15"),
        "sd15-file": make_tiny_inpaint_model(root / "sd15-file", "sd15", single_file=True),
        "sdxl": make_tiny_inpaint_model(root / "sdxl", "sdxl"),
        "sd15-lora": make_tiny_lcm_lora(root / "sd15-lora", "sd15"),
        "sdxl-lora": make_tiny_lcm_lora(root / "sdxl-lora", "sdxl"),
        "taesd": make_tiny_taesd(root / "taesd"),
        "plain": make_tiny_model(root / "plain"),
    }


def drag(**kw) -> DragRequest:
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[20:35, 20:40] = 255
    fields = dict(image=image, handles=[(30.5, 27.5)], targets=[(55.5, 30.5)], mask=mask,
                  method="inpaint4drag", params=dict(FAST))
    fields.update(kw)
    return DragRequest(**fields)


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_an_inpainting_folder_loads_with_lcm_lora_and_tiny_vae(files, layout):
    from diffusers import AutoencoderTiny, LCMScheduler

    plain = load_inpaint_model(str(files[layout]), device="cpu")
    model = load_inpaint_model(str(files[layout]), lcm_lora=str(files[f"{layout}-lora"]),
                               tiny_vae=str(files["taesd"]), device="cpu")
    assert model.layout == layout
    assert isinstance(model.pipe.scheduler, LCMScheduler)
    assert isinstance(model.pipe.vae, AutoencoderTiny)
    assert model.pipe.unet.config.in_channels == 9
    # the LoRA is fused into the attention weights, and no adapter is left behind
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    fused, base = model.pipe.unet.state_dict()[name], plain.pipe.unet.state_dict()[name]
    assert fused.shape == base.shape and not torch.equal(fused, base)
    assert not any("lora" in key for key in model.pipe.unet.state_dict())
    # the empty prompt's embeddings, computed once at load (SDXL: and the pooled ones)
    expected = {"prompt_embeds"} | ({"pooled_prompt_embeds"} if layout == "sdxl" else set())
    assert set(model.prompt_embeds) == expected
    assert "LCM-LoRA" in model.describe() and "tiny VAE" in model.describe()


@pytest.mark.parametrize("layout,passes", [("sd15", 4), ("sdxl", 3)])
def test_inpaint4drag_runs_on_the_inpainting_model_alone(files, layout, passes):
    model = load_inpaint_model(str(files[layout]), lcm_lora=str(files[f"{layout}-lora"]),
                               tiny_vae=str(files["taesd"]), device="cpu")
    engine = DragEngine(None, inpainter=model)
    assert engine.table.names == ["inpaint4drag"]
    assert engine.table.default_method == "inpaint4drag"
    request = drag()
    result = engine.run(request)
    # 4 LCM steps; SDXL's strength 0.99 (its model default) keeps int(4 · 0.99) = 3 of them
    assert result.stats["work"]["total"] == passes == result.stats["work"]["official_total"]
    assert result.stats["filler"] == model.describe()
    changed = np.any(result.image != request.image, axis=2)
    assert changed.any() and result.stats["inpaint_pixels"] >= int(changed.sum()) // 2
    with pytest.raises(InvalidInput, match="serves only the inpainting model"):
        engine.run(drag(method="dragdiffusion"))


def test_a_single_file_inpainting_checkpoint_loads_through_the_same_path(files):
    model = load_inpaint_model(str(files["sd15-file"]), device="cpu")
    folder = load_inpaint_model(str(files["sd15"]), device="cpu")
    assert model.layout == "sd15" and model.pipe.unet.config.in_channels == 9
    for name, weight in folder.pipe.unet.state_dict().items():
        assert torch.equal(model.pipe.unet.state_dict()[name], weight), name


def test_beside_a_plain_model_the_inpainting_model_fills_and_the_others_still_run(files):
    engine = DragEngine.load(str(files["plain"]), device="cpu",
                             inpaint_model=str(files["sd15"]))
    assert "inpaint4drag" in engine.table.names and "dragdiffusion" in engine.table.names
    result = engine.run(drag())
    assert "SD1.5 inpainting" in result.stats["filler"]
    other = engine.run(drag(method="dragdiffusion", params={
        "work_size": 64, "lora_steps": 0, "n_inference_steps": 6, "drag_steps": 2}))
    assert other.image.shape == (60, 80, 3)


def test_a_plain_model_is_refused_as_an_inpainting_model(files):
    with pytest.raises(EngineError, match="not an inpainting model: its UNet takes 4 channels"):
        load_inpaint_model(str(files["plain"]), device="cpu")


def test_a_missing_inpainting_model_or_tiny_vae_says_what_to_pass(files, tmp_path):
    with pytest.raises(ModelNotFound, match="no such folder or file"):
        load_inpaint_model(str(tmp_path / "nothing-here"), device="cpu")
    with pytest.raises(ModelNotFound, match="madebyollin/taesd"):
        load_inpaint_model(str(files["sd15"]), tiny_vae=str(tmp_path), device="cpu")


def test_hugging_face_ids_come_from_the_cache_offline(files, tmp_path, monkeypatch):
    """The inpainting model, its LCM-LoRA and the tiny VAE given as ids, found in the local
    Hugging Face cache with downloading off; a missing one names the option and an example."""
    import shutil

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for repo_id, source in (("someone/tiny-inpainting", files["sd15"]),
                            ("someone/tiny-lcm-lora", files["sd15-lora"]),
                            ("someone/tiny-taesd", files["taesd"])):
        repo = tmp_path / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(source, repo / "snapshots" / ("0" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
    model = load_inpaint_model("someone/tiny-inpainting", lcm_lora="someone/tiny-lcm-lora",
                               tiny_vae="someone/tiny-taesd", device="cpu")
    local = load_inpaint_model(str(files["sd15"]), lcm_lora=str(files["sd15-lora"]),
                               device="cpu")
    for name, weight in local.pipe.unet.state_dict().items():
        assert torch.equal(model.pipe.unet.state_dict()[name], weight), name
    with pytest.raises(ModelNotFound, match="--lcm-lora") as err:
        load_inpaint_model("someone/tiny-inpainting", lcm_lora="someone/missing", device="cpu")
    assert "`hf download someone/missing --include" in str(err.value)  # that id's line
    with pytest.raises(ModelNotFound, match="--inpaint-model"):
        load_inpaint_model("someone/missing-inpainting", device="cpu")
