"""bench-quality end to end without a model: case sets, baselines, tables, grids, figure."""

from __future__ import annotations

import json

import pytest

from backend.cli import main


def test_bench_quality_baselines_on_every_set(tmp_path):
    out = tmp_path / "bench"
    code = main(["bench-quality", "--method", "none", "--cases", "2", "--photo-cases", "1",
                 "--out", str(out), "--figure", "stereo-00", "--threads", "1"])
    assert code == 0
    result = json.loads((out / "results.json").read_text("utf-8"))
    assert set(result["mean"]) == {"shapes", "stereo", "paste"}
    for set_name, by_method in result["mean"].items():
        noop, naive = by_method["no-op"], by_method["cut-paste"]
        # no-op leaves every handle where it was: its error is the drag length
        assert abs(noop["handle_error"] - noop["drag_px"]) < 1.0, set_name
        assert naive["handle_error"] < noop["handle_error"], set_name
        assert noop["exact_outside"] and naive["exact_outside"]
    table = (out / "table.md").read_text("utf-8")
    assert "| stereo | no-op |" in table and "| paste | cut-paste |" in table
    for name in ("grid-shapes.png", "grid-stereo.png", "grid-paste.png", "figure.png"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--param", "bogus=1"], "unknown parameter 'bogus'"),
    (["--param", "reach_threshold=99"], "reach_threshold"),
    (["--lora-steps", "-3"], "lora_steps"),
    (["--method", "gooddrag,nonsense"], "unknown method 'nonsense'"),
])
def test_bench_quality_refuses_bad_overrides_before_loading(tmp_path, argv, message):
    # the model folder does not exist: the check must come first, with the engine's message
    with pytest.raises(SystemExit) as exc:
        main(["bench-quality", "--model", str(tmp_path / "no-model"), "--out",
              str(tmp_path / "out"), *argv])
    assert str(exc.value).startswith("bench-quality: ") and message in str(exc.value)
    assert not (tmp_path / "out").exists()
