"""An exponential moving average of the trained weights, for evaluation and export.

RL updates are noisy: every optimiser step moves each weight by about the learning rate in
a direction a few dozen sessions chose. The held-out evaluations and `DIR/final` can read a
running average of θ instead (`ema_decay` in the RL config), as Flow-GRPO's public trainer
does. The average is kept over the editor's `state_dict()` (the tiny net's weights, or a
diffusers editor's LoRA weights), in float32, and cast back to each tensor's dtype on export.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

__all__ = ["ema_init", "ema_state_update_", "ema_export"]


def ema_init(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A float32 copy of `state` (non-floating tensors are copied as they are)."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).clone() for k, v in state.items()}


@torch.no_grad()
def ema_state_update_(ema: dict[str, Tensor], state: Mapping[str, Tensor], decay: float) -> None:
    """In place: ema ← decay·ema + (1 − decay)·state for floating tensors; others are copied.

    The keys must match exactly. decay 0 copies `state`; decay 1 leaves `ema` unchanged."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1]; got {decay}")
    if set(ema) != set(state):
        missing, extra = sorted(set(ema) - set(state)), sorted(set(state) - set(ema))
        raise ValueError(f"EMA and weights differ in keys (missing {missing[:2]}, unexpected {extra[:2]})")
    for k, e in ema.items():
        v = state[k].detach()
        if v.shape != e.shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)} but the EMA holds {tuple(e.shape)}")
        if e.is_floating_point():
            e.lerp_(v.float(), 1.0 - decay)
        else:
            e.copy_(v)


def ema_export(ema: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The averaged weights in the dtypes of `like` (the live weights), contiguous, ready to save."""
    return {k: ema[k].to(like[k].dtype).contiguous() for k in like}
