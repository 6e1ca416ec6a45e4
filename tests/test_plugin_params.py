"""The dialog's parameters (dragdiff_params.py): defaults from the backend's table, knobs that
follow the method, what is remembered and what is sent."""

from __future__ import annotations

import json

import pytest
from plugin_modules import load

from backend.engine.params import PRESETS, MethodTable

par = load("dragdiff_params")
DEFAULT = par.DEFAULT


def hello_table() -> dict:
    """The parameter part of the backend's hello reply, as the engine builds it."""
    return MethodTable().as_hello()


@pytest.fixture
def table():
    return par.ParamTable.parse(hello_table(), "backend")


def test_knob_defaults_come_from_the_backends_table(table):
    for knob in par.KNOBS:
        for method, preset in PRESETS.items():
            assert table.default(method, knob.param) == getattr(preset, knob.param), (method, knob)
    assert table.describe("gooddrag").startswith("GoodDrag: alternates small drags")
    assert table.specs["lora_steps"].help.startswith("training steps of the identity LoRA")


def test_the_plugin_keeps_no_copy_of_the_defaults():
    """The defaults live in backend/engine/params.py only (issue 15.5)."""
    import re

    from plugin_modules import PLUGIN_DIR

    for path in sorted(PLUGIN_DIR.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "METHOD_DEFAULTS" not in text, path.name
        assert not re.search(r"[\"']lora_steps[\"']\s*:\s*\d", text), path.name


def test_table_sources_newest_first(table):
    live = hello_table()
    remembered = {"methods": {"dragdiffusion": {"method": "dragdiffusion", "lora_steps": 5}}}
    recorded = {"methods": {"dragdiffusion": {"method": "dragdiffusion", "lora_steps": 7}}}
    assert par.load_table(live, {"hello": remembered}, {"parameters": recorded}).source == \
        "backend"
    got = par.load_table(None, {"hello": remembered}, {"parameters": recorded})
    assert got.source == "last backend contact" and got.default("dragdiffusion",
                                                                 "lora_steps") == 5
    got = par.load_table(None, {}, {"parameters": recorded})
    assert got.source == "install.json" and got.default("dragdiffusion", "lora_steps") == 7
    assert par.load_table(None, {}, {}) is None
    assert par.load_table({"device": "cpu"}, {}, {}) is None  # a hello without a table


def test_minus_one_shows_the_methods_real_default(table):
    values = {k.prop: DEFAULT for k in par.KNOBS} | {"drag-steps": 12}
    shown = par.shown_values(table, "gooddrag", values)
    assert shown["lora-steps"] == PRESETS["gooddrag"].lora_steps
    assert shown["inversion-strength"] == PRESETS["gooddrag"].inversion_strength
    assert shown["drag-steps"] == 12
    assert all(v >= 0 for v in shown.values())


def test_knobs_follow_the_method_unless_typed(table):
    shown = par.shown_values(table, "dragdiffusion", {k.prop: DEFAULT for k in par.KNOBS})
    shown["drag-steps"] = 12  # typed by the user
    after = par.follow_method(table, "dragdiffusion", "gooddrag", shown)
    assert after["lora-steps"] == PRESETS["gooddrag"].lora_steps  # 80 -> 70
    assert after["latent-lr"] == PRESETS["gooddrag"].latent_lr
    assert after["drag-steps"] == 12
    back = par.follow_method(table, "gooddrag", "dragdiffusion-paper", after)
    assert back["lora-steps"] == PRESETS["dragdiffusion-paper"].lora_steps


def test_every_shown_value_is_sent_defaults_included(table):
    """A value equal to the shown default is sent, so it runs even when the backend's own
    default differs from the table the dialog had (issue 28: 512 on the demo model)."""
    shown = par.shown_values(table, "gooddrag", {k.prop: DEFAULT for k in par.KNOBS})
    sent = par.overrides(shown, "")
    assert sent == {k.param: getattr(PRESETS["gooddrag"], k.param) for k in par.KNOBS}
    shown["lora-steps"] = 3
    shown["lam"] = 0.5
    sent = par.overrides(shown, json.dumps({"r-m": 2, "feather": 4}))
    assert sent["lora_steps"] == 3 and sent["lam"] == 0.5 and sent["work_size"] == 512
    assert sent["r_m"] == 2 and sent["feather"] == 4
    assert isinstance(sent["lora_steps"], int) and isinstance(sent["work_size"], int)


def test_a_knob_left_at_minus_one_is_left_to_the_backend():
    values = {k.prop: DEFAULT for k in par.KNOBS} | {"drag-steps": 5.0, "lam": 0.0}
    assert par.overrides(values, "") == {"drag_steps": 5, "lam": 0.0}


def test_the_default_method_and_working_width_come_from_the_table(table):
    assert table.default_method == MethodTable().as_hello()["default_method"]
    first = {"methods": {"gooddrag": {"method": "gooddrag", "work_size": 128}}}
    assert par.ParamTable.parse(first, "install.json").default_method == "gooddrag"
    assert par.working_width(table.resolved("gooddrag", {})) == 512
    assert par.working_width(par.ParamTable.parse(first, "x").resolved("gooddrag", {})) == 128
    assert par.working_width({}) == par.OFFICIAL_WORK_SIZE  # no table: the official width


@pytest.mark.parametrize("advanced", ["{not json", "[1, 2]"])
def test_bad_advanced_json_is_an_actionable_error(advanced):
    with pytest.raises(par.ParamsError, match="advanced settings"):
        par.overrides({}, advanced)


def test_remembered_values_keep_defaults_symbolic(table):
    shown = par.shown_values(table, "dragdiffusion", {k.prop: DEFAULT for k in par.KNOBS})
    shown["drag-steps"] = 12
    stored = par.stored_values(table, "dragdiffusion", shown)
    assert stored["drag-steps"] == 12
    assert {p: v for p, v in stored.items() if p != "drag-steps"} == \
        {k.prop: DEFAULT for k in par.KNOBS if k.prop != "drag-steps"}


def test_knob_ranges_and_steps_follow_the_specs(table):
    ranges = {k.prop: table.knob_range(k) for k in par.KNOBS}
    assert ranges["lora-steps"] == (0.0, 2000.0, 10.0)
    assert ranges["inversion-strength"] == (0.01, 1.0, 0.05)
    assert ranges["work-size"] == (64.0, 2048.0, 64.0)
    assert ranges["latent-lr"] == (1e-5, 1.0, 0.005)
    for knob in par.KNOBS:  # every knob's range fits the PDB argument's
        low, high, step = ranges[knob.prop]
        assert 0 <= low < high <= knob.pdb_max and step > 0, knob
    bare = par.ParamTable({"dragdiffusion": {"latent_lr": 0.01}})  # no specs: PDB range
    assert bare.knob_range(par.KNOB_BY_PROP["latent-lr"]) == (0.0, 1.0, pytest.approx(0.001))


def test_state_file_round_trip(tmp_path):
    path = tmp_path / "sub" / "state.json"
    assert par.read_state(path) == {}
    par.write_state(path, typed={"seed": 3})
    par.write_state(path, hello={"device": "cpu"})
    assert par.read_state(path) == {"typed": {"seed": 3}, "hello": {"device": "cpu"}}
    path.write_text("{broken")
    assert par.read_state(path) == {}


def test_algorithm_of_each_method(table):
    assert table.algorithm("dragdiffusion-paper") == "dragdiffusion"
    assert table.algorithm("gooddrag") == "gooddrag"
    only = {k.prop: k.only for k in par.KNOBS if k.only}
    assert only == {"drag-steps": "dragdiffusion"}  # GoodDrag counts its steps differently
