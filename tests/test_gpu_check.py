"""``python -m backend gpu-check`` runs in CI on the CPU, so it cannot rot before a GPU is lent."""

from __future__ import annotations

import json

import pytest

from backend.cli import main


def test_gpu_check_runs_both_methods_and_checks_them(tmp_path, capsys):
    out = tmp_path / "check.json"
    code = main(["gpu-check", "--device", "cpu", "--model", "random-tiny", "--size", "64", "--quick",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["runs"]] == ["dragdiffusion", "gooddrag"]
    for row in report["runs"]:
        assert row["finite"] and row["unmasked_exact"]
        assert row["fe_total"] > 0 and set(row["phase_s"]) >= {"lora", "inversion", "drag",
                                                                 "denoise", "decode"}
        assert f"{row['method']}: ok" in printed


def test_gpu_check_fails_when_a_pixel_outside_the_mask_changes(tmp_path, monkeypatch, capsys):
    from backend.engine.pipeline import DragEngine

    finish = DragEngine.finish

    def broken(self, *args, **kwargs):
        image = finish(self, *args, **kwargs).copy()
        image[0, 0] ^= 1  # the corner is outside the bench image's mask
        return image

    monkeypatch.setattr(DragEngine, "finish", broken)
    code = main(["gpu-check", "--device", "cpu", "--model", "random-tiny", "--size", "64", "--quick",
                 "--method", "dragdiffusion"])
    assert code == 1 and "FAILED" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_on_the_full_sd15_architecture(capsys):
    """The real thing at a CPU-sized image (≈ 4 GB of RAM, a minute or two on one core)."""
    code = main(["gpu-check", "--device", "cpu", "--size", "64", "--quick"])
    assert code == 0, capsys.readouterr().out


@pytest.mark.slow  # a minute or two of tracing on a CPU
def test_gpu_check_compile_reports_eager_and_compiled_with_the_lora_compiled(tmp_path, capsys):
    out = tmp_path / "check.json"
    code = main(["gpu-check", "--device", "cpu", "--model", "random-tiny", "--size", "64",
                 "--quick", "--method", "dragdiffusion", "--compile", "eager",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    (row,) = json.loads(out.read_text())["runs"]
    assert row["compiled_calls"] == {}  # the eager edit
    for run in (row["compiled_first"], row["compiled"]):
        calls = run["compiled_calls"]
        # every UNet call went through the compiled forward, LoRA training's included
        assert calls["lora"] == 2 and calls["inversion"] > 0 and calls["drag"] > 0, calls  # 2 steps
        assert run["finite"] and run["unmasked_exact"]
    assert {"lora", "inversion"} <= set(row["compiled_speedup"])
    assert "compiled speed-up (2nd run): " in printed and "compiled, 1st (compiling)" in printed
