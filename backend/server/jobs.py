"""The server's job table: jobs by id, the fair queue, and how long terminal results are kept.

Pure bookkeeping, no sockets and no engine: only the socket thread touches it.
"""

from __future__ import annotations

import hashlib
import secrets
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


class RanIds:
    """Every job id that ran (or was accepted) in the last ``seconds``, up to ``limit`` ids: what
    makes a re-sent submit ``result_expired`` instead of a second run once its result is gone.

    An id is kept as a 64-bit keyed digest (about 60 bytes each: a million ids are ~60 MB) in
    buckets of at most an hour and ``limit / 24`` ids; a bucket is dropped whole once all its ids
    are older than ``seconds``, or, past ``limit`` ids, the oldest bucket first. The key is
    random per server, so nobody can pick ids whose digests collide with another client's.
    """

    BUCKETS = 24

    def __init__(self, seconds: float = 86400.0, limit: int = 1_000_000) -> None:
        self.seconds, self.limit = seconds, limit
        self._key = secrets.token_bytes(16)
        self._buckets: deque[tuple[float, set[int]]] = deque()  # (first time, digests)
        self._count = 0

    def _digest(self, job_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=8,
                                              key=self._key).digest(), "big")

    def __contains__(self, job_id: str) -> bool:
        digest = self._digest(job_id)
        return any(digest in ids for _, ids in self._buckets)

    def add(self, job_id: str, now: float) -> None:
        if (not self._buckets or now - self._buckets[-1][0] >= self.seconds / self.BUCKETS
                or len(self._buckets[-1][1]) >= self.limit // self.BUCKETS):
            self._buckets.append((now, set()))
        ids = self._buckets[-1][1]
        size = len(ids)
        ids.add(self._digest(job_id))
        self._count += len(ids) - size
        self.trim(now)

    def trim(self, now: float) -> None:
        """Drop the buckets whose every id is older than ``seconds``, then the oldest ones
        while more than ``limit`` ids are kept (never the current one)."""
        while len(self._buckets) > 1 and (
                now - self._buckets[1][0] > self.seconds or self._count > self.limit):
            self._count -= len(self._buckets.popleft()[1])


class JobTable:
    """Every known job, the queue, the running job, and the retention of finished ones.

    Retention is per client session (the one that submitted the job): each keeps its last
    ``keep_results`` terminal jobs for ``keep_seconds``, whatever other sessions do. Two caps
    bound the memory of all of them together, ``keep_bytes`` of result pixels and
    ``keep_records`` terminal jobs; past either, the oldest job of the session that holds the
    most (bytes, or jobs) goes first, so a session holding no more than any other keeps its
    results while others flood. Every accepted job id is also remembered (``RanIds``) so a
    re-sent submit is never run twice.
    """

    def __init__(self, keep_results: int = 32, keep_bytes: int = 2**30,
                 keep_seconds: float = 3600.0, keep_records: int = 10_000,
                 ran: RanIds | None = None) -> None:
        self.keep_results, self.keep_bytes = keep_results, keep_bytes
        self.keep_seconds, self.keep_records = keep_seconds, keep_records
        self.queue = FairQueue()
        self.running: Job | None = None
        self.ran = ran or RanIds()
        self._jobs: dict[str, Job] = {}
        # session -> its terminal jobs kept for re-fetching, oldest first
        self._done: dict[str, OrderedDict[str, Job]] = {}
        self._records = 0
        self._bytes: dict[str, int] = {}  # session -> result bytes kept

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def expired(self, job_id: str) -> bool:
        """Whether ``job_id`` ran here (or was accepted) but is no longer kept."""
        return job_id not in self._jobs and job_id in self.ran

    def add(self, job: Job) -> None:
        """A new job joins the queue."""
        self._jobs[job.job_id] = job
        self.queue.push(job)
        self.ran.add(job.job_id, time.monotonic())

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
        self._done.setdefault(job.session, OrderedDict())[job.job_id] = job
        self._records += 1
        self._bytes[job.session] = self._bytes.get(job.session, 0) + job.result_bytes
        self.trim()

    def trim(self) -> None:
        """Drop what is past the retention: per session, results older than ``keep_seconds``
        or beyond its last ``keep_results``; then, while a memory cap is exceeded, the oldest
        of the session holding the most."""
        now = time.monotonic()
        for session, jobs in list(self._done.items()):
            while jobs and (len(jobs) > self.keep_results
                            or now - (next(iter(jobs.values())).ended or now) > self.keep_seconds):
                self._drop_oldest(session)
        while self._records > self.keep_records:
            self._drop_oldest(max(self._done, key=lambda s: len(self._done[s])))
        while sum(self._bytes.values()) > self.keep_bytes:
            self._drop_oldest(max(self._bytes, key=self._bytes.__getitem__))

    def _drop_oldest(self, session: str) -> None:
        jobs = self._done[session]
        job_id, job = jobs.popitem(last=False)
        del self._jobs[job_id]
        self._records -= 1
        self._bytes[session] -= job.result_bytes
        if not jobs:
            del self._done[session], self._bytes[session]
