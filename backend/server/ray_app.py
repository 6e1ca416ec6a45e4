"""The Ray Serve application behind a gateway (``serve --ray``): one replica per GPU.

Each replica loads its own ``Engine`` and runs one job at a time (``max_ongoing_requests=1``)
with the same ``JobRunner`` as the engine thread, so a job's events, rate limits and error
codes are those of one GPU. A job is a streaming call: the replica yields plain dicts (a
``placed`` event first, then the job's ``progress``/``preview`` events and its terminal one),
which the gateway (``ray_worker``) posts as the engine thread would.

Affinity: the gateway calls with ``multiplexed_model_id`` = the job's cache key (the image's
pixels, prompt, seed and the settings its LoRA and inversion depend on, ``Server._prepare_key``).
Serve routes a key to the replica that holds it when that replica is free, else to the one
holding the fewest keys. A replica holds ``IMAGES_PER_REPLICA`` key, as many images as the
engine's re-drag cache keeps; when Serve evicts it (another key arrives), the engine's cached
tensors for it are dropped and their device memory given back (``release_caches``). The LoRA
cache is on disk: replicas on one machine share it, so another replica re-inverts the image
but reads its LoRA; a replica on another machine trains it again.

Cancel: a small named actor (``CancelBoard``) holds the ids of the jobs the gateway cancelled;
the replica polls it every ``CANCEL_POLL`` seconds while a job runs and sets the engine's
``CancelToken``, which the engine checks before every model block. Serve's own cancel of a
streaming call is not used: it stops the stream, not the engine thread under it.

Everything crossing the gateway-to-replica hop is Ray's serialization (pickle) inside the
cluster: the cluster must be on a private network (docs/cluster.md). Nothing from the artists'
network is unpickled: the gateway has parsed and checked every request first.
"""

from __future__ import annotations

import asyncio
import gc
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray import serve

from backend.engine.interface import Engine
from backend.engine.types import CancelToken
from backend.model_choice import Fallback
from backend.server.engine_worker import JobMessage, JobRunner, load_engine_or_say_why, plain
from backend.server.jobs import Job
from protocol import wire

NAMESPACE = "drag-diffusion"  # the Ray namespace of the gateway and its cancel board
DEPLOYMENT = "DragEngine"
CANCEL_POLL = 0.05  # seconds between a replica's looks at the cancel board
EVENT_POLL = 0.01  # seconds between a replica's looks at its engine thread's events
IMAGES_PER_REPLICA = 1  # keys a replica holds: the engine's re-drag cache keeps one image
# Serve's health check of each replica (default every 10 s): how soon a dead replica is
# replaced. Its job fails at once either way (its stream breaks).
HEALTH_CHECK_PERIOD = 2.0


@ray.remote(num_cpus=0)
class CancelBoard:
    """The ids of the running jobs that the gateway cancelled."""

    def __init__(self) -> None:
        self._cancelled: set[str] = set()

    def cancel(self, job_id: str) -> None:
        self._cancelled.add(job_id)

    def cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled

    def forget(self, job_id: str) -> None:
        self._cancelled.discard(job_id)


class HeldImage:
    """What Serve's multiplexing keeps per cache key on a replica; evicting it frees the
    engine's cached tensors (Serve calls ``__del__`` when it evicts)."""

    def __init__(self, replica: EditReplica, key: str) -> None:
        self._replica, self.key = replica, key

    def __del__(self) -> None:
        replica, self._replica = getattr(self, "_replica", None), None
        if replica is not None:
            replica.release(self.key)


class EditReplica:
    """One replica: an engine on its GPU, one job at a time."""

    def __init__(self, load_engine: Callable[[], Engine], fallback: Fallback | None,
                 board_name: str) -> None:
        self._loaded = load_engine_or_say_why(load_engine, fallback)
        self._engine = self._loaded.engine
        self._board = ray.get_actor(board_name, namespace=NAMESPACE)
        self._held: set[str] = set()
        self._id = serve.get_replica_context().replica_id.unique_id

    def describe(self) -> dict[str, Any]:
        """How the load went (as ``ModelLoaded``), the engine's info and table."""
        engine = self._engine
        return {"state": self._loaded.state, "error": self._loaded.error,
                "demo": self._loaded.demo, "replica": self._id, "pid": os.getpid(),
                "info": plain(engine.info()) if engine is not None else {},
                "table": engine.table if engine is not None else None}

    @serve.multiplexed(max_num_models_per_replica=IMAGES_PER_REPLICA)
    async def _hold(self, key: str) -> HeldImage:
        self._held.add(key)
        return HeldImage(self, key)

    def release(self, key: str) -> None:
        """Serve evicted ``key``: drop the engine's cached tensors and free their memory."""
        self._held.discard(key)
        release = getattr(self._engine, "release_caches", None)
        if release is not None:
            release()
        gc.collect()

    def _cached_bytes(self) -> int:
        return int(getattr(self._engine, "cached_bytes", 0))

    async def run(self, job: dict[str, Any], buffers: list[bytes]) -> AsyncIterator[dict]:
        """Run one job, yielding its events (``placed`` first, the terminal one last)."""
        key = serve.get_multiplexed_model_id()
        warm = bool(key) and key in self._held
        if key:
            await self._hold(key)
        yield {"type": "placed", "replica": self._id, "pid": os.getpid(), "warm": warm,
               "cached_bytes": self._cached_bytes()}
        job_id = job["job_id"]
        if self._engine is None:
            yield _event_of(JobMessage(_job(job, buffers, CancelToken()), wire.ERROR, {
                "job_id": job_id, "code": wire.ENGINE_ERROR, "detail": None,
                "message": f"this GPU worker could not load the model: {self._loaded.error}"}))
            return
        token = CancelToken()
        events: queue.Queue[dict] = queue.Queue()
        thread = threading.Thread(target=self._work, name=f"drag-job-{job_id[:8]}",
                                  args=(_job(job, buffers, token), events), daemon=True)
        thread.start()
        next_look = 0.0
        try:
            while True:
                try:
                    event = events.get_nowait()
                except queue.Empty:
                    if not token.cancelled and time.monotonic() >= next_look:
                        next_look = time.monotonic() + CANCEL_POLL
                        if await self._board.cancelled.remote(job_id):
                            token.cancel()
                    await asyncio.sleep(EVENT_POLL)
                    continue
                yield event
                if event["type"] in wire.TERMINAL_EVENTS:
                    return
        finally:
            token.cancel()  # the gateway went away (or the job ended): the engine stops

    def _work(self, job: Job, events: queue.Queue[dict]) -> None:
        runner = JobRunner(lambda message: events.put(_event_of(message)))
        assert self._engine is not None
        events.put(_event_of(runner.run(self._engine, job)))


def _job(job: dict[str, Any], buffers: list[bytes], token: CancelToken) -> Job:
    """The replica's copy of a gateway job: what ``JobRunner`` reads."""
    return Job(job_id=job["job_id"], session="", route="", parent={}, fingerprint=b"",
               request=job["request"], buffers=buffers, kind=job["kind"], cancel=token)


def _event_of(message: JobMessage) -> dict[str, Any]:
    return {"type": message.msg_type, "content": message.content,
            "buffers": [bytes(buffer) for buffer in message.buffers]}


def build_app(load_engine: Callable[[], Engine], fallback: Fallback | None, board_name: str, *,
              replicas: int, gpus_per_replica: float = 1.0, cpus_per_replica: float = 1.0,
              env: dict[str, str] | None = None) -> serve.Application:
    """The Serve application: ``replicas`` replicas of ``EditReplica``, each reserving
    ``gpus_per_replica`` GPUs and running one job at a time."""
    deployment = serve.deployment(
        EditReplica, name=DEPLOYMENT, num_replicas=replicas, max_ongoing_requests=1,
        health_check_period_s=HEALTH_CHECK_PERIOD,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica,
                           "runtime_env": {"env_vars": dict(env or {})}})
    return deployment.bind(load_engine, fallback, board_name)
