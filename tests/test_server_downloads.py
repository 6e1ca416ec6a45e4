"""The backend downloads a model set when the plug-in asks (protocol 1.3 ``download``), from
a real HTTP hub on loopback (tests/hub_server.py): progress events, cancel and resume, only
catalogue names, errors as events, and the engine loaded again so the set is served without a
restart (in-thread servers with a fake engine; one real ``serve`` with tiny models)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_server import FakeEngine, client_for, running_server
from hub_server import LocalHub, tiny_catalogue
from limits import fired, safety_net

from backend.hub.catalogue import OVERRIDE_ENV, load_catalogue
from backend.hub.store import Hub, Store
from backend.model_choice import serve_plan
from protocol import wire
from protocol.client import Client, JobFailed

ROOT = Path(__file__).resolve().parents[1]
UNET = "unet/diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture
def hub(tiny_hub_repos):
    with LocalHub(tiny_hub_repos) as local:
        yield local


@pytest.fixture
def store(hub, tmp_path, monkeypatch, online):
    catalogue = tiny_catalogue(tmp_path / "catalogue.json", hub.repos)
    monkeypatch.setenv(OVERRIDE_ENV, str(catalogue))  # the default plain model is tiny/sd15
    return Store(load_catalogue(catalogue), Hub(endpoint=hub.url, cache_dir=tmp_path / "hf"))


class Loads:
    """A fake engine's loader that records the plan of every load (the first, and reloads)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.plans: list = []

    def plan(self):
        return serve_plan(store=self.store)

    def __call__(self) -> FakeEngine:
        self.plans.append(self.plan())
        return FakeEngine()


def serving(store: Store, **kwargs):
    loads = Loads(store)
    return loads, running_server(load=loads, store=store, plan=loads.plan, **kwargs)


def follow(client: Client, job_id: str, limit: float = 60) -> list:
    events = list(client.events(job_id, timeout=safety_net(limit)))
    assert events[-1].terminal
    return events


def test_hello_says_which_sets_are_here_and_what_each_method_runs_on(store):
    _, server = serving(store)
    with server as srv, client_for(srv) as client:
        models = client.hello()["models"]
    assert models["methods"] == {"dragdiffusion": ["sd15"], "gooddrag": ["sd15"],
                                 "inpaint4drag": ["instant", "instant-xl", "sd15"]}
    sd15 = models["sets"]["sd15"]
    assert sd15["state"] == "missing" and not sd15["serving"]
    assert sd15["methods"] == ["dragdiffusion", "gooddrag", "inpaint4drag"]
    # the announced size is what the download moves (the tiny catalogue's true sizes)
    assert sd15["bytes"] == sum(f.size for f in store.plan("sd15")) < 10**8
    assert sd15["licence"] == "CreativeML OpenRAIL-M"
    assert models["sets"]["instant"]["title"].startswith("Instant")
    assert models["can_download"] is True and models["location"] == str(store.location)


def test_a_download_streams_progress_and_the_set_is_served_without_a_restart(store, hub):
    loads, server = serving(store)
    with server as srv, client_for(srv) as client:
        reply = client.download("instant", job_id="get-instant")
        assert reply == {"job_id": "get-instant", "state": "queued", "duplicate": False}
        events = follow(client, "get-instant")
        info = client.hello()
    kinds = [e.type for e in events]
    assert kinds[0] == "started" and kinds[-1] == "installed"
    downloading = [e.content for e in events if e.type == "progress"
                   and e.content["phase"] in ("download", "verify")]
    total = sum(f.size for f in store.plan("instant"))
    assert {c["total"] for c in downloading} == {total}
    steps = [c["step"] for c in downloading]
    assert steps == sorted(steps) and steps[-1] == total
    assert {"file", "rate", "seconds_left"} <= set(downloading[-1])
    assert [e.content["phase"] for e in events if e.type == "progress"][-1] == "load"
    installed = events[-1].content
    assert installed["set"] == "instant" and installed["serving"] is True
    assert installed["methods"] == ["inpaint4drag"] and installed["bytes"] == total
    # The engine was loaded again, now with the downloaded inpainting set.
    assert [p.inpaint_model for p in loads.plans] == [None, "tiny/sd15-inpainting"]
    assert loads.plans[-1].lcm_lora == "tiny/lcm-lora-sdv1-5"
    assert loads.plans[-1].tiny_vae == "tiny/taesd" and loads.plans[-1].sets == ("instant",)
    assert info["model"]["state"] == "ready"
    assert info["models"]["sets"]["instant"]["state"] == "installed"
    assert info["models"]["sets"]["instant"]["serving"] is True


@pytest.mark.parametrize("name", ["https://example.com/evil.safetensors", "../../etc/passwd",
                                  "SD15", "/tmp/model"])
def test_only_catalogue_names_are_downloaded(store, hub, name):
    _, server = serving(store)
    with server as srv, client_for(srv) as client, pytest.raises(JobFailed) as err:
        client.download(name)
    assert err.value.code == wire.INVALID_INPUT
    assert err.value.message.startswith("unknown model set ")
    assert err.value.message.endswith("this backend offers sd15, instant, instant-xl, gated")
    assert hub.requests == []


def test_cancel_stops_a_download_and_asking_again_resumes_it(store, hub):
    hub.faults.rate[UNET] = 400_000
    _, server = serving(store)
    with server as srv, client_for(srv) as client:
        job = client.download("sd15")["job_id"]
        for event in client.events(job, timeout=safety_net(60)):
            if event.type == "progress" and event.content["step"] > 2 * 2**20:
                break
        else:
            pytest.fail("the download ended before it could be cancelled")
        assert client.cancel(job) == "cancelling"
        events = follow(client, job)
        assert events[-1].type == "cancelled" and events[-1].content["reason"] == "client"
        assert client.hello()["models"]["sets"]["sd15"]["state"] == "partial"
        hub.faults.rate.clear()
        again = client.download("sd15")["job_id"]
        assert follow(client, again)[-1].type == "installed"
    first, resumed = hub.gets(UNET)
    assert first is None and int(resumed[len("bytes="):-1]) >= 2**20


def test_a_second_request_for_the_same_set_follows_the_first(store, hub):
    hub.faults.rate[UNET] = 400_000
    _, server = serving(store)
    with server as srv, client_for(srv) as one, client_for(srv) as two:
        first = one.download("sd15", job_id="first")
        second = two.download("sd15", job_id="second")
        assert second == {"job_id": "first", "state": second["state"], "duplicate": True}
        assert second["state"] in ("queued", "running")
        assert two.cancel("first") == "cancelling"
        assert follow(two, "first")[-1].type == "cancelled"  # the events went to the follower
    assert first["job_id"] == "first"


def test_a_download_that_fails_ends_with_an_error_event(store, hub):
    _, server = serving(store)
    with server as srv, client_for(srv) as client:
        job = client.download("gated")["job_id"]
        with pytest.raises(JobFailed) as err:
            follow(client, job)
        assert err.value.code == wire.DOWNLOAD_FAILED and err.value.detail == "gated"
        assert err.value.message.startswith("tiny/gated-taesd is gated: open ")
        assert client.hello()["model"]["state"] == "ready"  # the backend keeps serving


def test_a_download_outlives_a_silent_client(store, hub):
    hub.faults.rate[UNET] = 2_000_000
    _, server = serving(store, client_ttl=0.5)
    with server as srv:
        with client_for(srv) as client:
            job = client.download("sd15")["job_id"]
        time.sleep(1.5)  # three times the TTL without a heartbeat
        with client_for(srv) as later:
            assert later.attach(job)["state"] in ("running", "loading", "finished")
            assert follow(later, job)[-1].type == "installed"


def test_a_backend_without_a_store_refuses_downloads():
    with running_server(FakeEngine()) as srv, client_for(srv) as client:
        assert client.hello()["models"] == {}  # (the field's default: none announced)
        with pytest.raises(JobFailed) as err:
            client.download("sd15")
    assert err.value.code == wire.INVALID_INPUT and "does not download models" in \
        err.value.message


# --- a real backend -------------------------------------------------------------------------------

@pytest.mark.slow
def test_serve_picks_up_downloaded_sets_without_a_restart(hub, tmp_path):
    """``serve`` on nothing installed (the demo model stands in), then sd15 and instant
    downloaded through the protocol: each is served at once, and an Inpaint4Drag edit runs on
    the downloaded inpainting model."""
    catalogue = tiny_catalogue(tmp_path / "catalogue.json", hub.repos)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
               DRAG_DIFFUSION_CATALOGUE=str(catalogue), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", HF_HUB_DISABLE_TELEMETRY="1")
    conn = tmp_path / "conn" / "backend.json"
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--device", "cpu",
                             "--bind", "tcp://127.0.0.1:0", "--connection-file", str(conn),
                             "--log-file", str(tmp_path / "backend.log")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=(tmp_path / "stderr.txt").open("w"), text=True)
    try:
        line = proc.stdout.readline()  # stdout has the READY line alone (the chatter: stderr)
        assert line.startswith("READY "), line + (tmp_path / "stderr.txt").read_text()[-2000:]
        assert "serving the demo model" in line
        assert "python -m backend models get sd15" in line  # the catalogue's one hint
        with Client.from_connection_file(conn, timeout=5.0) as client:
            info = client.hello()
            assert info["model"]["demo"] is True
            assert info["models"]["sets"]["sd15"]["state"] == "missing"
            # Loading only looked in the cache: the hub was asked nothing, and the log says in
            # one line why the demo model serves and how to get SD1.5 (no hf download line).
            assert hub.requests == []
            log = (tmp_path / "backend.log").read_text("utf-8")
            missing = [ln for ln in log.splitlines() if "not in the Hugging Face cache" in ln]
            assert len(missing) == 1 and "tiny/sd15" in missing[0], log[-2000:]
            assert "models get sd15" in missing[0] and "hf download" not in log
            sd15 = follow(client, client.download("sd15")["job_id"], limit=180)
            assert sd15[-1].type == "installed" and sd15[-1].content["serving"] is True
            info = client.hello()
            assert info["model"]["name"] == "tiny/sd15" and "demo" not in info["model"]
            instant = follow(client, client.download("instant")["job_id"], limit=180)
            assert instant[-1].content["serving"] is True
            info = client.hello()
            assert info["model"]["inpaint_model"].startswith("tiny/sd15-inpainting (SD1.5 "
                                                             "inpainting, LCM-LoRA")
            assert info["models"]["sets"]["instant"]["serving"] is True
            image = np.full((64, 64, 3), 200, np.uint8)
            image[16:40, 16:40] = (200, 40, 40)
            mask = np.zeros((64, 64), np.uint8)
            mask[16:40, 16:40] = 255
            job = client.submit(image, 64, 64, 3, [(28, 28)], [(36, 30)], mask=mask,
                                method="inpaint4drag", params={"work_size": 64})
            done = follow(client, job, limit=180)[-1]
            assert done.type == "finished"
            assert done.content["stats"]["filler"].startswith("tiny/sd15-inpainting")
            client.shutdown()
        proc.wait(safety_net(60))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, fired("serve to exit", 60)
