"""The part of msgpack (github.com/msgpack/msgpack, spec.md) this protocol uses, in the
standard library alone, so the plug-in needs no compiled msgpack inside GIMP's Python.

Types: nil, booleans, integers (-2**63 … 2**64-1), floats (float64 written; float32 read), str
(UTF-8), bin, arrays and maps. ``pack`` writes exactly what ``msgpack.packb(obj,
use_bin_type=True)`` writes for these values. ``unpack`` reads what ``msgpack.unpackb(data,
raw=False, strict_map_key=True)`` reads, with explicit limits, and refuses every extension
type, the reserved byte 0xc1, truncated input and trailing bytes with ``DecodeError``.
"""

from __future__ import annotations

import struct
from typing import Any

MAX_DEPTH = 32  # nesting of arrays and maps, both ways (the protocol's deepest is 4)

_PACK_FLOAT = struct.Struct(">Bd").pack
_FIXED = {None: b"\xc0", False: b"\xc2", True: b"\xc3"}
# (largest unsigned value, prefix byte, struct format) for uint8…uint64
_UINTS = ((0xFF, 0xCC, ">BB"), (0xFFFF, 0xCD, ">BH"), (0xFFFFFFFF, 0xCE, ">BI"),
          (0xFFFFFFFFFFFFFFFF, 0xCF, ">BQ"))
# (smallest signed value, prefix byte, struct format) for int8…int64
_INTS = ((-(2**7), 0xD0, ">Bb"), (-(2**15), 0xD1, ">Bh"), (-(2**31), 0xD2, ">Bi"),
         (-(2**63), 0xD3, ">Bq"))


class DecodeError(ValueError):
    """The bytes are not msgpack this protocol accepts; the message says why."""


# --- encoding --------------------------------------------------------------------------------
def pack(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` (None, bool, int, float, str, bytes-like, list/tuple, dict)."""
    out: list[bytes] = []
    _pack_into(obj, out, 0)
    return b"".join(out)


def _sized(size: int, fix_base: int | None, fix_max: int, prefixes: tuple[int, int, int]) -> bytes:
    """The header of a str, bin, array or map of ``size`` items/bytes."""
    if fix_base is not None and size <= fix_max:
        return bytes((fix_base | size,))
    p8, p16, p32 = prefixes
    if size <= 0xFF and p8:
        return struct.pack(">BB", p8, size)
    if size <= 0xFFFF:
        return struct.pack(">BH", p16, size)
    if size <= 0xFFFFFFFF:
        return struct.pack(">BI", p32, size)
    raise ValueError(f"msgpack cannot hold {size} items or bytes in one object")


def _pack_int(value: int) -> bytes:
    if 0 <= value <= 0x7F or -32 <= value < 0:
        return struct.pack(">b" if value < 0 else ">B", value)
    table = _UINTS if value >= 0 else _INTS
    for bound, prefix, fmt in table:
        if (value <= bound) if value >= 0 else (value >= bound):
            return struct.pack(fmt, prefix, value)
    raise OverflowError(f"integer {value} does not fit in 64 bits")


def _pack_into(obj: Any, out: list[bytes], depth: int) -> None:
    if obj is None or obj is True or obj is False:
        out.append(_FIXED[obj])
    elif isinstance(obj, int):
        out.append(_pack_int(obj))
    elif isinstance(obj, float):
        out.append(_PACK_FLOAT(0xCB, obj))
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        out += (_sized(len(data), 0xA0, 31, (0xD9, 0xDA, 0xDB)), data)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        out += (_sized(len(data), None, 0, (0xC4, 0xC5, 0xC6)), data)
    elif isinstance(obj, (list, tuple, dict)):
        if depth >= MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(obj, dict):
            out.append(_sized(len(obj), 0x80, 15, (0, 0xDE, 0xDF)))
            for key, value in obj.items():
                _pack_into(key, out, depth + 1)
                _pack_into(value, out, depth + 1)
        else:
            out.append(_sized(len(obj), 0x90, 15, (0, 0xDC, 0xDD)))
            for item in obj:
                _pack_into(item, out, depth + 1)
    else:
        raise TypeError(f"can not serialize {type(obj).__name__!r} object")


# --- decoding --------------------------------------------------------------------------------
# first byte -> (struct format of the fixed-size value, or of the length that follows)
_SCALARS = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
            0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
_STR_LENGTHS = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}
_BIN_LENGTHS = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}
_ARRAY_LENGTHS = {0xDC: ">H", 0xDD: ">I"}
_MAP_LENGTHS = {0xDE: ">H", 0xDF: ">I"}
_EXTENSIONS = {0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8}


class _Reader:
    def __init__(self, data: bytes, max_array_len: int, max_map_len: int) -> None:
        self.data = data
        self.pos = 0
        self.max_array_len = max_array_len
        self.max_map_len = max_map_len

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise DecodeError(f"truncated: {size} bytes wanted at offset {self.pos}, "
                              f"{len(self.data) - self.pos} left")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def number(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value(self, depth: int) -> Any:
        byte = self.take(1)[0]
        if byte <= 0x7F:
            return byte
        if byte >= 0xE0:
            return byte - 0x100
        if 0xA0 <= byte <= 0xBF:
            return self.text(byte & 0x1F)
        if 0x90 <= byte <= 0x9F:
            return self.array(byte & 0x0F, depth)
        if 0x80 <= byte <= 0x8F:
            return self.map(byte & 0x0F, depth)
        if byte in (0xC0, 0xC2, 0xC3):
            return {0xC0: None, 0xC2: False, 0xC3: True}[byte]
        if byte in _SCALARS:
            return self.number(_SCALARS[byte])
        if byte in _STR_LENGTHS:
            return self.text(self.number(_STR_LENGTHS[byte]))
        if byte in _BIN_LENGTHS:
            return self.take(self.number(_BIN_LENGTHS[byte]))
        if byte in _ARRAY_LENGTHS:
            return self.array(self.number(_ARRAY_LENGTHS[byte]), depth)
        if byte in _MAP_LENGTHS:
            return self.map(self.number(_MAP_LENGTHS[byte]), depth)
        if byte in _EXTENSIONS:
            raise DecodeError(f"msgpack extension types are not allowed (byte 0x{byte:02x} at "
                              f"offset {self.pos - 1})")
        raise DecodeError(f"byte 0x{byte:02x} at offset {self.pos - 1} is not msgpack")

    def text(self, size: int) -> str:
        try:
            return self.take(size).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"a string is not valid UTF-8 ({exc.reason})") from None

    def nested(self, depth: int) -> int:
        if depth >= MAX_DEPTH:
            raise DecodeError(f"nested deeper than {MAX_DEPTH} levels")
        return depth + 1

    def array(self, length: int, depth: int) -> list[Any]:
        if length > self.max_array_len:
            raise DecodeError(f"array of {length} items exceeds the limit of "
                              f"{self.max_array_len}")
        depth = self.nested(depth)
        return [self.value(depth) for _ in range(length)]

    def map(self, length: int, depth: int) -> dict[Any, Any]:
        if length > self.max_map_len:
            raise DecodeError(f"map of {length} entries exceeds the limit of "
                              f"{self.max_map_len}")
        depth = self.nested(depth)
        result: dict[Any, Any] = {}
        for _ in range(length):
            key = self.value(depth)
            if not isinstance(key, (str, bytes)):
                raise DecodeError(f"map keys must be strings, got {type(key).__name__}")
            result[key] = self.value(depth)
        return result


def unpack(data: bytes | bytearray | memoryview, *, max_array_len: int = 2**31,
           max_map_len: int = 2**31) -> Any:
    """The one msgpack object in ``data``; raise ``DecodeError`` for anything else."""
    reader = _Reader(bytes(data), max_array_len, max_map_len)
    obj = reader.value(0)
    if reader.pos != len(reader.data):
        raise DecodeError(f"{len(reader.data) - reader.pos} bytes of extra data after the "
                          "object")
    return obj
