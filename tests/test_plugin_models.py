"""The dialog's model lines outside GIMP: which sets it offers for the chosen method, the
download's progress as text (dragdiff_models.py), and the plug-in's own backend link asking a
real server to download from a loopback hub, following the events, cancelling, and reading the
hello again so the method runs on the new set (dragdiff_backend.PreviewLink)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fixtures_server import FakeEngine, running_server
from hub_server import LocalHub, tiny_catalogue
from limits import safety_net
from plugin_modules import load

from backend.hub.catalogue import OVERRIDE_ENV, load_catalogue
from backend.hub.store import Hub, Store
from backend.model_choice import serve_plan
from protocol import connection

models = load("dragdiff_models")
db = load("dragdiff_backend")

ROOT = Path(__file__).resolve().parents[1]
UNET = "unet/diffusion_pytorch_model.fp16.safetensors"


def hello(**sets: str) -> dict:
    """A 1.3 hello whose sets have the given states."""
    titles = {"sd15": "Stable Diffusion 1.5", "instant": "Instant set",
              "instant-xl": "Instant XL set"}
    return {"protocol_version": "1.3", "models": {
        "can_download": True,
        "methods": {"dragdiffusion": ["sd15"], "inpaint4drag": ["instant", "instant-xl", "sd15"]},
        "sets": {name: {"title": titles[name], "state": state, "bytes": 2_135_000_000,
                        "licence": "CreativeML OpenRAIL-M"} for name, state in sets.items()}}}


def test_a_method_is_offered_the_sets_better_than_its_best_installed_one():
    info = hello(sd15="missing", instant="partial", **{"instant-xl": "missing"})
    assert [line.name for line in models.missing_lines(info, "inpaint4drag")] == [
        "instant", "instant-xl", "sd15"]
    assert [line.name for line in models.missing_lines(info, "dragdiffusion")] == ["sd15"]
    info = hello(sd15="installed", instant="missing", **{"instant-xl": "installed"})
    assert [line.name for line in models.missing_lines(info, "inpaint4drag")] == ["instant"]
    assert models.missing_lines(info, "dragdiffusion") == []
    assert models.missing_lines(info, "gooddrag") == []  # the backend names no set for it
    line = models.missing_lines(hello(sd15="partial"), "dragdiffusion")[0]
    assert line.text() == ("Stable Diffusion 1.5: 2.1 GB, partly downloaded, licence "
                           "CreativeML OpenRAIL-M")
    assert models.manual_text(line).endswith("run python -m backend models get sd15 where the "
                                             "backend runs.")


def test_the_heading_names_the_method_as_the_method_menu_does():
    """The menu's labels come from dragdiff_params.method_label (drag-diffusion.py adds each
    choice with it); the heading uses the same, not the internal name."""
    params = load("dragdiff_params")
    assert models.heading_text("dragdiffusion") == "Models for DragDiffusion"
    assert models.heading_text("inpaint4drag") == "Models for Inpaint4Drag (instant)"
    assert models.heading_text("dragdiffusion-paper") == \
        f"Models for {params.method_label('dragdiffusion-paper')}"
    assert models.heading_text("some-new-method") == "Models for some-new-method"
    menu = (ROOT / "gimp_plugin" / "drag-diffusion" / "drag-diffusion.py").read_text("utf-8")
    assert "par.method_label(method)" in menu and "METHOD_LABELS" not in menu


def test_only_a_1_3_backend_that_is_online_is_asked_to_download():
    assert models.can_download(hello(sd15="missing"))
    assert not models.can_download({**hello(sd15="missing"), "protocol_version": "1.2"})
    offline = hello(sd15="missing")
    offline["models"]["can_download"] = False
    assert not models.can_download(offline)
    assert not models.can_download({"protocol_version": "1.3", "models": {}})
    assert not models.can_download(None) and models.missing_lines(None, "gooddrag") == []


def test_progress_reads_bytes_rate_and_time_left():
    fraction, text = models.progress_text({"phase": "download", "step": 412_000_000,
                                           "total": 2_135_000_000, "rate": 35_200_000,
                                           "seconds_left": 48.6, "file": "unet/x"})
    assert fraction == pytest.approx(0.193, abs=1e-3)
    assert text == "Downloading: 412 MB of 2.1 GB, 35 MB/s, about 49 s left"
    assert models.progress_text({"phase": "download", "step": 0, "total": 10, "rate": 0,
                                 "seconds_left": None}) == (0.0, "Downloading: 0 B of 10 B")
    assert models.progress_text({"phase": "verify", "step": 5e9, "total": 5e9,
                                 "file": "unet/x"}) == (1.0, "Verifying unet/x (5.0 GB of "
                                                             "5.0 GB)")
    assert models.progress_text({"phase": "load", "step": 0, "total": 1})[0] is None
    assert models.time_text(3725) == "1 h 02 min" and models.time_text(75) == "1 min 15 s"


# --- the plug-in's link and a real server ---------------------------------------------------------

@pytest.fixture
def store(tiny_hub_repos, tmp_path, monkeypatch, online):
    catalogue = tiny_catalogue(tmp_path / "catalogue.json", tiny_hub_repos)
    monkeypatch.setenv(OVERRIDE_ENV, str(catalogue))
    with LocalHub(tiny_hub_repos) as hub:
        yield hub, Store(load_catalogue(catalogue), Hub(endpoint=hub.url,
                                                        cache_dir=tmp_path / "hf"))


@pytest.fixture
def link(store, tmp_path, monkeypatch):
    hub, the_store = store
    path = tmp_path / "backend.json"
    monkeypatch.setenv(connection.CONNECTION_ENV, str(path))
    with running_server(load=FakeEngine, connection_file=path, store=the_store,
                        plan=lambda: serve_plan(store=the_store)):
        plugin_link = db.PreviewLink("")
        yield hub, plugin_link
        plugin_link.close()


def follow(link, job: str) -> list:
    events, deadline = [], time.monotonic() + safety_net(60)
    while not events or not events[-1].terminal:
        assert time.monotonic() < deadline, "the download did not end"
        events += link.download_events(job)
    return events


def test_the_dialog_s_download_ends_with_the_set_served_and_the_line_gone(link):
    _, plugin_link = link
    assert plugin_link.can_download
    assert [x.name for x in models.missing_lines(plugin_link.info, "inpaint4drag")] == [
        "instant", "instant-xl", "sd15"]
    job = plugin_link.download("instant")
    events = follow(plugin_link, job)
    texts = [models.progress_text(e.content)[1] for e in events if e.type == "progress"]
    assert texts[0].startswith("Downloading: ") and " of " in texts[0]
    assert texts[-1] == "Downloaded and verified; the backend is loading it…"
    assert events[-1].type == "installed" and events[-1].content["serving"]
    assert models.installed_text(events[-1].content, "Instant set") == (
        "Instant set is installed and the backend runs on it now.")
    info = plugin_link.refresh()
    assert info["models"]["sets"]["instant"]["state"] == "installed"
    assert models.missing_lines(info, "inpaint4drag") == []  # the method runs on it: no line


def test_cancel_from_the_dialog_keeps_what_arrived_and_download_again_resumes(link):
    hub, plugin_link = link
    hub.faults.rate[UNET] = 400_000
    job = plugin_link.download("sd15")
    assert plugin_link.download("sd15") == job  # a second click follows the same download
    seen = []
    while not any(e.type == "progress" and e.content["step"] > 2**20 for e in seen):
        seen += plugin_link.download_events(job)
        assert not (seen and seen[-1].terminal), "the download ended before the cancel"
    plugin_link.cancel_download(job)
    assert follow(plugin_link, job)[-1].type == "cancelled"
    line = models.missing_lines(plugin_link.refresh(), "dragdiffusion")[0]
    assert line.state == "partial" and "partly downloaded" in line.text()
    hub.faults.rate.clear()
    assert follow(plugin_link, plugin_link.download("sd15"))[-1].type == "installed"
    first, resumed = hub.gets(UNET)
    assert first is None and resumed.startswith("bytes=")


def test_a_failed_download_is_one_line_for_the_dialog(link):
    _, plugin_link = link
    job = plugin_link.download("gated")
    with pytest.raises(db.BackendError, match=r"^tiny/gated-taesd is gated: open "):
        follow(plugin_link, job)
    with pytest.raises(db.BackendError, match=r"^unknown model set 'nope'"):
        plugin_link.download("nope")
    assert plugin_link.refresh()["model"]["state"] == "ready"  # the backend keeps serving
