"""Rewards for RL through the benchmark's judges, and where training sessions come from.

* `RewardConfig` (the `reward` block of a training config) names the judge — `program`
  (exact, ShapesWorld), `vlm:URL` (an OpenAI-compatible server such as vLLM) or
  `vlm-local:PATH` (a transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder) — and its
  options, exactly as `editrl bench --judge` takes them (`judges.load_judge`).
* `RewardPipeline` judges a grouped rollout *while it runs*: as soon as turn k of every
  trajectory exists, its requests go to the judge on a background thread, and the policy
  goes on to turn k+1 (the next turn's input is the output, not the verdict). An HTTP judge
  then waits on the server while the policy samples; `time/reward_wait_s` is what is left
  to wait after the rollout. Each turn is one batched `judge.judge` call (HTTP judges spread
  it over their bounded concurrency, local ones over `batch_size`). A failed check stays
  `judge_error`: the advantage code masks it, no reward is ever made up.
* `TrainingSessions` draws each step's B sessions: from the ShapesWorld grammar (fresh
  sessions every step), or from a sessions file (editrl schema, MICE-Bench or EdiVal
  records; source images read from disk, brought to one size), one shuffled pass after
  another. Both are pure functions of (seed, step), so a resumed run sees the same sessions.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..judges.base import JudgeRequest
from ..session import EditrlInputError, Session


@dataclass
class RewardConfig:
    """The judge that scores every turn of every trajectory. Options left unset (None) take
    the judge's own defaults (see `editrl bench --help`)."""
    judge: str = "program"                 # program | vlm:URL | vlm-local:PATH
    protocol: str | None = None            # vlm: binary | graded | graded-expect (graded scores feed adv.scoring=graded)
    votes: int | None = None               # vlm: samples per question (needs temperature > 0)
    temperature: float | None = None       # vlm: sampling temperature
    think: bool | None = None              # vlm: reason before answering
    threshold: int | None = None           # vlm graded: pass iff score >= threshold
    max_tokens: int | None = None          # vlm: reply length cap
    model: str | None = None               # vlm:URL: served model name (default: the server's first)
    concurrency: int | None = None         # vlm:URL: requests in flight
    timeout: float | None = None           # vlm:URL: seconds per request
    retries: int | None = None             # vlm:URL: retries after a transport error / 5xx
    device: str | None = None              # vlm-local: cpu | cuda
    dtype: str | None = None               # vlm-local: float32 | bfloat16
    batch_size: int | None = None          # vlm-local: prompts per generate call
    overlap: bool = True                   # judge turn k on a background thread while turn k+1 rolls out
    # (an API key is read from OPENAI_API_KEY, as by `editrl bench`: a key in the config would be written to config.json)

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("judge", "overlap") and v is not None}


def load_reward_judge(cfg: RewardConfig):
    from ..judges import load_judge

    if cfg.judge == "program" and cfg.options():
        raise EditrlInputError(f"reward options ({', '.join(sorted(cfg.options()))}) apply to vlm judges, not to "
                               f"reward.judge=program")
    return load_judge(cfg.judge, **cfg.options())


class RewardPipeline:
    """Judge the turns of one rollout as they are produced (see the module docstring).

    Usage per step: `begin(sessions, G, explicit)`, then `turn_done(k, rows)` from the
    rollout after each turn (rows = [(b, g, images so far)] of the trajectories that have
    turn k), then `verdicts()` -> verdicts[b][g][k-1] (None where a session has no turn k)."""

    def __init__(self, judge: Any, overlap: bool = True) -> None:
        self.judge, self.overlap = judge, overlap
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="editrl-reward") if overlap else None
        self.calls = 0

    def begin(self, sessions: Sequence[Session], G: int, explicit: bool) -> None:
        self.sessions, self.G, self.explicit = list(sessions), G, explicit
        self.calls = 0                                  # judge requests of this step
        self.pending: list[tuple[list[tuple[int, int, int]], Future | list]] = []

    def turn_done(self, k: int, rows: Sequence[tuple[int, int, Sequence[np.ndarray]]]) -> None:
        reqs, where = [], []
        for b, g, imgs in rows:
            s = self.sessions[b]
            if s.n_turns < k:
                continue
            reqs.append(JudgeRequest(s, k, list(imgs[: k + 1]),
                                     explicit=s.turns[k - 1].explicit if self.explicit else None))
            where.append((b, g, k))
        if not reqs:
            return
        self.calls += len(reqs)
        self.pending.append((where, self.pool.submit(self.judge.judge, reqs) if self.pool else reqs))

    def _checked(self, where: list, got: list) -> list:
        if len(got) != len(where):
            raise RuntimeError(f"judge {getattr(self.judge, 'judge_id', '?')} returned {len(got)} verdicts "
                               f"for {len(where)} requests")
        return got

    def turn_success(self, k: int) -> list[list[bool]]:
        """[B][G]: whether trajectory g of session b passed every check of turn k, waiting for
        turn k's verdicts if they are still being judged (what rollout branching picks parents
        by). A missing verdict or a judge error is not a success."""
        from .advantages import verdict_success

        out = [[False] * self.G for _ in self.sessions]
        for i, (where, res) in enumerate(self.pending):
            if not where or where[0][2] != k:
                continue
            if not isinstance(res, Future):               # no overlap: judged now, kept (done) for verdicts()
                done: Future = Future()
                done.set_result(self.judge.judge(res))
                self.pending[i] = (where, done)
                res = done
            got = self._checked(where, res.result())
            for (b, g, _), v in zip(where, got):
                out[b][g] = verdict_success(v)
        return out

    def verdicts(self) -> tuple[list[list[list]], float]:
        """All verdicts of the step, and the seconds spent waiting for them here (without
        overlap: every turn's requests judged now, in one batch)."""
        t0 = time.perf_counter()
        out: list[list[list]] = [[[None] * s.n_turns for _ in range(self.G)] for s in self.sessions]
        todo = [(ws, reqs) for ws, reqs in self.pending if not isinstance(reqs, Future)]
        if todo:                                          # no overlap: the turns not judged yet, in one batch
            where = [w for ws, _ in todo for w in ws]
            self.pending = [(ws, r) for ws, r in self.pending if isinstance(r, Future)] + \
                [(where, self.judge.judge([r for _, reqs in todo for r in reqs]))]
        for where, res in self.pending:
            got = self._checked(where, res.result() if isinstance(res, Future) else res)
            for (b, g, k), v in zip(where, got):
                out[b][g][k - 1] = v
        self.pending = []
        return out, time.perf_counter() - t0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        close = getattr(self.judge, "close", None)
        if close is not None:
            close()


# ------------------------------------------------------------------------ sessions

def _square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` and centre-crop to size x size (PIL, Lanczos)."""
    from PIL import Image

    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    im = Image.fromarray(img).resize((nw, nh), Image.LANCZOS)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8).copy()


class TrainingSessions:
    """Each step's sessions and source images (see the module docstring)."""

    def __init__(self, suite: str, seed: int, turns: int, constraint_share: float, pronoun_prob: float,
                 image_size: int = 0) -> None:
        from ..bench.suites import SHAPES_SUITES, load_suite

        self.seed, self.turns, self.image_size = seed, turns, image_size
        self.shapes = suite == "shapes"
        self.grammar = None
        if self.shapes:
            from ..world.grammar import GrammarConfig

            self.grammar = GrammarConfig(turns=turns, constraint_share=constraint_share, pronoun_prob=pronoun_prob)
            self.suite = None
            return
        if suite in SHAPES_SUITES:
            raise EditrlInputError(f"suite={suite}: training samples fresh ShapesWorld sessions with suite=shapes "
                                   f"(set turns, constraint_share, pronoun_prob); other names are files")
        self.suite = load_suite(suite, None, turns)
        if not self.suite.sessions:
            raise EditrlInputError(f"suite={suite}: no sessions")
        self._size: tuple[int, int] | None = None

    def sessions(self, step: int, B: int, offset: int) -> list[Session]:
        if self.shapes:
            from ..world.grammar import sample_session

            return [sample_session(self.seed + offset, step * B + i, self.grammar) for i in range(B)]
        n = len(self.suite.sessions)
        out = []
        for j in range(step * B, (step + 1) * B):        # pass j // n, shuffled by (seed, pass)
            order = np.random.default_rng([self.seed, j // n]).permutation(n)
            out.append(self.suite.sessions[int(order[j % n])])
        return out

    def source(self, s: Session) -> np.ndarray:
        img = self.suite.source(s) if self.suite is not None else None
        if img is None:
            from ..world.render import render
            from ..world.scene import Scene

            return render(Scene.from_dict(s.source_scene))
        if self.image_size:
            return _square(img, self.image_size)
        if self._size is None:
            self._size = img.shape[:2]
        elif img.shape[:2] != self._size:
            raise EditrlInputError(f"session {s.id}: source is {img.shape[1]}x{img.shape[0]}, others "
                                   f"{self._size[1]}x{self._size[0]}; set image_size=N to bring every source to N x N")
        return img
