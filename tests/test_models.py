"""Model loading: diffusers folders, single files (offline), the Hugging Face cache, devices."""

from __future__ import annotations

import shutil

import pytest
import torch

from backend.engine import models
from backend.engine.checkpoint import save_single_file
from backend.engine.devices import autocast, is_oom, memory_info, resolve_precision
from backend.engine.errors import EngineError, InvalidInput, ModelNotFound
from backend.engine.models import load_model
from backend.engine.random_tiny import build_tiny_pipeline, make_tiny_model
from backend.engine.sd15 import SD15_CONFIG_DIR, sd15_tokenizer


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_same_model(loaded, pipe) -> None:
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(loaded, name), getattr(pipe, name))


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def tiny_file(tiny_pipe, tmp_path_factory):
    return save_single_file(tiny_pipe, tmp_path_factory.mktemp("single") / "tiny.safetensors")


# --- devices -----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only expectations")
def test_auto_device_on_a_cpu_machine_is_cpu_fp32():
    def device_and_weights(*args):
        device, precision = resolve_precision(*args)
        return device, precision.weights

    assert device_and_weights() == (torch.device("cpu"), torch.float32)
    assert device_and_weights("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert device_and_weights("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(InvalidInput, match="--device cpu"):
        resolve_precision("cuda")
    with pytest.raises(InvalidInput, match="fp32"):
        resolve_precision("cpu", "fp16")
    with pytest.raises(InvalidInput, match="unknown device"):
        resolve_precision("tpu")
    with pytest.raises(InvalidInput, match="unknown dtype"):
        resolve_precision("cpu", "int8")


def test_out_of_memory_is_recognised():
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 17 GB)"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of range"))


def test_cpu_memory_info_and_autocast_noop():
    info = memory_info("cpu")
    assert info["rss"] > 0 and info["peak"] >= info["rss"] // 2
    with autocast("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")


# --- diffusers folders and single files ----------------------------------------------------------


def test_diffusers_folder_loads_the_saved_weights(tiny_model_dir, tiny_pipe):
    stages = []
    model = load_model(tiny_model_dir, progress=lambda *a: stages.append(a))
    assert_same_model(model, tiny_pipe)
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float32)
    assert model.vae_scale_factor == 8
    assert stages[0] == ("load", 0, 3) and stages[-1] == ("load", 3, 3)
    assert not any(p.requires_grad for p in model.unet.parameters())
    config = model.scheduler.config
    assert type(model.scheduler).__name__ == "DDIMScheduler"
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (config.clip_sample, config.set_alpha_to_one, config.steps_offset) == (False, False, 1)
    emb = model.encode_prompt("a red disc")
    assert emb.shape == (1, 77, 32)
    assert model.fingerprint == load_model(tiny_model_dir).fingerprint


def test_single_safetensors_file_loads_through_the_same_path(
    tiny_file, tiny_model_dir, tiny_pipe, tmp_path
):
    model = load_model(tiny_file)
    assert_same_model(model, tiny_pipe)
    folder = load_model(tiny_model_dir)
    assert torch.equal(model.encode_prompt("a red disc"), folder.encode_prompt("a red disc"))
    assert model.scheduler.config.steps_offset == 1
    assert model.fingerprint != folder.fingerprint
    moved = shutil.copy(tiny_file, tmp_path / "renamed.safetensors")
    assert load_model(moved).fingerprint == model.fingerprint
    # Original SD key layout, as in downloaded checkpoints.
    from safetensors import safe_open

    with safe_open(str(tiny_file), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys


def test_sd15_block_layout_round_trips(tmp_path):
    """SD1.5's UNet layout (plain first down/up blocks) at toy width survives the round trip."""
    from diffusers import UNet2DConditionModel

    pipe = build_tiny_pipeline(seed=3)
    sd15 = UNet2DConditionModel.load_config(SD15_CONFIG_DIR, subfolder="unet")
    pipe.unet = UNet2DConditionModel.from_config(
        {**sd15, "block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 32, "sample_size": 32}
    )
    path = save_single_file(pipe, tmp_path / "sd15-layout.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    for key in (  # names of real SD1.5 checkpoints
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.11.0.in_layers.2.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    ):
        assert key in keys, key
    assert_same_weights(load_model(path).unet, pipe.unet)


def test_legacy_ckpt_loads_weights_only(tiny_file, tiny_model_dir, tiny_pipe, tmp_path):
    state, _ = models.read_checkpoint(tiny_file)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, ckpt)
    model = load_model(ckpt, config=tiny_model_dir)  # no embedded configs: the folder gives them
    assert_same_model(model, tiny_pipe)


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return "payload"


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_ckpt_with_pickled_objects_is_refused(tiny_file, tiny_model_dir, tmp_path):
    state, _ = models.read_checkpoint(tiny_file)
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "callback": _Payload()}, ckpt)
    with pytest.raises(EngineError, match=r"refusing to load .* use a \.safetensors version") as info:
        load_model(ckpt, config=tiny_model_dir)
    assert not isinstance(info.value, ModelNotFound)
    assert _UNPICKLED == []


def test_damaged_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(EngineError, match=r"not a readable \.safetensors file"):
        load_model(bad)


def test_file_of_another_architecture_gives_a_clear_error(tiny_file):
    # No embedded config and no config=: the SD1.5 shapes do not fit the tiny weights.
    state, _ = models.read_checkpoint(tiny_file)
    from safetensors.torch import save_file

    plain = tiny_file.with_name("plain.safetensors")
    save_file(state, str(plain))
    with pytest.raises(EngineError, match=r"as a Stable Diffusion 1\.5 checkpoint"):
        load_model(plain)


# --- missing models -----------------------------------------------------------------------------


def test_missing_paths_raise_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound, match=r"no such folder or file; pass --model"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelNotFound, match="no such folder or file"):
        load_model("missing-model.safetensors")
    with pytest.raises(ModelNotFound, match=r"no model_index\.json"):
        load_model(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ModelNotFound, match="not a checkpoint"):
        load_model(notes)


def _fake_hub_cache(root, repo_id, source):
    """Lay out ``source`` as the cached snapshot of ``repo_id`` (huggingface_hub's format)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    revision = "0" * 40
    shutil.copytree(source, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_hugging_face_ids_come_from_the_cache_offline(tmp_path, monkeypatch, tiny_model_dir, tiny_pipe):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "someone/tiny-sd", tiny_model_dir)
    cached = load_model("someone/tiny-sd")
    assert_same_model(cached, tiny_pipe)
    assert cached.fingerprint == load_model(tiny_model_dir).fingerprint  # same weights, same id

    with pytest.raises(ModelNotFound) as info:
        load_model(models.DEFAULT_MODEL)
    message = str(info.value)
    assert models.DEFAULT_MODEL in message
    assert str(tmp_path) in message and "never downloads" in message
    assert f"`{models.download_command()}`" in message and "--model" in message
    assert "\n" not in message
    assert info.value.reason and info.value.fix and message == \
        f"{info.value.reason}; {info.value.fix}"


def test_loading_a_missing_hugging_face_id_never_downloads(tmp_path, monkeypatch, online):
    """Even with the network allowed, loading only reads the cache: a missing id is refused
    with the hf line for that id, and nothing is asked of the hub (HF_ENDPOINT points at a
    port nobody listens on: a request would fail differently, after a timeout)."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound) as info:
        load_model("someone/not-cached")
    assert "not in the Hugging Face cache" in info.value.reason
    assert "`hf download someone/not-cached --include" in info.value.fix
    assert not any(tmp_path.iterdir())  # no download started


def test_the_download_command_in_the_hint_exists_and_takes_its_options():
    """The hint once named huggingface-cli, which the pinned huggingface_hub no longer
    installs: the command it names is in this venv and accepts the arguments given."""
    import subprocess
    import sys
    from pathlib import Path

    program, verb, repo, *options = models.download_command().split(" ")
    assert (program, verb, repo) == ("hf", "download", models.DEFAULT_MODEL)
    hf = Path(sys.executable).parent / program
    assert hf.is_file(), f"{program} is not in {hf.parent}"
    usage = subprocess.run([str(hf), verb, "--help"], capture_output=True, text=True,
                           timeout=120).stdout
    assert "--include" in usage and options[0] == "--include"
    assert "model_index.json" in models.download_command()


# --- separate VAE -------------------------------------------------------------------------------


def test_separate_vae_replaces_the_model_vae(tiny_model_dir, tmp_path):
    other = build_tiny_pipeline(seed=1)
    other_dir = make_tiny_model(tmp_path / "other", seed=1)
    base = load_model(tiny_model_dir)
    for vae in (other_dir / "vae", other_dir):  # a VAE folder, or a whole model's folder
        model = load_model(tiny_model_dir, vae=vae)
        assert_same_weights(model.vae, other.vae)
        assert_same_weights(model.unet, base.unet)
        assert model.fingerprint != base.fingerprint
    single = save_single_file(other, tmp_path / "other.safetensors")
    assert_same_weights(load_model(tiny_model_dir, vae=single).vae, other.vae)
    with pytest.raises(ModelNotFound, match="--vae"):
        load_model(tiny_model_dir, vae=tmp_path / "no-vae")


# --- the shipped SD1.5 architecture ----------------------------------------------------------------


def test_shipped_sd15_configs_match_the_real_model():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = SD15_CONFIG_DIR
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg, subfolder="text_encoder"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # SD1.5's published sizes

    tokenizer = sd15_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
