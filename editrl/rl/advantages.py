"""From per-turn judge verdicts to per-turn advantages (ALGORITHMS §6-§7). Pure tensor math.

Pipeline (what :func:`compute_advantages` runs, each step a function of its own):

    verdicts [B][G][K] ─► scores_from_verdicts ─► score [B,G,K,M], masks
        ─► aggregate_turns (per reward, over the turns where it applies) ─► R [B,G,M]
        ─► fuse (reward- or advantage-level, group-normalised)           ─► A [B,G]
        ─► broadcast to every turn                                        ─► A [B,G,K]
           (or per_turn_advantages from the turn-k scores directly)
        ─► group_filter, trajectory_filter, judge-error masks, clip        ─► A, mask

Axes: B sessions, G trajectories per session (the group), K turns, M rewards in the order
of :data:`REWARDS`. Everything is float32 / bool torch tensors; nothing needs a gradient.

Missing values are never replaced by numbers. A score that does not exist (check not
applicable, judge error, verdict missing, turn absent) is NaN in the score tensors and
False in the matching mask; every function selects with ``torch.where`` so NaN cannot
leak, and a masked sample gets advantage exactly 0 and is excluded from every group
statistic. The conventions chosen where the sources leave room are listed in
``docs/paper_index.md`` ("RL math") and in the docstrings below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..session import CHECKS, TurnVerdict

__all__ = [
    "REWARDS",
    "SCORINGS",
    "ADV_SCORINGS",
    "AGGREGATIONS",
    "FUSION_LEVELS",
    "ASSIGNMENTS",
    "PER_TURN_NORMS",
    "DEFAULT_WEIGHTS",
    "TurnScores",
    "scores_from_verdicts",
    "hybrid_scores",
    "aggregate_turns",
    "group_normalise",
    "fuse",
    "broadcast",
    "per_turn_advantages",
    "trajectory_filter",
    "group_filter",
    "AdvantageConfig",
    "AdvantageResult",
    "compute_advantages",
]

REWARDS: tuple[str, ...] = ("IF", "CC", "GA", "CU")
assert REWARDS == CHECKS  # the rewards are the judge's checks, in the same order
SCORINGS = ("binary", "graded")
ADV_SCORINGS = (*SCORINGS, "hybrid")   # hybrid: binary, graded where a group has no success (`hybrid_scores`)
AGGREGATIONS = ("mean", "min", "product", "last", "success_gated", "discounted")
FUSION_LEVELS = ("reward", "advantage")
ASSIGNMENTS = ("broadcast", "per_turn")
PER_TURN_NORMS = ("turn", "session")

# Edit-R2 weighs IF 0.3, CC 0.3 and CU (or GA) 0.4; editrl judges GA and CU separately and
# splits that 0.4 evenly between them. MT-EditFlow's best λ_CC is 0.3 as well.
DEFAULT_WEIGHTS: dict[str, float] = {"IF": 0.3, "CC": 0.3, "GA": 0.2, "CU": 0.2}


# --------------------------------------------------------------------------- helpers

def _check_choice(name: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}; got {value!r}")


def _weights_tensor(weights: Tensor | Sequence[float], device: torch.device | None = None) -> Tensor:
    w = torch.as_tensor(weights, dtype=torch.float32, device=device)  # [M]
    if w.shape != (len(REWARDS),):
        raise ValueError(f"weights must have shape [{len(REWARDS)}] (one per {', '.join(REWARDS)}); "
                         f"got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0; got {w.tolist()}")
    return w


def _normalise(x: Tensor, valid: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    """(x − mean)/(std + eps) over `dims`, using only `valid` entries; invalid -> 0.

    Population std (divide by n). Computed in float64 around a reference member (the
    largest valid value) so that all-equal members give exactly 0 rather than rounding
    noise divided by eps. Returns float32 of x's shape.
    """
    valid = valid.bool()
    if bool(torch.isnan(x[valid]).any()):
        raise ValueError("a valid entry is NaN: mask it as invalid instead")
    xd = x.to(torch.float64)  # [..]
    ref = torch.where(valid, xd, -math.inf).amax(dim=dims, keepdim=True)  # [.., 1, ..]
    ref = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))  # [.., 1, ..]
    d = torch.where(valid, xd - ref, torch.zeros_like(xd))  # [..]
    n = valid.sum(dim=dims, keepdim=True).clamp(min=1).to(torch.float64)  # [.., 1, ..]
    dev = torch.where(valid, d - d.sum(dim=dims, keepdim=True) / n, torch.zeros_like(xd))  # [..]
    std = torch.sqrt((dev**2).sum(dim=dims, keepdim=True) / n)  # [.., 1, ..]
    return torch.where(valid, dev / (std + eps), torch.zeros_like(xd)).to(torch.float32)  # [..]


def _group_mean_std(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, population std and count over G (axis 1) among valid members -> [B] each."""
    valid = valid.bool()
    xd = x.to(torch.float64)  # [B,G]
    ref = torch.where(valid, xd, -math.inf).amax(dim=1, keepdim=True)  # [B,1]
    ref = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))  # [B,1]
    d = torch.where(valid, xd - ref, torch.zeros_like(xd))  # [B,G]
    n = valid.sum(dim=1)  # [B]
    nd = n.clamp(min=1).to(torch.float64)  # [B]
    mean_d = d.sum(dim=1) / nd  # [B]
    dev = torch.where(valid, d - mean_d[:, None], torch.zeros_like(xd))  # [B,G]
    std = torch.sqrt((dev**2).sum(dim=1) / nd)  # [B]
    return ref[:, 0] + mean_d, std, n


def _last_index(valid: Tensor) -> Tensor:
    """Index of the last True along the last axis, −1 where none -> [...] long."""
    pos = torch.arange(valid.shape[-1], device=valid.device)  # [K]
    return torch.where(valid, pos, torch.full_like(pos, -1)).amax(dim=-1)  # [...]


# --------------------------------------------------------------------------- verdicts -> scores

@dataclass
class TurnScores:
    """Per-turn, per-reward scores of a batch of grouped trajectories.

    score:      [B,G,K,M] float32. binary: pass 1, fail 0; graded: the check's score in
                [0, 1]. NaN where there is no decided verdict (check not applicable,
                judge_error, verdict missing, turn absent). The decided checks of a turn
                that has a judge error elsewhere keep their value here, but the turn is
                flagged in ``error`` and no aggregate uses it.
    applicable: [B,G,K,M] bool, the check applies (status not None, judge_error included).
    error:      [B,G,K] bool, a present turn without an honest verdict: any check is a
                judge_error, or the verdict is None (turn not reached / not judged).
    missing:    [B,G,K] bool, the subset of ``error`` whose verdict is None.
    present:    [B,G,K] bool, the turn exists in the session (sessions may have different
                K; shorter ones are padded with absent turns at the end).
    success:    [B,G,K] bool, every applicable check passes; False on error and absent turns.
    session_ids: length B, the session id of each group (None if no verdict was given).
    """

    score: Tensor
    applicable: Tensor
    error: Tensor
    missing: Tensor
    present: Tensor
    success: Tensor
    session_ids: list[str | None] = field(default_factory=list)

    @property
    def scored(self) -> Tensor:
        """[B,G,K,M] bool: the check applies, and the turn is present and error-free."""
        return self.applicable & (self.present & ~self.error)[..., None]  # [B,G,K,M]


def scores_from_verdicts(verdicts: Sequence[Sequence[Sequence[TurnVerdict | None]]],
                         scoring: str = "graded") -> TurnScores:
    """Nested verdicts ``[B][G][K_b]`` (TurnVerdict, or None for a turn not judged) -> tensors.

    Group b holds the G trajectories of one session: every trajectory of a group must have
    the same number of turns (K_b, its session's length; use None for a turn whose verdict
    is missing), every verdict of a group must carry the same ``session_id``, and the k-th
    verdict (0-based) must be for ``turn == k + 1`` (turns are 1-based). Sessions may differ
    in K_b; K = max K_b and shorter sessions are padded with absent turns.

    ``scoring="graded"`` needs ``CheckResult.score`` on every decided check (a pass/fail
    without a score raises: a score is never made up).
    """
    _check_choice("scoring", scoring, SCORINGS)
    B = len(verdicts)
    if B == 0:
        raise ValueError("verdicts is empty: need at least one session group")
    G = len(verdicts[0])
    if G == 0:
        raise ValueError("verdicts[0] is empty: need at least one trajectory per group")
    for b, group in enumerate(verdicts):
        if len(group) != G:
            raise ValueError(f"every group must have G = {G} trajectories; group {b} has {len(group)}")
        lengths = {len(traj) for traj in group}
        if len(lengths) != 1:
            raise ValueError(f"group {b}: trajectories have different turn counts {sorted(lengths)}; "
                             "pass None for a turn that was not judged")
    K = max(len(group[0]) for group in verdicts)
    if K == 0:
        raise ValueError("no turns: every trajectory is empty")
    M = len(REWARDS)

    nan = float("nan")
    score = [[[[nan] * M for _ in range(K)] for _ in range(G)] for _ in range(B)]
    applicable = [[[[False] * M for _ in range(K)] for _ in range(G)] for _ in range(B)]
    error = [[[False] * K for _ in range(G)] for _ in range(B)]
    missing = [[[False] * K for _ in range(G)] for _ in range(B)]
    present = [[[False] * K for _ in range(G)] for _ in range(B)]
    success = [[[False] * K for _ in range(G)] for _ in range(B)]
    session_ids: list[str | None] = []

    for b, group in enumerate(verdicts):
        sid: str | None = None
        for g, traj in enumerate(group):
            for k, v in enumerate(traj):
                present[b][g][k] = True
                if v is None:
                    error[b][g][k] = missing[b][g][k] = True
                    continue
                if not isinstance(v, TurnVerdict):
                    raise ValueError(f"verdicts[{b}][{g}][{k}] must be a TurnVerdict or None, "
                                     f"got {type(v).__name__}")
                if v.turn != k + 1:
                    raise ValueError(f"verdicts[{b}][{g}][{k}] is for turn {v.turn}, expected turn {k + 1} "
                                     "(position k holds the verdict of 1-based turn k + 1)")
                if sid is None:
                    sid = v.session_id
                elif v.session_id != sid:
                    raise ValueError(f"group {b} mixes sessions {sid!r} and {v.session_id!r}: "
                                     "a group is the trajectories of one session")
                for m, name in enumerate(REWARDS):
                    c = getattr(v, name)
                    if c.status is None:
                        continue
                    applicable[b][g][k][m] = True
                    if c.status == "judge_error":
                        error[b][g][k] = True
                        continue
                    if scoring == "binary":
                        score[b][g][k][m] = 1.0 if c.status == "pass" else 0.0
                    else:
                        s = c.score
                        if s is None or not math.isfinite(s) or not 0.0 <= s <= 1.0:
                            raise ValueError(
                                f"graded scoring needs a score in [0, 1] on every decided check; "
                                f"session {v.session_id!r} turn {v.turn} {name} ({c.status}) has {s!r}")
                        score[b][g][k][m] = float(s)
                success[b][g][k] = verdict_success(v)
        session_ids.append(sid)

    return TurnScores(
        score=torch.tensor(score, dtype=torch.float32),  # [B,G,K,M]
        applicable=torch.tensor(applicable, dtype=torch.bool),  # [B,G,K,M]
        error=torch.tensor(error, dtype=torch.bool),  # [B,G,K]
        missing=torch.tensor(missing, dtype=torch.bool),  # [B,G,K]
        present=torch.tensor(present, dtype=torch.bool),  # [B,G,K]
        success=torch.tensor(success, dtype=torch.bool),  # [B,G,K]
        session_ids=session_ids,
    )


# --------------------------------------------------------------------------- turn aggregation

def aggregate_turns(score: Tensor, valid: Tensor, mode: str, gamma: float = 0.9,
                    success: Tensor | None = None) -> Tensor:
    """Aggregate per-turn scores over the last axis (K), using only ``valid`` turns.

    score [..., K] (NaN allowed where invalid), valid [..., K] bool -> [...] float32.
    Returns NaN where no turn is valid (the reward never applies to that trajectory):
    the mask of defined values is ``valid.any(-1)``.

    Modes (V = the valid turns, in turn order):
      mean          Σ_{k∈V} s_k / |V|
      min           min_{k∈V} s_k
      product       Π_{k∈V} s_k
      last          s at the last valid turn (a trailing absent or inapplicable turn is
                    skipped: the last turn where the reward applies counts)
      success_gated mean over k∈V of Π_{j<=k} success_j — the success@k curve averaged
                    over the turns where the reward applies. The product runs over *all*
                    turns j <= k of ``success`` (success is a turn property, also on turns
                    where this reward does not apply), so the score values are not used;
                    needs ``success`` [..., K] bool (broadcastable to score).
      discounted    Σ_{k∈V} γ^(k_last − k)·s_k / Σ_{k∈V} γ^(k_last − k), k_last the last
                    valid turn: a weighted mean that favours later turns (γ in (0, 1]).
                    Because it is normalised, anchoring the exponent at the last valid turn
                    or at the last present turn gives the same value.
    """
    _check_choice("mode", mode, AGGREGATIONS)
    valid = valid.bool()
    if valid.shape != score.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} must equal score shape {tuple(score.shape)}")
    score = score.to(torch.float32)  # [...,K]
    n = valid.sum(dim=-1)  # [...]
    zero = torch.zeros_like(score)  # [...,K]
    if mode == "mean":
        out = torch.where(valid, score, zero).sum(dim=-1) / n.clamp(min=1)  # [...]
    elif mode == "min":
        out = torch.where(valid, score, torch.full_like(score, math.inf)).amin(dim=-1)  # [...]
    elif mode == "product":
        out = torch.where(valid, score, torch.ones_like(score)).prod(dim=-1)  # [...]
    elif mode == "last":
        last = _last_index(valid).clamp(min=0)  # [...]
        out = score.gather(-1, last.unsqueeze(-1)).squeeze(-1)  # [...]
    elif mode == "success_gated":
        if success is None:
            raise ValueError("mode 'success_gated' needs the success tensor [..., K]")
        gate = torch.cumprod(success.bool().to(torch.float32), dim=-1).expand_as(score)  # [...,K]
        out = torch.where(valid, gate, zero).sum(dim=-1) / n.clamp(min=1)  # [...]
    else:  # discounted
        if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
            raise ValueError(f"gamma must lie in (0, 1]; got {gamma!r}")
        pos = torch.arange(score.shape[-1], device=score.device)  # [K]
        last = _last_index(valid)  # [...]
        expo = (last.unsqueeze(-1) - pos).clamp(min=0).to(torch.float32)  # [...,K]
        w = torch.where(valid, torch.full_like(score, float(gamma)) ** expo, zero)  # [...,K]
        out = (w * torch.where(valid, score, zero)).sum(dim=-1) / w.sum(dim=-1).clamp(min=1e-30)  # [...]
    return torch.where(n > 0, out, torch.full_like(out, math.nan))  # [...]


# --------------------------------------------------------------------------- normalisation, fusion

def group_normalise(x: Tensor, valid: Tensor, eps: float = 1e-4) -> Tensor:
    """x [B,G] -> (x − mean_G)/(std_G + eps) over the valid members of each group [B,G].

    std_G is the population std (divide by the number of valid members, like Flow-GRPO's
    ``np.std``); eps 1e-4 as in Flow-GRPO. Invalid members get exactly 0 and do not enter
    the mean or std; a group whose valid members are all equal gets exactly 0 (a lone valid
    member too). x may be NaN where invalid.
    """
    if x.ndim != 2 or valid.shape != x.shape:
        raise ValueError(f"x and valid must both be [B, G]; got {tuple(x.shape)} and {tuple(valid.shape)}")
    return _normalise(x, valid, (1,), eps)  # [B,G]


def _fuse(R: Tensor, present: Tensor, valid: Tensor, weights: Tensor, level: str,
          dims: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fusion shared by trajectory-level and per-turn advantages.

    R, present [B,G,*C,M]; valid [B,G,*C] (C = () for trajectories, (K,) per turn). A
    "cell" is one group at one C index; a reward is *used* in a cell iff it has positive
    weight, the cell has a valid member, and it is present for every valid member there.
    Weights are renormalised over the used rewards of each cell. Normalisation runs over
    ``dims`` (1 = over G; (1, 2) = over G and K).

    Returns A [B,G,*C] (0 where not effective), effective [B,G,*C] (valid and the cell has
    a used reward), used [B,1,*C,M], fused reward Σ w̃·R [B,G,*C] (NaN where not effective).
    """
    present = present.bool()
    valid = valid.bool()
    w = weights.reshape(*([1] * (R.ndim - 1)), -1)  # [1,1,*C,M]
    covered = (present | ~valid.unsqueeze(-1)).all(dim=1, keepdim=True)  # [B,1,*C,M]
    used = covered & valid.any(dim=1, keepdim=True).unsqueeze(-1) & (w > 0)  # [B,1,*C,M]
    wu = torch.where(used, w, torch.zeros_like(w))  # [B,1,*C,M]
    wsum = wu.sum(dim=-1, keepdim=True)  # [B,1,*C,1]
    wn = wu / wsum.clamp(min=1e-30)  # [B,1,*C,M]
    eff = valid & (wsum.squeeze(-1) > 0)  # [B,G,*C]
    take = used & eff.unsqueeze(-1)  # [B,G,*C,M]
    Rz = torch.where(take, R.to(torch.float32), torch.zeros_like(R, dtype=torch.float32))  # [B,G,*C,M]
    fused = (wn * Rz).sum(dim=-1)  # [B,G,*C]
    if level == "reward":
        A = _normalise(fused, eff, dims, eps)  # [B,G,*C]
    else:
        A = (wn * _normalise(Rz, take, dims, eps)).sum(dim=-1)  # [B,G,*C]
    A = torch.where(eff, A, torch.zeros_like(A))  # [B,G,*C]
    fused = torch.where(eff, fused, torch.full_like(fused, math.nan))  # [B,G,*C]
    return A, eff, used, fused


def fuse(R: Tensor, present: Tensor, weights: Tensor | Sequence[float], level: str = "advantage",
         valid: Tensor | None = None, eps: float = 1e-4) -> Tensor:
    """Trajectory rewards R [B,G,M] -> one advantage per trajectory A [B,G].

    level "reward":    A = group_normalise(Σ_m w̃_m·R_m)
    level "advantage": A = Σ_m w̃_m·group_normalise(R_m)     (MT-EditFlow, MixGRPO)

    present [B,G,M] marks the rewards that exist for a trajectory (an aggregate over a
    reward that never applied is absent); valid [B,G] the members that take part (default:
    those with any reward present). A reward absent for a trajectory: a reward enters a
    group's fusion only if it is present for *every* valid member of that group (so all
    members are compared on the same rewards, consistently within the group); its weight
    is then renormalised over the rewards that enter, w̃_m = w_m / Σ_used w (a reward of
    weight 0 never enters). A group in which no reward enters gives A = 0 for every member. Invalid members get A = 0 and
    do not enter any mean or std.
    """
    _check_choice("level", level, FUSION_LEVELS)
    if R.ndim != 3 or present.shape != R.shape or R.shape[-1] != len(REWARDS):
        raise ValueError(f"R and present must both be [B, G, {len(REWARDS)}]; "
                         f"got {tuple(R.shape)} and {tuple(present.shape)}")
    if valid is None:
        valid = present.bool().any(dim=-1)  # [B,G]
    if valid.shape != R.shape[:2]:
        raise ValueError(f"valid must be [B, G] = {tuple(R.shape[:2])}; got {tuple(valid.shape)}")
    A, _, _, _ = _fuse(R, present, valid, _weights_tensor(weights, R.device), level, (1,), eps)
    return A  # [B,G]


# --------------------------------------------------------------------------- assignment

def broadcast(A: Tensor, K: int) -> Tensor:
    """Trajectory advantage A [B,G] -> the same value on each of its K turns [B,G,K]
    (MT-EditFlow: the aggregated advantage is broadcast over the whole trajectory)."""
    if A.ndim != 2:
        raise ValueError(f"A must be [B, G]; got {tuple(A.shape)}")
    return A.unsqueeze(-1).expand(*A.shape, K).clone()  # [B,G,K]


def _per_turn(turn_scores: Tensor, scored: Tensor, valid: Tensor, weights: Tensor, level: str,
              norm: str, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> A [B,G,K], effective [B,G,K], fused turn reward Σ w̃·score [B,G,K] (NaN where not effective)."""
    _check_choice("level", level, FUSION_LEVELS)
    _check_choice("norm", norm, PER_TURN_NORMS)
    if turn_scores.ndim != 4 or scored.shape != turn_scores.shape or turn_scores.shape[-1] != len(REWARDS):
        raise ValueError(f"turn_scores and scored must both be [B, G, K, {len(REWARDS)}]; "
                         f"got {tuple(turn_scores.shape)} and {tuple(scored.shape)}")
    if valid.shape != turn_scores.shape[:3]:
        raise ValueError(f"valid must be [B, G, K] = {tuple(turn_scores.shape[:3])}; got {tuple(valid.shape)}")
    dims = (1,) if norm == "turn" else (1, 2)
    A, eff, _, fused = _fuse(turn_scores, scored, valid, weights, level, dims, eps)
    return A, eff, fused  # [B,G,K], [B,G,K], [B,G,K]


def per_turn_advantages(turn_scores: Tensor, scored: Tensor, valid: Tensor,
                        weights: Tensor | Sequence[float], level: str = "advantage",
                        norm: str = "turn", eps: float = 1e-4) -> Tensor:
    """Per-turn advantages from the turn-k scores, without turn aggregation -> A [B,G,K].

    turn_scores [B,G,K,M] (NaN allowed where not scored); scored [B,G,K,M] bool: the
    reward has a decided value at that turn; valid [B,G,K] bool: the turn sample takes part
    (present and no judge error). Fusion at each turn follows :func:`fuse`, with the group
    at turn k as the cell: a reward enters turn k of a group iff it is scored for every valid
    member at that turn, weights renormalised over the rewards that enter.

    norm "turn":    statistics over the G samples of each (session, turn) — the per-turn
                    variant of MT-EditFlow's study.
    norm "session": statistics over all valid G·K turn samples of a session together
                    (Edit-R2). With level "reward" the fused turn scores are pooled; with
                    level "advantage" each reward is normalised over the turn samples where
                    it enters, then fused.
    Invalid samples, and samples of a cell where no reward enters, get A = 0.
    """
    A, _, _ = _per_turn(turn_scores, scored, valid, _weights_tensor(weights, turn_scores.device),
                        level, norm, eps)
    return A  # [B,G,K]


# --------------------------------------------------------------------------- filters

def verdict_success(v: TurnVerdict | None) -> bool:
    """A turn's success, as :func:`scores_from_verdicts` and rollout branching count it: every
    applicable check passes (a missing verdict or a judge error is not a success)."""
    if v is None:
        return False
    statuses = [getattr(v, m).status for m in REWARDS]
    return all(st in (None, "pass") for st in statuses)


def lineage_success(success: Tensor, parents: Tensor) -> Tensor:
    """Branched rollouts: what each sample's *own trajectory* passed at every turn.

    success [B,G,K] bool, parents [B,K] int64 (the trajectory every sample of turn k+1 continued
    from; -1 where no turn followed) -> [B,G,K] bool. Turn k of sample g sits on its parents'
    outputs at turns j < k, so entry (b, g, j) is the parent's success where turn j had one
    (every g alike) and g's own otherwise (the last turn)."""
    if success.ndim != 3 or parents.shape != (success.shape[0], success.shape[2]):
        raise ValueError(f"success must be [B, G, K] and parents [B, K]; got {tuple(success.shape)} and "
                         f"{tuple(parents.shape)}")
    idx = parents.clamp(min=0)[:, None, :].expand_as(success)  # [B,G,K]
    of_parent = torch.gather(success.bool(), 1, idx)  # [B,G,K]
    return torch.where((parents >= 0)[:, None, :], of_parent, success.bool())  # [B,G,K]


def trajectory_filter(A: Tensor, success: Tensor, present: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Edit-R2 trajectory filtering: turns *after* the first failed turn get A = 0.

    A [B,G,K], success [B,G,K] bool -> (A' [B,G,K], masked [B,G,K] bool). The first
    failed turn itself keeps its advantage (its input was clean; its failure is what the
    gradient should act on); every later turn's input is contaminated by it. A turn whose
    success is unknown (judge error: success False) counts as not successful here — its
    output cannot be vouched for, so the turns after it are filtered too. ``masked`` marks
    exactly the zeroed turns (restricted to ``present`` when given) so the caller can count
    them.
    """
    if success.shape != A.shape or A.ndim != 3:
        raise ValueError(f"A and success must both be [B, G, K]; got {tuple(A.shape)} and {tuple(success.shape)}")
    fail = ~success.bool()  # [B,G,K]
    if present is not None:
        fail = fail & present.bool()  # [B,G,K]
    fail_i = fail.to(torch.int32)  # [B,G,K]
    failed_before = (torch.cumsum(fail_i, dim=-1) - fail_i) > 0  # [B,G,K]  a failure at j < k
    masked = failed_before if present is None else failed_before & present.bool()  # [B,G,K]
    return torch.where(masked, torch.zeros_like(A), A), masked  # [B,G,K], [B,G,K]


def group_filter(R: Tensor, valid: Tensor, std_min: float | Tensor = 0.05, mean_max: float = 0.9) -> Tensor:
    """Edit-R1 group filtering -> keep [B] bool.

    R [B,G] is the fused scalar reward on the [0, 1] scale (Σ_m w̃_m·R_m with weights
    summing to 1 — the same quantity for either fusion level, *not* the advantage) of each
    member of the group the advantages are normalised over (trajectories for broadcast,
    the samples of one turn for per-turn assignment); valid [B,G] its members. A group is masked when its population std over
    valid members is <= std_min (too little signal: normalising would amplify noise) or its
    mean is >= mean_max (already solved). A group with no valid member has no statistic
    and is kept (its members are masked by their own judge errors). ``std_min`` is one
    threshold or one per group ([B]).
    """
    if R.ndim != 2 or valid.shape != R.shape:
        raise ValueError(f"R and valid must both be [B, G]; got {tuple(R.shape)} and {tuple(valid.shape)}")
    mean, std, n = _group_mean_std(R, valid)  # [B], [B], [B]
    drop = (n > 0) & ((std <= std_min) | (mean >= mean_max))  # [B]
    return ~drop  # [B]


def hybrid_scores(binary: Tensor, graded: Tensor, success: Tensor, live: Tensor) -> tuple[Tensor, Tensor]:
    """Binary scores, with the graded ones in every (session, turn) cell where no live sample succeeds.

    binary, graded: [B,G,K,M] scores of the same verdicts; success, live: [B,G,K] bool (live: the
    sample enters its cell's statistics). Returns (score [B,G,K,M], fallback [B,K] bool: the cells
    that took the graded scores, i.e. that hold a live sample and no live success).
    """
    fallback = live.any(dim=1) & ~(success & live).any(dim=1)  # [B,K]
    return torch.where(fallback[:, None, :, None], graded, binary), fallback  # [B,G,K,M], [B,K]


# --------------------------------------------------------------------------- config + driver

@dataclass
class AdvantageConfig:
    """How judge verdicts become advantages. Each field names its source."""

    scoring: str = "graded"
    """binary (pass 1 / fail 0) or graded (the check's score in [0, 1]); MT-EditFlow finds
    graded 1-5 scoring the better learning signal. hybrid: binary, except in a (session, turn)
    group where no sample that enters the statistics succeeds; there the graded scores rank the
    failures (a binary all-fail group has nothing to rank; graded scores in mixed groups give
    failures positive advantages)."""
    aggregation: str = "mean"
    """turn aggregation per reward (ALGORITHMS §7.1): mean, min, product, last,
    success_gated, discounted. Used by broadcast assignment, by the group filter and for
    the logged trajectory rewards."""
    gamma: float = 0.9
    """discount for aggregation='discounted' (later turns weigh more)."""
    fusion: str = "advantage"
    """reward or advantage level; advantage-level resists reward hacking (MT-EditFlow,
    MixGRPO's advantage_aggr)."""
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    """per-reward weights; Edit-R2 IF 0.3 / CC 0.3 / CU-or-GA 0.4, split 0.2 / 0.2 here.
    A reward left out gets weight 0."""
    assignment: str = "broadcast"
    """broadcast the trajectory advantage to every turn (MT-EditFlow) or per_turn."""
    per_turn_norm: str = "turn"
    """per_turn only: normalise over the group at each turn, or over all G·K turn samples
    of a session (session, Edit-R2)."""
    trajectory_filter: bool = True
    """zero the turns after a trajectory's first failed turn (Edit-R2)."""
    group_filter: bool = True
    """mask groups whose fused reward has std <= group_std_min or mean >= group_mean_max
    (Edit-R1)."""
    group_std_min: float = 0.05
    group_mean_max: float = 0.9
    fallback_std_min: float = 0.001
    """scoring hybrid: the group filter's std threshold in a (session, turn) cell scored graded
    (broadcast / session norm: in a group holding such a cell). Graded failures differ by
    fractions of an attribute (a fill level, a texture share), far less than a pass differs
    from a fail, and the judge is exact, so the usual threshold would mask them all."""
    adv_clip: float | None = 5.0
    """clip advantages to ±adv_clip (Flow-GRPO A_max = 5); None: no clip."""
    eps: float = 1e-4
    """added to std_G (Flow-GRPO)."""

    def __post_init__(self) -> None:
        _check_choice("scoring", self.scoring, ADV_SCORINGS)
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        _check_choice("fusion", self.fusion, FUSION_LEVELS)
        _check_choice("assignment", self.assignment, ASSIGNMENTS)
        _check_choice("per_turn_norm", self.per_turn_norm, PER_TURN_NORMS)
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1]; got {self.gamma}")
        unknown = set(self.weights) - set(REWARDS)
        if unknown:
            raise ValueError(f"weights has unknown rewards {sorted(unknown)}; known: {', '.join(REWARDS)}")
        _weights_tensor(self.weight_vector())
        if self.adv_clip is not None and not self.adv_clip > 0:
            raise ValueError(f"adv_clip must be > 0 or None; got {self.adv_clip}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0; got {self.eps}")
        if not self.group_std_min >= 0:
            raise ValueError(f"group_std_min must be >= 0; got {self.group_std_min}")
        if not self.fallback_std_min >= 0:
            raise ValueError(f"fallback_std_min must be >= 0; got {self.fallback_std_min}")

    def weight_vector(self) -> list[float]:
        """The weights in :data:`REWARDS` order (missing rewards 0)."""
        return [float(self.weights.get(m, 0.0)) for m in REWARDS]


@dataclass
class AdvantageResult:
    """What :func:`compute_advantages` returns (all tensors on CPU, float32 / bool).

    A:        [B,G,K] advantage of every turn; exactly 0 wherever ``mask`` is False.
    mask:     [B,G,K] bool, the turns that get a gradient.
    rewards:  [B,G,M] per-reward trajectory reward (turn aggregate); NaN where the reward
              never applied or the trajectory has a judge error / missing verdict.
    fused:    [B,G] fused trajectory reward Σ w̃·R in [0, 1]; NaN where not computable.
    keep:     [B,K] bool, (session, turn) cells kept by the group filter (all True when it is
              off). Broadcast assignment decides per group on the trajectory rewards (a row is
              all True or all False); per-turn assignment decides per cell on the fused turn
              rewards the cell was normalised over (with "session" norm, per session).
    scores:   the per-turn :class:`TurnScores`.
    stats:    scalars for the log (keys below); a key whose value is undefined (e.g. no
              trajectory with that reward) is left out, never written as 0.
        reward/<m>            mean trajectory reward of judge m over trajectories where defined
        reward/fused          mean fused trajectory reward
        success/turn_<k>      share of judged turns k (1-based) that pass every applicable check
        mask/absent_share     absent turn slots / (B·G·K)
        mask/<reason>_share   present turns masked, by the first reason that applies, in this
                              order: judge_error (with broadcast, every turn of a trajectory with
                              a judge error or missing verdict; per turn, that turn),
                              trajectory_filtered (after the trajectory's first failed or
                              unjudged turn), no_reward (no reward could enter its fusion),
                              group_filtered; plus mask/trained_share. These five sum to 1.
        count/judge_error_turns, count/missing_verdict_turns   raw turn counts
        group/filtered_share  cells masked by the group filter / cells with a statistic (groups
                              for broadcast, (session, turn) cells for per_turn)
        adv/abs_mean          mean |A| over trained turns
        group/graded_share    scoring hybrid: (session, turn) cells scored graded / cells with a
                              judged turn
        group/graded_kept_share  scoring hybrid: graded cells the group filter keeps / graded cells
    """

    A: Tensor
    mask: Tensor
    rewards: Tensor
    fused: Tensor
    keep: Tensor
    scores: TurnScores
    stats: dict[str, float]


def compute_advantages(verdicts: Sequence[Sequence[Sequence[TurnVerdict | None]]],
                       cfg: AdvantageConfig | None = None, parents: Tensor | None = None) -> AdvantageResult:
    """Judge verdicts ``[B][G][K_b]`` -> per-turn advantages, mask and log stats.

    Judge errors (a check with status judge_error, or a verdict None) mask their sample and
    are never given a value: with broadcast assignment the whole trajectory (its aggregate
    cannot be computed honestly) gets A = 0 and is left out of its group's statistics; with
    per-turn assignment only that turn. Other groups are untouched either way.

    Trajectory filtering zeroes the turns after the first failed turn. With broadcast the
    group statistics are over trajectory rewards, which the filter does not change; with
    per-turn assignment the filtered turns are also left out of the turn statistics.
    The group filter always looks at the fused *trajectory* reward (aggregated with
    ``cfg.aggregation``) of the trajectories without judge errors.

    ``parents`` [B,K] (branched rollouts, :func:`editrl.rl.rollout.choose_parents`): every
    sample of turn k+1 continued from trajectory ``parents[b, k-1]``'s output, so a row of the
    grid is no trajectory. Only per-turn assignment is defined then, and the trajectory filter
    follows each sample's lineage (:func:`lineage_success`). The logged trajectory rewards
    remain per-row turn aggregates, and success/turn_k is the success of turn k given the
    chosen (successful, where one was) earlier turns.
    """
    cfg = cfg or AdvantageConfig()
    if parents is not None and cfg.assignment != "per_turn":
        raise ValueError("branched rollouts (parents) need assignment='per_turn': their rows are no trajectories "
                         "whose advantage could be broadcast")
    ts = scores_from_verdicts(verdicts, "binary" if cfg.scoring == "hybrid" else cfg.scoring)
    B, G, K, M = ts.score.shape
    w = _weights_tensor(cfg.weight_vector())  # [M]
    present = ts.present  # [B,G,K]
    err = ts.error & present  # [B,G,K]
    scored = ts.scored  # [B,G,K,M]

    # trajectory filter: depends only on success, so it is known before normalising
    if cfg.trajectory_filter:
        lineage = ts.success if parents is None else lineage_success(ts.success, parents)  # [B,G,K]
        _, after_fail = trajectory_filter(torch.zeros(B, G, K), lineage, present)  # [B,G,K]
    else:
        after_fail = torch.zeros_like(present)  # [B,G,K]

    fallback = None
    if cfg.scoring == "hybrid":
        # the samples a (session, turn) cell's statistics use: per-turn drops filtered turns too
        live = present & ~err  # [B,G,K]
        if cfg.assignment == "per_turn":
            live = live & ~after_fail  # [B,G,K]
        graded = scores_from_verdicts(verdicts, "graded").score  # [B,G,K,M]
        ts.score, fallback = hybrid_scores(ts.score, graded, ts.success, live)  # [B,G,K,M], [B,K]

    # the group filter's std threshold per (session, turn) cell: lower where graded scores rank failures
    std_min = (torch.full((B, K), cfg.group_std_min) if fallback is None
               else torch.where(fallback, cfg.fallback_std_min, cfg.group_std_min))  # [B,K]
    std_min_group = std_min.min(dim=1).values  # [B] a group holding a graded cell takes its threshold

    # trajectory rewards: honest only without any judge error / missing verdict
    traj_valid = present.any(dim=-1) & ~err.any(dim=-1)  # [B,G]
    R = aggregate_turns(ts.score.permute(0, 1, 3, 2), scored.permute(0, 1, 3, 2), cfg.aggregation,
                        cfg.gamma, success=ts.success[:, :, None, :])  # [B,G,M]
    R = torch.where(traj_valid[..., None], R, torch.full_like(R, math.nan))  # [B,G,M]
    A_traj, traj_eff, _, fused = _fuse(R, ~torch.isnan(R), traj_valid, w, cfg.fusion, (1,), cfg.eps)
    # A_traj [B,G], traj_eff [B,G], fused [B,G]

    if cfg.assignment == "broadcast":
        A = broadcast(A_traj, K)  # [B,G,K]
        err_masked = present & ~traj_valid[..., None]  # [B,G,K]
        traj_masked = after_fail & ~err_masked  # [B,G,K]
        sample_ok = present & traj_eff[..., None] & ~traj_masked  # [B,G,K]
        # the group filter judges the trajectory rewards the advantages were normalised over
        keep_g = (group_filter(fused, traj_eff, std_min_group, cfg.group_mean_max) if cfg.group_filter
                  else torch.ones(B, dtype=torch.bool))  # [B]
        keep = keep_g[:, None].expand(B, K).clone()  # [B,K]
        cells = traj_eff.any(dim=1)[:, None].expand(B, K) & present.any(dim=1)  # [B,K] groups with a statistic
    else:
        # filtered turns are left out of the turn statistics too: their inputs are
        # contaminated, so they are no baseline for the clean ones
        err_masked = err  # [B,G,K]
        traj_masked = after_fail & ~err_masked  # [B,G,K]
        A, turn_eff, turn_fused = _per_turn(ts.score, scored, present & ~err_masked & ~traj_masked, w,
                                            cfg.fusion, cfg.per_turn_norm, cfg.eps)  # [B,G,K] x 3
        sample_ok = turn_eff  # [B,G,K]
        # the group filter judges the cell the advantages were normalised over: the G samples of
        # one (session, turn), or all G·K turn samples of a session ("session" norm). Judging
        # the *trajectory* reward instead would drop exactly the groups whose trajectories
        # succeed throughout, i.e. every late-turn success.
        keep = torch.ones(B, K, dtype=torch.bool)  # [B,K]
        if cfg.per_turn_norm == "turn":
            cells = turn_eff.any(dim=1)  # [B,K]
            if cfg.group_filter:
                for k in range(K):
                    keep[:, k] = group_filter(torch.nan_to_num(turn_fused[:, :, k]), turn_eff[:, :, k],
                                              std_min[:, k], cfg.group_mean_max)
        else:
            cells = turn_eff.any(dim=(1, 2))[:, None].expand(B, K) & present.any(dim=1)  # [B,K]
            if cfg.group_filter:
                pooled = torch.nan_to_num(turn_fused).reshape(B, G * K)  # [B,G*K]
                keep_s = group_filter(pooled, turn_eff.reshape(B, G * K), std_min_group, cfg.group_mean_max)
                keep = keep_s[:, None].expand(B, K).clone()  # [B,K]
    no_reward = present & ~err_masked & ~traj_masked & ~sample_ok  # [B,G,K]
    group_masked = sample_ok & ~keep[:, None, :]  # [B,G,K]

    mask = sample_ok & keep[:, None, :]  # [B,G,K]
    A = torch.where(mask, A, torch.zeros_like(A))  # [B,G,K]
    if cfg.adv_clip is not None:
        A = A.clamp(-cfg.adv_clip, cfg.adv_clip)  # [B,G,K]

    stats: dict[str, float] = {}
    for m, name in enumerate(REWARDS):
        r_m = R[..., m]  # [B,G]
        ok = ~torch.isnan(r_m)  # [B,G]
        if bool(ok.any()):
            stats[f"reward/{name}"] = float(r_m[ok].mean())
    ok = ~torch.isnan(fused)  # [B,G]
    if bool(ok.any()):
        stats["reward/fused"] = float(fused[ok].mean())
    judged = present & ~err  # [B,G,K]
    for k in range(K):
        n_k = int(judged[..., k].sum())
        if n_k:
            stats[f"success/turn_{k + 1}"] = float((ts.success[..., k] & judged[..., k]).sum()) / n_k
    n_present = int(present.sum())
    stats["mask/absent_share"] = 1.0 - n_present / (B * G * K)
    if n_present:
        for key, t in (("judge_error", err_masked), ("trajectory_filtered", traj_masked),
                       ("no_reward", no_reward), ("group_filtered", group_masked),
                       ("trained", mask)):
            stats[f"mask/{key}_share"] = float(t.sum()) / n_present
    stats["count/judge_error_turns"] = float(err.sum())
    stats["count/missing_verdict_turns"] = float((ts.missing & present).sum())
    if bool(cells.any()):   # broadcast: share of groups; per_turn: of (session, turn) cells (session norm: of sessions)
        stats["group/filtered_share"] = float((cells & ~keep).sum()) / float(cells.sum())
    if bool(mask.any()):
        stats["adv/abs_mean"] = float(A[mask].abs().mean())
    if fallback is not None:
        live_cells = (present & ~err).any(dim=1)  # [B,K]
        if bool(live_cells.any()):   # hybrid: share of (session, turn) cells scored graded (no success to rank by)
            stats["group/graded_share"] = float(fallback.sum()) / float(live_cells.sum())
            if bool(fallback.any()):   # the graded cells that kept their gradient (group filter)
                stats["group/graded_kept_share"] = float((fallback & keep).sum()) / float(fallback.sum())

    return AdvantageResult(A=A, mask=mask, rewards=R, fused=fused, keep=keep, scores=ts, stats=stats)
