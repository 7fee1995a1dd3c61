"""Session-intent reconstruction (Edit-R2): rewrite each instruction into an explicit one.

`load_reconstructor(spec)`: `none` (None: the editor sees the raw text), `rules`,
`tiny[:PATH]` (the learned text policy), `llm:...` (a causal LM or a chat endpoint).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..session import EditrlInputError, Session
from .base import IntentQuery, Reconstruction, Reconstructor, query_for, visible_objects
from .rules import RulesReconstructor

INTENT_SPECS = "none | rules | tiny | tiny:PATH | llm:hf:PATH | llm:URL#MODEL"

__all__ = ["IntentQuery", "Reconstruction", "Reconstructor", "RulesReconstructor", "query_for", "visible_objects",
           "load_reconstructor", "reconstruct_sessions", "INTENT_SPECS"]


def load_reconstructor(spec: str | None) -> Any:
    """The reconstructor named by `spec`; None for `none` (the raw instruction is used)."""
    if spec in (None, "", "none"):
        return None
    if spec == "rules":
        return RulesReconstructor()
    if spec == "tiny" or spec.startswith("tiny:"):
        from .tiny import load_tiny_policy
        return load_tiny_policy(spec)
    if spec.startswith("llm:"):
        from .llm import load_llm_reconstructor
        return load_llm_reconstructor(spec[len("llm:"):])
    raise EditrlInputError(f"unknown --intent {spec!r} (expected {INTENT_SPECS})")


def reconstruct_sessions(reconstructor: Any, sessions: Sequence[Session],
                         progress=None) -> dict[tuple[str, int], Reconstruction]:
    """Every turn's reconstruction, turn by turn across sessions (batched), each turn seeing the
    explicit instructions written for the session's earlier turns."""
    out: dict[tuple[str, int], Reconstruction] = {}
    objects = [None if s.source_scene is not None else visible_objects(s) for s in sessions]
    used: list[list[str]] = [[] for _ in sessions]
    for k in range(1, max((s.n_turns for s in sessions), default=0) + 1):
        idx = [i for i, s in enumerate(sessions) if s.n_turns >= k]
        recs = reconstructor.reconstruct([query_for(sessions[i], k, used[i], objects=objects[i]) for i in idx])
        if len(recs) != len(idx):
            raise RuntimeError(f"{reconstructor.name} returned {len(recs)} reconstructions for {len(idx)} queries")
        for i, rec in zip(idx, recs):
            used[i].append(rec.explicit)
            out[(sessions[i].id, k)] = rec
        if progress:
            progress(len(idx))
    return out
