"""The server's job table: jobs by id, the fair queue, the waiting prepares, and how long
terminal results are kept.

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
STATE_OF = {wire.FINISHED: "finished", wire.CANCELLED: "cancelled", wire.ERROR: "failed",
            wire.PREPARED: "finished"}
EDIT, PREPARE = "edit", "prepare"  # a job's kind: a submit's edit, or a prepare (1.2)


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
    kind: str = EDIT
    # What a prepare's LoRA and inversion depend on (and an edit's, to find the prepare it
    # joins): ``Server._prepare_key``; None for an edit that can join nothing.
    key: str | None = None
    serves: Job | None = None  # a running prepare: the submit that joined it
    joined: Job | None = None  # a submit: the running prepare it joined (its first phases)

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
    """Every known job, the queue, the waiting prepares, the running jobs, and the retention of
    finished ones.

    ``slots`` jobs run at once: 1 with the server's own engine thread, one per replica with a
    Ray Serve cluster (``ray_worker``). ``running`` lists them, oldest first.

    Prepares (protocol 1.2) wait apart from the fair queue, at most one per client session,
    and run only when no edit is queued: an edit never waits for a prepare to start. A prepare
    that a submit joined hands the engine to that submit when it ends (``start_next``).

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
                 ran: RanIds | None = None, slots: int = 1) -> None:
        self.keep_results, self.keep_bytes = keep_results, keep_bytes
        self.keep_seconds, self.keep_records = keep_seconds, keep_records
        self.queue = FairQueue()
        self.prepares: OrderedDict[str, Job] = OrderedDict()  # session -> its waiting prepare
        self.slots = slots
        self.running: list[Job] = []
        self._handoffs: deque[Job] = deque()  # the submits that run next: their prepare ended
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
        """A new job joins the queue (a prepare: the waiting prepares)."""
        self._jobs[job.job_id] = job
        if job.kind == PREPARE:
            self.prepares[job.session] = job
        else:
            self.queue.push(job)
        self.ran.add(job.job_id, time.monotonic())

    def requeue(self, prepare: Job) -> None:
        """A prepare that yielded the engine to an edit waits again (it starts over)."""
        if prepare in self.running:
            self.running.remove(prepare)
        prepare.state, prepare.started = "queued", None
        prepare.cancel, prepare.cancel_reason = CancelToken(), "client"
        self.prepares[prepare.session] = prepare

    def join(self, edit: Job, prepare: Job) -> None:
        """``edit`` takes over the running ``prepare``: the prepare's work is its first phases,
        so it counts as running from now, and runs as soon as the prepare ends."""
        self.queue.remove(edit)
        edit.joined, prepare.serves = prepare, edit
        edit.state, edit.position, edit.started = "running", None, time.monotonic()

    def free(self) -> bool:
        """Whether a slot is free for one more running job."""
        return len(self.running) < self.slots

    def start_next(self) -> Job | None:
        """Take the next job as a running one: a submit whose prepare just ended, else the
        next queued edit (fair order), else the oldest waiting prepare."""
        job = self._handoffs.popleft() if self._handoffs else None
        if job is None:
            job = self.queue.pop()
        if job is None and self.prepares:
            _, job = self.prepares.popitem(last=False)
        if job is not None:
            if job.joined is None:  # a joined submit started when it joined
                job.started = time.monotonic()
            job.state, job.position = "running", None
            self.running.append(job)
        return job

    def waiting(self) -> list[Job]:
        """The jobs waiting to run, in the order they will: edits, then prepares."""
        return [*self.queue.order(), *self.prepares.values()]

    def active(self) -> list[Job]:
        """The waiting jobs in run order, then the running ones and the submits they serve."""
        running = [j for job in self.running for j in (job, job.serves) if j is not None]
        return [*self.waiting(), *running]

    def finish(self, job: Job, terminal: Terminal) -> None:
        """Record a job's terminal event and keep its result a while."""
        if job in self.running:
            self.running.remove(job)
            if job.serves is not None and job.serves.terminal is None:
                self._handoffs.append(job.serves)
            job.serves = None
        if job.joined is not None:  # ended before its prepare did (cancelled)
            job.joined.serves = job.joined = None
        self.queue.remove(job)
        if self.prepares.get(job.session) is job:
            del self.prepares[job.session]
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
