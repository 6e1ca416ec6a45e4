"""Training and evaluation images for the demo model: photo crops and shapes in random colours.

A training image is one of: a crop of a training photograph at a random scale; a procedural
shape scene in random colours (flat, gradient or textured background, optionally upsampled so
soft edges are seen too); or shapes pasted over a photo crop. Shape and background colours avoid
one hue band (``HELD_OUT_HUES``, purple to magenta), so evaluation shapes coloured from that band
are in colours the model never saw as a shape or background colour.

Every batch is a pure function of its seed.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch

from backend.demo import photos, shapes

# Hue band (degrees) never used for a shape or background colour in training.
HELD_OUT_HUES = (265.0, 325.0)
# Below this HSV saturation a colour counts as grey (its hue is invisible), so it is allowed.
GREY_SATURATION = 0.15
# Mix of training images: photo crop, shape scene, shapes over a photo crop.
MIX = (0.45, 0.3, 0.25)


def _in_band(hue_deg: float) -> bool:
    lo, hi = HELD_OUT_HUES
    return lo <= hue_deg <= hi


def random_color(rng: np.random.Generator, held_out: bool = False) -> tuple[float, float, float]:
    """An RGB colour in [0, 1]: outside the held-out hue band (training) or inside it."""
    while True:
        s = float(rng.uniform(0, 1)) ** 0.7
        v = float(rng.uniform(0.08, 1.0))
        if held_out:
            h = float(rng.uniform(*HELD_OUT_HUES))
            s = max(s, 0.35)
        else:
            h = float(rng.uniform(0, 360))
            if s > GREY_SATURATION and _in_band(h):
                continue
        return colorsys.hsv_to_rgb(h / 360, s, v)


def is_held_out_color(rgb: tuple[float, float, float]) -> bool:
    h, s, _ = colorsys.rgb_to_hsv(*rgb)
    return s > GREY_SATURATION and _in_band(h * 360)


def color_name(rgb: tuple[float, float, float]) -> str:
    """The nearest palette name (for captions)."""
    c = np.asarray(rgb)
    return min(shapes.PALETTE, key=lambda n: float(np.sum((np.asarray(shapes.PALETTE[n]) - c) ** 2)))


def random_background(rng: np.random.Generator, held_out: bool = False) -> shapes.Background:
    kind = ("plain", "gradient", "texture")[rng.choice(3, p=[0.35, 0.35, 0.3])]
    c1, c2 = random_color(rng, held_out), random_color(rng, held_out)
    return shapes.Background(kind=kind, color=c1, color2=c2, angle=float(rng.uniform(0, 2 * math.pi)),
                             period=float(rng.uniform(8, 32)),
                             amplitude=float(rng.uniform(0.04, 0.2)) if kind == "texture" else 0.0)


def random_shape(rng: np.random.Generator, center: tuple[float, float], radius: float,
                 held_out: bool = False) -> shapes.Shape:
    kind = shapes.KINDS[rng.integers(len(shapes.KINDS))]
    c1 = random_color(rng, held_out)
    c2 = random_color(rng, held_out) if rng.random() < 0.35 else None
    fill = shapes.Fill(color=c1, color2=c2, angle=float(rng.uniform(0, 2 * math.pi)))
    verts = None
    if kind != "disc":
        verts = shapes.regular_polygon(kind, center, radius, float(rng.uniform(0, 2 * math.pi)))
    return shapes.Shape(kind=kind, name=color_name(c1), center=center, radius=radius, fill=fill,
                        vertices=verts)


def random_scene(rng: np.random.Generator, size: int = shapes.SIZE,
                 held_out: bool = False) -> shapes.Scene:
    """One to four shapes (they may overlap) on a random background, colours from the training
    hues or, with ``held_out``, only from the held-out band."""
    bg = random_background(rng, held_out)
    n = int(rng.integers(1, 5))
    out = []
    for _ in range(n):
        r = float(rng.uniform(0.05, 0.28) * size)
        c = (float(rng.uniform(0, size)), float(rng.uniform(0, size)))
        out.append(random_shape(rng, c, r, held_out))
    return shapes.Scene(background=bg, shapes=tuple(out), size=size)


def _shapes_over(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """Random shapes composited over an H×W×3 uint8 background."""
    size = background.shape[0]
    scene = random_scene(rng, size)
    out = background.astype(np.float64)
    for shape in scene.shapes:
        col, a = shapes.shape_layer(shape, (0, 0, size, size), 2)
        out = out * (1 - a[..., None]) + col * 255.0
    return shapes.quantize(out)


def training_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """One size×size uint8 training image and its caption."""
    kind = rng.choice(3, p=MIX)
    if kind == 1:
        render = size * int(rng.choice([1, 1, 2]))  # sometimes render larger and crop
        up = rng.random() < 0.3  # or render smaller and upsample (soft edges)
        if up:
            render = max(32, size // 2)
        scene = random_scene(rng, render)
        img = shapes.render(scene, ss=2)
        if up:
            img = photos.resize(img, (size, size))
        elif render > size:
            x0, y0 = (int(v) for v in rng.integers(0, render - size + 1, 2))
            img = img[y0:y0 + size, x0:x0 + size]
        return np.ascontiguousarray(img), scene.caption()
    name = photos.TRAIN_PHOTOS[rng.integers(len(photos.TRAIN_PHOTOS))]
    crop = photos.augment(rng, photos.random_crop(rng, photos.load(name), size))
    if kind == 0:
        return crop, "a photo"
    return _shapes_over(rng, crop), "a photo with shapes"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """N×H×W×3 uint8 → (N, 3, H, W) float in [-1, 1]."""
    # a copy: the photographs come read-only from their cache, and torch warns on those
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → N×H×W×3 uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def training_batch(seed: int, n: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` training images as a [-1, 1] tensor (n, 3, size, size) and their captions."""
    rng = np.random.default_rng(seed)
    items = [training_image(rng, size) for _ in range(n)]
    return to_tensor(np.stack([i for i, _ in items])), [c for _, c in items]


# ---------------------------------------------------------------- held-out evaluation sets


def held_out_photos(long_side: int = 256) -> dict[str, np.ndarray]:
    """The held-out photographs at working size (long side ``long_side``, sides multiples of 8)."""
    out = {}
    for name in ("chelsea", "motorcycle_left"):
        img = photos.fit_long_side(photos.load(name), long_side)
        h, w = (img.shape[0] // 8) * 8, (img.shape[1] // 8) * 8
        out[name] = np.ascontiguousarray(img[:h, :w])
    return out


def unseen_color_scenes(n: int, seed: int = 777, size: int = shapes.SIZE) -> list[np.ndarray]:
    """``n`` shape scenes whose shape and background colours all lie in the held-out hue band."""
    rng = np.random.default_rng(seed)
    return [shapes.render(random_scene(rng, size, held_out=True)) for _ in range(n)]
