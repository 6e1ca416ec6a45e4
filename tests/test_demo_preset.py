"""A model folder's own ``preset.json``: read at load, applied as that model's defaults."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from backend.engine.errors import EngineError
from backend.engine.pipeline import LATENT_TO_RGB, DragEngine, latent_preview
from backend.engine.types import DragRequest


@pytest.fixture
def model_with_preset(tiny_model_dir, tmp_path):
    folder = tmp_path / "with-preset"
    shutil.copytree(tiny_model_dir, folder)
    rgb = [[0.0, 0.0, 0.0]] * 4
    rgb[0] = [1.0, 0.0, 0.0]
    body = {"params": {"work_size": 64, "drag_steps": 1, "lora_steps": 0,
                       "n_inference_steps": 4}, "latent_to_rgb": rgb}
    (folder / "preset.json").write_text(json.dumps(body), "utf-8")
    return folder


def _request(**params) -> DragRequest:
    image = np.full((96, 96, 3), 128, np.uint8)
    return DragRequest(image=image, handles=[(40.0, 40.0)], targets=[(48.0, 40.0)],
                       method="dragdiffusion", prompt="a disc", params=params)


def test_preset_params_become_the_models_defaults(model_with_preset, tiny_model_dir):
    engine = DragEngine.load(str(model_with_preset), device="cpu")
    assert engine.table.model_params["work_size"] == 64
    assert engine.table.methods()["gooddrag"]["work_size"] == 64
    result = engine.run(_request())
    assert result.stats["work_size"] == [64, 64]
    # the request's own value wins over the model's default
    assert engine.run(_request(work_size=128)).stats["work_size"] == [128, 128]
    # a model without the file keeps the method defaults
    plain = DragEngine.load(str(tiny_model_dir), device="cpu")
    assert plain.model.preset == {}
    assert plain.table.methods()["dragdiffusion"]["work_size"] == 512
    assert plain.model.fingerprint != engine.model.fingerprint


def test_preset_latent_map_drives_previews(model_with_preset):
    engine = DragEngine.load(str(model_with_preset), device="cpu")
    latent = torch.zeros(1, 4, 2, 2)
    latent[0, 0] = 1.0
    own = latent_preview(latent, engine.model.preset["latent_to_rgb"])
    assert own[0, 0].tolist() == [255, 128, 128]
    sd15 = latent_preview(latent)
    assert np.allclose(sd15[0, 0], np.round((LATENT_TO_RGB[0].numpy() + 1) * 127.5).clip(0, 255))


@pytest.mark.parametrize("text", ["{not json", '{"params": {"no_such_knob": 1}}',
                                  '{"params": [1]}'])
def test_a_bad_preset_is_a_clear_error(tiny_model_dir, tmp_path, text):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "preset.json").write_text(text, "utf-8")
    with pytest.raises(EngineError, match="preset"):
        DragEngine.load(str(folder), device="cpu")
