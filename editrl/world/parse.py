"""Image -> detected objects, background and unexplained residue.

1. Every pixel is snapped to the nearest palette colour.
2. The background is the most common colour of the border ring (always empty by geometry).
3. Each pixel goes to the background->colour blend line (of the object colours present in
   the image) it lies closest to, and to that colour past the line's midpoint, so a blurred
   thin stroke stays with its own colour and never reads as a third one;
   per colour, 8-connected components of at least `min_area` px are objects. Shape
   and size come from the best IoU of the hole-filled component against the solid
   template of each (shape, size) placed at the component's bounding-box centre (never the
   centroid: a triangle's centroid sits below its box centre); fill from the mean colour
   level inside the template's hole (solid near 1, hollow well below); the cell is the one holding
   the box centre, and an object far from every cell centre is off-grid (cell None).
4. Residue: palette snapping lets a faint leftover (a "ghost" of a removed or moved
   object) pass as background, so the parser also measures each pixel's distance to the
   image's own background colour (median, so colour shifts cancel), with the difference smoothed
   over 3x3 to average out noise; blobs above a threshold away from detected objects are residue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .render import shape_mask
from .scene import BACKGROUNDS, COLORS, SHAPES, SIZES, Geometry

PALETTE_NAMES: tuple[str, ...] = tuple(COLORS) + tuple(BACKGROUNDS)
N_OBJ_COLORS = len(COLORS)
_PALETTE = np.asarray([*COLORS.values(), *BACKGROUNDS.values()], np.float32)  # [P, 3]

RESIDUE_THRESHOLD = 0.08   # smoothed RGB distance (on [0, 1]) that counts as residue
TEXTURE_THRESHOLD = 0.06   # smoothed distance that counts against graded CC's pixel term
MIN_IOU = 0.5              # below this the shape is unknown
PRESENT_DISTANCE = 0.25    # RGB distance (on [0, 1]) of a pixel that vouches for its colour
PRESENT_MIN_PIXELS = 4
HOLLOW_LEVEL = 0.6         # mean background->colour level inside the hole above which it is solid


@dataclass
class Detection:
    color: str
    shape: str | None
    size: str | None
    fill: str | None
    cell: int | None
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]      # x0, y0, x1, y1 inclusive
    area: int
    iou: float
    mask: np.ndarray = field(repr=False)

    def attrs(self) -> dict:
        return {"color": self.color, "shape": self.shape, "size": self.size, "fill": self.fill, "cell": self.cell}


@dataclass
class Residue:
    cell: int | None
    center: tuple[float, float]
    area: int
    peak: float
    mask: np.ndarray = field(repr=False)


@dataclass
class Parsed:
    background: str | None
    objects: list[Detection]
    residue: list[Residue]
    texture_fraction: float      # share of free background pixels that deviate (graded CC)
    canvas: int


def _classify(comp: np.ndarray, tmap: np.ndarray, cx: float, cy: float,
              geom: Geometry) -> tuple[str | None, str | None, str | None, float]:
    """Best (shape, size) by IoU of the hole-filled component against solid templates;
    fill from `tmap` (per-pixel position on the background->colour line, 0 = background,
    1 = object colour) averaged over the template's hole: a blurred small hole still reads
    well below 1, while palette snapping would fill it in."""
    h, w = comp.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    filled = ndimage.binary_fill_holes(comp)
    best = (None, None, 0.0)
    for shape in SHAPES:
        for size in SIZES:
            t = shape_mask(shape, "solid", geom.half(size), dx, dy)
            inter = np.count_nonzero(filled & t)
            iou = inter / max(1, np.count_nonzero(filled | t))
            if iou > best[2]:
                best = (shape, size, iou)
    shape, size, iou = best
    if shape is None or iou < MIN_IOU:
        return None, None, None, iou
    r = geom.half(size)
    hole = shape_mask(shape, "solid", r, dx, dy) & ~shape_mask(shape, "hollow", r, dx, dy)
    level = float(tmap[hole].mean()) if hole.any() else 1.0
    fill = "solid" if level > HOLLOW_LEVEL else "hollow"
    return shape, size, fill, float(iou)


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Dilation by a (2k+1)-square, the same as k iterations of a 3x3 dilation."""
    return ndimage.maximum_filter(mask, size=2 * k + 1, mode="constant", cval=False)


def parse(img: np.ndarray, canvas: int | None = None) -> Parsed:
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a [H, W, 3] uint8 image, got {img.shape} {img.dtype}")
    H, W, _ = img.shape
    if H != W:
        raise ValueError(f"expected a square image, got {W}x{H}")
    canvas = canvas or H
    geom = Geometry(canvas)
    x = img.astype(np.float32) / 255.0
    flat = x.reshape(-1, 3)                                                            # [HW, 3]
    pal = _PALETTE / 255.0                                                             # [P, 3]
    d2 = (flat ** 2).sum(1, keepdims=True) - 2.0 * flat @ pal.T + (pal ** 2).sum(1)[None]   # [HW, P]
    nearest = d2.argmin(1)
    lab = nearest.reshape(H, W)                                                        # palette snap
    ring = max(1, int(round(geom.margin)))
    border = np.concatenate([lab[:ring].ravel(), lab[-ring:].ravel(), lab[:, :ring].ravel(), lab[:, -ring:].ravel()])
    counts = np.bincount(border, minlength=len(PALETTE_NAMES))
    bg_idx = int(counts.argmax())
    background = PALETTE_NAMES[bg_idx] if bg_idx >= N_OBJ_COLORS else None

    min_area = max(4, int(15 * geom.scale ** 2))
    struct = np.ones((3, 3), bool)
    objects: list[Detection] = []
    x = img.astype(np.float32) / 255.0
    # a colour is present when enough pixels sit close to it; the blurred halo between two
    # colours is a mixture far from every palette entry and must not make a third one present
    flat = x.reshape(-1, 3)                                                            # [HW, 3]
    pal = _PALETTE / 255.0                                                             # [P, 3]
    d2 = (flat ** 2).sum(1, keepdims=True) - 2.0 * flat @ pal.T + (pal ** 2).sum(1)[None]   # [HW, P]
    nearest = d2.argmin(1)
    close = d2[np.arange(nearest.size), nearest] < PRESENT_DISTANCE ** 2
    confident = np.bincount(nearest[close], minlength=len(PALETTE_NAMES))
    present = [ci for ci in range(N_OBJ_COLORS) if ci != bg_idx and confident[ci] >= PRESENT_MIN_PIXELS]
    bg_ref = pal[bg_idx]
    if present:
        # Each pixel lies (up to noise) on the blend line between the background and the colour
        # of the object it belongs to, blurred edges included. It goes to the line it is closest
        # to, and to that colour when past the line's midpoint. (Nearest palette point is not
        # enough: a blue/white blend is nearer purple than blue or white.)
        axes = pal[present] - bg_ref                                                   # [Pp, 3]
        rel = flat - bg_ref                                                            # [HW, 3]
        t_all = (rel @ axes.T) / (axes ** 2).sum(1)[None]                              # [HW, Pp]
        tc = np.clip(t_all, 0.0, 1.0)
        resid = ((rel[:, None, :] - tc[..., None] * axes[None]) ** 2).sum(-1)          # [HW, Pp]
        best = resid.argmin(1)
        t_best = t_all[np.arange(best.size), best]
        owner = np.where(t_best > 0.5, best + 1, 0).reshape(H, W)                      # 0 = background
    for pi, ci in enumerate(present, start=1):
        member = owner == pi
        rows, cols = np.flatnonzero(member.any(1)), np.flatnonzero(member.any(0))
        r0, r1 = max(0, rows[0] - 2), min(H, rows[-1] + 3)
        c0, c1 = max(0, cols[0] - 2), min(W, cols[-1] + 3)
        member[r0:r1, c0:c1] = ndimage.binary_closing(member[r0:r1, c0:c1], structure=struct)  # mend 1-px breaks
        comps, n = ndimage.label(member, structure=struct)
        if n == 0:
            continue
        tmap = t_all[:, pi - 1].reshape(H, W)                                         # [H, W]
        sizes = np.bincount(comps.ravel())
        for k, sl in enumerate(ndimage.find_objects(comps), start=1):
            if sl is None or sizes[k] < min_area:
                continue
            ys, xs = sl
            x0, x1, y0, y1 = xs.start, xs.stop - 1, ys.start, ys.stop - 1
            cx, cy = (x0 + x1 + 1) / 2.0, (y0 + y1 + 1) / 2.0
            pad = int(round(3 * geom.scale))
            X0, Y0 = max(0, x0 - pad), max(0, y0 - pad)
            X1, Y1 = min(W, x1 + pad + 1), min(H, y1 + pad + 1)
            crop = comps[Y0:Y1, X0:X1] == k
            shape, size, fill, iou = _classify(crop, tmap[Y0:Y1, X0:X1], cx - X0, cy - Y0, geom)
            cell = geom.cell_of(cx, cy)
            if cell is not None:
                ccx, ccy = geom.center(cell)
                if max(abs(cx - ccx), abs(cy - ccy)) > 3 * geom.scale:
                    cell = None  # off the grid
            full = np.zeros((H, W), bool)
            full[Y0:Y1, X0:X1] = crop
            objects.append(Detection(COLORS_NAMES[ci], shape, size, fill, cell, (cx, cy),
                                     (x0, y0, x1, y1), int(sizes[k]), iou, full))

    # residue: deviation from the image's own background colour, away from objects
    occupied = lab != bg_idx
    near = _dilate(occupied, max(1, int(round(2 * geom.scale))))
    free = ~near
    if free.any():
        bg_rgb = np.median(x[free], axis=0)
    else:
        bg_rgb = np.median(x.reshape(-1, 3), axis=0)
    diff = ndimage.uniform_filter(x - bg_rgb, size=(3, 3, 1), mode="nearest")   # [H, W, 3]
    dev = np.sqrt((diff ** 2).sum(-1))                                            # [H, W]
    obj_union = np.zeros((H, W), bool)
    for d in objects:
        obj_union |= d.mask
    excl = _dilate(obj_union, max(1, int(round(3 * geom.scale))))
    cand = (dev > RESIDUE_THRESHOLD) & ~excl
    residue: list[Residue] = []
    if cand.any():
        comps, n = ndimage.label(cand, structure=struct)
        min_blob = max(4, int(8 * geom.scale ** 2))
        for k, sl in enumerate(ndimage.find_objects(comps), start=1):
            m = comps[sl] == k
            area = int(m.sum())
            if area < min_blob:
                continue
            ys, xs = sl
            cx, cy = (xs.start + xs.stop) / 2.0, (ys.start + ys.stop) / 2.0
            full = np.zeros((H, W), bool)
            full[sl] = m
            residue.append(Residue(geom.cell_of(cx, cy), (cx, cy), area, float(dev[full].max()), full))
    region = ~excl
    texture_fraction = float((dev[region] > TEXTURE_THRESHOLD).mean()) if region.any() else 0.0
    return Parsed(background, objects, residue, texture_fraction, canvas)


COLORS_NAMES: tuple[str, ...] = tuple(COLORS)
