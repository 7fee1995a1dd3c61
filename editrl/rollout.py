"""Multi-turn rollouts: every turn edits the editor's own previous output.

`rollout` runs a batch of sessions through an editor turn by turn (turn k's input is the
output of turn k-1 of the same session), in the chosen text form: `explicit` (the bracketed
explicit instruction), `raw` (what the user typed) or `in_context` (raw, with the session's
previous instructions as context). Shared by benchmarks and RL so nothing is computed twice.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .session import EditrlInputError, Session

TEXT_FORMS = ("explicit", "raw", "in_context")


def turn_texts(session: Session, k: int, form: str) -> tuple[str, list[str]]:
    """(instruction shown at 1-based turn k, context of previous instructions)."""
    t = session.turns[k - 1]
    history = [x.instruction for x in session.turns[: k - 1]]
    if form == "explicit":
        if not t.explicit:
            raise EditrlInputError(f"session {session.id} turn {k} has no explicit instruction")
        return t.explicit, []
    if form == "raw":
        return t.instruction, []
    if form == "in_context":
        return t.instruction, history
    raise EditrlInputError(f"unknown text form {form!r} (expected one of {', '.join(TEXT_FORMS)})")


def rollout(editor, sessions: Sequence[Session], sources: Sequence[np.ndarray], form: str = "explicit",
            steps: int = 10, seed: int = 0, batch_size: int = 64, turns: int | None = None,
            progress=None, texts: dict | None = None) -> list[list[np.ndarray]]:
    """outputs[i][k-1] = the image after turn k of session i. `texts[(session id, k)] =
    (text, context)` replaces the form's text (e.g. reconstructed explicit instructions)."""
    import torch  # imported here so that `turn_texts` alone (e.g. benchmarking precomputed outputs) needs no torch

    if len(sessions) != len(sources):
        raise ValueError("one source image per session")
    K = turns or max(s.n_turns for s in sessions)
    outs: list[list[np.ndarray]] = [[] for _ in sessions]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, len(sessions), batch_size):
            idx = list(range(start, min(len(sessions), start + batch_size)))
            current = [sources[i] for i in idx]
            for k in range(1, K + 1):
                live = [j for j, i in enumerate(idx) if sessions[i].n_turns >= k]
                if not live:
                    break
                given, ctxs = zip(*(texts[(sessions[idx[j]].id, k)] if texts is not None
                                    else turn_texts(sessions[idx[j]], k, form) for j in live))
                imgs = editor.edit([current[j] for j in live], list(given), [list(c) for c in ctxs],
                                   generator=gen, steps=steps)
                for j, img in zip(live, imgs):
                    current[j] = img
                    outs[idx[j]].append(img)
                if progress:
                    progress(len(live))
    return outs
