"""`program`: the exact ShapesWorld judge (editrl.world.verify) behind the Judge protocol."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from ..session import EditrlInputError, TurnVerdict
from ..world.grammar import session_scenes
from ..world.parse import RESIDUE_FLOOR, RESIDUE_NOISE_K, Parsed, parse
from ..world.verify import judge_parsed
from .base import JudgeRequest

_MEMORY = 1024            # parsed images remembered (a pronoun turn's input is the previous turn's output)
_MEMORY_BYTES = 64 << 20  # ... holding at most this many bytes (images and their parsed masks)


class ProgramJudge:
    judge_id = "program"
    prompt_version = ""

    def __init__(self) -> None:
        self._parsed: OrderedDict[tuple, tuple[Parsed, int]] = OrderedDict()   # exact image bytes -> (parse, size)
        self._bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        # sent to worker processes with every call: without the remembered parses
        return {**self.__dict__, "_parsed": OrderedDict(), "_bytes": 0}

    def params(self) -> dict[str, Any]:
        # CU reads which objects a turn edited from the turn's own input image; the referent
        # counts as edited when its requested attribute shows the asked value or changed (verify.py);
        # residue is a box-mean deviation above max(floor, k * the image's own noise) (parse.py)
        return {"cu": "turn-input", "cu_referent": "attribute-changed",
                "residue": f"box-floor{RESIDUE_FLOOR}-noise{RESIDUE_NOISE_K}"}

    def _parse(self, img: np.ndarray, canvas: int) -> Parsed:
        """parse(img), remembered by the image's exact bytes: the input of a pronoun turn is
        the output of the turn before, usually judged just before it."""
        key = (img.shape, str(img.dtype), canvas, img.tobytes())
        hit = self._parsed.get(key)
        if hit is not None:
            self._parsed.move_to_end(key)
            return hit[0]
        out = parse(img, canvas)
        size = len(key[3]) + sum(d.mask.nbytes for d in out.objects) + sum(r.mask.nbytes for r in out.residue)
        self._parsed[key] = (out, size)
        self._bytes += size
        while len(self._parsed) > _MEMORY or (self._bytes > _MEMORY_BYTES and len(self._parsed) > 1):
            self._bytes -= self._parsed.popitem(last=False)[1][1]
        return out

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
            prev, nxt, turn = sc[r.turn - 1], sc[r.turn], s.turns[r.turn - 1]
            parsed = self._parse(r.image, nxt.canvas)
            source = self._parse(r.prev, prev.canvas) if turn.pronoun else None
            out.append(judge_parsed(parsed, prev, nxt, turn, r.turn, s.global_constraint, s.id, source))
        return out
