"""Which model a command serves (backend/model_choice.py): one decision for serve, drag and
install.py — the model asked for, else SD1.5, else the demo model when SD1.5 is missing."""

from __future__ import annotations

import shutil

import pytest

from backend.engine.errors import ModelNotFound
from backend.engine.models import DEFAULT_MODEL
from backend.engine.types import DEFAULT_METHOD
from backend.model_choice import (
    DEMO_MODEL_DIR,
    DEMO_NAME,
    NO_PLAIN_MODEL,
    demo_fallback,
    expected_algorithms,
    expected_model,
    load_or_demo,
    plain_model,
)


def missing():
    raise ModelNotFound("stable-diffusion-v1-5 was not found in the cache")


def test_only_the_default_model_falls_back():
    assert demo_fallback("my/model", lambda path: path) is None  # --model given: an error
    fallback = demo_fallback(None, lambda path: f"loaded {path}")
    assert fallback.name == DEMO_NAME and fallback.load() == f"loaded {DEMO_MODEL_DIR}"
    assert fallback.notice().startswith(f"serving the demo model {DEMO_NAME}, fit for simple")
    assert fallback.notice("using").startswith(f"using the demo model {DEMO_NAME}")


def test_load_or_demo_serves_the_model_or_the_demo_and_says_why():
    fallback = demo_fallback(None, lambda path: "demo")
    assert load_or_demo(lambda: "sd15", fallback) == ("sd15", None)
    assert load_or_demo(missing, fallback) == ("demo", "stable-diffusion-v1-5 was not found "
                                                       "in the cache")
    with pytest.raises(ModelNotFound, match="not found in the cache"):
        load_or_demo(missing, None)  # an explicit --model: no stand-in
    with pytest.raises(RuntimeError):  # anything but a missing model is not a reason to swap
        load_or_demo(lambda: (_ for _ in ()).throw(RuntimeError("bad weights")), fallback)

    def broken(path):
        raise OSError("demo folder unreadable")

    with pytest.raises(ModelNotFound, match=r"not found in the cache; and backend/demo/model "
                                            r"failed to load: OSError: demo folder unreadable"):
        load_or_demo(missing, demo_fallback(None, broken))


def test_the_expected_model_and_its_table_are_read_without_loading(tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # no SD1.5 in this cache
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    name, table = expected_model(None)  # no SD1.5, no downloads: the demo model
    assert name == DEMO_NAME and table.model_params == {"work_size": 128,
                                                        "reach_threshold": 0.5}
    name, table = expected_model(str(tiny_model_dir))  # a folder without preset.json
    assert name == str(tiny_model_dir) and table.model_params == {}
    own = tmp_path / "with-preset"
    shutil.copytree(tiny_model_dir, own)
    (own / "preset.json").write_text('{"params": {"work_size": 256}}', "utf-8")
    assert expected_model(str(own))[1].model_params == {"work_size": 256}
    # a missing --model: loading will report it; no table of its own
    assert expected_model(str(tmp_path / "nothing-here"))[1].model_params == {}
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online changes nothing: loading never downloads
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert expected_model(None)[0] == DEMO_NAME


def test_model_none_serves_only_inpaint4drag_and_its_table_says_so():
    """``--model none`` (with ``--inpaint-model``): no plain model, so the announced table
    runs Inpaint4Drag alone and offers it first; any other model runs every method."""
    assert plain_model(None) == DEFAULT_MODEL and plain_model("my/model") == "my/model"
    assert plain_model("none") is None and plain_model(" None ") is None
    assert expected_algorithms("none") == ("inpaint4drag",)
    assert "dragdiffusion" in expected_algorithms(None) and "gooddrag" in expected_algorithms("x")
    name, table = expected_model("none")
    assert name == NO_PLAIN_MODEL and list(table.methods()) == ["inpaint4drag"]
    assert table.default_method == "inpaint4drag" == DEFAULT_METHOD
