"""The ZMTP 3.1 codec (protocol/zmtp.py) against bytes written down from the specs (RFC 23
ZMTP 3.0, RFC 37 ZMTP 3.1, RFC 24 PLAIN) and from what libzmq 4.3 really sends."""

from __future__ import annotations

import pytest

from protocol import zmtp

# What libzmq 4.3.5's ROUTER with plain_server=1 sends first (captured on loopback): as-server
# is 0 even on the PLAIN server side, so clients must not insist on it.
LIBZMQ_PLAIN_GREETING = (b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f\x03\x01PLAIN"
                         + bytes(15) + bytes(32))
# … and what it answers a wrong password with (the name's hex escape swallowed the "E").
LIBZMQ_REFUSAL = bytes.fromhex("04 09 5e 52 52 4f 52 03 34 30 30")


def test_greeting_is_64_bytes_laid_out_as_the_spec_says():
    ours = zmtp.greeting(zmtp.PLAIN, as_server=False)
    assert len(ours) == 64
    assert ours[:10] == b"\xff" + bytes(7) + b"\x01\x7f"  # signature (padding as libzmq)
    assert ours[10:12] == b"\x03\x01"  # version 3.1
    assert ours[12:32] == b"PLAIN" + bytes(15)  # mechanism, NUL-padded to 20
    assert ours[32:33] == b"\x00"  # as-server: we are the client
    assert ours[33:] == bytes(31)  # filler
    assert zmtp.greeting(b"NULL", as_server=True)[32] == 1


def test_parse_greeting_reads_libzmqs_own():
    peer = zmtp.parse_greeting(LIBZMQ_PLAIN_GREETING)
    assert peer == zmtp.Greeting((3, 1), b"PLAIN", False)


@pytest.mark.parametrize(("data", "match"), [
    (b"\x00" + LIBZMQ_PLAIN_GREETING[1:], "signature"),  # no 0xFF
    (LIBZMQ_PLAIN_GREETING[:9] + b"\x7e" + LIBZMQ_PLAIN_GREETING[10:], "signature"),  # ZMTP 1.0
    (LIBZMQ_PLAIN_GREETING[:10] + b"\x02\x00" + LIBZMQ_PLAIN_GREETING[12:], "ZMTP 2.0"),
    (LIBZMQ_PLAIN_GREETING[:63], "64 bytes"),
])
def test_parse_greeting_refuses_what_is_not_zmtp_3(data, match):
    with pytest.raises(zmtp.ZmtpError, match=match):
        zmtp.parse_greeting(data)


def test_frame_headers_short_and_long():
    assert zmtp.frame_header(0) == b"\x00\x00"
    assert zmtp.frame_header(5, zmtp.MORE) == b"\x01\x05"
    assert zmtp.frame_header(255) == b"\x00\xff"
    assert zmtp.frame_header(256) == b"\x02\x00\x00\x00\x00\x00\x00\x01\x00"
    assert zmtp.frame_header(2**32, zmtp.MORE) == b"\x03" + (2**32).to_bytes(8, "big")
    assert zmtp.frame_header(3, zmtp.COMMAND) == b"\x04\x03"


def test_commands_and_metadata_as_rfc_23_shows_them():
    # RFC 23's READY example: Socket-Type ROUTER (28-byte body).
    ready = zmtp.command(zmtp.READY, zmtp.metadata([("Socket-Type", b"ROUTER")]))
    assert ready == b"\x04\x1c\x05READY\x0bSocket-Type\x00\x00\x00\x06ROUTER"
    name, data = zmtp.parse_command(ready[2:])
    assert name == b"READY" and zmtp.parse_metadata(data) == {"socket-type": b"ROUTER"}
    initiate = zmtp.command(zmtp.INITIATE, zmtp.metadata([("Socket-Type", b"DEALER"),
                                                          ("Identity", b"")]))
    assert initiate == (b"\x04\x2c\x08INITIATE\x0bSocket-Type\x00\x00\x00\x06DEALER"
                        b"\x08Identity\x00\x00\x00\x00")


def test_plain_hello_welcome_and_errors():
    hello = zmtp.plain_hello(b"admin", b"secret")
    assert hello == b"\x04\x13\x05HELLO\x05admin\x06secret"
    assert zmtp.parse_plain_hello(zmtp.parse_command(hello[2:])[1]) == (b"admin", b"secret")
    assert zmtp.parse_command(b"\x07WELCOME") == (b"WELCOME", b"")
    # The spec's ERROR and libzmq's misspelt one read the same.
    assert zmtp.parse_command(b"\x05ERROR\x03400") == (zmtp.ERROR, b"\x03400")
    name, data = zmtp.parse_command(LIBZMQ_REFUSAL[2:])
    assert (name, zmtp.error_reason(data)) == (zmtp.ERROR, "400")
    assert zmtp.plain_refusal() == LIBZMQ_REFUSAL  # what the server's own ROUTER writes
    with pytest.raises(zmtp.ZmtpError):
        zmtp.parse_command(b"\x09WELCOME")  # the name runs past the body
    with pytest.raises(ValueError):
        zmtp.plain_hello(b"u", b"p" * 256)


def test_ping_is_answered_with_its_context():
    # RFC 37: PING = TTL (2 bytes, deciseconds) + context (0–16 bytes); PONG echoes the context.
    assert zmtp.pong_for(b"\x00\x0aabc") == b"\x04\x08\x04PONGabc"
    assert zmtp.pong_for(b"\x00\x00") == b"\x04\x05\x04PONG"


def test_truncated_metadata_is_refused():
    with pytest.raises(zmtp.ZmtpError):
        zmtp.parse_metadata(b"\x0bSocket-Type\x00\x00\x00\x09ROUTER")
    with pytest.raises(zmtp.ZmtpError):
        zmtp.parse_metadata(b"\x0bSocket-Ty")


def test_message_chunks_join_small_frames_and_keep_large_ones_in_place():
    big = bytearray(b"x" * zmtp.LARGE_FRAME)
    chunks = zmtp.message_chunks([b"<DRAG|MSG>", b"s" * 300, big, b"tail"])
    assert len(chunks) == 3
    assert chunks[0] == (b"\x01\x0a<DRAG|MSG>" + b"\x03" + (300).to_bytes(8, "big")
                         + b"s" * 300 + b"\x03" + len(big).to_bytes(8, "big"))
    assert isinstance(chunks[1], memoryview) and chunks[1].obj is big  # the caller's memory
    assert chunks[2] == b"\x00\x04tail"  # the last frame has no MORE
    assert zmtp.message_chunks([b""]) == [b"\x00\x00"]


def _stream(*frames: tuple[int, bytes]) -> bytes:
    return b"".join(zmtp.frame_header(len(body), flags) + body for flags, body in frames)


def _feed(parser: zmtp.FrameParser, data: bytes, step: int) -> list[zmtp.Frame]:
    frames = []
    pos = 0
    while pos < len(data):
        target = parser.buffer()
        count = min(step, len(target), len(data) - pos)
        target[:count] = data[pos:pos + count]
        pos += count
        frames += parser.advance(count)
    return frames


@pytest.mark.parametrize("step", [1, 7, 4096, 10**7])
def test_parser_reads_frames_however_the_bytes_are_cut(step):
    large = bytes(range(256)) * 1000  # 256000 bytes: its own buffer
    data = _stream((zmtp.MORE, b"a"), (zmtp.MORE, b""), (zmtp.MORE, b"m" * 300),
                   (zmtp.COMMAND, b"\x04PING\x00\x00"), (zmtp.MORE, large), (0, b"end"))
    parser = zmtp.FrameParser(max_frame=2**20)
    frames = _feed(parser, data, step)
    assert [(f.flags, bytes(f.body)) for f in frames] == [
        (zmtp.MORE, b"a"), (zmtp.MORE, b""), (zmtp.MORE | zmtp.LONG, b"m" * 300),
        (zmtp.COMMAND, b"\x04PING\x00\x00"), (zmtp.MORE | zmtp.LONG, large), (0, b"end")]
    assert isinstance(frames[4].body, bytearray)  # received in place, not joined from pieces
    assert not parser.mid_frame


def test_parser_knows_when_the_peer_stopped_mid_frame():
    parser = zmtp.FrameParser(max_frame=2**20)
    data = _stream((0, b"x" * 100_000))
    assert _feed(parser, data[:50_000], 4096) == []
    assert parser.mid_frame


@pytest.mark.parametrize(("data", "match"), [
    (b"\x02" + (2**40).to_bytes(8, "big"), "at most 1000 are accepted"),  # before allocating
    (b"\x00\xff" + b"x" * 255 + b"\x02" + (1001).to_bytes(8, "big"), "1001 bytes"),
    (b"\x06" + (2**17).to_bytes(8, "big"), "command of 131072 bytes"),
    (b"\x08\x00", "reserved"),
    (b"\x05\x00", "MORE"),
])
def test_parser_refuses_oversized_and_malformed_frames(data, match):
    parser = zmtp.FrameParser(max_frame=1000)
    with pytest.raises(zmtp.ZmtpError, match=match):
        _feed(parser, data, 4096)
