"""The Ray tier: the server as a gateway to a Ray Serve application (``serve --ray``).

A real local Ray cluster (``ray start --head`` with two fake GPUs and token authentication:
raylet, GCS, Serve controller, replica processes; not Serve's local-testing mode) is started
once for the module and stopped by its own processes (not ``ray stop``, which stops every
cluster on the machine). On it:

- ``python -m backend serve --ray HOST:PORT --replicas 2`` as a user runs it: READY, an
  Inpaint4Drag edit on the demo model, shutdown through the protocol; its one-line refusals.
- The protocol through the gateway with the scriptable ``FakeEngine`` in two replicas (events,
  cancel within a step, error codes, the fair queue, the client TTL), scaling out (sleeping
  steps, then real compute with the random tiny model), affinity, a killed replica.
- The server's own protocol tests (test_server.py, test_server_prepare.py) again, in Ray mode
  (the end of this file says which and how).

Figures (throughput ratios, affinity hit rate, recovery time, the CLI's times, the tier's own
wall time) are printed, not asserted. Needs the cluster extra (``python install.py --cluster``);
skipped without it unless ``DRAG_RAY_TESTS=1`` (CI), where a missing Ray fails.
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
import test_server
import test_server_prepare
from fixtures_server import (
    FakeEngine,
    RawPeer,
    client_for,
    image,
    on_one_thread,
    running_server,
    submit,
)
from limits import fired, safety_net

from protocol import wire
from protocol.client import Client, JobFailed

if os.environ.get("DRAG_RAY_TESTS") != "1":
    pytest.importorskip("ray", reason="the cluster extra is not installed "
                        "(python install.py --cluster)")

import ray
from fixtures_ray import EngineRecord, RecordedFakeEngine, mirror
from ray import serve

from backend.engine.params import MethodTable
from backend.server.ray_app import DEPLOYMENT, NAMESPACE
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
    t0 = time.monotonic()
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
        print(f"\nthe Ray tier took {time.monotonic() - t0:.0f} s from `ray start` to its stop")


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

def _session_wall(server, clients: int, jobs_each: int, request=None,
                  ended: dict[str, float] | None = None) -> float:
    """Several clients each submitting ``jobs_each`` edits at once: the wall time.
    ``request(n)``: the n-th edit's submit arguments (default: ``submit``'s small one);
    ``ended`` gets each job's end (``time.monotonic()`` when its last event came)."""
    done: list[str] = []
    ended = {} if ended is None else ended

    def work(n: int) -> None:
        with client_for(server, timeout=10) as client:
            ids = [client.submit(**request(n * jobs_each + k)) if request is not None
                   else submit(client, seed=n * 100 + k) for k in range(jobs_each)]
            for job in ids:
                done.append(events(client, job, timeout=120)[-1].type)
                ended[job] = time.monotonic()

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


def test_two_replicas_of_the_tiny_model_run_real_compute_in_parallel(cluster, tiny_model_dir,
                                                                      tmp_path):
    """Real compute: the random tiny model in each replica, torch on one thread; 6 edits of 6
    images from 3 clients (each ~0.7 s on this CPU), on 1 replica then on 2. The ratio is a
    figure; asserted: both replicas ran edits, and edits ran at the same time on both."""
    from backend.engine.pipeline import DragEngine

    def load(replicas: int):  # a LoRA cache of its own: each configuration trains its LoRAs
        return functools.partial(on_one_thread, functools.partial(
            DragEngine.load, str(tiny_model_dir), device="cpu",
            lora_cache_dir=str(tmp_path / f"lora{replicas}")))

    walls, runs = {}, {}
    for replicas in (1, 2):
        def request(n: int, replicas=replicas) -> dict:  # other images for each configuration
            return tiny_request(100 * replicas + n, 1)

        with ray_server(load(replicas), replicas=replicas) as server:
            with client_for(server, timeout=10) as client:  # each replica loads and warms up
                warm = [client.submit(**tiny_request(900 + k, 0)) for k in range(replicas)]
                assert all(events(client, job, timeout=120)[-1].type == "finished"
                           for job in warm)
            ended: dict[str, float] = {}
            walls[replicas] = _session_wall(server, clients=3, jobs_each=2, request=request,
                                            ended=ended)
            runs[replicas] = [(server._worker.placements[job], end)
                              for job, end in ended.items()]
    one, two = walls[1], walls[2]
    print(f"\n6 tiny-model edits (64x48, work_size 64, 10 steps, LoRA 4 steps) from 3 "
          f"clients, one torch thread per replica: {one:.2f} s on 1 replica, {two:.2f} s on "
          f"2: throughput ratio {one / two:.2f} ({os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f})")
    assert len({placed.replica for placed, _ in runs[2]}) == 2
    overlapping = [(a, b) for a in runs[2] for b in runs[2]
                   if a[0].replica != b[0].replica and a[0].started < b[0].started < a[1]]
    assert overlapping, "no two edits ran at the same time on the two replicas"


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


# --- the server's own tests, in Ray mode ------------------------------------------------------
#
# The protocol tests of test_server.py and test_server_prepare.py run here again with their
# ``running_server`` replaced (``ray_mode``): a gateway whose jobs run on one replica (one GPU's
# behaviour: the same order, the same queue) of a ``FakeEngine`` scripted like the test's; the
# test's engine shows what the replica's did (fixtures_ray). A default engine runs on the
# module's shared application (no deploy per test); one with its own table, or a test's own
# loader, deploys its application. Left out, and why:
#   test_every_preview_the_engine_hands_over_is_sent: patches engine_worker in the test
#     process; the replica runs its own copy.
#   test_while_the_model_loads_the_announced_table_is_sent_and_checked,
#   test_queued_jobs_are_checked_again_when_the_loaded_model_differs,
#   test_a_queued_job_is_checked_again_with_attentions_cost,
#   test_jobs_queued_while_the_model_loads_run_afterwards: build a ``Server`` directly and hold
#     its load on a ``threading.Event`` of the test process, which a replica cannot wait on.
#   test_a_missing_default_model_falls_back_to_the_demo_model_and_says_so: counts the runs of
#     the fallback's own engine object, which a replica unpickles as a copy (the demo fallback
#     in Ray mode is the CLI test's, above, for real).
#   test_a_large_result_crosses_server_and_client_without_a_full_copy: measures the Python
#     allocations of the process that is the client and the server; a gateway receives each
#     result from Ray (its own copy, by design), and its engine is another subclass.
#   test_no_backend_raises_within_the_timeout, test_refuses_a_public_bind_without_curve,
#   test_after_a_wrong_key_the_same_client_keeps_saying_so, test_fair_queue_order_is_round_robin
#   and the JobTable/RanIds unit tests: no job runs (a client, a login or a data structure).
#   test_server_prepare's tiny-engine tests: the engine's caches in the test process.

REUSED = {
    test_server: [
        "test_hello_describes_the_backend",
        "test_hello_carries_the_parameter_table_and_method_descriptions",
        "test_hello_announces_the_engines_own_table",
        "test_a_submit_without_a_method_runs_the_backends_default",
        "test_a_submit_the_engine_would_refuse_on_its_canvas_is_refused_before_queueing",
        "test_the_engines_table_decides_what_fits",
        "test_full_job_events_in_order",
        "test_finished_carries_the_pixel_type_and_the_engine_warnings",
        "test_slow_steps_all_reported",
        "test_preview_events_when_asked",
        "test_version_mismatch_is_a_clear_error",
        "test_control_messages_are_not_stuck_behind_a_running_edit",
        "test_cancel_running_job_within_one_step",
        "test_cancel_queued_job_at_once",
        "test_duplicate_submit_runs_once",
        "test_expired_result_is_never_run_again",
        "test_each_client_keeps_its_results_during_another_clients_cancel_storm",
        "test_two_concurrent_clients_both_get_results",
        "test_fair_queueing_across_clients",
        "test_out_of_memory_fails_the_job_and_the_next_runs",
        "test_engine_bug_is_an_engine_error_and_the_server_keeps_serving",
        "test_missing_model_is_reported_and_the_server_keeps_serving",
        "test_invalid_submits_are_refused",
        "test_a_tall_strip_is_refused_before_any_work",
        "test_queue_full_and_unknown_job",
        "test_a_vanished_client_does_not_wedge_the_queue",
        "test_a_vanished_clients_job_is_cancelled_once_not_at_every_housekeeping",
        "test_events_survive_a_reconnect",
        "test_wrong_key_says_the_connection_file_is_stale",
        "test_connection_file_lifecycle",
        "test_a_stale_connection_file_others_can_read_is_replaced_with_a_notice",
        "test_shutdown_cancels_everything_and_stops",
        "test_one_log_line_per_job",
        "test_an_image_over_the_frame_limit_is_refused_before_sending",
        "test_an_ipv6_loopback_bind_serves",
        "test_an_available_model_is_served_as_today_with_a_fallback_configured",
    ],
    test_server_prepare: [
        "test_a_matching_submit_joins_the_running_prepare",
        "test_a_submit_that_matches_a_waiting_prepare_supersedes_it",
        "test_a_changed_setting_replaces_the_prepare_and_an_unchanged_one_is_a_duplicate",
        "test_a_cancelled_dialog_discards_the_prepare",
        "test_another_clients_submit_is_not_delayed_beyond_one_step",
        "test_a_prepare_waits_while_edits_are_queued",
        "test_a_prepare_is_checked_and_counted_like_a_submit",
        "test_a_silent_dialogs_prepare_is_cancelled",
        "test_shutdown_cancels_a_joined_submit_and_its_prepare",
        "test_cancelling_a_joined_submit_stops_its_own_prepare",
    ],
}
for _module, _reused in REUSED.items():
    for _test in _reused:
        globals()[_test] = getattr(_module, _test)  # collected here, run in Ray mode
RECORD = f"fake-engine-record-{os.getpid()}"


@dataclass
class SharedApp:
    """The module's application of one ``RecordedFakeEngine`` replica, deployed once."""

    name: str
    handle: object
    board: object
    loaded: object  # its ModelLoaded


class SharedAppWorker(RayWorker):
    """A gateway's worker on the shared application: it neither deploys nor removes it."""

    def __init__(self, app: SharedApp, wake) -> None:
        super().__init__(None, wake, replicas=1, app_name=app.name)
        self._handle, self._board, self._loaded = app.handle, app.board, app.loaded

    def start(self) -> None:
        self._post(self._loaded)

    def reload(self) -> None:
        self._post(self._loaded)

    def _undeploy(self, board: bool = False) -> None:
        self._join_jobs()


@pytest.fixture(scope="module")
def engine_record(cluster):
    record = EngineRecord.options(name=RECORD, namespace=NAMESPACE).remote()
    yield record
    ray.kill(record)


def one_replica(load, wake, fallback=None, name: str = "reused-fake") -> RayWorker:
    """A worker of one replica that reserves no GPU (the two fake ones stay for the tests
    above)."""
    return RayWorker(load, wake, fallback, replicas=1, gpus_per_replica=0.0,
                     cpus_per_replica=0.25, env=ENV, app_name=name)


@pytest.fixture(scope="module")
def shared_app(cluster, engine_record):
    worker = one_replica(functools.partial(RecordedFakeEngine, RECORD), lambda: None)
    worker._deploy()
    (loaded,) = list(worker.events())
    assert loaded.state == "ready", loaded.error
    yield SharedApp(worker._app_name, worker._handle, worker._board, loaded)
    worker._undeploy(board=True)


@contextlib.contextmanager
def ray_mode_server(shared: SharedApp, record, engine=None, *, load=None, **kwargs):
    """``fixtures_server.running_server`` in Ray mode (see above)."""
    fallback = kwargs.get("fallback")
    if load is None:
        mirror(engine, record)
        if fallback is None and engine.table.as_hello() == MethodTable().as_hello():
            with running_server(None, make_worker=lambda wake: SharedAppWorker(shared, wake),
                                **kwargs) as server:
                yield server
            return
        load = functools.partial(RecordedFakeEngine, RECORD, engine.table)
    name = f"test-{next(_names)}"
    with running_server(None, make_worker=lambda wake: one_replica(load, wake, fallback, name),
                        **kwargs) as server:
        yield server


@pytest.fixture(autouse=True)
def ray_mode(request, monkeypatch):
    """For a test of ``REUSED``: its module's ``running_server`` is ``ray_mode_server``."""
    module = sys.modules.get(request.function.__module__)
    if module in REUSED:
        shared, record = request.getfixturevalue("shared_app"), request.getfixturevalue(
            "engine_record")
        monkeypatch.setattr(module, "running_server",
                            functools.partial(ray_mode_server, shared, record))


# --- a gateway that has left the cluster -----------------------------------------------------

_LEFT_BEHIND = """
import logging
import ray
from backend.engine.types import CancelToken
from backend.server.jobs import EDIT, Job
from backend.server.ray_worker import RayWorker
logging.disable(logging.CRITICAL)
worker = RayWorker(lambda: None, lambda: None, replicas=1)
job = Job(job_id="j" * 8, session="", route="", parent={}, fingerprint=b"", request={},
          buffers=[], kind=EDIT, cancel=CancelToken())
worker._undeploy(board=True)
worker._stream(job)
worker._deploy()
posted = list(worker.events())
print(ray.is_initialized(), [type(event).__name__ for event in posted])
print(posted[0].content["message"], "|", posted[1].error)
"""


def test_a_worker_thread_left_behind_never_joins_or_starts_a_cluster():
    """A job's or the removal's thread that runs after the gateway left the cluster (a server
    stopped, ``ray.shutdown()``) must fail, not let Serve join a cluster by itself: in a full
    CI run one started a new local cluster from pytest's own process after the Ray tier, and
    Ray ended that process 60 s after the cluster went (\"Failed to connect to GCS within 60
    seconds ... The program will terminate\"), in the middle of later tests."""
    result = subprocess.run([sys.executable, "-c", _LEFT_BEHIND], cwd=ROOT, text=True,
                            capture_output=True, timeout=safety_net(120),
                            env={**os.environ, **ENV, "RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    state, messages = result.stdout.splitlines()
    assert state == "False ['JobMessage', 'ModelLoaded']"  # not joined; the job and load failed
    assert messages.count("not joined to a Ray cluster") == 2, messages
