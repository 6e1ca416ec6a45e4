"""Real photographs for training and evaluating the demo model, read from scikit-image's wheel.

Nothing is downloaded: only images that ship inside the installed ``scikit-image`` package are
used (scikit-image is a development/training dependency, see ``requirements/dev.txt``).

The set is split once, by name: ``TRAIN_PHOTOS`` are seen in training, ``HELD_OUT_PHOTOS`` never
are (reconstruction targets and the quality bench's real-photo cases use only those).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

# Colour photographs and colour/grey textures used for training (grey ones are colourised by
# the augmentation, so they add structure, not a grey bias).
TRAIN_PHOTOS = (
    "astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "logo", "camera", "brick", "grass", "gravel", "coins", "moon", "page", "text",
    "clock", "cell",
)
# Never used in training: a cat portrait and both views of the Middlebury motorcycle stereo pair.
HELD_OUT_PHOTOS = ("chelsea", "motorcycle_left", "motorcycle_right")


def _require_skimage():
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the demo model's photographs come from scikit-image's wheel; install the "
            "development requirements: pip install -c requirements/constraints.txt scikit-image"
        ) from exc
    return skimage.data


@functools.cache
def load(name: str) -> np.ndarray:
    """An H×W×3 uint8 RGB photograph by name (grey images are replicated to three channels;
    the logo's transparency is composited over white)."""
    data = _require_skimage()
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = stereo_pair()
        return left if name == "motorcycle_left" else right
    img = np.asarray(getattr(data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.shape[-1] == 4:
        a = img[..., 3:].astype(np.float64) / 255
        img = np.rint(img[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    return np.ascontiguousarray(img.astype(np.uint8))


@functools.cache
def stereo_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left, right, disparity): the motorcycle pair and its ground-truth disparity (float32,
    left-view pixels; ``inf``/``nan`` where unknown). A left pixel at column x shows the same
    point as the right pixel at column x − disparity."""
    left, right, disp = _require_skimage().stereo_motorcycle()
    return (np.ascontiguousarray(left), np.ascontiguousarray(right),
            np.asarray(disp, dtype=np.float32))


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an H×W×3 uint8 image to (w, h) with an antialiased bicubic filter."""
    if (img.shape[1], img.shape[0]) == tuple(size):
        return img
    return np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC, reducing_gap=None))


def fit_long_side(img: np.ndarray, long_side: int) -> np.ndarray:
    """``img`` resized so its long side is ``long_side`` (aspect kept)."""
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    return resize(img, (max(1, round(w * s)), max(1, round(h * s))))


def random_crop(rng: np.random.Generator, img: np.ndarray, size: int, long_lo: float = 160,
                long_hi: float = 1024) -> np.ndarray:
    """A ``size``² crop of ``img`` seen at a random scale: the photo's long side is drawn
    log-uniformly in [long_lo, long_hi] px (above its native size the crop is upsampled, i.e.
    blurrier), never smaller than the crop."""
    h, w = img.shape[:2]
    long_side = math.exp(rng.uniform(math.log(long_lo), math.log(long_hi)))
    scale = max(long_side / max(h, w), size / min(h, w))
    src = size / scale  # crop side in source pixels
    x0 = rng.uniform(0, max(0.0, w - src))
    y0 = rng.uniform(0, max(0.0, h - src))
    box = (x0, y0, min(w, x0 + src), min(h, y0 + src))
    out = Image.fromarray(img).resize((size, size), Image.BICUBIC, box=box, reducing_gap=None)
    return np.asarray(out)


def augment(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Flips, 90° turns, a random channel order, and for grey images a random two-colour map."""
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = np.rot90(img, int(rng.integers(4)))
    if np.ptp(img.astype(np.int16), axis=-1).max() < 4:  # grey: map black/white to two colours
        g = img[..., :1].astype(np.float64) / 255
        lo, hi = rng.uniform(0, 0.45, 3), rng.uniform(0.55, 1.0, 3)
        if rng.random() < 0.5:
            lo, hi = hi, lo
        img = np.rint(255 * (lo + g * (hi - lo))).astype(np.uint8)
    else:
        img = img[..., rng.permutation(3)]
    return np.ascontiguousarray(img)
