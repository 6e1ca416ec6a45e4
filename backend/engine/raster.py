"""Binary-mask rasterisation that reproduces OpenCV 4.8's pixel rules, in numpy.

Inpaint4Drag's official warp (``utils/drag.py``) uses five OpenCV calls on binary masks:
``findContours`` (external borders, ``CHAIN_APPROX_SIMPLE``), ``drawContours`` filled and with a
thickness, and ``dilate`` with a square kernel. The project does not depend on OpenCV, so this
module implements exactly those: the same border following (Suzuki–Abe, OpenCV's chain-code
order and start point), the same polygon fill (8-connected outline plus even–odd scanline spans
in 16.16 fixed point), the same thick polyline (a filled quadrilateral per segment and a disc
of radius ⌊(t + 1) / 2⌋ at each vertex) and the same dilation. ``tests/test_inpaint4drag_warp.py``
holds masks computed with OpenCV 4.8.0 (the official code's pin) and checks these against them.

Points are (x, y) integer pixel indices throughout; masks are H×W bool arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

XY_SHIFT = 16  # OpenCV's fixed-point fraction bits for drawing
XY_ONE = 1 << XY_SHIFT

# OpenCV's chain codes: 0 right, 1 up-right, 2 up, 3 up-left, 4 left, 5 down-left, 6 down,
# 7 down-right (y grows downwards).
CHAIN_DX = np.array([1, 1, 0, -1, -1, -1, 0, 1])
CHAIN_DY = np.array([0, -1, -1, -1, 0, 1, 1, 1])


# --------------------------------------------------------------------------- border following


def _next_code_table() -> np.ndarray:
    """next[neighbours, s]: the first chain code after ``s``, counter-clockwise, whose neighbour
    is set in the 8-bit ``neighbours`` (bit c = neighbour in direction c), as OpenCV's border
    follower searches it; 8 when no neighbour is set."""
    table = np.full((256, 8), 8, np.int8)
    for bits in range(256):
        for s in range(8):
            for step in range(1, 9):
                code = (s + step) & 7
                if bits >> code & 1:
                    table[bits, s] = code
                    break
    return table


NEXT_CODE = _next_code_table()


def neighbour_bits(mask: np.ndarray) -> np.ndarray:
    """(H+2)×(W+2) uint8: for each pixel of the zero-padded mask, which of its 8 neighbours are
    set (bit c for chain code c)."""
    padded = np.pad(mask.astype(bool), 2)
    h, w = mask.shape
    bits = np.zeros((h + 2, w + 2), np.uint8)
    for code in range(8):
        dx, dy = int(CHAIN_DX[code]), int(CHAIN_DY[code])
        shifted = padded[1 + dy: h + 3 + dy, 1 + dx: w + 3 + dx]
        bits |= shifted.astype(np.uint8) << code
    return bits


def trace_border(bits: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """The outer border of the component whose first pixel in raster order is ``start``
    ((x, y) in unpadded pixels), compressed as OpenCV's ``CHAIN_APPROX_SIMPLE``: the points
    where the chain code changes, starting at ``start``, going as OpenCV goes
    (down the left side first). Returns an (N, 2) int32 array of (x, y)."""
    x0, y0 = start
    px, py = x0 + 1, y0 + 1  # padded coordinates
    here = int(bits[py, px])
    if here == 0:  # a single pixel
        return np.array([[x0, y0]], np.int32)
    # The first neighbour found clockwise from "left" (OpenCV decrements the code from 4).
    s = 4
    while True:
        s = (s - 1) & 7
        if here >> s & 1:
            break
    first_x, first_y = px + int(CHAIN_DX[s]), py + int(CHAIN_DY[s])  # OpenCV's i1
    points = []
    prev = s ^ 4
    x, y = px, py
    while True:
        s = int(NEXT_CODE[bits[y, x], s])  # counter-clockwise after the code we came back on
        if s != prev:
            points.append((x - 1, y - 1))
            prev = s
        nx, ny = x + int(CHAIN_DX[s]), y + int(CHAIN_DY[s])
        if (nx, ny) == (px, py) and (x, y) == (first_x, first_y):
            break
        x, y = nx, ny
        s = (s + 4) & 7
    return np.array(points, np.int32)


def external_contours(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``cv2.findContours(mask, RETR_EXTERNAL, CHAIN_APPROX_SIMPLE)[0]`` as (N, 2) int32 arrays
    of (x, y), in OpenCV's order (the last one found first), each with its filled region
    (``fill_polygon`` of the contour: the component with its holes).

    A component inside a hole of another is part of that one's filled region and has no contour
    of its own, as in OpenCV's external mode.
    """
    full = mask.astype(bool)
    ys, xs = np.nonzero(full.any(1))[0], np.nonzero(full.any(0))[0]
    if ys.size == 0:
        return []
    oy, ox = int(ys[0]), int(xs[0])
    mask = full[oy:int(ys[-1]) + 1, ox:int(xs[-1]) + 1]  # the border follower pads it
    left = np.zeros_like(mask)
    left[:, 1:] = mask[:, :-1]
    starts_y, starts_x = np.nonzero(mask & ~left)  # run starts, raster order
    bits = neighbour_bits(mask)
    covered = np.zeros_like(mask)
    found = []
    for y, x in zip(starts_y.tolist(), starts_x.tolist(), strict=True):
        if covered[y, x]:
            continue
        contour = trace_border(bits, (x, y))
        filled = fill_polygon(mask.shape, contour)
        covered |= filled
        placed = np.zeros_like(full)
        placed[oy:oy + mask.shape[0], ox:ox + mask.shape[1]] = filled
        found.append((contour + np.array([ox, oy], np.int32), placed))
    return found[::-1]


# --------------------------------------------------------------------------- lines


def clip_line(size: tuple[int, int], p1: tuple[int, int],
              p2: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """OpenCV's ``clipLine`` for integer points on a (w, h) canvas: the part of the segment
    inside it (endpoints moved with C integer division), or None when it misses the canvas."""
    if size[0] <= 0 or size[1] <= 0:
        return None
    (x1, y1), (x2, y2) = _clip_line_unchecked(size, p1, p2)
    w, h = size
    if not (0 <= x1 < w and 0 <= x2 < w and 0 <= y1 < h and 0 <= y2 < h):
        return None
    return (x1, y1), (x2, y2)


def _clip_line_unchecked(size: tuple[int, int], p1: tuple[int, int],
                         p2: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The endpoints as OpenCV's ``clipLine`` leaves them, whether or not the segment meets the
    canvas (``CollectPolyEdges`` uses them either way)."""
    w, h = size
    right, bottom = w - 1, h - 1
    x1, y1 = p1
    x2, y2 = p2

    def code(x: int, y: int) -> int:
        return (x < 0) + (x > right) * 2 + (y < 0) * 4 + (y > bottom) * 8

    c1, c2 = code(x1, y1), code(x2, y2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += _cdiv((a - y1) * (x2 - x1), y2 - y1)
            y1 = a
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += _cdiv((a - y2) * (x2 - x1), y2 - y1)
            y2 = a
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += _cdiv((a - x1) * (y2 - y1), x2 - x1)
                x1 = a
                c1 = 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += _cdiv((a - x2) * (y2 - y1), x2 - x1)
                x2 = a
                c2 = 0
    return (x1, y1), (x2, y2)


def _cdiv(a: int, b: int) -> int:
    """C's integer division (truncation towards zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def line_pixels(size: tuple[int, int], p1: tuple[int, int],
                p2: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The pixels (xs, ys) of OpenCV's 8-connected ``Line`` from ``p1`` to ``p2`` (integer
    points, clipped to the (w, h) canvas as ``LineIterator`` clips them)."""
    w, h = size
    if not (0 <= p1[0] < w and 0 <= p2[0] < w and 0 <= p1[1] < h and 0 <= p2[1] < h):
        clipped = clip_line(size, p1, p2)
        if clipped is None:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        p1, p2 = clipped
    (x1, y1), (x2, y2) = p1, p2
    if x2 < x1:  # left to right
        (x1, y1), (x2, y2) = (x2, y2), (x1, y1)
    dx, dy = x2 - x1, y2 - y1
    ystep = -1 if dy < 0 else 1
    dy = abs(dy)
    steep = dy > dx
    major, minor = (dy, dx) if steep else (dx, dy)
    k = np.arange(major + 1, dtype=np.int64)
    # Bresenham as OpenCV's iterator runs it: err = major − 2·minor, the minor coordinate
    # advances after each step whose err was negative.
    moved = _bresenham_minor(k, major, minor)
    if steep:
        return x1 + moved, y1 + ystep * k
    return x1 + k, y1 + ystep * moved


def _bresenham_minor(k: np.ndarray, major: int, minor: int) -> np.ndarray:
    """How far the minor coordinate has moved at step k of OpenCV's 8-connected iterator."""
    if major == 0:
        return np.zeros_like(k)
    # err_j = major − 2·minor·(j+1) + 2·major·m_j < 0 moves it at step j; the count after k
    # steps is the number of j < k with that, which is ⌈(2·minor·k − major) / (2·major)⌉⁺ …
    # computed here as the closed form of that recurrence:
    return np.maximum(0, (2 * minor * k + major - 1) // (2 * major))


def line2_pixels(size: tuple[int, int], p1: tuple[int, int],
                 p2: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of OpenCV's ``Line2``: a line between 16.16 fixed-point points, stepped in
    whole pixels along its major axis (used for the outline of a thick line's quadrilateral)."""
    w, h = size
    clipped = clip_line((w << XY_SHIFT, h << XY_SHIFT), p1, p2)
    if clipped is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    (x1, y1), (x2, y2) = clipped
    x_major = abs(x2 - x1) > abs(y2 - y1)
    # Step along the major axis: (u, v) is (x, y) when x is major, else (y, x).
    (u1, v1), (u2, v2) = ((x1, y1), (x2, y2)) if x_major else ((y1, x1), (y2, x2))
    if u2 < u1:
        u1, u2, v1, v2 = u2, u1, v2, v1
    step = _cdiv((v2 - v1) << XY_SHIFT, abs(u2 - u1) | 1)
    count = (u2 - u1) >> XY_SHIFT
    u1 += XY_ONE >> 1
    v1 += XY_ONE >> 1
    k = np.arange(count + 1, dtype=np.int64)
    us = np.append((u1 >> XY_SHIFT) + k, (u2 + (XY_ONE >> 1)) >> XY_SHIFT)
    vs = np.append((v1 + step * k) >> XY_SHIFT, (v2 + (XY_ONE >> 1)) >> XY_SHIFT)
    return (us, vs) if x_major else (vs, us)


def _segments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of ``lengths`` + 1 pixels each: (segment index, step k) of every pixel."""
    counts = lengths + 1
    which = np.repeat(np.arange(len(counts)), counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return which, k


def lines(size: tuple[int, int], a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``line_pixels`` of many segments ``a[i]`` → ``b[i]`` ((N, 2) integer arrays) at once;
    segments leaving the canvas take the clipped, one-by-one path."""
    w, h = size
    a, b = np.asarray(a, np.int64).reshape(-1, 2), np.asarray(b, np.int64).reshape(-1, 2)
    inside = ((a >= 0) & (a < (w, h))).all(1) & ((b >= 0) & (b < (w, h))).all(1)
    parts = [line_pixels(size, tuple(p), tuple(q))
             for p, q in zip(a[~inside].tolist(), b[~inside].tolist(), strict=True)]
    a, b = a[inside], b[inside]
    swap = b[:, 0] < a[:, 0]  # left to right
    start = np.where(swap[:, None], b, a)
    end = np.where(swap[:, None], a, b)
    dx, dy = end[:, 0] - start[:, 0], end[:, 1] - start[:, 1]
    ystep = np.where(dy < 0, -1, 1)
    dy = np.abs(dy)
    steep = dy > dx
    major, minor = np.where(steep, dy, dx), np.where(steep, dx, dy)
    which, k = _segments(major)
    moved = np.maximum(0, (2 * minor[which] * k + major[which] - 1)
                       // np.maximum(1, 2 * major[which]))
    along, across = k, moved
    xs = start[which, 0] + np.where(steep[which], across, along)
    ys = start[which, 1] + ystep[which] * np.where(steep[which], along, across)
    parts.append((xs, ys))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def lines2(size: tuple[int, int], a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``line2_pixels`` of many 16.16 fixed-point segments at once (the clipped ones one by
    one)."""
    w, h = size
    a, b = np.asarray(a, np.int64).reshape(-1, 2), np.asarray(b, np.int64).reshape(-1, 2)
    limit = (w << XY_SHIFT, h << XY_SHIFT)
    inside = ((a >= 0) & (a < limit)).all(1) & ((b >= 0) & (b < limit)).all(1)
    parts = [line2_pixels(size, tuple(p), tuple(q))
             for p, q in zip(a[~inside].tolist(), b[~inside].tolist(), strict=True)]
    a, b = a[inside], b[inside]
    d = b - a
    flat = np.abs(d[:, 0]) > np.abs(d[:, 1])  # steps along x
    major_axis = np.where(flat, 0, 1)
    rows = np.arange(len(a))
    swap = d[rows, major_axis] < 0
    start = np.where(swap[:, None], b, a)
    end = np.where(swap[:, None], a, b)
    span = end - start
    major = span[rows, major_axis]
    minor = span[rows, 1 - major_axis]
    step = _cdiv_array(minor << XY_SHIFT, np.abs(major) | 1)
    count = major >> XY_SHIFT
    which, k = _segments(count)
    half = XY_ONE >> 1
    first_major = (start[rows, major_axis] + half) >> XY_SHIFT
    first_minor = start[rows, 1 - major_axis] + half
    along = first_major[which] + k
    across = (first_minor[which] + step[which] * k) >> XY_SHIFT
    xs = np.where(flat[which], along, across)
    ys = np.where(flat[which], across, along)
    ends = (end + half) >> XY_SHIFT
    parts.append((np.concatenate([xs, ends[:, 0]]), np.concatenate([ys, ends[:, 1]])))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _paint(canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> None:
    h, w = canvas.shape
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    canvas[ys[inside], xs[inside]] = True


# --------------------------------------------------------------------------- polygons


def in_box(shape: tuple[int, int], points: np.ndarray, pad: int,
           draw: Callable[[tuple[int, int], np.ndarray], np.ndarray]) -> np.ndarray:
    """``draw(box shape, points in the box)`` placed on an empty H×W canvas, where the box is
    the points' bounding box grown by ``pad`` and cut to the canvas.

    The same pixels as drawing on the whole canvas, for less work on a large one: OpenCV's
    clipping and fixed-point steps are unchanged by a whole-pixel shift, and every side of the
    box is either a side of the canvas or further than ``pad`` from every point."""
    h, w = shape
    out = np.zeros(shape, bool)
    pts = np.asarray(points, np.int64).reshape(-1, 2)
    if len(pts) == 0:
        return out
    x0, x1 = max(0, int(pts[:, 0].min()) - pad), min(w, int(pts[:, 0].max()) + 1 + pad)
    y0, y1 = max(0, int(pts[:, 1].min()) - pad), min(h, int(pts[:, 1].max()) + 1 + pad)
    if x0 < x1 and y0 < y1:
        out[y0:y1, x0:x1] = draw((y1 - y0, x1 - x0), pts - (x0, y0))
    return out


def fill_polygon(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """``cv2.drawContours(…, [points], -1, 1, cv2.FILLED)`` (= ``fillPoly`` with 8-connected
    lines) of one closed polygon of integer (x, y) points, on an H×W bool canvas: the outline
    drawn as 8-connected lines, plus even–odd scanline spans between the edges."""
    return in_box(shape, points, 1, _fill_polygon)


def _fill_polygon(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    h, w = shape
    canvas = np.zeros(shape, bool)
    pts = np.asarray(points, np.int64).reshape(-1, 2)
    n = len(pts)
    if n == 0:
        return canvas
    prev = np.roll(pts, 1, axis=0)
    _paint(canvas, *lines((w, h), prev, pts))
    edges = [_poly_edge((w, h), a, b) for a, b in zip(prev.tolist(), pts.tolist(), strict=True)]
    edges = [e for e in edges if e is not None]
    if len(edges) < 2:
        return canvas
    top, bottom, x_top, dx = (np.array(v, np.int64) for v in zip(*edges, strict=True))
    if bottom.max() < 0 or top.min() >= h:
        return canvas
    # Every row y0 ≤ y < y1 crosses an edge at x_top + (y − y0)·dx (exactly OpenCV's running
    # sum); sorted by x, consecutive crossings bound the spans, both ends rounded to pixels.
    rows_from = np.maximum(top, 0)
    spans = np.maximum(0, np.minimum(bottom, h) - rows_from)
    edge = np.repeat(np.arange(len(top)), spans)
    row = rows_from[edge] + (np.arange(spans.sum()) - np.repeat(np.cumsum(spans) - spans, spans))
    x = x_top[edge] + (row - top[edge]) * dx[edge]
    order = np.lexsort((x, row))
    row, x = row[order], x[order]
    _fill_spans(canvas, row[0::2], x[0::2] >> XY_SHIFT, x[1::2] >> XY_SHIFT)
    return canvas


def _poly_edge(size: tuple[int, int], a: list[int], b: list[int]) -> tuple[int, int, int, int] | None:
    """One polygon edge as OpenCV 4.8's ``CollectPolyEdges`` stores it for 8-connected filling:
    (first row, row after the last, x at the first row, x step per row), x in 16.16 fixed
    point offset by half a pixel (so that spans round to the nearest pixel); an edge leaving the
    canvas is re-based on its clipped line. None for a horizontal edge."""
    (ax, ay), (bx, by) = a, b
    if ay == by:
        return None
    w, h = size
    ca, cb = [ax << XY_SHIFT, ay], [bx << XY_SHIFT, by]
    if not (0 <= ax < w and 0 <= bx < w and 0 <= ay < h and 0 <= by < h):
        clipped = _clip_line_unchecked(size, (ax, ay), (bx, by))
        (tax, tay), (tbx, tby) = clipped
        if tay != tby:
            ca, cb = [tax << XY_SHIFT, tay], [tbx << XY_SHIFT, tby]
    else:
        ca[0] += XY_ONE >> 1
        cb[0] += XY_ONE >> 1
    dx = _cdiv(cb[0] - ca[0], cb[1] - ca[1])
    if ay < by:
        return ay, by, ca[0] + (ay - ca[1]) * dx, dx
    return by, ay, cb[0] + (by - cb[1]) * dx, dx


def _cdiv_array(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    q = np.abs(a) // np.abs(b)
    return np.where((a >= 0) == (b >= 0), q, -q)


def _fill_spans(canvas: np.ndarray, rows: np.ndarray, starts: np.ndarray,
                ends: np.ndarray) -> None:
    """Set canvas[row, start..end] (inclusive, clipped) for each span."""
    h, w = canvas.shape
    ok = (rows >= 0) & (rows < h) & (starts < w) & (ends >= 0) & (starts <= ends)
    rows, starts, ends = rows[ok], np.maximum(starts[ok], 0), np.minimum(ends[ok], w - 1)
    if rows.size == 0:
        return
    marks = np.zeros((h, w + 1), np.int32)
    np.add.at(marks, (rows, starts), 1)
    np.add.at(marks, (rows, ends + 1), -1)
    canvas |= np.cumsum(marks, axis=1)[:, :w] > 0


def quad_spans(size: tuple[int, int], quads: np.ndarray) -> tuple[np.ndarray, ...]:
    """The scanline spans (rows, first x, last x) of OpenCV's ``FillConvexPoly`` for Q convex
    quadrilaterals ((Q, 4, 2) 16.16 fixed-point vertices), all at once.

    As OpenCV walks it: from the top vertex (the first with the least y) one chain goes forward
    through the vertices and one backward; a chain's edge a → b (rows rounded to the nearest
    pixel, ``ta`` < ``tb``) covers rows ta … tb − 1 with x = x_a + (y − ta)·dx, where
    dx = (2·(x_b − x_a) + (tb − ta)) / (2·(tb − ta)) in C integer division; rows go from the top
    vertex's row to the row before the bottom vertex's (or the canvas's last row); both span
    ends are rounded to the nearest pixel.
    """
    w, h = size
    half = XY_ONE >> 1
    q = np.asarray(quads, np.int64).reshape(-1, 4, 2)
    x, y = q[..., 0], q[..., 1]
    rows_of = (y + half) >> XY_SHIFT
    top = np.argmin(y, axis=1)
    first = rows_of.min(axis=1)
    bottom = rows_of.max(axis=1)
    visible = ~(((x.max(1) + half) >> XY_SHIFT < 0) | (bottom < 0)
                | ((x.min(1) + half) >> XY_SHIFT >= w) | (first >= h))
    last = np.minimum(bottom - 1, h - 1)
    lo = np.maximum(first, 0)
    chains = []
    for direction in (1, 3):  # forward, backward (OpenCV's di = 1 and n − 1)
        order = (top[:, None] + direction * np.arange(4)[None, :]) % 4
        cx = np.take_along_axis(x, order, 1)
        crow = np.take_along_axis(rows_of, order, 1)
        ta, tb = crow[:, :-1], crow[:, 1:]
        xa, xb = cx[:, :-1], cx[:, 1:]
        down = tb > ta
        dx = _cdiv_array((xb - xa) * 2 + (tb - ta), np.where(down, 2 * (tb - ta), 1))
        quad = np.repeat(np.arange(len(q))[:, None], 3, 1)
        # rows of each edge, cut to the drawn rows
        r0 = np.maximum(ta, lo[:, None])
        r1 = np.minimum(tb, last[:, None] + 1)
        n = np.where(down & visible[:, None], np.maximum(0, r1 - r0), 0).ravel()
        edge = np.repeat(np.arange(n.size), n)
        row = np.repeat(r0.ravel(), n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        xs = xa.ravel()[edge] + (row - ta.ravel()[edge]) * dx.ravel()[edge]
        owner = quad.ravel()[edge]
        order_rows = np.lexsort((row, owner))
        chains.append((owner[order_rows], row[order_rows], xs[order_rows]))
    (_, rows, x0), (_, _, x1) = chains
    left, right = np.minimum(x0, x1), np.maximum(x0, x1)
    return rows, (left + half) >> XY_SHIFT, (right + half) >> XY_SHIFT


def _disc_offsets(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(dxs, dys) of OpenCV's filled ``Circle`` of integer ``radius`` (midpoint algorithm,
    horizontal spans)."""
    err, dx, dy, plus, minus = 0, radius, 0, 1, (radius << 1) - 1
    offsets = set()
    while dx >= dy:
        for row, half in ((dy, dx), (-dy, dx), (dx, dy), (-dx, dy)):
            for x in range(-half, half + 1):
                offsets.add((x, row))
        dy += 1
        err += plus
        plus += 2
        mask = -1 if err > 0 else 0
        err -= minus & mask
        dx += mask
        minus -= mask & 2
    pairs = np.array(sorted(offsets), np.int64)
    return pairs[:, 0], pairs[:, 1]


def draw_closed_polyline(shape: tuple[int, int], points: np.ndarray,
                         thickness: int) -> np.ndarray:
    """``cv2.drawContours(…, [points], -1, 1, thickness)`` on an H×W bool canvas. Thickness 1:
    every segment (closing one included) as an 8-connected line. Thicker: every segment as a
    quadrilateral of half-width
    (thickness + thickness mod 2) / 2 in 16.16 fixed point (OpenCV's ``ThickLine``: outline by
    ``Line2``, inside by ``FillConvexPoly``), and a filled disc of radius
    ⌊(thickness + 1) / 2⌋ at the end of each segment."""
    return in_box(shape, points, thickness + 2,
                  lambda box, pts: _draw_closed_polyline(box, pts, thickness))


def _draw_closed_polyline(shape: tuple[int, int], points: np.ndarray,
                          thickness: int) -> np.ndarray:
    h, w = shape
    canvas = np.zeros(shape, bool)
    pts = np.asarray(points, np.int64).reshape(-1, 2)
    if len(pts) == 0:
        return canvas
    if thickness <= 1:
        _paint(canvas, *lines((w, h), pts, np.roll(pts, -1, axis=0)))
        return canvas
    half = thickness << (XY_SHIFT - 1)
    widen = (thickness & 1) * XY_ONE * 0.5
    radius = (half + (XY_ONE >> 1)) >> XY_SHIFT
    a = pts << XY_SHIFT
    b = np.roll(pts, -1, axis=0) << XY_SHIFT
    along_x = (a[:, 0] - b[:, 0]) / XY_ONE
    along_y = (b[:, 1] - a[:, 1]) / XY_ONE
    length2 = along_x * along_x + along_y * along_y
    has_quad = np.abs(length2) > np.finfo(np.float64).eps
    scale = (half + widen) / np.sqrt(np.where(has_quad, length2, 1.0))
    offset = np.stack([np.rint(along_y * scale), np.rint(along_x * scale)], 1).astype(np.int64)
    quads = np.stack([a + offset, a - offset, b - offset, b + offset], 1)[has_quad]
    corners = quads.reshape(-1, 4, 2)
    xs, ys = lines2((w, h), corners.reshape(-1, 2),
                    np.roll(corners, 1, axis=1).reshape(-1, 2))
    _paint(canvas, xs, ys)
    rows, starts, ends = quad_spans((w, h), quads)
    _fill_spans(canvas, rows, starts, ends)
    disc_x, disc_y = _disc_offsets(radius)
    centres = (b + (XY_ONE >> 1)) >> XY_SHIFT
    _paint(canvas, (centres[:, 0, None] + disc_x).ravel(), (centres[:, 1, None] + disc_y).ravel())
    return canvas


def _cv_round(v: float) -> int:
    """``cvRound``: round half to even (the x86 conversion OpenCV uses)."""
    return int(np.rint(v))


# --------------------------------------------------------------------------- morphology


def dilate_square(mask: np.ndarray, size: int) -> np.ndarray:
    """``cv2.dilate(mask, np.ones((size, size)))``: the max over a size×size box centred on each
    pixel (anchor at size // 2); nothing outside the canvas counts."""
    ys, xs = np.nonzero(mask)
    return in_box(mask.shape, np.stack([xs, ys], 1), size,
                  lambda box, pts: _dilate(_place(box, pts), size))


def _place(shape: tuple[int, int], pts: np.ndarray) -> np.ndarray:
    canvas = np.zeros(shape, bool)
    canvas[pts[:, 1], pts[:, 0]] = True
    return canvas


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    out = mask.astype(bool)
    if size <= 1:
        return out.copy()
    before, after = size // 2, size - 1 - size // 2
    for axis in (0, 1):
        grown = out.copy()
        n = out.shape[axis]
        for shift in range(-after, before + 1):
            if shift == 0 or abs(shift) >= n:
                continue
            src = [slice(None)] * 2
            dst = [slice(None)] * 2
            if shift > 0:  # pixel i takes i − shift … (anchor before the centre)
                src[axis], dst[axis] = slice(0, n - shift), slice(shift, n)
            else:
                src[axis], dst[axis] = slice(-shift, n), slice(0, n + shift)
            grown[tuple(dst)] |= out[tuple(src)]
        out = grown
    return out
