"""The pure math of multi-turn RL: turn rewards -> advantages, and the two policy losses.

No I/O, no models, no training loop: a recipe calls these functions on tensors.

* :mod:`editrl.rl.advantages` — judge verdicts -> per-turn scores -> turn aggregation ->
  fusion -> group normalisation -> assignment (broadcast / per turn) -> filtering
  (ALGORITHMS §6-§7).
* :mod:`editrl.rl.flow_grpo` — the clipped Flow-GRPO surrogate over stored SDE
  transitions, plus its KL term (ALGORITHMS §3).
* :mod:`editrl.rl.nft` — the DiffusionNFT loss over clean samples, the optimality weight
  and the old-policy EMA (ALGORITHMS §4).

Axes: B sessions, G trajectories per session (the group), K turns, M rewards
(IF, CC, GA, CU in that order), N stored transitions.
"""

from .advantages import (
    AGGREGATIONS,
    DEFAULT_WEIGHTS,
    REWARDS,
    AdvantageConfig,
    AdvantageResult,
    TurnScores,
    aggregate_turns,
    broadcast,
    compute_advantages,
    fuse,
    group_filter,
    group_normalise,
    lineage_success,
    per_turn_advantages,
    scores_from_verdicts,
    trajectory_filter,
    verdict_success,
)
from .flow_grpo import grpo_loss, transition_kl
from .nft import ema_update_, nft_loss, old_policy_decay, optimality_weight

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_WEIGHTS",
    "REWARDS",
    "AdvantageConfig",
    "AdvantageResult",
    "TurnScores",
    "aggregate_turns",
    "broadcast",
    "compute_advantages",
    "fuse",
    "group_filter",
    "group_normalise",
    "lineage_success",
    "per_turn_advantages",
    "scores_from_verdicts",
    "trajectory_filter",
    "verdict_success",
    "grpo_loss",
    "transition_kl",
    "ema_update_",
    "nft_loss",
    "old_policy_decay",
    "optimality_weight",
]
