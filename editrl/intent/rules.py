"""`rules`: session-intent reconstruction by symbolic state tracking.

Two worlds, chosen per query by what the query carries:

* **ShapesWorld** (`source_scene` given). The raw instructions of turns 1..k are read with
  the session grammar's phrasings; each earlier turn's edit is applied to the scene the
  user has asked for so far (the *intended* state, not the editor's possibly wrong output:
  "make it blue" means the object the user asked for). Turn k's instruction is written in
  the bracketed explicit form the tiny editor is trained on: the referent is the object's
  canonical name in the current intended scene ("it" = the object the last single-object
  turn produced), and a session rule is injected where it governs ("... and make it
  [yellow]", "... and keep [blue square at center] unchanged"). On ShapesWorld this is the
  grammar's own gold form, which the tests check on thousands of sessions.
* **Real records** (object lists given, e.g. converted MICE-Bench or EdiVal sessions). The
  referent of a pronoun is the object the last object-targeting turn produced, followed by
  name through the object lists of the images seen so far (a recolour turns "paper blue
  sign" into the "paper yellow sign" that appears in the next list); without lists, the
  name is updated by substituting the new colour or material word. Object names found in
  the list of the current image are bracketed; a persistent colour/material rule is
  injected into each turn that edits an object.

Nothing here looks at the gold explicit instructions (see `base.query_for`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from ..convert import has_pronoun, parse_rule, split_rule
from ..session import GlobalConstraint
from ..world.grammar import GOVERNS, NUM_WORDS, resolve_reference
from ..world.scene import BACKGROUNDS, CELL_NAMES, COLORS, FILLS, SHAPES, SIZES, Edit, Scene, apply_edit
from .base import IntentQuery, Reconstruction

SINGLE_OBJECT = ("add", "replace", "color", "material", "size", "position")


class RulesReconstructor:
    """Deterministic, exact on ShapesWorld; name tracking through object lists on real records."""

    name = "rules"

    def reconstruct(self, queries: Sequence[IntentQuery]) -> list[Reconstruction]:
        out = []
        for q in queries:
            try:
                out.append(reconstruct_shapes(q) if q.source_scene is not None else reconstruct_records(q))
            except IntentParseError as e:
                out.append(Reconstruction(explicit=q.instruction, trace="", error=str(e)))
        return out


class IntentParseError(ValueError):
    """An instruction the rules cannot read (the raw instruction is then used, with an error)."""


# =============================================================================== ShapesWorld

@dataclass
class _Rule:
    kind: str                 # color_of_changes | fill_of_changes | protect
    value: Any                # colour / fill name, or the protected object's id


_RULE_PATTERNS = (
    re.compile(r"^From now on, every object you add or change must be (\w+)\.\s*"),
    re.compile(r"^For the rest of this session, make everything you add or change (\w+)\.\s*"),
)
_PROTECT_PATTERNS = (
    re.compile(r"^Never touch (the .+?) from now on\.\s*"),
    re.compile(r"^Whatever happens, leave (the .+?) exactly as it is\.\s*"),
)
_CELL = "|".join(CELL_NAMES)
_NUMBERS = {w: n for n, w in NUM_WORDS.items()}


def _split_shapes_rule(text: str, scene: Scene) -> tuple[_Rule | None, str]:
    for pat in _RULE_PATTERNS:
        m = pat.match(text)
        if m:
            v = m.group(1)
            kind = "color_of_changes" if v in COLORS else "fill_of_changes" if v in FILLS else None
            if kind is None:
                raise IntentParseError(f"unknown rule value {v!r}")
            return _Rule(kind, v), text[m.end():]
    for pat in _PROTECT_PATTERNS:
        m = pat.match(text)
        if m:
            return _Rule("protect", _one(scene, m.group(1)).id), text[m.end():]
    return None, text


def _one(scene: Scene, expr: str):
    hits = resolve_reference(scene, expr)
    if len(hits) != 1:
        raise IntentParseError(f"{expr!r} denotes {len(hits)} objects in the current scene")
    return hits[0]


@dataclass
class _Parsed:
    type: str
    ref: str | None = None            # referring expression ("it", "the red circle"), None for add/background
    params: dict[str, Any] | None = None


def _parse_shapes_edit(text: str) -> _Parsed:
    """One ShapesWorld instruction (the grammar's phrasings) -> edit type, reference, values."""
    t = text.strip().rstrip(".")
    m = re.fullmatch(r"(?:Change the background to|Make the background) (\w+)", t) or re.fullmatch(r"Use a (\w+) background", t)
    if m:
        return _Parsed("background", None, {"background": m.group(1)})
    m = re.fullmatch(rf"(?:Add|Put|Draw) a ([a-z ]+) at the ({_CELL})", t)
    if m:
        words = m.group(1).split()
        return _Parsed("add", None, {"words": words, "cell": CELL_NAMES.index(m.group(2))})
    if t == "Duplicate it":
        return _Parsed("count", "it", {"count": 2})
    m = re.fullmatch(r"Keep only one of the (\w+) (\w+)", t)
    if m:
        return _Parsed("count", f"the {m.group(1)} {m.group(2).removesuffix('s')}", {"count": 1, "pair": True})
    m = re.fullmatch(r"Change the number of (\w+) (\w+) to (\w+)", t)
    if m and m.group(3) in _NUMBERS:
        return _Parsed("count", f"the {m.group(1)} {m.group(2).removesuffix('s')}", {"count": _NUMBERS[m.group(3)], "pair": True})
    m = re.fullmatch(r"Make there be (\w+) (\w+) (\w+)", t)
    if m and m.group(1) in _NUMBERS:
        return _Parsed("count", f"the {m.group(2)} {m.group(3).removesuffix('s')}", {"count": _NUMBERS[m.group(1)], "pair": True})
    if t in ("Take it away",):
        return _Parsed("remove", "it")
    m = re.fullmatch(r"(?:Remove|Delete|Take away) (.+)", t)
    if m:
        return _Parsed("remove", m.group(1))
    m = re.fullmatch(r"Replace (.+) with a (\w+)", t) or re.fullmatch(r"(?:Turn|Change) (.+) into a (\w+)", t)
    if m:
        return _Parsed("replace", m.group(1), {"shape": m.group(2)})
    m = re.fullmatch(r"Change its color to (\w+)", t)
    if m:
        return _Parsed("color", "it", {"color": m.group(1)})
    m = re.fullmatch(r"Change the color of (.+) to (\w+)", t)
    if m:
        return _Parsed("color", m.group(1), {"color": m.group(2)})
    for phrase, fill in (("Hollow it out", "hollow"), ("Fill it in", "solid")):
        if t == phrase:
            return _Parsed("material", "it", {"fill": fill})
    m = re.fullmatch(r"(Hollow out|Fill in) (.+)", t)
    if m:
        return _Parsed("material", m.group(2), {"fill": "hollow" if m.group(1) == "Hollow out" else "solid"})
    m = re.fullmatch(r"(Enlarge|Shrink) (.+)", t)
    if m:
        return _Parsed("size", m.group(2), {"size": "large" if m.group(1) == "Enlarge" else "small"})
    m = re.fullmatch(rf"(?:Move (.+) to|Put (.+) at) the ({_CELL})", t)
    if m:
        return _Parsed("position", m.group(1) or m.group(2), {"cell": CELL_NAMES.index(m.group(3))})
    m = re.fullmatch(r"(Make|Paint|Recolor) (.+) (\w+)", t)
    if m:
        verb, ref, last = m.groups()
        if last in COLORS:
            return _Parsed("color", ref, {"color": last})
        if verb == "Make" and last in FILLS:
            return _Parsed("material", ref, {"fill": last})
        if verb == "Make" and last in ("large", "bigger", "small", "smaller"):
            return _Parsed("size", ref, {"size": "large" if last in ("large", "bigger") else "small"})
    raise IntentParseError(f"cannot read instruction {text!r}")


def _also(rule: _Rule | None, etype: str) -> dict[str, Any]:
    if rule is None or etype not in GOVERNS.get(rule.kind, ()):
        return {}
    return {"color": rule.value} if rule.kind == "color_of_changes" else {"fill": rule.value}


def _suffix(rule: _Rule | None, also: dict[str, Any], scene: Scene) -> str:
    s = f" and make it [{next(iter(also.values()))}]" if also else ""
    if rule is not None and rule.kind == "protect" and scene.has(rule.value):
        s += f" and keep [{scene.get(rule.value).describe()}] unchanged"
    return s


def _shapes_turn(scene: Scene, text: str, rule: _Rule | None, last: int | None) -> tuple[str, Edit, str]:
    """(explicit instruction, edit, trace) of one instruction in the current intended scene."""
    p = _parse_shapes_edit(text)
    also = _also(rule, p.type)
    trace = []
    if p.type == "add":
        words = p.params["words"]
        shape = words[-1]
        size = next((w for w in words if w in SIZES), None)
        if shape not in SHAPES or size is None:
            raise IntentParseError(f"cannot read the object to add in {text!r}")
        color = also.get("color") or next((w for w in words if w in COLORS), None)
        if color is None:
            raise IntentParseError(f"no colour for the object to add in {text!r}")
        fill = also.get("fill") or next((w for w in words if w in FILLS), "solid")
        cell = p.params["cell"]
        if also:
            trace.append(f"rule: {next(iter(also.values()))} injected")
        explicit = f"Add [{size} {color} {fill} {shape}] at [{CELL_NAMES[cell]}]" + _suffix(rule, {}, scene)
        edit = Edit("add", None, {"shape": shape, "color": color, "size": size, "fill": fill, "cell": cell, "also": also})
        return explicit, edit, "; ".join(trace)
    if p.type == "background":
        bg = p.params["background"]
        if bg not in BACKGROUNDS:
            raise IntentParseError(f"unknown background {bg!r}")
        return f"Change the background to [{bg}]" + _suffix(rule, {}, scene), Edit("background", None, {"background": bg}), ""
    if p.ref == "it":
        if last is None or not scene.has(last):
            raise IntentParseError(f"'it' in {text!r} has no referent (no single object was edited just before)")
        target = scene.get(last)
        trace.append(f"it -> [{target.describe()}]")
    elif p.params and p.params.get("pair"):
        words = p.ref.removeprefix("the ").split()
        hits = [o for o in scene.sorted_objects() if (o.color, o.shape) == (words[0], words[1])]
        if not hits:
            raise IntentParseError(f"no {words[0]} {words[1]} in the current scene")
        target = hits[0]
    else:
        target = _one(scene, p.ref)
    desc = target.describe()
    if also:
        trace.append(f"rule: {next(iter(also.values()))} injected")
    if rule is not None and rule.kind == "protect" and scene.has(rule.value):
        trace.append(f"rule: keep [{scene.get(rule.value).describe()}] unchanged")
    vals = p.params or {}
    if p.type == "remove":
        return f"Remove [{desc}]" + _suffix(rule, {}, scene), Edit("remove", target.id), "; ".join(trace)
    if p.type == "replace":
        color = also.get("color", target.color)
        explicit = f"Replace [{desc}] with [{color} {vals['shape']}]" + _suffix(rule, {k: v for k, v in also.items() if k != "color"}, scene)
        return explicit, Edit("replace", target.id, {"shape": vals["shape"], "also": also}), "; ".join(trace)
    if p.type == "color":
        return (f"Recolor [{desc}] to [{vals['color']}]" + _suffix(rule, also, scene),
                Edit("color", target.id, {"color": vals["color"], "also": also}), "; ".join(trace))
    if p.type == "material":
        return (f"Change the fill of [{desc}] to [{vals['fill']}]" + _suffix(rule, also, scene),
                Edit("material", target.id, {"fill": vals["fill"], "also": also}), "; ".join(trace))
    if p.type == "size":
        return (f"Resize [{desc}] to [{vals['size']}]" + _suffix(rule, also, scene),
                Edit("size", target.id, {"size": vals["size"], "also": also}), "; ".join(trace))
    if p.type == "position":
        return (f"Move [{desc}] to [{CELL_NAMES[vals['cell']]}]" + _suffix(rule, also, scene),
                Edit("position", target.id, {"cell": vals["cell"], "also": also}), "; ".join(trace))
    if p.type == "count":
        members = scene.category_members(target.category())
        explicit = f"Change the count of [{target.color} {target.shape}] to [{vals['count']}]" + _suffix(rule, {}, scene)
        return explicit, Edit("count", members[0].id, {"count": vals["count"]}), "; ".join(trace)
    raise IntentParseError(f"cannot read instruction {text!r}")


def reconstruct_shapes(q: IntentQuery) -> Reconstruction:
    scene = Scene.from_dict(q.source_scene)
    rule: _Rule | None = None
    last: int | None = None
    for j, text in enumerate(q.instructions, start=1):
        if j == 1:
            rule, text = _split_shapes_rule(text, scene)
        explicit, edit, trace = _shapes_turn(scene, text, rule, last)
        if j == q.turn:
            return Reconstruction(explicit=explicit, trace=trace)
        try:
            nxt = apply_edit(scene, edit)
        except (ValueError, KeyError) as e:
            raise IntentParseError(f"turn {j} cannot apply to the tracked scene: {e}") from None
        if edit.type in SINGLE_OBJECT:
            last = scene.next_id if edit.type == "add" else edit.target
        else:
            last = None
        scene = nxt
    raise IntentParseError("no instruction to rewrite")


# ============================================================================== real records

_PRONOUNS = r"(?:it|them|they)"
_POSSESSIVE = re.compile(r"\b(its|their)\s+(\w+)\b", re.IGNORECASE)
_OBJECT_PRONOUN = re.compile(r"\b(it|them)\b", re.IGNORECASE)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
COLOR_WORDS = frozenset(
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden navy teal "
    "peach beige tan cyan magenta maroon violet turquoise lavender ivory cream olive coral crimson "
    "khaki indigo lime mint amber bronze copper charcoal burgundy".split())
MATERIAL_WORDS = frozenset(
    "wood wooden metal metallic plastic glass ceramic stone fabric cotton leather paper cardboard rubber "
    "denim silk wool fur concrete brick marble steel iron gold silver clay porcelain velvet nylon "
    "polyester linen lace sequined synthetic plush cloth asphalt bamboo wicker straw foam crystal".split())


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w' -]", " ", s.lower()).split())


def _mentions(text: str, names: Sequence[str]) -> list[tuple[int, int, str]]:
    """Non-overlapping mentions (start, end, name) of `names` in `text` outside quotes,
    longest names first."""
    low = text.lower()
    masked = _QUOTED.sub(lambda m: " " * len(m.group(0)), low)
    taken = [False] * len(text)
    out = []
    for name in sorted(set(names), key=len, reverse=True):
        n = name.lower().strip()
        if not n:
            continue
        for m in re.finditer(r"(?<![\w-])" + re.escape(n) + r"(?![\w-])", masked):
            if not any(taken[m.start():m.end()]):
                out.append((m.start(), m.end(), name))
                for i in range(m.start(), m.end()):
                    taken[i] = True
    return sorted(out)


def _updated_name(name: str, text: str) -> str:
    """The object's name after an edit, by word substitution (used without object lists)."""
    m = re.search(r"\b(colou?r|material)\b.*?\bto\s+(.+?)\s*$", text, re.IGNORECASE)
    if not m:
        m2 = re.search(r"\bReplace\b.+?\bwith\s+(.+?)\s*$", text, re.IGNORECASE)
        return m2.group(1).strip(" .'\"") if m2 else name
    what, value = m.group(1).lower(), m.group(2).strip(" .'\"")
    lexicon = COLOR_WORDS if what.startswith("colo") else MATERIAL_WORDS
    words = name.split()
    idx = [i for i, w in enumerate(words) if w.lower() in lexicon]
    if idx:
        words = words[: idx[0]] + [value] + [w for i, w in enumerate(words) if i > idx[0] and i not in idx]
        return " ".join(words)
    return f"{value} {name}"


_OBJECT_TEMPLATES = (
    re.compile(r"^\s*Change the (?:colou?r|material|count|number|size|position|shape|texture) of (?:the )?(.+?) to\b", re.I),
    re.compile(r"^\s*(?:Remove|Delete|Erase|Take away) (?:the )?(.+?)\s*\.?$", re.I),
    re.compile(r"^\s*Replace (?:the )?(.+?) with\b", re.I),
    re.compile(r"^\s*(?:Add|Put|Place|Draw) (?:a |an |the )?(.+?)(?:\s+(?:on|at|to|in|next|near|above|below|beside)\b.*)?\s*\.?$", re.I),
)


def _object_phrase(text: str) -> str | None:
    """The object an instruction names, read from the common templates (used when the
    image's object list is unknown)."""
    for pat in _OBJECT_TEMPLATES:
        m = pat.match(text)
        if m and not _OBJECT_PRONOUN.fullmatch(m.group(1).strip()):
            return m.group(1).strip()
    return None


def _overlap(a: str, b: str) -> int:
    return len(set(_norm(a).split()) & set(_norm(b).split()))


def _follow(ref: str | None, text: str, before: Sequence[str] | None, after: Sequence[str] | None,
            mentioned: list[str]) -> str | None:
    """The name, after a turn with instruction `text`, of the object that turn edited."""
    target = ref if has_pronoun(text) and ref else (mentioned[0] if mentioned else None)
    if re.match(r"\s*(remove|delete|erase|take away)\b", text, re.IGNORECASE):
        return None
    guess = _updated_name(target, text) if target else None
    if after is None:
        return guess if guess else ref
    new = [o for o in after if before is None or o not in before]
    if new:
        key = guess or text
        return max(new, key=lambda o: (_overlap(o, key), -new.index(o)))
    if target and target in after:
        return target
    return ref if ref and ref in after else target


ATTRIBUTE_NOUNS = frozenset("color colour colors colours material materials count number size position shape "
                            "texture pattern style location appearance".split())


def _rewrite_pronouns(text: str, ref: str, visible: Sequence[str] = ()) -> str:
    """'Change its color to black' -> 'Change the color of [ref] to black'; 'Remove it' ->
    'Remove [ref]'; 'their strap' (a part with a name of its own in the image) -> '[fabric
    black strap]'. Quoted literal text is left alone."""
    def outside(m: re.Match, s: str) -> bool:
        return not any(a <= m.start() < b for a, b in ((q.start(), q.end()) for q in _QUOTED.finditer(s)))

    def poss(m: re.Match) -> str:
        if not outside(m, text):
            return m.group(0)
        noun = m.group(2).lower()
        if noun not in ATTRIBUTE_NOUNS:
            parts = [o for o in visible if o.lower().split()[-1:] == [noun] and o != ref]
            if parts:
                return f"[{max(parts, key=lambda o: (_overlap(o, ref), -parts.index(o)))}]"
        return f"the {m.group(2)} of [{ref}]"

    out = _POSSESSIVE.sub(poss, text)
    return _OBJECT_PRONOUN.sub(lambda m: f"[{ref}]" if outside(m, out) else m.group(0), out)


COMMAND_WORDS = frozenset({"text", "image", "background", "picture", "photo", "scene"})


def _bracket(text: str, names: Sequence[str]) -> str:
    out, pos = [], 0
    for a, b, name in _mentions(text, [n for n in names if n.lower() not in COMMAND_WORDS]):
        if a > 0 and text[a - 1] == "[":
            continue
        out += [text[pos:a], "[", text[a:b], "]"]
        pos = b
    out.append(text[pos:])
    return "".join(out)


def _governed(text: str) -> bool:
    """An instruction that adds or changes an object (what a colour/material rule governs)."""
    return not re.match(r"\s*(remove|delete|erase|take away)\b", text, re.IGNORECASE) and \
        not re.search(r"\bbackground\b|\btext\b|\bstyle\b", text, re.IGNORECASE)


def reconstruct_records(q: IntentQuery) -> Reconstruction:
    rule: GlobalConstraint | None = None
    ref: str | None = None
    ref_turn = 0
    for j, raw in enumerate(q.instructions, start=1):
        text = raw
        split = split_rule(raw) if rule is None else None
        if split is not None:
            rule, text = parse_rule(split[0], from_turn=j), split[1]
        before = q.objects[j - 1] if q.objects is not None and j - 1 < len(q.objects) else None
        after = q.objects[j] if q.objects is not None and j < len(q.objects) else None
        names = list(before or []) + ([ref] if ref else [])
        mentioned = [n for _, _, n in _mentions(text, names)]
        if not mentioned and before is None and not has_pronoun(text):
            phrase = _object_phrase(text)
            mentioned = [phrase] if phrase else []
        if j == q.turn:
            trace = []
            explicit = text
            if has_pronoun(text):
                if ref is None:
                    raise IntentParseError(f"a pronoun in {text!r} with no object edited before it")
                explicit = _rewrite_pronouns(text, ref, before or ())
                trace.append(f"pronoun -> [{ref}] (the object edited in turn {ref_turn})")
            explicit = _bracket(explicit, [n for n in names if n != ref] if has_pronoun(text) else names)
            if rule is not None and rule.value and rule.kind in ("color_of_changes", "material_of_changes") \
                    and _governed(text):
                what = "color" if rule.kind == "color_of_changes" else "material"
                explicit = f"{explicit.rstrip('. ')}, using [{rule.value}] {what} only on the edited object"
                trace.append(f"rule: {rule.value} {what} injected")
            return Reconstruction(explicit=explicit, trace="; ".join(trace))
        nxt = _follow(ref, text, before, after, mentioned)
        if nxt is not None and (nxt != ref or has_pronoun(text) or mentioned):
            ref_turn = j
        ref = nxt
    raise IntentParseError("no instruction to rewrite")
