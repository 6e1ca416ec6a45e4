"""The dialog's model lines: which model sets the chosen method can run on and which of them are
missing, and a download's progress as text (protocol 1.3, ``hello_reply.models`` and the
``download`` job's events). Pure: no GIMP, no network; the backend downloads, the plug-in only
asks and shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dragdiff_params as par

DOWNLOADS_SINCE = (1, 3)  # the protocol version that brought ``download``
GET_COMMAND = "python -m backend models get {name}"  # where the backend runs


@dataclass(frozen=True)
class SetLine:
    """One model set the chosen method could run on, not installed yet."""

    name: str
    title: str
    state: str  # "missing", "partial" (a download stopped) or "downloading"
    size: int  # bytes (the catalogue's figure)
    licence: str
    download_job: str | None  # the job id of a download under way (from another dialog)

    def text(self) -> str:
        what = {"partial": "partly downloaded", "downloading": "downloading"}.get(
            self.state, "not downloaded")
        licence = f", licence {self.licence}" if self.licence else ""
        return f"{self.title}: {size_text(self.size)}, {what}{licence}"


def _version(info: Mapping[str, Any]) -> tuple[int, int]:
    try:
        major, minor = str(info.get("protocol_version") or "0.0").split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return 0, 0


def _sets(info: Mapping[str, Any] | None) -> Mapping[str, Any]:
    models = (info or {}).get("models") or {}
    sets = models.get("sets") if isinstance(models, Mapping) else None
    return sets if isinstance(sets, Mapping) else {}


def heading_text(method: str) -> str:
    """The heading above the model lines: the method as the Method menu names it."""
    return f"Models for {par.method_label(method)}"


def can_download(info: Mapping[str, Any] | None) -> bool:
    """Whether this backend downloads model sets when asked (a 1.3 backend with a catalogue,
    not offline)."""
    if not info or _version(info) < DOWNLOADS_SINCE or not _sets(info):
        return False
    return bool((info.get("models") or {}).get("can_download"))


def sets_for(info: Mapping[str, Any] | None, algorithm: str) -> list[str]:
    """The sets ``algorithm`` can run on, best first (empty: the backend does not say)."""
    methods = ((info or {}).get("models") or {}).get("methods") or {}
    return [str(name) for name in methods.get(algorithm) or [] if name in _sets(info)]


def missing_lines(info: Mapping[str, Any] | None, algorithm: str) -> list[SetLine]:
    """The sets to offer for ``algorithm``: those better than the best one installed (all of
    them when none is), in the backend's order."""
    sets, lines = _sets(info), []
    for name in sets_for(info, algorithm):
        entry = sets[name]
        state = str(entry.get("state") or "missing")
        if state == "installed":
            break
        download = entry.get("download") or {}
        lines.append(SetLine(name, str(entry.get("title") or name), state,
                             int(entry.get("bytes") or 0), str(entry.get("licence") or ""),
                             str(download["job_id"]) if download.get("job_id") else None))
    return lines


def size_text(n: float) -> str:
    """Bytes for people: 2.1 GB, 335 MB, 48 kB (powers of ten, as the hub shows them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


def time_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_text(content: Mapping[str, Any]) -> tuple[float | None, str]:
    """A download's ``progress`` event as the bar's fraction and its line: bytes, rate and
    time left while downloading, the file being checked, then the backend loading it."""
    phase = str(content.get("phase") or "")
    step, total = float(content.get("step") or 0), float(content.get("total") or 0)
    if phase == "load":
        return None, "Downloaded and verified; the backend is loading it…"
    fraction = min(1.0, step / total) if total > 0 else None
    done = f"{size_text(step)} of {size_text(total)}"
    if phase == "verify":
        return fraction, f"Verifying {content.get('file') or 'the files'} ({done})"
    parts = [done]
    rate = float(content.get("rate") or 0)
    if rate > 0:
        parts.append(f"{size_text(rate)}/s")
    left = content.get("seconds_left")
    if left is not None:
        parts.append(f"about {time_text(float(left))} left")
    return fraction, "Downloading: " + ", ".join(parts)


def installed_text(content: Mapping[str, Any], title: str) -> str:
    """The line after an ``installed`` event."""
    if content.get("serving"):
        return f"{title} is installed and the backend runs on it now."
    return (f"{title} is installed; the backend keeps the model it serves (another set comes "
            "first for its methods).")


def cancelled_text(title: str) -> str:
    return f"The download of {title} was cancelled; Download again resumes it."


def manual_text(line: SetLine) -> str:
    """What to run when this backend can't download from the dialog."""
    return f"{line.text()}; run {GET_COMMAND.format(name=line.name)} where the backend runs."
