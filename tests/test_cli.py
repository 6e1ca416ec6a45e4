"""The command line as a user runs it: `python -m backend drag|bench|make-random-tiny-model`."""

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
# DragDiffusion at a few steps, named: the default method, Inpaint4Drag, reads --mask as the
# region that moves.
FAST = ["--method", "dragdiffusion", "--set", "work_size=64", "--set", "lora_steps=0",
        "--set", "n_inference_steps=6", "--set", "drag_steps=3"]


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
        (["--image", "{d}/in.png", "--points", "1,1:5,5", "--method", "dragdiffusion",
          "--model", "{d}/no-model"], "was not found"),
        # without --method the engine's default, Inpaint4Drag, which needs the region first
        (["--image", "{d}/in.png", "--points", "1,1:5,5", "--model", "{d}/no-model"],
         "select the region that moves"),
        # --model none serves only an inpainting model: Inpaint4Drag, which needs one
        (["--image", "{d}/in.png", "--points", "20,25:40,25", "--mask", "{d}/mask.png",
          "--model", "none"], "--model none needs --inpaint-model"),
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


def test_list_params_shows_each_knobs_default_range_and_meaning(tiny_model_dir):
    result = backend("drag", "--list-params", "--model", str(tiny_model_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"defaults on {tiny_model_dir}, per method: inpaint4drag, "
                               "dragdiffusion")
    assert "work_size = 512  (int 64..2048)" in lines
    assert "work_max_side = 0  (int 0..4096)" in lines
    meaning = lines[lines.index("work_max_side = 0  (int 0..4096)") + 1]
    assert "long side" in meaning and "0: no cap" in meaning
    from backend.engine.params import PRESETS  # one value per method, in the presets' order
    per_method = " / ".join(str(p.lora_steps) for p in PRESETS.values())
    assert f"lora_steps = {per_method}  (int 0..2000)" in lines
    # Inpaint4Drag (first: the default) has no LoRA; then the official codes' and the paper's
    assert per_method.startswith("0 / 80 / 70 / 200")
    as_json = json.loads(backend("drag", "--list-params", "--json", "--model",
                                 str(tiny_model_dir)).stdout)
    assert as_json["defaults"]["gooddrag"]["work_size"] == 512
    assert "help" in as_json["specs"]["work_max_side"]


def test_list_params_without_sd15_shows_the_demo_models_defaults():
    """No SD1.5 here and no downloads: the command would load the demo model, so it lists
    the demo model's defaults (its preset.json: 128 px wide), naming it."""
    result = backend("drag", "--list-params", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed["model"] == "backend/demo/model"
    assert listed["defaults"]["dragdiffusion"]["work_size"] == 128
    assert listed["defaults"]["dragdiffusion"]["reach_threshold"] == 0.5


def png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit colour)."""
    import struct
    import zlib

    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize(("name", "out", "message"), [
    ("rgb16.png", "out.png", "16 bits per channel in colour"),
    ("rgba16.png", "out.png", "16 bits per channel in colour"),
    ("gray16.png", "out.jpg", "JPEG cannot hold the result's 16-bit gray pixels"),
    ("grayf.tif", "out.png", "PNG cannot hold the result's 32-bit float gray pixels"),
    ("in.png", "out.jpg", "JPEG cannot hold the result's 8-bit RGBA pixels"),
    ("in.png", "out.xyz", "unknown image extension .xyz"),
])
def test_precision_the_command_cannot_keep_is_refused_before_any_work(files, name, out,
                                                                      message):
    """16-bit colour (PIL would read 8 bits) and an --out format that cannot hold the input's
    pixels are refused at once, saying why, before a model loads."""
    rng = np.random.default_rng(1)
    png16(files / "rgb16.png", rng.integers(0, 65536, (50, 75, 3)))
    png16(files / "rgba16.png", rng.integers(0, 65536, (50, 75, 4)))
    Image.fromarray(rng.integers(0, 65536, (50, 75)).astype(np.uint16)).save(
        files / "gray16.png")
    Image.fromarray(rng.random((50, 75), np.float32)).save(files / "grayf.tif")
    result = backend("drag", "--image", str(files / name), "--points", "1,1:5,5",
                     "--out", str(files / out))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "loading" not in result.stderr  # refused before any model
    assert not (files / out).exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gray16", "grayf"])
def test_16_bit_and_float_gray_are_kept_in_their_precision(tmp_path, tiny_model_dir, kind):
    """As the GIMP path: the result has the input's dtype, and outside the mask its bits."""
    rng = np.random.default_rng(2)
    if kind == "gray16":
        pixels = rng.integers(0, 65536, (40, 56)).astype(np.uint16)
        src, out = tmp_path / "in.png", tmp_path / "out.png"
    else:
        pixels = rng.random((40, 56), np.float32) * 1.5  # float may exceed 1
        src, out = tmp_path / "in.tif", tmp_path / "out.tif"
    Image.fromarray(pixels).save(src)
    mask = np.zeros((40, 56), np.uint8)
    mask[5:35, 5:50] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = backend("drag", "--image", str(src), "--points", "20,20:30,20", "--mask",
                     str(tmp_path / "mask.png"), "--model", str(tiny_model_dir), "--device",
                     "cpu", "--out", str(out), *FAST)
    assert result.returncode == 0, result.stderr
    edited = np.asarray(Image.open(out))
    assert edited.dtype == pixels.dtype and edited.shape == pixels.shape
    np.testing.assert_array_equal(edited[mask == 0], pixels[mask == 0])
    assert not np.array_equal(edited, pixels)  # the selection was edited


@pytest.mark.slow
def test_without_sd15_drag_uses_the_demo_model_and_says_so(files):
    """A fresh machine (no SD1.5, no downloads): drag serves the demo model, as serve does."""
    out = files / "demo-out.png"
    result = backend("drag", "--image", str(files / "in.png"), "--points", "20,25:40,25",
                     "--device", "cpu", "--out", str(out), "--json", *FAST)
    assert result.returncode == 0, result.stderr
    assert "using the demo model backend/demo/model, fit for simple shapes only" in \
        result.stderr
    assert "stable-diffusion-v1-5" in result.stderr
    assert "python -m backend models get sd15" in result.stderr  # one hint, the catalogue's
    assert "hf download" not in result.stderr
    assert out.is_file()


@pytest.mark.slow
def test_an_early_stop_is_shown_and_the_final_line_names_the_tracker(files, tiny_model_dir):
    """reach_threshold 64 grid px: the tracker finds every handle in reach at once, so the
    drag stops at its first step. Its bar stays where it stopped (not 100 %), a line says why,
    and the final line reports the tracker's positions as the tracker's."""
    out = files / "early.png"
    result = backend("drag", "--image", str(files / "in.png"), "--points", "20,25:40,25",
                     "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out),
                     *FAST, "--set", "reach_threshold=64")
    assert result.returncode == 0, result.stderr
    drag = [line.split("\r")[-1] for line in result.stderr.splitlines()
            if line.split("\r")[-1].startswith("drag:")]
    assert drag and "100%" not in drag[-1] and "1/3" in drag[-1], drag
    assert "drag stopped early (at step 1, after 0 optimisation steps): the tracker put " \
        "every handle within reach" in result.stderr
    final = result.stdout.strip().splitlines()[-1]
    assert final.startswith(f"wrote {out}; the tracker's final handle positions [[")
    assert "not a measurement" in final and "ended at" not in final


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
    assert summary["unet_passes"] > 0 and len(summary["tracked_handles"]) == 1
    assert "drag" in result.stderr  # the progress bar showed the phases


def test_drag_with_inpaint4drag_moves_the_region_and_names_its_filler(files, tiny_model_dir):
    out = files / "moved.png"
    result = backend("drag", "--image", str(files / "in.png"), "--points", "20,25:40,25",
                     "--mask", str(files / "mask.png"), "--method", "inpaint4drag",
                     "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out),
                     "--json", "--set", "work_size=64", "--set", "inpaint_steps=2")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # a warp has no point tracker, so the summary reports no tracked positions
    assert summary["unet_passes"] == 2 and summary["tracked_handles"] is None
    assert summary["targets"] == [[40.0, 25.0]]
    assert np.asarray(Image.open(out)).shape == (50, 75, 4)


@pytest.mark.slow
def test_bench_prints_phase_times_passes_and_memory():
    result = backend("bench", "--model", "random-tiny", "--size", "64", "--quick", "--device", "cpu",
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


def test_bench_drags_the_first_result_again_with_and_without_reuse():
    result = backend("bench", "--model", "random-tiny", "--size", "64", "--quick", "--device",
                     "cpu", "--method", "dragdiffusion", "--baseline", "--on-result")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    runs, summary = rows[:-1], rows[-1]
    assert [(r["reuse"], r["kind"]) for r in runs] == [
        (False, "first"), (False, "redrag"), (False, "on-result"),
        (True, "first"), (True, "redrag"), (True, "on-result")]
    before, after = runs[2], runs[5]
    # before: the result is a new image with its own LoRA; after: it inherits its source's
    assert not before["lora_inherited"] and before["fe"]["lora"] > 0
    assert after["lora_inherited"] and after["fe"]["lora"] == 0 and after["fe"]["inversion"] > 0
    # the re-drag's original branch comes from the cache: half the denoising
    assert runs[4]["fe"]["denoise"] * 2 == runs[1]["fe"]["denoise"]
    ratios = summary["ratios"]["dragdiffusion"]
    assert ratios["on_result_fe_vs_no_reuse"] < 1 and ratios["on_result_fe"] == after["fe_total"]


def test_bench_prints_the_first_edit_from_ok_with_and_without_a_prepare():
    result = backend("bench", "--model", "random-tiny", "--size", "64", "--quick", "--device",
                     "cpu", "--method", "dragdiffusion", "--prepare-seconds", "0,all")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    at_once, prepared, summary = rows
    # OK at once: the submit waits for the prepare, so next to nothing is saved (how much the
    # prepare did in the few ms before OK depends on the machine's load: only the sum is
    # asserted)
    assert at_once["ok_after"] == "at once"
    for row in (at_once, prepared):  # the prepare's work and the edit's add up to a plain edit
        assert row["fe_before_ok"] + row["fe_after_ok"] == row["no_prepare_fe"]
    # OK once prepared: only the drag and the denoising are left
    assert prepared["prepared_at_ok"] and prepared["fe_after_ok"] < prepared["no_prepare_fe"]
    fe = prepared["edit_fe_after_prepare"]
    assert fe["lora"] == fe["inversion"] == fe["reference"] == 0
    assert prepared["fe_after_ok"] == fe["drag"] + fe["denoise"]
    assert prepared["fe_after_ok"] + sum(prepared["prepare_fe"].values()) == \
        prepared["no_prepare_fe"]
    assert set(summary["ok_to_result_ratios"]) == {"dragdiffusion OK at once",
                                                   "dragdiffusion OK when prepared"}


def test_make_random_tiny_model_writes_a_loadable_single_file(tmp_path):
    result = backend("make-random-tiny-model", str(tmp_path / "tiny"), "--single-file")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.suffix == ".safetensors" and path.is_file()
    assert (tmp_path / "tiny" / "model_index.json").is_file()


def test_the_old_command_and_model_names_still_work():
    """make-tiny-model, toy, --model tiny/toy: the names before the random test model and the
    trained demo model were told apart."""
    from backend.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["make-tiny-model", "x"]).func.__name__ == "run_make_tiny_model"
    assert parser.parse_args(["toy", "eval"]).func.__name__ == "_cmd_eval"
    assert parser.parse_args(["demo", "eval"]).func.__name__ == "_cmd_eval"
    assert parser.parse_args(["bench", "--model", "tiny"]).model == "random-tiny"
    assert parser.parse_args(["precision", "--model", "toy"]).model == "demo"
    assert parser.parse_args(["gpu-check", "--model", "/a/path"]).model == "/a/path"


# --- serve --ray: the one-line errors (the Ray tier, tests/test_ray_cluster.py, runs it) ----

def test_serve_ray_without_ray_installed_says_how_to_get_it(tmp_path):
    """``import ray`` fails (``sys.modules["ray"] = None``), as without the cluster extra."""
    script = ("import sys, runpy; sys.modules['ray'] = None; sys.argv[0] = 'backend'; "
              "runpy.run_module('backend', run_name='__main__')")
    result = limits.run([sys.executable, "-c", script, "serve", "--ray", "auto",
                         "--connection-file", str(tmp_path / "backend.json"),
                         "--log-file", str(tmp_path / "backend.log")], limit=120, cwd=ROOT,
                        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                        text=True)
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and errors[0].endswith(
        "--ray needs Ray Serve, which is not installed; install the cluster extra: "
        "python install.py --cluster"), result.stderr
    assert not (tmp_path / "backend.json").exists()


@pytest.mark.parametrize(("gpus", "replicas", "message"), [
    (0, None, "the Ray cluster has no GPU: each replica needs one; start its nodes on machines "
              "with GPUs (docs/cluster.md)"),
    (2, 3, "--replicas 3 needs 3 GPUs; the Ray cluster has 2"),
    (2, -1, "--replicas -1: give at least 1"),
])
def test_serve_ray_refuses_a_cluster_without_the_gpus_it_needs(monkeypatch, gpus, replicas,
                                                               message):
    import argparse

    from backend.server import cli as server_cli
    from backend.server import ray_worker

    monkeypatch.setattr(ray_worker, "connect", lambda address: gpus)
    args = argparse.Namespace(ray="10.0.0.5:6379", replicas=replicas)
    with pytest.raises(RuntimeError) as err:
        server_cli.ray_workers(args, lambda: None)
    assert str(err.value) == message


def test_serve_ray_replicas_see_one_gpu_each():
    from backend.server.cli import replica_device

    assert [replica_device(d) for d in (None, "cuda", "cuda:1", "cpu", "mps")] == [
        None, "cuda", "cuda", "cpu", "mps"]
