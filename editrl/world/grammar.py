"""The ShapesWorld session sampler.

A session is an initial scene plus K turns. Each turn is one of the nine edit types; its
object is named by an attribute referring expression that is unambiguous in the scene the
user sees ("the red circle", "the square in the top row") or, when the previous turn edited
a single object that still exists, often by pronoun ("make it blue" = that object). A share
of sessions opens with a global rule that governs later turns:

- `color_of_changes` ("every object you add or change must be yellow"): add, replace,
  material, size and position turns give the edited object the rule's colour, and the
  instruction no longer names a colour;
- `fill_of_changes` ("... must be hollow"): the same for the fill, on add, replace, color,
  size and position turns;
- `protect` ("never touch the blue square"): that object must stay exactly as it is.

Every turn carries the bracketed explicit instruction (pronouns resolved, the rule injected)
and the expected scene after it. Conventions the judge checks exactly: an object added or
moved goes to the named cell; copies made by a count edit fill the first free cells in
reading order, and a count decrease keeps the first members in reading order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..session import GlobalConstraint, Session, Turn
from .scene import (BACKGROUNDS, CELL_NAMES, COLORS, COLS, EDIT_TYPES, FILLS, ROWS, SHAPES, SIZES,
                    Edit, Obj, Scene, apply_edit)

CONSTRAINT_KINDS = ("color_of_changes", "fill_of_changes", "protect")
GOVERNS = {
    "color_of_changes": ("add", "replace", "material", "size", "position"),
    "fill_of_changes": ("add", "replace", "color", "size", "position"),
}
EXCLUDES = {"color_of_changes": ("color", "count"), "fill_of_changes": ("material", "count"), "protect": ()}
NUM_WORDS = {1: "one", 2: "two", 3: "three"}
PRONOUN_TYPES = ("remove", "replace", "color", "material", "size", "position", "count")


@dataclass
class GrammarConfig:
    turns: int = 3
    min_objects: int = 2
    max_objects: int = 4          # in the source scene
    max_total: int = 6            # at any time
    constraint_share: float = 0.3
    constraint_kinds: tuple[str, ...] = CONSTRAINT_KINDS
    pronoun_prob: float = 0.6     # when a pronoun is possible
    canvas: int = 64
    edit_types: tuple[str, ...] = EDIT_TYPES
    max_tries: int = 200

    def __post_init__(self) -> None:
        if not 1 <= self.turns <= 10:
            raise ValueError(f"turns must be in 1..10, got {self.turns}")
        if not 1 <= self.min_objects <= self.max_objects <= self.max_total <= 9:
            raise ValueError("need 1 <= min_objects <= max_objects <= max_total <= 9")
        if not 0.0 <= self.constraint_share <= 1.0 or not 0.0 <= self.pronoun_prob <= 1.0:
            raise ValueError("constraint_share and pronoun_prob must be in [0, 1]")
        for k in self.constraint_kinds:
            if k not in CONSTRAINT_KINDS:
                raise ValueError(f"unknown constraint kind {k!r}")
        for t in self.edit_types:
            if t not in EDIT_TYPES:
                raise ValueError(f"unknown edit type {t!r}")


# ------------------------------------------------------------------ referring expressions

def _plural(shape: str) -> str:
    return shape + "s"


def _row(cell: int) -> str:
    return ROWS[cell // 3]


def _col(cell: int) -> str:
    return COLS[cell % 3]


def referring_candidates(scene: Scene, obj: Obj) -> list[str]:
    """Every expression (without 'the') in our grammar that denotes `obj` alone in `scene`."""
    objs = scene.objects
    out = []

    def unique(pred) -> bool:
        return sum(1 for o in objs if pred(o)) == 1

    if unique(lambda o: o.shape == obj.shape):
        out.append(obj.shape)
    if unique(lambda o: (o.color, o.shape) == (obj.color, obj.shape)):
        out.append(f"{obj.color} {obj.shape}")
    if unique(lambda o: (o.size, o.shape) == (obj.size, obj.shape)):
        out.append(f"{obj.size} {obj.shape}")
    if unique(lambda o: (o.fill, o.shape) == (obj.fill, obj.shape)) and obj.fill == "hollow":
        out.append(f"hollow {obj.shape}")
    if unique(lambda o: (o.color, o.shape, _row(o.cell)) == (obj.color, obj.shape, _row(obj.cell))):
        out.append(f"{obj.color} {obj.shape} in the {_row(obj.cell)} row")
    if unique(lambda o: (o.color, o.shape, _col(o.cell)) == (obj.color, obj.shape, _col(obj.cell))):
        out.append(f"{obj.color} {obj.shape} in the {_col(obj.cell)} column")
    out.append(f"{obj.color} {obj.shape} at the {CELL_NAMES[obj.cell]}")
    return out


def resolve_reference(scene: Scene, expr: str) -> list[Obj]:
    """Independent reader of a referring expression: every object of `scene` it fits."""
    words = expr.removeprefix("the ").split()
    shape = next((w for w in words if w in SHAPES), None)
    color = next((w for w in words if w in COLORS), None)
    size = next((w for w in words if w in SIZES), None)
    fill = "hollow" if "hollow" in words else None
    cell = row = col = None
    if " at the " in expr:
        cell = CELL_NAMES.index(expr.split(" at the ", 1)[1])
    elif expr.endswith(" row"):
        row = ROWS.index(words[-2])
    elif expr.endswith(" column"):
        col = COLS.index(words[-2])
    hits = []
    for o in scene.objects:
        if (shape and o.shape != shape) or (color and o.color != color) or (size and o.size != size):
            continue
        if (fill and o.fill != fill) or (cell is not None and o.cell != cell):
            continue
        if (row is not None and o.cell // 3 != row) or (col is not None and o.cell % 3 != col):
            continue
        hits.append(o)
    return hits


def refer(scene: Scene, obj: Obj, rng: np.random.Generator) -> str:
    cands = referring_candidates(scene, obj)
    pick = cands[0] if rng.random() < 0.6 else cands[rng.integers(len(cands))]
    return "the " + pick


# ------------------------------------------------------------------------ the sampler

@dataclass
class _Rule:
    kind: str
    value: Any
    protected: int | None = None       # object id for `protect`


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _pair_counts(scene: Scene) -> dict[tuple[str, str], int]:
    seen: dict[tuple[str, str], int] = {}
    for o in scene.objects:
        seen[(o.color, o.shape)] = seen.get((o.color, o.shape), 0) + 1
    return seen


def _unique_after(prev: Scene, nxt: Scene, etype: str) -> bool:
    """(colour, shape) pairs stay unique; only a count edit may create exact copies (no other
    edit may add a member to any (colour, shape) group)."""
    if not nxt.pairs_unique_except_categories():
        return False
    if etype == "count":
        return True
    before = _pair_counts(prev)
    return all(n <= max(1, before.get(p, 0)) for p, n in _pair_counts(nxt).items()) and \
        all(n <= before.get(p, 0) for p, n in _pair_counts(nxt).items() if n > 1)


def sample_scene(rng: np.random.Generator, cfg: GrammarConfig) -> Scene:
    while True:
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        cells = rng.choice(9, size=n, replace=False)
        objs, pairs = [], set()
        for i, cell in enumerate(sorted(int(c) for c in cells)):
            for _ in range(50):
                color, shape = _choice(rng, tuple(COLORS)), _choice(rng, SHAPES)
                if (color, shape) not in pairs:
                    break
            pairs.add((color, shape))
            objs.append(Obj(i, shape, color, _choice(rng, SIZES), _choice(rng, FILLS), cell))
        if len(pairs) == n:
            return Scene(_choice(rng, tuple(BACKGROUNDS)), tuple(objs), cfg.canvas, n)


def _rule_text(rule: _Rule, scene: Scene, rng: np.random.Generator) -> str:
    if rule.kind == "color_of_changes":
        return _choice(rng, (f"From now on, every object you add or change must be {rule.value}.",
                             f"For the rest of this session, make everything you add or change {rule.value}."))
    if rule.kind == "fill_of_changes":
        return _choice(rng, (f"From now on, every object you add or change must be {rule.value}.",
                             f"For the rest of this session, make everything you add or change {rule.value}."))
    ref = refer(scene, scene.get(rule.protected), rng)
    return _choice(rng, (f"Never touch {ref} from now on.",
                         f"Whatever happens, leave {ref} exactly as it is."))


def _sample_rule(rng: np.random.Generator, scene: Scene, cfg: GrammarConfig) -> _Rule | None:
    if not cfg.constraint_kinds or rng.random() >= cfg.constraint_share:
        return None
    kind = _choice(rng, cfg.constraint_kinds)
    if kind == "color_of_changes":
        return _Rule(kind, _choice(rng, tuple(COLORS)))
    if kind == "fill_of_changes":
        return _Rule(kind, _choice(rng, FILLS))
    o = _choice(rng, scene.sorted_objects())
    return _Rule(kind, o.describe(), o.id)


@dataclass
class _Draft:
    edit: Edit
    instruction: str
    explicit: str
    target: dict[str, Any] | None
    governed: bool
    pronoun: bool
    next_scene: Scene = field(default=None)  # type: ignore[assignment]


def _rule_also(rule: _Rule | None, etype: str) -> dict[str, Any]:
    if rule is None or etype not in GOVERNS.get(rule.kind, ()):
        return {}
    return {"color": rule.value} if rule.kind == "color_of_changes" else {"fill": rule.value}


def _suffix(rule: _Rule | None, also: dict[str, Any], scene: Scene) -> str:
    s = ""
    if also:
        s += f" and make it [{next(iter(also.values()))}]"
    if rule is not None and rule.kind == "protect":
        s += f" and keep [{scene.get(rule.protected).describe()}] unchanged"
    return s


def _draft(rng: np.random.Generator, scene: Scene, etype: str, rule: _Rule | None,
           target: Obj | None, pronoun: bool, cfg: GrammarConfig) -> _Draft | None:
    """Build one candidate turn, or None when the choice cannot apply."""
    also = _rule_also(rule, etype)
    governed = bool(also) or (rule is not None and rule.kind == "protect")
    if etype == "add":
        free = scene.free_cells()
        if not free or len(scene.objects) >= cfg.max_total:
            return None
        color = also.get("color") or _choice(rng, tuple(COLORS))
        fill = also.get("fill") or _choice(rng, FILLS)
        shape, size, cell = _choice(rng, SHAPES), _choice(rng, SIZES), _choice(rng, free)
        edit = Edit("add", None, {"shape": shape, "color": color, "size": size, "fill": fill, "cell": cell, "also": also})
        words = [size]
        if "color" not in also:
            words.append(color)
        if "fill" not in also and (fill == "hollow" or rng.random() < 0.3):
            words.append(fill)
        words.append(shape)
        where = f"at the {CELL_NAMES[cell]}"
        instr = _choice(rng, (f"Add a {' '.join(words)} {where}", f"Put a {' '.join(words)} {where}",
                              f"Draw a {' '.join(words)} {where}"))
        explicit = f"Add [{size} {color} {fill} {shape}] at [{CELL_NAMES[cell]}]"
        if rule is not None and rule.kind == "protect":
            explicit += _suffix(rule, {}, scene)
        new = Obj(scene.next_id, shape, color, size, fill, cell)
        return _Draft(edit, instr, explicit, {"id": new.id, **new.to_dict()}, governed, False)
    if etype == "background":
        bg = _choice(rng, tuple(b for b in BACKGROUNDS if b != scene.background))
        instr = _choice(rng, (f"Change the background to {bg}", f"Make the background {bg}",
                              f"Use a {bg} background"))
        explicit = f"Change the background to [{bg}]" + _suffix(rule, {}, scene)
        return _Draft(Edit("background", None, {"background": bg}), instr, explicit, None, governed, False)

    # edits of one existing object
    if target is None:
        cands = [o for o in scene.objects if rule is None or o.id != rule.protected]
        if not cands:
            return None
        target = _choice(rng, sorted(cands, key=lambda o: o.cell))
    ref = "it" if pronoun else refer(scene, target, rng)
    desc = target.describe()
    tgt = {"id": target.id, **target.to_dict()}
    sfx = _suffix(rule, also, scene)
    if etype == "remove":
        instr = _choice(rng, (f"Remove {ref}", f"Delete {ref}",
                              "Take it away" if pronoun else f"Take away {ref}"))
        return _Draft(Edit("remove", target.id), instr, f"Remove [{desc}]" + _suffix(rule, {}, scene),
                      tgt, governed, pronoun)
    if etype == "replace":
        shape = _choice(rng, tuple(s for s in SHAPES if s != target.shape))
        instr = _choice(rng, (f"Replace {ref} with a {shape}", f"Turn {ref} into a {shape}",
                              f"Change {ref} into a {shape}"))
        color = also.get("color", target.color)
        explicit = f"Replace [{desc}] with [{color} {shape}]" + _suffix(rule, {k: v for k, v in also.items() if k != "color"}, scene)
        return _Draft(Edit("replace", target.id, {"shape": shape, "also": also}), instr, explicit, tgt, governed, pronoun)
    if etype == "color":
        color = _choice(rng, tuple(c for c in COLORS if c != target.color))
        if pronoun:
            instr = _choice(rng, (f"Make it {color}", f"Change its color to {color}", f"Paint it {color}"))
        else:
            instr = _choice(rng, (f"Make {ref} {color}", f"Change the color of {ref} to {color}",
                                  f"Paint {ref} {color}", f"Recolor {ref} {color}"))
        return _Draft(Edit("color", target.id, {"color": color, "also": also}), instr,
                      f"Recolor [{desc}] to [{color}]" + sfx, tgt, governed, pronoun)
    if etype == "material":
        fill = "solid" if target.fill == "hollow" else "hollow"
        if fill == "hollow":
            instr = _choice(rng, (f"Make {ref} hollow", "Hollow it out" if pronoun else f"Hollow out {ref}"))
        else:
            instr = _choice(rng, (f"Make {ref} solid", "Fill it in" if pronoun else f"Fill in {ref}"))
        return _Draft(Edit("material", target.id, {"fill": fill, "also": also}), instr,
                      f"Change the fill of [{desc}] to [{fill}]" + sfx, tgt, governed, pronoun)
    if etype == "size":
        size = "small" if target.size == "large" else "large"
        if size == "large":
            instr = _choice(rng, (f"Make {ref} large", f"Make {ref} bigger", f"Enlarge {ref}"))
        else:
            instr = _choice(rng, (f"Make {ref} small", f"Make {ref} smaller", f"Shrink {ref}"))
        return _Draft(Edit("size", target.id, {"size": size, "also": also}), instr,
                      f"Resize [{desc}] to [{size}]" + sfx, tgt, governed, pronoun)
    if etype == "position":
        free = scene.free_cells()
        if not free:
            return None
        cell = _choice(rng, free)
        instr = _choice(rng, (f"Move {ref} to the {CELL_NAMES[cell]}", f"Put {ref} at the {CELL_NAMES[cell]}"))
        return _Draft(Edit("position", target.id, {"cell": cell, "also": also}), instr,
                      f"Move [{desc}] to [{CELL_NAMES[cell]}]" + sfx, tgt, governed, pronoun)
    if etype == "count":
        members = scene.category_members(target.category())
        if rule is not None and rule.kind == "protect" and any(o.id == rule.protected for o in members):
            return None
        room = len(scene.free_cells())
        options = [n for n in (1, 2, 3) if n != len(members) and n - len(members) <= room
                   and len(scene.objects) + n - len(members) <= cfg.max_total]
        if pronoun:
            options = [2] if len(members) == 1 and 2 in options else []
        if not options:
            return None
        n = _choice(rng, options)
        noun = f"{target.color} {_plural(target.shape)}"
        if pronoun:
            instr = "Duplicate it"
        elif n == 1:
            instr = _choice(rng, (f"Keep only one of the {noun}", f"Change the number of {noun} to one"))
        else:
            instr = _choice(rng, (f"Make there be {NUM_WORDS[n]} {noun}",
                                  f"Change the number of {noun} to {NUM_WORDS[n]}"))
        explicit = f"Change the count of [{target.color} {target.shape}] to [{n}]" + _suffix(rule, {}, scene)
        return _Draft(Edit("count", members[0].id, {"count": n}), instr, explicit,
                      {"id": members[0].id, **members[0].to_dict()}, governed, pronoun)
    raise ValueError(etype)


def _json_params(edit: Edit) -> dict[str, Any]:
    p = {k: v for k, v in edit.params.items() if k != "also" or v}
    if "cell" in p:
        p["cell"] = CELL_NAMES[int(p["cell"])]
    return p


def edit_from_turn(turn: Turn) -> Edit:
    """Rebuild the world edit stored in a ShapesWorld turn."""
    p = dict(turn.params)
    for k in ("governed",):
        p.pop(k, None)
    if "cell" in p and isinstance(p["cell"], str):
        p["cell"] = CELL_NAMES.index(p["cell"])
    tid = None if turn.task_type in ("add", "background") else int(turn.target["id"])
    return Edit(turn.task_type, tid, p)


def sample_session(seed: int, index: int, cfg: GrammarConfig | None = None) -> Session:
    """Session `index` of the stream defined by `seed` (each session has its own RNG stream)."""
    cfg = cfg or GrammarConfig()
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, cfg)
    source = scene
    rule = _sample_rule(rng, scene, cfg)
    turns: list[Turn] = []
    last_target: int | None = None
    rule_text = _rule_text(rule, source, rng) if rule is not None else ""
    types = [t for t in cfg.edit_types if rule is None or t not in EXCLUDES[rule.kind]]
    for k in range(cfg.turns):
        draft = None
        for _ in range(cfg.max_tries):
            pronoun = (last_target is not None and scene.has(last_target)
                       and rng.random() < cfg.pronoun_prob)
            pool = [t for t in types if t in PRONOUN_TYPES] if pronoun else types
            etype = _choice(rng, pool)
            target = scene.get(last_target) if pronoun else None
            d = _draft(rng, scene, etype, rule, target, pronoun, cfg)
            if d is None:
                continue
            try:
                nxt = apply_edit(scene, d.edit)
            except ValueError:
                continue
            if not _unique_after(scene, nxt, d.edit.type):
                continue
            d.next_scene = nxt
            draft = d
            break
        if draft is None:
            raise RuntimeError(f"could not sample turn {k + 1} of session {index} (seed {seed})")
        instr = draft.instruction
        if k == 0 and rule is not None:
            instr = rule_text + " " + instr
        params = _json_params(draft.edit)
        params["governed"] = draft.governed
        turns.append(Turn(instruction=instr, explicit=draft.explicit, task_type=draft.edit.type,
                          target=draft.target, params=params, expected=draft.next_scene.to_dict(),
                          pronoun=draft.pronoun))
        scene = draft.next_scene
        single = draft.edit.type in ("add", "replace", "color", "material", "size", "position")
        if draft.edit.type == "add":
            last_target = draft.target["id"]
        else:
            last_target = draft.edit.target if single else None
    gc = None
    if rule is not None:
        value: Any = rule.value if rule.kind != "protect" else {"id": rule.protected, "object": rule.value}
        gc = GlobalConstraint(text=rule_text, kind=rule.kind, value=value, from_turn=1)
    sid = f"s{index:05d}"
    return Session(id=sid, source_image=f"images/{sid}_0.png", global_constraint=gc, turns=turns,
                   source_scene=source.to_dict(), meta={"world": "shapes", "seed": seed, "index": index,
                                                          "canvas": cfg.canvas})


def session_scenes(session: Session) -> list[Scene]:
    """[source, after turn 1, ..., after turn K]."""
    if session.source_scene is None or any(t.expected is None for t in session.turns):
        raise ValueError(f"session {session.id} has no ShapesWorld scenes")
    return [Scene.from_dict(session.source_scene)] + [Scene.from_dict(t.expected) for t in session.turns]
