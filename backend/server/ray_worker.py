"""The gateway's worker for ``serve --ray``: jobs run on a Ray Serve application instead of the
server's own engine thread.

It has the engine thread's face (``EngineWorker``: start, run, stop, reload, idle, events), so
the server keeps every policy: the fair queue, the client TTL, prepares, retention and the
protocol's error codes; it dispatches up to ``slots`` jobs at once, one per replica. Each running
job has a thread here that iterates the replica's event stream (``ray_app.EditReplica.run``)
and posts the events as the engine thread would. A cancel reaches the replica through the
cancel board (``ray_app.CancelBoard``). A replica that dies mid-job fails only that job (an
``engine_error`` that says so); Serve starts a new replica, and the queue, kept here, loses
nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.engine.interface import Engine
from backend.engine.params import MethodTable
from backend.engine.types import CancelToken
from backend.model_choice import Fallback
from backend.server.engine_worker import EventOutbox, JobMessage, ModelLoaded
from backend.server.jobs import Job
from protocol import wire

log = logging.getLogger("backend.server")

INSTALL_HINT = "install the cluster extra: python install.py --cluster"
REPO = Path(__file__).resolve().parents[2]  # on every node's PYTHONPATH (same checkout path)
DIED = ("the GPU worker running this edit stopped (its process died: killed, or out of "
        "memory); the cluster starts a new one: submit the edit again")


def import_ray():
    """``ray`` and ``ray.serve``, or a ``RuntimeError`` with one line saying how to get them."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RuntimeError(f"--ray needs Ray Serve, which is not installed; {INSTALL_HINT}") \
            from None
    return ray, serve


def joined_ray():
    """``ray`` and ``ray.serve`` while this process is joined to the cluster, else a
    ``RuntimeError``: Serve's calls would otherwise join (or start!) a cluster by themselves,
    e.g. a job's thread that ends after ``ray.shutdown()``."""
    ray, serve = import_ray()
    if not ray.is_initialized():
        raise RuntimeError("not joined to a Ray cluster (it was left or never joined)")
    return ray, serve


def connect(address: str) -> int:
    """Join the Ray cluster at ``address`` (``auto``: the one ``ray start`` runs on this
    machine, else a new local one); return how many GPUs it has."""
    ray, _ = import_ray()
    from backend.server.ray_app import NAMESPACE

    if not ray.is_initialized():
        if address != "auto":
            use_token_if_any()
        try:
            ray.init(address=None if address == "auto" else address, namespace=NAMESPACE,
                     logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as exc:
            raise RuntimeError(f"could not join the Ray cluster at {address}: {exc}; is "
                               f"`ray start` running there, and, when the cluster uses token "
                               f"authentication, is its token on this machine "
                               f"(~/.ray/auth_token or RAY_AUTH_TOKEN)?") from None
    return int(ray.cluster_resources().get("GPU", 0))


def use_token_if_any() -> None:
    """Send Ray's authentication token when this machine has one (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is unset.

    ``ray start --head`` turns token authentication on when it finds a token, but Ray's driver
    sends it only for ``auto``, not for an explicit address, which then fails after 20 s with
    "Failed to connect". A cluster without authentication accepts a driver that sends one."""
    # What Ray itself does for ``auto`` (it also refreshes Ray's cached config).
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@dataclass(frozen=True)
class Placement:
    """Where a job ran: the replica, its process, and whether it held the job's cache key."""

    replica: str
    pid: int
    warm: bool
    cached_bytes: int  # the replica's cached tensors when the job started (after any eviction)
    started: float


class RemoteEngine:
    """What the server reads of an engine (``table``, ``info()``), as a replica described it."""

    def __init__(self, table: MethodTable, info: dict[str, Any]) -> None:
        self.table, self._info = table, info

    def info(self) -> dict[str, Any]:
        return dict(self._info)


class BoardToken(CancelToken):
    """A running job's cancel token on the gateway: cancelling it also tells the cancel board,
    which the job's replica polls."""

    def __init__(self, board: Any, job_id: str) -> None:
        super().__init__()
        self._board, self._job_id = board, job_id

    def cancel(self) -> None:
        if not self.cancelled:
            self._board.cancel.remote(self._job_id)  # returns at once
        super().cancel()


class RayWorker(EventOutbox):
    """Runs jobs on a Ray Serve application of ``replicas`` replicas (``slots`` at once)."""

    # How long a stopping server waits for this worker: the application's removal must reach
    # Serve's controller, or its replicas keep their GPUs after the gateway has gone.
    stop_seconds = 60.0

    def __init__(self, load_engine: Callable[[], Engine], wake: Callable[[], None],
                 fallback: Fallback | None = None, *, replicas: int,
                 gpus_per_replica: float = 1.0, cpus_per_replica: float = 1.0,
                 env: dict[str, str] | None = None, app_name: str = "drag-diffusion",
                 fresh: bool = False) -> None:
        """``fresh``: ``load_engine()`` gives the replicas' loader and demo stand-in, a pair
        (asked at each deploy, so a reload after a download loads what is served now), instead
        of being the loader, with ``fallback``."""
        self.slots = replicas
        self._fresh = fresh
        super().__init__(wake)
        self._load_engine, self._fallback = load_engine, fallback
        self._gpus, self._cpus = gpus_per_replica, cpus_per_replica
        self._env = {"PYTHONPATH": os.pathsep.join(filter(None, [
            str(REPO), os.environ.get("PYTHONPATH")])), **(env or {})}
        self._app_name = app_name
        self._board_name = f"{app_name}-cancel-board-{os.getpid()}"
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._board: Any = None
        self._handle: Any = None
        self.placements: dict[str, Placement] = {}  # job id -> where it ran

    # --- the face of EngineWorker -----------------------------------------------------------
    def start(self) -> None:
        self._spawn(self._deploy, "ray-deploy")

    def run(self, job: Job) -> None:
        job.cancel = BoardToken(self._board, job.job_id)
        self._spawn(lambda: self._stream(job), f"ray-job-{job.job_id[:8]}")

    def stop(self) -> None:
        """Remove the application and the cancel board (the server cancelled the jobs)."""
        self._spawn(lambda: self._undeploy(board=True), "ray-undeploy")

    def reload(self) -> None:
        """Deploy again: every replica loads the models again (a download added one)."""
        self._spawn(lambda: (self._undeploy(), self._deploy()), "ray-reload")

    def is_alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- threads ------------------------------------------------------------------------------
    def _spawn(self, target: Callable[[], Any], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _deploy(self) -> None:
        """Start the application and post ``ModelLoaded`` from a replica's description."""
        try:
            _, serve = joined_ray()
            from backend.server.ray_app import NAMESPACE, CancelBoard, build_app

            if self._board is None:
                self._board = CancelBoard.options(name=self._board_name,
                                                  namespace=NAMESPACE).remote()
            serve.start(proxy_location="Disabled")  # no HTTP: the gateway is the way in
            loader, fallback = (self._load_engine() if self._fresh
                                else (self._load_engine, self._fallback))
            app = build_app(loader, fallback, self._board_name,
                            replicas=self.slots, gpus_per_replica=self._gpus,
                            cpus_per_replica=self._cpus, env=self._env)
            self._handle = serve.run(app, name=self._app_name, route_prefix=None)
            about = self._handle.describe.remote().result()
        except Exception as exc:
            log.exception("starting the Ray Serve application failed")
            first = (str(exc).strip().splitlines() or [""])[0][:300]  # Ray's can be pages
            self._post(ModelLoaded("error", f"the Ray cluster could not start the engine: "
                                   f"{type(exc).__name__}: {first} (backend.log has the rest)",
                                   None))
            return
        engine = (RemoteEngine(about["table"], about["info"]) if about["state"] == "ready"
                  else None)
        log.info("Ray Serve application %s: %d replica(s), model %s", self._app_name,
                 self.slots, about["info"].get("model"))
        self._post(ModelLoaded(about["state"], about["error"], engine, demo=about["demo"]))

    def _undeploy(self, board: bool = False) -> None:
        try:
            self._join_jobs()
            ray, serve = joined_ray()
            serve.delete(self._app_name)
            if board and self._board is not None:
                ray.kill(self._board)
        except Exception:
            log.exception("removing the Ray Serve application failed")

    def _join_jobs(self) -> None:
        """Wait for the jobs' threads to post their last events."""
        for thread in list(self._threads):
            if thread is not threading.current_thread() and thread.name.startswith("ray-job"):
                thread.join(30.0)

    def _stream(self, job: Job) -> None:
        """Run ``job`` on a replica and post its events; a replica that dies fails the job."""
        ray, _ = import_ray()  # its exceptions; the stream itself needs a joined process
        request = {"job_id": job.job_id, "kind": job.kind, "request": job.request}
        buffers = [bytes(buffer) for buffer in job.buffers]
        terminal = None
        try:
            joined_ray()
            stream = self._handle.options(stream=True, multiplexed_model_id=job.key or "") \
                .run.remote(request, buffers)
            for event in stream:
                if event["type"] == "placed":
                    self._placed(job, event)
                    continue
                message = JobMessage(job, event["type"], event["content"], event["buffers"])
                if message.terminal:  # the stream ends after it: read to its end, so that
                    terminal = message  # the replica counts itself free before the next job
                    continue
                self._post(message)
        except ray.exceptions.RayActorError as exc:
            log.warning("job %s: its replica died (%s)", job.job_id, type(exc).__name__)
            terminal = _failed(job, DIED, exc)
        except Exception as exc:
            log.exception("job %s failed in the Ray cluster", job.job_id)
            terminal = _failed(job, f"the cluster could not run this edit: "
                               f"{type(exc).__name__}: {str(exc)[:200]}", exc)
        if terminal is None:
            terminal = _failed(job, "the GPU worker ended this edit without a result", None)
        if terminal.msg_type == wire.CANCELLED:  # the reason is the gateway's
            terminal = JobMessage(job, wire.CANCELLED, {"job_id": job.job_id,
                                                        "reason": job.cancel_reason})
        self._post(terminal)
        if job.cancel.cancelled and self._board is not None:
            self._board.forget.remote(job.job_id)

    def _placed(self, job: Job, event: dict[str, Any]) -> None:
        self.placements[job.job_id] = Placement(event["replica"], event["pid"], event["warm"],
                                                event["cached_bytes"], time.monotonic())
        log.debug("job %s on replica %s (%s)", job.job_id, event["replica"],  # one INFO line
                 "its cache is there" if event["warm"] else "computes its cache")


def _failed(job: Job, message: str, exc: BaseException | None) -> JobMessage:
    detail = f"{type(exc).__name__}: {str(exc)[:1500]}" if exc is not None else None
    return JobMessage(job, wire.ERROR, {"job_id": job.job_id, "code": wire.ENGINE_ERROR,
                                        "message": message, "detail": detail})
