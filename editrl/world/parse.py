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
   image's own background colour (median, so colour shifts cancel), with the difference
   averaged over a (2r + 1)-square box (r = round(2 * scale): 5x5 on the 64-px canvas). A ghost
   is a few percent off the background over a whole object's area; the box mean keeps its level
   and divides the pixel noise by 2r + 1. Blobs of the box mean above a threshold, away from
   detected objects, are residue. The threshold follows the image's own noise:
   max(RESIDUE_FLOOR, RESIDUE_NOISE_K * sigma), where sigma is the pixel noise estimated on
   the free background (1.4826 * the median absolute deviation of neighbouring-pixel
   differences, / sqrt 2, root mean square over the channels). A clean image (a render, or a
   model's output, whose noise is a few 8-bit levels at most) is held to the floor, so a faint
   ghost counts; a noisy photograph-like image is held to a multiple of its noise, so its noise
   does not. The 3x3 mean of the same difference gives graded CC's texture term.

Implementation: numpy costs per call, so the work is arranged in few calls on long rows.
Per-pixel quantities are planes ([P, H*W], never [H*W, P] reduced over P); blend-line
distances are computed only for pixels past some line's midpoint; the colours, cut out
around their pixels, are closed and labelled as one stack, and the components are
hole-filled as one stack (each cut to its box + 1 px) and scored against the templates;
templates are built once per canvas. Every step yields the same values, to the bit, as the
direct formulation (`_reference_parse` in tests/test_world.py).

Exact shortcuts serve clean renders (every pixel exactly a palette colour, as in
ground-truth outputs): the snap is a table lookup, and a pixel's blend-line owner depends
only on its colour, so it is decided once per colour; and when every pixel near the
residue region is the background colour itself, the smoothed deviation there is zero up
to rounding (far below any threshold), so the box filters are skipped. Both rest on margins of
the palette's geometry that are checked when this module is imported (`_margins_ok`).
A pixel's blend-line position is then also a function of its colour, read from a table
(`_t_table`, checked to equal the image-wide product at every pixel place). Finally, a
colour's objects, all but their fill, depend on nothing but that colour's owner plane, and
clean renders repeat planes (objects a turn leaves alone), so they are remembered per plane
(`_clean_structures`); only the fills are read from each image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage

try:    # ndimage.label's own work, without its argument checks (a third of a small call's time)
    from scipy.ndimage._ni_label import _label as _ni_label
except ImportError:     # pragma: no cover - another scipy layout
    _ni_label = None

from .render import shape_mask
from .scene import BACKGROUNDS, COLORS, SHAPES, SIZES, Geometry

PALETTE_NAMES: tuple[str, ...] = tuple(COLORS) + tuple(BACKGROUNDS)
N_OBJ_COLORS = len(COLORS)
_PALETTE = np.asarray([*COLORS.values(), *BACKGROUNDS.values()], np.float32)  # [P, 3]
COLORS_NAMES: tuple[str, ...] = tuple(COLORS)

RESIDUE_FLOOR = 0.03       # box-mean RGB distance (on [0, 1]) that counts as residue in a clean image
RESIDUE_NOISE_K = 2.5      # ... and in a noisy one, in units of its estimated pixel noise
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
    fill_level: float | None = None      # mean background->colour level inside the hole (None: no shape)

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


_PAL = _PALETTE / 255.0                                      # [P, 3] on [0, 1]
_PAL2 = 2.0 * _PAL                                           # [P, 3]; doubling is exact
_PAL_SQ = (_PAL ** 2).sum(1)                                 # [P]
_LEVELS = np.arange(256, dtype=np.float32) / 255.0           # uint8 value -> pixel value on [0, 1]
_SQUARE = np.ones((3, 3), bool)                              # 8-connectivity
_CROSS = ndimage.generate_binary_structure(2, 1)             # 4-connectivity (binary_fill_holes' default)
_STACK_SQUARE = np.stack([np.zeros((3, 3), bool), _SQUARE, np.zeros((3, 3), bool)])  # per plane of a stack
_STACK_CROSS = np.stack([np.zeros((3, 3), bool), _CROSS, np.zeros((3, 3), bool)])
_KINDS = tuple((shape, size) for shape in SHAPES for size in SIZES)   # template order (first best IoU wins)


# ------------------------------------------------------------------------ palette geometry

def _pair_tables() -> tuple[np.ndarray, np.ndarray]:
    """Palette entry of every (red, green) and every (green, blue) pair of channel values,
    [65536] uint8 each, indexed by the little-endian uint16 of the two bytes (255: none).
    Both pairs of a pixel name the same entry exactly when it is that palette colour (the
    pairs of the palette are distinct, checked here)."""
    u8 = _PALETTE.astype(np.int64)                                               # [P, 3]
    rg, gb = np.full(65536, 255, np.uint8), np.full(65536, 255, np.uint8)
    rg[u8[:, 0] | u8[:, 1] << 8] = gb[u8[:, 1] | u8[:, 2] << 8] = np.arange(len(u8))
    if len(set(rg.tolist())) != len(u8) + 1 or len(set(gb.tolist())) != len(u8) + 1:
        raise AssertionError("palette pairs of channel values are not distinct")
    return rg, gb


_RG_ENTRY, _GB_ENTRY = _pair_tables()


def _margins_ok() -> tuple[bool, bool]:
    """The palette margins the shortcuts rely on (float64, far above float32 rounding):
    (a) any two palette entries lie more than 2 * PRESENT_DISTANCE apart, so a pixel within
    PRESENT_DISTANCE of an entry has it as its unique nearest entry; (b) for every background,
    pixel colour and blend line of the palette, the line position is clearly off the midpoint,
    and two lines at least one of which the pixel is past are at clearly different distances,
    so the owner of a pixel of a palette colour does not hang on rounding."""
    pal = _PALETTE.astype(np.float64) / 255.0
    gaps = np.sqrt(((pal[:, None] - pal[None]) ** 2).sum(-1))[~np.eye(len(pal), dtype=bool)]
    separated = bool(gaps.min() > 2 * PRESENT_DISTANCE + 1e-3)
    clear = True
    for bg in range(len(pal)):
        lines = [c for c in range(N_OBJ_COLORS) if c != bg]
        axes = pal[lines] - pal[bg]                                              # [L, 3]
        rel = pal - pal[bg]                                                      # [P, 3]
        t = rel @ axes.T / (axes ** 2).sum(1)                                    # [P, L]
        e = rel[:, None] - np.clip(t, 0.0, 1.0)[..., None] * axes[None]          # [P, L, 3]
        dist = (e ** 2).sum(-1)                                                  # [P, L]
        past = t > 0.5
        pair = past[:, :, None] | past[:, None, :]                               # [P, L, L]
        off_diag = ~np.eye(len(lines), dtype=bool)[None]
        close = np.abs(dist[:, :, None] - dist[:, None, :]) < 1e-5
        clear &= bool(np.abs(t - 0.5).min() > 1e-4) and not (close & pair & off_diag).any()
    return separated, clear


_SEPARATED, _CLEAR_OWNERS = _margins_ok()


# ------------------------------------------------------------------------ small exact helpers

def _argmin0(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d.argmin(0), d.min(0)) of a C-ordered [K, N] array: the first minimum on ties.
    (numpy's argmin over the first axis of a short, wide array is ~10x slower.)"""
    dmin = np.minimum.reduce(d, axis=0)                                          # [N]
    first = np.arange(len(d), 0, -1, dtype=np.uint8)[:, None]                    # [K, 1] K..1
    return len(d) - ((d == dmin) * first).max(0), dmin


def _mean32(v: np.ndarray) -> float:
    """float(v.mean()) of a non-empty 1-D float32 array (float32 sum, divided in float64,
    rounded to float32), without np.mean's Python overhead."""
    return float(np.float32(float(np.add.reduce(v)) / len(v)))


def _label(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    """ndimage.label(mask, structure) of a non-empty bool array (int32 labels)."""
    if _ni_label is None:
        return ndimage.label(mask, structure=structure)
    out = np.empty(mask.shape, np.int32)
    return out, _ni_label(mask, structure, out)


@lru_cache(maxsize=16)
def _border(size: int, ring: int) -> np.ndarray:
    """Flat indices of the `ring`-px border of a size x size image (corners twice)."""
    i = np.arange(size * size).reshape(size, size)
    return np.concatenate([i[:ring].ravel(), i[-ring:].ravel(), i[:, :ring].ravel(), i[:, -ring:].ravel()])


@lru_cache(maxsize=32)
def _tiled(colour: int, n: int) -> np.ndarray:
    """Palette entry `colour` repeated n times, [n * 3]: subtracting it from a flattened
    [n, 3] array is the broadcast `flat - _PAL[colour]`, at the speed of a contiguous op."""
    out = np.tile(_PAL[colour], n)
    out.flags.writeable = False
    return out


# ------------------------------------------------------------------------ pixel level

def _palette_index(img: np.ndarray) -> np.ndarray | None:
    """[HW] uint8 palette entry of every pixel when every pixel is exactly a palette colour
    (a clean render), else None: its (red, green) and its (green, blue) bytes, read as
    uint16, must both name that entry."""
    img = np.ascontiguousarray(img)
    n, w = img.size // 3, img.shape[1]
    if _RG_ENTRY.take(np.ndarray((w,), "<u2", img, 0, (3,))).max() == 255:
        return None                                     # the first row already is not: most model outputs
    entry = _RG_ENTRY.take(np.ndarray((n,), "<u2", img, 0, (3,)))              # [HW]
    if entry.max() == 255 or not np.array_equal(entry, _GB_ENTRY.take(np.ndarray((n,), "<u2", img, 1, (3,)))):
        return None
    return entry


def _distances(flat: np.ndarray) -> np.ndarray:
    """Squared distance of every pixel of [HW, 3] to every palette entry, [P, HW]:
    |x|^2 - 2 x.p + |p|^2 in float32, in that order (the snap's tie-breaking hangs on it)."""
    f0, f1, f2 = flat.T
    sq = (f0 * f0 + f1 * f1) + f2 * f2                                          # [HW] = (flat ** 2).sum(1)
    d = _PAL2 @ flat.T                                                          # [P, HW] = ((2 flat) @ _PAL.T).T
    np.subtract(sq, d, out=d)
    d += _PAL_SQ[:, None]
    return d


def _not_nearest(d: np.ndarray, entry: int) -> np.ndarray:
    """[HW] bool: the nearest palette entry (the first on ties) is not `entry`, from d [P, HW]."""
    de = d[entry]
    out = np.logical_or.reduce(d[entry + 1:] < de, axis=0)                      # a later entry strictly nearer
    if entry:
        out |= np.logical_or.reduce(d[:entry] <= de, axis=0)                    # an earlier one as near
    return out


def _line_positions(flat: np.ndarray, bg_idx: int, present: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pixel's position t on each background->colour line of `present` (0 = background,
    1 = colour), [Pp, HW]; with the pixels relative to the background [HW, 3] and the lines'
    directions [Pp, 3]."""
    axes = _PAL[present] - _PAL[bg_idx]                                         # [Pp, 3]
    rel = (flat.ravel() - _tiled(bg_idx, len(flat))).reshape(-1, 3)             # [HW, 3] = flat - bg
    t = axes @ rel.T                                                            # [Pp, HW] = (rel @ axes.T).T
    t /= (axes ** 2).sum(1)[:, None]
    return t, rel, axes


def _owners(t: np.ndarray, rel: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Which pixels belong to each line's colour, [Pp, HW] bool, from `_line_positions`. A
    pixel belongs to the line it is closest to (t clipped to [0, 1]) when past that line's
    midpoint, so only pixels past some line's midpoint need the distances."""
    past = t > 0.5
    if len(axes) == 1:
        return past
    idx = np.logical_or.reduce(past, axis=0).nonzero()[0]                       # [n]
    tc = np.minimum(np.maximum(np.take(t, idx, axis=1), 0.0), 1.0)              # [Pp, n] = np.clip(t, 0, 1)
    rel = np.take(rel, idx, axis=0)                                             # [n, 3]
    e0, e1, e2 = (rel[:, c] - tc * axes[:, c, None] for c in range(3))          # [Pp, n] per channel
    best = ((e0 * e0 + e1 * e1) + e2 * e2).argmin(0)                            # squared distances [Pp, n]
    at = best * t.shape[1] + idx                                                # flat index of (best, idx)
    members = np.zeros(t.size, bool)
    members[at] = past.ravel()[at]
    return members.reshape(t.shape)


@lru_cache(maxsize=256)
def _owner_table(bg_idx: int, present: tuple[int, ...]) -> np.ndarray:
    """`_owners` of a pixel of each palette colour, [Pp, P] bool: with `_CLEAR_OWNERS`, a
    pixel's owner depends on nothing but its colour (no decision is within rounding)."""
    out = _owners(*_line_positions(_PAL, bg_idx, list(present)))
    out.flags.writeable = False
    return out


@lru_cache(maxsize=256)
def _t_table(bg_idx: int, present: tuple[int, ...], n: int) -> np.ndarray | None:
    """`_line_positions` of a pixel of each palette colour in an image of n pixels, [Pp, P],
    read-only; None when a colour's value depends on the pixel's place in the image (the
    matrix product may round differently in different blocks), checked here on an image of
    n pixels holding every colour at every place modulo P."""
    flat = np.resize(_PAL, (n, 3))                                              # pixel j: colour j % P
    t = _line_positions(flat, bg_idx, list(present))[0]                         # [Pp, n]
    table = np.ascontiguousarray(t[:, :len(_PAL)])
    if n < len(_PAL) or not np.array_equal(t, table[:, np.arange(n) % len(_PAL)]):
        return None
    table.flags.writeable = False
    return table


def _median_rgb(img: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """np.median(x[sel], axis=0) for x = img / 255 in float32, from per-channel histograms
    (the median of 8-bit values is one of 256 levels; an even count averages two in float32)."""
    idx = np.flatnonzero(sel)
    n = len(idx)
    cum = np.stack([np.bincount(ch[idx], minlength=256) for ch in img.reshape(-1, 3).T]).cumsum(1)  # [3, 256]
    hi = _LEVELS[(cum <= n // 2).sum(1)]                                        # order statistic n // 2
    if n % 2:
        return hi
    return (_LEVELS[(cum <= n // 2 - 1).sum(1)] + hi) / np.float32(2)


def _box(planes: np.ndarray, size: int) -> np.ndarray:
    """size x size mean of every plane of [C, H, W], edges repeated: ndimage.uniform_filter(...,
    size=(size, size), mode="nearest") per plane, rows first."""
    out = ndimage.uniform_filter1d(planes, size, axis=1, mode="nearest")
    return ndimage.uniform_filter1d(out, size, axis=2, output=out, mode="nearest")


def _norm3(planes: np.ndarray) -> np.ndarray:
    """Euclidean norm over the 3 planes of [3, H, W]."""
    d0, d1, d2 = planes
    return np.sqrt((d0 * d0 + d1 * d1) + d2 * d2)


def noise_sigma(x: np.ndarray, sel: np.ndarray) -> float:
    """Pixel noise of x [H, W, 3] on [0, 1] over the pixels of sel [H, W]: per channel
    1.4826 * MAD / sqrt 2 of the differences between horizontally and vertically neighbouring
    pixels both in sel (a difference of two independent pixels has sqrt 2 times the noise's
    spread; the MAD ignores the few pairs that straddle an edge or a ghost's rim), then the
    root mean square over the channels. 0.0 with fewer than 64 pairs."""
    diffs = np.concatenate([(x[:, 1:] - x[:, :-1])[sel[:, 1:] & sel[:, :-1]],
                            (x[1:] - x[:-1])[sel[1:] & sel[:-1]]])                     # [N, 3]
    if len(diffs) < 64:
        return 0.0
    mad = np.median(np.abs(diffs - np.median(diffs, axis=0)), axis=0)                  # [3]
    sigma = np.float32(1.4826 / np.sqrt(2.0)) * mad
    return float(np.sqrt(np.mean(sigma * sigma)))


def residue_threshold(sigma: float) -> float:
    """Box-mean deviation above which a blob is residue, for an image of pixel noise sigma."""
    return max(RESIDUE_FLOOR, RESIDUE_NOISE_K * sigma)


# ------------------------------------------------------------------------ morphology

def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Dilation of [..., H, W] by a (2k+1)-square (outside = False), the same as k
    iterations of a 3x3 dilation. Rows are padded with k False columns, so that shifting
    the flattened array by up to k never carries a pixel into the next row."""
    *lead, h, w = mask.shape
    padded = np.zeros((*lead, h, w + k), bool)
    padded[..., :w] = mask
    flat = padded.ravel()
    cols = flat.copy()
    for s in range(1, k + 1):
        cols[s:] |= flat[:-s]
        cols[:-s] |= flat[s:]
    cols = cols.reshape(padded.shape)
    out = cols.copy()
    for s in range(1, k + 1):
        out[..., s:, :] |= cols[..., :-s, :]
        out[..., :-s, :] |= cols[..., s:, :]
    return out[..., :w]


def _fill_holes(stack: np.ndarray) -> np.ndarray:
    """ndimage.binary_fill_holes of every plane of [N, h, w] (background not 4-connected to
    the plane's edge becomes foreground), in one labelling. A mask smaller than its plane
    sits at the top left with background padding, which reaches the plane's edge."""
    regions, n = _label(~stack, _STACK_CROSS)
    open_ = np.zeros(n + 1, bool)
    open_[0] = True                                     # the masks themselves
    for edge in (regions[:, 0], regions[:, -1], regions[:, :, 0], regions[:, :, -1]):
        np.put(open_, edge, True)
    return stack | ~np.take(open_, regions)


# ------------------------------------------------------------------------ shapes

@lru_cache(maxsize=16)
def _templates(canvas: int, fx: float, fy: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Solid templates of every (shape, size) in `_KINDS` order as float32 0/1 [8, 2C, 2C],
    and their holes as bool, centred at (C + fx, C + fy) on a grid of C = (largest half-size
    + 2) px each side, which holds every template pixel. A box centre sits on a whole or
    half pixel, so a template placed at any centre is a window of one of these four grids
    (exactly: every offset is a multiple of 1/2)."""
    geom = Geometry(canvas)
    c = int(np.ceil(geom.half("large"))) + 2
    ys, xs = np.mgrid[0:2 * c, 0:2 * c].astype(np.float64) + 0.5
    dx, dy = xs - (c + fx), ys - (c + fy)
    solid = np.stack([shape_mask(shape, "solid", geom.half(size), dx, dy) for shape, size in _KINDS])
    holes = np.stack([shape_mask(shape, "solid", geom.half(size), dx, dy)
                      & ~shape_mask(shape, "hollow", geom.half(size), dx, dy) for shape, size in _KINDS])
    solid = solid.astype(np.float32)
    solid.flags.writeable = holes.flags.writeable = False
    return solid, holes, c


@dataclass(frozen=True)
class _Bank:
    """The templates of one canvas at the four placements (fx, fy) in {0, 1/2}^2 of a box
    centre, indexed g = 2 * (fy > 0) + (fx > 0): their holes [4, 8, 2C, 2C] bool; the solid
    ones as columns g * 8 + kind of a [(2C)^2, 32] float32 matrix (for every component's
    intersections in one product); and their summed-area tables [4, 2C + 1, 2C + 1, 8]
    (area inside any window in four lookups)."""
    c: int
    holes: np.ndarray
    matrix: np.ndarray
    areas: np.ndarray


@lru_cache(maxsize=16)
def _bank(canvas: int) -> _Bank:
    grids = [_templates(canvas, fx, fy) for fy in (0.0, 0.5) for fx in (0.0, 0.5)]
    c = grids[0][2]
    solid = np.stack([s for s, _, _ in grids])                                  # [4, 8, 2C, 2C] 0/1
    areas = np.zeros((4, 2 * c + 1, 2 * c + 1, len(_KINDS)), np.int64)
    areas[:, 1:, 1:] = solid.astype(np.int64).cumsum(2).cumsum(3).transpose(0, 2, 3, 1)
    matrix = np.ascontiguousarray(solid.reshape(4 * len(_KINDS), -1).T)       # [(2C)^2, 32]
    holes = np.stack([h for _, h, _ in grids])
    for a in (matrix, areas, holes):
        a.flags.writeable = False
    return _Bank(c, holes, matrix, areas)


def _classify(filled: np.ndarray, boxes: list[tuple[tuple[int, int, int, int], tuple[int, int, int, int],
                                                     tuple[float, float]]],
              canvas: int) -> list[tuple[int | None, float, tuple | None]]:
    """(kind, IoU, hole) of each hole-filled component, `filled` [N, h, w]: plane i holds
    component i's `tight` box (x0, y0, x1, y1 exclusive: the bounding box + 1 px) at its top
    left; `boxes[i]` = (tight box, crop window around it (bounding box + pad) that the
    templates are clipped to, box centre). Kind: the index in `_KINDS` of the best IoU (the
    first on ties) against the solid template of each (shape, size) placed at the box centre,
    None below MIN_IOU. Hole: where the fill is read (`_fill`), as (row slice, column slice,
    mask) of the image: the best template's hole within the window; None when that is empty.

    A component lies inside its bounding box, so its intersections and area need only the
    tight box; a template's area counts what lies inside the window. All are exact integers,
    so IoU = int / int as for whole-window planes."""
    bank = _bank(canvas)
    c, n = bank.c, len(boxes)
    side = 2 * c + 1                                                            # of a summed-area table
    parts = np.zeros((n, 2 * c, 2 * c), np.float32)                             # [N, 2C, 2C] tight box on the grid
    placed, rows, corners = [], [], []
    for i, ((tx0, ty0, tx1, ty1), (X0, Y0, X1, Y1), (cx, cy)) in enumerate(boxes):
        g = 2 * (cy % 1 > 0) + (cx % 1 > 0)                                     # placement
        gx, gy = int(cx) - c, int(cy) - c                                       # image position of grid (0, 0)
        a, b, e, f = max(ty0, gy), min(ty1, gy + 2 * c), max(tx0, gx), min(tx1, gx + 2 * c)
        parts[i, a - gy:b - gy, e - gx:f - gx] = filled[i, a - ty0:b - ty0, e - tx0:f - tx0]
        a, b, e, f = max(Y0, gy) - gy, min(Y1, gy + 2 * c) - gy, max(X0, gx) - gx, min(X1, gx + 2 * c) - gx
        placed.append((g, gx, gy, a, b, e, f))                                  # the window on the grid
        rows.append(4 * i + g)
        corners.append([(g * side + y) * side + x for y, x in ((b, f), (a, f), (b, e), (a, e))])
    inter = np.take((parts.reshape(n, -1) @ bank.matrix).reshape(4 * n, -1), rows, axis=0)   # [N, 8] exact counts
    s = np.take(bank.areas.reshape(-1, len(_KINDS)), corners, axis=0)           # [N, 4, 8]
    template_area = (s[:, 0] - s[:, 1]) - (s[:, 2] - s[:, 3])                   # [N, 8] inside the window
    area = np.add.reduce(filled.reshape(n, -1), axis=1)                         # [N]
    union = np.maximum(1.0, area[:, None] + template_area - inter)
    ious = inter.astype(np.float64) / union                                     # = int / int
    out = []
    for i, (k, iou) in enumerate(zip(ious.argmax(1).tolist(), ious.max(1).tolist())):   # the first best
        if iou == 0.0 or iou < MIN_IOU:
            out.append((None, iou, None))
            continue
        g, gx, gy, a, b, e, f = placed[i]
        hole = bank.holes[g, k, a:b, e:f]
        out.append((k, iou, (slice(a + gy, b + gy), slice(e + gx, f + gx), hole) if hole.any() else None))
    return out


def _fill(tplane: np.ndarray, hole: tuple | None) -> tuple[str, float]:
    """(fill, level) from `tplane` [H, W] (per-pixel position on the background->colour line,
    0 = background, 1 = object colour) averaged over the template's `hole` (from `_classify`):
    a blurred small hole still reads well below 1, while palette snapping would fill it in.
    The level is kept so a graded judge can tell a half-filled hole from a clean one."""
    if hole is None:
        return "solid", 1.0                             # no hole pixel in the window: level 1
    rows, cols, mask = hole
    level = _mean32(tplane[rows, cols][mask])
    return ("solid" if level > HOLLOW_LEVEL else "hollow"), level


def _components(members: np.ndarray, margin: int) -> tuple[np.ndarray, list, np.ndarray, list]:
    """8-connected components of each colour's pixels, members [Pp, H, W], after mending
    1-px breaks (3x3 closing), all labelled in one call: each colour's box (+ `margin` >= 2 px)
    is cut out and the cuts are stacked [Pp, h, w] without links across them. Returns the
    label stack, find_objects slices (colour, rows, cols), sizes and each cut's (row, col)
    origin. Labels run colour by colour, each in raster order, as labelling each colour's
    full mask on its own numbers them; the closing equals the full-image one (the cut holds
    everything within 2 px of the colour)."""
    n_colours, H, W = members.shape
    flat = members.reshape(n_colours, -1)                                       # [Pp, HW]
    cols_any = np.logical_or.reduce(members, axis=1)                            # [Pp, W]
    cuts, origins = [], []
    for p in range(n_colours):
        first, last = int(flat[p].argmax()), H * W - 1 - int(flat[p, ::-1].argmax())   # the first True of each end
        cols = cols_any[p].nonzero()[0]
        r0, r1 = max(0, first // W - margin), min(H, last // W + margin + 1)
        c0, c1 = max(0, int(cols[0]) - margin), min(W, int(cols[-1]) + margin + 1)
        cuts.append(members[p, r0:r1, c0:c1])
        origins.append((r0, c0))
    comps, _ = _label(_close3(cuts), _STACK_SQUARE)
    return comps, ndimage.find_objects(comps), np.bincount(comps.ravel()), origins


def _close3(cuts: list[np.ndarray]) -> np.ndarray:
    """3x3 closing of each [h_i, w_i] mask of `cuts`, outside = False, stacked [N, h, w] with
    each at the top left of its plane (False elsewhere); what the dilation spills past a mask
    is outside the image and cleared before the erosion. Both steps are shifted ORs / ANDs
    within a 1 px ring of False."""
    h, w = max(c.shape[0] for c in cuts), max(c.shape[1] for c in cuts)
    buf = np.zeros((len(cuts), h + 2, w + 2), bool)                             # [N, h + 2, w + 2]
    for p, cut in enumerate(cuts):
        buf[p, 1:cut.shape[0] + 1, 1:cut.shape[1] + 1] = cut
    rows = buf[:, :, :-2] | buf[:, :, 1:-1]
    rows |= buf[:, :, 2:]                                                       # [N, h + 2, w]
    grown = rows[:, :-2] | rows[:, 1:-1]
    grown |= rows[:, 2:]                                                        # [N, h, w] dilated
    for p, cut in enumerate(cuts):          # a cut that ends at the image's edge: what the
        grown[p, cut.shape[0]:] = False     # dilation spilled past it is outside the image
        grown[p, :, cut.shape[1]:] = False
    buf[:, 1:-1, 1:-1] = grown
    rows = buf[:, :, :-2] & buf[:, :, 1:-1]
    rows &= buf[:, :, 2:]
    closed = rows[:, :-2] & rows[:, 1:-1]
    closed &= rows[:, 2:]                                                       # [N, h, w] eroded
    return closed


def _structures(members: np.ndarray, geom: Geometry) -> list[list[tuple]]:
    """Objects from each colour's pixels, members [Pp, H, W], all but their fill: per colour,
    mend 1-px breaks (3x3 closing), then every 8-connected component of at least `min_area`
    px in raster order, as (bbox, centre, area, cell, kind, IoU, hole, mask) (`_classify`).
    A colour's list depends on its own plane alone (the planes are labelled without links)."""
    n_colours, H, W = members.shape
    min_area = max(4, int(15 * geom.scale ** 2))
    pad = int(round(3 * geom.scale))
    off_grid = 3 * geom.scale
    per: list[list[tuple]] = [[] for _ in range(n_colours)]
    comps, slices, sizes, origins = _components(members, 2)   # holds each component's box + 1 px
    found = []                                          # (label, colour, box, crop window, tight box)
    for k, (pc, ys, xs) in enumerate(slices, start=1):
        if sizes[k] < min_area:
            continue
        pc = pc.start
        r0, c0 = origins[pc]
        x0, x1, y0, y1 = xs.start + c0, xs.stop - 1 + c0, ys.start + r0, ys.stop - 1 + r0
        X0, Y0 = max(0, x0 - pad), max(0, y0 - pad)
        X1, Y1 = min(W, x1 + pad + 1), min(H, y1 + pad + 1)
        # the box + 1 px, within the window: holes are filled the same as in the window
        # (outside the box, the window's background all reaches the window's edge)
        tight = (max(X0, x0 - 1), max(Y0, y0 - 1), min(X1, x1 + 2), min(Y1, y1 + 2))
        found.append((k, pc, (x0, y0, x1, y1), (X0, Y0, X1, Y1), tight))
    if not found:
        return per
    crops = np.zeros((len(found), max(b[3] - b[1] for *_, b in found), max(b[2] - b[0] for *_, b in found)), bool)
    for i, (k, pc, _, _, (tx0, ty0, tx1, ty1)) in enumerate(found):             # [N, h, w]; each in its cut
        r0, c0 = origins[pc]
        np.equal(comps[pc, ty0 - r0:ty1 - r0, tx0 - c0:tx1 - c0], k, out=crops[i, :ty1 - ty0, :tx1 - tx0])
    boxes = [(tight, window, ((x0 + x1 + 1) / 2.0, (y0 + y1 + 1) / 2.0)) for _, _, (x0, y0, x1, y1), window, tight in found]
    kinds = _classify(_fill_holes(crops), boxes, geom.canvas)
    for i, ((k, pc, bbox, _, (tx0, ty0, tx1, ty1)), (_, _, (cx, cy)), (kind, iou, hole)) in enumerate(zip(found, boxes, kinds)):
        cell = geom.cell_of(cx, cy)
        if cell is not None:
            ccx, ccy = geom.center(cell)
            if max(abs(cx - ccx), abs(cy - ccy)) > off_grid:
                cell = None  # off the grid
        full = np.zeros((H, W), bool)
        full[ty0:ty1, tx0:tx1] = crops[i, :ty1 - ty0, :tx1 - tx0]
        per[pc].append((bbox, (cx, cy), int(sizes[k]), cell, kind, iou, hole, full))
    return per


def _detections(per: list[list[tuple]], tplane, present: list[int], copy: bool) -> list[Detection]:
    """Detections from `_structures`, colour by colour; `tplane(pc)` gives colour pc's line
    positions [H, W], read only where a fill is decided. `copy`: the masks are shared (cached)."""
    out = []
    for pc, found in enumerate(per):
        color, plane = COLORS_NAMES[present[pc]], None
        for bbox, center, area, cell, kind, iou, hole, mask in found:
            shape = size = fill = level = None
            if kind is not None:
                shape, size = _KINDS[kind]
                if hole is not None and plane is None:
                    plane = tplane(pc)
                fill, level = _fill(plane, hole)
            out.append(Detection(color, shape, size, fill, cell, center, bbox, area, iou,
                                 mask.copy() if copy else mask, level))
    return out


_STRUCTURES: dict[tuple, list[tuple]] = {}     # clean renders: (canvas, size, plane bits) -> one colour's list
_STRUCTURES_MAX = 4096


def _clean_structures(members: np.ndarray, geom: Geometry) -> list[list[tuple]]:
    """`_structures` of a clean render's planes, remembered per plane: a colour's list depends
    on nothing but its plane, and ground-truth renders repeat planes (an object that a turn
    leaves alone, the same object in another session). Misses are computed together."""
    n_colours, H, W = members.shape
    bits = np.packbits(members.reshape(n_colours, -1), axis=1)                  # [Pp, HW / 8]
    keys = [(geom.canvas, H, row.tobytes()) for row in bits]
    hits = [_STRUCTURES.get(key) for key in keys]
    if all(h is not None for h in hits):
        return hits
    per = _structures(members, geom)
    for key, found in zip(keys, per):
        for entry in found:
            entry[-1].flags.writeable = False
        if len(_STRUCTURES) >= _STRUCTURES_MAX:
            del _STRUCTURES[next(iter(_STRUCTURES))]                            # the oldest
        _STRUCTURES[key] = found
    return per


# ------------------------------------------------------------------------ residue

def _may_hold_blob(cand: np.ndarray) -> bool:
    """False when every 8-connected blob of `cand` [H, W] has at most 2 px: no pixel has two
    neighbours in it (a connected set of 3 or more pixels has one that does)."""
    h, w = cand.shape
    p = np.zeros((h + 2, w + 2), np.uint8)
    p[1:-1, 1:-1] = cand
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]                                    # [h + 2, w]
    count = rows[:-2] + rows[1:-1] + rows[2:]                                   # [h, w] 3x3 sums, self included
    return bool((count[cand] >= 3).any())


def _residue(cand: np.ndarray, dev: np.ndarray, geom: Geometry) -> list[Residue]:
    """8-connected blobs of `cand` [H, W] of at least `min_blob` px, in raster order."""
    H, W = cand.shape
    min_blob = max(4, int(8 * geom.scale ** 2))
    if not _may_hold_blob(cand):                        # min_blob >= 4
        return []
    comps, _ = _label(cand, _SQUARE)
    sizes = np.bincount(comps.ravel())
    big = (np.flatnonzero(sizes[1:] >= min_blob) + 1).tolist()
    if not big:
        return []
    slices = ndimage.find_objects(comps)
    out = []
    for k in big:
        sl = slices[k - 1]
        m = comps[sl] == k
        ys, xs = sl
        cx, cy = (xs.start + xs.stop) / 2.0, (ys.start + ys.stop) / 2.0
        full = np.zeros((H, W), bool)
        full[sl] = m
        out.append(Residue(geom.cell_of(cx, cy), (cx, cy), int(sizes[k]), float(dev[sl][m].max()), full))
    return out


# ------------------------------------------------------------------------ parse

def parse(img: np.ndarray, canvas: int | None = None) -> Parsed:
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a [H, W, 3] uint8 image, got {img.shape} {img.dtype}")
    H, W, _ = img.shape
    if H != W:
        raise ValueError(f"expected a square image, got {W}x{H}")
    canvas = canvas or H
    geom = Geometry(canvas)
    border = _border(H, max(1, int(round(geom.margin))))
    n_pal = len(PALETTE_NAMES)
    entry = _palette_index(img) if _SEPARATED and _CLEAR_OWNERS else None            # [HW] or None
    x = flat = None                                                                    # [H, W, 3], [HW, 3] when needed
    if entry is not None:
        # a clean render: each pixel is its own nearest entry, at distance ~0
        bg_idx = int(np.bincount(entry.take(border), minlength=n_pal).argmax())
        confident = np.bincount(entry, minlength=n_pal)
    else:
        x = img.astype(np.float32) / 255.0
        flat = x.reshape(-1, 3)
        d = _distances(flat)                                                           # [P, HW]
        bg_idx = int(np.bincount(np.take(d, border, axis=1).argmin(0), minlength=n_pal).argmax())
        if _SEPARATED:      # a pixel within PRESENT_DISTANCE of an entry has it as its nearest
            confident = np.add.reduce(d[:N_OBJ_COLORS] < PRESENT_DISTANCE ** 2, axis=1)
        else:
            nearest, dmin = _argmin0(d)
            confident = np.bincount(nearest[dmin < PRESENT_DISTANCE ** 2], minlength=n_pal)
    background = PALETTE_NAMES[bg_idx] if bg_idx >= N_OBJ_COLORS else None

    # a colour is present when enough pixels sit close to it; the blurred halo between two
    # colours is a mixture far from every palette entry and must not make a third one present
    present = [ci for ci in range(N_OBJ_COLORS) if ci != bg_idx and confident[ci] >= PRESENT_MIN_PIXELS]
    objects: list[Detection] = []
    if present:
        # Each pixel lies (up to noise) on the blend line between the background and the colour
        # of the object it belongs to, blurred edges included. It goes to the line it is closest
        # to, and to that colour when past the line's midpoint. (Nearest palette point is not
        # enough: a blue/white blend is nearer purple than blue or white.)
        if entry is not None:   # owners decided once per palette colour (_CLEAR_OWNERS)
            members = np.take(_owner_table(bg_idx, tuple(present)), entry, axis=1)
            table = _t_table(bg_idx, tuple(present), H * W)                         # [Pp, P] or None
            if table is None:
                t = _line_positions(img.astype(np.float32).reshape(-1, 3) / 255.0, bg_idx, present)[0]
                tplane = lambda pc: t[pc].reshape(H, W)                              # noqa: E731
            else:
                tplane = lambda pc: table[pc].take(entry).reshape(H, W)              # noqa: E731
            per = _clean_structures(members.reshape(-1, H, W), geom)
            objects = _detections(per, tplane, present, copy=True)
        else:
            t, rel, axes = _line_positions(flat, bg_idx, present)
            members = _owners(t, rel, axes)
            per = _structures(members.reshape(-1, H, W), geom)
            objects = _detections(per, lambda pc: t[pc].reshape(H, W), present, copy=False)

    # residue: deviation from the image's own background colour, away from objects
    k_near, k_away = max(1, int(round(2 * geom.scale))), max(1, int(round(3 * geom.scale)))
    r_box = k_near                                                     # residue box radius: 5x5 at 64 px
    masks = np.zeros((2, H, W), bool)                                                  # [occupied, objects]
    if entry is not None:
        np.not_equal(entry.reshape(H, W), bg_idx, out=masks[0])
    else:
        masks[0] = _not_nearest(d, bg_idx).reshape(H, W)
    for o in objects:
        masks[1] |= o.mask
    grown = _dilate(masks, k_near)                                   # a k_away dilation = k_near, then the rest
    free = ~grown[0]
    region = ~(_dilate(grown[1], k_away - k_near) if k_away > k_near else grown[1])   # away from objects
    n_region = np.count_nonzero(region)
    if entry is not None and free.any():
        # The median of the free pixels is then exactly the background colour. When every
        # occupied pixel lies within k_away - r_box px of an object, every pixel within r_box px
        # of the region is that colour, so both box means of the difference (radius r_box for
        # residue, 1 for texture; r_box = k_near <= k_away) are zero in the region up to the
        # filters' rounding (~1e-13): no residue, no texture.
        reach = k_away - r_box
        near_objects = grown[1] if reach == k_near else _dilate(masks[1], reach) if reach > 0 else masks[1]
        if not (masks[0] & ~near_objects).any():
            # 0 / n_region: a numpy float like the count below
            return Parsed(background, objects, [], np.intp(0) / n_region if n_region else 0.0, canvas)
    if x is None:
        x = img.astype(np.float32) / 255.0
    bg_rgb = _median_rgb(img, free if free.any() else np.ones_like(free))
    diff = np.ascontiguousarray(x.transpose(2, 0, 1)) - bg_rgb[:, None, None]           # [3, H, W]
    dev3 = _norm3(_box(diff, 3))                                                # [H, W] texture
    dev = _norm3(_box(diff, 2 * r_box + 1))                                            # [H, W] residue
    cand = (dev > RESIDUE_FLOOR) & region               # the threshold is never below the floor, so
    if cand.any():                                      # the noise estimate is needed only past it
        cand &= dev > residue_threshold(noise_sigma(x, free & region))
    residue = _residue(cand, dev, geom) if cand.any() else []
    texture_fraction = np.count_nonzero((dev3 > TEXTURE_THRESHOLD) & region) / n_region if n_region else 0.0
    return Parsed(background, objects, residue, texture_fraction, canvas)
