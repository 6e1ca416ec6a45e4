#!/usr/bin/env python3
"""Install Drag Diffusion: the backend's virtual environment and the GIMP 3 plug-in.

    python3 install.py               # venv in .venv + plug-in into every GIMP 3.x profile
    python3 install.py --service     # Linux: also run the backend as a systemd user service
    python3 install.py --uninstall   # remove the plug-in (add --purge to delete the venv too)
    python3 install.py --models sd15,instant   # also download these model sets (size first)
    python3 install.py --cluster     # also Ray Serve, to serve from several GPUs (docs/cluster.md)

Re-running upgrades in place. Uses only the standard library. What it decides for a platform
(whether it can install there, which torch build, which GIMP profile folders, the start
commands, the user service) comes from pure functions of a ``Platform`` description, so each
platform's decisions are tested on any machine (tests/test_install.py); docs/platforms.md
says what happens on each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as platform_module
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from urllib.parse import quote

REPO = Path(__file__).resolve().parent
PLUGIN_NAME = "drag-diffusion"
PLUGIN_SOURCE = REPO / "gimp_plugin" / PLUGIN_NAME
PROTOCOL_SOURCE = REPO / "protocol"
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
FLATPAK_ID = "org.gimp.GIMP"
# GIMP 3 for Windows and macOS bundles its own Python; this is its version when it can't be probed.
BUNDLED_PYTHON = "3.12"
BACKEND_ARGS = ("-m", "backend", "serve")

MIN_PYTHON = (3, 10)  # torch 2.13 has no wheels for older Pythons
MIN_MACOS = (14, 0)  # torch 2.13's only macOS wheels are macosx_14_0_arm64
NEWEST_GIMP = "3.2"  # the profile folder made when no GIMP 3 profile exists yet
TORCH_INDEX = "https://download.pytorch.org/whl/"
TORCH_CUDA = "cu128"  # PyTorch's CUDA 12.8 wheels (Windows and Linux, x86_64 and arm64)
SERVICE_NAME = "gimp-drag-diffusion.service"

# The plug-in and its protocol/ package need this Python and its standard library, nothing else.
PLUGIN_PYTHON = (3, 10)


def log(message: str) -> None:
    print(f"[install] {message}", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run(cmd, check=True, **kwargs)


def project_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    return match.group(1) if match else "0"


def pinned(package: str) -> str | None:
    """The version constraints.txt pins for ``package``, if any."""
    for line in CONSTRAINTS.read_text().splitlines():
        name, _, version = line.strip().partition("==")
        if name.lower().replace("_", "-") == package.lower() and version:
            return version
    return None


# --- the platform and what can be installed on it -----------------------------------------------

class Unsupported(Exception):
    """This machine can't run the backend as asked; the text is one line saying what to do."""


@dataclass(frozen=True)
class Platform:
    """What the installer's decisions depend on (``current_platform()`` describes this one)."""

    system: str  # "linux", "windows" or "macos"
    machine: str = "x86_64"  # "x86_64" or "arm64"
    python: tuple = (3, 12)  # the Python running install.py (it makes the venv)
    macos: tuple | None = None  # macOS version, e.g. (14, 5)
    nvidia_gpu: bool = False  # nvidia-smi answered
    rosetta: bool = False  # an x86_64 Python translated by Rosetta on an Apple Silicon Mac


def _version_tuple(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def current_platform() -> Platform:
    system = {"win32": "windows", "darwin": "macos"}.get(sys.platform, "linux")
    machine = platform_module.machine().lower()
    machine = {"amd64": "x86_64", "aarch64": "arm64"}.get(machine, machine)
    macos = _version_tuple(platform_module.mac_ver()[0]) if system == "macos" else None
    rosetta = system == "macos" and machine == "x86_64" and _sysctl("sysctl.proc_translated") == "1"
    return Platform(system, machine, tuple(sys.version_info[:2]), macos,
                    system != "macos" and has_nvidia_gpu(), rosetta)


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def has_nvidia_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def check_supported(p: Platform) -> None:
    """Raise ``Unsupported`` (one line: why, and what to do instead) where torch 2.13 has no
    build for this machine or this Python."""
    if p.system == "macos" and p.rosetta:
        raise Unsupported(
            "install.py: this Python is an Intel (x86_64) build running under Rosetta, and "
            "PyTorch 2.13 has no Intel macOS build; run install.py with an Apple Silicon "
            "(arm64) Python, e.g. from python.org or Homebrew in /opt/homebrew.")
    if p.system == "macos" and p.machine != "arm64":
        raise Unsupported(
            "install.py: PyTorch 2.13 has no build for Intel Macs, so the backend can't run "
            "on this Mac; run it on a Linux or Windows PC or an Apple Silicon Mac "
            "(docs/platforms.md).")
    if p.system == "macos" and (p.macos or (0, 0)) < MIN_MACOS:
        found = ".".join(str(v) for v in p.macos) if p.macos else "unknown"
        raise Unsupported(
            f"install.py: PyTorch 2.13 needs macOS {MIN_MACOS[0]} (Sonoma) or newer on Apple "
            f"Silicon (this is macOS {found}); update macOS, then run install.py again.")
    if p.python < MIN_PYTHON:
        hint = {"windows": "py -3.12 install.py",
                "macos": "python3.12 install.py (python.org or Homebrew)"}.get(
                    p.system, "python3.12 install.py (your distribution's python3.12)")
        raise Unsupported(
            f"install.py: the backend needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer "
            f"(PyTorch 2.13 has no wheels for Python {p.python[0]}.{p.python[1]}); install a "
            f"newer Python and run: {hint}")


@dataclass(frozen=True)
class TorchPlan:
    """The torch build to install: ``pip install --no-deps <pip_args>``."""

    version: str  # "2.13.0"
    local: str  # the wheel's local version tag: "cu128", "cpu", or "" for PyPI's own build
    index: str | None  # the one index it comes from (--index-url); None = PyPI
    build: str  # what the user is told

    @property
    def requirement(self) -> str:
        return f"torch=={self.version}+{self.local}" if self.local else f"torch=={self.version}"

    def pip_args(self) -> list[str]:
        return [self.requirement] + (["--index-url", self.index] if self.index else [])


def torch_plan(p: Platform, device: str, version: str) -> TorchPlan:
    """Which torch build to install for ``device`` ("auto", "cpu" or "cuda") on ``p``.

    PyPI's Windows wheels are CPU-only, so CUDA comes from PyTorch's own index on Windows and
    Linux alike; the CPU build comes from PyTorch's CPU index (no CUDA libraries pulled in);
    macOS has one build (Apple Silicon, with MPS) on PyPI."""
    if p.system == "macos":
        if device == "cuda":
            raise Unsupported("install.py: --cuda: macOS has no CUDA; leave --cuda out to "
                              "install the Apple Silicon build, which uses the GPU through MPS.")
        return TorchPlan(version, "", None, "the macOS build for Apple Silicon (GPU through "
                         "MPS), from PyPI")
    if device == "cuda" or (device == "auto" and p.nvidia_gpu):
        cuda = f"{TORCH_CUDA[2:-1]}.{TORCH_CUDA[-1]}"
        return TorchPlan(version, TORCH_CUDA, TORCH_INDEX + TORCH_CUDA,
                         f"the CUDA {cuda} build, from PyTorch's index")
    why = " (no NVIDIA GPU found: nvidia-smi did not answer)" if device == "auto" else ""
    return TorchPlan(version, "cpu", TORCH_INDEX + "cpu",
                     f"the CPU-only build, from PyTorch's index{why}")


def describe_torch(version: str, system: str) -> str:
    """What an installed torch (its ``__version__``, e.g. "2.13.0+cu128") is built for."""
    local = version.partition("+")[2]
    if local.startswith("cu") and local[2:].isdigit() and len(local) >= 4:
        return f"CUDA {local[2:-1]}.{local[-1]} build"
    if local == "cpu":
        return "CPU-only build"
    if local.startswith("rocm"):
        return f"ROCm {local[4:]} build"
    return {"macos": "macOS build (Apple Silicon GPU through MPS)",
            "windows": "PyPI's Windows build (CPU only)",
            "linux": "PyPI's Linux build (CUDA on x86_64)"}.get(system, "PyPI's build")


# --- start commands ------------------------------------------------------------------------------

def _powershell_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _cmd_quote(text: str) -> str:
    return f'"{text}"'  # no Windows path contains a double quote


def start_commands(system: str, repo: str, python: str,
                   args: tuple = BACKEND_ARGS) -> list[tuple[str, str]]:
    """(shell, command) pairs that start the backend from any folder of any drive.

    Windows PowerShell 5.1 has no ``&&`` and runs a quoted program only after ``&``; cmd's
    ``cd`` changes drive only with ``/d``."""
    tail = " ".join(args)
    if system == "windows":
        return [("PowerShell", f"Set-Location -LiteralPath {_powershell_quote(repo)}; "
                               f"& {_powershell_quote(python)} {tail}"),
                ("cmd", f"cd /d {_cmd_quote(repo)} && {_cmd_quote(python)} {tail}")]
    return [("shell", f"cd {shlex.quote(repo)} && {shlex.quote(python)} {tail}")]


# --- GIMP's profile folders ------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A GIMP plug-in folder to install into."""

    plugin_dir: PurePath  # .../GIMP/3.x/plug-ins
    kind: str  # "linux", "flatpak", "windows", "macos" or "custom"
    version: str  # "3.0", "3.2"; "" for --gimp-plugin-dir
    existed: bool  # the profile was there (else install.py creates it)


def gimp_config_roots(system: str, home: str, env: dict) -> list[tuple[PurePath, str]]:
    """Folders that hold GIMP's per-version profiles ("3.0", "3.2", …) and the kind of GIMP
    each belongs to, the usual one first."""
    if system == "windows":
        appdata = env.get("APPDATA") or str(PureWindowsPath(home, "AppData", "Roaming"))
        return [(PureWindowsPath(appdata, "GIMP"), "windows")]
    home_path = PurePosixPath(home)
    if system == "macos":
        return [(home_path / "Library" / "Application Support" / "GIMP", "macos")]
    config = PurePosixPath(env.get("XDG_CONFIG_HOME") or home_path / ".config")
    return [(config / "GIMP", "linux"),
            (home_path / ".var" / "app" / FLATPAK_ID / "config" / "GIMP", "flatpak")]


def _series_key(version: str) -> tuple:
    return tuple(int(v) for v in version.split("."))


def plan_targets(roots: list[tuple[PurePath, str]], found: dict,
                 flatpak_app: bool) -> tuple[list[Target], list[str]]:
    """Where to install, from the version folders ``found`` in each root (root → names like
    "2.10", "3.0", "3.2"), and notes for the user.

    Every GIMP 3.x profile that exists gets the plug-in. Where none exists, a new NEWEST_GIMP
    profile folder: Flatpak's when its GIMP is installed (``flatpak_app``), else the usual
    root's. Never next to an existing 3.x profile: GIMP imports an older version's settings
    only into a profile folder that does not exist yet, so a premature 3.2 folder would lose a
    3.0 user's settings at their upgrade."""
    targets: list[Target] = []
    for root, kind in roots:
        versions = sorted((v for v in found.get(root, []) if v.startswith("3.")),
                          key=_series_key, reverse=True)
        targets += [Target(root / v / "plug-ins", kind, v, True) for v in versions]
    if targets:
        return targets, []
    root, kind = next(((r, k) for r, k in roots if k == "flatpak" and flatpak_app), roots[0])
    older = sorted((v for v in found.get(root, []) if v.startswith("2.")), key=_series_key)
    note = f"no GIMP 3 profile in {root}: created {NEWEST_GIMP}/plug-ins there"
    if older:
        note += (f"; GIMP {NEWEST_GIMP} will not import your GIMP {older[-1]} settings into "
                 f"it (to keep them: remove {root / NEWEST_GIMP}, start GIMP {NEWEST_GIMP} "
                 "once, then run install.py again)")
    return [Target(root / NEWEST_GIMP / "plug-ins", kind, NEWEST_GIMP, False)], [note]


def find_targets() -> tuple[list[Target], list[str]]:
    """``plan_targets`` for this machine's folders."""
    system = current_platform_system()
    roots = gimp_config_roots(system, str(Path.home()), dict(os.environ))
    found = {}
    for root, _ in roots:
        folder = Path(root)
        if folder.is_dir():
            found[root] = [p.name for p in folder.iterdir()
                           if p.is_dir() and re.fullmatch(r"\d+\.\d+", p.name)]
    flatpak_app = (Path.home() / ".var" / "app" / FLATPAK_ID).is_dir()
    return plan_targets(roots, found, flatpak_app)


def current_platform_system() -> str:
    return {"win32": "windows", "darwin": "macos"}.get(sys.platform, "linux")


# --- the backend's venv ------------------------------------------------------------------------------

def venv_python(venv: Path, system: str | None = None) -> Path:
    windows = (system or current_platform_system()) == "windows"
    return venv / ("Scripts/python.exe" if windows else "bin/python")


def installed_torch(python: Path) -> str | None:
    """The torch version in the venv (e.g. "2.13.0+cpu"), or None."""
    try:
        probe = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                               capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return probe.stdout.strip() if probe.returncode == 0 else None


def torch_matches(installed: str | None, plan: TorchPlan) -> bool:
    """Whether the installed torch is the planned version and build (its local tag)."""
    if not installed:
        return False
    version, _, local = installed.partition("+")
    return version == plan.version and local == plan.local


def torch_install_command(python: str, plan: TorchPlan) -> list[str]:
    """The pip call that installs the planned torch into the venv.

    torch alone, from its index: its dependencies come from PyPI in the requirements step,
    so an unreachable index costs one quick lookup instead of one per dependency."""
    return [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
            "--retries", "1", "--timeout", "30", *plan.pip_args()]


def create_venv(venv: Path, plan: TorchPlan, dev: bool,
                cluster: bool = False) -> tuple[Path, str]:
    """Create or update the venv; returns its Python and the torch version it now has."""
    python = venv_python(venv)
    if python.exists():
        log(f"reusing virtual environment {venv}")
    else:
        run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    current = installed_torch(python)
    if torch_matches(current, plan):
        log(f"torch {current} already installed")
    else:
        log(f"installing torch: {plan.build}")
        run(torch_install_command(str(python), plan))
    requirements = ["-r", str(REPO / "requirements" / "backend.txt")]
    if dev:
        requirements += ["-r", str(REPO / "requirements" / "dev.txt")]
    if cluster:  # Ray Serve for ``serve --ray`` (docs/cluster.md); never needed for one GPU
        requirements += ["-r", str(REPO / "requirements" / "cluster.txt")]
    # constraints.txt pins torch==X, which the installed X+cpu (or CUDA) build satisfies.
    run([*pip, *requirements, "-c", str(CONSTRAINTS)])
    return python, installed_torch(python) or "not importable"


# --- GIMP's Python ----------------------------------------------------------------------------------

@dataclass
class GimpPython:
    """What we know about the Python that runs GIMP's plug-ins."""

    description: str
    version: str  # "3.13"; the plug-in needs only its standard library


PROBE = "import sys; print('%d.%d' % sys.version_info[:2])"


def _probe(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run([*cmd, "-c", PROBE], capture_output=True, text=True, timeout=60,
                             env=_clean_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = out.stdout.strip()
    return version if re.fullmatch(r"\d+\.\d+", version) else None


def _clean_env() -> dict[str, str]:
    """This environment without any virtualenv or PYTHON* settings (GIMP doesn't have them)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if not p.startswith(venv))
    return env


def gimp_python(kind: str, override: str | None) -> GimpPython:
    """Probe the version of the Python that runs GIMP's plug-ins for ``kind``."""
    probes: list[list[str]] = []
    if kind == "windows":
        probes = [[str(Path(os.environ.get(v, "")) / sub / "bin" / "python.exe")]
                  for v in ("ProgramFiles", "LOCALAPPDATA") for sub in ("GIMP 3", "Programs/GIMP 3")]
    elif kind == "macos":
        probes = [["/Applications/GIMP.app/Contents/MacOS/python3"]]
    elif kind == "flatpak":
        if shutil.which("flatpak"):
            probes = [["flatpak", "run", "--command=python3", FLATPAK_ID]]
    else:
        system = shutil.which("python3", path=_clean_env().get("PATH", ""))
        probes = [["/usr/bin/python3"]] + ([[system]] if system else [])
    if override:
        probes = [[override]]
    for cmd in probes:
        if len(cmd) > 1 or Path(cmd[0]).is_file():
            version = _probe(cmd)
            if version:
                return GimpPython(" ".join(cmd), version)
    return GimpPython(f"GIMP's Python (not found; assuming {BUNDLED_PYTHON})", BUNDLED_PYTHON)


def too_old(version: str) -> bool:
    """Whether GIMP's Python ``version`` ("3.9") is older than the plug-in needs."""
    return tuple(int(part) for part in version.split(".")[:2]) < PLUGIN_PYTHON


# --- plug-in files --------------------------------------------------------------------------------

def copy_tree(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def install_plugin(dest: Path) -> None:
    """Replace everything in ``dest`` with the repo's plug-in and its protocol package (pure
    Python: no compiled package goes into GIMP's plug-in folder; a ``vendor/`` folder of
    pyzmq/msgpack wheels left by an older release is removed with the rest)."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in dest.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for entry in PLUGIN_SOURCE.iterdir():
        if entry.name == "__pycache__":
            continue
        if entry.is_dir():
            copy_tree(entry, dest / entry.name)
        else:
            shutil.copy2(entry, dest / entry.name)
    copy_tree(PROTOCOL_SOURCE, dest / "protocol")
    main = dest / f"{PLUGIN_NAME}.py"
    main.chmod(main.stat().st_mode | 0o755)


def _backend_python_prints(python: Path, code: str) -> str | None:
    """What ``code`` prints when run in the repository by the backend's Python (else by this
    one); None if neither runs it."""
    for candidate in (str(python), sys.executable):
        try:
            out = subprocess.run([candidate, "-c", code], cwd=REPO, capture_output=True,
                                 text=True, timeout=60)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return None


def default_connection_file(python: Path) -> str:
    """The backend's default connection file, as the repo's protocol package defines it."""
    path = _backend_python_prints(
        python, "from protocol import default_connection_file as f; print(f())")
    if path is not None:
        return path
    raise SystemExit("install.py: can't import the protocol package with the backend's Python "
                     f"({python}); run without --no-venv to create the environment")


def backend_parameters(python: Path) -> dict:
    """The table of the model ``serve`` will load by default (SD1.5, or the demo model where
    it is missing), as its hello reply carries it, for the plug-in's dialog before it reaches a
    backend; {} if the backend can't be imported."""
    code = ("import json; from backend.model_choice import expected_table; "
            "print(json.dumps(expected_table(None).as_hello()))")
    out = _backend_python_prints(python, code)
    return json.loads(out) if out is not None else {}


# --- the backend as a systemd user service (Linux) -------------------------------------------------

def _systemd_word(text: str) -> str:
    """One word of a unit file's command line: ``%`` and ``$`` escaped, quoted when needed."""
    text = text.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9/._+:=@-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_unit(repo: str, python: str, args: tuple = BACKEND_ARGS) -> str:
    """The ``systemd --user`` unit that runs the backend from login to logout."""
    command = " ".join(_systemd_word(word) for word in (python, *args))
    return "\n".join([
        "# Written by Drag Diffusion's install.py; install.py --uninstall removes it.",
        "[Unit]",
        "Description=Drag Diffusion backend for GIMP (DragDiffusion/GoodDrag edits)",
        "Documentation=file://" + quote(f"{repo}/docs/platforms.md").replace("%", "%%"),
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={repo.replace('%', '%%')}",
        f"ExecStart={command}",
        "Restart=on-failure",
        "RestartSec=5",
        "Environment=PYTHONUNBUFFERED=1",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])


def service_wanted(p: Platform, requested: str, targets: list[Target]) -> tuple[bool, str]:
    """Whether to set up the user service (``requested``: "auto", "yes" or "no"), and why.

    auto: only where a Flatpak GIMP gets the plug-in, because the sandbox can't start the
    backend (no org.freedesktop.Flatpak talk permission), while a native GIMP starts it."""
    flatpak = any(t.kind == "flatpak" for t in targets)
    if requested == "no":
        return False, "--no-service"
    if p.system != "linux":
        if requested == "yes":
            raise Unsupported("install.py: --service sets up a systemd user service, which "
                              "only Linux has; on Windows and macOS the plug-in starts the "
                              "backend itself.")
        return False, "not Linux"
    if requested == "yes":
        return True, "--service"
    if flatpak:
        return True, "Flatpak GIMP can't start programs outside its sandbox"
    return False, "the plug-in starts the backend when needed"


def service_commands(enable: bool = True) -> list[list[str]]:
    """The systemctl calls that (un)register the unit and start (stop) it now."""
    if enable:
        return [["systemctl", "--user", "daemon-reload"],
                ["systemctl", "--user", "enable", "--now", SERVICE_NAME]]
    return [["systemctl", "--user", "disable", "--now", SERVICE_NAME],
            ["systemctl", "--user", "daemon-reload"]]


def user_unit_dir(env: dict, home: str) -> Path:
    config = env.get("XDG_CONFIG_HOME") or str(Path(home) / ".config")
    return Path(config) / "systemd" / "user"


def systemctl_user_usable() -> str | None:
    """None when ``systemctl --user`` reaches a user manager, else why not."""
    if not shutil.which("systemctl"):
        return "systemctl is not installed"
    try:
        probe = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"systemctl --user failed: {exc}"
    if probe.returncode != 0:
        return f"systemctl --user: {(probe.stderr or probe.stdout).strip() or probe.returncode}"
    return None


def install_service(unit: Path, repo: str, python: str) -> str | None:
    """Write the unit and enable it now; None when it runs, else why it doesn't."""
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(service_unit(repo, python))
    log(f"wrote {unit}")
    why = systemctl_user_usable()
    if why:
        return why
    for cmd in service_commands():
        log("$ " + " ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            return f"{' '.join(cmd)}: {(result.stderr or result.stdout).strip()}"
    return None


def remove_service(unit_dir: Path) -> None:
    unit = unit_dir / SERVICE_NAME
    if not unit.exists():
        return
    if not systemctl_user_usable():
        for cmd in service_commands(enable=False):
            log("$ " + " ".join(cmd))
            subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    unit.unlink()
    log(f"removed {unit}")


# --- what the user reads at the end ----------------------------------------------------------------

# --- models -----------------------------------------------------------------------------------------

CATALOGUE = REPO / "backend" / "hub" / "catalogue.json"  # the model sets (one place)
CATALOGUE_ENV = "DRAG_DIFFUSION_CATALOGUE"  # another catalogue (backend/hub/catalogue.py)


def catalogue_sizes(path: Path | None = None) -> dict[str, tuple[str, int]]:
    """Each model set's title and size in bytes, from the catalogue's ``approx_bytes`` (the
    hub's pages; a download checks the hub's exact sizes)."""
    path = path or Path(os.environ.get(CATALOGUE_ENV) or CATALOGUE)
    sets = json.loads(path.read_text(encoding="utf-8"))["sets"]
    return {name: (str(entry.get("title") or name),
                   sum(int(piece.get("approx_bytes", 0)) for piece in entry.get("pieces", [])))
            for name, entry in sets.items()}


def chosen_models(text: str, sizes: dict[str, tuple[str, int]]) -> list[str]:
    """``--models``: comma-separated set names, or ``none``; an unknown name is refused in one
    line before anything is installed."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in sizes]
    if unknown:
        raise Unsupported(f"install.py: --models: unknown model set {', '.join(unknown)}; the "
                          f"sets are {', '.join(sizes)} (comma-separated), or none")
    return names


def size_text(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def models_line(names: list[str], sizes: dict[str, tuple[str, int]]) -> str:
    """The size of what --models will download, said before anything is downloaded."""
    parts = [f"{name} ({sizes[name][0]}, {size_text(sizes[name][1])})" for name in names]
    total = sum(sizes[name][1] for name in names)
    return (f"models to download: {', '.join(parts)}: {size_text(total)} in all, into the "
            "Hugging Face cache (HF_HOME), after the plug-in is installed")


def models_offer(sizes: dict[str, tuple[str, int]]) -> str:
    """The closing note when no model was asked for."""
    sets = ", ".join(f"{name} ({size_text(size)})" for name, (_, size) in sizes.items())
    return ("No model downloaded (--models): until one is there the backend serves its small "
            "demo model. Get one with the Download button in the plug-in's dialog, or with "
            f"python -m backend models get NAME in this folder; the sets: {sets}.")


def download_models(python: Path, names: list[str]) -> list[str]:
    """``python -m backend models get NAME`` for each set (its progress bar on this terminal);
    returns a note for each that failed (the installation goes on)."""
    problems = []
    for name in names:
        log(f"downloading the model set {name}")
        result = subprocess.run([str(python), "-m", "backend", "models", "get", name],
                                cwd=REPO)
        if result.returncode != 0:
            problems.append(f"the model set {name} was not downloaded (see above); run "
                            f"python -m backend models get {name} in {REPO} to resume it")
    return problems


@dataclass
class Outcome:
    """What the installation did, for the closing text."""

    system: str
    targets: list[Target]
    commands: list[tuple[str, str]]
    torch: str | None = None  # "2.13.0+cu128 (CUDA 12.8 build)"; None with --no-venv
    service: str | None = None  # the unit file written, if any
    service_problem: str | None = None  # why it does not run (None: enabled and started)
    notes: list[str] = field(default_factory=list)


def closing_text(o: Outcome) -> str:
    """What happens next, exactly, for this platform and these GIMP profiles."""
    lines = ["Drag Diffusion is installed into:"]
    lines += [f"    {t.plugin_dir}  ({_target_label(t)})" for t in o.targets]
    lines += [f"Note: {note}" for note in o.notes]
    if o.torch:
        lines.append(f"Backend: torch {o.torch}.")
    lines.append("Restart GIMP, then use Filters › Generic › Drag Diffusion…")
    flatpak = any(t.kind == "flatpak" for t in o.targets)
    native = any(t.kind != "flatpak" for t in o.targets)
    if o.service and not o.service_problem:
        lines += [
            f"The backend runs as a systemd user service ({SERVICE_NAME}): started now and at "
            "every login, restarted if it fails; it keeps its model in memory while it runs.",
            f"    log:    journalctl --user -u {SERVICE_NAME}",
            f"    stop:   systemctl --user stop {SERVICE_NAME}",
            f"    never start at login: systemctl --user disable --now {SERVICE_NAME}"]
    elif o.service:
        lines += [f"The backend's user service is written ({o.service}) but not enabled: "
                  f"{o.service_problem}. In a desktop session, enable and start it with:",
                  f"    systemctl --user enable --now {SERVICE_NAME}"]
    if flatpak and (not o.service or o.service_problem):
        lines.append("Until then Flatpak GIMP can't start the backend (it can't start programs "
                     "outside its sandbox): start it yourself before using the filter there "
                     "(command below).")
    if native and not (o.service and not o.service_problem):
        where = "In GIMP (not the Flatpak) the" if flatpak else "The"
        window = {"windows": ", without a console window (pythonw.exe)"}.get(o.system, "")
        lines.append(f"{where} plug-in starts the backend when it finds none running{window}; "
                     "the backend keeps running after GIMP closes.")
    lines.append("To start the backend yourself (to watch its log):")
    width = max(len(shell) for shell, _ in o.commands)
    lines += [f"    {shell + ':':<{width + 1}} {command}" if len(o.commands) > 1 else
              f"    {command}" for shell, command in o.commands]
    return "\n".join(lines)


def _target_label(t: Target) -> str:
    name = {"linux": "GIMP", "flatpak": "Flatpak GIMP", "windows": "GIMP for Windows",
            "macos": "GIMP for macOS", "custom": "--gimp-plugin-dir"}[t.kind]
    if t.version:
        name += f" {t.version}" + ("" if t.existed else ", new profile folder")
    return name


# --- main -------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=REPO / ".venv",
                   help="backend virtual environment (default: .venv in the repository)")
    p.add_argument("--no-venv", action="store_true",
                   help="don't create or update the venv (use it as it is)")
    p.add_argument("--dev", action="store_true", help="also install test and lint tools")
    p.add_argument("--cluster", action="store_true",
                   help="also install Ray Serve, to serve from several GPUs or machines "
                        "(serve --ray; docs/cluster.md)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--cpu", dest="device", action="store_const", const="cpu",
                        help="install the CPU build of torch")
    device.add_argument("--cuda", dest="device", action="store_const", const="cuda",
                        help="install the CUDA build of torch (Windows, Linux)")
    p.set_defaults(device="auto")
    p.add_argument("--gimp-plugin-dir", type=Path,
                   help="install into this plug-in folder only (default: every GIMP 3.x "
                        "profile found)")
    service = p.add_mutually_exclusive_group()
    service.add_argument("--service", dest="service", action="store_const", const="yes",
                         help="Linux: run the backend as a systemd user service (the default "
                              "when a Flatpak GIMP is found)")
    service.add_argument("--no-service", dest="service", action="store_const", const="no",
                         help="don't set up the user service")
    p.set_defaults(service="auto")
    p.add_argument("--models", default="none", metavar="SETS",
                   help="model sets to download after installing, comma-separated (e.g. "
                        "sd15,instant; the size is printed first), or none (the default: the "
                        "plug-in's dialog offers them)")
    p.add_argument("--gimp-python",
                   help="the Python that runs GIMP's plug-ins (to check its version)")
    p.add_argument("--uninstall", action="store_true", help="remove the plug-in")
    p.add_argument("--purge", action="store_true", help="with --uninstall: delete the venv too")
    return p.parse_args(argv)


def uninstall(targets: list[Target], venv: Path, purge: bool) -> None:
    for target in targets:
        dest = Path(target.plugin_dir) / PLUGIN_NAME
        if (dest / f"{PLUGIN_NAME}.py").exists() or (dest / "install.json").exists():
            shutil.rmtree(dest)
            log(f"removed {dest}")
        else:
            log(f"no plug-in installed in {target.plugin_dir}")
    if current_platform_system() == "linux":
        remove_service(user_unit_dir(dict(os.environ), str(Path.home())))
    if purge and (venv / "pyvenv.cfg").exists():
        shutil.rmtree(venv)
        log(f"removed virtual environment {venv}")


def check_gimp_python(target: Target, args: argparse.Namespace, probed: dict) -> GimpPython:
    """Probe (once per kind) the Python that runs GIMP's plug-ins for ``target``; warn when it
    is older than the plug-in needs. Nothing else is needed: the plug-in and its protocol/
    package use only the standard library (no compiled package goes into GIMP)."""
    kind = target.kind if target.kind != "custom" else current_platform_system()
    if kind not in probed:
        probed[kind] = gimp_python(kind, args.gimp_python)
        gimp = probed[kind]
        if too_old(gimp.version):
            log(f"warning: GIMP's Python ({gimp.description}) is {gimp.version}; the plug-in "
                f"needs {'.'.join(map(str, PLUGIN_PYTHON))} or newer (GIMP 3 ships one)")
        else:
            log(f"GIMP's Python: {gimp.version} ({gimp.description}); the plug-in needs only "
                "its standard library")
    return probed[kind]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    venv = args.venv.resolve()
    if args.gimp_plugin_dir:
        targets = [Target(args.gimp_plugin_dir.resolve(), "custom", "", True)]
        notes: list[str] = []
    else:
        targets, notes = find_targets()
    if args.uninstall:
        uninstall(targets, venv, args.purge)
        return 0

    here = current_platform()
    try:
        check_supported(here)
        plan = torch_plan(here, args.device, pinned("torch") or "2.13.0")
        want_service, why_service = service_wanted(here, args.service, targets)
        sizes = catalogue_sizes()
        models = chosen_models(args.models, sizes)
    except Unsupported as exc:
        print(exc, file=sys.stderr)
        return 1
    if models:
        log(models_line(models, sizes))

    started = time.monotonic()
    torch_text = None
    if args.no_venv:
        python = venv_python(venv)
        log(f"skipping the virtual environment (--no-venv); backend Python: {python}")
    else:
        python, version = create_venv(venv, plan, args.dev, args.cluster)
        torch_text = f"{version} ({describe_torch(version, here.system)})"
        log(f"torch {torch_text}")

    commands = start_commands(here.system, str(REPO), str(python))
    connection_file = default_connection_file(python)
    parameters = backend_parameters(python)
    probed: dict = {}
    for target in targets:
        dest = Path(target.plugin_dir) / PLUGIN_NAME
        log(f"GIMP plug-in folder: {target.plugin_dir} ({_target_label(target)})")
        install_plugin(dest)
        gimp = check_gimp_python(target, args, probed)
        info = {
            "version": project_version(),
            "repo": str(REPO),
            "venv": str(venv),
            "backend_python": str(python),
            "backend_args": list(BACKEND_ARGS),
            "start_commands": dict(commands),
            "service": SERVICE_NAME if want_service else None,
            "connection_file": connection_file,
            "gimp_python": gimp.description,
            "gimp_python_version": gimp.version,
            "parameters": parameters,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (dest / "install.json").write_text(json.dumps(info, indent=2) + "\n")
        log(f"installed the plug-in into {dest}")

    unit = problem = None
    if want_service:
        log(f"setting up the backend's user service ({why_service})")
        unit = user_unit_dir(dict(os.environ), str(Path.home())) / SERVICE_NAME
        problem = install_service(unit, str(REPO), str(python))
    if models:
        notes += download_models(python, models)
    else:
        notes.append(models_offer(sizes))
    log(f"done in {time.monotonic() - started:.0f} s")
    print()
    print(closing_text(Outcome(here.system, targets, commands, torch_text,
                               str(unit) if unit else None, problem, notes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
