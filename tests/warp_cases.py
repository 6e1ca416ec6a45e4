"""Masks and drags for the Inpaint4Drag warp tests, built without random numbers.

``tests/test_inpaint4drag_warp.py`` compares the engine's warp and its OpenCV-compatible raster
functions with values that OpenCV 4.8.0 and the official ``bi_warp`` (Visual-AI/Inpaint4Drag
@126ac0c) computed on exactly these inputs, written down in that test.
"""

from __future__ import annotations

import hashlib

import numpy as np


def disc(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r * r


def box(shape: tuple[int, int], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[y0:y1, x0:x1] = True
    return out


def star(shape: tuple[int, int], cx: float, cy: float, r: float, points: int = 5) -> np.ndarray:
    """A star-shaped region: radius r·(0.6 + 0.4·cos(points·θ)) around (cx, cy)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    angle = np.arctan2(yy - cy, xx - cx)
    radius = r * (0.6 + 0.4 * np.cos(points * angle))
    return (xx - cx) ** 2 + (yy - cy) ** 2 < radius ** 2


def ring(shape: tuple[int, int], cx: float, cy: float, r_out: float, r_in: float) -> np.ndarray:
    return disc(shape, cx, cy, r_out) & ~disc(shape, cx, cy, r_in)


def checker(shape: tuple[int, int], cell: int) -> np.ndarray:
    """Diagonal-touching squares: 8-connected into one component with many holes."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return ((yy // cell + xx // cell) % 2 == 0) & (yy < shape[0] - 2) & (xx < shape[1] - 3)


RASTER_MASKS = {
    "disc": lambda: disc((24, 30), 12.3, 11.6, 7.2),
    "two-blobs-and-a-pixel": lambda: disc((20, 26), 6, 6, 4.1) | box((20, 26), 14, 3, 22, 9)
    | box((20, 26), 3, 16, 4, 17),
    "ring-with-island": lambda: ring((28, 28), 13.5, 14, 11, 6) | disc((28, 28), 13.5, 14, 2.5),
    "star": lambda: star((40, 40), 19.5, 20.2, 16),
    "checker": lambda: checker((18, 21), 3),
    "edges": lambda: box((16, 16), 0, 0, 5, 16) | box((16, 16), 9, 10, 16, 16),
    "thin-diagonal": lambda: np.eye(12, 15, 2, dtype=bool) | np.eye(12, 15, 3, dtype=bool),
}

# Polygons (x, y) for fill and thick outline: inside the canvas, partly off it, degenerate.
POLYGONS = {
    "triangle": [(2, 3), (17, 8), (6, 19)],
    "concave": [(1, 1), (20, 2), (10, 9), (19, 18), (2, 16), (8, 9)],
    "off-canvas": [(-7, 4), (15, -6), (30, 12), (12, 26), (3, 14)],
    "segment": [(3, 10), (4, 12)],
    "self-crossing": [(2, 2), (18, 17), (18, 2), (2, 17)],
    "point": [(5, 6)],
}
POLYGON_CANVAS = (22, 24)  # H, W


def warp_cases() -> dict[str, tuple[np.ndarray, list, list, int]]:
    """name → (region mask, handles, targets, kernel), points as integer pixel indices (x, y)."""
    s = (48, 64)
    cases = {
        "one-pair-translation": (disc(s, 20, 22, 9), [(20, 22)], [(33, 27)]),
        "two-pairs-stretch": (box(s, 10, 12, 30, 30), [(12, 14), (28, 28)], [(8, 10), (40, 35)]),
        "two-regions": (disc(s, 14, 14, 7) | star(s, 45, 30, 12),
                        [(14, 14), (45, 30), (50, 30)], [(20, 10), (40, 36), (58, 33)]),
        "ring-pull": (ring(s, 30, 24, 14, 7), [(30, 11), (18, 24)], [(30, 4), (14, 24)]),
        "partly-off-canvas": (disc(s, 8, 40, 8), [(8, 40)], [(1, 46)]),
        "checker-many-holes": (checker(s, 4), [(1, 1), (30, 20)], [(5, 3), (34, 23)]),
    }
    out = {name: (*case, 5) for name, case in cases.items()}
    out["two-regions-kernel-1"] = (*cases["two-regions"], 1)
    out["ring-pull-kernel-0"] = (*cases["ring-pull"], 0)
    return out


def big_case() -> tuple[np.ndarray, list, list, int]:
    """A 512×512 drag of the size the official UI works at: two regions, four pairs."""
    s = (512, 512)
    mask = star(s, 180.5, 200.25, 90) | disc(s, 390, 380, 55)
    handles = [(180, 200), (215, 190), (175, 212), (390, 380)]
    targets = [(215, 230), (280, 190), (150, 300), (350, 420)]
    return mask, handles, targets, 5


def digest(array: np.ndarray) -> str:
    """sha256 of an array's shape, dtype kind and bytes (int64 for integers, packed bits for
    masks), the first 16 hex digits."""
    a = np.asarray(array)
    if a.dtype == bool:
        payload = np.packbits(a).tobytes()
    else:
        payload = a.astype(np.int64).tobytes()
    head = f"{a.shape}{a.dtype.kind}".encode()
    return hashlib.sha256(head + payload).hexdigest()[:16]
