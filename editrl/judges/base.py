"""The judge protocol shared by the benchmark and the RL rewards.

A judge answers `JudgeRequest`s — one turn of one session, with every image of the session
up to that turn — with `TurnVerdict`s (IF, CC, GA, CU: pass / fail / judge_error / not
applicable, a graded score in [0, 1], a reason and the raw model text). Judges are batched
(`judge(requests)` takes a list) and never raise for a model-side failure: an unparseable,
refused or timed-out reply becomes `judge_error` for the checks it should have decided.
Bad *input* (e.g. the program judge given a session without ShapesWorld scenes) raises
`EditrlInputError`.

`judge_id`, `prompt_version` and `params()` together name what a verdict depends on besides
the images and the text; the benchmark's cache keys on them (see `cache_key`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from ..session import Session, TurnVerdict


@dataclass
class JudgeRequest:
    session: Session
    turn: int                      # 1-based turn being judged
    images: list[np.ndarray]       # [source, out_1, ..., out_turn], uint8 [H, W, 3]
    explicit: str | None = None    # the explicit instruction actually used for this turn, if any

    @property
    def image(self) -> np.ndarray:
        return self.images[self.turn]

    @property
    def prev(self) -> np.ndarray:
        return self.images[self.turn - 1]


@runtime_checkable
class Judge(Protocol):
    judge_id: str                  # e.g. "program", "vlm:http://host:8000/v1#Qwen2.5-VL-7B"
    prompt_version: str            # "" for judges without prompts

    def params(self) -> dict[str, Any]:
        """Every setting that changes a verdict (protocol, temperature, votes, think, ...)."""
        ...

    def judge(self, requests: Sequence[JudgeRequest]) -> list[TurnVerdict]:
        ...


def image_hash(img: np.ndarray) -> str:
    a = np.ascontiguousarray(img, dtype=np.uint8)
    h = hashlib.sha256()
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def cache_key(judge: Judge, req: JudgeRequest, image_hashes: Sequence[str] | None = None) -> str:
    """Content address of one verdict: image hashes, the session's text (instructions,
    explicit forms, constraint, ground truth where known), turn, prompt version, judge id and
    sampling params."""
    hashes = list(image_hashes) if image_hashes is not None else [image_hash(i) for i in req.images[: req.turn + 1]]
    s = req.session
    text = {
        "turns": [t.model_dump(mode="json") for t in s.turns[: req.turn]],
        "constraint": s.global_constraint.model_dump(mode="json") if s.global_constraint else None,
        "source_scene": s.source_scene,
    }
    payload = {"images": hashes, "text": text, "turn": req.turn, "explicit": req.explicit,
               "judge": judge.judge_id, "prompt_version": judge.prompt_version, "params": judge.params()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
