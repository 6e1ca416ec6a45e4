"""What the command line tells the user: one progress bar per phase with the phase's true
elapsed time and ETA, and the engine's warnings, once."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import limits
import numpy as np
import pytest
import tqdm.std
from PIL import Image

from backend.cli_progress import PhaseBars, early_stop

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drive(bars: PhaseBars, clock: Clock, phase: str, total: int, seconds_per_step: float):
    for step in range(total):
        bars(phase, step, total)
        clock.now += seconds_per_step


def final_lines(text: str) -> list[str]:
    """The last state of each bar (tqdm redraws a bar in place with carriage returns)."""
    return [line.split("\r")[-1].strip() for line in text.split("\n") if line.strip()]


def test_one_bar_per_phase_with_true_elapsed_time_and_rate(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)
    out = io.StringIO()
    bars = PhaseBars(out, dynamic_ncols=False, ncols=100, mininterval=0)
    drive(bars, clock, "load", 1, 2.0)
    drive(bars, clock, "drag", 10, 0.5)
    drive(bars, clock, "denoise", 4, 0.25)
    bars.close()
    assert bars.bars == 3
    lines = final_lines(out.getvalue())
    assert len(lines) == 3, lines
    load, drag, denoise = lines
    assert load.startswith("loading: 100%") and "1/1 [00:02<00:00" in load
    assert drag.startswith("drag: 100%")
    assert re.search(r"10/10 \[00:05<00:00, +2\.00step/s\]", drag), drag
    assert denoise.startswith("denoise: 100%")
    assert re.search(r"4/4 \[00:01<00:00, +4\.00step/s\]", denoise), denoise


def test_eta_while_a_phase_runs(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)
    out = io.StringIO()
    bars = PhaseBars(out, dynamic_ncols=False, ncols=100, mininterval=0, smoothing=0)
    drive(bars, clock, "drag", 5, 1.0)  # 5 of 20 steps done after 5 s: 15 s left
    bars("drag", 5, 20)
    current = out.getvalue().split("\r")[-1]
    assert re.search(r"5/20 \[00:05<00:15, +1\.00step/s\]", current), current
    bars.close(done=False)  # cancelled: the bar stays where it was
    assert "5/20" in out.getvalue().split("\r")[-1]


def test_a_phase_that_stops_early_is_left_where_it_stopped(monkeypatch):
    """Issue 28: an early stop jumped to 100 %. A phase counts the steps that ran: its last
    started step, and none after."""
    clock = Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)
    out = io.StringIO()
    bars = PhaseBars(out, dynamic_ncols=False, ncols=100, mininterval=0)
    for step in range(4):  # 4 of 10 drag steps start; then the tracker ends the drag
        bars("drag", step, 10)
        clock.now += 1.0
    drive(bars, clock, "denoise", 3, 0.5)
    bars.close()
    drag, denoise = final_lines(out.getvalue())
    assert drag.startswith("drag:  40%") and "4/10" in drag, drag
    assert denoise.startswith("denoise: 100%") and "3/3" in denoise, denoise


def test_the_early_stop_line_says_why():
    assert early_stop({"drag_stop": None, "drag_steps": 80}) is None
    assert early_stop({}) is None
    line = early_stop({"drag_stop": "reached", "drag_steps": 23})
    assert line == ("drag stopped early (at step 24, after 23 optimisation steps): the tracker "
                    "put every handle within reach of its target (reach_threshold)")
    assert "no handle move" in early_stop({"drag_stop": "no_change", "drag_steps": 5})


@pytest.mark.slow
def test_drag_prints_the_engines_warnings_once(tmp_path, tiny_model_dir):
    """A selection smaller than one latent cell is ignored while dragging: the CLI says so."""
    image = np.zeros((48, 64, 3), np.uint8)
    image[10:30, 10:30] = 200
    Image.fromarray(image).save(tmp_path / "in.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[20:22, 20:22] = 255  # 2×2 px: nothing of it is left at latent size
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = limits.run(
        [sys.executable, "-m", "backend", "drag", "--image", str(tmp_path / "in.png"),
         "--points", "20,20:24,22", "--mask", str(tmp_path / "mask.png"), "--model",
         str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path / "out.png"), "--json",
         "--set", "work_size=64", "--set", "lora_steps=0", "--set", "n_inference_steps=4",
         "--set", "drag_steps=2"],
        limit=1800, capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning: The selection is smaller than the model's") == 1
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(summary["warnings"]) == 1 and "ignored while dragging" in summary["warnings"][0]
