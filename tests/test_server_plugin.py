"""What the plug-in says when the backend side goes wrong (issue 11): a foreign key, a dead or
silent backend, a layer over the frame limit. The plug-in's conversation module runs outside
GIMP against a real server with the fake engine."""

from __future__ import annotations

import os
import time

import limits
import pytest
from fixtures_server import FakeEngine, running_server
from plugin_modules import load

from protocol import connection

db = load("dragdiff_backend")
prog = load("dragdiff_progress")


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


# --- the dialog's prepare (protocol 1.2) ---------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def settings(**changes):
    values = {"method": "dragdiffusion", "algorithm": "dragdiffusion",
              "params": (("lora_steps", 20),), "prompt": "prepare=30 steps=2", "seed": 42,
              "masked": True}
    values.update(changes)
    return db.PrepareSettings(**values)


def dialog(server, tmp_path, clock):
    """A dialog's link to ``server`` and its preparer of an 8×6 RGB layer."""
    from fixtures_server import image

    path = tmp_path / "backend.json"
    connection.write_connection_file(path, connection.ConnectionInfo(server.endpoint,
                                                                     server.key))
    link = db.PreviewLink(str(path), timeout=2.0)
    assert link.client is not None
    reads = []
    preparer = db.Preparer(link, lambda: reads.append(1) or ("u8", 3, image()), 8, 6,
                           clock=clock)
    return link, preparer, reads


def poll_until(preparer, condition, what: str) -> None:
    deadline = time.monotonic() + limits.safety_net(20)
    while not condition():
        assert time.monotonic() < deadline, limits.fired(what, limits.safety_net(20))
        preparer.poll()


def test_the_dialog_prepares_once_its_settings_settle_and_ok_joins_it(tmp_path):
    from fixtures_server import image

    engine = FakeEngine(delay=0.05)
    clock = Clock()
    with running_server(engine) as server:
        link, preparer, reads = dialog(server, tmp_path, clock)
        preparer.look(settings(prompt="prepare=30 steps=2 typing"))
        clock.now += 0.5
        preparer.look(settings())  # still typing: nothing sent
        clock.now += 0.9
        preparer.look(settings())
        assert preparer.job_id is None and not engine.prepares
        clock.now += 0.2
        preparer.look(settings())  # unchanged for a second: sent
        assert preparer.job_id.startswith("prep-") and reads == [1]
        poll_until(preparer, lambda: preparer.steps.get("lora", (0, 0))[0] >= 2,
                   "the prepare's progress")
        assert preparer.status().startswith("Preparing in the background: Fine-tuning LoRA")
        assert preparer.times.steps["lora"] >= 2  # its steps are timed (the edit's time left)
        preparer.look(settings())  # the same again: not sent again
        # OK: the edit goes on over the dialog's connection and joins the prepare
        session = db.open_session("", 5.0, db.Feedback(), link.detach())
        spec = db.JobSpec(pixels=image(), width=8, height=6, channels=3, mask=None,
                          handles=[(1.0, 1.0)], targets=[(3.0, 2.0)], method="dragdiffusion",
                          params={"lora_steps": 20}, prompt="prepare=30 steps=2", seed=42)
        # the edit's progress starts where the prepare was, with its measured step times
        tracker = prog.Tracker(prog.plan_steps({"method": "dragdiffusion", "lora_steps": 20}),
                               prepared=preparer.done(), prepared_times=preparer.times)
        assert tracker.done["lora"] >= 2 and tracker.times.steps["lora"] >= 2
        result = session.run(spec, db.Feedback(), tracker)
        assert session.client.last_submit["joined"] == preparer.job_id
        session.close()
    assert result.pixels and len(engine.prepares) == len(engine.prepared) == 1
    assert len(engine.runs) == 1 and reads == [1]


def test_a_new_setting_replaces_the_prepare_and_cancel_ends_it(tmp_path):
    engine = FakeEngine(delay=0.05)
    clock = Clock()
    with running_server(engine) as server:
        link, preparer, reads = dialog(server, tmp_path, clock)
        for look in (settings(), settings()):
            preparer.look(look)
            clock.now += 1.5
        first = preparer.job_id
        poll_until(preparer, lambda: preparer.phase, "the first prepare to start")
        for look in (settings(seed=7), settings(seed=7)):  # the seed keys the LoRA
            preparer.look(look)
            clock.now += 1.5
        assert preparer.job_id not in (None, first) and reads == [1]  # the layer read once
        poll_until(preparer, lambda: len(engine.prepares) == 2, "the second prepare")
        # Inpaint4Drag needs no prepare: choosing it stops the current one
        for look in (settings(method="inpaint4drag", algorithm="inpaint4drag"),) * 2:
            preparer.look(look)
            clock.now += 1.5
        assert preparer.ended == "cancelled"
        poll_until(preparer, lambda: link.client.ping()["running"] is None,
                   "the backend to stop the prepare")
        for look in (settings(seed=8),) * 2:
            preparer.look(look)
            clock.now += 1.5
        preparer.cancel()  # the dialog's Cancel
        assert preparer.ended == "cancelled" and preparer.status() == ""
        link.close()
    assert engine.prepared == []


def test_after_a_download_changes_the_model_the_same_settings_are_prepared_again(tmp_path):
    """A prepare was for the models served when it ran: once the dialog's download made the
    backend serve others (``SettingsDialog.take_info`` calls ``forget``), "Prepared in the
    background" would be stale, so the settings shown are sent again."""
    engine = FakeEngine(delay=0.01)
    clock = Clock()
    with running_server(engine) as server:
        link, preparer, reads = dialog(server, tmp_path, clock)
        for look in (settings(), settings()):
            preparer.look(look)
            clock.now += 1.5
        first = preparer.job_id
        poll_until(preparer, lambda: preparer.ended == "prepared", "the first prepare")
        preparer.look(settings())
        assert preparer.job_id == first  # unchanged settings: not sent again
        preparer.forget()
        assert preparer.status() == "" and preparer.done() == {}
        for look in (settings(), settings()):
            preparer.look(look)
            clock.now += 1.5
        assert preparer.job_id not in (None, first)
        poll_until(preparer, lambda: preparer.ended == "prepared", "the second prepare")
        link.close()
    assert len(engine.prepared) == 2 and reads == [1]


def test_no_prepare_at_a_backend_older_than_1_2():
    from types import SimpleNamespace

    link = SimpleNamespace(client=object(), info={"protocol_version": "1.1"})
    preparer = db.Preparer(link, lambda: ("u8", 3, b""), 8, 6, clock=Clock())
    assert not preparer.usable
    preparer.look(settings())
    assert preparer.job_id is None
    assert db.supports_prepare({"protocol_version": "1.2"})
    assert not db.supports_prepare({"protocol_version": "1.1"}) and not db.supports_prepare({})
