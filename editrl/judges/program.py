"""`program`: the exact ShapesWorld judge (editrl.world.verify) behind the Judge protocol."""

from __future__ import annotations

from typing import Any, Sequence

from ..session import EditrlInputError, TurnVerdict
from ..world.grammar import session_scenes
from ..world.verify import judge_turn
from .base import JudgeRequest


class ProgramJudge:
    judge_id = "program"
    prompt_version = ""

    def params(self) -> dict[str, Any]:
        # CU reads which objects a turn edited from the turn's own input image (verify.py)
        return {"cu": "turn-input"}

    def judge(self, requests: Sequence[JudgeRequest]) -> list[TurnVerdict]:
        out = []
        cache: dict[str, list] = {}
        for r in requests:
            s = r.session
            if s.id not in cache:
                try:
                    cache[s.id] = session_scenes(s)
                except ValueError:
                    raise EditrlInputError(
                        f"session {s.id}: the program judge needs ShapesWorld sessions (with source_scene and "
                        f"expected scenes); use a vlm judge for other records") from None
            sc = cache[s.id]
            out.append(judge_turn(r.image, sc[r.turn - 1], sc[r.turn], s.turns[r.turn - 1], r.turn,
                                  s.global_constraint, s.id, source_image=r.prev if s.turns[r.turn - 1].pronoun else None))
        return out
