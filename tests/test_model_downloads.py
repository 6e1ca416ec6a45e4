"""Model sets from a real HTTP hub on loopback: the catalogue, ``python -m backend models``,
resume after Ctrl+C and after a dropped connection, a damaged file, a gated repository, a full
disk, no network. The hub is tests/hub_server.py; huggingface_hub talks to it through
``HF_ENDPOINT`` (the command) or ``Hub(endpoint=…)`` (the store in this process)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import GOOD_TOKEN, TINY, LocalHub, tiny_catalogue
from limits import fired, run, safety_net

from backend.engine.models import DEFAULT_MODEL
from backend.hub.catalogue import ROLES, load_catalogue, size_text
from backend.hub.store import WRITE_CHUNK, Hub, HubError, Store, file_digest

ROOT = Path(__file__).resolve().parents[1]
UNET = "unet/diffusion_pytorch_model.fp16.safetensors"
VAE = "vae/diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture
def hub(tiny_hub_repos):
    with LocalHub(tiny_hub_repos) as local:
        yield local


@pytest.fixture
def catalogue_file(tmp_path, tiny_hub_repos):
    return tiny_catalogue(tmp_path / "catalogue.json", tiny_hub_repos)


@pytest.fixture
def store(hub, tmp_path, catalogue_file, online):
    return Store(load_catalogue(catalogue_file), Hub(endpoint=hub.url, cache_dir=tmp_path / "hf"))


def command_env(hub: LocalHub, home: Path, catalogue: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_OFFLINE="0",
               DRAG_DIFFUSION_CATALOGUE=str(catalogue), OMP_NUM_THREADS="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1", **extra)
    return env


def models(*args: str, env: dict[str, str], limit: float = 120) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "backend", "models", *args], env=env, cwd=ROOT,
               capture_output=True, text=True, limit=limit)


# --- the catalogue ------------------------------------------------------------------------------

def test_the_shipped_catalogue_names_what_the_engine_loads():
    catalogue = load_catalogue()
    assert list(catalogue.sets) == ["sd15", "instant", "instant-xl"]
    assert catalogue.get("sd15").piece("model").repo == DEFAULT_MODEL  # one default model
    assert catalogue.methods["inpaint4drag"] == ("instant", "instant-xl", "sd15")
    assert catalogue.get("sd15").methods == ("dragdiffusion", "gooddrag", "inpaint4drag")
    assert catalogue.get("instant").licence == ("CreativeML OpenRAIL-M, CreativeML "
                                                "OpenRAIL++-M, MIT")
    for model_set in catalogue.sets.values():
        assert model_set.approx_bytes > 0 and model_set.methods
        for piece in model_set.pieces:
            assert piece.role in ROLES and piece.licence
            names = [f for spec in piece.files for f in ([spec] if isinstance(spec, str)
                                                          else spec)]
            weights = [n for n in names if "." in n and not n.endswith((".json", "*"))]
            assert all(n.endswith(".safetensors") for n in weights), weights
            # fp16 first wherever a component has a variant
            for spec in piece.files:
                if isinstance(spec, tuple):
                    assert ".fp16." in spec[0] and ".fp16." not in spec[1]
    assert [p.role for p in catalogue.get("instant-xl").pieces] == ["inpaint_model", "lcm_lora",
                                                                    "tiny_vae"]
    assert size_text(catalogue.get("sd15").approx_bytes) == "2.13 GB"


def test_the_plan_takes_fp16_safetensors_and_leaves_the_rest(store, hub):
    planned = {f.path: f for f in store.plan("sd15")}
    assert UNET in planned and VAE in planned and "text_encoder/model.fp16.safetensors" in planned
    repo = hub.repos["tiny/sd15"].files
    left = sorted(set(repo) - set(planned))
    assert left == ["README.md", "safety_checker/config.json",
                    "safety_checker/model.fp16.safetensors", "text_encoder/model.safetensors",
                    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
                    "v1-5-pruned-emaonly.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert planned[UNET].sha256 == file_digest_of(repo[UNET])  # the hub's LFS metadata
    assert planned["model_index.json"].sha256 is None and len(planned["model_index.json"].etag) == 40


def file_digest_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# --- the command ----------------------------------------------------------------------------------

def test_list_get_verify_remove_through_the_command(hub, tmp_path, catalogue_file, store):
    total = sum(f.size for f in store.plan("sd15"))  # ~7.1 MB of tiny random weights
    env = command_env(hub, tmp_path / "hf", catalogue_file)
    listed = models("list", env=env)
    assert listed.returncode == 0, listed.stderr
    # the tiny catalogue's size is the true one: the list announces what get then moves
    assert f"sd15        not installed  about {size_text(total)}" in listed.stdout
    assert "dragdiffusion nothing installed (the backend serves its demo model): python -m " \
           "backend models get sd15" in listed.stdout

    got = models("get", "sd15", env=env)
    assert got.returncode == 0, got.stderr
    assert "sd15: installed, 10 files" in got.stdout and "checked against the hub's checksums" \
        in got.stdout
    assert f"sd15: 10 files, {size_text(total)} ({size_text(total)} to download;" in got.stderr
    assert "B/s" in got.stderr  # the bar: bytes, rate, time left
    fetched = {p for m, _, p, _ in hub.requests if m == "GET"}
    assert not fetched & {"README.md", "v1-5-pruned-emaonly.safetensors",
                          "unet/diffusion_pytorch_model.bin", "safety_checker/config.json",
                          "unet/diffusion_pytorch_model.safetensors"}

    state = json.loads(models("list", "--json", env=env).stdout)["sets"]["sd15"]
    assert state["state"] == "installed" and state["bytes"] == total
    snapshot = Path(state["pieces"][0]["path"])
    assert snapshot.parent.name == "snapshots" and (snapshot / UNET).is_symlink()
    commit = hub.repos["tiny/sd15"].commit
    assert snapshot.name == commit  # huggingface_hub's own cache layout, refs/main included
    assert (tmp_path / "hf/hub/models--tiny--sd15/refs/main").read_text() == commit
    listed = models("list", env=env).stdout
    assert "dragdiffusion sd15 (Stable Diffusion 1.5)" in listed
    assert "inpaint4drag  sd15, as a stand-in; for the real setup: python -m backend models " \
           "get instant" in listed

    again = models("get", "sd15", env=env)
    assert again.returncode == 0 and "sd15: already installed" in again.stdout
    verified = models("verify", env=env)
    assert verified.returncode == 0
    assert f"sd15: 10 files intact ({size_text(total)}, checksums match)" in verified.stdout

    removed = models("remove", "sd15", env=env)
    assert removed.returncode == 0 and "sd15: removed from the Hugging Face cache" in \
        removed.stdout and f"{size_text(total)} freed" in removed.stdout
    assert not (tmp_path / "hf/hub/models--tiny--sd15").exists()
    assert "sd15        not installed" in models("list", env=env).stdout


def test_an_unknown_set_is_one_usage_line(hub, tmp_path, catalogue_file):
    result = models("get", "sd15-turbo", env=command_env(hub, tmp_path / "hf", catalogue_file))
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: unknown model set 'sd15-turbo'; the catalogue has "
                                     "sd15, instant, instant-xl, gated")


def test_ctrl_c_keeps_what_arrived_and_the_same_command_resumes(hub, tmp_path, catalogue_file):
    hub.faults.rate[UNET] = 400_000  # 4.97 MB at 400 kB/s: about 12 s
    env = command_env(hub, tmp_path / "hf", catalogue_file)
    blobs = tmp_path / "hf/hub/models--tiny--sd15/blobs"
    # Ctrl+C as in a terminal: a suite started in the background (``cmd &`` in a script) has
    # SIGINT ignored, which its children inherit, and Python then installs no handler for it
    proc = subprocess.Popen([sys.executable, "-m", "backend", "models", "get", "sd15"], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + safety_net(60)
    partial: list[Path] = []
    while time.monotonic() < deadline:
        partial = [p for p in blobs.glob("*.incomplete") if p.stat().st_size >= 2**20]
        if partial or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert partial, fired("a partial unet file of 1 MiB", safety_net(60))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=safety_net(30))
    assert proc.returncode == 130, err
    kept = partial[0].stat().st_size
    assert "interrupted: " in err and "run `python -m backend models get sd15` again to " \
        "resume" in err
    assert kept >= 2**20 and partial[0].exists()
    assert "sd15        partial" in models("list", env=env).stdout

    hub.faults.rate.clear()
    again = models("get", "sd15", env=env)
    assert again.returncode == 0, again.stderr
    assert f"resuming {size_text(kept)} already here" in again.stderr
    ranges = hub.gets(UNET)
    assert ranges[0] is None and ranges[-1] == f"bytes={kept}-"  # only the rest came again
    assert not list(blobs.glob("*.incomplete"))
    assert models("verify", "sd15", env=env).returncode == 0


# --- the store: failures -------------------------------------------------------------------------

def test_a_dropped_connection_resumes_within_the_download(store, hub):
    hub.faults.cut[UNET] = 2_500_000  # the hub drops the connection after 2.5 MB
    result = store.get("sd15")
    assert store.installed("sd15") and not result.already
    first, second = hub.gets(UNET)
    # the resume starts within one write chunk of where the connection dropped
    assert first is None and second.startswith("bytes=")
    assert 2_500_000 - WRITE_CHUNK <= int(second[6:-1]) <= 2_500_000
    assert store.verify("sd15") == []


def test_progress_moves_in_small_steps_on_a_slow_line(store, hub):
    """At 1 MB/s the bar moves at least every 128 KiB (the write chunk), not in 1 MiB jumps:
    the reports while the UNet arrives step by at most one chunk (plus what a report
    interval of 0.1 s lets through)."""
    hub.faults.rate[UNET] = 1_000_000
    reports = []
    store.get("sd15", progress=reports.append)
    unet = [r.done for r in reports if r.file == UNET and r.phase == "download"]
    size = len(hub.repos["tiny/sd15"].files[UNET])
    steps = [b - a for a, b in itertools.pairwise(unet) if b > a]
    assert WRITE_CHUNK <= 2**18 and size > 8 * WRITE_CHUNK
    assert len(steps) >= size // (2 * WRITE_CHUNK), (len(steps), size)
    assert max(steps) <= 2 * WRITE_CHUNK, max(steps)
    assert any(r.rate > 0 and r.seconds_left is not None for r in reports if r.file == UNET)


def test_a_damaged_file_is_fetched_again_once(store, hub):
    hub.faults.corrupt[VAE] = 1
    store.get("sd15")
    assert hub.gets(VAE) == [None, None]  # damaged, so fetched whole once more
    assert store.verify("sd15") == []


def test_a_file_damaged_twice_is_refused(store, hub, tmp_path):
    hub.faults.corrupt[VAE] = 2
    with pytest.raises(HubError) as err:
        store.get("sd15")
    assert err.value.kind == "corrupt"
    assert str(err.value) == (f"{VAE} of tiny/sd15 arrived damaged twice (its checksum differs "
                              "from the hub's); try again later, and report it if it persists")
    assert not store.installed("sd15")
    assert not list((tmp_path / "hf").rglob("*.incomplete"))  # nothing damaged is kept


def test_a_gated_repository_says_how_to_get_access(hub, tmp_path, catalogue_file, store):
    env = command_env(hub, tmp_path / "hf-cmd", catalogue_file)
    result = models("get", "gated", env=env)
    assert result.returncode == 1
    line = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line == [f"error: tiny/gated-taesd is gated: open {hub.url}/tiny/gated-taesd, log in "
                    "and accept its licence (test licence), then log in here with `hf auth "
                    "login` (or set HF_TOKEN) and run the download again"]
    wrong = models("get", "gated", env={**env, "HF_TOKEN": "hf_not_allowed"})
    assert wrong.returncode == 1 and "is gated: open" in wrong.stderr  # 403: not accepted yet
    allowed = models("get", "gated", env={**env, "HF_TOKEN": GOOD_TOKEN})
    assert allowed.returncode == 0, allowed.stderr
    assert "gated: installed, 2 files" in allowed.stdout


def test_not_enough_disk_space_is_refused_before_anything_moves(store, hub):
    hub.faults.advertise[UNET] = 10**15  # the hub's metadata says 1 PB
    with pytest.raises(HubError) as err:
        store.get("sd15")
    assert err.value.kind == "disk"
    assert str(err.value).startswith(f"not enough disk space for sd15 in {store.location}: it "
                                     "needs 1000 TB more and ")
    assert "download to another disk with --to FOLDER (or set HF_HOME there)" in str(err.value)
    assert [r for r in hub.requests if r[0] == "GET"] == []


def test_no_network_and_offline_mode_are_said_plainly(tmp_path, catalogue_file, online,
                                                      monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = Store(load_catalogue(catalogue_file),
                  Hub(endpoint=f"http://127.0.0.1:{port}", cache_dir=tmp_path / "hf"))
    with pytest.raises(HubError) as err:
        store.get("sd15")
    assert err.value.kind == "network"
    assert str(err.value).startswith(f"cannot reach the Hugging Face hub at "
                                     f"http://127.0.0.1:{port} (")
    assert str(err.value).endswith("then run the download again: it resumes where it stopped")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as err:
        store.get("sd15")
    assert err.value.kind == "offline" and "HF_HUB_OFFLINE is set" in str(err.value)


# --- verify and folders -------------------------------------------------------------------------

def test_verify_finds_a_damaged_file_and_repair_fetches_it(hub, tmp_path, catalogue_file):
    env = command_env(hub, tmp_path / "hf", catalogue_file)
    assert models("get", "sd15", env=env).returncode == 0
    blob = (tmp_path / f"hf/hub/models--tiny--sd15/snapshots/{hub.repos['tiny/sd15'].commit}/"
            f"{UNET}").resolve()
    data = bytearray(blob.read_bytes())
    data[1000] ^= 1
    blob.write_bytes(bytes(data))
    found = models("verify", "sd15", env=env)
    assert found.returncode == 1
    assert f"sd15: tiny/sd15 {UNET}: damaged: its checksum differs from the hub's" in found.stdout
    assert "run `python -m backend models verify sd15 --repair`" in found.stdout
    fixed = models("verify", "sd15", "--repair", env=env)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert len(hub.gets(UNET)) == 2 and file_digest(blob) == blob.name
    assert models("verify", "sd15", env=env).returncode == 0


def test_a_folder_download_is_a_plain_diffusers_folder(hub, tmp_path, catalogue_file, online):
    folder = tmp_path / "models"
    store = Store(load_catalogue(catalogue_file), Hub(endpoint=hub.url), folder=folder)
    store.get("sd15")
    sd15 = folder / "sd15"
    assert sorted(p.relative_to(sd15).as_posix() for p in sd15.rglob("*") if p.is_file()) == [
        ".drag-diffusion.json", "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "unet/config.json",
        UNET, "vae/config.json", VAE]
    assert store.installed("sd15") and store.verify("sd15") == []
    from backend.engine.models import load_model

    model = load_model(str(sd15), device="cpu", dtype="fp32")  # the fp16 files, as fp32
    assert model.unet.config.in_channels == 4 and str(model.dtype) == "torch.float32"
    (sd15 / VAE).write_bytes(b"\0" + (sd15 / VAE).read_bytes()[1:])
    assert [(p.path, p.what) for p in store.verify("sd15")] == [
        (VAE, "damaged: its checksum differs from the hub's")]

    cmd = command_env(hub, tmp_path / "hf-unused", catalogue_file)
    result = models("get", "sd15", "--to", str(tmp_path / "other"), env=cmd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"Serve them with: python -m backend serve --model "
                                          f"{tmp_path / 'other' / 'sd15'}")


def test_the_tiny_stand_ins_cover_the_catalogue():
    shipped = load_catalogue()
    stood_in = {p.repo for name in ("sd15", "instant") for p in shipped.get(name).pieces}
    assert stood_in == set(TINY)
