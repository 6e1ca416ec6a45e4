"""The server's job table: jobs by id, the fair queue, and how long terminal results are kept.

Pure bookkeeping, no sockets and no engine: only the socket thread touches it.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from backend.engine.types import CancelToken
from protocol import wire

# terminal message type -> the job's final state
STATE_OF = {wire.FINISHED: "finished", wire.CANCELLED: "cancelled", wire.ERROR: "failed"}


@dataclass(frozen=True)
class Terminal:
    """A job's last event, kept to send it again (attach, duplicate submit)."""

    msg_type: str
    content: dict[str, Any]
    buffers: list[Any]


@dataclass(eq=False)
class Job:
    job_id: str
    session: str  # the submitting client session (fair queueing)
    route: str  # the session that receives the events (changes on attach)
    parent: dict[str, Any]  # the submit's header
    fingerprint: bytes
    request: dict[str, Any]
    buffers: list[Any]
    created: float = field(default_factory=time.monotonic)
    state: str = "queued"
    position: int | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    cancel_reason: str = "client"
    started: float | None = None
    ended: float | None = None
    terminal: Terminal | None = None

    @property
    def result_bytes(self) -> int:
        return sum(len(b) for b in self.terminal.buffers) if self.terminal else 0


class FairQueue:
    """Round-robin over client sessions; each session's jobs run in submission order."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[Job]:
        return iter(self.order())

    def push(self, job: Job) -> None:
        self._queues.setdefault(job.session, deque()).append(job)

    def pop(self) -> Job | None:
        if not self._queues:
            return None
        session, jobs = next(iter(self._queues.items()))
        job = jobs.popleft()
        if jobs:
            self._queues.move_to_end(session)
        else:
            del self._queues[session]
        return job

    def remove(self, job: Job) -> None:
        jobs = self._queues.get(job.session)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del self._queues[job.session]

    def order(self) -> list[Job]:
        """The order in which the queued jobs will run."""
        rounds = [list(q) for q in self._queues.values()]
        depth = max((len(r) for r in rounds), default=0)
        return [r[i] for i in range(depth) for r in rounds if i < len(r)]


class JobTable:
    """Every known job, the queue, the running job, and the retention of finished ones.

    Terminal results are kept for re-fetching until more than ``keep_results`` jobs,
    ``keep_bytes`` of results or ``keep_seconds`` of age; then only the id and final state of
    an expired job are remembered (so a re-sent submit is never run twice).
    """

    def __init__(self, keep_results: int = 32, keep_bytes: int = 2**30,
                 keep_seconds: float = 3600.0) -> None:
        self.keep_results, self.keep_bytes = keep_results, keep_bytes
        self.keep_seconds = keep_seconds
        self.queue = FairQueue()
        self.running: Job | None = None
        self._jobs: dict[str, Job] = {}
        self._done: OrderedDict[str, Job] = OrderedDict()  # terminal jobs kept for re-fetching
        self._expired: OrderedDict[str, str] = OrderedDict()  # job id -> final state

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def expired(self, job_id: str) -> bool:
        return job_id in self._expired

    def add(self, job: Job) -> None:
        """A new job joins the queue."""
        self._jobs[job.job_id] = job
        self.queue.push(job)

    def start_next(self) -> Job | None:
        """Take the next queued job (fair order) as the running one."""
        job = self.queue.pop()
        if job is not None:
            job.state, job.position, job.started = "running", None, time.monotonic()
            self.running = job
        return job

    def active(self) -> list[Job]:
        """The queued jobs in run order, then the running one."""
        return [*self.queue.order(), *([self.running] if self.running else [])]

    def finish(self, job: Job, terminal: Terminal) -> None:
        """Record a job's terminal event and keep its result a while."""
        if self.running is job:
            self.running = None
        self.queue.remove(job)
        job.state = STATE_OF[terminal.msg_type]
        job.terminal = terminal
        job.ended = time.monotonic()
        job.position = None
        job.buffers = []
        self._done[job.job_id] = job
        self.trim()

    def trim(self) -> None:
        """Drop the oldest kept results beyond the retention limits."""
        now = time.monotonic()
        total = sum(job.result_bytes for job in self._done.values())
        while self._done:
            job_id, job = next(iter(self._done.items()))
            if (len(self._done) <= self.keep_results and total <= self.keep_bytes
                    and now - (job.ended or now) <= self.keep_seconds):
                break
            del self._done[job_id]
            del self._jobs[job_id]
            total -= job.result_bytes
            self._expired[job_id] = job.state
            if len(self._expired) > 10000:
                self._expired.popitem(last=False)
