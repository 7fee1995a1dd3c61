"""Grouped multi-turn rollouts: B sessions x G trajectories x K turns (ALGORITHMS §5).

Every trajectory of a group starts from its session's source image and follows the same
instructions; turn k's input is the trajectory's *own* output of turn k−1 (after the round
trip through uint8 that a user and the judge see), so the policy is trained on exactly the
inputs it creates. Groups are keyed by session id.

Two kinds of rollout share this loop:
* `solver="sde"` with `store=True` (Flow-GRPO): every SDE step inside the window is stored
  with its log-probability under the rollout policy;
* any solver without storage (DiffusionNFT): only each turn's input and clean output are
  kept, and the loss re-noises the output along the forward process.

Branching (`branch=`, optional): after turn k every trajectory of a session continues from
*one* of the group's turn-k outputs, its parent (`choose_parents`: a random successful one,
or a random one). Each later turn's group then holds G edits of the same input, so a
per-turn advantage compares edits rather than the inputs earlier turns left behind, and
the later turns are trained on the states a successful session passes through. The
parents are kept in `Rollout.parents`; a trajectory's images are its parents' lineage
followed by its own output.

Nothing here knows a judge or a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..editors.base import FlowEditor, Transitions, images_to_tensor
from ..rollout import turn_texts
from ..session import Session


@dataclass
class TurnBatch:
    """One turn of every trajectory, flattened over (b, g) in row-major order: row b*G + g."""
    turn: int                               # 1-based
    inputs: Tensor                          # [B*G, C, H, W] the turn's input image in [-1, 1]
    outputs: Tensor                         # [B*G, C, H, W] the turn's output (uint8 round trip) in [-1, 1]
    texts: list[str]                        # [B*G] instruction shown to the editor
    contexts: list[list[str]]               # [B*G] previous instructions (in-context form; else empty)
    live: Tensor                            # [B*G] bool: the session has this turn
    transitions: Transitions | None = None  # stored SDE steps (GRPO), [B*G, S, ...]


@dataclass
class Rollout:
    session_ids: list[str]                  # [B]
    G: int
    K: int
    turns: list[TurnBatch]                  # [K]
    images: list[list[list[np.ndarray]]]    # [B][G][K+1] uint8, index 0 = source (turns a session lacks: absent)
    parents: Tensor | None = None           # [B, K] int64: branching only, the trajectory of turn k (0-based
                                            # column k-1) whose output every trajectory took as turn k+1's input;
                                            # -1 where no turn followed (the last turn, a session that ended)

    def trajectory_images(self, b: int, g: int) -> list[np.ndarray]:
        return self.images[b][g]


@torch.no_grad()
def grouped_rollout(editor: FlowEditor, sessions: Sequence[Session], sources: Sequence[np.ndarray], G: int,
                    K: int | None = None, form: str = "explicit", steps: int = 10, solver: str = "ode",
                    noise_level: float = 0.7, window: int | None = None, store: bool = False,
                    generator: torch.Generator | None = None, text_fn=None, batch_text_fn=None,
                    on_turn=None, branch=None) -> Rollout:
    """Roll out G trajectories of every session for K turns on the editor's own outputs.

    `text_fn(session, k, images_so_far) -> (instruction, context)` overrides the text form
    (used by intent reconstruction); by default `editrl.rollout.turn_texts(session, k, form)`.
    `batch_text_fn(k) -> [(instruction, context)] * (B*G)` writes a whole turn's texts at once
    (row b*G + g; rows of ended sessions are ignored), e.g. a sampling text policy.
    `on_turn(k, rows)` is called as soon as turn k is done, rows = [(b, g, images so far)] of
    the trajectories that have turn k (how rewards are judged while the rollout goes on).
    `branch(k) -> [B] int` (called after `on_turn(k)`, before every turn but the first) names
    each session's parent trajectory at turn k: all G trajectories continue from its output.
    """
    if G < 1:
        raise ValueError("G must be at least 1")
    B = len(sessions)
    K = K or max(s.n_turns for s in sessions)
    images: list[list[list[np.ndarray]]] = [[[sources[b]] for _ in range(G)] for b in range(B)]
    current = [sources[b] for b in range(B) for _ in range(G)]                       # [B*G] uint8
    turns: list[TurnBatch] = []
    parents = torch.full((B, K), -1, dtype=torch.long) if branch is not None else None   # [B, K]
    for k in range(1, K + 1):
        if branch is not None and k > 1:
            chosen = [int(p) for p in branch(k - 1)]                                     # [B]
            if len(chosen) != B:
                raise ValueError(f"branch({k - 1}) returned {len(chosen)} parents for {B} sessions")
            for b in range(B):
                p = chosen[b]
                if sessions[b].n_turns < k:                                              # ended: nothing follows
                    continue
                if not 0 <= p < G:
                    raise ValueError(f"branch({k - 1}) named trajectory {p} of session {b}; G = {G}")
                parents[b, k - 2] = p
                lineage = images[b][p]
                for g in range(G):
                    images[b][g] = list(lineage)
                    current[b * G + g] = lineage[-1]
        live = torch.tensor([sessions[b].n_turns >= k for b in range(B) for _ in range(G)])   # [B*G]
        texts, contexts = [], []
        batch_texts = batch_text_fn(k) if batch_text_fn is not None else None
        for b in range(B):
            for g in range(G):
                if batch_texts is not None:
                    t, c = batch_texts[b * G + g]
                elif sessions[b].n_turns >= k:
                    t, c = (text_fn(sessions[b], k, images[b][g]) if text_fn else turn_texts(sessions[b], k, form))
                else:  # padding row: the session ended; its result is never used
                    t, c = turn_texts(sessions[b], sessions[b].n_turns, form)
                texts.append(t)
                contexts.append(list(c))
        x_in = images_to_tensor(current).to(editor.device)                             # [B*G, C, H, W]
        cond = editor.encode(x_in, texts, contexts)
        res = editor.sample(cond, steps=steps, solver=solver, noise_level=noise_level, window=window,
                            generator=generator, return_transitions=store)
        out_imgs = editor.decode(res.x0)                                               # [B*G] uint8
        x_out = images_to_tensor(out_imgs).to(editor.device)                           # [B*G, C, H, W]
        for i, img in enumerate(out_imgs):
            b, g = divmod(i, G)
            if bool(live[i]):
                images[b][g].append(img)
                current[i] = img
        turns.append(TurnBatch(k, x_in, x_out, texts, contexts, live, res.transitions if store else None))
        if on_turn is not None:
            on_turn(k, [(b, g, images[b][g]) for b in range(B) for g in range(G) if sessions[b].n_turns >= k])
    return Rollout([s.id for s in sessions], G, K, turns, images, parents)


def choose_parents(success: Tensor, live: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each session's parent for the next turn: uniformly one of its live successful trajectories,
    or uniformly one of its live ones when none succeeded (0 when none is live).

    success, live: [B, G] bool -> [B] int64. A trajectory whose verdict is missing or has a
    judge error counts as not successful (its output cannot be vouched for)."""
    if success.shape != live.shape or success.ndim != 2:
        raise ValueError(f"success and live must both be [B, G]; got {tuple(success.shape)} and {tuple(live.shape)}")
    good = success.bool() & live.bool()                                                  # [B, G]
    pool = torch.where(good.any(dim=1, keepdim=True), good, live.bool())                 # [B, G]
    u = torch.rand(success.shape, generator=generator)                                   # [B, G]
    # the argmax of uniform draws over the pool is a uniform pick from the pool
    return torch.where(pool, u, torch.full_like(u, -1.0)).argmax(dim=1)                  # [B]
