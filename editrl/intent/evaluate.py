"""`editrl intent eval`: score a reconstructor against the gold explicit instructions.

A reconstructor runs over every turn of every session in order, each turn seeing the
explicit instructions it wrote for the earlier turns (as it would in a real session).
Two accuracies (docs/INTENT.md):

* **Referent accuracy**, over turns that edit an object already in the image: the gold
  referent is the first bracketed phrase of the gold explicit instruction that names such
  an object (ShapesWorld: the target's canonical name, e.g. "red circle at top left"; real
  records: a name in the object list of the turn's input image). The reconstruction is
  right when one of its bracketed phrases is that phrase, or, for a text without brackets,
  when the phrase occurs in it (case, punctuation and spacing ignored; whole words). Reported for all such turns and for the pronoun turns alone.
* **Constraint accuracy**, over turns a session rule governs (ShapesWorld: the grammar's
  `governed` flag; real records: turns from the rule's turn on that add or change an
  object): the reconstruction carries the rule when the rule's value (a colour, a fill, a
  material, or for `protect` the protected object's name) appears in it outside the
  referent's name and outside the rule sentence itself.

Also reported: the share of reconstructions equal to the gold explicit instruction
(normalised), and reconstructor errors (counted; an errored turn is scored on the raw
instruction it falls back to, so errors are never hidden in the accuracies).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from ..convert import bracket_names, split_rule
from ..session import Session
from .base import visible_objects

OBJECT_TYPES = ("remove", "replace", "color", "material", "size", "position", "count")


def norm(s: str) -> str:
    """Lower case, brackets and punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^\w'-]+", " ", s.lower()).split())


def contains(text: str, phrase: str) -> bool:
    """Whole words, case/punctuation ignored; whole words anywhere in the text."""
    p = norm(phrase)
    return bool(p) and re.search(r"(?<![\w'-])" + re.escape(p) + r"(?![\w'-])", norm(text)) is not None


def names(text: str, phrase: str) -> bool:
    """`text` names the object `phrase`: a bracketed phrase of `text` is `phrase` (normalised),
    or, for a text without brackets, `phrase` occurs in it as whole words."""
    brackets = bracket_names(text)
    if brackets:
        return norm(phrase) in {norm(b) for b in brackets}
    return contains(text, phrase)


def gold_referent(session: Session, k: int, objects: Sequence[Sequence[str]] | None) -> str | None:
    """The object of turn k that is already in its input image, named as the gold names it."""
    t = session.turns[k - 1]
    names = bracket_names(t.explicit)
    if not names:
        return None
    if session.source_scene is not None:            # ShapesWorld: the target is the first bracket
        return names[0] if t.task_type in OBJECT_TYPES else None
    if objects is None or k - 1 >= len(objects):
        return None
    visible = {norm(o) for o in objects[k - 1]}
    quoted = {m.group(1) for m in re.finditer(r"['\"]\[([^\[\]]*)\]", t.explicit or "")}   # '[literal text]'
    return next((n for n in names if norm(n) in visible and n not in quoted), None)


def governing_rule(session: Session, k: int) -> str | None:
    """The value turn k must carry for the session rule that governs it, or None."""
    gc = session.global_constraint
    if gc is None or k < gc.from_turn:
        return None
    t = session.turns[k - 1]
    if session.source_scene is not None:
        if not t.params.get("governed"):
            return None
        if gc.kind == "protect":
            return gc.value.get("object") if isinstance(gc.value, dict) else None
        return str(gc.value) if gc.value else None
    if gc.kind not in ("color_of_changes", "material_of_changes") or not gc.value:
        return None
    from .rules import _governed
    text = t.instruction
    split = split_rule(text) if k == gc.from_turn else None
    edit = split[1] if split else text
    return str(gc.value) if _governed(edit) else None


def _without(text: str, *phrases: str | None) -> str:
    out = norm(text)
    for p in phrases:
        if p:
            out = re.sub(r"(?<![\w'-])" + re.escape(norm(p)) + r"(?![\w'-])", " ", out)
    return out


def evaluate_sessions(reconstructor: Any, sessions: Sequence[Session],
                      progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run `reconstructor` over every turn (batched across sessions, turn by turn) and score it."""
    from . import reconstruct_sessions

    rows: list[dict[str, Any]] = []
    objects = [None if s.source_scene is not None else visible_objects(s) for s in sessions]
    recs = reconstruct_sessions(reconstructor, sessions, progress)
    for i, s in enumerate(sessions):
        for k in range(1, s.n_turns + 1):
            rec = recs[(s.id, k)]
            t = s.turns[k - 1]
            ref = gold_referent(s, k, objects[i])
            rule = governing_rule(s, k)
            rule_sentence = split_rule(t.instruction)[0] if (k == 1 and split_rule(t.instruction)) else None
            if s.source_scene is not None and k == 1 and s.global_constraint is not None:
                rule_sentence = s.global_constraint.text
            rows.append({
                "session_id": s.id, "turn": k, "instruction": t.instruction, "gold": t.explicit,
                "explicit": rec.explicit, "trace": rec.trace, "error": rec.error, "pronoun": t.pronoun,
                "referent": ref, "referent_ok": None if ref is None else names(rec.explicit, ref),
                "rule": rule,
                "rule_ok": None if rule is None else contains(_without(rec.explicit, ref, rule_sentence), rule),
                "exact": None if not t.explicit else norm(rec.explicit) == norm(t.explicit),
            })
    return {"summary": summarize(rows), "rows": rows}


def _rate(vals: list[bool]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ref = [r["referent_ok"] for r in rows if r["referent_ok"] is not None]
    ref_p = [r["referent_ok"] for r in rows if r["referent_ok"] is not None and r["pronoun"]]
    rule = [r["rule_ok"] for r in rows if r["rule_ok"] is not None]
    exact = [r["exact"] for r in rows if r["exact"] is not None]
    return {
        "turns": len(rows),
        "referent_accuracy": _rate(ref), "referent_turns": len(ref),
        "referent_accuracy_pronoun": _rate(ref_p), "pronoun_referent_turns": len(ref_p),
        "constraint_accuracy": _rate(rule), "constraint_turns": len(rule),
        "exact_match": _rate(exact),
        "errors": sum(r["error"] is not None for r in rows),
    }
