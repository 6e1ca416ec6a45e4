"""Host side of one real-GIMP test case: build an image in GIMP, call the plug-in, read back
what it made, and compare with what the backend returned."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import harness
import limits
import numpy as np
import xdisplay

# DragDiffusion, small enough for the tiny model on a busy CPU. The default feather (3 px) lies
# inside the selection, so pixels outside it must stay exactly unchanged. Named: the default
# method, Inpaint4Drag, reads the selection as the region that moves.
FAST = {"method": "dragdiffusion", "work-size": 64, "lora-steps": 0, "drag-steps": 2,
        "n-inference-steps": 4, "advanced": json.dumps({"lam": 0.1}), "timeout": 60}


def backend_result(conn: Path, job_id: str):
    """The terminal event of a job, fetched again from the backend."""
    from protocol import Client

    with Client.from_connection_file(conn, timeout=10) as client:
        client.attach(job_id)
        events = client.events(job_id, timeout=limits.safety_net(600))
        return [e for e in events if e.terminal][-1]


def run_case(gimp: harness.GimpChroot, name: str, conn: Path | None, *,
             env: dict[str, str] | None = None, **case) -> tuple[dict, Path]:
    """Build the image in GIMP, call the plug-in, return (report, output folder on the host)."""
    case = {"gray": False, "alpha": True, "canvas": [64, 48], "layer_size": [64, 48],
            "offsets": [0, 0], "selection": None, "paths": [], **case}
    args = {**FAST, **case.get("args", {})}
    if conn is not None:
        args["backend"] = gimp.inside(conn)
    case["args"] = args
    out = gimp.work / "out" / name
    started = time.monotonic()
    run = gimp.run([gimp.script("gimp_case.py", CASE=case, OUT=gimp.inside(out))], env=env)
    print(f"[{name}] GIMP run {time.monotonic() - started:.1f} s")
    assert run.returncode == 0, run.output
    report = json.loads((out / "result.json").read_text())
    print(f"[{name}] plug-in call {report['seconds']:.1f} s: {report['status']}")
    if gimp.tier.blocked and report["status"] == "success":  # it really went without them
        assert report["info"]["pyzmq"] is None, report["info"]["pyzmq"]
    return report, out


def pixels(out: Path, name: str, size: list[int], channels: int) -> np.ndarray:
    data = np.frombuffer((out / name).read_bytes(), np.uint8)
    return data.reshape(size[1], size[0], channels)


def check_new_layer(report: dict, out: Path, conn: Path, size: list[int],
                    offsets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One new layer right above the source, same geometry, pixels = the backend's result."""
    assert report["status"] == "success", report["error"]
    names = [layer["name"] for layer in report["layers"]]
    assert names == ["Top", report["new_layer"], "Source", "Background"]
    assert report["layers_before"] == ["Top", "Source", "Background"]
    new = report["layers"][1]
    assert new["size"] == size and new["offsets"] == offsets
    assert report["source_unchanged"]
    channels = report["channels"]
    source = pixels(out, "source-before.bin", size, channels)
    result = pixels(out, "new-layer.bin", size, channels)
    finished = backend_result(conn, report["info"]["job_id"])
    assert finished.type == "finished"
    assert (finished["width"], finished["height"], finished["channels"]) == (*size, channels)
    assert result.tobytes() == finished.image
    return source, result


def outside(size: list[int], offsets: list[int], selection: list[int]) -> np.ndarray:
    """Boolean H×W: layer pixels outside a rectangular selection given in image coordinates."""
    mask = np.ones((size[1], size[0]), bool)
    x, y, w, h = selection
    x0, y0 = max(x - offsets[0], 0), max(y - offsets[1], 0)
    mask[y0:max(y + h - offsets[1], 0), x0:max(x + w - offsets[0], 0)] = False
    return mask


def hello(conn: Path) -> dict:
    from protocol import Client

    with Client.from_connection_file(conn, timeout=10) as client:
        return client.hello()


def fake_browser(gimp: harness.GimpChroot) -> Path:
    """A "web browser" for GIMP's help (gimprc: help-browser web-browser) that writes down the
    page it was asked to open."""
    opened = gimp.work / "help-opened.txt"
    script = gimp.work / "fake-browser"
    script.write_text(f'#!/bin/sh\necho "$@" >> {gimp.inside(opened)}\n')
    script.chmod(0o755)
    apps = gimp.home / ".local" / "share" / "applications"
    apps.mkdir(parents=True, exist_ok=True)
    (apps / "fake-browser.desktop").write_text(
        "[Desktop Entry]\nType=Application\nName=Fake browser\n"
        f"Exec={gimp.inside(script)} %u\nMimeType=text/html;x-scheme-handler/file;\n")
    (gimp.home / ".config" / "mimeapps.list").write_text(
        "[Default Applications]\ntext/html=fake-browser.desktop\n"
        "x-scheme-handler/file=fake-browser.desktop\n")
    return opened


def preview_shown(screenshot: Path) -> bool:
    """Whether the progress window's picture area (below the bar) shows an image: the empty
    area is one flat colour."""
    from PIL import Image

    with Image.open(screenshot) as shot:
        width = shot.width
        area = shot.convert("RGB").crop((width // 2 - 100, 70, width // 2 + 100, 300))
        colours = area.getcolors(maxcolors=1000)
        return colours is None or len(colours) > 30


def backend_log(conn: Path) -> str:
    """The backend's log (``<name>.log`` beside its connection file ``<name>.json``)."""
    return conn.with_suffix(".log").read_text()


@contextlib.contextmanager
def serving(gimp: harness.GimpChroot, name: str, model: Path | None, *extra: str,
            env: dict[str, str] | None = None):
    """``python -m backend serve`` on the host with ``model`` on the CPU, its connection file
    ``<name>.json`` and log ``<name>.log`` in the mounted work folder; yields (process, conn).
    ``model`` None: the default model, which an empty Hugging Face cache makes missing, so the
    backend serves the demo model that ships with the project (as on a fresh machine). ``env``:
    more environment (e.g. a loopback model hub to download from)."""
    conn, log = gimp.work / f"{name}.json", gimp.work / f"{name}-stdout.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if model is None:
        env["HF_HOME"] = str(gimp.work / f"{name}-empty-hf-home")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "backend", "serve", *(["--model", str(model)] if model else []),
             "--device", "cpu", "--bind", "tcp://127.0.0.1:0", "--connection-file", str(conn),
             "--log-file", str(gimp.work / f"{name}.log"), *extra],
            cwd=harness.REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        xdisplay.wait_for(lambda: "READY" in log.read_text() or process.poll() is not None,
                          300, f"the {name} backend")
        assert process.poll() is None, f"the backend did not start:\n{log.read_text()[-3000:]}"
        yield process, conn
    finally:
        from protocol import Client

        try:
            if process.poll() is None:
                with Client.from_connection_file(conn, timeout=5) as client:
                    client.shutdown()
            process.wait(30)
        except Exception:
            process.kill()
            process.wait(10)
