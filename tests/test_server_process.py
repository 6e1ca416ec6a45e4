"""The backend as a separate process: killed mid-job, restarted, SIGTERM, the real CLI; CURVE."""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import limits
import numpy as np
import pytest
from fixtures_server import TRANSPORTS, FakeEngine, client_for, running_server

from backend.server import cli as server_cli
from backend.server.endpoint import CurveServer
from protocol import connection, wire
from protocol.client import BackendUnavailable, Client, JobFailed, JobTimeout, WrongKey
from protocol.curve import CurveClient, generate_keypair, load_keypair

ROOT = Path(__file__).resolve().parents[1]
FAKE_SERVER = Path(__file__).with_name("fixtures_server.py")


def start(args: list[str], timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """Start a backend process and wait for its READY line; return (process, endpoint).
    ``timeout`` is a safety net against a hung start (scaled by ``limits``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],
                     daemon=True).start()
    try:
        line = lines.get(timeout=limits.safety_net(timeout))
    except queue.Empty:
        proc.kill()
        raise AssertionError(limits.fired("the backend's READY line",
                                          limits.safety_net(timeout))) from None
    parts = line.split(maxsplit=3)  # READY endpoint connection-file [(note)]
    assert len(parts) >= 3 and parts[0] == "READY", line
    assert len(parts) == 3 or parts[3].startswith("("), line
    return proc, parts[1]


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(30)


def poll_until_end(client: Client, job: str, events: list | None = None) -> list:
    """The plug-in's pattern: short ``events`` calls between UI updates."""
    events = [] if events is None else events
    while not (events and events[-1].terminal):
        with contextlib.suppress(JobTimeout):  # events seen before the timeout are kept
            events.extend(client.events(job, timeout=0.05))
    return events


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("style", ["iterate", "short polls"])
def test_killed_backend_raises_within_the_timeout_and_a_restart_serves(tmp_path, style,
                                                                       transport):
    conn = tmp_path / "backend.json"
    proc, endpoint = start([str(FAKE_SERVER), str(conn)])
    try:
        client = Client.from_connection_file(conn, timeout=1.0, retries=1, transport=transport)
        assert client.endpoint == endpoint
        job = client.submit(bytes(48), 4, 4, 3, [(1, 1)], [(2, 2)])
        events = client.events(job)
        while next(events).type != "progress":
            pass
        proc.kill()
        proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable) as err:
            list(events) if style == "iterate" else poll_until_end(client, job)
        assert time.monotonic() - t0 < 1.0 * 2 + 2.0  # timeout × (retries + 1), plus slack
        assert "stopped answering" in str(err.value) and job in str(err.value)
        assert "python -m backend serve" in str(err.value)
        client.close()
    finally:
        proc.kill()
    assert conn.exists()  # a killed backend leaves a stale file; the next one replaces it
    proc, _ = start([str(FAKE_SERVER), str(conn)])
    try:
        with Client.from_connection_file(conn, timeout=2.0, transport=transport) as client:
            assert client.hello()["model"]["state"] == "ready"
            job = client.submit(bytes(48), 4, 4, 3, [(1, 1)], [(2, 2)],
                                prompt="steps=1 delay=0")
            assert poll_until_end(client, job)[-1].type == "finished"
        assert stop(proc) == 0
    finally:
        proc.kill()
    assert not conn.exists()


def test_sigterm_cancels_the_running_job_and_exits_cleanly(tmp_path):
    conn = tmp_path / "backend.json"
    proc, _ = start([str(FAKE_SERVER), str(conn)])
    try:
        with Client.from_connection_file(conn, timeout=2.0) as client:
            job = client.submit(bytes(48), 4, 4, 3, [(1, 1)], [(2, 2)], prompt="delay=0.05")
            events = client.events(job)
            while next(events).type != "progress":
                pass
            proc.send_signal(signal.SIGTERM)
            last = list(events)[-1]
            assert last.type == "cancelled" and last["reason"] == "shutdown"
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert not conn.exists()


@pytest.mark.slow
def test_real_cli_serves_a_drag_job_with_the_tiny_model(tmp_path, tiny_model_dir):
    conn, log_file = tmp_path / "backend.json", tmp_path / "backend.log"
    proc, endpoint = start(["-m", "backend", "serve", "--model", str(tiny_model_dir), "--device",
                            "cpu", "--bind", "tcp://127.0.0.1:0", "--connection-file", str(conn),
                            "--log-file", str(log_file)], timeout=1800)
    try:
        assert endpoint.startswith("tcp://127.0.0.1:")
        if os.name == "posix":
            assert stat.S_IMODE(conn.stat().st_mode) == 0o600
        with Client.from_connection_file(conn, timeout=5.0) as client:
            info = client.hello()
            assert info["model"]["state"] == "ready" and info["device"] == "cpu"
            rng = np.random.default_rng(0)
            pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
            job = client.submit(pixels, 40, 48, 3, [(10, 12)], [(16, 12)],
                                method="dragdiffusion",
                                params={"work_size": 64, "lora_steps": 0,
                                        "n_inference_steps": 4, "drag_steps": 2},
                                prompt="a red disc", seed=1)
            events = list(client.events(job, timeout=limits.safety_net(1800)))
        types = [e.type for e in events]
        assert types[:2] == ["queued", "started"] and types[-1] == "finished"
        phases = [e["phase"] for e in events if e.type == "progress"]
        assert phases[0] == "load" and phases[-1] == "decode"
        assert {"inversion", "drag", "denoise"} <= set(phases)
        order = ["load", "lora", "inversion", "drag", "denoise", "decode"]
        seen = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
        assert seen == sorted(seen, key=order.index)  # phases never go back
        done = events[-1]
        assert (done["width"], done["height"], done["channels"]) == (40, 48, 3)
        assert len(done.image) == 40 * 48 * 3 and len(done["handles"]) == 1
        assert stop(proc) == 0
    finally:
        proc.kill()
    assert not conn.exists()
    log_text = log_file.read_text()
    assert f"job {job} finished" in log_text and "40x48x3" in log_text


@pytest.mark.slow
def test_missing_model_keeps_serving_with_a_clear_error(tmp_path):
    conn = tmp_path / "backend.json"
    proc, _ = start(["-m", "backend", "serve", "--model", str(tmp_path / "no-such-model"),
                     "--device", "cpu", "--bind", "tcp://127.0.0.1:0", "--connection-file",
                     str(conn), "--log-file", str(tmp_path / "log")], timeout=1800)
    try:
        with Client.from_connection_file(conn, timeout=5.0) as client:
            model = client.hello()["model"]
            assert model["state"] == "missing" and model["error"]
            with pytest.raises(JobFailed) as err:
                client.submit(bytes(48), 4, 4, 3, [(1, 1)], [(2, 2)])
            assert err.value.code == wire.MODEL_NOT_FOUND
            assert "no-such-model" in err.value.message
        assert stop(proc) == 0
    finally:
        proc.kill()


def test_keygen_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    server_cli.register(parser.add_subparsers())
    args = parser.parse_args(["keygen", "--dir", str(tmp_path / "keys"), "--name", "gpu"])
    assert args.func(args) == 0
    public, secret = tmp_path / "keys" / "gpu.key", tmp_path / "keys" / "gpu.key_secret"
    assert public.exists() and secret.exists()
    if os.name == "posix":
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert "public key: " in out and str(public) in out


def test_curve_allows_listed_clients_only(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    _, server_secret = generate_keypair(keys, "server")
    good_public, good_secret = generate_keypair(keys, "good")
    _, bad_secret = generate_keypair(keys, "bad")
    (allowed / "good.key").write_bytes(good_public.read_bytes())
    conn = tmp_path / "backend.json"
    curve = CurveServer(server_secret, allowed)
    with running_server(FakeEngine(), curve=curve, connection_file=conn) as server:
        info = connection.read_connection_file(conn)
        assert info.curve_server_key and len(info.curve_server_key) == 40
        good = CurveClient.from_files(info.curve_server_key, good_secret)
        with client_for(server, curve=good) as client:
            assert client.hello()["security"]["curve"] is True
            job = client.submit(bytes(48), 4, 4, 3, [(1, 1)], [(2, 2)])
            assert list(client.events(job, timeout=30))[-1].type == "finished"
        bad = CurveClient.from_files(info.curve_server_key, bad_secret)
        with client_for(server, curve=bad, timeout=0.5, retries=0) as client, \
                pytest.raises(BackendUnavailable, match="allow-keys"):
            client.ping()
        # The plug-in's path: the connection file plus the client's own key.
        with pytest.raises(BackendUnavailable, match="curve_client_key"):
            Client.from_connection_file(conn)
        connection.write_connection_file(conn, connection.ConnectionInfo(
            info.endpoint, info.key, pid=info.pid, curve_server_key=info.curve_server_key,
            curve_client_key=str(good_secret)))
        with Client.from_connection_file(conn, timeout=2.0) as client:
            assert client.ping()["queued"] == 0


def _curve_server_and_client(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    _, server_secret = generate_keypair(keys, "server")
    client_public, client_secret = generate_keypair(keys, "client")
    (allowed / "client.key").write_bytes(client_public.read_bytes())
    return (CurveServer(server_secret, allowed),
            CurveClient.from_files(load_keypair(server_secret)[0], client_secret))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_plain_client_of_a_curve_backend_is_told_of_the_mismatch(tmp_path, transport):
    """N9: a plain client of a CURVE backend was told that no backend answered and to start
    one. libzmq's monitor reports the mechanism mismatch (pyzmq); the pure transport reads
    CURVE in the backend's greeting: the same message on both."""
    curve, _ = _curve_server_and_client(tmp_path)
    with running_server(FakeEngine(), curve=curve) as server, \
            client_for(server, timeout=5.0, retries=0, transport=transport) as plain, \
            pytest.raises(WrongKey, match="uses CURVE encryption, but this client") as err:
        plain.ping()
    assert "no backend answered" not in str(err.value)
    assert "curve_server_key" in str(err.value)
    assert ("needs the pyzmq transport" in str(err.value)) == (transport == "zmtp")


def test_a_curve_client_of_a_plain_backend_is_told_of_the_mismatch(tmp_path):
    """N9, the reverse (CURVE needs pyzmq: one transport)."""
    _, curve_client = _curve_server_and_client(tmp_path)
    with running_server(FakeEngine()) as server, \
            client_for(server, curve=curve_client, timeout=5.0, retries=0) as client, \
            pytest.raises(WrongKey, match="does not use CURVE encryption"):
        client.ping()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_killed_backend_is_reported_within_10_s_whatever_the_job_timeout(tmp_path, transport):
    """11.6: after kill -9 the client used to wait its whole timeout × (retries + 1)."""
    conn = tmp_path / "backend.json"
    proc, _ = start([str(FAKE_SERVER), str(conn)])
    try:
        client = Client.from_connection_file(conn, timeout=130.0, retries=2,
                                             transport=transport)
        job = client.submit(bytes(48), 4, 4, 3, [(1, 1)], [(2, 2)])
        waiting = poll_until_progress(client, job)
        proc.kill()
        proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match="stopped answering") as err:
            poll_until_end(client, job, waiting)
        elapsed = time.monotonic() - t0
        client.close()
    finally:
        proc.kill()
    print(f"\nkilled backend reported after {elapsed:.1f} s (client timeout 130 s, "
          f"{transport})")
    assert elapsed < 10.0 and job in str(err.value)


def poll_until_progress(client: Client, job: str) -> list:
    events: list = []
    while not any(e.type == "progress" for e in events):
        with contextlib.suppress(JobTimeout):
            events.extend(client.events(job, timeout=0.05))
    return events


_PLUGIN = """
import os, sys, time
from protocol.client import Client, JobTimeout
client = Client.from_connection_file(sys.argv[1], timeout=5.0)
assert os.environ["DRAG_DIFFUSION_TRANSPORT"] in ("auto", client.transport), client.transport
client.hello()
job = client.submit(bytes(48), 4, 4, 3, [(1, 1)], [(2, 2)], prompt=sys.argv[2])
print(job, flush=True)
while True:  # the plug-in's loop: short waits between UI updates
    try:
        for event in client.events(job, timeout=0.2):
            if event.terminal:
                print(event.type, event.content.get("reason", ""), flush=True)
                sys.exit(0)
    except JobTimeout:
        pass
    time.sleep(float(sys.argv[3]))  # the UI's own work
"""


def plugin_process(conn: Path, prompt: str, ui_seconds: float = 0.0,
                   transport: str = "auto") -> tuple:
    env = {**os.environ, "DRAG_DIFFUSION_TRANSPORT": transport}
    proc = subprocess.Popen([sys.executable, "-c", _PLUGIN, str(conn), prompt,
                             str(ui_seconds)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=env)
    return proc, proc.stdout.readline().strip()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_killed_plugin_has_its_job_cancelled_within_10_s(tmp_path, transport):
    """11.7: the backend cancelled a dead plug-in's job only after its 60 s client TTL."""
    conn = tmp_path / "backend.json"
    engine = FakeEngine(steps=1000, delay=0.05)
    with running_server(engine, connection_file=conn) as server, \
            client_for(server) as observer:
        proc, job = plugin_process(conn, "", transport=transport)
        assert engine.step_started.wait(30)
        proc.kill()
        proc.wait(10)
        t0 = time.monotonic()
        while observer.ping()["running"] == job:  # (an attach would adopt the job)
            assert time.monotonic() - t0 < 30, "the dead plug-in's job kept running"
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        assert observer.attach(job)["state"] == "cancelled"
    print(f"\nkilled plug-in's job cancelled after {elapsed:.1f} s (client TTL "
          f"{server.client_ttl:g} s)")
    assert elapsed < 10.0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_live_plugin_on_a_busy_machine_keeps_its_job(tmp_path, transport):
    """11.7: a short TTL must not cancel a live, slow client: 3 TTLs of work, every core busy,
    and the client pausing 0.5 s between its polls (its heartbeats keep the job alive)."""
    conn = tmp_path / "backend.json"
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 2)]
    try:
        with running_server(FakeEngine(), connection_file=conn) as server:
            steps = int(3 * server.client_ttl / 0.1)
            proc, _ = plugin_process(conn, f"steps={steps} delay=0.05", ui_seconds=0.5,
                                     transport=transport)
            outcome = proc.communicate(timeout=limits.safety_net(600))[0].strip()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert outcome == "finished", outcome
