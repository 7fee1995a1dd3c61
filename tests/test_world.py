"""ShapesWorld (DESIGN §5): render -> parse round trip, the session grammar's promises, and the judge.

The grammar checks read instructions with a small reader written here (regexes over the
grammar's phrase shapes), independent of `grammar.resolve_reference`, and compare the two.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from editrl.session import CHECKS, Session, session_to_json
from editrl.world.check import FAULTS, NOISE_HIDDEN, add_texture, make_fault, run_check
from editrl.world.grammar import (
    EXCLUDES,
    GOVERNS,
    NUM_WORDS,
    GrammarConfig,
    edit_from_turn,
    referring_candidates,
    resolve_reference,
    sample_session,
    session_scenes,
)
from editrl.world.io import png_bytes
from editrl.world.parse import (
    _PALETTE,
    COLORS_NAMES,
    HOLLOW_LEVEL,
    MIN_IOU,
    N_OBJ_COLORS,
    PALETTE_NAMES,
    PRESENT_DISTANCE,
    PRESENT_MIN_PIXELS,
    RESIDUE_FLOOR,
    RESIDUE_NOISE_K,
    TEXTURE_THRESHOLD,
    parse,
)
from editrl.world.render import degrade, object_mask, render, shape_mask
from editrl.world.scene import (
    ATTRS,
    BACKGROUNDS,
    CELL_NAMES,
    COLORS,
    COLS,
    EDIT_TYPES,
    FILLS,
    ROWS,
    SHAPES,
    SIZES,
    Geometry,
    Obj,
    Scene,
    apply_edit,
)
from editrl.world.verify import _footprint, _requested_attr, diff_attrs, judge_turn, match

SINGLE = ("add", "replace", "color", "material", "size", "position")   # edits of exactly one object
TARGETED = ("remove", "replace", "color", "material", "size", "position")  # named by a referring expression


def _key(o) -> tuple:
    return (o.color, o.shape, o.size, o.fill, o.cell)


def _strip_ids(d: dict) -> dict:
    return {**d, "objects": [{k: v for k, v in o.items() if k != "id"} for o in d["objects"]]}


# ------------------------------------------------------------------------------ fixtures

N_SESSIONS, N_TURNS = 300, 5


@pytest.fixture(scope="module")
def corpus() -> list[tuple[Session, list[Scene]]]:
    out = []
    for i in range(N_SESSIONS):
        s = sample_session(0, i, GrammarConfig(turns=N_TURNS))
        out.append((s, session_scenes(s)))
    return out


def _body(s: Session, k: int) -> str:
    """Turn k's instruction without the session rule that opens turn 1."""
    instr = s.turns[k - 1].instruction
    if k == 1 and s.global_constraint is not None:
        assert instr.startswith(s.global_constraint.text + " "), instr
        return instr[len(s.global_constraint.text) + 1:]
    return instr


# ===================================================================== render -> parse

LAYOUTS = ((0, 2, 6, 8), (1, 3, 5, 7), (4, 6, 2, 0))   # every cell at least once


def _combo_scenes(background: str) -> list[Scene]:
    """Every (colour, size, fill) with the four shapes, in three layouts: each
    (shape, size, fill, colour) combination appears at three cells on this background."""
    scenes = []
    for color, size, fill, layout in itertools.product(COLORS, SIZES, FILLS, LAYOUTS):
        objs = [Obj(i, shape, color, size, fill, cell) for i, (shape, cell) in enumerate(zip(SHAPES, layout))]
        scenes.append(Scene(background, tuple(objs)))
    return scenes


def _random_full_scenes(n: int, seed: int) -> list[Scene]:
    """Nine objects of random attributes: neighbours of every colour pairing."""
    rng = np.random.default_rng(seed)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    return [Scene(pick(tuple(BACKGROUNDS)),
                  tuple(Obj(c, pick(SHAPES), pick(tuple(COLORS)), pick(SIZES), pick(FILLS), c) for c in range(9)))
            for _ in range(n)]


def _assert_parses_back(img: np.ndarray, scene: Scene, what: str) -> None:
    p = parse(img)
    got = sorted((_key(d) for d in p.objects), key=repr)
    want = sorted((_key(o) for o in scene.objects), key=repr)
    assert p.background == scene.background, what
    assert got == want, f"{what}: missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}"
    assert p.residue == [], f"{what}: residue {[(r.cell, r.area, r.peak) for r in p.residue]}"


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_render_parse_round_trip_every_combination(background):
    scenes = _combo_scenes(background)
    assert len(scenes) == len(COLORS) * len(SIZES) * len(FILLS) * len(LAYOUTS)
    for sc in scenes:
        img = render(sc)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        _assert_parses_back(img, sc, f"clean {sc}")
        assert parse(img).texture_fraction == 0.0


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_render_parse_round_trip_degraded(background):
    for j, sc in enumerate(_combo_scenes(background)):
        img = render(sc)
        for seed in (0, 1, 2):
            _assert_parses_back(degrade(img, np.random.default_rng([seed, j])), sc, f"degraded seed {seed} {sc}")


def test_render_parse_round_trip_full_grids():
    for j, sc in enumerate(_random_full_scenes(30, seed=4)):
        _assert_parses_back(render(sc), sc, f"clean {sc}")


def test_render_parse_round_trip_degraded_full_grids():
    # seed 5: the known blue/purple confusion (next test) does not occur in these draws
    for j, sc in enumerate(_random_full_scenes(20, seed=5)):
        img = render(sc)
        for seed in (0, 1):
            _assert_parses_back(degrade(img, np.random.default_rng([seed, j])), sc, f"degraded seed {seed} {sc}")


def test_degraded_thin_blue_stroke_is_not_read_as_purple():
    sc = Scene("white", (Obj(0, "triangle", "blue", "small", "hollow", 2), Obj(1, "circle", "purple", "small", "hollow", 8)))
    _assert_parses_back(degrade(render(sc), np.random.default_rng([0, 3])), sc, "blue hollow triangle + purple")


def test_render_is_exact_and_deterministic():
    sc = _random_full_scenes(1, seed=9)[0]
    a, b = render(sc), render(sc)
    assert np.array_equal(a, b)
    palette = {tuple(c) for c in list(COLORS.values()) + list(BACKGROUNDS.values())}
    assert {tuple(px) for px in a.reshape(-1, 3)} <= palette     # alias-free: only palette colours


# ========================================================= parse against the direct formulation

def _reference_classify(comp, tmap, cx, cy, geom):
    h, w = comp.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    filled = ndimage.binary_fill_holes(comp)
    best = (None, None, 0.0)
    for shape in SHAPES:
        for size in SIZES:
            t = shape_mask(shape, "solid", geom.half(size), dx, dy)
            iou = np.count_nonzero(filled & t) / max(1, np.count_nonzero(filled | t))
            if iou > best[2]:
                best = (shape, size, iou)
    shape, size, iou = best
    if shape is None or iou < MIN_IOU:
        return None, None, None, iou
    r = geom.half(size)
    hole = shape_mask(shape, "solid", r, dx, dy) & ~shape_mask(shape, "hollow", r, dx, dy)
    level = float(tmap[hole].mean()) if hole.any() else 1.0
    return shape, size, "solid" if level > HOLLOW_LEVEL else "hollow", float(iou)


def _reference_parse(img, canvas=None):
    """parse() written directly (numpy reductions over short rows, scipy morphology on whole
    images, templates rebuilt per component): the optimised parse must match it to the bit."""
    H, W, _ = img.shape
    geom = Geometry(canvas or H)
    x = img.astype(np.float32) / 255.0
    flat, pal = x.reshape(-1, 3), _PALETTE / 255.0
    d2 = (flat ** 2).sum(1, keepdims=True) - 2.0 * flat @ pal.T + (pal ** 2).sum(1)[None]
    nearest = d2.argmin(1)
    lab = nearest.reshape(H, W)
    ring = max(1, int(round(geom.margin)))
    border = np.concatenate([lab[:ring].ravel(), lab[-ring:].ravel(), lab[:, :ring].ravel(), lab[:, -ring:].ravel()])
    bg_idx = int(np.bincount(border, minlength=len(PALETTE_NAMES)).argmax())
    close = d2[np.arange(nearest.size), nearest] < PRESENT_DISTANCE ** 2
    confident = np.bincount(nearest[close], minlength=len(PALETTE_NAMES))
    present = [ci for ci in range(N_OBJ_COLORS) if ci != bg_idx and confident[ci] >= PRESENT_MIN_PIXELS]
    square, objects = np.ones((3, 3), bool), []
    if present:
        axes, rel = pal[present] - pal[bg_idx], flat - pal[bg_idx]
        t_all = (rel @ axes.T) / (axes ** 2).sum(1)[None]
        tc = np.clip(t_all, 0.0, 1.0)
        best = ((rel[:, None, :] - tc[..., None] * axes[None]) ** 2).sum(-1).argmin(1)
        owner = np.where(t_all[np.arange(best.size), best] > 0.5, best + 1, 0).reshape(H, W)
    for pi, ci in enumerate(present, start=1):
        member = owner == pi
        rows, cols = np.flatnonzero(member.any(1)), np.flatnonzero(member.any(0))
        r0, r1, c0, c1 = max(0, rows[0] - 2), min(H, rows[-1] + 3), max(0, cols[0] - 2), min(W, cols[-1] + 3)
        member[r0:r1, c0:c1] = ndimage.binary_closing(member[r0:r1, c0:c1], structure=square)
        comps, _ = ndimage.label(member, structure=square)
        tmap, sizes = t_all[:, pi - 1].reshape(H, W), np.bincount(comps.ravel())
        for k, sl in enumerate(ndimage.find_objects(comps), start=1):
            if sl is None or sizes[k] < max(4, int(15 * geom.scale ** 2)):
                continue
            x0, x1, y0, y1 = sl[1].start, sl[1].stop - 1, sl[0].start, sl[0].stop - 1
            cx, cy = (x0 + x1 + 1) / 2.0, (y0 + y1 + 1) / 2.0
            pad = int(round(3 * geom.scale))
            X0, Y0, X1, Y1 = max(0, x0 - pad), max(0, y0 - pad), min(W, x1 + pad + 1), min(H, y1 + pad + 1)
            crop = comps[Y0:Y1, X0:X1] == k
            shape, size, fill, iou = _reference_classify(crop, tmap[Y0:Y1, X0:X1], cx - X0, cy - Y0, geom)
            cell = geom.cell_of(cx, cy)
            if cell is not None and max(abs(cx - geom.center(cell)[0]), abs(cy - geom.center(cell)[1])) > 3 * geom.scale:
                cell = None
            full = np.zeros((H, W), bool)
            full[Y0:Y1, X0:X1] = crop
            objects.append((COLORS_NAMES[ci], shape, size, fill, cell, (cx, cy), (x0, y0, x1, y1), int(sizes[k]), iou, full))
    dilate = lambda m, k: ndimage.maximum_filter(m, size=2 * k + 1, mode="constant", cval=False)  # noqa: E731
    free = ~dilate(lab != bg_idx, max(1, int(round(2 * geom.scale))))
    bg_rgb = np.median(x[free] if free.any() else x.reshape(-1, 3), axis=0)
    r = max(1, int(round(2 * geom.scale)))
    box = lambda size: np.sqrt((ndimage.uniform_filter(x - bg_rgb, size=(size, size, 1), mode="nearest") ** 2).sum(-1))  # noqa: E731
    dev3, dev = box(3), box(2 * r + 1)
    excl = dilate(np.logical_or.reduce([o[-1] for o in objects] + [np.zeros((H, W), bool)]),
                  max(1, int(round(3 * geom.scale))))
    sel = free & ~excl
    pairs = np.concatenate([(x[:, 1:] - x[:, :-1])[sel[:, 1:] & sel[:, :-1]], (x[1:] - x[:-1])[sel[1:] & sel[:-1]]])
    sigma = 0.0
    if len(pairs) >= 64:
        mad = np.asarray([np.median(np.abs(c - np.median(c))) for c in pairs.T], np.float32)
        per_channel = np.float32(1.4826 / np.sqrt(2.0)) * mad
        sigma = float(np.sqrt(np.mean(per_channel * per_channel)))
    residue = []
    comps, _ = ndimage.label((dev > max(RESIDUE_FLOOR, RESIDUE_NOISE_K * sigma)) & ~excl, structure=square)
    for k, sl in enumerate(ndimage.find_objects(comps), start=1):
        m = comps[sl] == k
        if m.sum() >= max(4, int(8 * geom.scale ** 2)):
            full = np.zeros((H, W), bool)
            full[sl] = m
            cx, cy = (sl[1].start + sl[1].stop) / 2.0, (sl[0].start + sl[0].stop) / 2.0
            residue.append((geom.cell_of(cx, cy), (cx, cy), int(m.sum()), float(dev[full].max()), full))
    texture = float((dev3[~excl] > TEXTURE_THRESHOLD).mean()) if (~excl).any() else 0.0
    return PALETTE_NAMES[bg_idx] if bg_idx >= N_OBJ_COLORS else None, objects, residue, texture


def _regression_images() -> list[tuple[str, np.ndarray, int]]:
    """A few dozen images that reach every branch of parse: ground truth clean and degraded,
    faults (ghost, moved object), texture, other canvases, noise, colour blobs cut by the
    image's edges and a background that is an object colour."""
    out = []
    for i in range(3):
        s = sample_session(21, i, GrammarConfig(turns=3))
        scenes = session_scenes(s)
        rng = np.random.default_rng([21, i])
        for k in range(1, 4):
            img = render(scenes[k])
            out += [(f"s{i} turn {k}", img, 64), (f"s{i} turn {k} degraded", degrade(img, rng), 64)]
        for fault in ("ghost", "other_moved", "wrong_fill"):
            for k in range(1, 4):
                img = make_fault(fault, s, k, scenes, rng)
                if img is not None:
                    out.append((f"s{i} {fault}", degrade(img, rng, blur=(0.8, 1.3), noise=0.08), 64))
                    break
        out.append((f"s{i} texture", degrade(add_texture(render(scenes[1]), rng), rng), 64))
    for canvas in (48, 100):
        s = sample_session(22, 0, GrammarConfig(turns=2, canvas=canvas))
        img = render(session_scenes(s)[2])
        out += [(f"canvas {canvas}", img, canvas), (f"canvas {canvas} degraded", degrade(img, np.random.default_rng(canvas)), canvas)]
    rng = np.random.default_rng(23)
    palette = list(COLORS.values()) + list(BACKGROUNDS.values())
    out.append(("noise", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), 64))
    out.append(("object-colour background", np.full((64, 64, 3), COLORS["red"], np.uint8), 64))
    for j in range(5):
        img = np.empty((64, 64, 3), np.uint8)
        img[:] = palette[6 + j % 3]
        for _ in range(8):
            y, x = rng.integers(0, 60, 2)
            h, w = rng.integers(3, 20, 2)
            img[y:y + h, x:x + w] = palette[int(rng.integers(6))]
        img[40 + j:58, 56 + j:] = palette[j]                        # cut by the right edge
        out.append((f"blobs {j}", degrade(img, rng) if j % 2 else img, 64))
    return out


def test_parse_matches_the_direct_formulation():
    images = _regression_images()
    assert any(d.bbox[2] == c - 2 for _, img, c in images for d in parse(img, c).objects)  # closed at the edge
    for what, img, canvas in images:
        p = parse(img, canvas)
        background, objects, residue, texture = _reference_parse(img, canvas)
        assert p.background == background and p.canvas == canvas, what
        assert p.texture_fraction == texture, what
        assert len(p.objects) == len(objects), what
        for d, ref in zip(p.objects, objects):
            assert (d.color, d.shape, d.size, d.fill, d.cell, d.center, d.bbox, d.area, d.iou) == ref[:-1], what
            assert np.array_equal(d.mask, ref[-1]), what
        assert [(r.cell, r.center, r.area, r.peak) for r in p.residue] == [r[:-1] for r in residue], what
        assert all(np.array_equal(r.mask, ref[-1]) for r, ref in zip(p.residue, residue)), what


def test_judge_footprint_cache_and_matching_are_the_direct_ones():
    geom = Geometry(64)
    for o in (Obj(0, "triangle", "red", "large", "hollow", 0), Obj(1, "circle", "blue", "small", "solid", 8)):
        direct = ndimage.binary_dilation(object_mask(o, geom), iterations=2)
        assert np.array_equal(_footprint(o.shape, o.fill, o.size, o.cell, 64), direct)
    for what, img, canvas in _regression_images()[:12]:
        s = sample_session(21, int(what[1]), GrammarConfig(turns=3))
        expected, parsed = session_scenes(s)[-1], parse(img, canvas)
        matched, extras = match(expected, parsed)
        assert all(len(diff_attrs(o, matched[o.id])) <= 3 for o in expected.objects if matched[o.id] is not None)
        assert len(extras) == len(parsed.objects) - sum(d is not None for d in matched.values())


def _palette_exact_images() -> list[tuple[str, np.ndarray]]:
    """Images of palette colours only: renders (objects of every kind, full grids, every
    background) and rectangles of palette colours (specks below the minimum area, touching
    colours, thin strokes, blobs cut by the edge, backgrounds that are object colours)."""
    out = [(f"combo {sc}", render(sc)) for bg in BACKGROUNDS for sc in _combo_scenes(bg)[::5]]
    out += [(f"full {i}", render(sc)) for i, sc in enumerate(_random_full_scenes(12, seed=6))]
    rng = np.random.default_rng(41)
    palette = np.asarray(list(COLORS.values()) + list(BACKGROUNDS.values()), np.uint8)
    for j in range(40):
        img = np.empty((64, 64, 3), np.uint8)
        img[:] = palette[int(rng.integers(len(palette)))]
        for _ in range(int(rng.integers(1, 14))):
            y, x = rng.integers(0, 63, 2)
            h, w = rng.integers(1, 20, 2)
            img[y:y + h, x:x + w] = palette[int(rng.integers(len(palette)))]
        out.append((f"rectangles {j}", img))
    return out


def test_palette_exact_shortcuts_equal_the_general_path(monkeypatch):
    """A palette-exact image takes parse's shortcuts (table snap, owners decided per colour,
    the 3x3 filter skipped where the region is plain background): forcing the general path
    gives the same result, to the bit."""
    import editrl.world.parse as P

    assert P._SEPARATED and P._CLEAR_OWNERS     # the shipped palette has the margins the shortcuts need
    images = _palette_exact_images()
    assert all(P._palette_index(img) is not None for _, img in images)
    off = images[-1][1].copy()
    off[5, 7, 1] += 1                           # one channel of one pixel off the palette
    assert P._palette_index(off) is None
    fast = [parse(img) for _, img in images]
    monkeypatch.setattr(P, "_palette_index", lambda img: None)
    for (what, img), p in zip(images, fast):
        q = parse(img)
        assert (p.background, p.texture_fraction, p.canvas) == (q.background, q.texture_fraction, q.canvas), what
        assert type(p.texture_fraction) is type(q.texture_fraction), what
        assert [(d.color, d.shape, d.size, d.fill, d.cell, d.center, d.bbox, d.area, d.iou) for d in p.objects] == \
            [(d.color, d.shape, d.size, d.fill, d.cell, d.center, d.bbox, d.area, d.iou) for d in q.objects], what
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(p.objects, q.objects)), what
        assert [(r.cell, r.center, r.area, r.peak) for r in p.residue] == [(r.cell, r.center, r.area, r.peak) for r in q.residue], what
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(p.residue, q.residue)), what


def test_fast_png_reader_gives_load_pngs_pixels(tmp_path):
    """The judge phase's PNG reader: the pixels of render.load_png for plain RGB PNGs, and
    None (the caller then reads the file the ordinary way) for anything else."""
    from PIL import Image, PngImagePlugin

    from editrl.world._fastparse import read_png
    from editrl.world.render import load_png, save_png

    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    save_png(img, tmp_path / "saved.png")
    (tmp_path / "bytes.png").write_bytes(png_bytes(render(_random_full_scenes(1, seed=2)[0])))
    info = PngImagePlugin.PngInfo()
    info.add_text("note", "x" * 300, zip=True)
    Image.fromarray(img).save(tmp_path / "text.png", pnginfo=info, optimize=True)
    Image.fromarray(img).save(tmp_path / "trns.png", transparency=(1, 2, 3), compress_level=0)
    for name in ("saved", "bytes", "text", "trns"):
        got = read_png(tmp_path / f"{name}.png")
        assert got is not None and got.flags.writeable and np.array_equal(got, load_png(tmp_path / f"{name}.png")), name
    Image.fromarray(img).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(img).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(img).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(img).save(tmp_path / "jpeg.png", format="JPEG")
    data = (tmp_path / "saved.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[:len(data) // 2])
    (tmp_path / "bad_crc.png").write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("palette", "rgba", "grey", "jpeg", "truncated", "bad_crc", "empty", "missing"):
        assert read_png(tmp_path / f"{name}.png") is None, name


# ============================================================================ grammar

@pytest.mark.parametrize("turns", range(1, 11))
def test_every_session_length_samples(turns):
    cfg = GrammarConfig(turns=turns)
    for i in range(15):
        s = sample_session(3, i, cfg)
        assert s.n_turns == turns and len(session_scenes(s)) == turns + 1
        Session.model_validate_json(session_to_json(s))


@pytest.mark.parametrize("turns", [0, 11, -1])
def test_turns_out_of_range_rejected(turns):
    with pytest.raises(ValueError, match="turns"):
        GrammarConfig(turns=turns)


def test_determinism():
    cfg = GrammarConfig(turns=4)
    for i in range(20):
        assert session_to_json(sample_session(5, i, cfg)) == session_to_json(sample_session(5, i, GrammarConfig(turns=4)))
    by_index = {session_to_json(sample_session(5, i, cfg)).replace(f"s{i:05d}", "ID").split('"meta"')[0]
                for i in range(20)}
    assert len(by_index) == 20
    assert session_to_json(sample_session(5, 0, cfg)) != session_to_json(sample_session(6, 0, cfg))


def test_all_edit_types_and_constraints_occur(corpus):
    types = Counter(t.task_type for s, _ in corpus for t in s.turns)
    assert set(types) == set(EDIT_TYPES), types
    assert min(types.values()) >= 30, types
    kinds = Counter(s.global_constraint.kind for s, _ in corpus if s.global_constraint is not None)
    assert len(kinds) >= 3, kinds


@pytest.mark.parametrize("share", [0.0, 0.3, 0.7, 1.0])
def test_constraint_share(share):
    n = 300
    got = sum(sample_session(2, i, GrammarConfig(turns=1, constraint_share=share)).global_constraint is not None
              for i in range(n))
    tol = 4 * math.sqrt(share * (1 - share) / n) + 1e-9        # four binomial standard deviations
    assert abs(got / n - share) <= tol, (got, n, share)


def test_excluded_types_never_appear_under_a_rule(corpus):
    for s, _ in corpus:
        if s.global_constraint is not None:
            assert not {t.task_type for t in s.turns} & set(EXCLUDES[s.global_constraint.kind]), s.id


# ---------------------------------------------------------------- referring expressions

_MOD = "|".join((*SIZES, "hollow", *COLORS))
_SHAPE = "|".join(SHAPES)
_LOC = (rf"(?: in the (?P<row>{'|'.join(ROWS)}) row| in the (?P<col>{'|'.join(COLS)}) column"
        rf"| at the (?P<cell>{'|'.join(CELL_NAMES)}))?")
_EXPR = re.compile(rf"(?:(?P<mod>{_MOD}) )?(?P<shape>{_SHAPE}){_LOC}")
_THE_EXPR = re.compile(rf"\bthe ((?:(?:{_MOD}) )?(?:{_SHAPE})(?: in the \w+ (?:row|column)| at the (?:{'|'.join(CELL_NAMES)}))?)\b")
_PRONOUN = re.compile(r"\b(it|its)\b", re.I)


def _read(scene: Scene, expr: str) -> list[Obj]:
    """The test's own reader of a referring expression: every object of `scene` it fits."""
    m = _EXPR.fullmatch(expr)
    assert m, f"not an expression of the grammar: {expr!r}"
    mod = m["mod"]
    hits = []
    for o in scene.objects:
        if o.shape != m["shape"] or (mod and mod not in (o.size, o.fill, o.color)):
            continue
        if m["row"] and ROWS[o.cell // 3] != m["row"]:
            continue
        if m["col"] and COLS[o.cell % 3] != m["col"]:
            continue
        if m["cell"] and CELL_NAMES[o.cell] != m["cell"]:
            continue
        hits.append(o)
    return hits


def _expressions(body: str, turn) -> list[str]:
    """The referring expressions in an instruction body (a move's destination removed first)."""
    if turn.task_type == "position":
        dest = turn.params["cell"]
        for tail in (f" to the {dest}", f" at the {dest}"):
            if body.endswith(tail):
                body = body[: -len(tail)]
                break
        else:
            raise AssertionError(f"destination {dest!r} not at the end of {body!r}")
    return _THE_EXPR.findall(body)


def test_candidates_all_resolve_uniquely(corpus):
    n = 0
    for s, scenes in corpus:
        for k, t in enumerate(s.turns, start=1):
            if t.task_type in ("add", "background"):
                continue
            prev = scenes[k - 1]
            target = prev.get(int(t.target["id"]))
            cands = referring_candidates(prev, target)
            assert cands and cands[-1] == f"{target.color} {target.shape} at the {CELL_NAMES[target.cell]}"
            for c in cands:
                assert resolve_reference(prev, c) == [target], (s.id, k, c)
                assert resolve_reference(prev, "the " + c) == [target], (s.id, k, c)
                assert _read(prev, c) == [target], (s.id, k, c)
                n += 1
    assert n > 1000


def test_referring_expressions_unambiguous_in_the_scene_the_user_sees(corpus):
    n = 0
    for s, scenes in corpus:
        for k, t in enumerate(s.turns, start=1):
            if t.task_type not in TARGETED or t.pronoun:
                continue
            body, prev = _body(s, k), scenes[k - 1]
            target = prev.get(int(t.target["id"]))
            assert not _PRONOUN.search(body), (s.id, k, body)
            exprs = _expressions(body, t)
            assert len(exprs) == 1, (s.id, k, body, exprs)
            expr = exprs[0]
            assert _read(prev, expr) == [target], (s.id, k, body, prev.to_dict())
            assert resolve_reference(prev, expr) == [target], (s.id, k, body)
            assert expr in referring_candidates(prev, target)
            n += 1
    assert n > 500


def test_count_instructions_name_one_category(corpus):
    n = 0
    for s, scenes in corpus:
        for k, t in enumerate(s.turns, start=1):
            if t.task_type != "count":
                continue
            prev, body = scenes[k - 1], _body(s, k)
            target = prev.get(int(t.target["id"]))
            want = int(t.params["count"])
            same_pair = [o for o in prev.objects if (o.color, o.shape) == (target.color, target.shape)]
            assert {o.category() for o in same_pair} == {target.category()}, (s.id, k)
            if t.pronoun:
                assert body == "Duplicate it" and len(same_pair) == 1 and want == 2
            else:
                assert f"{target.color} {target.shape}s" in body and NUM_WORDS[want] in body.split(), body
                assert not _PRONOUN.search(body)
            n += 1
    assert n > 50


def test_protect_rule_names_one_object_which_never_changes(corpus):
    n = 0
    for s, scenes in corpus:
        gc = s.global_constraint
        if gc is None or gc.kind != "protect":
            continue
        pid = int(gc.value["id"])
        protected = scenes[0].get(pid)
        assert gc.value["object"] == protected.describe()
        exprs = _THE_EXPR.findall(gc.text)
        assert len(exprs) == 1 and _read(scenes[0], exprs[0]) == [protected], gc.text
        for k, t in enumerate(s.turns, start=1):
            assert scenes[k].has(pid) and scenes[k].get(pid) == protected, (s.id, k)
            assert t.target is None or int(t.target["id"]) != pid or t.task_type == "add"
            assert t.explicit.endswith(f" and keep [{protected.describe()}] unchanged"), t.explicit
        n += 1
    assert n >= 10


def test_pronouns_refer_to_the_previous_single_edited_object(corpus):
    possible = used = 0
    for s, scenes in corpus:
        assert not s.turns[0].pronoun
        for k in range(2, s.n_turns + 1):
            t, before = s.turns[k - 1], s.turns[k - 2]
            if before.task_type in SINGLE:
                possible += 1
                used += t.pronoun
            if not t.pronoun:
                continue
            assert before.task_type in SINGLE, (s.id, k)
            assert int(t.target["id"]) == int(before.target["id"]), (s.id, k)
            assert scenes[k - 1].has(int(t.target["id"]))
            body = _body(s, k)
            assert _PRONOUN.search(body) and not _THE_EXPR.findall(body), (s.id, k, body)
    share = used / possible
    assert possible > 300 and share >= 1 / 3, (used, possible)


def test_no_pronouns_when_disabled():
    for i in range(60):
        assert not any(t.pronoun for t in sample_session(1, i, GrammarConfig(turns=5, pronoun_prob=0.0)).turns)


# ---------------------------------------------------------------- explicit and expected

_BRACKETS = re.compile(r"\[([^\[\]]+)\]")


def test_explicit_is_bracketed_and_resolves_the_object(corpus):
    for s, scenes in corpus:
        for k, t in enumerate(s.turns, start=1):
            assert t.expected is not None and t.explicit, (s.id, k)
            parts = _BRACKETS.findall(t.explicit)
            assert parts, t.explicit
            # the only pronoun allowed is the rule's "and make it [value]", about the bracketed object
            assert not _PRONOUN.search(t.explicit.replace(" and make it [", " [")), t.explicit
            prev, nxt = scenes[k - 1], scenes[k]
            if t.task_type == "add":
                new = nxt.get(int(t.target["id"]))
                assert parts[:2] == [new.full_name(), CELL_NAMES[new.cell]], t.explicit
            elif t.task_type == "background":
                assert parts[0] == nxt.background
            elif t.task_type == "count":
                target = prev.get(int(t.target["id"]))
                assert parts[:2] == [f"{target.color} {target.shape}", str(t.params["count"])]
            else:
                assert parts[0] == prev.get(int(t.target["id"])).describe(), (t.explicit, prev.to_dict())


def test_apply_edit_reproduces_expected_up_to_ids(corpus):
    for s, scenes in corpus:
        for k, t in enumerate(s.turns, start=1):
            got = apply_edit(scenes[k - 1], edit_from_turn(t)).to_dict()
            assert _strip_ids(got) == _strip_ids(t.expected), (s.id, k, t.instruction)
            if t.task_type not in ("add", "count"):
                assert got == t.expected, (s.id, k)


def test_apply_edit_reproduces_expected_ids_after_a_removal():
    s = sample_session(0, 6, GrammarConfig(turns=5))     # turn 4 removes object 3, turn 5 adds
    scenes = session_scenes(s)
    t = s.turns[4]
    assert t.task_type == "add"
    assert apply_edit(scenes[4], edit_from_turn(t)).to_dict() == t.expected


def test_pairs_unique_except_exact_copies(corpus):
    for s, scenes in corpus:
        for k, sc in enumerate(scenes):
            assert sc.pairs_unique_except_categories(), (s.id, k)
            by_pair: dict = {}
            for o in sc.objects:
                by_pair.setdefault((o.color, o.shape), set()).add(o.category())
            assert all(len(v) == 1 for v in by_pair.values())


def _duplicate_not_from_count(s: Session, scenes: list[Scene]) -> tuple | None:
    """First (turn, pair) where two objects share (colour, shape) but are not copies made by a count edit."""
    root = {o.id: o.id for o in scenes[0].objects}          # object id -> the object it was copied from
    for k, t in enumerate(s.turns, start=1):
        for o in scenes[k].objects:
            if o.id not in root:
                root[o.id] = root[int(t.target["id"])] if t.task_type == "count" else o.id
        groups: dict = {}
        for o in scenes[k].objects:
            groups.setdefault((o.color, o.shape), set()).add(root[o.id])
        for pair, roots in groups.items():
            if len(roots) > 1:
                return k, pair, t.task_type, t.instruction
    return None


def test_duplicate_pairs_only_from_count_edits(corpus):
    bad = [(s.id, hit) for s, scenes in corpus if (hit := _duplicate_not_from_count(s, scenes))]
    assert not bad, f"{len(bad)} sessions, first: {bad[:3]}"


def test_governed_turns_carry_the_rule(corpus):
    seen = Counter()
    for s, scenes in corpus:
        gc = s.global_constraint
        if gc is None or gc.kind not in GOVERNS:
            continue
        attr = "color" if gc.kind == "color_of_changes" else "fill"
        for k, t in enumerate(s.turns, start=1):
            if t.task_type in GOVERNS[gc.kind]:
                assert t.params["governed"] is True, (s.id, k)
                if t.task_type == "add":     # the rule's value is in the add's own params (see the xfail below)
                    assert t.params[attr] == gc.value
                    assert not re.search(rf"\b{gc.value}\b", _body(s, k)), (s.id, k, t.instruction)
                else:
                    assert t.params["also"] == {attr: gc.value}, (s.id, k)
                edited = scenes[k].get(int(t.target["id"]))
                assert getattr(edited, attr) == gc.value, (s.id, k)
                assert gc.value in " ".join(_BRACKETS.findall(t.explicit)), t.explicit
                seen[(gc.kind, t.task_type)] += 1
            else:
                assert t.params["governed"] is False and "also" not in t.params, (s.id, k)
    assert ("color_of_changes", "add") in seen and ("fill_of_changes", "add") in seen, seen
    assert len(seen) >= 6, seen


def _governed_add(corpus, kind: str):
    for s, scenes in corpus:
        if s.global_constraint is not None and s.global_constraint.kind == kind:
            for k, t in enumerate(s.turns, start=1):
                if t.task_type == "add":
                    return s, scenes, k
    raise AssertionError(f"no governed add under {kind}")


@pytest.mark.parametrize("kind", ["color_of_changes", "fill_of_changes"])
def test_governed_add_is_judged_by_ga(corpus, kind):
    s, scenes, k = _governed_add(corpus, kind)
    t, gc = s.turns[k - 1], s.global_constraint
    prev, nxt = scenes[k - 1], scenes[k]
    ok = judge_turn(render(nxt), prev, nxt, t, k, gc, s.id)
    assert ok.GA.status == "pass", ok.GA
    attr = "color" if kind == "color_of_changes" else "fill"
    new = nxt.get(int(t.target["id"]))
    other = next(v for v in (COLORS if attr == "color" else FILLS) if v != gc.value)
    broken = nxt.with_objects([o for o in nxt.objects if o.id != new.id] + [Obj(new.id, **{**new.attrs(), attr: other})])
    v = judge_turn(render(broken), prev, nxt, t, k, gc, s.id)
    assert v.GA.status == "fail" and v.IF.status == "pass", (v.GA, v.IF)


def test_ungoverned_add_names_every_attribute(corpus):
    for s, scenes in corpus:
        if s.global_constraint is not None and s.global_constraint.kind in GOVERNS:
            continue
        for k, t in enumerate(s.turns, start=1):
            if t.task_type == "add":
                new = scenes[k].get(int(t.target["id"]))
                words = _body(s, k).split()
                assert {new.color, new.shape, new.size} <= set(words), t.instruction
                assert new.fill == "solid" or "hollow" in words, t.instruction
                assert _body(s, k).endswith(f"at the {CELL_NAMES[new.cell]}")


# ============================================================================== judge

def _post(degraded: bool, rng: np.random.Generator):
    return (lambda im: degrade(im, rng)) if degraded else (lambda im: im)


def _assert_scores(v) -> None:
    for name in CHECKS:
        c = getattr(v, name)
        assert (c.status is None) == (c.score is None), (name, c)
        if c.score is not None:
            assert 0.0 <= c.score <= 1.0, (name, c)


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "degraded"])
def test_ground_truth_passes_every_applicable_check(corpus, degraded):
    rng = np.random.default_rng(17)
    post = _post(degraded, rng)
    for s, scenes in corpus[:100]:
        gc = s.global_constraint
        for k, t in enumerate(s.turns, start=1):
            v = judge_turn(post(render(scenes[k])), scenes[k - 1], scenes[k], t, k, gc, s.id)
            assert v.success is True, (s.id, k, t.instruction, {c: getattr(v, c).reason for c in v.failed()})
            _assert_scores(v)
            assert v.IF.status == "pass" and v.CC.status == "pass"
            assert v.IF.score == 1.0
            # applicability
            ga_applies = gc is not None and (gc.kind == "protect" or bool(t.params.get("governed")))
            if not (ga_applies and t.task_type == "add" and gc.kind != "protect"):  # see test_governed_add_is_judged_by_ga
                assert (v.GA.status is not None) == ga_applies, (s.id, k, gc, t.task_type)
            assert (v.CU.status is not None) == t.pronoun, (s.id, k)
            if not degraded:
                assert v.CC.score == 1.0


def test_checks_not_applicable_are_none(corpus):
    """GA without a rule and CU without a pronoun stay None even on a wrong image."""
    for s, scenes in corpus[:40]:
        if s.global_constraint is not None:
            continue
        for k, t in enumerate(s.turns, start=1):
            if t.pronoun:
                continue
            v = judge_turn(render(scenes[k - 1]), scenes[k - 1], scenes[k], t, k, None, s.id)
            assert v.GA.status is None and v.GA.score is None
            assert v.CU.status is None and v.CU.score is None
            assert v.success is False and "IF" in v.failed()


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "degraded"])
def test_every_fault_is_caught(corpus, degraded):
    want = 8
    counts: Counter = Counter()
    missed = []
    rng = np.random.default_rng([23, degraded])
    post = _post(degraded, rng)
    faults = [f for f in FAULTS if not (degraded and f in NOISE_HIDDEN)]
    for s, scenes in corpus:
        if min(counts[f] for f in faults) >= want:
            break
        for fault in faults:
            if counts[fault] >= want:
                continue
            for k in rng.permutation(s.n_turns) + 1:
                img = make_fault(fault, s, int(k), scenes, rng)
                if img is None:
                    continue
                t = s.turns[k - 1]
                v = judge_turn(post(img), scenes[k - 1], scenes[k], t, int(k), s.global_constraint, s.id)
                _assert_scores(v)
                counts[fault] += 1
                if v.success is not False:
                    missed.append((fault, s.id, int(k), t.instruction))
                break
    assert min(counts[f] for f in faults) >= want, counts
    assert not missed, missed


def test_faults_not_applicable_return_none(corpus):
    s, scenes = next((s, sc) for s, sc in corpus if s.global_constraint is None)
    rng = np.random.default_rng(0)
    for k in range(1, s.n_turns + 1):
        assert make_fault("constraint_violated", s, k, scenes, rng) is None
        if s.turns[k - 1].task_type != "count":
            assert make_fault("wrong_count", s, k, scenes, rng) is None
        if s.turns[k - 1].task_type not in ("remove", "position"):
            assert make_fault("ghost", s, k, scenes, rng) is None
            assert make_fault("faint_ghost", s, k, scenes, rng) is None
        if not s.turns[k - 1].pronoun:
            assert make_fault("pronoun_wrong_object", s, k, scenes, rng) is None


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "degraded"])
def test_graded_cc_falls_with_texture_and_ghosts(corpus, degraded):
    rng = np.random.default_rng(31)
    post = _post(degraded, rng)
    n_tex = n_ghost = 0
    for s, scenes in corpus[:60]:
        gc = s.global_constraint
        for k, t in enumerate(s.turns, start=1):
            clean = judge_turn(post(render(scenes[k])), scenes[k - 1], scenes[k], t, k, gc, s.id).CC.score
            if n_tex < 30:
                tex = judge_turn(post(add_texture(render(scenes[k]), rng)), scenes[k - 1], scenes[k], t, k, gc, s.id)
                assert 0.0 <= tex.CC.score < clean, (s.id, k, tex.CC.score, clean)
                n_tex += 1
            ghost = make_fault("ghost", s, k, scenes, rng)
            if ghost is not None:
                g = judge_turn(post(ghost), scenes[k - 1], scenes[k], t, k, gc, s.id)
                assert 0.0 <= g.CC.score < clean and g.success is False, (s.id, k, t.task_type, g.CC.score, clean)
                n_ghost += 1
    assert n_tex == 30 and n_ghost >= 20


def test_run_check_reports_perfect_judge():
    r = run_check(40, 3, workers=1)
    assert r["gt_pass_rate"] == 1.0 and r["perturbation_detect_rate"] == 1.0
    assert r["gt_turns"] == 120 and not r["gt_failures"] and not r["missed"]
    assert set(r["per_fault"]) == set(FAULTS)
    assert all(v["n"] > 0 and v["detect_rate"] == 1.0 for v in r["per_fault"].values()), r["per_fault"]
    g = r["graded_cc_mean"]
    assert g["ground_truth"] == 1.0 and g["texture"] < 1.0 and g["ghost"] < 1.0


def test_run_check_degraded_small():
    r = run_check(12, 4, degrade_images=True, workers=1)
    assert r["gt_pass_rate"] == 1.0 and r["perturbation_detect_rate"] == 1.0, (r["gt_failures"], r["missed"])
    assert all(r["per_fault"][f]["n"] == 0 for f in NOISE_HIDDEN)     # not checked under the noise


def test_clean_render_memory_and_position_table_are_exact(monkeypatch):
    """The clean path's per-plane memory and line-position table: a repeated parse (planes
    remembered), a fresh one (memory emptied) and the general path give the same result, and
    the remembered masks are not the ones handed out."""
    import editrl.world.parse as P

    images = [img for _, img in _palette_exact_images()[::3]]
    assert P._t_table(6, (0, 1, 2, 3, 4, 5), 64 * 64) is not None   # the table is in use here
    P._STRUCTURES.clear()
    first = [parse(img) for img in images]
    again = [parse(img) for img in images]
    P._STRUCTURES.clear()
    monkeypatch.setattr(P, "_palette_index", lambda img: None)
    general = [parse(img) for img in images]

    def fields(p):
        return (p.background, p.texture_fraction, p.canvas,
                [(d.color, d.shape, d.size, d.fill, d.cell, d.center, d.bbox, d.area, d.iou, d.mask.tobytes()) for d in p.objects],
                [(r.cell, r.center, r.area, r.peak, r.mask.tobytes()) for r in p.residue])

    for a, b, c in zip(first, again, general):
        assert fields(a) == fields(b) == fields(c)
        assert all(d.mask.flags.writeable for d in a.objects + b.objects)
    monkeypatch.undo()
    P._STRUCTURES.clear()
    i = next(i for i, p in enumerate(first) if p.objects)
    parse(images[i]).objects[0].mask[:] = True      # a caller's change does not reach the memory
    assert fields(parse(images[i])) == fields(general[i])


# ------------------------------------------------------------------------------ CU against the turn's input


def _pronoun_turns(corpus, types=TARGETED, limit=None):
    out = []
    for s, scenes in corpus:
        for k, t in enumerate(s.turns, start=1):
            if t.pronoun and t.task_type in types:
                out.append((s, scenes, k, t))
    return out[:limit]


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "degraded"])
def test_cu_with_the_turn_input_passes_on_ground_truth(corpus, degraded):
    rng = np.random.default_rng(41)
    post = _post(degraded, rng)
    turns = _pronoun_turns(corpus, types=EDIT_TYPES, limit=80)
    assert len(turns) == 80
    for s, scenes, k, t in turns:
        v = judge_turn(post(render(scenes[k])), scenes[k - 1], scenes[k], t, k, s.global_constraint, s.id,
                       source_image=post(render(scenes[k - 1])))
        assert v.CU.status == "pass" and v.CU.score == 1.0, (s.id, k, t.instruction, v.CU.reason)
        assert v.success is True


def test_cu_fails_when_the_edit_lands_on_another_object(corpus):
    rng = np.random.default_rng(43)
    n = 0
    for s, scenes, k, t in _pronoun_turns(corpus):
        img = make_fault("pronoun_wrong_object", s, k, scenes, rng)
        if img is None:
            continue
        for source in (None, render(scenes[k - 1])):
            v = judge_turn(img, scenes[k - 1], scenes[k], t, k, s.global_constraint, s.id, source_image=source)
            assert v.CU.status == "fail" and v.CU.score < 1.0, (s.id, k, t.instruction)
            assert "instead of" in v.CU.reason or "did not receive" in v.CU.reason
        n += 1
        if n == 30:
            break
    assert n == 30


def test_cu_fails_when_nothing_is_edited(corpus):
    for s, scenes, k, t in _pronoun_turns(corpus, limit=30):
        prev_img = render(scenes[k - 1])
        v = judge_turn(prev_img, scenes[k - 1], scenes[k], t, k, s.global_constraint, s.id, source_image=prev_img)
        assert v.CU.status == "fail" and v.CU.score == 0.5, (s.id, k, t.instruction)
        assert "did not receive the edit" in v.CU.reason


def test_cu_does_not_charge_a_defect_inherited_from_an_earlier_turn(corpus):
    """Another object already wrong in the turn's input, the edit right on the referent: CU
    passes against the input (CC still fails against the expected scene); without the input,
    the expected previous scene stands in and the inherited defect counts."""
    n = 0
    for s, scenes, k, t in _pronoun_turns(corpus, types=("color", "material", "size", "replace")):
        prev, tid = scenes[k - 1], int(t.target["id"])
        others = [o for o in prev.objects if o.id != tid]
        if not others:
            continue
        o = others[0]
        flipped = Obj(o.id, o.shape, o.color, o.size, "solid" if o.fill == "hollow" else "hollow", o.cell)
        bad_prev = prev.with_objects([flipped if x.id == o.id else x for x in prev.objects])
        out = render(apply_edit(bad_prev, edit_from_turn(t)))
        with_input = judge_turn(out, prev, scenes[k], t, k, s.global_constraint, s.id, source_image=render(bad_prev))
        without = judge_turn(out, prev, scenes[k], t, k, s.global_constraint, s.id)
        assert with_input.CU.status == "pass", (s.id, k, t.instruction, with_input.CU.reason)
        assert without.CU.status == "fail" and "instead of" in without.CU.reason
        assert with_input.CC.status == "fail" and without.CC.status == "fail"
        n += 1
        if n == 20:
            break
    assert n == 20


def test_cu_reads_the_requested_attribute_and_leaves_the_rest_to_if(corpus):
    """The referent recoloured as asked but also resized: the pronoun was resolved (CU pass),
    the edit is not exact (IF fail)."""
    n = 0
    for s, scenes, k, t in _pronoun_turns(corpus, types=("color", "material", "position", "replace")):
        nxt, tid = scenes[k], int(t.target["id"])
        o = nxt.get(tid)
        resized = Obj(o.id, o.shape, o.color, "small" if o.size == "large" else "large", o.fill, o.cell)
        out = render(nxt.with_objects([resized if x.id == tid else x for x in nxt.objects]))
        v = judge_turn(out, scenes[k - 1], nxt, t, k, s.global_constraint, s.id, source_image=render(scenes[k - 1]))
        assert v.CU.status == "pass", (s.id, k, t.instruction, v.CU.reason)
        assert v.IF.status == "fail" and "size" in v.IF.reason
        n += 1
        if n == 20:
            break
    assert n == 20


def test_cu_asks_which_object_was_edited_not_how_well(corpus):
    """The referent edited, but not to the asked value (another colour or shape, the wrong
    cell, one copy too many): the pronoun was resolved (CU pass); the edit is wrong (IF fail)."""
    from dataclasses import replace as with_

    other = {"color": tuple(COLORS), "shape": SHAPES, "fill": FILLS, "size": SIZES}
    seen: Counter = Counter()
    for s, scenes, k, t in _pronoun_turns(corpus, types=("color", "replace", "position", "count")):
        prev, nxt, tid = scenes[k - 1], scenes[k], int(t.target["id"])
        if t.task_type == "count":
            cat = prev.get(tid).category()
            had, want = len(prev.category_members(cat)), len(nxt.category_members(cat))
            if want <= had or not nxt.free_cells():
                continue
            # one copy too many ("duplicate it" made three): the right object, duplicated
            extra = with_(prev.get(tid), id=nxt.next_id, cell=nxt.free_cells()[0])
            out_scene = nxt.with_objects([*nxt.objects, extra])
        else:
            o = nxt.get(tid)
            attr = {"color": "color", "replace": "shape", "position": "cell"}[t.task_type]
            if attr == "cell":
                cells = [c for c in nxt.free_cells() if c != prev.get(tid).cell]
                if not cells:
                    continue
                wrong = cells[0]
            else:
                wrong = next(v for v in other[attr] if v not in (getattr(o, attr), getattr(prev.get(tid), attr))
                             and (attr != "color" or v != nxt.background))
            out_scene = nxt.with_objects([with_(o, **{attr: wrong}) if x.id == tid else x for x in nxt.objects])
        out = render(out_scene)
        v = judge_turn(out, prev, nxt, t, k, s.global_constraint, s.id, source_image=render(prev))
        assert v.CU.status == "pass" and v.CU.score == 1.0, (s.id, k, t.instruction, v.CU.reason)
        assert v.IF.status == "fail", (s.id, k, t.instruction)
        seen[t.task_type] += 1
    assert min(seen[x] for x in ("color", "replace", "position", "count")) >= 3, seen


def test_cu_passes_when_the_input_already_shows_the_asked_value(corpus):
    """An earlier turn's defect already gave the referent the asked value; the turn's output
    keeps it and is right: CU passes (the referent shows what was asked), as do IF and CC."""
    n = 0
    for s, scenes, k, t in _pronoun_turns(corpus, types=("color", "material", "size", "replace")):
        prev, nxt, tid = scenes[k - 1], scenes[k], int(t.target["id"])
        early = prev.with_objects([nxt.get(tid) if x.id == tid else x for x in prev.objects])
        v = judge_turn(render(nxt), prev, nxt, t, k, s.global_constraint, s.id, source_image=render(early))
        assert v.CU.status == "pass" and v.success, (s.id, k, t.instruction, v.CU.reason)
        n += 1
    assert n >= 20


def test_program_judge_equals_judge_turn_with_the_turn_input(corpus):
    """ProgramJudge remembers parses by exact image bytes (a pronoun turn's input is the turn
    before's output): its verdicts equal judge_turn's with `source_image`, on model-like
    images, whatever order the requests come in."""
    from editrl.judges import JudgeRequest, ProgramJudge

    rng = np.random.default_rng(47)
    reqs, want = [], []
    for s, scenes in corpus[:25]:
        imgs = [render(scenes[0])] + [degrade(render(scenes[k]), rng) for k in range(1, s.n_turns + 1)]
        for k in range(1, s.n_turns + 1):
            reqs.append(JudgeRequest(s, k, imgs[: k + 1]))
            want.append(judge_turn(imgs[k], scenes[k - 1], scenes[k], s.turns[k - 1], k, s.global_constraint, s.id,
                                   source_image=imgs[k - 1] if s.turns[k - 1].pronoun else None))
    assert sum(r.session.turns[r.turn - 1].pronoun for r in reqs) >= 20
    order = rng.permutation(len(reqs))
    judge = ProgramJudge()
    got = judge.judge([reqs[i] for i in order])
    for i, v in zip(order, got):
        assert v == want[i], (reqs[i].session.id, reqs[i].turn)
    assert judge.judge(reqs) == want                      # all remembered now


def test_program_judge_memory_is_bounded(corpus, monkeypatch):
    import editrl.judges.program as program

    monkeypatch.setattr(program, "_MEMORY_BYTES", 100_000)
    judge = program.ProgramJudge()
    for s, scenes in corpus[:10]:
        for sc in scenes:
            judge._parse(render(sc), sc.canvas)
            assert judge._bytes <= 100_000 and len(judge._parsed) >= 1
    assert judge._bytes == sum(size for _, size in judge._parsed.values())
    monkeypatch.setattr(program, "_MEMORY", 2)
    judge._parse(degrade(render(corpus[0][1][0]), np.random.default_rng(0)), 64)
    assert len(judge._parsed) == 2


def test_graded_if_ranks_a_wrong_fill_by_how_far_it_is_filled(corpus):
    """A shape asked solid but drawn with a hole fails IF whatever its fill level; its graded
    score rises as the hole fills in (a half-filled hole ranks above an empty outline), and
    stays within one attribute's share: between 1 - 1/n (a clean hole) and 1 - 0.5/n."""
    import dataclasses
    n_cases = 0
    for s, scenes in corpus:
        for k, t in enumerate(s.turns, start=1):
            if t.task_type not in ("replace", "size", "color") or t.target is None:
                continue
            tid = int(t.target["id"])
            o = scenes[k].get(tid)
            if o.fill != "solid" or "fill" in t.params.get("also", {}):
                continue
            hollow = scenes[k].with_objects([dataclasses.replace(x, fill="hollow") if x.id == tid else x
                                             for x in scenes[k].objects])
            full, empty = render(scenes[k]).astype(np.float32), render(hollow).astype(np.float32)
            scores = []
            for a in (0.0, 0.25, 0.5):   # all below HOLLOW_LEVEL: still read hollow
                img = np.clip(np.rint(empty * (1 - a) + full * a), 0, 255).astype(np.uint8)
                v = judge_turn(img, scenes[k - 1], scenes[k], t, k, s.global_constraint, s.id)
                assert v.IF.status == "fail" and "fill is hollow" in v.IF.reason, (s.id, k, v.IF)
                scores.append(v.IF.score)
            also = set(t.params.get("also", {}))
            n_asked = sum(a not in also or a == _requested_attr(t.task_type) for a in ATTRS)
            assert scores[0] < scores[1] < scores[2], (s.id, k, scores)
            assert 1 - 1 / n_asked - 1e-6 <= scores[0] and scores[2] <= 1 - 0.5 / n_asked + 1e-6, (s.id, k, scores)
            n_cases += 1
            break
        if n_cases >= 6:
            break
    assert n_cases >= 6
