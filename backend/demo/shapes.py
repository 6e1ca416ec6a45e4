"""Procedural shape scenes and ground-truth drag cases.

Everything is rendered analytically with supersampled anti-aliasing, so an image is a pure
function of its ``Scene``. A drag case stores the scene before and after the edit; its correct
result is the rendering of the "after" scene, exactly.

Coordinates follow the engine: (x, y) in image pixels, (0, 0) is the top-left corner of the
top-left pixel, pixel (i, j) covers [j, j+1) × [i, i+1).

(Over 450 lines: the scenes and the drag cases made of them stay together, because a case's
answer and its masks are computed from the same analytic shapes and coverage as the image.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

SIZE = 128
SUPERSAMPLE = 4

# name → RGB in [0, 1]; the names appear in captions.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12),
    "green": (0.15, 0.65, 0.2),
    "blue": (0.15, 0.3, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "orange": (0.95, 0.5, 0.1),
    "purple": (0.55, 0.2, 0.7),
    "cyan": (0.1, 0.75, 0.8),
    "pink": (0.95, 0.5, 0.7),
    "white": (0.97, 0.97, 0.97),
    "black": (0.08, 0.08, 0.08),
}
KINDS = ("disc", "square", "triangle", "star", "pentagon", "hexagon")


@dataclass(frozen=True)
class Fill:
    """Solid colour, or a linear gradient from ``color`` to ``color2`` across the shape."""

    color: tuple[float, float, float]
    color2: tuple[float, float, float] | None = None
    angle: float = 0.0


@dataclass(frozen=True)
class Shape:
    """A disc (``vertices`` is None) or a polygon; ``center``/``radius`` anchor the fill."""

    kind: str
    name: str  # colour name for captions
    center: tuple[float, float]
    radius: float
    fill: Fill
    vertices: tuple[tuple[float, float], ...] | None = None

    def translated(self, dx: float, dy: float) -> Shape:
        verts = None
        if self.vertices is not None:
            verts = tuple((x + dx, y + dy) for x, y in self.vertices)
        return dataclasses.replace(
            self, center=(self.center[0] + dx, self.center[1] + dy), vertices=verts
        )

    def with_vertex(self, index: int, point: tuple[float, float]) -> Shape:
        """The same polygon with one vertex moved (the fill anchor stays)."""
        assert self.vertices is not None
        verts = list(self.vertices)
        verts[index] = point
        return dataclasses.replace(self, vertices=tuple(verts))

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) enclosing the shape."""
        if self.vertices is None:
            cx, cy = self.center
            return cx - self.radius, cy - self.radius, cx + self.radius, cy + self.radius
        v = np.asarray(self.vertices)
        return float(v[:, 0].min()), float(v[:, 1].min()), float(v[:, 0].max()), float(
            v[:, 1].max()
        )


@dataclass(frozen=True)
class Background:
    """``plain``, ``gradient`` (color → color2 along angle) or ``texture`` (sinusoid on color)."""

    kind: str
    color: tuple[float, float, float]
    color2: tuple[float, float, float] = (0.0, 0.0, 0.0)
    angle: float = 0.0
    period: float = 16.0
    amplitude: float = 0.0


@dataclass(frozen=True)
class Scene:
    background: Background
    shapes: tuple[Shape, ...] = field(default_factory=tuple)
    size: int = SIZE

    def caption(self) -> str:
        return " and ".join(f"a {s.name} {s.kind}" for s in self.shapes)


def regular_polygon(
    kind: str, center: tuple[float, float], radius: float, rotation: float
) -> tuple[tuple[float, float], ...]:
    """Vertices (clockwise on screen) of a square, triangle, pentagon, hexagon or 5-point star."""
    cx, cy = center
    if kind == "star":
        pts = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            a = rotation + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return tuple(pts)
    n = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[kind]
    return tuple(
        (cx + radius * math.cos(rotation + 2 * math.pi * k / n),
         cy + radius * math.sin(rotation + 2 * math.pi * k / n))
        for k in range(n)
    )


def _inside_polygon(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(verts)
    for k in range(n):
        x1, y1 = verts[k]
        x2, y2 = verts[(k + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > y) != (y2 > y)
        xint = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < xint)
    return inside


def _sample_grid(x0: int, y0: int, x1: int, y1: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Subsample positions for pixels [x0, x1) × [y0, y1): arrays (h, w, ss*ss)."""
    offs = (np.arange(ss) + 0.5) / ss
    xs = np.arange(x0, x1)[:, None] + offs[None, :]  # (w, ss)
    ys = np.arange(y0, y1)[:, None] + offs[None, :]  # (h, ss)
    h, w = y1 - y0, x1 - x0
    gx = np.broadcast_to(xs[None, :, None, :], (h, w, ss, ss)).reshape(h, w, ss * ss)
    gy = np.broadcast_to(ys[:, None, :, None], (h, w, ss, ss)).reshape(h, w, ss * ss)
    return gx, gy


def shape_layer(
    shape: Shape, window: tuple[int, int, int, int], ss: int = SUPERSAMPLE
) -> tuple[np.ndarray, np.ndarray]:
    """Premultiplied colour (h, w, 3) and coverage (h, w) of ``shape`` in pixel ``window``.

    ``window`` is (x0, y0, x1, y1) in integer pixels.
    """
    x0, y0, x1, y1 = window
    h, w = y1 - y0, x1 - x0
    color = np.zeros((h, w, 3))
    alpha = np.zeros((h, w))
    bx0, by0, bx1, by1 = shape.bbox()
    sx0, sy0 = max(x0, math.floor(bx0)), max(y0, math.floor(by0))
    sx1, sy1 = min(x1, math.ceil(bx1) + 1), min(y1, math.ceil(by1) + 1)
    if sx0 >= sx1 or sy0 >= sy1:
        return color, alpha
    gx, gy = _sample_grid(sx0, sy0, sx1, sy1, ss)
    if shape.vertices is None:
        cx, cy = shape.center
        inside = (gx - cx) ** 2 + (gy - cy) ** 2 <= shape.radius**2
    else:
        inside = _inside_polygon(gx, gy, np.asarray(shape.vertices, dtype=np.float64))
    cov = inside.mean(axis=-1)
    c1 = np.asarray(shape.fill.color)
    if shape.fill.color2 is None:
        col = cov[..., None] * c1
    else:
        ux, uy = math.cos(shape.fill.angle), math.sin(shape.fill.angle)
        t = ((gx - shape.center[0]) * ux + (gy - shape.center[1]) * uy) / (2 * shape.radius)
        t = np.clip(t + 0.5, 0.0, 1.0) * inside
        tmean = t.sum(axis=-1) / (ss * ss)  # premultiplied
        c2 = np.asarray(shape.fill.color2)
        col = cov[..., None] * c1 + tmean[..., None] * (c2 - c1)
    sl = (slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0))
    color[sl] = col
    alpha[sl] = cov
    return color, alpha


def render_background(bg: Background, window: tuple[int, int, int, int]) -> np.ndarray:
    """Background colour (h, w, 3) in [0, 1] at pixel centres of ``window``."""
    x0, y0, x1, y1 = window
    xs = np.arange(x0, x1) + 0.5
    ys = np.arange(y0, y1) + 0.5
    gx, gy = np.meshgrid(xs, ys)
    c1 = np.asarray(bg.color)
    ux, uy = math.cos(bg.angle), math.sin(bg.angle)
    if bg.kind == "plain":
        return np.broadcast_to(c1, (*gx.shape, 3)).copy()
    if bg.kind == "gradient":
        t = np.clip((gx - SIZE / 2) * ux / SIZE + (gy - SIZE / 2) * uy / SIZE + 0.5, 0, 1)
        return c1 + t[..., None] * (np.asarray(bg.color2) - c1)
    wave = np.sin(2 * math.pi * (gx * ux + gy * uy) / bg.period) * np.sin(
        2 * math.pi * (-gx * uy + gy * ux) / (bg.period * 1.7)
    )
    return np.clip(c1 + bg.amplitude * wave[..., None], 0, 1)


def render_float(
    scene: Scene,
    window: tuple[int, int, int, int] | None = None,
    ss: int = SUPERSAMPLE,
) -> np.ndarray:
    """Scene as float RGB in [0, 255] (unquantised) inside ``window`` (default: whole image)."""
    window = window or (0, 0, scene.size, scene.size)
    out = render_background(scene.background, window)
    for shape in scene.shapes:
        col, a = shape_layer(shape, window, ss)
        out = out * (1 - a[..., None]) + col
    return out * 255.0


def render(scene: Scene, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Scene as an H×W×3 uint8 image."""
    return quantize(render_float(scene, ss=ss))


def quantize(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def coverage(scene: Scene, index: int, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage (H, W) in [0, 1] of shape ``index`` alone."""
    return shape_layer(scene.shapes[index], (0, 0, scene.size, scene.size), ss)[1]


# ---------------------------------------------------------------- random scenes


def _color(rng: np.random.Generator, avoid: tuple[float, float, float] | None = None):
    names = list(PALETTE)
    while True:
        name = names[rng.integers(len(names))]
        base = np.asarray(PALETTE[name])
        if avoid is None or np.abs(base - np.asarray(avoid)).max() > 0.35:
            jitter = rng.uniform(-0.05, 0.05, 3)
            return name, tuple(float(v) for v in np.clip(base + jitter, 0, 1))


def random_background(rng: np.random.Generator) -> Background:
    """A muted plain, gradient or textured background."""
    kind = ("plain", "gradient", "texture")[rng.choice(3, p=[0.4, 0.3, 0.3])]
    gray = rng.uniform(0.3, 0.8)
    tint = rng.uniform(-0.12, 0.12, 3)
    c1 = tuple(float(v) for v in np.clip(gray + tint, 0, 1))
    c2 = tuple(float(v) for v in np.clip(gray + rng.uniform(-0.25, 0.25) + tint[::-1], 0, 1))
    return Background(
        kind=kind,
        color=c1,
        color2=c2,
        angle=float(rng.uniform(0, 2 * math.pi)),
        period=float(rng.uniform(12, 28)),
        amplitude=float(rng.uniform(0.04, 0.1)) if kind == "texture" else 0.0,
    )


def random_shape(
    rng: np.random.Generator,
    center: tuple[float, float],
    radius: float,
    background: Background,
    kind: str | None = None,
    gradient: bool | None = None,
) -> Shape:
    kind = kind or KINDS[rng.integers(len(KINDS))]
    name, c1 = _color(rng, avoid=background.color)
    if gradient is None:
        gradient = bool(rng.random() < 0.35)
    c2 = None
    if gradient:
        shade = rng.uniform(0.35, 0.6) * (1 if rng.random() < 0.5 else -1)
        c2 = tuple(float(v) for v in np.clip(np.asarray(c1) + shade, 0, 1))
    fill = Fill(color=c1, color2=c2, angle=float(rng.uniform(0, 2 * math.pi)))
    verts = None
    if kind != "disc":
        verts = regular_polygon(kind, center, radius, float(rng.uniform(0, 2 * math.pi)))
    return Shape(kind=kind, name=name, center=center, radius=radius, fill=fill, vertices=verts)


def _fits(center, radius, placed, size, margin=2.0) -> bool:
    cx, cy = center
    if not (radius <= cx <= size - radius and radius <= cy <= size - radius):
        return False
    return all(
        math.hypot(cx - px, cy - py) > radius + pr + margin for (px, py), pr in placed
    )


def random_scene(rng: np.random.Generator, size: int = SIZE) -> Scene:
    """One to three non-overlapping shapes on a random background (training data)."""
    bg = random_background(rng)
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    placed: list[tuple[tuple[float, float], float]] = []
    shapes: list[Shape] = []
    for _ in range(60):
        if len(shapes) == n:
            break
        r = float(rng.uniform(8, 30))
        c = (float(rng.uniform(r, size - r)), float(rng.uniform(r, size - r)))
        if _fits(c, r, placed, size):
            placed.append((c, r))
            shapes.append(random_shape(rng, c, r, bg))
    return Scene(background=bg, shapes=tuple(shapes), size=size)


# ---------------------------------------------------------------- ground-truth drag cases


@dataclass(frozen=True)
class Motion:
    """What one handle→target pair does: translate a shape, or move one polygon vertex."""

    shape: int
    vertex: int | None = None  # None: translate the whole shape


@dataclass
class DragCase:
    name: str
    before: Scene
    after: Scene
    handles: list[tuple[float, float]]
    targets: list[tuple[float, float]]
    motions: list[Motion]
    image: np.ndarray
    correct: np.ndarray
    mask: np.ndarray

    @property
    def prompt(self) -> str:
        return self.before.caption()

    @property
    def region(self) -> np.ndarray:
        """The region that moves (Inpaint4Drag's selection), from the ground truth: every pixel
        a dragged shape covers at all, as uint8 0/255."""
        moving = np.zeros(self.image.shape[:2], bool)
        for index in {m.shape for m in self.motions}:
            moving |= coverage(self.before, index) > 0
        return moving.astype(np.uint8) * 255


def apply_motion(shape: Shape, motion: Motion, handle, point) -> Shape:
    """``shape`` with its handle moved to ``point`` (translation or vertex move)."""
    if motion.vertex is None:
        return shape.translated(point[0] - handle[0], point[1] - handle[1])
    return shape.with_vertex(motion.vertex, (float(point[0]), float(point[1])))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2r+1)² disc, no SciPy."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy > radius * radius:
                continue
            src = mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
            out[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)] |= src
    return out


def swept_mask(
    shape: Shape, motion: Motion, handle, target, size: int, margin: int = 4
) -> np.ndarray:
    """Boolean mask of the area the shape sweeps from handle to target, dilated by ``margin``."""
    dist = math.hypot(target[0] - handle[0], target[1] - handle[1])
    n = max(2, int(dist / 2) + 2)
    area = np.zeros((size, size), dtype=bool)
    for s in np.linspace(0.0, 1.0, n):
        p = (handle[0] + s * (target[0] - handle[0]), handle[1] + s * (target[1] - handle[1]))
        moved = apply_motion(shape, motion, handle, p)
        area |= shape_layer(moved, (0, 0, size, size), ss=2)[1] > 0
    return dilate(area, margin)


def _unit(angle: float) -> tuple[float, float]:
    return math.cos(angle), math.sin(angle)


def _half(v: float) -> float:
    """Round to the nearest pixel centre (integer + 0.5)."""
    return math.floor(v) + 0.5


CASE_KINDS = (
    "translate-small",
    "translate-large",
    "two-shapes",
    "stretch-vertex",
    "near-border",
    "mask-excludes-similar",
)


def _try_case(kind: str, rng: np.random.Generator, size: int) -> DragCase | None:
    bg = random_background(rng)
    shapes: list[Shape] = []
    handles, targets, motions = [], [], []
    placed: list[tuple[tuple[float, float], float]] = []

    def add_translate(radius: float, dist: float, center=None, direction=None) -> bool:
        c = center or (_half(rng.uniform(radius, size - radius)),
                       _half(rng.uniform(radius, size - radius)))
        a = direction if direction is not None else rng.uniform(0, 2 * math.pi)
        ux, uy = _unit(a)
        t = (c[0] + round(dist * ux), c[1] + round(dist * uy))
        if t == c or not (_fits(c, radius, placed, size) and _fits(t, radius, placed, size)):
            return False
        placed.extend([(c, radius), (t, radius)])
        shape = random_shape(rng, c, radius, bg)
        shapes.append(shape)
        handles.append(c)
        targets.append(t)
        motions.append(Motion(len(shapes) - 1))
        return True

    if kind == "translate-small":
        ok = add_translate(float(rng.uniform(10, 18)), float(rng.uniform(6, 10)))
    elif kind == "translate-large":
        ok = add_translate(float(rng.uniform(10, 16)), float(rng.uniform(26, 40)))
    elif kind == "two-shapes":
        ok = add_translate(float(rng.uniform(9, 14)), float(rng.uniform(10, 20)))
        ok = ok and add_translate(float(rng.uniform(9, 14)), float(rng.uniform(10, 20)))
    elif kind == "near-border":
        r = float(rng.uniform(10, 15))
        side = int(rng.integers(4))
        along = _half(rng.uniform(r + 4, size - r - 4))
        edge = _half(r + rng.uniform(0, 3))
        c = [(edge, along), (size - edge, along), (along, edge), (along, size - edge)][side]
        # drag along the border or inward
        direction = [0.0, math.pi, math.pi / 2, -math.pi / 2][side] + rng.uniform(-0.4, 0.4)
        if rng.random() < 0.5:
            direction += math.pi / 2 * (1 if rng.random() < 0.5 else -1)
        ok = add_translate(r, float(rng.uniform(10, 20)), center=c, direction=direction)
        if ok:
            # put the handle on the shape's border-side edge, within a few px of the border
            c = handles[0]
            n = [(-1, 0), (1, 0), (0, -1), (0, 1)][side]
            h = (c[0] + n[0] * (r - 3), c[1] + n[1] * (r - 3))
            d = (targets[0][0] - c[0], targets[0][1] - c[1])
            handles[0] = h
            targets[0] = (h[0] + d[0], h[1] + d[1])
    elif kind == "stretch-vertex":
        r = float(rng.uniform(14, 22))
        c = (_half(rng.uniform(r + 20, size - r - 20)), _half(rng.uniform(r + 20, size - r - 20)))
        poly_kind = ("square", "triangle", "pentagon")[rng.integers(3)]
        shape = random_shape(rng, c, r, bg, kind=poly_kind, gradient=False)
        assert shape.vertices is not None
        vi = int(rng.integers(len(shape.vertices)))
        vx, vy = shape.vertices[vi]
        out = math.atan2(vy - c[1], vx - c[0]) + rng.uniform(-0.5, 0.5)
        dist = float(rng.uniform(10, 18))
        h = (_half(vx), _half(vy))
        shape = shape.with_vertex(vi, h)
        t = (h[0] + round(dist * math.cos(out)), h[1] + round(dist * math.sin(out)))
        ok = 2 <= t[0] <= size - 2 and 2 <= t[1] <= size - 2
        shapes.append(shape)
        placed.append((c, r + dist))
        handles.append(h)
        targets.append(t)
        motions.append(Motion(0, vi))
    elif kind == "mask-excludes-similar":
        ok = add_translate(float(rng.uniform(10, 14)), float(rng.uniform(12, 20)))
        if ok:
            twin = shapes[0]
            for _ in range(50):
                c2 = (_half(rng.uniform(twin.radius, size - twin.radius)),
                      _half(rng.uniform(twin.radius, size - twin.radius)))
                if _fits(c2, twin.radius, placed, size, margin=10):
                    shapes.append(twin.translated(c2[0] - twin.center[0], c2[1] - twin.center[1]))
                    break
            ok = len(shapes) == 2
    else:
        raise ValueError(kind)
    if not ok:
        return None
    before = Scene(background=bg, shapes=tuple(shapes), size=size)
    moved = list(shapes)
    mask = np.zeros((size, size), dtype=bool)
    for h, t, m in zip(handles, targets, motions, strict=True):
        moved[m.shape] = apply_motion(moved[m.shape], m, h, t)
        mask |= swept_mask(shapes[m.shape], m, h, t, size)
    after = Scene(background=bg, shapes=tuple(moved), size=size)
    static = [i for i in range(len(shapes)) if i not in {m.shape for m in motions}]
    for i in static:
        if (mask & (coverage(before, i, ss=2) > 0)).any():
            return None
    return DragCase(
        name=kind,
        before=before,
        after=after,
        handles=[(float(x), float(y)) for x, y in handles],
        targets=[(float(x), float(y)) for x, y in targets],
        motions=motions,
        image=render(before),
        correct=render(after),
        mask=(mask * 255).astype(np.uint8),
    )


def make_cases(n: int = len(CASE_KINDS), seed: int = 0, size: int = SIZE) -> list[DragCase]:
    """``n`` drag cases cycling through ``CASE_KINDS``, fully determined by ``seed``."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        kind = CASE_KINDS[i % len(CASE_KINDS)]
        case = None
        while case is None:
            case = _try_case(kind, rng, size)
        case.name = f"{i:02d}-{kind}"
        cases.append(case)
    return cases
