"""install.py's decisions for every platform, and the installer run for real where it can.

No Windows or Mac runs these tests: each decision (can it install here, which torch build
and the pip command for it, which GIMP profile folders, the start commands for each shell,
the systemd user service) is a pure function of a ``Platform`` description, tested here for
each platform; the POSIX start command and the Linux installation (profiles, service with a
stand-in systemctl, install.json read back by the plug-in) run for real.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
from plugin_modules import load

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("install", REPO / "install.py")
install = importlib.util.module_from_spec(SPEC)
sys.modules["install"] = install  # dataclasses look their module up by name
SPEC.loader.exec_module(install)
Platform = install.Platform
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
RECORDED_PYTHON = (REPO / ".venv").resolve() / "bin" / "python"  # install.py resolves --venv

WINDOWS_GPU = Platform("windows", "x86_64", (3, 12), nvidia_gpu=True)
WINDOWS = Platform("windows", "x86_64", (3, 12))
LINUX_GPU = Platform("linux", "x86_64", (3, 11), nvidia_gpu=True)
LINUX = Platform("linux", "x86_64", (3, 11))
LINUX_ARM = Platform("linux", "arm64", (3, 12))
MAC_M = Platform("macos", "arm64", (3, 12), (14, 5))


# --- can it install here -------------------------------------------------------------------

def test_the_installer_parses_in_old_pythons_so_they_get_the_refusal_line():
    """Python 3.8/3.9 must reach check_supported's one line instead of a SyntaxError or an
    AttributeError on a newer str/zip feature."""
    source = (REPO / "install.py").read_text()
    ast.parse(source, feature_version=(3, 8))
    for newer in (".removeprefix(", ".removesuffix(", "strict=", ".is_relative_to("):
        assert newer not in source, newer


@pytest.mark.parametrize(("platform", "says"), [
    (Platform("macos", "x86_64", (3, 12), (14, 1)), "no build for Intel Macs"),
    (Platform("macos", "x86_64", (3, 12), (14, 1), rosetta=True), "under Rosetta"),
    (Platform("macos", "arm64", (3, 12), (13, 6)), "needs macOS 14 (Sonoma) or newer"),
    (Platform("macos", "arm64", (3, 12), (12, 7)), "this is macOS 12.7"),
    (Platform("windows", "x86_64", (3, 9)), "run: py -3.12 install.py"),
    (Platform("linux", "x86_64", (3, 8)), "python3.12 install.py"),
    (Platform("macos", "arm64", (3, 9), (14, 0)), "no wheels for Python 3.9"),
])
def test_unsupported_platforms_get_one_line_saying_what_to_do(platform, says):
    with pytest.raises(install.Unsupported) as refused:
        install.check_supported(platform)
    line = str(refused.value)
    assert says in line
    assert line.startswith("install.py: ") and "\n" not in line


@pytest.mark.parametrize("platform", [WINDOWS, WINDOWS_GPU, LINUX, LINUX_ARM, MAC_M,
                                      Platform("linux", "x86_64", (3, 10)),
                                      Platform("macos", "arm64", (3, 14), (15, 0))])
def test_supported_platforms_pass(platform):
    install.check_supported(platform)


def test_an_unsupported_machine_stops_before_anything_is_installed(tmp_path, monkeypatch,
                                                                    capsys):
    """main() prints the one line and exits 1: no venv, no plug-in folder."""
    monkeypatch.setattr(install, "current_platform",
                        lambda: Platform("macos", "x86_64", (3, 12), (14, 2)))
    venv, plugins = tmp_path / "venv", tmp_path / "plug-ins"
    assert install.main(["--venv", str(venv), "--gimp-plugin-dir", str(plugins)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("install.py: PyTorch 2.13 has no build for Intel Macs")
    assert len(err.splitlines()) == 1
    assert not venv.exists() and not plugins.exists()


# --- which torch ----------------------------------------------------------------------------

CUDA = ["torch==2.13.0+cu128", "--index-url", "https://download.pytorch.org/whl/cu128"]
CPU = ["torch==2.13.0+cpu", "--index-url", "https://download.pytorch.org/whl/cpu"]


@pytest.mark.parametrize(("platform", "device", "args", "build"), [
    (WINDOWS_GPU, "auto", CUDA, "the CUDA 12.8 build, from PyTorch's index"),
    (LINUX_GPU, "auto", CUDA, "the CUDA 12.8 build, from PyTorch's index"),
    (WINDOWS, "cuda", CUDA, "the CUDA 12.8 build"),  # asked for, no GPU seen (e.g. a driver
    (LINUX, "cuda", CUDA, "the CUDA 12.8 build"),    # installed later): still CUDA
    (WINDOWS, "auto", CPU, "the CPU-only build, from PyTorch's index (no NVIDIA GPU found"),
    (LINUX_ARM, "auto", CPU, "the CPU-only build"),
    (WINDOWS_GPU, "cpu", CPU, "the CPU-only build, from PyTorch's index"),
    (MAC_M, "auto", ["torch==2.13.0"], "the macOS build for Apple Silicon (GPU through MPS)"),
    (MAC_M, "cpu", ["torch==2.13.0"], "the macOS build"),  # one build; the backend picks the device
])
def test_the_torch_command_for_each_platform(platform, device, args, build):
    plan = install.torch_plan(platform, device, "2.13.0")
    assert install.torch_install_command("/venv/python", plan) == [
        "/venv/python", "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
        "--retries", "1", "--timeout", "30", *args]
    assert plan.build.startswith(build)


def test_windows_never_takes_torch_from_pypi_where_it_is_cpu_only():
    for device in ("auto", "cpu", "cuda"):
        for machine_has_gpu in (True, False):
            platform = Platform("windows", "x86_64", (3, 12), nvidia_gpu=machine_has_gpu)
            plan = install.torch_plan(platform, device, "2.13.0")
            assert plan.index and plan.index.startswith("https://download.pytorch.org/whl/")
            assert ("CUDA" in plan.build) == (plan.local == "cu128")


def test_cuda_on_a_mac_is_refused_in_one_line():
    with pytest.raises(install.Unsupported, match=r"^install\.py: --cuda: macOS has no CUDA"):
        install.torch_plan(MAC_M, "cuda", "2.13.0")


@pytest.mark.parametrize(("version", "system", "says"), [
    ("2.13.0+cu128", "windows", "CUDA 12.8 build"),
    ("2.13.0+cu126", "linux", "CUDA 12.6 build"),
    ("2.13.0+cu130", "linux", "CUDA 13.0 build"),
    ("2.13.0+cpu", "windows", "CPU-only build"),
    ("2.13.0", "windows", "PyPI's Windows build (CPU only)"),
    ("2.13.0", "macos", "macOS build (Apple Silicon GPU through MPS)"),
    ("2.13.0", "linux", "PyPI's Linux build (CUDA on x86_64)"),
])
def test_the_message_names_the_build_that_is_installed(version, system, says):
    """The closing text describes the torch the venv really has, not the one asked for."""
    assert install.describe_torch(version, system) == says


def test_an_installed_torch_is_kept_only_when_it_is_the_planned_build():
    cuda = install.torch_plan(WINDOWS_GPU, "auto", "2.13.0")
    cpu = install.torch_plan(WINDOWS, "auto", "2.13.0")
    mac = install.torch_plan(MAC_M, "auto", "2.13.0")
    assert install.torch_matches("2.13.0+cu128", cuda)
    assert not install.torch_matches("2.13.0+cpu", cuda)  # a CPU build is replaced
    assert not install.torch_matches("2.13.0", cuda)  # so is PyPI's (CPU-only on Windows)
    assert not install.torch_matches("2.12.0+cu128", cuda)
    assert install.torch_matches("2.13.0+cpu", cpu) and not install.torch_matches(None, cpu)
    assert install.torch_matches("2.13.0", mac)


# --- start commands -------------------------------------------------------------------------

def test_windows_start_commands_for_powershell_and_cmd():
    repo = r"D:\Tools\Ann O'Neil\drag diffusion"
    python = repo + r"\.venv\Scripts\python.exe"
    (shell1, powershell), (shell2, cmd) = install.start_commands("windows", repo, python)
    assert (shell1, shell2) == ("PowerShell", "cmd")
    # Windows PowerShell 5.1 has no &&; a quoted program runs only after &; '' is a quote.
    assert powershell == ("Set-Location -LiteralPath 'D:\\Tools\\Ann O''Neil\\drag diffusion'; "
                          "& 'D:\\Tools\\Ann O''Neil\\drag diffusion\\.venv\\Scripts\\python.exe'"
                          " -m backend serve")
    assert "&&" not in powershell
    # cmd's cd changes drive only with /d.
    assert cmd == ('cd /d "D:\\Tools\\Ann O\'Neil\\drag diffusion" && '
                   '"D:\\Tools\\Ann O\'Neil\\drag diffusion\\.venv\\Scripts\\python.exe" '
                   "-m backend serve")


def test_the_posix_start_command_runs_in_a_shell_from_anywhere(tmp_path):
    """The printed command, run by sh from another folder, starts the venv's Python in the
    repository with ``-m backend serve`` (a path with a space and a quote in it)."""
    repo = tmp_path / "my repo's copy"
    (repo / ".venv" / "bin").mkdir(parents=True)
    seen = tmp_path / "seen.json"
    python = repo / ".venv" / "bin" / "python"
    python.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"json.dump([os.getcwd(), sys.argv[1:]], open({str(seen)!r}, 'w'))\n")
    python.chmod(0o755)
    [(shell, command)] = install.start_commands("linux", str(repo), str(python))
    assert shell == "shell"
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True, timeout=60)
    assert json.loads(seen.read_text()) == [str(repo), ["-m", "backend", "serve"]]


# --- GIMP profile folders -------------------------------------------------------------------

LINUX_ROOTS = install.gimp_config_roots("linux", "/home/ann", {})
NATIVE, FLATPAK = LINUX_ROOTS[0][0], LINUX_ROOTS[1][0]


def test_each_platforms_profile_folders():
    native, flatpak = LINUX_ROOTS
    assert native == (PurePosixPath("/home/ann/.config/GIMP"), "linux")
    assert flatpak == (PurePosixPath("/home/ann/.var/app/org.gimp.GIMP/config/GIMP"), "flatpak")
    assert install.gimp_config_roots("linux", "/home/ann", {"XDG_CONFIG_HOME": "/cfg"})[0] == \
        (PurePosixPath("/cfg/GIMP"), "linux")
    assert install.gimp_config_roots("macos", "/Users/ann", {}) == [
        (PurePosixPath("/Users/ann/Library/Application Support/GIMP"), "macos")]
    assert install.gimp_config_roots("windows", r"C:\Users\ann",
                                     {"APPDATA": r"C:\Users\ann\AppData\Roaming"}) == [
        (PureWindowsPath(r"C:\Users\ann\AppData\Roaming\GIMP"), "windows")]
    assert install.gimp_config_roots("windows", r"C:\Users\ann", {}) == [
        (PureWindowsPath(r"C:\Users\ann\AppData\Roaming\GIMP"), "windows")]


def test_every_gimp3_profile_found_gets_the_plugin():
    targets, notes = install.plan_targets(
        LINUX_ROOTS, {NATIVE: ["2.10", "3.0", "3.2"], FLATPAK: ["3.0"]}, flatpak_app=True)
    assert [(str(t.plugin_dir), t.kind, t.version, t.existed) for t in targets] == [
        ("/home/ann/.config/GIMP/3.2/plug-ins", "linux", "3.2", True),
        ("/home/ann/.config/GIMP/3.0/plug-ins", "linux", "3.0", True),
        ("/home/ann/.var/app/org.gimp.GIMP/config/GIMP/3.0/plug-ins", "flatpak", "3.0", True)]
    assert notes == []


def test_an_existing_30_profile_gets_no_32_folder_beside_it():
    """GIMP 3.2 imports a 3.0 profile only into a 3.2 folder that doesn't exist yet."""
    targets, _ = install.plan_targets(LINUX_ROOTS, {NATIVE: ["3.0"]}, flatpak_app=False)
    assert [t.version for t in targets] == ["3.0"]


def test_no_profile_yet_means_the_newest_gimps_folder():
    targets, notes = install.plan_targets(LINUX_ROOTS, {}, flatpak_app=False)
    assert [(str(t.plugin_dir), t.existed) for t in targets] == [
        ("/home/ann/.config/GIMP/3.2/plug-ins", False)]
    assert notes == ["no GIMP 3 profile in /home/ann/.config/GIMP: created 3.2/plug-ins there"]
    # Only a Flatpak GIMP installed: its folder, not a native one.
    targets, _ = install.plan_targets(LINUX_ROOTS, {}, flatpak_app=True)
    assert [(t.kind, t.version) for t in targets] == [("flatpak", "3.2")]
    roots = install.gimp_config_roots("windows", r"C:\Users\ann", {})
    targets, _ = install.plan_targets(roots, {}, flatpak_app=False)
    assert targets[0].plugin_dir == PureWindowsPath(
        r"C:\Users\ann\AppData\Roaming\GIMP\3.2\plug-ins")


def test_a_gimp_210_profile_is_mentioned_when_a_32_folder_is_made():
    _, [note] = install.plan_targets(LINUX_ROOTS, {NATIVE: ["2.10"]}, flatpak_app=False)
    assert "GIMP 3.2 will not import your GIMP 2.10 settings" in note
    assert "start GIMP 3.2 once, then run install.py again" in note


# --- the systemd user service ---------------------------------------------------------------

def test_the_unit_runs_the_backend_from_login_and_restarts_it_on_failure():
    text = install.service_unit("/home/ann/drag diffusion",
                                "/home/ann/drag diffusion/.venv/bin/python")
    lines = text.splitlines()
    assert 'ExecStart="/home/ann/drag diffusion/.venv/bin/python" -m backend serve' in lines
    assert "WorkingDirectory=/home/ann/drag diffusion" in lines
    assert "Restart=on-failure" in lines and "WantedBy=default.target" in lines
    # One URL (space-separated list): the space is %20, written %%20 for systemd.
    assert "Documentation=file:///home/ann/drag%%20diffusion/docs/platforms.md" in lines
    # systemd expands %-specifiers and $VARIABLES in ExecStart: escaped.
    odd = install.service_unit("/x/100%", "/x/100%/$HOME/python")
    assert 'ExecStart="/x/100%%/$$HOME/python" -m backend serve' in odd.splitlines()
    assert "WorkingDirectory=/x/100%%" in odd.splitlines()


def _systemd_verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(["systemd-analyze", "--user", "verify", str(unit)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
def test_systemd_accepts_the_generated_unit(tmp_path):
    """systemd's own parser checks the unit (quoting, and that ExecStart is executable); the
    same path written without quotes is refused, so the check can fail."""
    repo = tmp_path / "drag diffusion"
    (repo / ".venv" / "bin").mkdir(parents=True)
    python = repo / ".venv" / "bin" / "python"
    python.symlink_to(sys.executable)
    unit = tmp_path / install.SERVICE_NAME
    unit.write_text(install.service_unit(str(repo), str(python)))
    verified = _systemd_verify(unit, tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert "Invalid" not in verified.stderr, verified.stderr  # e.g. a URL with a space
    unit.write_text(unit.read_text().replace(f'"{python}"', str(python)))
    assert _systemd_verify(unit, tmp_path).returncode != 0


@pytest.mark.parametrize(("platform", "asked", "kinds", "wanted"), [
    (LINUX, "auto", ["flatpak"], True),  # the sandbox can't start the backend
    (LINUX, "auto", ["linux", "flatpak"], True),
    (LINUX, "auto", ["linux"], False),  # the plug-in starts it
    (LINUX, "yes", ["linux"], True),
    (LINUX, "no", ["flatpak"], False),
    (WINDOWS, "auto", ["windows"], False),
    (MAC_M, "auto", ["macos"], False),
])
def test_when_the_service_is_set_up(platform, asked, kinds, wanted):
    targets = [install.Target(PurePosixPath("/p"), kind, "3.2", True) for kind in kinds]
    assert install.service_wanted(platform, asked, targets)[0] is wanted


def test_the_service_is_refused_off_linux():
    with pytest.raises(install.Unsupported, match="only Linux has"):
        install.service_wanted(WINDOWS, "yes", [])


def test_the_service_commands():
    assert install.service_commands() == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "gimp-drag-diffusion.service"]]
    assert install.service_commands(enable=False)[0] == [
        "systemctl", "--user", "disable", "--now", "gimp-drag-diffusion.service"]


# --- the closing text -----------------------------------------------------------------------

def _outcome(system, kinds, **kw):
    targets = [install.Target(PurePosixPath(f"/gimp/{kind}/3.2/plug-ins"), kind, "3.2", True)
               for kind in kinds]
    commands = install.start_commands(system, "/repo" if system != "windows" else r"C:\r",
                                      "/repo/.venv/bin/python" if system != "windows" else
                                      r"C:\r\.venv\Scripts\python.exe")
    return install.closing_text(install.Outcome(system, targets, commands, **kw))


def test_the_closing_text_says_what_happens_on_each_platform():
    windows = _outcome("windows", ["windows"], torch="2.13.0+cu128 (CUDA 12.8 build)")
    assert "Backend: torch 2.13.0+cu128 (CUDA 12.8 build)." in windows
    assert "starts the backend when it finds none running, without a console window" in windows
    assert "PowerShell: Set-Location -LiteralPath 'C:\\r'; & " in windows
    assert 'cmd:        cd /d "C:\\r" && ' in windows
    linux = _outcome("linux", ["linux"])
    assert "The plug-in starts the backend when it finds none running; the backend keeps " \
        "running after GIMP closes." in linux
    assert "    cd /repo && /repo/.venv/bin/python -m backend serve" in linux
    service = _outcome("linux", ["linux", "flatpak"], service="/u/gimp-drag-diffusion.service")
    assert "runs as a systemd user service (gimp-drag-diffusion.service): started now and " \
        "at every login" in service
    assert "systemctl --user disable --now gimp-drag-diffusion.service" in service
    assert "The plug-in starts the backend" not in service  # the service runs it for both
    broken = _outcome("linux", ["linux", "flatpak"], service="/u/gimp-drag-diffusion.service",
                      service_problem="systemctl --user: Failed to connect to bus")
    assert "The backend's user service is written (/u/gimp-drag-diffusion.service) but not " \
        "enabled: systemctl --user: Failed to connect to bus." in broken
    assert "    systemctl --user enable --now gimp-drag-diffusion.service" in broken
    assert "Until then Flatpak GIMP can't start the backend (it can't start programs outside " \
        "its sandbox): start it yourself" in broken
    assert "In GIMP (not the Flatpak) the plug-in starts the backend" in broken


# --- the installer run for real (Linux) -----------------------------------------------------

@pytest.fixture
def fake_home(tmp_path):
    """A home with a Flatpak GIMP 3.2 profile and a native 3.0 one, and a stand-in systemctl
    that records its calls (``show-environment`` fails when the file ``broken`` exists)."""
    home = tmp_path / "home"
    (home / ".var" / "app" / "org.gimp.GIMP" / "config" / "GIMP" / "3.2").mkdir(parents=True)
    (home / ".config" / "GIMP" / "3.0").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl-calls"
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(f"#!/bin/sh\necho \"$*\" >> '{calls}'\n"
                         f"if [ \"$2\" = show-environment ] && [ -e '{tmp_path}/broken' ]; then\n"
                         "  echo 'Failed to connect to bus: No medium found' >&2; exit 1\nfi\n")
    systemctl.chmod(0o755)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("APPDATA", None)
    return home, env, calls


def _install(env, *args):
    return subprocess.run([str(VENV_PYTHON), str(REPO / "install.py"), "--no-venv", *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the Linux installation")
def test_install_into_every_profile_with_the_service_for_flatpak(fake_home):
    home, env, calls = fake_home
    done = _install(env)
    assert done.returncode == 0, done.stderr
    native = home / ".config" / "GIMP" / "3.0" / "plug-ins" / "drag-diffusion"
    flatpak = home / ".var/app/org.gimp.GIMP/config/GIMP/3.2/plug-ins/drag-diffusion"
    for folder in (native, flatpak):
        assert os.access(folder / "drag-diffusion.py", os.X_OK)
        assert f"    {folder.parent}  (" in done.stdout  # the closing text says where
    assert not (home / ".config" / "GIMP" / "3.2").exists()  # no folder beside 3.0's
    unit = home / ".config" / "systemd" / "user" / "gimp-drag-diffusion.service"
    assert f"ExecStart={RECORDED_PYTHON} -m backend serve" in unit.read_text().splitlines()
    assert calls.read_text().splitlines() == [
        "--user show-environment", "--user daemon-reload",
        "--user enable --now gimp-drag-diffusion.service"]
    assert "runs as a systemd user service" in done.stdout
    # The plug-in reads what install.py recorded: the service is how it says to start it.
    info = json.loads((flatpak / "install.json").read_text())
    assert info["service"] == "gimp-drag-diffusion.service"
    backend = load("dragdiff_backend")
    recorded = backend.InstallInfo.load(flatpak)
    assert recorded.start_command() == "systemctl --user restart gimp-drag-diffusion.service"

    calls.unlink()
    gone = _install(env, "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert not native.exists() and not flatpak.exists() and not unit.exists()
    assert "--user disable --now gimp-drag-diffusion.service" in calls.read_text()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the Linux installation")
def test_without_a_user_manager_the_closing_text_says_to_start_it_by_hand(fake_home, tmp_path):
    _, env, calls = fake_home
    (tmp_path / "broken").touch()
    done = _install(env)
    assert done.returncode == 0, done.stderr
    assert "but not enabled: systemctl --user: Failed to connect to bus: No medium found." \
        in done.stdout
    assert "Until then Flatpak GIMP can't start the backend" in done.stdout
    assert calls.read_text().splitlines() == ["--user show-environment"]  # nothing enabled


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the Linux installation")
def test_a_plugin_folder_given_gets_the_start_commands_and_no_service(fake_home, tmp_path):
    _, env, calls = fake_home
    folder = tmp_path / "plug-ins"
    done = _install(env, "--gimp-plugin-dir", str(folder))
    assert done.returncode == 0, done.stderr
    assert not calls.exists()
    info = json.loads((folder / "drag-diffusion" / "install.json").read_text())
    assert info["service"] is None
    [(shell, command)] = install.start_commands("linux", str(REPO), str(RECORDED_PYTHON))
    assert info["start_commands"] == {shell: command}
    recorded = load("dragdiff_backend").InstallInfo.load(folder / "drag-diffusion")
    assert recorded.start_command() == command


# --- models -------------------------------------------------------------------------------------

def test_models_are_named_from_the_catalogue_and_their_size_is_said_first():
    sizes = install.catalogue_sizes()
    assert list(sizes) == ["sd15", "instant", "instant-xl"]
    assert sizes["sd15"] == ("Stable Diffusion 1.5", 2_135_000_000)
    assert install.chosen_models("sd15, instant,sd15", sizes) == ["sd15", "instant"]
    assert install.chosen_models("none", sizes) == install.chosen_models("", sizes) == []
    with pytest.raises(install.Unsupported) as err:
        install.chosen_models("sd15,sdxl", sizes)
    assert str(err.value) == ("install.py: --models: unknown model set sdxl; the sets are sd15, "
                              "instant, instant-xl (comma-separated), or none")
    line = install.models_line(["sd15", "instant"], sizes)
    total = sizes["sd15"][1] + sizes["instant"][1]
    assert line.startswith("models to download: sd15 (Stable Diffusion 1.5, 2.1 GB), instant (")
    assert f": {total / 1e9:.1f} GB in all, into the Hugging Face cache" in line
    offer = install.models_offer(sizes)
    assert "Download button in the plug-in's dialog" in offer and "sd15 (2.1 GB)" in offer


def test_an_unknown_model_set_stops_before_anything_is_installed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(install, "current_platform", lambda: LINUX)
    venv, plugins = tmp_path / "venv", tmp_path / "plug-ins"
    assert install.main(["--venv", str(venv), "--gimp-plugin-dir", str(plugins), "--no-service",
                         "--models", "sd16"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("install.py: --models: unknown model set sd16; the sets are sd15")
    assert not venv.exists() and not plugins.exists()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the Linux installation")
def test_install_with_models_prints_the_size_then_downloads_them(tmp_path, tiny_hub_repos):
    """--models against a loopback hub (tests/hub_server.py, its tiny catalogue): the size line
    comes before the download, the set is in the cache afterwards, and a set that can't be
    downloaded (gated) is a note with the command that resumes it, not a failed install."""
    from hub_server import LocalHub, tiny_catalogue

    catalogue = tiny_catalogue(tmp_path / "catalogue.json", tiny_hub_repos)
    with LocalHub(tiny_hub_repos) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
                   DRAG_DIFFUSION_CATALOGUE=str(catalogue), HOME=str(tmp_path / "home"),
                   OMP_NUM_THREADS="1")
        done = _install(env, "--venv", str(REPO / ".venv"), "--gimp-plugin-dir",
                        str(tmp_path / "plug-ins"), "--no-service", "--models", "sd15,gated")
    assert done.returncode == 0, done.stderr
    sizes = install.catalogue_sizes(catalogue)
    size_line = install.models_line(["sd15", "gated"], sizes)
    out = done.stdout
    assert size_line in out and out.index(size_line) < out.index("downloading the model set sd15")
    assert "sd15: installed, " in out and "checked against the hub's checksums" in out, out
    assert ("Note: the model set gated was not downloaded (see above); run python -m backend "
            f"models get gated in {REPO} to resume it") in out
    assert "No model downloaded" not in out
    assert list((tmp_path / "hf" / "hub").glob("models--tiny--sd15/snapshots/*/unet/*"))
    # the size announced first is what arrived (the tiny catalogue carries the true sizes)
    arrived = (tmp_path / "hf" / "hub").glob("models--tiny--sd15/snapshots/*/**/*")
    assert sizes["sd15"][1] == sum(f.stat().st_size for f in arrived if f.is_file())
