"""The dialog's live warp preview for Inpaint4Drag, outside GIMP: what it sends (the layer
scaled to 512 px, the points with it), when it asks again, and the answer from a real server
through the plug-in's own backend link (dragdiff_preview.py, dragdiff_backend.PreviewLink)."""

from __future__ import annotations

import numpy as np
import pytest
import warp_cases as wc
from fixtures_server import FakeEngine, running_server
from plugin_modules import load

from backend.engine.inpaint4drag import preview_warp
from backend.engine.types import DEFAULT_METHOD
from protocol import connection

pre = load("dragdiff_preview")
db = load("dragdiff_backend")
geo = load("dragdiff_geometry")


def test_the_preview_warps_the_layer_scaled_to_512_px():
    assert pre.preview_scale(4000, 3000) == pytest.approx(0.128)
    assert pre.scaled_size(4000, 3000, 0.128) == (512, 384)
    assert pre.preview_scale(300, 200) == 1.0  # small layers as they are
    assert pre.scale_points([(2000.5, 1500.0), (4000.0, 0.0)], 0.128, 512, 384) == [
        (256.064, 192.0), (512.0, 0.0)]


def test_it_asks_again_only_when_something_it_depends_on_changed():
    state = pre.PreviewState()
    inputs = pre.PreviewInputs(b"\0" * 12, 2, 2, 3, b"\xff" * 4, [(0.5, 0.5)], [(1.5, 1.5)])
    assert state.changed(inputs.key(), "inpaint4drag", {"inpaint_kernel": 5})
    assert not state.changed(inputs.key(), "inpaint4drag", {"inpaint_kernel": 5})
    # a knob the warp does not read changes nothing; the kernel, the drags or the mask do
    assert not state.changed(inputs.key(), "inpaint4drag", {"inpaint_kernel": 5,
                                                            "inpaint_steps": 4})
    assert state.changed(inputs.key(), "inpaint4drag", {"inpaint_kernel": 9})
    moved = pre.PreviewInputs(b"\0" * 12, 2, 2, 3, b"\xff" * 4, [(0.5, 0.5)], [(1.0, 1.5)])
    assert state.changed(moved.key(), "inpaint4drag", {"inpaint_kernel": 9})
    state.forget()
    assert state.changed(moved.key(), "inpaint4drag", {"inpaint_kernel": 9})


def test_only_inpaint4drag_reads_the_selection_as_the_region_that_moves():
    assert pre.region_moves("inpaint4drag")
    assert not pre.region_moves("dragdiffusion") and not pre.region_moves("gooddrag")
    with pytest.raises(geo.InputError, match="region that moves"):
        geo.selection_region(None, geo.Rect(0, 0, 8, 8), moves=True)
    assert geo.selection_region(None, geo.Rect(0, 0, 8, 8)) is None  # may all change
    assert geo.mask_or_none(b"\xff" * 4, moves=True) == b"\xff" * 4  # the whole layer moves
    assert geo.mask_or_none(b"\xff" * 4) is None
    with pytest.raises(geo.InputError, match="region that moves"):
        geo.mask_or_none(b"\0" * 4, moves=True)


def test_only_a_1_1_backend_is_asked_for_the_warp():
    assert pre.supports_warp({"protocol_version": "1.1"})
    assert pre.supports_warp({"protocol_version": "2.0"})
    assert not pre.supports_warp({"protocol_version": "1.0"})
    assert not pre.supports_warp(None) and not pre.supports_warp({"protocol_version": "x"})


def test_the_caption_counts_layer_pixels_and_passes_warnings_on():
    text = pre.caption({"moved_pixels": 100, "inpaint_pixels": 25, "warnings": ["w"]}, 0.5)
    assert "400 pixels move" in text and "(100 pixels)" in text and text.endswith(" w")


@pytest.fixture
def backend_link(tmp_path, monkeypatch):
    path = tmp_path / "backend.json"
    monkeypatch.setenv(connection.CONNECTION_ENV, str(path))
    with running_server(FakeEngine(), connection_file=path):
        link = db.PreviewLink("")
        yield link
        link.close()


def test_the_plug_in_s_link_gets_the_engine_s_warp(backend_link):
    assert backend_link.can_warp and backend_link.info["default_method"] == DEFAULT_METHOD
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = (wc.disc((48, 64), 20, 22, 9) * 255).astype(np.uint8)
    inputs = pre.PreviewInputs(rgb.tobytes(), 64, 48, 3, mask.tobytes(), [(20.5, 22.5)],
                               [(40.5, 30.5)])
    pixels, figures = backend_link.warp(inputs, {"inpaint_kernel": 5, "inpaint_steps": 2})
    expected, _, _ = preview_warp(rgb, mask, [(20.5, 22.5)], [(40.5, 30.5)],
                                  {"inpaint_kernel": 5}, overlay=True)
    assert pixels == expected.tobytes()
    assert figures["moved_pixels"] > 0 and figures["inpaint_pixels"] > 0
    off = pre.PreviewInputs(rgb.tobytes(), 64, 48, 3, mask.tobytes(), [(2.5, 2.5)],
                            [(40.5, 30.5)])
    with pytest.raises(db.BackendError, match="not on the selection"):
        backend_link.warp(off, {})
    with pytest.raises(db.BackendError, match="Select the region that moves"):
        backend_link.warp(pre.PreviewInputs(rgb.tobytes(), 64, 48, 3, None, [], []), {})


def test_without_a_backend_the_link_stays_quietly_unconnected(tmp_path, monkeypatch):
    monkeypatch.setenv(connection.CONNECTION_ENV, str(tmp_path / "none.json"))
    link = db.PreviewLink("", timeout=0.2)
    assert link.info is None and not link.can_warp
    link.close()
