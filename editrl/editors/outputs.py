"""`outputs:DIR`: an "editor" whose outputs were computed elsewhere and saved to disk.

This is how editrl evaluates any model it cannot run itself (closed APIs included): the
model's output of turn k of session ID lies at `DIR/<ID>/turn_<k>.png`, k = 1..K, each turn
made from the model's own previous output. `editrl world sample --targets` writes ground
truth in the same layout (under `DIR/targets/`), so the judge and the harness can be checked
on known answers. Nothing is generated; the editor only names and reads files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..session import EditrlInputError

_BAD_ID_CHARS = ("/", "\\", "\0")


def check_session_id(session_id: str) -> str:
    """A session id is used as a folder name: refuse one that would leave its parent folder."""
    if session_id in (".", "..") or any(c in session_id for c in _BAD_ID_CHARS):
        raise EditrlInputError(f"session id {session_id!r} cannot be used as a folder name "
                               f"(no '/', '\\' or NUL, not '.' or '..')")
    return session_id


class OutputsEditor:
    """Precomputed outputs in `root/<session id>/turn_<k>.png`."""

    name = "outputs"
    precomputed = True        # the harness reads images instead of generating them
    accepts_context = False   # `--form auto` means `raw`: the text a user would have typed

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise EditrlInputError(f"outputs:{root}: no such folder")

    @property
    def spec(self) -> str:
        return f"outputs:{self.root}"

    def path(self, session_id: str, turn: int) -> Path:
        """Where the output of 1-based `turn` of `session_id` must be."""
        return self.root / check_session_id(session_id) / f"turn_{turn}.png"

    def first_missing(self, session_id: str, n_turns: int) -> int | None:
        """The first turn (1-based) whose image is absent, or None when all n_turns exist."""
        for k in range(1, n_turns + 1):
            if not self.path(session_id, k).is_file():
                return k
        return None

    def load(self, session_id: str, turn: int) -> np.ndarray:
        from ..world.render import load_png

        p = self.path(session_id, turn)
        try:
            return load_png(p)
        except FileNotFoundError:
            raise EditrlInputError(f"missing output image {p}") from None
        except Exception as e:  # truncated or not an image: the user's file, reported as such
            raise EditrlInputError(f"{p}: not a readable image ({type(e).__name__}: {e})") from None


def load_outputs(spec: str) -> OutputsEditor:
    """`outputs:DIR` -> OutputsEditor(DIR)."""
    root = spec[len("outputs:"):]
    if not root:
        raise EditrlInputError("outputs:DIR needs a folder, e.g. outputs:runs/my_model")
    return OutputsEditor(root)
