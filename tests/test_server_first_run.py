"""The README's first command on a machine without SD1.5 (issue 12.8): it installs, starts a
backend that serves the shipped demo model and says so, and that backend edits an image.

Runs the command literally in a shell, with a throw-away HOME (so the GIMP profile, the
connection file and the Hugging Face cache it sees are empty and the user's are untouched).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from protocol.client import Client

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Variables that could lead the backend to a model cache outside the throw-away HOME.
_CACHE_VARS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
               "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "DRAG_DIFFUSION_CONNECTION_FILE")


def first_command() -> str:
    """The first command of the README's Quick start, as written there."""
    quick = README.split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", quick, re.S).group(1)
    return block.splitlines()[0].split("#")[0].strip()


def test_the_quick_start_command_is_the_one_tested():
    assert first_command() == "python3 install.py && .venv/bin/python -m backend serve"


@pytest.mark.slow
def test_the_first_command_serves_the_demo_model_and_edits(tmp_path):
    from backend.demo.shapes import make_cases

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in _CACHE_VARS}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(["bash", "-c", first_command()], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []
    threading.Thread(target=lambda: [lines.put(line) or output.append(line)
                                     for line in proc.stdout], daemon=True).start()
    try:
        while not (line := lines.get(timeout=900)).startswith("READY "):
            pass
        ready = line.strip()
        endpoint, conn = ready.split()[1:3]
        assert endpoint.startswith("tcp://127.0.0.1:")
        assert Path(conn) == home / ".config" / "gimp-drag-diffusion" / "backend.json"
        assert "(serving the demo model backend/demo/model, fit for simple shapes only" in ready
        assert "--model" in ready
        case = make_cases(1, seed=0)[0]
        with Client.from_connection_file(conn, timeout=10.0) as client:
            model = client.hello()["model"]
            job = client.submit(case.image, 128, 128, 3, case.handles, case.targets,
                                mask=case.mask, params={"work_size": 128, "lora_steps": 0,
                                                        "n_inference_steps": 20,
                                                        "drag_steps": 20})
            done = list(client.events(job, timeout=900))[-1]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    assert model["demo"] is True and model["state"] == "ready" and model["hint"]
    assert "stable-diffusion-v1-5" in model["requested"]
    assert done.type == "finished", "".join(output[-20:])
    result = np.frombuffer(done.image, np.uint8).reshape(128, 128, 3)
    outside = case.mask == 0
    assert np.array_equal(result[outside], case.image[outside])  # only the selection changed
    assert not np.array_equal(result, case.image)
    # No GIMP profile in the fresh HOME: the newest GIMP's folder (3.2) gets the plug-in.
    assert (home / ".config" / "GIMP" / "3.2" / "plug-ins" / "drag-diffusion").is_dir()
