"""The plug-in inside a real GIMP 3.0.4 (Debian 13 chroot), talking to the real backend.

Needs root (chroot, mount --bind) and, the first time, a Debian mirror to build the chroot
(about 1.5 min; cached in .cache/gimp-chroot or $DRAG_GIMP_CHROOT). CI (CI=true) always runs
these tests and fails if they can't run; locally they run only with DRAG_GIMP_TESTS=1.

The backend runs on the host (``python -m backend serve`` with the tiny random model on the
CPU); GIMP's plug-in in the chroot reaches it on 127.0.0.1 through the connection file in the
bind-mounted work folder. The pixels the backend returned are fetched again on the host with
the protocol's ``attach`` and compared with the new layer's pixels read back inside GIMP.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "gimp"))
import harness

pytestmark = pytest.mark.gimp

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REQUESTED = IN_CI or os.environ.get("DRAG_GIMP_TESTS") == "1"
# Small enough for the tiny model on a busy CPU. The default feather (3 px) lies inside the
# selection, so pixels outside it must stay exactly unchanged.
FAST = {"work-size": 64, "lora-steps": 0, "drag-steps": 2, "n-inference-steps": 4,
        "advanced": json.dumps({"lam": 0.1}), "timeout": 60}


def unavailable(message: str) -> None:
    if IN_CI:
        pytest.fail(f"GIMP tests can't run in CI: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def chroot() -> Path:
    if not REQUESTED:
        pytest.skip("real-GIMP tests run in CI, or locally with DRAG_GIMP_TESTS=1")
    try:
        return harness.chroot_path()
    except harness.Unavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def gimp(chroot: Path, tmp_path_factory: pytest.TempPathFactory):
    """GIMP with the plug-in installed by install.py into a fresh profile; /mnt/test mounted."""
    work = tmp_path_factory.mktemp("gimp-work")
    work.chmod(0o755)
    g = harness.GimpChroot(chroot, work)
    g.prepare_profile()
    harness.install_plugin(g, "--vendor", "never")  # the chroot has python3-zmq/-msgpack
    with harness.bind_mount(work, chroot):
        yield g


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from backend.engine.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def backend(gimp: harness.GimpChroot, tiny_model: Path):
    """The real backend on the host, its connection file inside the mounted work folder."""
    conn = gimp.work / "backend.json"
    log = gimp.work / "backend-stdout.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DRAG_DIFFUSION_CONNECTION_FILE": str(conn)}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "backend", "serve", "--model", str(tiny_model),
             "--device", "cpu", "--bind", "tcp://127.0.0.1:0", "--connection-file", str(conn)],
            cwd=harness.REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "READY" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the backend did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield conn
    from protocol import Client

    try:
        with Client.from_connection_file(conn, timeout=5) as client:
            client.shutdown()
        process.wait(30)
    except Exception:
        process.kill()
        process.wait(10)


def backend_result(conn: Path, job_id: str):
    """The terminal event of a job, fetched again from the backend."""
    from protocol import Client

    with Client.from_connection_file(conn, timeout=10) as client:
        client.attach(job_id)
        return [e for e in client.events(job_id, timeout=60) if e.terminal][-1]


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


def test_plugin_is_registered_and_odd_anchor_count_is_an_error(gimp):
    report, _ = run_case(gimp, "odd", None,
                         paths=[[[[10, 10], [20, 10]], [[30, 30], [35, 30], [40, 30]]]])
    assert report["menu_paths"] == ["<Image>/Filters/Generic"]
    assert report["image_types"] == "RGB*, GRAY*"
    assert report["status"] == "execution-error"
    assert "Stroke 2 of the path has 3 anchors" in report["error"]
    assert "handle" in report["error"] and "target" in report["error"]
    assert report["layers"][1]["name"] == "Source" and len(report["layers"]) == 3


def test_no_path_and_selection_off_the_layer_are_errors(gimp):
    report, _ = run_case(gimp, "nopath", None)
    assert report["status"] == "execution-error"
    assert "no path" in report["error"] and "Paths tool" in report["error"]
    report, _ = run_case(gimp, "selection-off-layer", None, layer_size=[20, 20],
                         offsets=[40, 20], selection=[0, 0, 10, 10],
                         paths=[[[[45, 25], [50, 30]]]])
    assert report["status"] == "execution-error"
    assert "does not touch the layer" in report["error"]
    assert len(report["layers"]) == 3


def test_drag_with_selection_and_two_strokes(gimp, backend):
    selection = [8, 6, 40, 30]
    report, out = run_case(gimp, "two-strokes", backend, selection=selection,
                           paths=[[[[12, 12], [18, 14]], [[30, 20], [34, 26]]]],
                           args={"make-path": True, "prompt": "a red disc"})
    source, result = check_new_layer(report, out, backend, [64, 48], [0, 0])
    info = report["info"]
    assert info["drags"] == 2 and info["masked"] is True
    assert info["handles"] == [[12, 12], [30, 20]] and info["targets"] == [[18, 14], [34, 26]]
    keep = outside([64, 48], [0, 0], selection)
    assert np.array_equal(result[keep], source[keep])
    assert not np.array_equal(result[~keep], source[~keep])  # the edit changed something
    # The optional path: one stroke per drag from the final handle position to its target.
    assert len(report["made_path"]) == 2
    for stroke, handle, target in zip(report["made_path"], info["final_handles"],
                                      info["targets"], strict=True):
        assert stroke == pytest.approx([*handle, *target])


def test_no_selection_handle_target_pairs_in_one_stroke(gimp, backend):
    report, out = run_case(gimp, "no-selection", backend,
                           paths=[[[[12, 12], [18, 14], [40, 30], [44, 34]]]])
    check_new_layer(report, out, backend, [64, 48], [0, 0])
    assert report["info"]["masked"] is False
    assert report["info"]["handles"] == [[12, 12], [40, 30]]


def test_layer_with_offsets_larger_than_the_canvas(gimp, backend):
    # An 80×40 layer at (-10, 12) on the 64×48 canvas: wider than the canvas, partly off it.
    size, offsets, selection = [80, 40], [-10, 12], [0, 20, 30, 20]
    report, out = run_case(gimp, "offsets", backend, layer_size=size, offsets=offsets,
                           selection=selection, paths=[[[[10, 30], [16, 34]]]])
    source, result = check_new_layer(report, out, backend, size, offsets)
    keep = outside(size, offsets, selection)
    assert np.array_equal(result[keep], source[keep])
    assert report["info"]["handles"] == [[10, 30]]  # reported in image coordinates


def test_rgb_image_without_alpha(gimp, backend):
    report, out = run_case(gimp, "rgb", backend, alpha=False, selection=[4, 4, 50, 36],
                           paths=[[[[20, 20], [26, 22]]]])
    check_new_layer(report, out, backend, [64, 48], [0, 0])
    assert report["channels"] == 3
    assert report["layers"][1]["alpha"] is False and report["layers"][1]["gray"] is False


def test_grayscale_image(gimp, backend):
    report, out = run_case(gimp, "gray", backend, gray=True, alpha=False,
                           paths=[[[[20, 20], [26, 22]]]])
    check_new_layer(report, out, backend, [64, 48], [0, 0])
    assert report["channels"] == 1
    assert report["layers"][1]["gray"] is True and report["layers"][1]["alpha"] is False


def test_grayscale_with_alpha_and_offsets(gimp, backend):
    size, offsets = [40, 30], [12, 9]
    report, out = run_case(gimp, "gray-alpha", backend, gray=True, alpha=True,
                           layer_size=size, offsets=offsets, selection=[20, 15, 20, 20],
                           paths=[[[[25, 20], [30, 24]]]])
    source, result = check_new_layer(report, out, backend, size, offsets)
    assert report["channels"] == 2
    keep = outside(size, offsets, [20, 15, 20, 20])
    assert np.array_equal(result[keep], source[keep])


def test_backend_not_running_is_a_clean_error_within_the_timeout(gimp):
    dead = gimp.work / "dead-backend.json"
    dead.write_text(json.dumps({"endpoint": "tcp://127.0.0.1:9", "key": "00" * 32}))
    report, _ = run_case(gimp, "not-running", None, paths=[[[[12, 12], [18, 14]]]],
                         args={"backend": gimp.inside(dead), "timeout": 4})
    assert report["status"] == "execution-error"
    assert "backend is not running" in report["error"]
    assert "-m backend serve" in report["error"]  # says exactly how to start it
    assert report["seconds"] < 4 + 3
    assert len(report["layers"]) == 3


def test_cancel_mid_job(gimp, backend):
    report, _ = run_case(gimp, "cancel", backend, paths=[[[[12, 12], [18, 14]]]],
                         args={"drag-steps": 200},
                         env={"DRAG_DIFFUSION_CANCEL_AFTER_PROGRESS": "3"})
    assert report["status"] == "cancel", report
    assert len(report["layers"]) == 3 and report["source_unchanged"]
    # GIMP reports a cancelled call as just "cancelled"; the backend's log names the job.
    log = (backend.parent / "backend.log").read_text()
    job_ids = re.findall(r"job (gimp-[0-9a-f]+) cancelled \(client\)", log)
    assert job_ids, log[-2000:]
    event = backend_result(backend, job_ids[-1])
    assert event.type == "cancelled" and event["reason"] == "client"
    assert report["seconds"] < 60  # 200 drag steps would take minutes


# --- GUI: the dialog, and one Ctrl+Z removes the whole edit ------------------------------------

ARTIFACTS = harness.REPO / "test-artifacts"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def xdotool(display: str, *args: str) -> str:
    return subprocess.run(["xdotool", *args], env={**os.environ, "DISPLAY": display},
                          capture_output=True, text=True, timeout=30).stdout.strip()


def find_window(display: str, name: str) -> str | None:
    found = xdotool(display, "search", "--onlyvisible", "--name", name).split()
    return found[-1] if found else None


@pytest.fixture
def xvfb(gimp):
    try:
        harness.ensure_host_tools("Xvfb", "xdotool", "import",
                                  packages=("xvfb", "xdotool", "imagemagick"))
    except harness.Unavailable as exc:
        unavailable(str(exc))
    display = f":{90 + os.getpid() % 100}"
    process = subprocess.Popen(["Xvfb", display, "-nolisten", "tcp", "-screen", "0",
                                "1280x900x24"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(lambda: subprocess.run(["xdotool", "getdisplaygeometry"],
                                    env={**os.environ, "DISPLAY": display},
                                    capture_output=True).returncode == 0, 30, "Xvfb")
    yield display
    process.terminate()
    process.wait(10)


@pytest.mark.gui
def test_gui_dialog_and_one_undo_removes_the_whole_edit(gimp, backend, xvfb):
    state = gimp.work / "gui-state"
    state.mkdir()
    ARTIFACTS.mkdir(exist_ok=True)
    args = {**FAST, "backend": gimp.inside(backend)}
    log = gimp.work / "gui-gimp.log"
    process = gimp.popen([gimp.script("gimp_gui.py", STATE=gimp.inside(state), ARGS=args)],
                         gui=True, env={"DISPLAY": xvfb}, log=log)
    try:
        wait_for(lambda: (state / "ready").exists() or process.poll() is not None, 120,
                 "GIMP to open the image")
        assert process.poll() is None, log.read_text()[-3000:]
        # The plug-in's dialog (interactive run): screenshot it, then dismiss it.
        dialog = wait_for(lambda: find_window(xvfb, "^Drag Diffusion$"), 60, "the dialog")
        time.sleep(2)  # let it draw
        env = {**os.environ, "DISPLAY": xvfb}
        subprocess.run(["import", "-window", dialog, str(ARTIFACTS / "plugin-dialog.png")],
                       env=env, check=True, timeout=60)
        subprocess.run(["import", "-window", "root", str(ARTIFACTS / "gimp-with-dialog.png")],
                       env=env, check=True, timeout=60)
        # No window manager under Xvfb: focus explicitly; keys and clicks go through XTEST
        # (GTK ignores events sent with "--window").
        xdotool(xvfb, "mousemove", "--window", dialog, "50", "205", "click", "1")  # Advanced
        time.sleep(2)
        subprocess.run(["import", "-window", dialog,
                        str(ARTIFACTS / "plugin-dialog-advanced.png")],
                       env=env, check=True, timeout=60)
        xdotool(xvfb, "windowfocus", "--sync", dialog)
        xdotool(xvfb, "key", "Return")  # OK: the edit starts, with its progress dialog
        working = wait_for(lambda: find_window(xvfb, "^Drag Diffusion – working$"), 60,
                           "the progress dialog")
        time.sleep(5)  # let the job get going and the bar move
        subprocess.run(["import", "-window", "root", str(ARTIFACTS / "gimp-progress.png")],
                       env=env, check=True, timeout=60)
        xdotool(xvfb, "windowfocus", "--sync", working)
        xdotool(xvfb, "key", "Escape")  # = its Cancel button
        closed = wait_for(lambda: read_json(state / "dialog-closed"), 60,
                          "the cancelled edit to return")
        assert closed["status"] == "cancel"
        assert closed["layers"] == read_json(state / "ready")["layers"]  # nothing added
        assert re.search(r"job gimp-[0-9a-f]+ cancelled \(client\)",
                         (backend.parent / "backend.log").read_text())

        applied = wait_for(lambda: read_json(state / "applied"), 240, "the drag to finish")
        assert applied["status"] == "success", (applied, log.read_text()[-3000:])
        original, edited = applied["original"], applied["layers"]
        assert len(edited) == 2 and edited[1] == original[0]

        window = wait_for(lambda: find_window(xvfb, r"layers?\) [0-9]+x[0-9]+"), 30,
                          "the image window")
        xdotool(xvfb, "windowfocus", "--sync", window)
        xdotool(xvfb, "key", "ctrl+z")
        wait_for(lambda: (read_json(state / "state.json") or {}).get("layers") == original, 30,
                 "one Ctrl+Z to remove the whole edit")
        xdotool(xvfb, "key", "ctrl+y")
        wait_for(lambda: (read_json(state / "state.json") or {}).get("layers") == edited, 30,
                 "Ctrl+Y to restore the edit")
    finally:
        (state / "done").touch()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 15)
            process.wait(10)


def test_vendored_pyzmq_and_msgpack(gimp, backend):
    """install.py --vendor always: wheels for GIMP's Python 3.13 beside the plug-in win over
    the chroot's python3-zmq; re-running install.py upgrades in place."""
    linux = [f"manylinux{tag}_x86_64" for tag in ("2014", "_2_17", "_2_28")]
    try:
        harness.install_plugin(gimp, "--vendor", "always", "--vendor-python-version", "3.13",
                               *[a for tag in linux for a in ("--vendor-platform", tag)])
        plugin = gimp.plugin_dir / "drag-diffusion"
        assert (plugin / "vendor" / "zmq").is_dir() and (plugin / "vendor" / "msgpack").is_dir()
        assert json.loads((plugin / "install.json").read_text())["vendored"] is True
        assert os.access(plugin / "drag-diffusion.py", os.X_OK)
        report, out = run_case(gimp, "vendored", backend, paths=[[[[20, 20], [26, 22]]]])
        check_new_layer(report, out, backend, [64, 48], [0, 0])
        assert report["info"]["pyzmq"].startswith(
            "/mnt/test/home/.config/GIMP/3.0/plug-ins/drag-diffusion/vendor/zmq/")
    finally:
        harness.install_plugin(gimp, "--vendor", "never")
    assert not (gimp.plugin_dir / "drag-diffusion" / "vendor").exists()
