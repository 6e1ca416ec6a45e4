"""The Ray tier's ``FakeEngine`` in a replica, seen from the test process.

The server's own tests (``test_server.py``, ``test_server_prepare.py``) look at their
``FakeEngine`` after a job: what it ran, whether a step started, how many steps ran after a
cancel. In Ray mode that engine runs in a replica process, so ``RecordedFakeEngine`` reports
each of those facts to a named actor (``EngineRecord``), and ``mirror`` gives the test's own
``FakeEngine`` lists and an event that read them from there. The record also scripts the
replica's engine: its ``steps`` and ``delay`` are the test's, read at each call (one replica
serves many tests). Imported by the replicas (``tests`` is on their ``PYTHONPATH``).
"""

from __future__ import annotations

import time
from typing import Any

import ray
from fixtures_server import FakeEngine

from backend.engine.params import MethodTable
from backend.server.ray_app import NAMESPACE

RECORDED = ("runs", "prepares", "prepared", "calls", "steps_after_cancel")


@ray.remote(num_cpus=0)
class EngineRecord:
    """What the replica's fake engine did during the current test, and how it is scripted."""

    def __init__(self) -> None:
        self.reset(3, 0.0)

    def reset(self, steps: int, delay: float) -> None:
        self._script = (steps, delay)
        self._lists: dict[str, list] = {name: [] for name in RECORDED}
        self._step = False

    def script(self) -> tuple[int, float]:
        return self._script

    def append(self, name: str, item: Any) -> None:
        self._lists[name].append(item)

    def get(self, name: str) -> list:
        return self._lists[name]

    def set_step(self, value: bool) -> None:
        self._step = value

    def step(self) -> bool:
        return self._step


class _Reported(list):
    """A list in the replica whose appends are also sent to the record."""

    def __init__(self, record: Any, name: str) -> None:
        super().__init__()
        self._record, self._name = record, name

    def append(self, item: Any) -> None:
        super().append(item)
        self._record.append.remote(self._name, item)


class _ReportedStep:
    """The replica's ``step_started``: setting it sets the record's."""

    def __init__(self, record: Any) -> None:
        self._record = record

    def set(self) -> None:
        self._record.set_step.remote(True)


class RecordedFakeEngine(FakeEngine):
    """A ``FakeEngine`` in a replica that takes its steps and delay from the record at each
    call and reports what it does there."""

    def __init__(self, record_name: str, table: MethodTable | None = None) -> None:
        super().__init__(table=table)
        self._record = ray.get_actor(record_name, namespace=NAMESPACE)
        for name in RECORDED:
            setattr(self, name, _Reported(self._record, name))
        self.step_started = _ReportedStep(self._record)

    def _scripted(self) -> None:
        self.steps, self.delay = ray.get(self._record.script.remote())

    def run(self, request, progress=None, cancel=None, preview=None, preview_interval=0.0):
        self._scripted()
        return super().run(request, progress, cancel, preview, preview_interval)

    def prepare_image(self, request, progress=None, cancel=None, masked=True):
        self._scripted()
        return super().prepare_image(request, progress, cancel, masked)


class _Mirror:
    """One of the replica engine's lists, read from the record at each look."""

    def __init__(self, record: Any, name: str) -> None:
        self._record, self._name = record, name

    def _now(self) -> list:
        return ray.get(self._record.get.remote(self._name))

    def __len__(self) -> int:
        return len(self._now())

    def __getitem__(self, index):
        return self._now()[index]

    def __iter__(self):
        return iter(self._now())

    def __bool__(self) -> bool:
        return bool(self._now())

    def __eq__(self, other: object) -> bool:
        return self._now() == other

    def __repr__(self) -> str:
        return repr(self._now())


class _MirrorStep:
    """The replica engine's ``step_started``, as a ``threading.Event`` reads."""

    def __init__(self, record: Any) -> None:
        self._record = record

    def is_set(self) -> bool:
        return ray.get(self._record.step.remote())

    def set(self) -> None:
        ray.get(self._record.set_step.remote(True))

    def clear(self) -> None:
        ray.get(self._record.set_step.remote(False))

    def wait(self, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while not self.is_set():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True


def mirror(engine: FakeEngine, record: Any) -> None:
    """Reset the record to ``engine``'s script and make ``engine`` show the replica's."""
    ray.get(record.reset.remote(engine.steps, engine.delay))
    for name in RECORDED:
        setattr(engine, name, _Mirror(record, name))
    engine.step_started = _MirrorStep(record)
