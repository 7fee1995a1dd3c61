"""Writing a ShapesWorld suite to disk: DIR/sessions.jsonl, DIR/images/<id>_0.png and, with
targets, the ground truth of every turn as DIR/targets/<id>/turn_<k>.png (the `outputs:DIR`
layout, so ground truth can be benchmarked like any editor). Same seed, same bytes; every
file is written whole or not at all, and sessions.jsonl last."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..session import EditrlInputError, atomic_write_bytes, write_sessions
from .grammar import GrammarConfig, sample_session, session_scenes
from .render import render


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write_world(out: str | os.PathLike, n_sessions: int, seed: int, cfg: GrammarConfig,
                targets: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EditrlInputError(f"--out {out} exists and is not a folder")
    sessions = []
    for i in range(n_sessions):
        s = sample_session(seed, i, cfg)
        scenes = session_scenes(s)
        data = png_bytes(render(scenes[0]))
        atomic_write_bytes(out / s.source_image, data)
        s.source_sha256 = hashlib.sha256(data).hexdigest()
        if targets:
            for k in range(1, len(scenes)):
                atomic_write_bytes(out / "targets" / s.id / f"turn_{k}.png", png_bytes(render(scenes[k])))
        sessions.append(s)
        if progress:
            progress(1)
    write_sessions(out / "sessions.jsonl", sessions)
    n_pronoun = sum(t.pronoun for s in sessions for t in s.turns[1:])
    n_later = sum(len(s.turns) - 1 for s in sessions)
    return {"out": str(out), "sessions": len(sessions), "turns": cfg.turns, "seed": seed,
            "sessions_file": str(out / "sessions.jsonl"), "targets": str(out / "targets") if targets else None,
            "with_constraint": sum(s.global_constraint is not None for s in sessions),
            "pronoun_share_later_turns": n_pronoun / n_later if n_later else None}
