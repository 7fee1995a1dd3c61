"""Judge prompts and their strict parsers.

A prompt is built per judged turn: it shows the session's source image, the image before the
turn (omitted at turn 1, where it is the source) and the output of the turn; the earlier
instructions in order; the current instruction; its bracketed explicit form when that adds
information (always on pronoun turns, so the judge knows the referent); and the global rule
when one is in force. It then asks only the checks that apply:

- IF: was the instruction carried out (always);
- CC: did everything the instruction does not mention stay the same (only when the caller
  cannot measure it from the images, i.e. outside ShapesWorld);
- GA: does the output respect the global rule (only while a rule is in force);
- CU: was the edit applied to the object the pronoun refers to (only on pronoun turns).

Answers are tagged. `binary`: `<IF>yes</IF><IF_reason>...</IF_reason>`; `graded`:
`<IF_score>4</IF_score><IF_reason>...</IF_reason>` with integer scores 1..5. With `think` the
model first reasons inside `<think>...</think>`; everything inside that block is ignored by
the parser. Parsing is strict and tri-state: exactly one well-formed value per asked tag gives
a vote, anything else (missing or unclosed tag, two tags, a value other than yes/no or a digit
1..5, an empty reply, a refusal) gives `judge_error` with the reason. Nothing is ever guessed.

Every template carries a version (`PROMPT_VERSIONS`); a verdict's cache key includes it, so
changing a template's words means bumping its version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from ..session import Session

PROMPT_VERSIONS = {"binary": "v1", "graded": "v1"}
SCORE_MIN, SCORE_MAX = 1, 5
ORDER = ("IF", "CC", "GA", "CU")   # the order checks are asked and answered in

QUESTIONS = {
    "IF": "Was the instruction for this turn carried out in the edited image?",
    "CC": ("Apart from what the instruction asks for, did everything else (other objects, background, "
           "layout, style) stay the same as in the image before the turn?"),
    "GA": "Does the edited image respect the rule that is in force?",
    "CU": ("The instruction uses a pronoun. Was the edit applied to the object the pronoun refers to "
           "(see the spelled-out form), and to no other object?"),
}
SYSTEM = ("You are a meticulous judge of image edits. You compare images closely and answer exactly "
          "in the tag format you are asked for.")

_REFUSAL = re.compile(r"\b(i\s*(?:can(?:no|')t|cannot|am unable|'m unable|won't)|i'm sorry|i am sorry|"
                      r"as an ai|unable to (?:help|assist|evaluate|view)|not able to (?:help|assist|view))",
                      re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)

Part = str | np.ndarray     # a text block or an image (uint8 [H, W, 3])


@dataclass
class Prompt:
    """One judge call's content: a system text, then text blocks and images in order.
    `prefill` is text the reply is forced to begin with (used by local models for the
    digit-distribution protocol); `checks` are the tags the reply must contain."""
    system: str
    parts: list[Part]
    checks: list[str]
    graded: bool
    prefill: str = ""

    @property
    def images(self) -> list[np.ndarray]:
        return [p for p in self.parts if not isinstance(p, str)]

    @property
    def text(self) -> str:
        return "\n".join(p for p in self.parts if isinstance(p, str))


@dataclass
class Vote:
    """One sample's answer to one check: `pass`, `fail` or `judge_error`, with the score
    on [0, 1] ((s - 1) / 4 for graded answers, 1 / 0 for yes / no) and the reason."""
    status: Literal["pass", "fail", "judge_error"]
    score: float | None = None
    reason: str = ""
    raw_score: float | None = None   # the 1..5 score as answered (graded)


# ------------------------------------------------------------------------------ building

def shows_explicit(session: Session, k: int) -> bool:
    """Whether turn k's bracketed explicit form is shown: on pronoun turns, and whenever it
    differs from the instruction and names objects in brackets."""
    t = session.turns[k - 1]
    if not t.explicit:
        return False
    return t.pronoun or (t.explicit.strip() != t.instruction.strip() and "[" in t.explicit)


def applicable_checks(session: Session, k: int, ask_cc: bool) -> list[str]:
    """The checks a model is asked at 1-based turn k, in answer order."""
    checks = ["IF"]
    if ask_cc:
        checks.append("CC")
    if session.constraint_active(k):
        checks.append("GA")
    if session.turns[k - 1].pronoun:
        checks.append("CU")
    return checks


def _answer_format(checks: Sequence[str], graded: bool) -> str:
    if graded:
        lines = [f"<{c}_score>a whole number from {SCORE_MIN} to {SCORE_MAX}</{c}_score><{c}_reason>one short "
                 f"sentence</{c}_reason>" for c in checks]
        scale = (f"Score each question from {SCORE_MIN} (not at all) to {SCORE_MAX} (completely and cleanly): "
                 f"{SCORE_MAX} = fully right, 4 = right with a small flaw, 3 = partly right, 2 = mostly wrong, "
                 f"{SCORE_MIN} = not done or wrong.\n")
        return scale + "Answer in exactly this format, one line per question:\n" + "\n".join(lines)
    lines = [f"<{c}>yes or no</{c}><{c}_reason>one short sentence</{c}_reason>" for c in checks]
    return ("Answer each question with yes or no, then a one-sentence reason, in exactly this format, one line "
            "per question:\n" + "\n".join(lines))


def build_prompt(session: Session, k: int, images: Sequence[np.ndarray], checks: Sequence[str],
                 graded: bool = False, think: bool = False, prefill: str = "") -> Prompt:
    """The prompt judging 1-based turn k of `session`; `images` = [source, out_1, ..., out_k]."""
    if not 1 <= k <= session.n_turns or len(images) < k + 1:
        raise ValueError(f"turn {k} needs {k + 1} images, got {len(images)}")
    turn = session.turns[k - 1]
    parts: list[Part] = []
    if k == 1:
        parts += ["Image A is the original image of this editing session; it is also the image before this turn.",
                  images[0], "Image B is the image after this turn: the edit to judge.", images[k]]
        before = "image A"
    else:
        parts += ["Image A is the original image of this editing session.", images[0],
                  f"Image B is the image before this turn (the result of turn {k - 1}).", images[k - 1],
                  "Image C is the image after this turn: the edit to judge.", images[k]]
        before = "image B"
    lines = []
    if k > 1:
        lines.append("Earlier instructions in this session, in order:")
        lines += [f"{i}. {t.instruction}" for i, t in enumerate(session.turns[: k - 1], start=1)]
    lines.append(f"Instruction for this turn (turn {k}): {turn.instruction}")
    if shows_explicit(session, k):
        lines.append(f"Spelled out unambiguously, it means: {turn.explicit}")
    if "GA" in checks and session.global_constraint is not None:
        lines.append(f"A rule set earlier in the session is in force for this turn: {session.global_constraint.text}")
    lines.append(f"Judge the image after this turn against {before}. Questions:")
    lines += [f"- {c}: {QUESTIONS[c]}" for c in checks]
    lines.append(_answer_format(checks, graded))
    if think:
        lines.append("First think step by step inside <think>...</think>, then give the tagged answers.")
    else:
        lines.append("Give only the tagged answers, nothing else.")
    parts.append("\n".join(lines))
    return Prompt(system=SYSTEM, parts=parts, checks=list(checks), graded=graded, prefill=prefill)


# ------------------------------------------------------------------------------- parsing

def strip_think(text: str) -> tuple[str, str | None]:
    """(the reply without its <think> blocks, error) — error when a <think> is never closed."""
    body = _THINK.sub(" ", text)
    close = body.lower().rfind("</think>")
    if close >= 0:   # some chat templates open the <think> block in the prompt: only its end is in the reply
        body = body[close + len("</think>"):]
    m = re.search(r"<think>", body, re.IGNORECASE)
    if m:   # everything after an unclosed <think> is still thinking
        return body[: m.start()], "the reply ends inside <think> (too few max_tokens?)"
    return body, None


def _tag_values(body: str, tag: str) -> tuple[list[str], int]:
    """(values of well-formed <tag>value</tag> pairs, number of opening tags)."""
    values = re.findall(rf"<{tag}>(.*?)</{tag}>", body, re.IGNORECASE | re.DOTALL)
    opens = len(re.findall(rf"<{tag}>", body, re.IGNORECASE))
    return values, opens


def reason_text(body: str, check: str) -> str:
    """The check's `<C_reason>` text (one well-formed tag), whitespace-collapsed, or ''."""
    vals, _ = _tag_values(body, f"{check}_reason")
    return " ".join(vals[0].split())[:300] if len(vals) == 1 else ""


def _missing_reason(text: str, body: str, tag: str, finish_reason: str | None) -> str:
    if not text.strip():
        return "empty reply"
    m = _REFUSAL.search(body)
    if m:
        return f"refusal: '{' '.join(body.split())[:80]}'"
    why = f"no <{tag}> tag in the reply"
    if finish_reason == "length":
        why += " (cut off at max_tokens)"
    return why


def parse_value(text: str, check: str, graded: bool, finish_reason: str | None = None,
                threshold: int = 4) -> Vote:
    """Strictly parse one check's answer from a reply (see the module docstring)."""
    body, think_err = strip_think(text)
    tag = f"{check}_score" if graded else check
    values, opens = _tag_values(body, tag)
    if not values:
        return Vote("judge_error", reason=think_err or _missing_reason(text, body, tag, finish_reason))
    if len(values) > 1 or opens > len(values):
        seen = sorted({" ".join(v.split()).lower() for v in values})
        kind = "conflicting" if len(seen) > 1 else "repeated"
        return Vote("judge_error", reason=f"{kind} <{tag}> tags ({opens} found: {', '.join(seen)[:60]})")
    value = values[0].strip()
    reason = reason_text(body, check)
    if graded:
        if not re.fullmatch(r"\d+", value):
            return Vote("judge_error", reason=f"<{tag}> is not a whole number: {value[:30]!r}")
        s = int(value)
        if not SCORE_MIN <= s <= SCORE_MAX:
            return Vote("judge_error", reason=f"<{tag}> {s} is out of range {SCORE_MIN}-{SCORE_MAX}")
        return Vote("pass" if s >= threshold else "fail", score=score_to_unit(s), reason=reason, raw_score=float(s))
    v = value.lower()
    if v not in ("yes", "no"):
        return Vote("judge_error", reason=f"<{tag}> is neither yes nor no: {value[:30]!r}")
    return Vote("pass" if v == "yes" else "fail", score=1.0 if v == "yes" else 0.0, reason=reason)


def parse_reply(text: str, checks: Sequence[str], graded: bool, finish_reason: str | None = None,
                threshold: int = 4) -> dict[str, Vote]:
    return {c: parse_value(text, c, graded, finish_reason, threshold) for c in checks}


def score_to_unit(s: float) -> float:
    """A 1..5 score on [0, 1]: (s - 1) / 4."""
    return (s - SCORE_MIN) / (SCORE_MAX - SCORE_MIN)
