"""Host side of the real-GIMP tests: the cached Debian 13 chroot, bind mounts, running GIMP.

GIMP 3.0.4 runs inside a Debian 13 chroot (built once by build_chroot.sh, cached by the
script's hash). Only one host folder (the test's work folder) is bind-mounted, at /mnt/test.
The chroot shares the host's network namespace, so the plug-in reaches a backend on the
host's 127.0.0.1, and the host's abstract X11 socket (for the GUI test under Xvfb).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import limits

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD_SCRIPT = HERE / "build_chroot.sh"
MOUNT_POINT = "/mnt/test"


class Unavailable(Exception):
    """The GIMP tier can't run on this machine (not root, no network for the build, …)."""


def chroot_cache_root() -> Path:
    return Path(os.environ.get("DRAG_GIMP_CHROOT") or REPO / ".cache" / "gimp-chroot")


def chroot_path() -> Path:
    """The chroot for the current build script (its hash is the cache key); build if needed."""
    key = hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()[:12]
    root = chroot_cache_root()
    path = root / key
    if (path / ".versions").exists():
        return path
    if os.geteuid() != 0:
        raise Unavailable("the GIMP tests need root (debootstrap, chroot, mount --bind)")
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it right now
        if (path / ".versions").exists():
            return path
        log = root / "logs" / f"build-{key}.log"
        started = time.monotonic()
        with open(log, "w") as out:
            result = subprocess.run(["sh", str(BUILD_SCRIPT), str(path)], stdout=out,
                                    stderr=subprocess.STDOUT, timeout=1800)
        if result.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise Unavailable(f"building the GIMP chroot failed (see {log}):\n{tail}")
        print(f"built the GIMP chroot {path} in {time.monotonic() - started:.0f} s")
    return path


def _mounted(target: Path) -> bool:
    target = str(target.resolve())
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


@contextlib.contextmanager
def bind_mount(source: Path, chroot: Path) -> Iterator[str]:
    """Bind ``source`` at /mnt/test inside the chroot; always unmounted afterwards."""
    target = chroot / MOUNT_POINT.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    if _mounted(target):  # left over from a killed run
        subprocess.run(["umount", "-l", str(target)], check=False)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield MOUNT_POINT
    finally:
        if subprocess.run(["umount", str(target)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=False)


@dataclass
class GimpRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


class GimpChroot:
    """Runs GIMP in the chroot with a profile inside the mounted work folder."""

    def __init__(self, chroot: Path, work: Path) -> None:
        self.chroot = chroot
        self.work = work  # host path of /mnt/test
        self.home = work / "home"

    @property
    def profile(self) -> Path:
        """Host path of GIMP's profile folder ($XDG_CONFIG_HOME/GIMP/3.0)."""
        return self.home / ".config" / "GIMP" / "3.0"

    @property
    def plugin_dir(self) -> Path:
        return self.profile / "plug-ins"

    def inside(self, host_path: Path) -> str:
        """The chroot's path for a host path under the work folder."""
        return f"{MOUNT_POINT}/{host_path.resolve().relative_to(self.work.resolve())}"

    def prepare_profile(self) -> None:
        self.profile.mkdir(parents=True, exist_ok=True)
        (self.home / "runtime").mkdir(mode=0o700, exist_ok=True)
        gimprc = self.profile / "gimprc"
        if not gimprc.exists():  # GIMP rewrites it on exit; keep its version afterwards
            gimprc.write_text("(show-welcome-dialog no)\n(check-updates no)\n"
                              "(save-session-info no)\n(help-browser web-browser)\n")

    def env(self, extra: dict[str, str] | None = None) -> list[str]:
        home = self.inside(self.home)
        base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home,
                "XDG_CONFIG_HOME": f"{home}/.config", "XDG_CACHE_HOME": f"{home}/.cache",
                "XDG_DATA_HOME": f"{home}/.local/share", "XDG_RUNTIME_DIR": f"{home}/runtime",
                "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **(extra or {})}
        return [f"{k}={v}" for k, v in base.items()]

    def command(self, batch: list[str], *, gui: bool = False,
                env: dict[str, str] | None = None) -> list[str]:
        # In the GUI, messages go to stderr (the test counts them) instead of message boxes.
        program = ["gimp-3.0", "-n", "-s", "--console-messages"] if gui else \
            ["gimp-console-3.0", "-i", "-n"]
        args = [*program, "--batch-interpreter", "python-fu-eval"]
        for code in batch:
            args += ["-b", code]
        return ["chroot", str(self.chroot), "/usr/bin/env", "-i", *self.env(env), *args,
                "--quit"]

    def run(self, batch: list[str], *, timeout: float = 1200, gui: bool = False,
            env: dict[str, str] | None = None) -> GimpRun:
        """Run GIMP in batch mode; ``timeout`` is a safety net against a hang (scaled by
        ``limits``), not a speed check: its firing is reported in the run's stderr."""
        started, seconds = time.monotonic(), limits.safety_net(timeout)
        try:
            result = subprocess.run(self.command(batch, gui=gui, env=env), capture_output=True,
                                    text=True, timeout=seconds)
        except subprocess.TimeoutExpired as exc:
            return GimpRun(124, _text(exc.stdout),
                           _text(exc.stderr) + "\n" + limits.fired("GIMP to finish", seconds),
                           time.monotonic() - started)
        return GimpRun(result.returncode, result.stdout, result.stderr,
                       time.monotonic() - started)

    def popen(self, batch: list[str], *, gui: bool = False, env: dict[str, str] | None = None,
              log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(self.command(batch, gui=gui, env=env), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def script(self, name: str, **variables: object) -> str:
        """Batch code: set ``variables`` (JSON values), then run tests/gimp/<name> (copied)."""
        shutil.copy2(HERE / name, self.work / name)
        assignments = "; ".join(f"{k} = json.loads({json.dumps(json.dumps(v))})"
                                for k, v in variables.items())
        return (f"import json; {assignments}; "
                f"exec(compile(open('{MOUNT_POINT}/{name}').read(), '{name}', 'exec'))")


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def install_plugin(gimp: GimpChroot, *extra: str) -> subprocess.CompletedProcess:
    """Install the plug-in into the test profile with the repo's install.py."""
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), str(REPO / "install.py"), "--no-venv",
         "--gimp-plugin-dir", str(gimp.plugin_dir), *extra],
        capture_output=True, text=True, timeout=600, check=True)


def ensure_host_tools(*commands: str, packages: tuple[str, ...]) -> None:
    """Install Debian packages on the host when a command is missing (CI starts bare)."""
    if all(shutil.which(c) for c in commands):
        return
    if os.geteuid() != 0:
        raise Unavailable(f"missing {', '.join(commands)}; apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
            raise Unavailable(f"could not install {' '.join(packages)} with apt-get")
