"""The VLM judge: a vision-language model answers IF / GA / CU (and CC where pixels cannot
tell) for each turn, behind the `Judge` protocol.

Protocols (`protocol`):

- `binary` (default): tagged yes/no per asked check, with a reason; score 1 or 0.
- `graded`: a 1..5 score per check; score (s - 1) / 4, pass iff s >= `threshold` (4).
- `graded-expect`: the score is the expectation of the model's distribution over the digit
  tokens "1".."5" at the position where the digit is generated (right after
  `<IF_score>`), renormalised over the digits: E[s] = sum_d d * p(d) / sum_d p(d). Local
  models force the reply to start with the first check's tag (prefill) so that position
  always exists; an HTTP server must return `top_logprobs`. The expectation counts only when
  the digits together hold at least `min_digit_mass` of the probability there (0.5 by
  default); otherwise the model was not answering with a score and the check is
  `judge_error`. Later checks are read where the model itself writes their tags.

`votes` > 1 (with `temperature` > 0) samples several replies per turn. A check's verdict is
the majority of its *valid* votes (a tie is `judge_error`, reason "tie"); its score is the
mean score of the valid votes; `CheckResult.votes` lists every vote's status and
`agreement` the share of valid votes that agree with the majority. Invalid votes (an
unparseable reply, a transport error) count as `judge_error` votes; with no valid vote the
check is `judge_error`.

CC: for ShapesWorld sessions (source scene and expected scenes known) CC is measured from
pixels outside the edited region (`similarity.py`), independent of the model, and the
model is not asked; otherwise the model is asked `<CC>` in the same call. The reason says
which way it was decided.

Nothing is ever guessed: every check the model should have decided but did not comes back
as `judge_error` with the reason and the raw reply.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..session import CHECKS, CheckResult, EditrlInputError, Session, TurnVerdict
from ..world.grammar import session_scenes
from ..world.scene import Scene
from .base import JudgeRequest
from .clients import Client, Sample
from .prompts import (PROMPT_VERSIONS, SCORE_MAX, SCORE_MIN, Prompt, Vote, applicable_checks, build_prompt,
                      parse_value, reason_text, score_to_unit, strip_think)
from .similarity import SIMILARITY_VERSION, content_consistency

PROTOCOLS = ("binary", "graded", "graded-expect")
DIGITS = tuple(str(d) for d in range(SCORE_MIN, SCORE_MAX + 1))


@dataclass
class VLMOptions:
    """Every setting that changes a verdict. Validated on construction, before any model loads."""
    protocol: str = "binary"
    votes: int = 1
    temperature: float = 0.0
    think: bool = False
    threshold: int = 4            # graded: pass iff score >= threshold
    max_tokens: int | None = None  # default 256, or 1024 with think
    min_digit_mass: float = 0.5   # graded-expect: least digit probability for a valid expectation
    top_logprobs: int = 20        # graded-expect: alternatives read per position

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise EditrlInputError(f"unknown judge protocol {self.protocol!r} (expected one of {', '.join(PROTOCOLS)})")
        if self.votes < 1:
            raise EditrlInputError(f"--votes must be at least 1, got {self.votes}")
        if self.temperature < 0:
            raise EditrlInputError(f"--temperature must be >= 0, got {self.temperature}")
        if self.votes > 1 and self.temperature == 0:
            raise EditrlInputError("--votes > 1 needs --temperature > 0 (greedy votes would all be the same)")
        if self.protocol == "graded-expect" and self.votes > 1:
            raise EditrlInputError("protocol graded-expect reads the score distribution itself; use --votes 1")
        if not SCORE_MIN <= self.threshold <= SCORE_MAX:
            raise EditrlInputError(f"graded threshold must be in {SCORE_MIN}..{SCORE_MAX}, got {self.threshold}")
        if self.max_tokens is None:
            self.max_tokens = 1024 if self.think else 256
        if self.max_tokens < 1:
            raise EditrlInputError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.min_digit_mass <= 1.0:
            raise EditrlInputError(f"min_digit_mass must be in [0, 1], got {self.min_digit_mass}")

    @property
    def graded(self) -> bool:
        return self.protocol != "binary"


# ------------------------------------------------------------------- votes -> verdict

def expected_digit_vote(sample: Sample, check: str, threshold: int, min_mass: float) -> Vote:
    """graded-expect: the score from the digit distribution right after `<check_score>`."""
    if sample.tokens is None:
        return Vote("judge_error", reason="the reply carries no token log-probabilities")
    head = sample.text[: sample.tokens_start]
    text = head + "".join(t.text for t in sample.tokens)
    lower = text.lower()   # the answer lies after the last </think> and before any unclosed <think>
    start = lower.rfind("</think>") + len("</think>") if "</think>" in lower else 0
    end = lower.find("<think>", start) if "<think>" in lower[start:] else len(text)
    tag = f"<{check}_score>"
    hits = [m.end() for m in re.finditer(re.escape(tag), text, re.IGNORECASE) if start <= m.start() < end]
    if len(hits) != 1:
        return Vote("judge_error", reason=f"{len(hits)} {tag} tags in the reply (need exactly one)")
    pos, off, where = hits[0], sample.tokens_start, None
    for t in sample.tokens:
        if off >= pos and t.text.strip():
            where = t
            break
        if off < pos < off + len(t.text):
            return Vote("judge_error", reason=f"the token after {tag} also holds part of the tag ({t.text!r})")
        off += len(t.text)
    if where is None:
        return Vote("judge_error", reason=f"the reply ends right after {tag}")
    probs = {d: sum(math.exp(lp) for alt, lp in where.top.items() if alt.strip() == d) for d in DIGITS}
    mass = sum(probs.values())
    if mass <= 0 or mass < min_mass:
        return Vote("judge_error", reason=f"the score digits hold only {100 * mass:.1f}% of the probability after "
                                          f"{tag} (need {100 * min_mass:.0f}%)")
    e = sum(int(d) * p for d, p in probs.items()) / mass
    return Vote("pass" if e >= threshold else "fail", score=score_to_unit(e), raw_score=e,
                reason=f"E[score] = {e:.2f} from the digit distribution (digits hold {100 * mass:.0f}%)")


def sample_vote(sample: Sample, check: str, opts: VLMOptions) -> Vote:
    if sample.error is not None:
        return Vote("judge_error", reason=sample.error)
    if opts.protocol == "graded-expect":
        v = expected_digit_vote(sample, check, opts.threshold, opts.min_digit_mass)
        if v.status != "judge_error":
            said = reason_text(strip_think(sample.text)[0], check)
            v.reason += f"; {said}" if said else ""
        return v
    return parse_value(sample.text, check, opts.graded, sample.finish_reason, opts.threshold)


def combine_votes(votes: Sequence[Vote]) -> tuple[str, float | None, str, float | None]:
    """(status, score, reason, agreement) from the votes of one check (see the module docstring)."""
    valid = [v for v in votes if v.status != "judge_error"]
    if not valid:
        reasons = sorted({v.reason for v in votes})
        lead = "no valid vote: " if len(votes) > 1 else ""
        return "judge_error", None, lead + "; ".join(reasons)[:400], None
    n_pass = sum(v.status == "pass" for v in valid)
    n_fail = len(valid) - n_pass
    invalid = len(votes) - len(valid)
    if n_pass == n_fail:
        return "judge_error", None, f"tie: {n_pass} pass vs {n_fail} fail" + (f", {invalid} invalid" if invalid else ""), 0.5
    status = "pass" if n_pass > n_fail else "fail"
    agree = max(n_pass, n_fail) / len(valid)
    score = float(np.mean([v.score for v in valid]))
    reason = next(v.reason for v in valid if v.status == status)
    if len(votes) > 1:
        reason = (f"{max(n_pass, n_fail)} of {len(valid)} valid votes say {status}"
                  + (f" ({invalid} invalid)" if invalid else "") + (f": {reason}" if reason else ""))
    return status, score, reason, agree


def raw_text(samples: Sequence[Sample]) -> str | None:
    texts = [s.text if s.error is None else None for s in samples]
    if len(texts) == 1:
        return texts[0]
    if all(t is None for t in texts):
        return None
    return "\n".join(f"----- vote {i} -----\n{t if t is not None else '(no reply)'}" for i, t in enumerate(texts, 1))


def check_result(check: str, samples: Sequence[Sample], opts: VLMOptions, prefix: str = "") -> CheckResult:
    votes = [sample_vote(s, check, opts) for s in samples]
    status, score, reason, agree = combine_votes(votes)
    multi = len(votes) > 1
    return CheckResult(status=status, score=score, reason=prefix + reason, raw=raw_text(samples),
                       votes=[v.status for v in votes] if multi else None, agreement=agree if multi else None)


# --------------------------------------------------------------------------- the judge

def known_scenes(session: Session) -> list[Scene] | None:
    """The session's expected scenes (source, after turn 1, ...) when it is a ShapesWorld one."""
    if session.source_scene is None or any(t.expected is None for t in session.turns):
        return None
    try:
        return session_scenes(session)
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class _Plan:
    prompt: Prompt
    cc: CheckResult | None        # decided from pixels, or None when asked of the model


class VLMJudge:
    """A VLM behind the Judge protocol; `client` is an `OpenAIClient` or `TransformersClient`."""

    def __init__(self, client: Client, options: VLMOptions | None = None) -> None:
        self.client = client
        self.options = options or VLMOptions()
        template = "graded" if self.options.graded else "binary"
        self.prompt_version = f"{template}-{PROMPT_VERSIONS[template]}+cc-{SIMILARITY_VERSION}"
        self._prefill = self.options.protocol == "graded-expect" and client.supports_prefill and not self.options.think

    @property
    def judge_id(self) -> str:
        return self.client.judge_id

    @property
    def calls(self) -> int:
        """Model calls actually made so far (see the client)."""
        return self.client.calls

    def params(self) -> dict[str, Any]:
        """The settings a verdict depends on (the cache keys on them): only those the protocol uses."""
        o = self.options
        out: dict[str, Any] = {"protocol": o.protocol, "votes": o.votes, "temperature": o.temperature,
                               "think": o.think, "max_tokens": o.max_tokens,
                               "min_side": getattr(self.client, "min_side", None)}
        if o.graded:
            out["threshold"] = o.threshold
        if o.protocol == "graded-expect":
            out.update(min_digit_mass=o.min_digit_mass, top_logprobs=o.top_logprobs)
        if o.temperature > 0 and getattr(self.client, "seed", None) is not None:
            out["seed"] = self.client.seed
        return out

    def close(self) -> None:
        """Release the client's connections (HTTP); a no-op for local models."""
        close = getattr(self.client, "close", None)
        if close is not None:
            close()

    def plan(self, req: JudgeRequest, scenes: list[Scene] | None) -> _Plan:
        s, k = req.session, req.turn
        if not 1 <= k <= s.n_turns:
            raise EditrlInputError(f"session {s.id}: turn {k} out of range 1..{s.n_turns}")
        if len(req.images) < k + 1:
            raise EditrlInputError(f"session {s.id} turn {k}: need {k + 1} images (source and every output), "
                                   f"got {len(req.images)}")
        cc = None
        if scenes is not None:
            cc = content_consistency(req.prev, req.image, scenes[k - 1], scenes[k])
        checks = applicable_checks(s, k, ask_cc=cc is None)
        prefill = f"<{checks[0]}_score>" if self._prefill else ""
        return _Plan(build_prompt(s, k, req.images, checks, graded=self.options.graded, think=self.options.think,
                                  prefill=prefill), cc)

    def judge(self, requests: Sequence[JudgeRequest]) -> list[TurnVerdict]:
        scenes: dict[str, list[Scene] | None] = {}
        for r in requests:
            if r.session.id not in scenes:
                scenes[r.session.id] = known_scenes(r.session)
        plans = [self.plan(r, scenes[r.session.id]) for r in requests]
        o = self.options
        replies = self.client.complete([p.prompt for p in plans], n=o.votes, temperature=o.temperature,
                                       max_tokens=o.max_tokens,
                                       top_logprobs=o.top_logprobs if o.protocol == "graded-expect" else 0)
        return [self.verdict(r, p, samples) for r, p, samples in zip(requests, plans, replies)]

    def verdict(self, req: JudgeRequest, plan: _Plan, samples: Sequence[Sample]) -> TurnVerdict:
        results: dict[str, CheckResult] = {}
        for c in plan.prompt.checks:
            results[c] = check_result(c, samples, self.options, prefix="asked of the VLM: " if c == "CC" else "")
        if plan.cc is not None:
            results["CC"] = plan.cc
        return TurnVerdict(session_id=req.session.id, turn=req.turn,
                           **{c: results.get(c, CheckResult()) for c in CHECKS})
