"""Scene -> image (uint8 [H, W, 3]), exact and alias-free, plus the degradations generative
editors show (blur, noise, colour shift, soft edges) used to test the judge's robustness."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from .scene import BACKGROUNDS, COLORS, HOLE_SCALE, Geometry, Obj, Scene

_INRADIUS_TRI = 2.0 / (1.0 + 5 ** 0.5)  # inradius / half-size of our isosceles triangle


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixel-centre offsets (dx, dy) from the shape's box centre -> inside mask."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2.0)
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, fill: str, r: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    m = _inside(shape, dx, dy, r)
    if fill == "hollow":
        # hole = same shape scaled by HOLE_SCALE about its inner centre (incentre for triangles)
        oy = r * (1 - _INRADIUS_TRI) if shape == "triangle" else 0.0
        s = HOLE_SCALE
        hole = _inside(shape, dx / s, (dy - oy) / s + oy, r)
        m &= ~hole
    return m


@lru_cache(maxsize=64)
def _grid(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:canvas, 0:canvas].astype(np.float64) + 0.5
    return xs, ys


def object_mask(obj: Obj, geom: Geometry) -> np.ndarray:
    """[H, W] bool mask of one object on the canvas."""
    xs, ys = _grid(geom.canvas)
    cx, cy = geom.center(obj.cell)
    return shape_mask(obj.shape, obj.fill, geom.half(obj.size), xs - cx, ys - cy)


def render(scene: Scene) -> np.ndarray:
    """[H, W, 3] uint8."""
    geom = scene.geometry
    img = np.empty((geom.canvas, geom.canvas, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        img[object_mask(o, geom)] = COLORS[o.color]
    return img


def blend_object(img: np.ndarray, obj: Obj, geom: Geometry, alpha: float) -> np.ndarray:
    """Alpha-blend one object over an image (a faint 'ghost' when alpha is small)."""
    out = img.astype(np.float32)
    m = object_mask(obj, geom)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(COLORS[obj.color], np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def degrade(img: np.ndarray, rng: np.random.Generator, blur: tuple[float, float] = (0.3, 0.8),
            noise: float = 0.05, shift: float = 0.03) -> np.ndarray:
    """Mild blur (soft edges), a small per-channel colour shift and Gaussian noise (std on [0, 1])."""
    x = img.astype(np.float32) / 255.0
    sigma = rng.uniform(*blur)
    x = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest")
    x = x + rng.uniform(-shift, shift, size=(1, 1, 3)).astype(np.float32)
    x = x + rng.normal(0.0, noise, size=x.shape).astype(np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def save_png(img: np.ndarray, path) -> None:
    Image.fromarray(img, "RGB").save(path, format="PNG", optimize=False, compress_level=6)


def load_png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
