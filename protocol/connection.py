"""The connection file (``PROTOCOL.md`` section 7): where the backend listens and which key
signs its messages, readable by its user only.

On POSIX the file and its folder must belong to the user and must not be writable by anybody
else: otherwise another local user could swap the file and point the plug-in at an endpoint
and key of their own. Nobody else may read the file either: its key lets a program send the
backend work and sign messages as the user. ``read_connection_file`` refuses such a file,
saying why (it is not tightened silently: a key others could read must be taken as known);
``write_connection_file`` writes 0600, creates the folder 0700 and tightens one the user owns.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.wire import PROTOCOL_VERSION, SIGNATURE_SCHEME

APP_DIR = "gimp-drag-diffusion"
CONNECTION_ENV = "DRAG_DIFFUSION_CONNECTION_FILE"


def default_connection_file() -> Path:
    """``$DRAG_DIFFUSION_CONNECTION_FILE``, else the per-user default (section 7)."""
    override = os.environ.get(CONNECTION_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    else:
        # Not $XDG_CONFIG_HOME: Flatpak remaps it inside GIMP's sandbox.
        base = Path.home() / ".config"
    return base / APP_DIR / "backend.json"


@dataclass(frozen=True)
class ConnectionInfo:
    endpoint: str
    key: bytes
    signature_scheme: str = SIGNATURE_SCHEME
    protocol_version: str = PROTOCOL_VERSION
    pid: int | None = None
    curve_server_key: str | None = None
    curve_client_key: str | None = None  # path of the client's secret key file

    def as_json(self) -> dict[str, Any]:
        data = {"endpoint": self.endpoint, "key": self.key.hex(),
                "signature_scheme": self.signature_scheme,
                "protocol_version": self.protocol_version, "pid": self.pid,
                "curve_server_key": self.curve_server_key,
                "curve_client_key": self.curve_client_key}
        return {k: v for k, v in data.items() if v is not None}


class UnsafeConnectionFile(ValueError):
    """The connection file or its folder could have been swapped by another user."""


def _unsafe(path: Path, what: str, st: os.stat_result, secret: bool) -> str | None:
    """Why ``path`` (a file or folder) is not safe to trust, or None."""
    if st.st_uid != os.getuid():
        return (f"the {what} {path} belongs to another user (uid {st.st_uid}), who could "
                "point the plug-in at a backend of their own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"the {what} {path} is writable by other users (mode "
                f"{stat.S_IMODE(st.st_mode):o}), who could swap the connection file")
    if secret and what == "connection file" and st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        return (f"the {what} {path} is readable by other users (mode "
                f"{stat.S_IMODE(st.st_mode):o}), who could read its key and sign messages as "
                "you (if it is your local backend's own file, restart the backend too: that "
                "gives a new key)")
    return None


def why_unsafe(path: Path, *, secret: bool = True) -> str | None:
    """Why the connection file ``path`` must not be trusted, or None: it or its folder belongs
    to another user or others may write to it, or (``secret``) others may read the file's key.
    POSIX only; elsewhere the folder's ACLs are left to the system."""
    if os.name != "posix":
        return None
    for target, what in ((path.parent, "folder"), (path, "connection file")):
        why = _unsafe(target, what, target.stat(), secret)
        if why:
            return why
    return None


def check_private(path: Path) -> None:
    """Raise ``UnsafeConnectionFile`` saying why, and how to fix it, if ``why_unsafe``."""
    why = why_unsafe(path)
    if why:
        raise UnsafeConnectionFile(
            f"refusing to use the backend connection file {path}: {why}; make it yours "
            f"and private (chmod 700 {path.parent}; chmod 600 {path}) or give another "
            f"connection file (${CONNECTION_ENV})")


def _private_folder(folder: Path) -> None:
    """Create ``folder`` 0700, or tighten an existing one the user owns."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name != "posix":
        return
    st = folder.stat()
    if st.st_uid != os.getuid():
        raise UnsafeConnectionFile(
            f"refusing to write the backend connection file into {folder}: that folder "
            f"belongs to another user (uid {st.st_uid}); give a connection file in a folder "
            f"of your own (--connection-file or ${CONNECTION_ENV})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.chmod(folder, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))


def write_connection_file(path: Path, info: ConnectionInfo) -> None:
    """Write ``info`` readable by the owner only (0600; folder 0700), atomically.

    Raises ``UnsafeConnectionFile`` for a folder that belongs to another user; an existing
    folder of the user's that others may write to loses their write permission.
    """
    path = Path(path)
    _private_folder(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(info.as_json(), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_connection_file(path: Path | str | None = None, *,
                         private: bool = True) -> ConnectionInfo:
    """Read a connection file; raise ``FileNotFoundError``, ``UnsafeConnectionFile`` (see
    ``check_private``; ``private=False`` skips that check, for a server that only pings the
    backend a file names before replacing it) or ``ValueError`` with a clear message."""
    path = Path(path) if path else default_connection_file()
    try:
        if private:
            check_private(path)
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnsafeConnectionFile:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no backend connection file at {path}: the backend is not running; start it "
            "with: python -m backend serve") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the backend connection file {path}: {exc}") from None
    try:
        if data.get("signature_scheme", SIGNATURE_SCHEME) != SIGNATURE_SCHEME:
            raise ValueError(f"unsupported signature scheme {data['signature_scheme']!r}")
        return ConnectionInfo(
            endpoint=str(data["endpoint"]), key=bytes.fromhex(data["key"]),
            protocol_version=str(data.get("protocol_version", PROTOCOL_VERSION)),
            pid=data.get("pid"), curve_server_key=data.get("curve_server_key"),
            curve_client_key=data.get("curve_client_key"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"the backend connection file {path} is damaged ({exc}); restart the "
                         "backend to rewrite it") from None
