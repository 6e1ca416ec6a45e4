#!/usr/bin/env python3
"""Install Drag Diffusion: the backend's virtual environment and the GIMP 3 plug-in.

    python3 install.py               # venv in .venv + plug-in into GIMP 3's plug-in folder
    python3 install.py --uninstall   # remove the plug-in (add --purge to delete the venv too)

Re-running upgrades in place. Uses only the standard library, so any Python 3.10+ runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent
PLUGIN_NAME = "drag-diffusion"
PLUGIN_SOURCE = REPO / "gimp_plugin" / PLUGIN_NAME
PROTOCOL_SOURCE = REPO / "protocol"
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
FLATPAK_ID = "org.gimp.GIMP"
VENDORED = ("pyzmq", "msgpack")
# GIMP 3 for Windows and macOS bundles its own Python; this is its version when it can't be probed.
BUNDLED_PYTHON = "3.12"


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


# --- backend venv -----------------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_nvidia_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def torch_install_args(device: str) -> tuple[list[str], str]:
    """pip arguments for the torch build that fits this machine, and a description."""
    version = pinned("torch") or "2.13.0"
    if device == "auto":
        device = "cuda" if sys.platform == "darwin" or has_nvidia_gpu() else "cpu"
    if device == "cpu" and sys.platform != "darwin":
        return [f"torch=={version}+cpu", "--extra-index-url", TORCH_CPU_INDEX], "CPU build"
    label = "macOS build (MPS)" if sys.platform == "darwin" else "CUDA build"
    return [f"torch=={version}"], label


def installed_torch(python: Path) -> str | None:
    """The torch version in the venv (e.g. "2.13.0+cpu"), or None."""
    probe = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def create_venv(venv: Path, device: str, dev: bool) -> Path:
    python = venv_python(venv)
    if python.exists():
        log(f"reusing virtual environment {venv}")
    else:
        run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    torch_args, label = torch_install_args(device)
    wanted = torch_args[0].removeprefix("torch==")
    current = installed_torch(python)
    if current and current.split("+")[0] == wanted.split("+")[0] and (
        ("+cpu" in current) == ("+cpu" in wanted)
    ):
        log(f"torch {current} already installed")
    else:
        log(f"installing torch ({label})")
        # torch alone from its index: its dependencies come from PyPI in the next step, so an
        # unreachable extra index costs one quick lookup instead of one per dependency.
        run([*pip, "--no-deps", "--retries", "1", "--timeout", "30", *torch_args])
    requirements = ["-r", str(REPO / "requirements" / "backend.txt")]
    if dev:
        requirements += ["-r", str(REPO / "requirements" / "dev.txt")]
    # constraints.txt pins torch==X, which the installed X+cpu (or CUDA) build satisfies.
    run([*pip, *requirements, "-c", str(CONSTRAINTS)])
    return python


# --- GIMP's plug-in folder ----------------------------------------------------------------------

def gimp_config_roots() -> list[tuple[Path, str]]:
    """Folders holding GIMP's per-version profiles ("3.0", "3.2", …) and what kind each is."""
    home = Path.home()
    if sys.platform == "win32":
        appdata = Path(os.environ.get("APPDATA", home / "AppData" / "Roaming"))
        return [(appdata / "GIMP", "windows")]
    if sys.platform == "darwin":
        return [(home / "Library" / "Application Support" / "GIMP", "macos")]
    config = Path(os.environ.get("XDG_CONFIG_HOME", home / ".config"))
    return [(config / "GIMP", "linux"),
            (home / ".var" / "app" / FLATPAK_ID / "config" / "GIMP", "flatpak")]


def _minor(profile: Path) -> int:
    return int(profile.name.split(".")[1])


def find_plugin_dir() -> tuple[Path, str, list[Path]]:
    """GIMP 3's user plug-in folder: the newest existing 3.x profile, else the default one.

    Returns (plug-in folder, kind, other existing profiles' plug-in folders).
    """
    found: list[tuple[Path, str]] = []
    for root, kind in gimp_config_roots():
        if root.is_dir():
            profiles = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"3\.\d+", p.name)]
            found += [(p / "plug-ins", kind) for p in sorted(profiles, key=_minor, reverse=True)]
    if found:
        return found[0][0], found[0][1], [p for p, _ in found[1:]]
    root, kind = gimp_config_roots()[0]
    return root / "3.0" / "plug-ins", kind, []


# --- GIMP's Python and vendored packages ---------------------------------------------------------

@dataclass
class GimpPython:
    """What we know about the Python that runs GIMP's plug-ins."""

    description: str
    version: str  # "3.13"
    platforms: list[str] = field(default_factory=list)  # wheel platform tags to vendor for
    has_packages: bool | None = None  # can it import zmq and msgpack? None = unknown


PROBE = ("import sys; v = '%d.%d' % sys.version_info[:2]\n"
         "try:\n import zmq, msgpack; ok = 1\nexcept Exception:\n ok = 0\n"
         "print(v, ok)")


def _probe(cmd: list[str]) -> tuple[str, bool] | None:
    try:
        out = subprocess.run([*cmd, "-c", PROBE], capture_output=True, text=True, timeout=60,
                             env=_clean_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.fullmatch(r"(\d+\.\d+) ([01])", out.stdout.strip())
    return (match.group(1), match.group(2) == "1") if match else None


def _clean_env() -> dict[str, str]:
    """This environment without any virtualenv or PYTHON* settings (GIMP doesn't have them)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if not p.startswith(venv))
    return env


def _linux_platforms(machine: str) -> list[str]:
    return [f"manylinux{tag}_{machine}" for tag in ("2014", "_2_17", "_2_26", "_2_28")]


def gimp_python(kind: str, override: str | None) -> GimpPython:
    """Probe the Python that runs GIMP's plug-ins (version, has pyzmq+msgpack) for ``kind``."""
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    probes: list[list[str]] = []
    if kind == "windows":
        platforms = ["win_arm64" if machine == "aarch64" else "win_amd64"]
        probes = [[str(Path(os.environ.get(v, "")) / sub / "bin" / "python.exe")]
                  for v in ("ProgramFiles", "LOCALAPPDATA") for sub in ("GIMP 3", "Programs/GIMP 3")]
    elif kind == "macos":
        arch = "arm64" if machine == "aarch64" else "x86_64"
        platforms = [f"macosx_{v}_{arch}" for v in ("10_9", "11_0", "12_0", "13_0", "14_0")]
        platforms.append("macosx_10_9_universal2")
        probes = [["/Applications/GIMP.app/Contents/MacOS/python3"]]
    else:
        platforms = _linux_platforms(machine)
        if kind == "flatpak":
            if shutil.which("flatpak"):
                probes = [["flatpak", "run", "--command=python3", FLATPAK_ID]]
        else:
            system = shutil.which("python3", path=_clean_env().get("PATH", ""))
            probes = [["/usr/bin/python3"]] + ([[system]] if system else [])
    if override:
        probes = [[override]]
    for cmd in probes:
        if len(cmd) > 1 or Path(cmd[0]).is_file():
            result = _probe(cmd)
            if result:
                return GimpPython(" ".join(cmd), result[0], platforms, result[1])
    return GimpPython(f"GIMP's Python (not found; assuming {BUNDLED_PYTHON})", BUNDLED_PYTHON,
                      platforms)


def vendor_packages(target: Path, gimp: GimpPython, pip_python: str) -> None:
    """Unpack pyzmq and msgpack wheels built for GIMP's Python into ``target``."""
    if target.exists():
        shutil.rmtree(target)
    specs = [f"{name}=={pinned(name)}" if pinned(name) else name for name in VENDORED]
    cmd = [pip_python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
           "--target", str(target), "--only-binary=:all:", "--implementation", "cp",
           "--python-version", gimp.version]
    for tag in gimp.platforms:
        cmd += ["--platform", tag]
    run([*cmd, *specs])
    shutil.rmtree(target / "bin", ignore_errors=True)


# --- plug-in files --------------------------------------------------------------------------------

def copy_tree(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def install_plugin(dest: Path) -> None:
    """Replace everything in ``dest`` except ``vendor/`` with the repo's plug-in + protocol."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in dest.iterdir():
        if entry.name == "vendor":
            continue
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


def start_command(python: Path) -> str:
    quote = (lambda s: f'"{s}"') if os.name == "nt" else (lambda s: f"'{s}'" if " " in s else s)
    return f"cd {quote(str(REPO))} && {quote(str(python))} -m backend serve"


# --- main -------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=REPO / ".venv",
                   help="backend virtual environment (default: .venv in the repository)")
    p.add_argument("--no-venv", action="store_true",
                   help="don't create or update the venv (use it as it is)")
    p.add_argument("--dev", action="store_true", help="also install test and lint tools")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--cpu", dest="device", action="store_const", const="cpu",
                        help="install the CPU build of torch")
    device.add_argument("--cuda", dest="device", action="store_const", const="cuda",
                        help="install the CUDA build of torch")
    p.set_defaults(device="auto")
    p.add_argument("--gimp-plugin-dir", type=Path,
                   help="GIMP's plug-in folder (default: found automatically)")
    p.add_argument("--gimp-python",
                   help="the Python that runs GIMP's plug-ins (to check for pyzmq/msgpack)")
    p.add_argument("--vendor", choices=("auto", "always", "never"), default="auto",
                   help="vendor pyzmq+msgpack into the plug-in: auto = when GIMP's Python "
                        "lacks them")
    p.add_argument("--vendor-python-version", help="vendor for this Python version (X.Y)")
    p.add_argument("--vendor-platform", action="append",
                   help="vendor for this wheel platform tag (repeatable)")
    p.add_argument("--uninstall", action="store_true", help="remove the plug-in")
    p.add_argument("--purge", action="store_true", help="with --uninstall: delete the venv too")
    return p.parse_args(argv)


def uninstall(plugin_dir: Path, venv: Path, purge: bool) -> None:
    dest = plugin_dir / PLUGIN_NAME
    if (dest / f"{PLUGIN_NAME}.py").exists() or (dest / "install.json").exists():
        shutil.rmtree(dest)
        log(f"removed {dest}")
    else:
        log(f"no plug-in installed in {plugin_dir}")
    if purge and (venv / "pyvenv.cfg").exists():
        shutil.rmtree(venv)
        log(f"removed virtual environment {venv}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    venv = args.venv.resolve()
    if args.gimp_plugin_dir:
        plugin_dir, kind, others = args.gimp_plugin_dir.resolve(), "custom", []
    else:
        plugin_dir, kind, others = find_plugin_dir()
    if args.uninstall:
        uninstall(plugin_dir, venv, args.purge)
        return 0

    started = time.monotonic()
    if args.no_venv:
        python = venv_python(venv)
        log(f"skipping the virtual environment (--no-venv); backend Python: {python}")
    else:
        python = create_venv(venv, args.device, args.dev)

    if kind != "custom" and not plugin_dir.parent.exists():
        log(f"no GIMP 3 profile found; creating {plugin_dir} (start GIMP 3 once if it "
            "doesn't show the plug-in)")
    log(f"GIMP plug-in folder: {plugin_dir} ({kind})")
    for other in others:
        log(f"  another GIMP profile exists: {other} (install there with --gimp-plugin-dir)")
    dest = plugin_dir / PLUGIN_NAME
    install_plugin(dest)
    log(f"installed the plug-in into {dest}")

    gimp_kind = {"custom": "macos" if sys.platform == "darwin" else
                 "windows" if sys.platform == "win32" else "linux"}.get(kind, kind)
    gimp = gimp_python(gimp_kind, args.gimp_python)
    if args.vendor_python_version:
        gimp.version = args.vendor_python_version
    if args.vendor_platform:
        gimp.platforms = args.vendor_platform
    need_vendor = args.vendor == "always" or (args.vendor == "auto" and not gimp.has_packages)
    vendor_dir = dest / "vendor"
    if need_vendor:
        pip_python = str(python) if python.exists() else sys.executable
        log(f"vendoring {', '.join(VENDORED)} for Python {gimp.version} "
            f"({', '.join(gimp.platforms)}) — {gimp.description}")
        vendor_packages(vendor_dir, gimp, pip_python)
    else:
        if vendor_dir.exists():
            shutil.rmtree(vendor_dir)
        log("not vendoring pyzmq/msgpack (--vendor never)" if args.vendor == "never" else
            f"GIMP's Python ({gimp.description}, {gimp.version}) already has pyzmq and msgpack")

    connection_file = default_connection_file(python)
    info = {
        "version": project_version(),
        "repo": str(REPO),
        "venv": str(venv),
        "backend_python": str(python),
        "backend_args": ["-m", "backend", "serve"],
        "connection_file": connection_file,
        "gimp_python": gimp.description,
        "gimp_python_version": gimp.version,
        "vendored": need_vendor,
        "parameters": backend_parameters(python),
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (dest / "install.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {dest / 'install.json'}")
    log(f"done in {time.monotonic() - started:.0f} s")
    print()
    print("Drag Diffusion is installed. Restart GIMP, then use Filters › Generic › Drag "
          "Diffusion…")
    print("The plug-in starts the backend when needed; to start it yourself (e.g. to see its "
          "log), run:")
    print(f"    {start_command(python)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
