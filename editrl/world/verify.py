"""The programmatic ShapesWorld judge: per turn IF, CC, GA, CU, binary and graded, with reasons.

The output image is parsed and its objects are matched to the expected scene after the turn
(Hungarian assignment on attribute disagreements). Then:

- IF: the requested change happened to the right object. For single-object edits the
  edited object must show every attribute the instruction asked for and keep the others
  (attributes imposed only by a global rule are GA's business); `remove`: no trace of the
  object (neither the object nor a faint residue where it was); `count`: exactly N copies,
  at the convention's cells; `background`: the new background.
  Graded IF is the share of the asked attributes the object shows; a wrong fill counts by
  how far its read level lies from the solid/hollow boundary (`_missed`).
- CC: nothing else changed, against the expected scene: every other object identical,
  no extra object, the background kept, no unexplained residue. Graded CC is the preserved
  fraction times a pixel term (share of free background that does not deviate), so it also
  falls with low-amplitude leftovers and texture.
- GA: where a global rule governs the turn, it holds (colour / fill of the edited object,
  or the protected object untouched).
- CU: on a pronoun turn, the object the pronoun denotes received the edit (the attribute
  the instruction is about shows the asked value or changed on it this turn; whether the
  value is right is IF's business) and no other object was changed by this turn (read
  against the turn's input image when the caller gives it, so inherited defects are not
  charged).
"""

from __future__ import annotations

from functools import lru_cache
from operator import attrgetter, ne

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from ..session import CheckResult, GlobalConstraint, Turn, TurnVerdict
from .parse import HOLLOW_LEVEL, Detection, Parsed, parse
from .render import object_mask
from .scene import ATTRS, CELL_NAMES, Geometry, Obj, Scene

_UNMATCHED_COST = 3.5  # match an expected object only if at most 3 of its 5 attributes differ
_attr_values = attrgetter(*ATTRS)  # (color, shape, size, fill, cell) of an Obj or a Detection


def _fmt(attr: str, val) -> str:
    if attr == "cell":
        return "off-grid" if val is None else CELL_NAMES[val]
    return str(val)


def diff_attrs(o: Obj, d: Detection) -> list[str]:
    return [k for k, differs in zip(ATTRS, map(ne, _attr_values(o), _attr_values(d))) if differs]


def match(expected: Scene, parsed: Parsed) -> tuple[dict[int, Detection | None], list[Detection]]:
    """expected object id -> detection (or None); plus the unmatched detections (extras)."""
    objs, dets = list(expected.objects), parsed.objects
    out: dict[int, Detection | None] = {o.id: None for o in objs}
    if not objs or not dets:
        return out, list(dets)
    n, m = len(objs), len(dets)
    det_values = [_attr_values(d) for d in dets]
    same: dict[tuple, list[int]] = {}                   # attribute values -> detections showing them
    for j, dv in enumerate(det_values):
        same.setdefault(dv, []).append(j)
    exact = [same.get(_attr_values(o), ()) for o in objs]
    if all(len(js) == 1 for js in exact) and len({js[0] for js in exact}) == n:
        # each expected object has exactly one detection with no differing attribute, each a
        # different one: the only assignment of cost 0, so the one the Hungarian solver finds
        used = {js[0] for js in exact}
        for o, js in zip(objs, exact):
            out[o.id] = dets[js[0]]
    else:
        cost = np.full((n, m + n), _UNMATCHED_COST)
        cost[:, :m] = [[sum(map(ne, _attr_values(o), dv)) for dv in det_values] for o in objs]  # differing attributes
        rows, cols = linear_sum_assignment(cost)
        used = set()
        for i, j in zip(rows, cols):
            if j < m and cost[i, j] < _UNMATCHED_COST:
                out[objs[i].id] = dets[j]
                used.add(j)
    return out, [d for j, d in enumerate(dets) if j not in used]


def _desc_det(d: Detection) -> str:
    return f"{d.size or '?'} {d.color} {d.fill or '?'} {d.shape or 'blob'} at {_fmt('cell', d.cell)}"


def _obj_report(o: Obj, d: Detection | None, attrs: list[str] | None = None) -> tuple[list[str], str]:
    """(differing attributes among `attrs`, reason)."""
    attrs = list(ATTRS) if attrs is None else attrs
    if d is None:
        return attrs, f"{o.describe()} not found"
    diffs = [a for a in diff_attrs(o, d) if a in attrs]
    if not diffs:
        return [], ""
    parts = ", ".join(f"{a} is {_fmt(a, d.attrs()[a])} (expected {_fmt(a, getattr(o, a))})" for a in diffs)
    return diffs, f"{o.describe()}: {parts}"


def _missed(o: Obj, d: Detection | None, diffs: list[str]) -> float:
    """How much of `diffs` (o's attributes that `d` gets wrong) is missed, for the graded
    score: 1 per attribute, except a wrong fill whose level was read, which counts from 0.5 (a
    hole read right at the solid/hollow boundary, HOLLOW_LEVEL) to 1 (a clean hole where solid
    was asked, full colour where hollow was), so a graded reward can rank a half-filled shape
    above an empty outline."""
    if d is None or "fill" not in diffs or d.fill_level is None:
        return float(len(diffs))
    lv = d.fill_level
    far = 1.0 - lv / HOLLOW_LEVEL if o.fill == "solid" else (lv - HOLLOW_LEVEL) / (1.0 - HOLLOW_LEVEL)
    return len(diffs) - 0.5 + 0.5 * min(max(far, 0.0), 1.0)


def _check(ok: bool, score: float, reason: str) -> CheckResult:
    return CheckResult(status="pass" if ok else "fail", score=float(min(max(score, 0.0), 1.0)), reason=reason)


@lru_cache(maxsize=1024)
def _footprint(shape: str, fill: str, size: str, cell: int, canvas: int) -> np.ndarray:
    """An object's mask grown by two 4-connected steps (where its leftovers would lie); read-only."""
    out = ndimage.binary_dilation(object_mask(Obj(0, shape, "red", size, fill, cell), Geometry(canvas)), iterations=2)
    out.flags.writeable = False
    return out


def judge_turn(image: np.ndarray, prev: Scene, nxt: Scene, turn: Turn, turn_index: int,
               constraint: GlobalConstraint | None = None, session_id: str = "",
               source_image: np.ndarray | None = None) -> TurnVerdict:
    """Judge the output `image` of 1-based turn `turn_index` against the expected scenes.

    `source_image` is the image the editor was given for this turn (its own previous output in
    a multi-turn rollout). It only affects CU: which objects this turn edited is read from the
    difference between the two images. Without it the expected previous scene stands in."""
    parsed = parse(image, nxt.canvas)
    source = None if source_image is None else parse(source_image, prev.canvas)
    return judge_parsed(parsed, prev, nxt, turn, turn_index, constraint, session_id, source)


def judge_parsed(parsed: Parsed, prev: Scene, nxt: Scene, turn: Turn, turn_index: int,
                 constraint: GlobalConstraint | None = None, session_id: str = "",
                 source: Parsed | None = None) -> TurnVerdict:
    t = turn.task_type
    geom = nxt.geometry
    matched, extras = match(nxt, parsed)
    params = turn.params
    rule_attrs = set(params.get("also", {}))
    tid = int(turn.target["id"]) if turn.target is not None and "id" in turn.target else None

    # which expected objects the instruction is about
    if t == "count":
        cat = prev.get(tid).category()
        edited_ids = {o.id for o in nxt.objects if o.category() == cat}
    elif t in ("background",):
        edited_ids = set()
    elif t == "remove":
        edited_ids = set()
    else:
        edited_ids = {tid}

    # residue blobs, and which belong to the removed/moved object's old place
    old_fp = None
    if t in ("remove", "position") and tid is not None and prev.has(tid):
        old = prev.get(tid)
        old_fp = _footprint(old.shape, old.fill, old.size, old.cell, geom.canvas)
    residue_at_old = [r for r in parsed.residue if old_fp is not None and (r.mask & old_fp).any()]

    # ------------------------------------------------------------------------ IF
    if t == "background":
        ok = parsed.background == nxt.background
        IF = _check(ok, float(ok), "" if ok else f"background is {parsed.background}, expected {nxt.background}")
    elif t == "remove":
        o = prev.get(tid)
        still = _remnants(o, extras)
        if still:
            IF = _check(False, 0.0, f"{o.describe()} still present ({_desc_det(still[0])})")
        elif residue_at_old:
            IF = _check(False, 0.5, f"faint remnant of {o.describe()} left behind")
        else:
            IF = _check(True, 1.0, "")
    elif t == "count":
        want = sorted((o for o in nxt.objects if o.id in edited_ids), key=lambda o: o.cell)
        cat = want[0].category()
        got = _copies(parsed, cat)
        bad = [o for o in want if _obj_report(o, matched[o.id])[0]]
        ok = len(got) == len(want) and not bad
        reason = ""
        if len(got) != len(want):
            reason = f"{len(got)} {cat[0]} {cat[1]}(s), expected {len(want)}"
            score = 1.0 - abs(len(got) - len(want)) / max(len(got), len(want))
        elif bad:
            reason = _obj_report(bad[0], matched[bad[0].id])[1]
            score = 1.0 - 0.5 * len(bad) / len(want)   # right number, some copies misplaced
        else:
            score = 1.0
        IF = _check(ok, score, reason)
    else:  # add, replace, color, material, size, position
        o = nxt.get(tid)
        asked = [a for a in ATTRS if a not in rule_attrs or a == _requested_attr(t)]
        diffs, reason = _obj_report(o, matched[o.id], asked)
        IF = _check(not diffs, 1.0 - _missed(o, matched[o.id], diffs) / len(asked), reason)

    # ------------------------------------------------------------------------ CC
    others = [o for o in nxt.objects if o.id not in edited_ids]
    problems: list[str] = []
    kept = 0
    for o in others:
        diffs, reason = _obj_report(o, matched[o.id])
        if diffs:
            problems.append(reason)
        else:
            kept += 1
    if t == "remove":
        o = prev.get(tid)
        extras_cc = [d for d in extras if not ((d.color, d.shape) == (o.color, o.shape) or d.cell == o.cell)]
    else:
        extras_cc = list(extras)
    for d in extras_cc:
        problems.append(f"unexpected {_desc_det(d)}")
    bg_ok = True
    if t != "background" and parsed.background != nxt.background:
        bg_ok = False
        problems.append(f"background is {parsed.background}, expected {nxt.background}")
    residue_cc = [r for r in parsed.residue if not (t == "remove" and r in residue_at_old)]
    for r in residue_cc:
        problems.append(f"unexplained residue at {_fmt('cell', r.cell)}")
    denom = len(others) + 1 + len(extras_cc) + len(residue_cc)
    graded = (kept + bg_ok) / denom * (1.0 - parsed.texture_fraction)
    CC = _check(not problems, graded, "; ".join(problems))

    # ------------------------------------------------------------------------ GA
    GA = CheckResult()
    if constraint is not None and turn_index >= constraint.from_turn:
        if constraint.kind == "protect":
            pid = int(constraint.value["id"]) if isinstance(constraint.value, dict) else None
            if pid is not None and nxt.has(pid):
                p = nxt.get(pid)
                diffs, reason = _obj_report(p, matched[p.id])
                GA = _check(not diffs, 1.0 - _missed(p, matched[p.id], diffs) / len(ATTRS),
                            f"protected {reason}" if diffs else "")
        elif params.get("governed") and rule_attrs and tid is not None and nxt.has(tid):
            o = nxt.get(tid)
            diffs, reason = _obj_report(o, matched[o.id], sorted(rule_attrs))
            GA = _check(not diffs, 1.0 - _missed(o, matched[o.id], diffs) / len(rule_attrs),
                        f"rule '{constraint.text}' broken: {reason}" if diffs else "")

    # ------------------------------------------------------------------------ CU
    CU = CheckResult()
    if turn.pronoun:
        CU = _pronoun_check(t, tid, prev, nxt, matched, extras, parsed, source, others, IF)

    return TurnVerdict(session_id=session_id, turn=turn_index, IF=IF, CC=CC, GA=GA, CU=CU)


def _pronoun_check(t: str, tid: int | None, prev: Scene, nxt: Scene, matched: dict[int, Detection | None],
                   extras: list[Detection], parsed: Parsed, source: Parsed | None, others: list[Obj], IF: CheckResult) -> CheckResult:
    """CU: the edit landed on the object the pronoun denotes, and on no other object.

    This asks which object was edited, not how well: whether the edit reached the exact
    value asked for is IF's business. The referent received the edit when the attribute the
    instruction is about shows the asked value or changed on it during this turn: its colour
    for a recolour, its shape for a replacement, its cell for a move, its fill, its size; for
    `remove` it is gone; for `count` the number of copies of its kind is the asked one or
    moved towards it.
    Another object received an edit when any of its attributes changed during this turn.
    "During this turn" compares with `source` (the parsed input image) when given, so a
    defect inherited from an earlier turn is not charged to this one, else with the expected
    previous scene."""
    req = _requested_attr(t)
    source_of: dict[int, Detection | None] = match(prev, source)[0] if source is not None else {}

    def before(o: Obj) -> Obj | Detection | None:
        return o if source is None else source_of[o.id]

    if t == "remove":
        o = prev.get(tid)
        referent_ok, why = not _remnants(o, extras), f"{o.describe()} still present"
    elif t == "count":
        cat = prev.get(tid).category()
        want = sum(o.category() == cat for o in nxt.objects)
        had = len(_copies(source, cat)) if source is not None else sum(o.category() == cat for o in prev.objects)
        got = len(_copies(parsed, cat))
        referent_ok = got == want or (got - had) * (want - had) > 0
        why = f"{got} {cat[0]} {cat[1]}(s) from {had}, asked {want}"
    elif req is not None and tid is not None and nxt.has(tid) and prev.has(tid):
        o, d = prev.get(tid), matched[tid]
        was = before(o) or o                    # the referent missing from the input: the expected look
        asked, had = getattr(nxt.get(tid), req), getattr(was, req)
        now = None if d is None else getattr(d, req)
        referent_ok = d is not None and (now == asked or now != had)
        why = f"{o.describe()} not found" if d is None else f"its {req} stayed {_fmt(req, had)}"
    else:                                       # a pronoun turn of another kind: IF decides
        referent_ok, why = IF.status == "pass", IF.reason
    changed = []
    for o in others:
        if not prev.has(o.id):
            continue
        was = before(prev.get(o.id))
        if was is None:
            continue                            # already missing from the input: not this turn's doing
        after = matched[o.id]
        if after is None or _attr_values(after) != _attr_values(was):
            changed.append(o)
    reason = ""
    if changed:
        reason = f"edited {changed[0].describe()} instead of / besides 'it'"
    elif not referent_ok:
        reason = f"'it' did not receive the edit: {why}"
    return _check(referent_ok and not changed, 0.5 * referent_ok + 0.5 * (not changed), reason)


def _remnants(o: Obj, extras: list[Detection]) -> list[Detection]:
    """Unmatched detections that could still be removed object `o` (its colour and shape, or its cell)."""
    return [d for d in extras if (d.color, d.shape) == (o.color, o.shape) or d.cell == o.cell]


def _copies(parsed: Parsed, cat: tuple) -> list[Detection]:
    """Detections of category `cat` = (color, shape, size, fill)."""
    return [d for d in parsed.objects if (d.color, d.shape, d.size, d.fill) == cat]


def _requested_attr(t: str) -> str | None:
    return {"replace": "shape", "color": "color", "material": "fill", "size": "size", "position": "cell"}.get(t)
