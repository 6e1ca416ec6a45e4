"""Host side of the GUI test: an Xvfb display, xdotool keys and clicks, screenshots.

There is no window manager under Xvfb: windows get focus explicitly, and keys and clicks go
through XTEST (GTK ignores events sent to a window with ``--window``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import limits


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.2) -> Any:
    """The first true value of ``predicate``; ``timeout`` is a hang guard (scaled by
    ``limits``), not a speed check."""
    seconds = limits.safety_net(timeout)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(limits.fired(what, seconds))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Display:
    def __init__(self, name: str) -> None:
        self.name = name
        self.env = {**os.environ, "DISPLAY": name}

    def xdotool(self, *args: str) -> str:
        return subprocess.run(["xdotool", *args], env=self.env, capture_output=True,
                              text=True, timeout=30).stdout.strip()

    def find(self, name: str) -> str | None:
        found = self.xdotool("search", "--onlyvisible", "--name", name).split()
        return found[-1] if found else None

    def wait_window(self, name: str, timeout: float = 300) -> str:
        return wait_for(lambda: self.find(name), timeout, f"a window named {name!r}")

    def gone(self, window: str) -> bool:
        return window not in self.xdotool("search", "--onlyvisible", "--name", ".").split()

    def keys(self, window: str, *keys: str) -> None:
        self.xdotool("windowfocus", "--sync", window)
        for key in keys:
            self.xdotool("key", key)
            time.sleep(0.3)

    def type(self, window: str, text: str) -> None:
        self.xdotool("windowfocus", "--sync", window)
        self.xdotool("type", "--delay", "50", text)

    def size(self, window: str) -> tuple[int, int]:
        geometry = self.xdotool("getwindowgeometry", window)
        width, height = geometry.split("Geometry:")[1].split()[0].split("x")
        return int(width), int(height)

    def click(self, window: str, x: int, y: int) -> None:
        """Click at (x, y) in the window; negative values count from the right/bottom edge."""
        width, height = self.size(window)
        x, y = x + width if x < 0 else x, y + height if y < 0 else y
        self.xdotool("mousemove", "--window", window, str(x), str(y), "click", "1")

    def screenshot(self, path: Path, window: str = "root") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["import", "-window", window, str(path)], env=self.env, check=True,
                       timeout=60)
        return path
