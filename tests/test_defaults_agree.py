"""The dialog's numbers are the ones that run (issue 28).

A real backend (server + ``DragEngine``) with the demo model (its preset.json: 128 px wide) and
with a model in SD1.5's layout (no preset: 512 px): the plug-in's ``dragdiff_params`` builds its
table from that backend's ``hello``, and every knob it shows equals what the engine runs; what
the plug-in sends for the shown values runs exactly so, and a value equal to the shown default
of another table (512 on the demo model) runs at that value.
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_server import client_for, running_server
from plugin_modules import load

from backend.engine.pipeline import DragEngine
from backend.model_choice import DEMO_MODEL_DIR

par = load("dragdiff_params")

# Typed by the "user" to keep a real edit short; the working size stays the shown default.
QUICK = {"lora-steps": 0, "drag-steps": 2, "n-inference-steps": 4}
SIZE = 64  # the layer: a square, so the working canvas is work_size × work_size


@pytest.fixture(scope="module", params=["demo", "sd15-layout"])
def backend(request, tiny_model_dir):
    """(engine, hello, the DragParams of each edit it ran) for one model."""
    path = DEMO_MODEL_DIR if request.param == "demo" else tiny_model_dir
    engine = DragEngine.load(str(path), device="cpu")
    ran = []
    run = engine._run

    def spy(req, algorithm, params, *args, **kwargs):
        ran.append(params)
        return run(req, algorithm, params, *args, **kwargs)

    engine._run = spy
    with running_server(engine) as server, client_for(server, timeout=10) as client:
        yield request.param, engine, client, ran


def dialog(client):
    """The dialog's table from the live hello, as the plug-in builds it."""
    table = par.load_table(client.hello(), {}, {})
    assert table is not None and table.source == "backend"
    return table


def edit(client, method: str, sent: dict):
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    job = client.submit(pixels.tobytes(), SIZE, SIZE, 3, [(20.5, 30.5)], [(28.5, 30.5)],
                        method=method, params=sent)
    events = list(client.events(job, timeout=600))
    assert events[-1].type == "finished", events[-1]
    return events[-1]


def test_every_shown_default_is_what_the_engine_runs(backend):
    name, engine, client, _ = backend
    table = dialog(client)
    assert set(table.methods) == set(engine.table.methods())
    assert table.default_method in table.methods
    for method in table.methods:
        shown = par.shown_values(table, method, {k.prop: par.DEFAULT for k in par.KNOBS})
        runs = engine.table.resolve(method)[1]  # nothing sent: the engine's own defaults
        for knob in par.KNOBS:
            assert shown[knob.prop] == pytest.approx(getattr(runs, knob.param)), (method, knob)
        # sending what is shown changes nothing, and the estimate's width is the run's
        sent = par.overrides(shown, "")
        assert engine.table.resolve(method, sent)[1] == runs
        assert par.working_width(table.resolved(method, sent)) == runs.work_size
    expected = 128 if name == "demo" else 512
    assert table.default(table.default_method, "work_size") == expected


@pytest.mark.slow
def test_an_edit_runs_at_the_values_the_dialog_showed(backend):
    _, _, client, ran = backend
    table = dialog(client)
    method = table.default_method
    values = par.shown_values(table, method, {k.prop: par.DEFAULT for k in par.KNOBS}) | QUICK
    done = edit(client, method, par.overrides(values, ""))
    params = ran[-1]
    for knob in par.KNOBS:
        assert getattr(params, knob.param) == pytest.approx(values[knob.prop]), knob
    width = int(values["work-size"])
    assert done.content["stats"]["work_size"] == [width, width]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["demo"], indirect=True)
def test_choosing_512_on_the_demo_model_runs_at_512(backend):
    """512 is the bare presets' default (what install.json held before): typed into the demo
    model's dialog, it is sent and runs, although the model's own default is 128."""
    _, _, client, ran = backend
    table = dialog(client)
    method = table.default_method
    values = par.shown_values(table, method, {k.prop: par.DEFAULT for k in par.KNOBS}) | QUICK
    assert values["work-size"] == 128
    values["work-size"] = 512
    sent = par.overrides(values, "")
    assert sent["work_size"] == 512
    done = edit(client, method, sent)
    assert ran[-1].work_size == 512
    assert done.content["stats"]["work_size"] == [512, 512]
