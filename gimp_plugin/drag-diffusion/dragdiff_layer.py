"""The source and result layers' pixels: the format the plug-in reads and sends for each GIMP
precision, which pixels the backend changed, and the result layer's name.

The result layer starts as an exact copy of the source layer (any precision, any colour
space), and only the pixels the backend changed are written into it, so every other pixel
stays bit-identical in the layer's own precision even when the edit itself went through
8 bits. No gi here, and numpy only where GIMP's Python has it: tested outside GIMP.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

try:  # GIMP's Python on Linux has numpy; the Windows and macOS builds may not
    import numpy
except ImportError:  # pragma: no cover - exercised by forcing the pure path in the tests
    numpy = None

# Protocol dtype → (Babl component type, bytes per sample).
DTYPES = {"u8": ("u8", 1), "u16": ("u16", 2), "f32": ("float", 4)}
_PREFERENCE = ("f32", "u16", "u8")  # the best first, for falling back


@dataclass(frozen=True)
class PixelFormat:
    """How the plug-in exchanges a layer's pixels with the backend."""

    babl: str  # Babl format name for Gegl.Buffer get/set, e.g. "R'G'B'A u16"
    dtype: str  # protocol dtype: "u8", "u16" or "f32"
    channels: int

    @property
    def bytes_per_pixel(self) -> int:
        return DTYPES[self.dtype][1] * self.channels


def wanted_dtype(precision: str) -> str:
    """The dtype that keeps a GIMP precision's detail (``Gimp.Precision`` value nick such as
    ``u16-non-linear`` or ``float-linear``): 8-bit gamma pixels stay 8-bit; 8-bit linear and
    16-bit integer pixels go as 16 bits (the gamma curve needs the extra bits); 32-bit integer,
    half, float and double pixels go as 32-bit float."""
    component, _, trc = precision.partition("-")
    if component == "u8":
        return "u8" if trc in ("non-linear", "perceptual") else "u16"
    if component == "u16":
        return "u16"
    return "f32"


def pixel_format(precision: str, gray: bool, alpha: bool,
                 supported: Sequence[str] = ("u8",)) -> PixelFormat:
    """The format to read and send a layer in: gamma-encoded (as the model expects) in the
    best dtype the backend supports, not above what the precision needs."""
    want = wanted_dtype(precision)
    usable = [d for d in _PREFERENCE[_PREFERENCE.index(want):] if d in supported] or ["u8"]
    dtype = usable[0]
    model = ("Y'A" if alpha else "Y'") if gray else ("R'G'B'A" if alpha else "R'G'B'")
    channels = (2 if alpha else 1) if gray else (4 if alpha else 3)
    return PixelFormat(f"{model} {DTYPES[dtype][0]}", dtype, channels)


_ZEROS = re.compile(rb"\x00+")


def changed_runs(before: bytes, after: bytes, width: int,
                 bytes_per_pixel: int) -> list[tuple[int, int, int]]:
    """The pixels that differ, as row runs ``(y, x0, x1)`` (x1 exclusive), top to bottom."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} bytes before, {len(after)} after")
    row = width * bytes_per_pixel
    if row <= 0 or len(before) % row:
        raise ValueError(f"{len(before)} bytes are not rows of {width} × {bytes_per_pixel}")
    if numpy is not None:
        return _runs_numpy(before, after, width, bytes_per_pixel)
    return _runs_pure(before, after, width, bytes_per_pixel)


def _runs_numpy(before: bytes, after: bytes, width: int, bpp: int,
                band: int = 256) -> list[tuple[int, int, int]]:
    """Vectorised, ``band`` rows at a time (bounded memory): a run starts where a row's
    "differs" flag rises and ends where it falls."""
    a = numpy.frombuffer(before, numpy.uint8).reshape(-1, width, bpp)
    b = numpy.frombuffer(after, numpy.uint8).reshape(-1, width, bpp)
    runs: list[tuple[int, int, int]] = []
    for top in range(0, a.shape[0], band):
        differs = (a[top:top + band] != b[top:top + band]).any(axis=2)
        edges = numpy.diff(numpy.pad(differs, ((0, 0), (1, 1))).astype(numpy.int8), axis=1)
        rises, falls = numpy.argwhere(edges == 1), numpy.argwhere(edges == -1)
        runs.extend((top + int(y), int(x0), int(x1))
                    for (y, x0), (_, x1) in zip(rises, falls, strict=True))
    return runs


def _runs_pure(before: bytes, after: bytes, width: int,
               bpp: int) -> list[tuple[int, int, int]]:
    """Without numpy: equal rows are skipped whole; in a differing row the XOR of both rows is
    zero exactly on equal bytes, and a regular expression finds those runs in C."""
    row = width * bpp
    runs: list[tuple[int, int, int]] = []
    for y in range(len(before) // row):
        a, b = before[y * row:(y + 1) * row], after[y * row:(y + 1) * row]
        if a == b:
            continue
        diff = (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(row, "little")
        x = 0
        for same in _ZEROS.finditer(diff):  # whole pixels inside a run of equal bytes
            start, end = -(-same.start() // bpp), same.end() // bpp
            if end > start:
                if start > x:
                    runs.append((y, x, start))
                x = end
        if x < width:
            runs.append((y, x, width))
    return runs


def rectangles(runs: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Runs as rectangles ``(x, y, width, height)``: consecutive rows whose only run spans the
    same columns become one rectangle (one buffer write instead of one per row)."""
    by_row: dict[int, list[tuple[int, int]]] = {}
    for y, x0, x1 in runs:
        by_row.setdefault(y, []).append((x0, x1))
    out: list[list[int]] = []
    for y, spans in by_row.items():
        if len(spans) == 1 and out and out[-1][4] and out[-1][1] + out[-1][3] == y \
                and (out[-1][0], out[-1][0] + out[-1][2]) == spans[0]:
            out[-1][3] += 1
            continue
        for x0, x1 in spans:
            out.append([x0, y, x1 - x0, 1, len(spans) == 1])
    return [(x, y, w, h) for x, y, w, h, _ in out]


def bounding_box(runs: Sequence[tuple[int, int, int]]) -> tuple[int, int, int, int] | None:
    """(x, y, width, height) around all runs; None when there are none."""
    if not runs:
        return None
    x0 = min(r[1] for r in runs)
    x1 = max(r[2] for r in runs)
    return x0, runs[0][0], x1 - x0, runs[-1][0] - runs[0][0] + 1


# --- preview ------------------------------------------------------------------------------------

def preview_rgb(pixels: bytes, width: int, height: int, channels: int) -> bytes:
    """8-bit preview pixels (1–4 channels) as RGB bytes for a GdkPixbuf."""
    if len(pixels) != width * height * channels:
        raise ValueError(f"preview has {len(pixels)} bytes for {width}×{height}×{channels}")
    if channels == 3:
        return bytes(pixels)
    out = bytearray(width * height * 3)
    for c in range(3):
        out[c::3] = pixels[min(c, channels - 1) if channels >= 3 else 0::channels]
    return bytes(out)


def fit(width: int, height: int, box: int) -> tuple[int, int]:
    """The size of a ``width``×``height`` picture scaled to fit a ``box``×``box`` square."""
    scale = box / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


# --- naming -------------------------------------------------------------------------------------

# A name ``result_layer_name`` gave (GIMP may have added " #1" to keep names unique).
_RESULT_NAME = re.compile(r"(?P<base>.*?) – [\w-]+ \(\d+ drags?(?:, demo model)?"
                          r"(?:, edit (?P<edit>\d+))?\)(?: #\d+)?")


def result_layer_name(source: str, method: str, drags: int, demo_model: bool = False) -> str:
    """"Cat – dragdiffusion (1 drag)"; dragging that result again gives "Cat – gooddrag
    (2 drags, edit 2)", not a name that grows with every drag."""
    base, edit = source, 1
    earlier = _RESULT_NAME.fullmatch(source)
    if earlier is not None:
        base, edit = earlier["base"], int(earlier["edit"] or 1) + 1
    note = (", demo model" if demo_model else "") + (f", edit {edit}" if edit > 1 else "")
    return f"{base} – {method} ({drags} drag{'' if drags == 1 else 's'}{note})"
