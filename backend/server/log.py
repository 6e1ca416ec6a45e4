"""The server's logging: one line per record whatever clients send, refusals summarised, files
rotated.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from backend.server.jobs import EDIT, Job
from protocol import wire

log = logging.getLogger("backend.server")

LOG_BYTES = 5 * 2**20  # rotate backend.log at this size, keeping LOG_BACKUPS old files
LOG_BACKUPS = 3
# Letters and marks that draw nothing (Hangul fillers, the combining grapheme joiner, Khmer's
# invisible vowels): printable to Python, yet they can hide where one word ends.
_INVISIBLE = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0]")


def _shown(char: str) -> str:
    """``char`` as it is, or as an escape if it is a control, format or separator character
    (``str.isprintable``: newlines, bidi controls U+202A–E and U+2066–9, zero-width characters,
    the byte-order mark, tags, unassigned code points…) or an invisible letter."""
    if char == " " or (char.isprintable() and not _INVISIBLE.match(char)):
        return char
    return char.encode("unicode_escape").decode("ascii")


def printable(text: object, limit: int = 200) -> str:
    """``text`` on one line, shown as it is: every character that could break the line, reorder
    the text around it (bidi controls) or hide (zero-width, invisible) as an escape such as
    ``\\u202e``, at most ``limit`` characters (for strings a client chose: names, session ids,
    messages)."""
    text = str(text)
    cut = len(text) > limit
    text = text[:limit]
    if not text.isprintable() or _INVISIBLE.search(text):
        text = "".join(map(_shown, text))
    return text + ("…" if cut else "")


class OneLineFormatter(logging.Formatter):
    """Each record's message on one line (a traceback, if any, follows on its own lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message, 4000)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        """A traceback keeps its line breaks; anything else a client's text could bring into
        it (an exception message quoting a field) is escaped as in the message."""
        text = super().formatException(ei)
        return "\n".join(printable(line, 4000) for line in text.split("\n"))


def setup_logging(log_file: Path, level: str) -> None:
    """Log to ``log_file`` (rotated) and to stderr: everything on a terminal, else only
    warnings, so a redirected console log (the plug-in's backend-console.log) stays small."""
    log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fmt = OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    to_file = logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_BYTES,
                                                   backupCount=LOG_BACKUPS, encoding="utf-8")
    to_stderr = logging.StreamHandler(sys.stderr)
    if not sys.stderr.isatty():
        to_stderr.setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in (to_file, to_stderr):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(level)


def log_job(job: Job) -> None:
    """One line per ended job: outcome, client, geometry, method, waiting and running time."""
    r = job.request
    assert job.terminal is not None and job.ended is not None
    msg_type, content = job.terminal.msg_type, job.terminal.content
    waited = (job.started or job.ended) - job.created
    ran = job.ended - job.started if job.started else 0.0
    phases = " ".join(f"{k}={v:.2f}s" for k, v in content.get("timings", {}).items())
    outcome = {wire.FINISHED: "finished", wire.PREPARED: "prepared",
               wire.CANCELLED: f"cancelled ({content.get('reason')})",
               wire.ERROR: f"failed ({content.get('code')}: {content.get('message')})"}
    log.info("%s %s %s: client %s, %dx%dx%d%s, %d points, method %s, waited %.2fs, "
             "ran %.2fs%s", "job" if job.kind == EDIT else "prepare", job.job_id,
             outcome[msg_type], printable(job.session, 8), r["width"], r["height"],
             r["channels"], " +mask" if r.get("has_mask") else "", len(r.get("handles", ())),
             r["method"], waited, ran, f", {phases}" if phases else "")


class RefusalLog:
    """Logs refused messages: the first ``burst`` of each ``interval`` one by one, the rest as
    one summary line with counts per reason when the interval ends (``flush``)."""

    def __init__(self, interval: float = 60.0, burst: int = 5) -> None:
        self.interval, self.burst = interval, burst
        self._start = time.monotonic()
        self._logged = 0
        self._suppressed: Counter[str] = Counter()
        self._handshakes = 0

    def refused(self, sender: str, code: str, message: str, detail: str | None) -> None:
        self.flush()
        if self._logged < self.burst:
            self._logged += 1
            log.info("refused a message from %s: %s: %s (%s)", printable(sender, 16), code,
                     printable(message), printable(detail))
        else:
            self._suppressed[code] += 1

    def handshakes_refused(self, count: int) -> None:
        """``count`` more logins with a wrong key were refused (counted, never one by one)."""
        self._handshakes += count

    def flush(self, now: float | None = None, force: bool = False) -> None:
        """At the end of an interval (or when ``force``d), write the summary line if anything
        was left out."""
        now = time.monotonic() if now is None else now
        if now - self._start < self.interval and not force:
            return
        if self._suppressed or self._handshakes:
            counts = ", ".join(f"{code}: {n}" for code, n in self._suppressed.most_common())
            log.warning("in the last %.0f s: %d more refused messages (%s), %d logins with a "
                        "wrong key", now - self._start,
                        sum(self._suppressed.values()), counts or "none", self._handshakes)
        self._start, self._logged = now, 0
        self._suppressed.clear()
        self._handshakes = 0
