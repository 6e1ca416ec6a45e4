"""Time limits in tests are safety nets against hangs, never speed checks.

A test that waits for real work (a subprocess, a backend's READY line, a GUI window, a job's
events) gives it a limit several times what a busy two-core machine needs, so that the test's
pass or fail never depends on the machine's load; speed is measured by the benchmarks, which
print figures. When a limit does fire, the failure says so: it names what was awaited, that the
limit is a hang guard, and how to give a slower machine more time (``DRAG_TEST_LIMIT_SCALE=4``
multiplies every limit).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

SCALE = float(os.environ.get("DRAG_TEST_LIMIT_SCALE", "1") or 1)


def safety_net(seconds: float) -> float:
    """``seconds`` scaled by ``DRAG_TEST_LIMIT_SCALE``: the limit to wait for real work."""
    return seconds * SCALE


def fired(what: str, seconds: float) -> str:
    """The failure line of a safety net that fired."""
    return (f"safety net fired: still waiting for {what} after {seconds:g} s. This limit only "
            "guards against hangs (it is not a speed check); on an overloaded machine rerun "
            "with DRAG_TEST_LIMIT_SCALE=4")


def run(cmd: list[str], *, limit: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` with a safety net of ``limit`` seconds (scaled); its firing fails the
    test with :func:`fired`'s line instead of a bare ``TimeoutExpired``."""
    seconds = safety_net(limit)
    try:
        return subprocess.run(cmd, timeout=seconds, **kwargs)
    except subprocess.TimeoutExpired:
        raise AssertionError(fired(" ".join(map(str, cmd))[:200], seconds)) from None
