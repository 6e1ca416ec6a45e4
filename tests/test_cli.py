"""The command line as a user runs it: `python -m backend drag|bench|make-tiny-model`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import limits
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--set", "work_size=64", "--set", "lora_steps=0", "--set", "n_inference_steps=6",
        "--set", "drag_steps=3"]


def backend(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return limits.run([sys.executable, "-m", "backend", *args], limit=1800, cwd=ROOT, env=env,
                      capture_output=True, text=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 75, 4), dtype=np.uint8), "RGBA").save(d / "in.png")
    mask = np.zeros((50, 75), np.uint8)
    mask[5:45, 5:70] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:40]).save(d / "small-mask.png")
    (d / "not-an-image.png").write_text("hello")
    return d


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "{d}/missing.png", "--points", "1,1:5,5"], "no such file"),
        (["--image", "{d}/not-an-image.png", "--points", "1,1:5,5"], "not an image"),
        (["--image", "{d}/in.png", "--points", "100,1:5,5"], "outside the 75×50 image"),
        (["--image", "{d}/in.png", "--points", "1,1"], "is not 'x1,y1:x2,y2'"),
        (["--image", "{d}/in.png", "--points", "1,1:5,5", "--mask", "{d}/small-mask.png"],
         "must be the same size"),
        (["--image", "{d}/in.png", "--points", "1,1:5,5", "--method", "dragganx"],
         "invalid choice"),
        (["--image", "{d}/in.png", "--points", "1,1:5,5", "--set", "drag_stepz=3"],
         "unknown parameter 'drag_stepz'"),
        (["--image", "{d}/in.png", "--points", "1,1:5,5", "--model", "{d}/no-model"],
         "was not found"),
        # Inpaint4Drag: the mask is the region that moves, checked before any model loads
        (["--image", "{d}/in.png", "--points", "1,1:5,5", "--method", "inpaint4drag",
          "--model", "{d}/no-model"], "select the region that moves"),
        (["--image", "{d}/in.png", "--points", "1,1:5,5", "--method", "inpaint4drag",
          "--mask", "{d}/mask.png", "--model", "{d}/no-model"],
         "handle 1 at pixel (1, 1) is not on the selection"),
    ],
)
def test_bad_input_exits_non_zero_with_a_clear_message(files, args, message):
    args = [a.format(d=files) for a in args]
    result = backend("drag", *args, "--out", str(files / "out.png"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (files / "out.png").exists()


def test_help_explains_every_option():
    result = backend("drag", "--help")
    assert result.returncode == 0
    for option in ("--image", "--points", "--mask", "--out", "--method", "--prompt", "--seed",
                   "--model", "--vae", "--device", "--dtype", "--set", "--list-params"):
        assert option in result.stdout


def test_list_params_shows_each_knobs_default_range_and_meaning():
    result = backend("drag", "--list-params")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert "work_size = 512  (int 64..2048)" in lines
    assert "work_max_side = 0  (int 0..4096)" in lines
    meaning = lines[lines.index("work_max_side = 0  (int 0..4096)") + 1]
    assert "long side" in meaning and "0: no cap" in meaning
    from backend.engine.params import PRESETS  # one value per method, in the presets' order
    per_method = " / ".join(str(p.lora_steps) for p in PRESETS.values())
    assert f"lora_steps = {per_method}  (int 0..2000)" in lines
    # Inpaint4Drag (first: the default) has no LoRA; then the official codes' and the paper's
    assert per_method.startswith("0 / 80 / 70 / 200")
    as_json = json.loads(backend("drag", "--list-params", "--json").stdout)
    assert as_json["defaults"]["gooddrag"]["work_size"] == 512
    assert "help" in as_json["specs"]["work_max_side"]


@pytest.mark.slow
def test_drag_writes_a_full_resolution_result(files, tiny_model_dir):
    out = files / "result.png"
    result = backend("drag", "--image", str(files / "in.png"), "--points", "20,25:40,25",
                     "--mask", str(files / "mask.png"), "--model", str(tiny_model_dir),
                     "--device", "cpu", "--out", str(out), "--json", *FAST)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    edited = np.asarray(Image.open(out))
    original = np.asarray(Image.open(files / "in.png"))
    assert edited.shape == original.shape == (50, 75, 4)
    outside = np.asarray(Image.open(files / "mask.png")) == 0
    np.testing.assert_array_equal(edited[outside], original[outside])
    assert summary["unet_passes"] > 0 and len(summary["handles"]) == 1
    assert "drag" in result.stderr  # the progress bar showed the phases


def test_drag_with_inpaint4drag_moves_the_region_and_names_its_filler(files, tiny_model_dir):
    out = files / "moved.png"
    result = backend("drag", "--image", str(files / "in.png"), "--points", "20,25:40,25",
                     "--mask", str(files / "mask.png"), "--method", "inpaint4drag",
                     "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out),
                     "--json", "--set", "work_size=64", "--set", "inpaint_steps=2")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["unet_passes"] == 2 and summary["handles"] == [[40.0, 25.0]]
    assert np.asarray(Image.open(out)).shape == (50, 75, 4)


@pytest.mark.slow
def test_bench_prints_phase_times_passes_and_memory():
    result = backend("bench", "--model", "tiny", "--size", "64", "--quick", "--device", "cpu",
                     "--method", "gooddrag")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    run, summary = rows[0], rows[-1]
    assert run["method"] == "gooddrag" and run["size"] == 64
    assert {"lora", "inversion", "drag+denoise", "decode"} <= set(run["phases_s"])
    assert run["unet_passes"] > 0 and run["peak_memory_mb"] > 0
    # UNet work per phase next to the official code's, for the first edit and a re-drag.
    assert run["kind"] == "first" and run["fe_total"] == sum(run["fe"].values()) > 0
    assert run["official_fe_total"] == sum(run["official_fe"].values()) >= run["fe_total"]
    assert run["official_defaults_fe_total"] == 1102
    redrag = rows[1]
    assert redrag["kind"] == "redrag" and redrag["fe"]["lora"] == 0
    assert summary["runs"] == 2 and "redrag_over_first_fe" in summary["ratios"]["gooddrag"]


def test_make_tiny_model_writes_a_loadable_single_file(tmp_path):
    result = backend("make-tiny-model", str(tmp_path / "tiny"), "--single-file")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.suffix == ".safetensors" and path.is_file()
    assert (tmp_path / "tiny" / "model_index.json").is_file()
