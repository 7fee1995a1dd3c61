"""Task curriculum: draw each step's training sessions toward the task types that still teach.

With binary rewards a (session, turn) group whose G trajectories all succeed (or all fail)
has zero advantage everywhere: its rollout costs as much as any other and trains nothing.
On a strong base most groups are such (session 16: 77-87% late in a run), and which ones is
largely a matter of the turn's task type: an editor that never misses a colour change keeps
rolling out colour changes for nothing.

`TaskCurriculum` keeps, per task type, an exponential moving average of its *informative
share*: the share of that type's (session, turn) groups in which at least one sample was
trained (the group was neither saturated nor masked). Each step it draws a pool of
`pool × B` candidate sessions from the usual stream and keeps B of them without
replacement, with probability proportional to the session's priority raised to `power`

    priority(s) = Σ_k max(floor, q[type_k])                       (k over the turns trained)

(Gumbel top-B, a pure function of (seed, step) and the state). A type not yet seen has
priority `prior`, so every type is tried before it is judged; `floor` keeps every type in
the mix, so one that regresses is noticed. The state (q per type) travels in the training
checkpoint, so a resumed run draws the same sessions as an uninterrupted one.

This changes the training distribution on purpose (evaluation sessions are untouched): the
gradient a saturated group would have contributed is zero anyway, so spending its rollout
on a type whose groups still disagree buys more signal for the same compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

MODES = ("none", "task")


@dataclass
class CurriculumConfig:
    mode: str = "none"      # none: every drawn session is trained | task: prioritise task types by informative share
    pool: int = 8           # candidate sessions drawn per session kept (task mode)
    power: float = 4.0      # keep sessions with probability ∝ priority ** power (1: proportional; larger: greedier)
    decay: float = 0.9      # per-step EMA of each task type's informative share
    floor: float = 0.05     # lowest priority of a turn, so every type keeps being sampled
    prior: float = 1.0      # priority of a task type not yet seen

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"curriculum.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.pool < 1:
            raise ValueError(f"curriculum.pool must be at least 1; got {self.pool}")
        if not self.power > 0:
            raise ValueError(f"curriculum.power must be positive; got {self.power}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"curriculum.decay must be in [0, 1); got {self.decay}")
        if not 0.0 < self.floor <= 1.0 or not 0.0 < self.prior <= 1.0:
            raise ValueError("curriculum.floor and curriculum.prior must be in (0, 1]")


def session_types(session, K: int) -> list[str]:
    """The task types of the session's first K turns."""
    return [t.task_type for t in session.turns[:K]]


def session_priority(types: Sequence[str], q: dict[str, float], floor: float, prior: float) -> float:
    """Σ_k max(floor, q[type_k]); unseen types count `prior`."""
    return float(sum(max(floor, q.get(t, prior)) for t in types))


def gumbel_top_k(weights: Sequence[float], k: int, rng: np.random.Generator) -> list[int]:
    """k distinct indices drawn without replacement with probability ∝ weights (Gumbel top-k),
    returned in increasing index order (the stream's order)."""
    w = np.asarray(weights, dtype=np.float64)  # [N]
    if k > len(w):
        raise ValueError(f"cannot keep {k} of {len(w)} candidates")
    if not (w > 0).all():
        raise ValueError("weights must be positive")
    keys = np.log(w) + rng.gumbel(size=len(w))  # [N]
    return sorted(int(i) for i in np.argsort(-keys, kind="stable")[:k])


def informative_cells(mask: torch.Tensor) -> torch.Tensor:
    """[B, G, K] trained-sample mask -> [B, K]: the (session, turn) groups that trained a sample."""
    return mask.any(dim=1)  # [B, K]


def ema_update(q: dict[str, float], shares: dict[str, float], decay: float, prior: float) -> dict[str, float]:
    """q[t] <- decay·q[t] + (1 − decay)·share[t] for every type observed this step (an unseen
    type starts from `prior`); unobserved types keep their value."""
    out = dict(q)
    for t, s in shares.items():
        out[t] = decay * out.get(t, prior) + (1.0 - decay) * s
    return out


class TaskCurriculum:
    """Per-task-type informative shares and the session selection they drive (see module doc)."""

    def __init__(self, cfg: CurriculumConfig, seed: int, turns: int) -> None:
        self.cfg, self.seed, self.turns = cfg, seed, turns
        self.q: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return self.cfg.mode == "task"

    def select(self, candidates: Sequence, B: int, step: int) -> list:
        """Keep B of the candidates (all of them when the curriculum is off)."""
        if not self.active:
            return list(candidates)[:B]
        pri = [session_priority(session_types(s, self.turns), self.q, self.cfg.floor, self.cfg.prior) ** self.cfg.power
               for s in candidates]
        rng = np.random.default_rng([self.seed, step, 0xC0])
        return [candidates[i] for i in gumbel_top_k(pri, B, rng)]

    def update(self, sessions: Sequence, mask: torch.Tensor) -> dict[str, float]:
        """Fold one step's trained-sample mask [B, G, K] into q; returns log stats."""
        if not self.active:
            return {}
        inf = informative_cells(mask)  # [B, K]
        seen: dict[str, list[int]] = {}
        for b, s in enumerate(sessions):
            for k, t in enumerate(session_types(s, min(self.turns, inf.shape[1]))):
                c = seen.setdefault(t, [0, 0])
                c[0] += int(inf[b, k])
                c[1] += 1
        self.q = ema_update(self.q, {t: n_inf / n for t, (n_inf, n) in seen.items()}, self.cfg.decay,
                            self.cfg.prior)
        stats = {f"curriculum/q_{t}": round(v, 4) for t, v in sorted(self.q.items())}
        n_cells = sum(n for _, n in seen.values())
        if n_cells:
            stats["curriculum/informative_share"] = sum(i for i, _ in seen.values()) / n_cells
        return stats

    def state(self) -> dict[str, Any]:
        return {"q": dict(self.q)}

    def load_state(self, state: dict[str, Any] | None) -> None:
        self.q = {str(k): float(v) for k, v in ((state or {}).get("q") or {}).items()}
