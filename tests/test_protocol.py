"""protocol/wire.py without sockets: every message type, signing, replays, limits, files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from protocol import connection, wire
from protocol.wire import Limits, ProtocolError, Session

KEY = b"k" * 32
JOB = "job-1"
PIXELS = bytes(range(24))  # 4×2×3

SAMPLES: dict[str, tuple[dict, list[bytes]]] = {
    wire.HELLO: ({"client": "tests"}, []),
    wire.HELLO_REPLY: ({"protocol_version": "1.0", "backend_version": "0.1.0",
                        "server_session": "s", "device": "cpu", "memory": {"total": 1},
                        "model": {"name": "m", "state": "ready", "error": None},
                        "methods": {"dragdiffusion": {"work_size": 512}},
                        "parameters": {"work_size": {"type": "int", "min": 64, "max": 2048,
                                                     "step": 64, "help": "working size"}},
                        "descriptions": {"dragdiffusion": "the default"},
                        "default_method": "dragdiffusion", "limits": Limits().as_dict(),
                        "dtypes": ["u8"],
                        "client_ttl": 60.0,
                        "queue": {"queued": 0, "running": None},
                        "security": {"signature_scheme": "hmac-sha256", "curve": False},
                        "models": {"sets": {"instant": {
                            "title": "Instant", "summary": "", "licence": "MIT",
                            "methods": ["inpaint4drag"], "state": "downloading",
                            "serving": False, "bytes": 2_280_000_000,
                            "download": {"job_id": JOB, "state": "running", "done": 5,
                                         "total": 9}}},
                            "methods": {"inpaint4drag": ["instant", "sd15"]},
                            "can_download": True, "location": "/hf/hub"}}, []),
    wire.SUBMIT: ({"job_id": JOB, "width": 4, "height": 2, "channels": 3, "has_mask": True,
                   "handles": [[1.0, 1.5]], "targets": [[3, 1]], "method": "gooddrag",
                   "params": {"work_size": 64}, "prompt": "a cat", "seed": 7, "preview": False,
                   "dtype": "u8"},
                  [PIXELS, bytes(8)]),
    wire.SUBMIT_REPLY: ({"job_id": JOB, "state": "queued", "position": 2, "duplicate": False,
                         "joined": None}, []),
    wire.ATTACH: ({"job_id": JOB}, []),
    wire.ATTACH_REPLY: ({"job_id": JOB, "state": "running", "position": None}, []),
    wire.CANCEL: ({"job_id": JOB}, []),
    wire.CANCEL_REPLY: ({"job_id": JOB, "state": "cancelling"}, []),
    wire.PING: ({}, []),
    wire.PONG: ({"server_session": "s", "time": 1.5, "queued": 0, "running": JOB}, []),
    wire.SHUTDOWN: ({}, []),
    wire.SHUTDOWN_REPLY: ({"cancelled": [JOB]}, []),
    wire.ERROR: ({"code": "invalid_input", "message": "no", "detail": None}, []),
    wire.QUEUED: ({"job_id": JOB, "position": 1}, []),
    wire.STARTED: ({"job_id": JOB}, []),
    wire.PROGRESS: ({"job_id": JOB, "phase": "drag", "step": 3, "total": 80}, []),
    wire.PREVIEW: ({"job_id": JOB, "phase": "drag", "step": 3, "width": 4, "height": 2,
                    "channels": 3}, [PIXELS]),
    wire.FINISHED: ({"job_id": JOB, "width": 4, "height": 2, "channels": 3,
                     "handles": [[3.0, 1.0]], "timings": {"drag": 1.25}, "stats": {},
                     "dtype": "u8", "warnings": ["a handle lies outside the selection"]},
                    [PIXELS]),
    wire.CANCELLED: ({"job_id": JOB, "reason": "client"}, []),
    wire.WARP: ({"width": 4, "height": 2, "channels": 3, "dtype": "u8",
                 "handles": [[1.5, 1.5]], "targets": [[3.5, 1.5]],
                 "params": {"inpaint_kernel": 3}, "overlay": True}, [PIXELS, bytes(8)]),
    wire.WARP_REPLY: ({"width": 4, "height": 2, "channels": 3, "dtype": "u8",
                       "moved_pixels": 2, "inpaint_pixels": 3, "seconds": 0.004,
                       "warnings": []}, [PIXELS, bytes(8)]),
    wire.PREPARE: ({"job_id": JOB, "width": 4, "height": 2, "channels": 3, "dtype": "u8",
                    "method": "dragdiffusion", "params": {"lora_steps": 20}, "prompt": "a cat",
                    "seed": 7, "masked": True}, [PIXELS]),
    wire.PREPARE_REPLY: ({"job_id": JOB, "state": "queued", "position": 1,
                          "duplicate": False}, []),
    wire.PREPARED: ({"job_id": JOB, "timings": {"lora": 3.5}, "stats": {"work": {}}}, []),
    wire.DOWNLOAD: ({"job_id": JOB, "set": "instant"}, []),
    wire.DOWNLOAD_REPLY: ({"job_id": JOB, "state": "queued", "duplicate": False}, []),
    wire.INSTALLED: ({"job_id": JOB, "set": "instant", "bytes": 2_280_000_000,
                      "fetched": 2_280_000_000, "seconds": 61.5, "serving": True,
                      "methods": ["inpaint4drag"]}, []),
}


def pair() -> tuple[Session, Session]:
    return Session(KEY, me="a", peer="b"), Session(KEY, me="b", peer="a")


def test_samples_cover_every_message_type():
    replies = {wire.HELLO_REPLY, wire.SUBMIT_REPLY, wire.ATTACH_REPLY, wire.CANCEL_REPLY,
               wire.PONG, wire.SHUTDOWN_REPLY, wire.WARP_REPLY, wire.PREPARE_REPLY,
               wire.DOWNLOAD_REPLY}
    assert set(SAMPLES) == set(wire.SCHEMAS) == {*wire.REQUESTS, *replies, *wire.EVENTS}


@pytest.mark.parametrize("msg_type", sorted(SAMPLES))
def test_round_trip_every_message_type(msg_type):
    sender, receiver = pair()
    content, buffers = SAMPLES[msg_type]
    parent = sender.header(wire.PING)
    header, frames = sender.serialize(msg_type, content, parent=parent, job_id=JOB,
                                      buffers=buffers)
    assert frames[0] == wire.DELIMITER and len(frames) == 5 + len(buffers)
    message = receiver.parse(frames)
    assert wire.check_content(message) == content
    assert message.header == header and message.parent == parent
    assert message.msg_type == msg_type and message.job_id == JOB
    assert [bytes(b) for b in message.buffers] == buffers


def test_defaults_are_filled_and_unknown_fields_kept():
    sender, receiver = pair()
    content = {"job_id": JOB, "width": 4, "height": 2, "channels": 3, "handles": [[0, 0]],
               "targets": [[1, 1]], "method": "dragdiffusion", "future_field": 1}
    message = receiver.parse(sender.serialize(wire.SUBMIT, content, job_id=JOB,
                                              buffers=[PIXELS])[1])
    checked = wire.check_content(message)
    assert checked["prompt"] == "" and checked["seed"] == 0 and checked["params"] == {}
    assert checked["has_mask"] is False and checked["future_field"] == 1


@pytest.mark.parametrize("index", [2, 3, 4, 5, 6])
def test_any_changed_byte_breaks_the_signature(index):
    sender, receiver = pair()
    content, buffers = SAMPLES[wire.SUBMIT]
    frames = sender.serialize(wire.SUBMIT, content, job_id=JOB, buffers=buffers)[1]
    changed = bytearray(frames[index])
    changed[len(changed) // 2] ^= 1
    frames[index] = bytes(changed)
    with pytest.raises(ProtocolError) as err:
        receiver.parse(frames)
    assert err.value.code == wire.BAD_SIGNATURE


def test_wrong_key_and_missing_signature_are_refused():
    sender = Session(b"other key", me="a", peer="b")
    _, receiver = pair()
    frames = sender.serialize(wire.PING, {})[1]
    with pytest.raises(ProtocolError, match="connection file") as err:
        receiver.parse(frames)
    assert err.value.code == wire.BAD_SIGNATURE
    frames[1] = b""
    with pytest.raises(ProtocolError) as err:
        receiver.parse(frames)
    assert err.value.code == wire.BAD_SIGNATURE


def test_signature_is_checked_before_unpacking(monkeypatch):
    calls = []
    monkeypatch.setattr(wire.msgpack_codec, "unpack", lambda *a, **k: calls.append(a))
    _, receiver = pair()
    bogus = [wire.DELIMITER, b"0" * 64, b"\xc1", b"\xc1", b"\xc1"]
    with pytest.raises(ProtocolError):
        receiver.parse(bogus)
    assert calls == []


def test_replay_is_refused():
    sender, receiver = pair()
    frames = sender.serialize(wire.PING, {})[1]
    receiver.parse(frames)
    with pytest.raises(ProtocolError) as err:
        receiver.parse(frames)
    assert err.value.code == wire.REPLAYED
    assert err.value.header is not None  # the verified header is kept for the error reply


def test_stale_and_future_messages_are_refused():
    now = [1000.0]
    sender = Session(KEY, me="a", peer="b", clock=lambda: now[0])
    receiver = Session(KEY, me="b", peer="a", replay=wire.ReplayGuard(60, clock=lambda: 1000.0))
    for sent in (900.0, 1100.0):
        now[0] = sent
        with pytest.raises(ProtocolError, match="clock") as err:
            receiver.parse(sender.serialize(wire.PING, {})[1])
        assert err.value.code == wire.REPLAYED


def test_replay_guard_stays_bounded_and_safe():
    guard = wire.ReplayGuard(window=100, capacity=3, clock=lambda: 1000.0)
    for i in range(10):
        guard.check(b"sig%d" % i, 950.0 + i)
    assert len(guard._seen) <= 3
    with pytest.raises(ProtocolError):  # evicted early, but its time is under the floor
        guard.check(b"sig0", 950.0)
    guard.check(b"new", 999.0)


def test_one_sender_cannot_move_the_replay_guard_ahead_of_the_clock():
    """N2: 65,600 pings dated now + 290 s (inside the 300 s window) pushed the guard's floor
    290 s ahead, and every other sender's messages were ``replayed`` for ~5 minutes."""
    now = [1000.0]
    guard = wire.ReplayGuard(window=300, capacity=100, clock=lambda: now[0])
    for i in range(150):  # far in the future: refused, so nothing is remembered
        with pytest.raises(ProtocolError, match="clock") as err:
            guard.check(b"ahead%d" % i, now[0] + 290, "attacker")
        assert "290.0 s ahead, at most 10 s allowed" in err.value.detail
    refused = 0
    for i in range(150):  # as far ahead as allowed, more than the capacity, from many sessions
        for sig, session in ((b"near%d" % i, "attacker"), (b"fill%d" % i, f"sybil{i}")):
            try:
                guard.check(sig, now[0] + 9.5, session)
            except ProtocolError:  # under its own floor: the attacker locks itself out only
                refused += session == "attacker"
    assert refused > 0 and len(guard._seen) <= 100 and len(guard._floors) <= 100
    for i in range(1000):  # every other session is served throughout
        now[0] += 0.01
        guard.check(b"honest%d" % i, now[0], "honest")
    # The guarantee holds: what was received is refused again, evicted or not...
    with pytest.raises(ProtocolError, match="already received"):
        guard.check(b"near0", 1009.5, "attacker")
    with pytest.raises(ProtocolError, match="already received"):
        guard.check(b"honest999", now[0], "honest")
    # ...and a floor lasts only while its time is inside the window.
    now[0] = 1000.0 + 9.5 + 300.1
    guard.check(b"later", now[0], "honest")
    assert list(guard._floors) == []


def test_version_mismatch_names_both_versions():
    sender, receiver = pair()
    sender.version = "2.3"
    with pytest.raises(ProtocolError) as err:
        receiver.parse(sender.serialize(wire.HELLO, {})[1])
    assert err.value.code == wire.INCOMPATIBLE_VERSION
    assert "2.3" in err.value.message and wire.PROTOCOL_VERSION in err.value.message
    sender.version = "1.9"  # same major: compatible
    receiver.parse(sender.serialize(wire.HELLO, {})[1])


def test_malformed_frames():
    sender, receiver = pair()
    frames = sender.serialize(wire.PING, {})[1]
    for broken in ([], frames[:4], [b"<IDS|MSG>", *frames[1:]], frames + [b"x"] * 3):
        with pytest.raises(ProtocolError) as err:
            receiver.parse(broken)
        assert err.value.code == wire.BAD_MESSAGE


def _signed(session: Session, header: dict, content: bytes) -> list[bytes]:
    h, p = msgpack.packb(header), msgpack.packb({})
    return [wire.DELIMITER, wire.signature(KEY, h, p, content)[0], h, p, content]


@pytest.mark.parametrize("content", [
    msgpack.packb([1, 2]),                    # not a map
    msgpack.packb({"a": list(range(5000))}),  # too long an array
    msgpack.packb({"a": msgpack.ExtType(1, b"x")}),  # extension types are refused
    b"\x81\xa1a\xc7\x00\x05",                       # ... also a zero-length one (11.9)
    b"\x81\xa1a\xd4\x05\x00",                       # ... and a fixext
    msgpack.packb({1: 2}),                    # non-string key
    b"\x91" * 100000,                          # deep nesting
    msgpack.packb({}) + b"extra",              # trailing bytes
    b"\xa3\xff\xfe\xfd",                       # invalid UTF-8
])
def test_hostile_msgpack_is_a_bad_message(content):
    sender, receiver = pair()
    frames = _signed(sender, sender.header(wire.PING), content)
    with pytest.raises(ProtocolError) as err:
        receiver.parse(frames)
    assert err.value.code == wire.BAD_MESSAGE


@pytest.mark.parametrize("version", ["١.٠", "１.０", "1.٠", "².0", "1.0\n"])
def test_versions_are_ascii_digits_only(version):
    """11.9: Unicode digits used to pass as a version ('١.٠' is Arabic-Indic 1.0)."""
    with pytest.raises(ProtocolError) as err:
        wire.parse_version(version)
    assert err.value.code == wire.BAD_MESSAGE
    with pytest.raises(ProtocolError):
        wire.check_version(version)


@pytest.mark.parametrize(("field", "value"), [
    ("msg_id", 5), ("session", ""), ("msg_type", "x" * 40), ("version", "one"),
    ("version", "１.０"),
    ("time", float("nan")), ("time", True), ("job_id", "../etc"),
])
def test_bad_header_fields(field, value):
    sender, receiver = pair()
    header = sender.header(wire.PING)
    header[field] = value
    with pytest.raises(ProtocolError) as err:
        receiver.parse(_signed(sender, header, msgpack.packb({})))
    assert err.value.code == wire.BAD_MESSAGE and field in err.value.message


@pytest.mark.parametrize(("field", "value"), [
    ("width", "4"), ("width", True), ("handles", [[1]]), ("handles", [[1, float("inf")]]),
    ("params", []), ("seed", 1.5), ("job_id", "a b"), ("method", None),
])
def test_wrong_field_types(field, value):
    sender, receiver = pair()
    content = {**SAMPLES[wire.SUBMIT][0], field: value}
    frames = sender.serialize(wire.SUBMIT, content, job_id=JOB,
                              buffers=SAMPLES[wire.SUBMIT][1])[1]
    with pytest.raises(ProtocolError) as err:
        wire.check_content(receiver.parse(frames))
    assert err.value.code == wire.BAD_MESSAGE and field in err.value.message


def test_unknown_type_and_buffer_count_and_job_id_mismatch():
    sender, receiver = pair()
    with pytest.raises(ProtocolError) as err:
        wire.check_content(receiver.parse(sender.serialize("teleport", {})[1]))
    assert err.value.code == wire.UNKNOWN_MESSAGE_TYPE
    with pytest.raises(ProtocolError, match="buffers"):
        wire.check_content(receiver.parse(sender.serialize(wire.SUBMIT, SAMPLES[wire.SUBMIT][0],
                                                           job_id=JOB)[1]))
    with pytest.raises(ProtocolError, match="job_id"):
        wire.check_content(receiver.parse(sender.serialize(
            wire.SUBMIT, SAMPLES[wire.SUBMIT][0], job_id="other", buffers=[PIXELS])[1]))


def _submit(**changes):
    content = {"job_id": JOB, "width": 4, "height": 2, "channels": 3, "has_mask": False,
               "handles": [[1, 1]], "targets": [[3, 1]], "method": "dragdiffusion",
               "params": {}, "prompt": "", "seed": 0, "preview": False}
    content.update(changes)
    return content


@pytest.mark.parametrize(("changes", "sizes", "match"), [
    ({}, [23], "needs"),
    ({"has_mask": True}, [24], "mask"),
    ({"width": 9000}, [9000 * 2 * 3], "per side"),
    ({"width": 2**40, "height": 2**40}, [24], "per side"),
    ({"width": 0}, [0], "per side"),
    ({"channels": 5}, [40], "channels"),
    ({"handles": [[5, 1]]}, [24], "outside"),
    ({"targets": []}, [24], "target"),
    ({"handles": [], "targets": []}, [24], "handle"),
    ({"seed": -1}, [24], "seed"),
    ({"prompt": "x" * 1001}, [24], "prompt"),
])
def test_check_submit_limits(changes, sizes, match):
    with pytest.raises(ProtocolError, match=match) as err:
        wire.check_submit(_submit(**changes), sizes, Limits())
    assert err.value.code == wire.INVALID_INPUT


def test_check_submit_pixel_types():
    wire.check_submit(_submit(dtype="u16"), [48], Limits())
    wire.check_submit(_submit(dtype="f32"), [96], Limits())
    with pytest.raises(ProtocolError, match="needs") as err:
        wire.check_submit(_submit(dtype="u16"), [24], Limits())
    assert err.value.code == wire.INVALID_INPUT
    for dtype in ("f64", "u16"):
        with pytest.raises(ProtocolError, match="accepts u8") as err:
            wire.check_submit(_submit(dtype=dtype), [48], Limits(), ("u8",))
        assert err.value.code == wire.INVALID_INPUT


def test_check_submit_pixel_limit():
    wire.check_submit(_submit(), [24], Limits())
    with pytest.raises(ProtocolError, match="pixels"):
        wire.check_submit(_submit(), [24], Limits(max_pixels=7))


@pytest.mark.parametrize(("changes", "sizes", "match"), [
    ({}, [23], "needs"),
    ({}, [24, 8], "needs"),  # a prepare carries no mask
    ({"width": 9000}, [9000 * 2 * 3], "per side"),
    ({"channels": 5}, [40], "channels"),
    ({"seed": -1}, [24], "seed"),
    ({"prompt": "x" * 1001}, [24], "prompt"),
    ({"params": {f"k{i}": 1 for i in range(65)}}, [24], "too long"),
])
def test_check_prepare_caps_like_a_submit_without_points(changes, sizes, match):
    content = {**SAMPLES[wire.PREPARE][0], **changes}
    wire.check_prepare(SAMPLES[wire.PREPARE][0], [24], Limits())
    with pytest.raises(ProtocolError, match=match) as err:
        wire.check_prepare(content, sizes, Limits())
    assert err.value.code == wire.INVALID_INPUT


def _warp(**changes):
    content = {"width": 4, "height": 2, "channels": 3, "dtype": "u8", "handles": [[1, 1]],
               "targets": [[3, 1]], "params": {}, "overlay": False}
    content.update(changes)
    return content


def test_check_warp_needs_a_mask_and_caps_the_pixels():
    wire.check_warp(_warp(), [24, 8], Limits())
    with pytest.raises(ProtocolError, match="mask") as err:
        wire.check_warp(_warp(), [24], Limits())  # the mask is the region that moves
    assert err.value.code == wire.INVALID_INPUT
    with pytest.raises(ProtocolError, match="scaled down") as err:
        wire.check_warp(_warp(), [24, 8], Limits(max_warp_pixels=7))
    assert err.value.code == wire.INVALID_INPUT
    with pytest.raises(ProtocolError, match="outside"):
        wire.check_warp(_warp(handles=[[5, 1]]), [24, 8], Limits())


def test_a_1_0_peer_and_a_1_1_peer_understand_each_other():
    sender, receiver = pair()
    sender.version = "1.0"
    message = receiver.parse(sender.serialize(wire.HELLO, {})[1])
    assert wire.check_content(message) == {"client": ""}


def test_connection_file_round_trip_and_permissions(tmp_path):
    path = tmp_path / "conf" / "backend.json"
    info = connection.ConnectionInfo("tcp://127.0.0.1:5557", os.urandom(32), pid=42,
                               curve_server_key="x" * 40)
    connection.write_connection_file(path, info)
    connection.write_connection_file(path, info)  # overwrite in place
    assert connection.read_connection_file(path) == info
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text())["signature_scheme"] == "hmac-sha256"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left


def test_connection_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m backend serve"):
        connection.read_connection_file(tmp_path / "none.json")
    damaged = tmp_path / "bad.json"
    damaged.write_text('{"endpoint": "tcp://x:1", "key": "zz"}')
    damaged.chmod(0o600)
    with pytest.raises(ValueError, match="damaged"):
        connection.read_connection_file(damaged)


def test_default_connection_file(monkeypatch, tmp_path):
    monkeypatch.setenv(connection.CONNECTION_ENV, str(tmp_path / "c.json"))
    assert connection.default_connection_file() == tmp_path / "c.json"
    monkeypatch.delenv(connection.CONNECTION_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # ignored on purpose (Flatpak)
    path = connection.default_connection_file()
    assert path.name == "backend.json" and path.parent.name == connection.APP_DIR
    if sys.platform != "win32":
        assert path.parent.parent == Path.home() / ".config"


def test_protocol_imports_without_numpy_or_torch():
    code = ("import sys; import protocol, protocol.client, protocol.curve; "
            "bad = {'numpy', 'torch', 'backend'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[1])


posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX owners and modes")


@posix_only
def test_an_open_folder_of_ours_is_tightened_when_the_file_is_written(tmp_path):
    """11.5: an existing group/world-writable folder used to be left as it was."""
    folder = tmp_path / "conf"
    folder.mkdir()
    os.chmod(folder, 0o777)
    connection.write_connection_file(folder / "backend.json",
                                     connection.ConnectionInfo("tcp://127.0.0.1:1", b"k" * 32))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert connection.read_connection_file(folder / "backend.json").key == b"k" * 32


@posix_only
@pytest.mark.parametrize("what", ["folder writable by others", "file writable by others",
                                  "file of another user", "folder of another user"])
def test_a_connection_file_others_could_swap_is_refused(tmp_path, monkeypatch, what):
    """11.5: the client used to read any connection file, whoever could have written it."""
    folder = tmp_path / "conf"
    path = folder / "backend.json"
    connection.write_connection_file(path, connection.ConnectionInfo("tcp://127.0.0.1:1",
                                                                     b"k" * 32))
    if what == "folder writable by others":
        os.chmod(folder, 0o777)
    elif what == "file writable by others":
        os.chmod(path, 0o622)
    elif os.getuid() == 0:  # root can give the file or the folder away
        os.chown(path if what == "file of another user" else folder, 4321, -1)
    else:  # pretend to be someone else: then neither is ours
        me = os.getuid()
        monkeypatch.setattr(connection.os, "getuid", lambda: me + 1)
    with pytest.raises(connection.UnsafeConnectionFile) as err:
        connection.read_connection_file(path)
    message = str(err.value)
    assert str(path) in message and ("another user" in message or "writable by other" in message)
    assert "chmod 700" in message


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_connection_file_others_can_read_is_refused_not_tightened(tmp_path, mode):
    """N8: a copy made world-readable (0644, as ``cp`` makes it under the usual umask) was used
    silently, its key readable by every local user. It is refused, not quietly made 0600: a key
    others could read must be taken as known, and the user must hear of it."""
    from protocol.client import Client, ConnectionFileError

    path = tmp_path / "conf" / "backend.json"
    connection.write_connection_file(path, connection.ConnectionInfo("tcp://127.0.0.1:1",
                                                                     b"k" * 32))
    os.chmod(path, mode)
    with pytest.raises(ConnectionFileError) as err:
        Client.from_connection_file(path)
    message = err.value.message
    assert f"readable by other users (mode {mode:o})" in message and str(path) in message
    assert f"chmod 600 {path}" in message and "restart the backend" in message
    assert stat.S_IMODE(path.stat().st_mode) == mode  # left as it was
    os.chmod(path, 0o600)
    assert connection.read_connection_file(path).key == b"k" * 32


@posix_only
def test_a_folder_of_another_user_is_not_written_into(tmp_path, monkeypatch):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o755)
    me = os.getuid()
    monkeypatch.setattr(connection.os, "getuid", lambda: me + 1)
    with pytest.raises(connection.UnsafeConnectionFile, match="belongs to another user"):
        connection.write_connection_file(folder / "backend.json",
                                         connection.ConnectionInfo("tcp://x:1", b"k" * 32))
    assert not (folder / "backend.json").exists()
