"""An editor's quality on fresh ShapesWorld sessions, chained over turns, by the exact judge.

Every session is rolled out turn by turn on the editor's own outputs (`rollout.rollout`) in
each text form, and every turn is judged against the expected scenes. Per turn: IF, CC, GA,
CU (over turns where they apply), success, success@k (all turns 1..k succeeded) and marginal
success (success at k among sessions that succeeded through k-1). The full benchmark harness
(suites from files, VLM judges, intervals, reports) builds on this.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from .editors import load_editor
from .rollout import rollout
from .world.grammar import GrammarConfig, sample_session, session_scenes
from .world.io import png_bytes
from .world.render import render
from .world.verify import judge_turn

CHECKS = ("IF", "CC", "GA", "CU")


def evaluate_editor(editor_spec: str, n: int, turns: int, seed: int, steps: int, forms: list[str],
                    progress: Callable[[int], None] | None = None, strips: int = 0) -> dict[str, Any]:
    sessions = [sample_session(seed, i, GrammarConfig(turns=turns)) for i in range(n)]
    scenes = [session_scenes(s) for s in sessions]
    sources = [render(sc[0]) for sc in scenes]
    result: dict[str, Any] = {"editor": editor_spec, "sessions": n, "turns": turns, "seed": seed,
                              "steps": steps, "solver": "ode", "forms": {}, "strips": {}}
    all_outs = {}
    for form in forms:
        ed = load_editor(editor_spec, mode="in_context" if form == "in_context" else "explicit")
        t0 = time.time()
        outs = rollout(ed, sessions, sources, form=form, steps=steps, seed=seed, progress=progress)
        secs = time.time() - t0
        all_outs[form] = outs
        ok_all = np.ones(n, bool)
        per_turn = []
        by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for k in range(1, turns + 1):
            rows: dict[str, list[bool]] = {c: [] for c in CHECKS}
            succ = np.zeros(n, bool)
            for i, (s, sc) in enumerate(zip(sessions, scenes)):
                v = judge_turn(outs[i][k - 1], sc[k - 1], sc[k], s.turns[k - 1], k, s.global_constraint, s.id)
                for c in CHECKS:
                    st = getattr(v, c).status
                    if st is not None:
                        rows[c].append(st == "pass")
                succ[i] = bool(v.success)
                by_type[s.turns[k - 1].task_type][0] += int(succ[i])
                by_type[s.turns[k - 1].task_type][1] += 1
            prev_all = ok_all.copy()
            ok_all &= succ
            per_turn.append({"turn": k, "n": n, **{c: (float(np.mean(v)) if v else None) for c, v in rows.items()},
                             "success": float(succ.mean()), "success_all": float(ok_all.mean()),
                             "marginal": float(ok_all.sum() / prev_all.sum()) if prev_all.sum() else None})
        result["forms"][form] = {"per_turn": per_turn, "seconds": round(secs, 1),
                                 "success_by_type": {t: round(a / b, 3) for t, (a, b) in sorted(by_type.items())}}
    for i in range(min(strips, n)):
        rows_img = [np.concatenate([sources[i]] + all_outs[f][i], 1) for f in forms]
        truth = np.concatenate([sources[i]] + [render(sc) for sc in scenes[i][1:]], 1)
        img = np.concatenate(rows_img + [truth], 0)
        result["strips"][sessions[i].id] = png_bytes(np.kron(img, np.ones((2, 2, 1), np.uint8)))
    return result
