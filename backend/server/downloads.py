"""Model downloads the plug-in asks for (protocol 1.3 ``download``), in their own thread.

One download runs at a time, beside the engine's thread, so edits keep running meanwhile. Like
the engine worker it posts small events and calls ``wake``; only the socket thread reads them
and touches the jobs' states. A download is not tied to its client's heartbeats: closing the
dialog does not stop it (Cancel and shutdown do), and what arrived stays for the next try.
The store (``backend.hub.store``) does the transfer; a client names a catalogue set, never a
URL or a path.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from backend.hub.store import Cancelled, GetResult, HubError, Progress, Store
from backend.server.jobs import Terminal

log = logging.getLogger("backend.server")

ACTIVE = ("queued", "running", "loading")  # "loading": its set is in place, the engine reloads


@dataclass(eq=False)
class DownloadJob:
    job_id: str
    set: str
    route: str  # the session that receives its events (changes on attach)
    parent: dict[str, Any]  # the download request's header
    state: str = "queued"  # then running, loading, finished, failed or cancelled
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "client"
    progress: Progress | None = None
    result: GetResult | None = None
    terminal: Terminal | None = None

    @property
    def position(self) -> None:  # as a drag job's, for attach replies
        return None


@dataclass(frozen=True)
class DownloadEvent:
    """What the download thread reports: ``started``, ``progress``, ``done``, ``failed`` or
    ``cancelled``."""

    job: DownloadJob
    kind: str
    progress: Progress | None = None
    result: GetResult | None = None
    error: str | None = None
    detail: str | None = None


class Downloads:
    """The download jobs (queued, running, and the last ``keep`` ended ones) and the thread."""

    def __init__(self, store: Store, wake: Callable[[], None], keep: int = 32) -> None:
        self.store = store
        self._wake = wake
        self._keep = keep
        self._jobs: OrderedDict[str, DownloadJob] = OrderedDict()
        self._inbox: queue.Queue[DownloadJob | None] = queue.Queue()
        self._events: queue.Queue[DownloadEvent] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._busy = 0  # jobs handed to the thread and not yet reported ended

    # --- the socket thread's side ---------------------------------------------------------------
    def get(self, job_id: str) -> DownloadJob | None:
        return self._jobs.get(job_id)

    def active_for(self, name: str) -> DownloadJob | None:
        return next((j for j in self._jobs.values() if j.set == name and j.state in ACTIVE),
                    None)

    def active(self) -> list[DownloadJob]:
        return [j for j in self._jobs.values() if j.state in ACTIVE]

    def start(self, job: DownloadJob) -> None:
        self._jobs[job.job_id] = job
        self._busy += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="model-downloads",
                                            daemon=True)
            self._thread.start()
        self._inbox.put(job)

    def cancel(self, job: DownloadJob, reason: str = "client") -> None:
        if job.state in ("queued", "running"):
            job.cancel_reason = reason
            job.cancel.set()

    def events(self) -> Iterator[DownloadEvent]:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if event.kind in ("done", "failed", "cancelled"):
                self._busy -= 1
            yield event

    def idle(self) -> bool:
        """No download queued or running, nothing left to collect."""
        return self._busy == 0 and self._events.empty()

    def finish(self, job: DownloadJob, terminal: Terminal, state: str) -> None:
        """Record a download's end (its terminal event is sent again on attach)."""
        job.state, job.terminal = state, terminal
        ended = [j for j in self._jobs.values() if j.state not in ACTIVE]
        for old in ended[:-self._keep]:
            del self._jobs[old.job_id]

    def stop(self) -> None:
        for job in self.active():
            self.cancel(job, "shutdown")
        self._inbox.put(None)

    # --- the thread ---------------------------------------------------------------------------
    def _post(self, event: DownloadEvent) -> None:
        self._events.put(event)
        self._wake()

    def _work(self) -> None:
        while (job := self._inbox.get()) is not None:
            self._post(self._run(job))

    def _run(self, job: DownloadJob) -> DownloadEvent:
        if job.cancel.is_set():
            return DownloadEvent(job, "cancelled")
        self._post(DownloadEvent(job, "started"))
        try:
            result = self.store.get(job.set, cancel=job.cancel.is_set,
                                    progress=lambda p: self._post(DownloadEvent(job, "progress",
                                                                                progress=p)))
        except Cancelled:
            return DownloadEvent(job, "cancelled")
        except HubError as exc:
            log.warning("download of %s failed: %s", job.set, exc)
            return DownloadEvent(job, "failed", error=str(exc), detail=exc.kind)
        except Exception as exc:
            log.exception("download of %s failed", job.set)
            return DownloadEvent(job, "failed", error=f"the download of {job.set} failed: "
                                 f"{type(exc).__name__}: {exc}", detail="internal")
        log.info("downloaded %s: %d bytes in %.1f s", job.set, result.fetched, result.seconds)
        return DownloadEvent(job, "done", result=result)
