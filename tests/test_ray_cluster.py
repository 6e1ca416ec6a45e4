"""The Ray tier: the server as a gateway to a Ray Serve application (``serve --ray``).

A real local Ray cluster (raylet, GCS, Serve controller, replica processes; not Serve's
local-testing mode) is started once for the module with two fake GPUs; each test deploys its
own application of one or two replicas (``num_gpus=1`` each). The protocol behaviours of the
server's own tests (events, cancel within a step, error codes, the fair queue, the client TTL)
are checked again through it, with the scriptable ``FakeEngine`` in the replicas; affinity runs
the random tiny model. Figures (the two-replica throughput ratio, the affinity hit rate, the
replica-kill recovery time) are printed, not asserted.

Needs the cluster extra (``python install.py --cluster``); skipped without it unless
``DRAG_RAY_TESTS=1`` (CI), where a missing Ray fails.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fixtures_server import FakeEngine, RawPeer, client_for, image, running_server, submit
from limits import fired, safety_net

from protocol import wire
from protocol.client import Client, JobFailed

if os.environ.get("DRAG_RAY_TESTS") != "1":
    pytest.importorskip("ray", reason="the cluster extra is not installed "
                        "(python install.py --cluster)")

import ray
from ray import serve

from backend.server.ray_app import DEPLOYMENT
from backend.server.ray_worker import DIED, RayWorker, connect

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_names = itertools.count()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _descendants(roots: set[int]) -> set[int]:
    """``roots`` and every process under them (by parent id, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def _group(pgid: int) -> set[int]:
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    members.add(int(entry.name))
    return members


@dataclass
class Head:
    """A Ray head node that ``ray start --head --block`` runs for the module."""

    address: str
    token_path: Path
    process: subprocess.Popen


def start_head(tmp: Path, gpus: int, cpus: int) -> Head:
    """``ray start --head`` as a user runs it, on free ports, with its own temporary folder and
    token authentication (a token of its own: the driver and the CLI find it through
    ``RAY_AUTH_TOKEN_PATH``, as they would find ``~/.ray/auth_token``)."""
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
               f"--num-gpus={gpus}", f"--num-cpus={cpus}", f"--port={port}",
               "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}", "--include-dashboard=false",
               f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
    process = subprocess.Popen(command, env=env, start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()
    limit = safety_net(120)
    deadline = time.monotonic() + limit
    seen = []
    while "Ray runtime started" not in "".join(seen):
        try:
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            stop_head(process)
            raise AssertionError(fired("ray start --head", limit) + "".join(seen)) from None
    return Head(f"127.0.0.1:{port}", token, process)


def stop_head(process: subprocess.Popen) -> None:
    """Stop this head and every process it started (not ``ray stop``: that stops every Ray
    cluster on the machine)."""
    doomed = _descendants(_group(process.pid) | {process.pid})
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster with 2 fake GPUs, for the whole module, started by ``ray start``;
    the tests join it as the gateway does (``ray_worker.connect``)."""
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must be short
    saved = {name: os.environ.pop(name, None) for name in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    saved["RAY_AUTH_TOKEN_PATH"] = os.environ.get("RAY_AUTH_TOKEN_PATH")
    head = start_head(tmp, gpus=2, cpus=4)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(head.token_path)
    try:
        assert connect(head.address) == 2
        yield head
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        stop_head(head.process)
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        shutil.rmtree(tmp, ignore_errors=True)


def ray_server(load, *, replicas: int = 2, **kwargs):
    """``running_server`` whose jobs run on a fresh Serve application of ``replicas``."""
    name = f"test-{next(_names)}"
    return running_server(None, make_worker=lambda wake: RayWorker(
        load, wake, replicas=replicas, cpus_per_replica=0.25, env=ENV, app_name=name),
        **kwargs)


def fake(steps: int = 3, delay: float = 0.0):
    """A loader of ``FakeEngine`` for the replicas (each builds its own)."""
    return functools.partial(FakeEngine, steps, delay)


def events(client: Client, job_id: str, timeout: float = 60.0) -> list:
    return list(client.events(job_id, timeout=safety_net(timeout)))


def wait_for(what: str, condition, seconds: float = 60.0):
    limit = safety_net(seconds)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(fired(what, limit))


def running_replicas(app: str) -> int:
    status = serve.status().applications.get(app)
    if status is None or DEPLOYMENT not in status.deployments:
        return 0
    return status.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


# --- serve --ray as a user runs it ----------------------------------------------------------

def cli_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell: Ray's token found on disk (no ``RAY_AUTH_MODE``), no SD1.5 in the
    Hugging Face cache (the demo model stands in), one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def serve_cli(cluster: Head, tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "backend", "serve", "--ray", cluster.address, *extra,
         "--bind", "tcp://127.0.0.1:0", "--connection-file", str(tmp_path / "backend.json"),
         "--log-file", str(tmp_path / "backend.log")],
        cwd=ROOT, env=cli_env(tmp_path), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)


def first_line(process: subprocess.Popen, starts: str, seconds: float) -> str:
    """The first line of the process's stdout that starts with ``starts``."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()
    limit = safety_net(seconds)
    deadline = time.monotonic() + limit
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(fired(f"the backend's {starts} line", limit)) from None
        if line.startswith(starts):
            return line.strip()


def test_serve_ray_runs_an_edit_end_to_end_as_a_user_runs_it(cluster, tmp_path):
    """``python -m backend serve --ray HOST:PORT --replicas 2`` on a cluster that ``ray start``
    runs with token authentication; the default model is missing, so every replica loads the
    demo model; an Inpaint4Drag edit through the protocol; shutdown through the protocol."""
    t0 = time.monotonic()
    process = serve_cli(cluster, tmp_path, "--replicas", "2")
    try:
        ready = first_line(process, "READY", 240)
        ready_in = time.monotonic() - t0
        conn = tmp_path / "backend.json"
        assert ready.split()[2] == str(conn) and "demo model" in ready
        assert running_replicas("drag-diffusion") == 2
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        mask = np.zeros((48, 64), np.uint8)
        mask[18:32, 12:28] = 255
        with Client.from_connection_file(conn, timeout=10.0) as client:
            info = client.hello()
            t1 = time.monotonic()
            job = client.submit(pixels, 64, 48, 3, [(20, 25)], [(36, 25)], mask=mask.tobytes(),
                                method="inpaint4drag", params={"work_size": 64}, seed=1)
            got = events(client, job, timeout=240)
            edit_in = time.monotonic() - t1
            assert client.shutdown() == []
        assert process.wait(safety_net(60)) == 0
    finally:
        process.kill()
        stderr = process.stderr.read()
    print(f"\nserve --ray with 2 replicas of the demo model: READY {ready_in:.1f} s after the "
          f"command; an Inpaint4Drag edit (64x48) {edit_in:.2f} s from submit to finished")
    assert info["model"]["state"] == "ready" and info["device"] == "cpu", info["model"]
    assert "inpaint4drag" in info["methods"]
    types = [e.type for e in got]
    assert types[:2] == ["queued", "started"] and types[-1] == "finished", stderr[-2000:]
    done = got[-1]
    assert (done["width"], done["height"], done["channels"]) == (64, 48, 3)
    assert done.image != pixels.tobytes() and done["handles"] == [[36.0, 25.0]]
    assert "drag-diffusion" not in serve.status().applications  # the gateway removed it
    assert not conn.exists()
    assert f"job {job} finished" in (tmp_path / "backend.log").read_text()


def test_serve_ray_with_more_replicas_than_gpus_says_so_in_one_line(cluster, tmp_path):
    process = serve_cli(cluster, tmp_path, "--replicas", "3")
    try:
        assert process.wait(safety_net(60)) == 2
    finally:
        process.kill()
    errors = [line for line in process.stderr.read().splitlines() if " ERROR " in line]
    assert errors and errors[-1].endswith(
        "--replicas 3 needs 3 GPUs; the Ray cluster has 2"), errors


# --- the protocol through the gateway --------------------------------------------------------

def test_a_job_runs_on_a_replica_with_every_event(cluster):
    with ray_server(fake(steps=4)) as server, client_for(server, timeout=10) as client:
        hello = client.hello()
        job = submit(client, prompt="a photo", seed=5, preview=True)
        got = events(client, job)
    assert hello["model"]["state"] == "ready" and hello["device"] == "cpu"
    types = [e.type for e in got]
    assert types[:2] == ["queued", "started"] and types[-1] == "finished"
    progress = [(e["phase"], e["step"]) for e in got if e.type == "progress"]
    assert progress[0] == ("inversion", 0) and progress[-1] == ("drag", 3)
    assert any(e.type == "preview" and e.image == image() for e in got)
    done = got[-1]
    assert done.image == bytes(255 - b for b in image())
    assert done["handles"] == [[4.0, 3.0]] and done["stats"] == {"steps": 4, "shape": [1, 2]}
    assert job in server._worker.placements


def test_cancel_reaches_the_replica_within_a_step(cluster):
    with ray_server(fake(steps=1000, delay=0.2)) as server, \
            client_for(server, timeout=10) as client:
        job = submit(client)
        stream = client.events(job, timeout=safety_net(60))
        while next(stream).type != "progress":
            pass
        t0 = time.monotonic()
        assert client.cancel(job) == "cancelling"
        rest = list(stream)
        latency = time.monotonic() - t0
    print(f"\ncancel on a replica: cancelled event {latency * 1000:.0f} ms after the cancel "
          f"(steps of 200 ms, board polled every 50 ms)")
    assert rest[-1].type == "cancelled" and rest[-1]["reason"] == "client"
    assert sum(e.type == "progress" for e in rest) <= 2  # the step under way, at most one more


def test_error_codes_are_those_of_one_gpu(cluster):
    with ray_server(fake()) as server, client_for(server, timeout=10) as client:
        with pytest.raises(JobFailed) as refused:
            submit(client, handles=[(100, 1)])
        with pytest.raises(JobFailed) as oom:
            events(client, submit(client, prompt="raise=oom"))
        with pytest.raises(JobFailed) as bug:
            events(client, submit(client, prompt="raise=bug"))
        assert events(client, submit(client))[-1].type == "finished"
    assert refused.value.code == wire.INVALID_INPUT
    assert oom.value.code == wire.OUT_OF_MEMORY and "work_size" in oom.value.message
    assert bug.value.code == wire.ENGINE_ERROR and "something broke" in bug.value.message


def test_the_fair_queue_holds_across_replicas(cluster):
    with ray_server(fake(steps=1000, delay=0.02)) as server, \
            client_for(server, timeout=10) as a, client_for(server, timeout=10) as b:
        blockers = [submit(a, seed=0), submit(a, seed=1)]  # both replicas busy
        wait_for("both blockers placed",
                 lambda: all(j in server._worker.placements for j in blockers))
        a_jobs = [submit(a, seed=n, prompt="steps=2") for n in (2, 3, 4)]
        b_job = submit(b, seed=9, prompt="steps=2")
        queued = next(e for e in b.events(b_job) if e.type == "queued")
        assert a.ping()["queued"] == 4
        a.cancel(blockers[0])
        assert events(b, b_job)[-1].type == "finished"
        a.cancel(blockers[1])
        assert all(events(a, job)[-1].type == "finished" for job in a_jobs)
        started = {job: server._worker.placements[job].started for job in [*a_jobs, b_job]}
    assert queued["position"] == 2  # behind a's next job only, not behind all three
    assert started[a_jobs[0]] <= started[b_job] <= started[a_jobs[1]] <= started[a_jobs[2]]


def test_a_silent_clients_jobs_are_cancelled_and_the_rest_run(cluster):
    with ray_server(fake(steps=1000, delay=0.02), client_ttl=1.0) as server:
        ghost = RawPeer(server)
        for n in (1, 2, 3):
            content = {"job_id": f"ghost{n}", "width": 8, "height": 6, "channels": 3,
                       "handles": [[1, 1]], "targets": [[2, 2]], "method": "dragdiffusion"}
            assert ghost.request(wire.SUBMIT, content, job_id=f"ghost{n}",
                                 buffers=[image()]).msg_type == wire.SUBMIT_REPLY
        wait_for("the ghost's jobs placed",
                 lambda: {"ghost1", "ghost2"} <= set(server._worker.placements))
        ghost.close()  # gone without a word
        with client_for(server, timeout=10) as client:
            assert events(client, submit(client, prompt="steps=2"))[-1].type == "finished"
            states = [client.attach(f"ghost{n}")["state"] for n in (1, 2, 3)]
    assert states == ["cancelled"] * 3


# --- scaling out ----------------------------------------------------------------------------

def _session_wall(server, clients: int, jobs_each: int) -> float:
    """Several clients each submitting ``jobs_each`` edits at once: the wall time."""
    done: list[str] = []

    def work(n: int) -> None:
        with client_for(server, timeout=10) as client:
            ids = [submit(client, seed=n * 100 + k) for k in range(jobs_each)]
            done.extend(events(client, job)[-1].type for job in ids)

    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(safety_net(120))
    wall = time.monotonic() - t0
    assert done == ["finished"] * (clients * jobs_each)
    return wall


def test_two_replicas_run_several_clients_jobs_in_parallel(cluster):
    """Jobs of 1 s each (sleeping steps: what the scheduling gives, not the CPU's speed)."""
    with ray_server(fake(steps=5, delay=0.1), replicas=2) as server:
        two = _session_wall(server, clients=3, jobs_each=2)
        placements = list(server._worker.placements.values())
    with ray_server(fake(steps=5, delay=0.1), replicas=1) as server:
        one = _session_wall(server, clients=3, jobs_each=2)
    print(f"\n6 jobs of ~1 s from 3 clients: {one:.2f} s on 1 replica, {two:.2f} s on 2: "
          f"throughput ratio {one / two:.2f}")
    assert len({p.replica for p in placements}) == 2
    firsts = sorted(placements, key=lambda p: p.started)[:2]
    assert firsts[0].replica != firsts[1].replica
    assert firsts[1].started - firsts[0].started < 0.5  # both ran at once, not in turn


def tiny_request(image_seed: int, drag: int) -> dict:
    rng = np.random.default_rng(image_seed)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return {"image": pixels.tobytes(), "width": 64, "height": 48, "channels": 3,
            "handles": [(20, 25)], "targets": [(24 + 4 * drag, 25)], "method": "dragdiffusion",
            "params": {"work_size": 64, "lora_steps": 4, "lora_batch": 1,
                       "n_inference_steps": 10, "drag_steps": 2, "reach_threshold": 0.0},
            "prompt": "a red disc", "seed": 3}


def test_a_redrag_lands_on_the_replica_holding_its_cache(cluster, tiny_model_dir, tmp_path):
    """A scripted session of drags on two images with the tiny model, one edit at a time (the
    holder is always free): every re-drag lands where its image's cache is; an image that
    arrives on a replica evicts the one it held (its cached tensors are freed first)."""
    from backend.engine.pipeline import DragEngine

    load = functools.partial(DragEngine.load, str(tiny_model_dir), device="cpu",
                             lora_cache_dir=str(tmp_path / "lora"))
    session = [0, 1, 0, 0, 1, 1, 0, 1, 2, 2, 0]  # image of each drag, in order
    with ray_server(load) as server, client_for(server, timeout=10) as client:
        jobs = []
        for drag, which in enumerate(session):
            job = client.submit(**tiny_request(which, drag))
            assert events(client, job, timeout=120)[-1].type == "finished"
            jobs.append(job)
        placed = [server._worker.placements[job] for job in jobs]
    holder: dict[int, str] = {}  # image -> the replica that holds its cache
    redrags = hits = 0
    for n, (which, where) in enumerate(zip(session, placed, strict=True)):
        redrags += which in session[:n]
        hits += where.warm
        if which in holder:
            assert where.warm == (holder[which] == where.replica)
        for image_, replica in list(holder.items()):
            if replica == where.replica and image_ != which:
                del holder[image_]  # evicted by this one
        holder[which] = where.replica
        assert (where.cached_bytes > 0) == where.warm  # cold: the old image's tensors freed
    print(f"\naffinity over {len(session)} drags of 3 images ({redrags} re-drags): "
          f"{hits}/{redrags} re-drags on the replica holding their cache "
          f"(hit rate {hits / redrags:.0%})")
    assert hits >= redrags - 1  # image 2 arriving may evict what a later re-drag wanted
    assert [p.warm for p in placed[:4]] == [False, False, True, True]


def test_a_redrag_whose_holder_is_busy_goes_to_the_other_replica(cluster):
    with ray_server(fake(steps=1000, delay=0.02)) as server, \
            client_for(server, timeout=10) as client:
        first = submit(client, prompt="a", seed=1)  # holds key A on some replica
        wait_for("the first job placed", lambda: first in server._worker.placements)
        t0 = time.monotonic()
        again = submit(client, prompt="a steps=2", seed=1, targets=[(5, 3)])
        assert events(client, again)[-1].type == "finished"
        waited = time.monotonic() - t0
        client.cancel(first)
        events(client, first)
        a, b = server._worker.placements[first], server._worker.placements[again]
    print(f"\nre-drag while its holder is busy: ran on the other replica, recomputing, "
          f"finished in {waited:.2f} s")
    assert a.replica != b.replica and not b.warm


# --- faults -----------------------------------------------------------------------------------

def _watch_replicas(app: str, t0: float, seen: dict[str, float], stop: threading.Event) -> None:
    """Record when Serve first counts fewer than two running replicas, then two again."""
    while not stop.is_set():
        count = running_replicas(app)
        if count < 2 and "down" not in seen:
            seen["down"] = time.monotonic() - t0
        if count == 2 and "down" in seen:
            seen["up"] = time.monotonic() - t0
            return
        time.sleep(0.05)


def test_a_killed_replica_fails_only_its_job_and_comes_back(cluster):
    with ray_server(fake(steps=1000, delay=0.05)) as server, \
            client_for(server, timeout=10) as client:
        app = server._worker._app_name
        victim = submit(client, seed=1)
        other = submit(client, seed=2, prompt="steps=40")  # ~4 s on the other replica
        queued = submit(client, seed=3, prompt="steps=2")
        wait_for("both jobs placed",
                 lambda: {victim, other} <= set(server._worker.placements))
        pid = server._worker.placements[victim].pid
        seen: dict[str, float] = {}
        stop = threading.Event()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        watcher = threading.Thread(target=_watch_replicas, args=(app, t0, seen, stop))
        watcher.start()
        try:
            with pytest.raises(JobFailed) as err:
                events(client, victim)
            failed_in = time.monotonic() - t0
            assert events(client, other)[-1].type == "finished"
            assert events(client, queued)[-1].type == "finished"
            wait_for("Serve to run two replicas again", lambda: "up" in seen, 120)
        finally:
            stop.set()
            watcher.join()
        after = submit(client, seed=4, prompt="steps=2")
        assert events(client, after)[-1].type == "finished"
    print(f"\nreplica killed mid-job: its job failed {failed_in:.2f} s after the kill; Serve "
          f"counted it gone at {seen['down']:.2f} s and two healthy replicas again at "
          f"{seen['up']:.2f} s")
    assert err.value.code == wire.ENGINE_ERROR and err.value.message == DIED
