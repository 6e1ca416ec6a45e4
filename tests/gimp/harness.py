"""Host side of the real-GIMP tests: the cached Debian chroots, bind mounts, running GIMP.

Each tier is a real GIMP from Debian's packages in a chroot (built once by build_chroot.sh,
cached by the script's hash and the suite): GIMP 3.0.4 in Debian 13 (trixie), GIMP 3.2.x in
Debian forky. Only one host folder (the test's work folder) is bind-mounted, at /mnt/test.
The chroot shares the host's network namespace, so the plug-in reaches a backend on the
host's 127.0.0.1, and the host's abstract X11 socket (for the GUI test under Xvfb).

A tier can also take compiled packages away from the plug-in's Python (``Tier.blocked``), as
GIMP's bundled Python on Windows and macOS can't load pip's zmq/msgpack/numpy: see
``block_modules``.
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


TIERS_ENV = "DRAG_GIMP_TIERS"
PLUGIN_SCRIPT = "drag-diffusion.py"  # the plug-in's main file: blocking applies to it only


class Unavailable(Exception):
    """The GIMP tier can't run on this machine (not root, no network for the build, …)."""


@dataclass(frozen=True)
class Tier:
    """One real GIMP the plug-in tests run in."""

    name: str  # test id: "3.0", "3.2", "3.2-stdlib"
    gimp: str  # GIMP's series: binaries gimp-<gimp>, profile folder GIMP/<gimp>
    suite: str  # Debian suite that ships it (build_chroot.sh's SUITE)
    # Top-level modules the plug-in's Python can't import (the Windows/macOS condition).
    blocked: tuple[str, ...] = ()


# Every tier the harness knows; DEFAULT_TIERS run unless $DRAG_GIMP_TIERS names others.
TIERS = {t.name: t for t in (
    Tier("3.0", "3.0", "trixie"),
    Tier("3.2", "3.2", "forky"),
    # GIMP's own Python on Windows/macOS: only the standard library and gi load there.
    Tier("3.2-stdlib", "3.2", "forky", blocked=("zmq", "msgpack", "numpy")),
)}
DEFAULT_TIERS = ("3.0", "3.2", "3.2-stdlib")


def selected_tiers() -> list[Tier]:
    """The tiers to run: ``$DRAG_GIMP_TIERS`` (comma-separated names), else DEFAULT_TIERS."""
    names = [n.strip() for n in os.environ.get(TIERS_ENV, "").split(",") if n.strip()]
    unknown = [n for n in names if n not in TIERS]
    if unknown:
        raise ValueError(f"${TIERS_ENV}: unknown GIMP tier {', '.join(unknown)} "
                         f"(known: {', '.join(TIERS)})")
    return [TIERS[n] for n in names or DEFAULT_TIERS]


def chroot_cache_root() -> Path:
    return Path(os.environ.get("DRAG_GIMP_CHROOT") or REPO / ".cache" / "gimp-chroot")


def chroot_path(suite: str = "trixie") -> Path:
    """The chroot of ``suite`` for the current build script (the suite and the script's hash
    are the cache key); built if needed."""
    key = f"{suite}-{hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()[:12]}"
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
            result = subprocess.run(["sh", str(BUILD_SCRIPT), str(path), suite], stdout=out,
                                    stderr=subprocess.STDOUT, timeout=1800)
        if result.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise Unavailable(f"building the GIMP chroot failed (see {log}):\n{tail}")
        print(f"built the GIMP chroot {path} in {time.monotonic() - started:.0f} s")
    return path


def chroot_versions(chroot: Path) -> dict[str, str]:
    """Debian package versions in the chroot (``gimp``, ``python3``), from its build."""
    pairs = (line.split("\t") for line in (chroot / ".versions").read_text().splitlines())
    return {name: version for name, version in pairs}


def chroot_python(chroot: Path) -> str:
    """The chroot's Python version, e.g. "3.14" (what GIMP's plug-ins run with)."""
    return os.readlink(chroot / "usr" / "bin" / "python3").removeprefix("python")


def _mounted(target: Path) -> bool:
    target = str(target.resolve())
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


@contextlib.contextmanager
def bind_mount(source: Path, chroot: Path) -> Iterator[str]:
    """Bind ``source`` at /mnt/test inside the chroot; always unmounted afterwards.

    One test run at a time holds a chroot's mount point: another run on the same cached chroot
    (a second checkout sharing $DRAG_GIMP_CHROOT) waits for it instead of unmounting it."""
    target = chroot / MOUNT_POINT.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    with open(chroot.parent / f".{chroot.name}.mount-lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another test run to release {target}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _mounted(target):  # left over from a killed run (its lock died with it)
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

    def __init__(self, chroot: Path, work: Path, tier: Tier = TIERS["3.0"]) -> None:
        self.chroot = chroot
        self.work = work  # host path of /mnt/test
        self.tier = tier
        self.home = work / "home"
        self.python = chroot_python(chroot)

    @property
    def profile(self) -> Path:
        """Host path of GIMP's profile folder ($XDG_CONFIG_HOME/GIMP/3.x)."""
        return self.home / ".config" / "GIMP" / self.tier.gimp

    @property
    def plugin_dir(self) -> Path:
        return self.profile / "plug-ins"

    def inside(self, host_path: Path) -> str:
        """The chroot's path for a host path under the work folder."""
        return f"{MOUNT_POINT}/{host_path.resolve().relative_to(self.work.resolve())}"

    @property
    def user_base(self) -> Path:
        """Host path of the plug-in Python's user base ($PYTHONUSERBASE): block_modules."""
        return self.work / "python-user-base"

    def prepare_profile(self) -> None:
        self.profile.mkdir(parents=True, exist_ok=True)
        (self.home / "runtime").mkdir(mode=0o700, exist_ok=True)
        gimprc = self.profile / "gimprc"
        if not gimprc.exists():  # GIMP rewrites it on exit; keep its version afterwards
            gimprc.write_text("(show-welcome-dialog no)\n(check-updates no)\n"
                              "(save-session-info no)\n(help-browser web-browser)\n")
        if self.tier.blocked:
            block_modules(self.user_base, self.python, self.tier.blocked)

    def env(self, extra: dict[str, str] | None = None) -> list[str]:
        home = self.inside(self.home)
        base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home,
                "XDG_CONFIG_HOME": f"{home}/.config", "XDG_CACHE_HOME": f"{home}/.cache",
                "XDG_DATA_HOME": f"{home}/.local/share", "XDG_RUNTIME_DIR": f"{home}/runtime",
                "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                # GTK in forky loads icons through glycin, which runs each image loader in a
                # bwrap sandbox; bwrap needs /proc and user namespaces, which neither the
                # chroot nor a CI container has, and GIMP 3.2's GUI aborts on the first icon.
                # glycin's own switch runs the loaders unsandboxed (trixie has no glycin).
                "GLYCIN_DISABLE_SANDBOX": "i-know-the-risks"}
        if self.tier.blocked:
            base["PYTHONUSERBASE"] = self.inside(self.user_base)
        base.update(extra or {})
        return [f"{k}={v}" for k, v in base.items()]

    def command(self, batch: list[str], *, gui: bool = False,
                env: dict[str, str] | None = None) -> list[str]:
        # In the GUI, messages go to stderr (the test counts them) instead of message boxes.
        series = self.tier.gimp
        program = [f"gimp-{series}", "-n", "-s", "--console-messages"] if gui else \
            [f"gimp-console-{series}", "-i", "-n"]
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


# Imported at the start of every Python in the chroot that runs with PYTHONUSERBASE set to
# the blocking user base (a .pth line); it blocks only in the plug-in's own process.
BLOCKER = '''"""Makes some top-level modules unimportable in GIMP's plug-in (test harness)."""
import importlib.abc
import os
import sys

BLOCKED = {blocked!r}


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(
                f"No module named {{name!r}} (blocked by the test harness: GIMP's bundled "
                "Python on Windows and macOS can't load this compiled package)", name=name)
        return None


if os.path.basename(sys.argv[0] if sys.argv else "") == {script!r}:
    sys.meta_path.insert(0, Blocked())
'''


def block_modules(user_base: Path, python: str, modules: tuple[str, ...]) -> None:
    """Make ``modules`` unimportable in the plug-in's Python (GIMP starts it by its shebang).

    Python reads the ``.pth`` files of its user site folder ($PYTHONUSERBASE/lib/pythonX.Y/
    site-packages) at startup and runs their ``import`` lines; the blocker module it imports
    puts a finder in front of every other that refuses ``modules`` (ModuleNotFoundError, as
    if they were not installed) when the process is the plug-in's (``sys.argv[0]``). Other
    Pythons in the chroot (GIMP's batch interpreter running the test's code) are untouched.
    """
    site = user_base / "lib" / f"python{python}" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    (site / "drag_test_blocker.py").write_text(
        BLOCKER.format(blocked=tuple(sorted(modules)), script=PLUGIN_SCRIPT))
    (site / "drag-test-blocker.pth").write_text("import drag_test_blocker\n")


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
