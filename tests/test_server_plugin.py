"""What the plug-in says when the backend side goes wrong (issue 11): a foreign key, a dead or
silent backend, a layer over the frame limit. The plug-in's conversation module runs outside
GIMP against a real server with the fake engine."""

from __future__ import annotations

import os

import limits
import pytest
from fixtures_server import FakeEngine, running_server
from plugin_modules import load

from protocol import connection

db = load("dragdiff_backend")


def test_a_backend_with_another_key_is_named_not_called_missing(tmp_path):
    """11.4: the right endpoint with a wrong key used to say 'backend is not running'."""
    path = tmp_path / "backend.json"
    with running_server(FakeEngine()) as server:
        connection.write_connection_file(path, connection.ConnectionInfo(server.endpoint, os.urandom(32)))
        with pytest.raises(db.BackendError) as err:
            db.try_connect(path, 2.0)
    text = str(err.value)
    assert "answers at " + server.endpoint in text and "with another key" in text
    assert "restart" in text and "not running" not in text


def test_the_console_log_is_rotated_when_the_plugin_starts_a_backend(tmp_path):
    """11.3: backend-console.log (the started backend's stdout/stderr) was never rotated."""
    import sys

    log_path = tmp_path / "backend-console.log"
    log_path.write_bytes(b"old line\n" * (db.CONSOLE_LOG_BYTES // 9 + 1))
    install = db.InstallInfo(backend_python=sys.executable, repo=str(tmp_path),
                             backend_args=["-c", "print('started')"])
    assert db.start_backend(install, log_path).wait(30) == 0
    assert log_path.read_text() == "started\n"
    assert (tmp_path / "backend-console.log.1").stat().st_size > db.CONSOLE_LOG_BYTES
    db.start_backend(install, log_path).wait(30)  # small: appended, not rotated
    assert log_path.read_text() == "started\nstarted\n"


def test_a_redirected_console_gets_warnings_only_and_the_log_file_everything(tmp_path):
    """11.3: every log line was written twice, once into the never-rotated console log."""
    import sys
    from pathlib import Path

    code = ("import logging, sys; from pathlib import Path; "
            "from backend.server.log import setup_logging; "
            "setup_logging(Path(sys.argv[1]), 'INFO'); log = logging.getLogger('backend.server'); "
            "log.info('routine line'); log.warning('a warning')")
    result = limits.run([sys.executable, "-c", code, str(tmp_path / "backend.log")], limit=600,
                        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                        check=True)
    assert "a warning" in result.stderr and "routine line" not in result.stderr
    text = (tmp_path / "backend.log").read_text()
    assert "routine line" in text and "a warning" in text


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_an_unsafe_connection_file_is_refused_with_the_reason(tmp_path):
    """11.5: the plug-in followed any connection file, even one others could have swapped."""
    path = tmp_path / "conf" / "backend.json"
    with running_server(FakeEngine(), connection_file=path):
        os.chmod(path.parent, 0o777)
        with pytest.raises(db.BackendError) as err:
            db.try_connect(path, 2.0)
        os.chmod(path.parent, 0o700)
    text = str(err.value)
    assert "can't use the connection file" in text and "writable by other users" in text
    assert "chmod 700" in text
