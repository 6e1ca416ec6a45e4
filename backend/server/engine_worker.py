"""The engine adapter: one worker thread that loads the model and runs one job at a time.

The worker turns a job's wire fields into a ``DragRequest``, runs the ``Engine``, rate-limits
its progress and preview callbacks, turns exceptions into protocol errors, and posts what
happened as small event objects. The socket thread collects them with ``events()`` after
``wake`` has told it there is something to collect; it never waits for the engine.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backend.engine.errors import Cancelled, EngineError, ModelNotFound
from backend.engine.interface import Engine, WarpFn
from backend.engine.oom import OOM_ADVICE, is_oom
from backend.engine.types import DragRequest, PreviewFn, ProgressFn
from backend.model_choice import Fallback, load_or_demo
from backend.server.jobs import PREPARE, Job
from protocol import wire

log = logging.getLogger("backend.server")

# Pixel types the engine takes (wire name -> numpy dtype, little-endian as on the wire).
NUMPY_DTYPES = {"u8": np.dtype(np.uint8), "u16": np.dtype("<u2"), "f32": np.dtype("<f4")}
ACCEPTED_DTYPES = tuple(NUMPY_DTYPES)
PROGRESS_INTERVAL = 0.05  # seconds between progress events of one job (phase changes always)
# Previews of one job: the engine throttles them to one per PREVIEW_INTERVAL before it copies
# a latent off the device (``Engine.run``'s ``preview_interval``), so every preview it hands
# over is sent. The worker's own floor, half the interval, only stops an engine that ignores
# ``preview_interval``: the engine's clock reads a few milliseconds before this one, and a
# floor of the whole interval would throw away previews the engine has already copied.
PREVIEW_INTERVAL = 0.5
PREVIEW_FLOOR = PREVIEW_INTERVAL / 2


@dataclass(frozen=True)
class ModelLoaded:
    """The model finished loading: ``state`` is ``ready``, ``missing`` or ``error``.

    ``demo`` is set when the fallback model is served instead: why the configured one is not.
    """

    state: str
    error: str | None
    engine: Engine | None
    demo: str | None = None


@dataclass(frozen=True)
class JobMessage:
    """An event of the running job: progress or preview, or its terminal one (finished,
    cancelled, error)."""

    job: Job
    msg_type: str
    content: dict[str, Any]
    buffers: list[Any] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.msg_type in wire.TERMINAL_EVENTS


WorkerEvent = ModelLoaded | JobMessage
RELOAD = object()  # the inbox item that makes the worker load the models again


def plain(value: Any, depth: int = 0) -> Any:
    """Turn engine stats (numpy scalars, tuples, paths) into msgpack-safe values."""
    if depth > 8:
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    return str(value)


def run_warp(warp: WarpFn, content: dict[str, Any],
             buffers: list[Any]) -> tuple[dict[str, Any], list[memoryview]]:
    """A checked ``warp`` request (PROTOCOL.md, 1.1) → the ``warp_reply`` content and buffers.
    Raises ``EngineError`` for what the engine refuses (a handle off the region…)."""
    dtype = NUMPY_DTYPES[content["dtype"]]
    h, w, c = content["height"], content["width"], content["channels"]
    image = np.frombuffer(buffers[0], dtype).reshape(h, w, c)
    mask = np.frombuffer(buffers[1], np.uint8).reshape(h, w)
    warped, hole, figures = warp(image, mask, [(x, y) for x, y in content["handles"]],
                                 [(x, y) for x, y in content["targets"]],
                                 dict(content["params"]), overlay=content["overlay"])
    reply = {"width": w, "height": h, "channels": c, "dtype": content["dtype"],
             "moved_pixels": int(figures["moved_pixels"]),
             "inpaint_pixels": int(figures["inpaint_pixels"]),
             "seconds": float(figures["seconds"]),
             "warnings": [str(text) for text in figures["warnings"]]}
    return reply, [_frame(np.ascontiguousarray(warped, dtype=dtype)),
                   _frame(np.ascontiguousarray(hole, dtype=np.uint8))]


def _frame(pixels: np.ndarray) -> memoryview:
    """A C-contiguous array as a byte buffer to send as it is (no copy of the image)."""
    return memoryview(pixels).cast("B")


class EventOutbox:
    """What a worker posts for the socket thread: its events, in order; ``wake()`` after each
    one. Both workers (``EngineWorker``, ``ray_worker.RayWorker``) post through it."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._events: queue.Queue[WorkerEvent] = queue.Queue()

    def idle(self) -> bool:
        """No event left to collect."""
        return self._events.empty()

    def events(self) -> Iterator[WorkerEvent]:
        """The events posted so far, in order (never blocks)."""
        while True:
            try:
                yield self._events.get_nowait()
            except queue.Empty:
                return

    def _post(self, event: WorkerEvent) -> None:
        self._events.put(event)
        self._wake()


class EngineWorker(EventOutbox):
    """The ``drag-engine`` thread. ``wake()`` is called after every posted event."""

    # How long a stopping server waits for this worker: it ends after its last job (or keeps
    # loading a model, which nothing can interrupt).
    stop_seconds = 2.0

    def __init__(self, load_engine: Callable[[], Engine], wake: Callable[[], None],
                 fallback: Fallback | None = None) -> None:
        super().__init__(wake)
        self._load_engine = load_engine
        self._fallback = fallback
        self._inbox: queue.Queue[Job | object | None] = queue.Queue()
        self._runner = JobRunner(self._post)
        self._thread = threading.Thread(target=self._work, name="drag-engine", daemon=True)

    slots = 1  # jobs it runs at once (the server dispatches up to this many)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def run(self, job: Job) -> None:
        """Hand a job to the engine (the caller runs one at a time)."""
        self._inbox.put(job)

    def stop(self) -> None:
        """Let the thread end after the current job (cancel that one first)."""
        self._inbox.put(None)

    def reload(self) -> None:
        """Load the models again after the current job (a download added one): the old engine
        is dropped first, then ``load_engine`` runs again and posts ``ModelLoaded``."""
        self._inbox.put(RELOAD)

    # --- the thread ---------------------------------------------------------------------------
    def _work(self) -> None:
        engine = self._load()
        while (job := self._inbox.get()) is not None:
            if job is RELOAD:
                engine = None  # its memory is free before the new models load
                gc.collect()
                engine = self._load()
                continue
            assert engine is not None
            self._post(self._runner.run(engine, job))

    def _load(self) -> Engine | None:
        """Load the engine (or the fallback) and post ``ModelLoaded``."""
        loaded = load_engine_or_say_why(self._load_engine, self._fallback)
        self._post(loaded)
        return loaded.engine


def load_engine_or_say_why(load_engine: Callable[[], Engine],
                           fallback: Fallback | None) -> ModelLoaded:
    """Load the engine (or the fallback): ``ModelLoaded`` says which, or why neither."""
    try:
        engine, demo = load_or_demo(load_engine, fallback)
    except ModelNotFound as exc:
        return ModelLoaded("missing", str(exc), None)
    except Exception as exc:
        log.exception("loading the model failed")
        return ModelLoaded("error", f"{type(exc).__name__}: {exc}", None)
    return ModelLoaded("ready", None, engine, demo=demo)


class JobRunner:
    """Runs one job on an engine: the wire fields become a ``DragRequest``, progress and
    previews are rate-limited and handed to ``post`` as ``JobMessage``s, and the way the job
    ended (result, cancel, exception) is returned as its terminal ``JobMessage``. The engine
    thread uses it, and so does each Ray Serve replica (``ray_app``)."""

    def __init__(self, post: Callable[[JobMessage], None]) -> None:
        self._post = post

    def run(self, engine: Engine, job: Job) -> JobMessage:
        r = job.request
        dtype = NUMPY_DTYPES[r["dtype"]]
        image = np.frombuffer(job.buffers[0], dtype).reshape(r["height"], r["width"],
                                                              r["channels"])
        if job.kind == PREPARE:  # no mask and no points: the image and the settings
            request = DragRequest(image=image, handles=[], targets=[], method=r["method"],
                                  prompt=r["prompt"], seed=r["seed"], params=dict(r["params"]))
            return self._outcome(job, lambda: engine.prepare_image(
                request, progress=self._progress_callback(job), cancel=job.cancel,
                masked=r["masked"]))
        mask = (np.frombuffer(job.buffers[1], np.uint8).reshape(r["height"], r["width"])
                if r["has_mask"] else None)
        request = DragRequest(image=image, mask=mask, method=r["method"], prompt=r["prompt"],
                              seed=r["seed"], params=dict(r["params"]),
                              handles=[(x, y) for x, y in r["handles"]],
                              targets=[(x, y) for x, y in r["targets"]])
        preview = self._preview_callback(job) if r["preview"] else None
        return self._outcome(job, lambda: engine.run(
            request, progress=self._progress_callback(job), cancel=job.cancel, preview=preview,
            preview_interval=PREVIEW_INTERVAL))

    def _outcome(self, job: Job, work: Callable[[], Any]) -> JobMessage:
        """Run ``work`` (an edit or a prepare) and say how it ended: ``finished`` with the
        pixels, ``prepared``, ``cancelled`` or ``error``."""
        r, jid = job.request, job.job_id
        try:
            result = work()
        except Cancelled:
            return JobMessage(job, wire.CANCELLED, {"job_id": jid, "reason": job.cancel_reason})
        except EngineError as exc:
            return JobMessage(job, wire.ERROR, {"job_id": jid, "code": exc.code,
                                              "message": str(exc), "detail": None})
        except Exception as exc:
            detail = "".join(traceback.format_exception(exc)[-3:])[-2000:]
            if is_oom(exc):
                error = {"code": wire.OUT_OF_MEMORY,
                         "message": f"the device ran out of memory during this edit; "
                                    f"{OOM_ADVICE}"}
            else:
                log.exception("job %s failed", jid)
                error = {"code": wire.ENGINE_ERROR, "message": f"the edit failed: "
                         f"{type(exc).__name__}: {exc}"}
            return JobMessage(job, wire.ERROR, {"job_id": jid, **error, "detail": detail})
        if job.kind == PREPARE:
            return JobMessage(job, wire.PREPARED, {"job_id": jid, "timings": plain(result.timings),
                                                   "stats": plain(result.stats)})
        pixels = np.ascontiguousarray(result.image, dtype=NUMPY_DTYPES[r["dtype"]])
        h, w = pixels.shape[:2]
        channels = pixels.shape[2] if pixels.ndim == 3 else 1
        return JobMessage(job, wire.FINISHED, {
            "job_id": jid, "width": w, "height": h, "channels": channels,
            "dtype": r["dtype"], "handles": [[float(x), float(y)] for x, y in result.handles],
            "timings": plain(result.timings), "stats": plain(result.stats),
            "warnings": [str(text) for text in result.warnings],
        }, [_frame(pixels)])

    def _progress_callback(self, job: Job) -> ProgressFn:
        last: dict[str, Any] = {"phase": None, "time": 0.0}

        def progress(phase: str, step: int, total: int) -> None:
            now = time.monotonic()
            if (phase == last["phase"] and step < total - 1
                    and now - last["time"] < PROGRESS_INTERVAL):
                return
            last.update(phase=phase, time=now)
            self._post(JobMessage(job, wire.PROGRESS, {"job_id": job.job_id, "phase": phase,
                                                     "step": int(step), "total": int(total)}))
        return progress

    def _preview_callback(self, job: Job) -> PreviewFn:
        last = [0.0]

        def preview(phase: str, step: int, image: np.ndarray) -> None:
            now = time.monotonic()
            if now - last[0] < PREVIEW_FLOOR:
                return
            last[0] = now
            pixels = np.ascontiguousarray(image, dtype=np.uint8)
            self._post(JobMessage(job, wire.PREVIEW, {
                "job_id": job.job_id, "phase": phase, "step": int(step),
                "width": pixels.shape[1], "height": pixels.shape[0],
                "channels": pixels.shape[2] if pixels.ndim == 3 else 1}, [_frame(pixels)]))
        return preview
