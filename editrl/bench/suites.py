"""Benchmark suites: which sessions are run and where their source images come from.

`SUITE` is `shapes` — ShapesWorld sessions made on the fly, session i of the stream defined
by `--seed` with `--turns` turns (default 3) — `shapes-long` (5 turns by default, 60% of
sessions under a global rule, a pronoun wherever one is possible 90% of the time) or a path to a JSONL file: editrl's session
schema, or MICE-Bench / EdiVal records, which are converted on load. For a file, `--sessions
N` takes the first N sessions (more than the file holds is an error) and `--turns K`
truncates every session to at most K turns.

A suite is identified by `key`: the generator settings for `shapes`, the file's SHA-256 (and
the turn limit) otherwise. Two runs are comparable session by session only when their keys
are equal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..editors.outputs import check_session_id
from ..session import EditrlInputError, Session, read_sessions, resolve_image, sha256_file

DEFAULT_SHAPES_SESSIONS = 50
DEFAULT_SHAPES_TURNS = 3


@dataclass
class Suite:
    spec: str                          # what the user gave: "shapes" or a path
    kind: str                          # shapes | editrl | mice | edival
    sessions: list[Session]
    path: Path | None = None           # the suite file (None for shapes)
    sha256: str | None = None          # of the suite file
    seed: int | None = None            # shapes only
    turns: int | None = None           # the --turns limit (shapes: turns per session)

    @property
    def key(self) -> str:
        """Identity for `bench compare`: equal keys mean session ids denote the same sessions."""
        if self.kind == "shapes":
            name = "shapes" if self.spec == "shapes" else self.spec
            return f"{name}:seed={self.seed}:turns={self.turns}"
        return f"file:{self.sha256}:turns={self.turns or 'all'}"

    def source_path(self, s: Session) -> Path | None:
        """The source image file of session `s` (None for shapes: rendered in memory)."""
        return None if self.path is None else resolve_image(self.path, s.source_image)

    def source(self, s: Session) -> np.ndarray:
        """The source image of session `s`, uint8 [H, W, 3] (read or rendered on each call:
        suites of real photographs would not fit in memory at once)."""
        from ..world.render import load_png, render
        from ..world.scene import Scene

        if self.path is None:
            return render(Scene.from_dict(s.source_scene))
        p = self.source_path(s)
        try:
            return load_png(p)
        except FileNotFoundError:
            raise EditrlInputError(f"session {s.id}: source image not found: {p}") from None
        except Exception as e:
            raise EditrlInputError(f"session {s.id}: source image {p} is not readable ({type(e).__name__}: {e})") from None

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "key": self.key,
                "path": None if self.path is None else str(self.path), "sha256": self.sha256,
                "seed": self.seed, "turns": self.turns, "sessions": len(self.sessions)}


def _truncate(s: Session, turns: int | None) -> Session:
    if turns is None or s.n_turns <= turns:
        return s
    gc = s.global_constraint
    if gc is not None and gc.from_turn > turns:
        gc = None
    return s.model_copy(update={"turns": s.turns[:turns], "global_constraint": gc})


# Named ShapesWorld suites: grammar settings (GrammarConfig fields) and default turns.
# `shapes-long`: long sessions rich in pronouns and global rules, where reconstruction matters.
SHAPES_SUITES: dict[str, tuple[dict[str, Any], int]] = {
    "shapes": ({}, DEFAULT_SHAPES_TURNS),
    "shapes-long": ({"constraint_share": 0.6, "pronoun_prob": 0.9}, 5),
}


def shapes_suite(n: int, turns: int, seed: int, name: str = "shapes") -> Suite:
    """Sessions 0..n-1 of the ShapesWorld stream `seed`, `turns` turns each."""
    from ..world.grammar import GrammarConfig, sample_session

    try:
        cfg = GrammarConfig(turns=turns, **SHAPES_SUITES[name][0])
    except ValueError as e:
        raise EditrlInputError(f"--turns: {e}") from None
    sessions = [sample_session(seed, i, cfg) for i in range(n)]
    return Suite(name, "shapes", sessions, seed=seed, turns=turns)


def file_suite(path: str | Path, n: int | None, turns: int | None) -> Suite:
    """A sessions file (editrl schema) or MICE-Bench / EdiVal records."""
    from ..convert import load_foreign_sessions, sniff_format

    path = Path(path)
    if not path.is_file():
        raise EditrlInputError(f"--suite {path}: no such file (expected 'shapes' or a sessions JSONL)")
    kind = sniff_format(path) or "editrl"
    sessions = load_foreign_sessions(path) if kind != "editrl" else read_sessions(path)
    if n is not None:
        if n > len(sessions):
            raise EditrlInputError(f"--sessions {n}: {path} holds only {len(sessions)} sessions")
        sessions = sessions[:n]
    sessions = [_truncate(s, turns) for s in sessions]
    return Suite(str(path), kind, sessions, path=path, sha256=sha256_file(path), turns=turns)


def load_suite(spec: str, sessions: int | None = None, turns: int | None = None, seed: int = 0) -> Suite:
    """`shapes` or a path; see the module docstring. Every session id must be a safe folder name."""
    if sessions is not None and sessions < 1:
        raise EditrlInputError(f"--sessions must be at least 1, got {sessions}")
    if turns is not None and turns < 1:
        raise EditrlInputError(f"--turns must be at least 1, got {turns}")
    if spec in SHAPES_SUITES:
        suite = shapes_suite(sessions or DEFAULT_SHAPES_SESSIONS, turns or SHAPES_SUITES[spec][1], seed, spec)
    else:
        suite = file_suite(spec, sessions, turns)
    for s in suite.sessions:
        check_session_id(s.id)
    return suite


def sessions_digest(sessions: list[Session]) -> str:
    """SHA-256 of the sessions as run (after --sessions / --turns), for the run's settings."""
    h = hashlib.sha256()
    for s in sessions:
        h.update(s.model_dump_json().encode())
        h.update(b"\n")
    return h.hexdigest()
