"""Session-intent reconstruction: the protocol every reconstructor implements.

Before turn k the editor is shown an *explicit* instruction written from the session so
far: pronouns resolved to the object they denote in the current image, and a persistent
session rule injected into the turn it governs (ALGORITHMS §8). A reconstructor maps an
`IntentQuery` to a `Reconstruction` (the explicit instruction and a brief reasoning trace).

What a reconstructor may see is exactly what a user's assistant could see at that moment,
and `query_for` builds the query from a session so that nothing else leaks in: the raw
instructions of turns 1..k, the explicit instructions *this run* used for turns 1..k-1,
the current image, and the symbolic content of the images the session has shown so far
where the suite knows it (ShapesWorld: the source scene; real records: the object lists
of the source and of every earlier turn's result). The gold explicit instructions, the
expected scenes and the object lists of turn k's own result are never in a query.

A reconstructor that cannot answer (an HTTP error, a sentence it cannot parse) returns the
raw instruction with `error` set: the editor still gets a text, and the failure is counted
and reported, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from ..session import GlobalConstraint, Session


@dataclass(frozen=True)
class IntentQuery:
    session_id: str
    turn: int                                        # k, 1-based: the turn to rewrite
    instructions: tuple[str, ...]                    # raw instructions of turns 1..k
    previous: tuple[str, ...] = ()                   # explicit instructions used for turns 1..k-1
    image: np.ndarray | None = field(default=None, compare=False)   # current image (turn k's input)
    source_scene: dict[str, Any] | None = None       # ShapesWorld: scene of the source image
    objects: tuple[tuple[str, ...], ...] | None = None   # real records: objects visible in the
                                                     # input image of each turn 1..k ([0] = source)

    @property
    def instruction(self) -> str:
        return self.instructions[-1]


@dataclass
class Reconstruction:
    explicit: str                  # what the editor is shown for this turn
    trace: str = ""                # brief reasoning: what was resolved, which rule was injected
    error: str | None = None       # the reconstructor failed; `explicit` is then the raw instruction


@runtime_checkable
class Reconstructor(Protocol):
    name: str

    def reconstruct(self, queries: Sequence[IntentQuery]) -> list[Reconstruction]:
        """One reconstruction per query (batched; the order is kept)."""
        ...


def source_objects(session: Session) -> tuple[str, ...] | None:
    """Names of the objects in a real record's source image, from turn 1's lists: every name
    turn 1 knows, less those its result created that its instruction does not mention (a
    recoloured "paper yellow sign" is new; "white buildings" whose count changed, or an
    added "monitor", are named by the instruction and kept: an extra name only widens the
    choice a reconstructor snaps to, a missing one would hide an object)."""
    t = session.turns[0]
    p = t.params
    if not all(isinstance(p.get(f), list) for f in ("all_objects", "available_objects", "unchanged_objects")):
        return None
    text = t.instruction.lower()
    created = set(p["available_objects"]) - set(p["unchanged_objects"])
    return tuple(dict.fromkeys(o for o in p["all_objects"] if o not in created or o.lower() in text))


def visible_objects(session: Session) -> tuple[tuple[str, ...], ...] | None:
    """Object names visible in the input image of every turn: [0] the source, [j] the result
    of turn j (its `available_objects`). None for sessions without object lists."""
    src = source_objects(session)
    if src is None:
        return None
    out = [src]
    for t in session.turns[:-1]:
        avail = t.params.get("available_objects")
        if not isinstance(avail, list):
            return None
        out.append(tuple(avail))
    return tuple(out)


def query_for(session: Session, turn: int, previous: Sequence[str] = (), image: np.ndarray | None = None,
              objects: tuple[tuple[str, ...], ...] | None = None) -> IntentQuery:
    """The query for turn `turn` of `session`: only what may be known before that turn.
    `objects` may be passed in (from `visible_objects`) to avoid recomputing it per turn."""
    if not 1 <= turn <= session.n_turns:
        raise ValueError(f"turn {turn} out of range 1..{session.n_turns}")
    if len(previous) != turn - 1:
        raise ValueError(f"turn {turn} needs the {turn - 1} explicit instructions used before it, got {len(previous)}")
    if objects is None and session.source_scene is None:
        objects = visible_objects(session)
    return IntentQuery(
        session_id=session.id, turn=turn,
        instructions=tuple(t.instruction for t in session.turns[:turn]),
        previous=tuple(previous), image=image,
        source_scene=session.source_scene,
        objects=None if objects is None else tuple(objects[:turn]))


def constraint_of(query: IntentQuery) -> GlobalConstraint | None:
    """The session rule stated so far in the raw instructions (real-record phrasing), if any."""
    from ..convert import parse_rule, split_rule

    for k, text in enumerate(query.instructions, start=1):
        split = split_rule(text)
        if split is not None:
            return parse_rule(split[0], from_turn=k)
    return None


class RawInstruction:
    """`none`: the raw instruction, unchanged (the baseline every reconstructor is scored against)."""

    name = "none"

    def reconstruct(self, queries: Sequence[IntentQuery]) -> list[Reconstruction]:
        return [Reconstruction(explicit=q.instruction) for q in queries]
