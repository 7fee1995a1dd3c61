"""The DiffusionNFT loss, its optimality weight and the old-policy EMA (ALGORITHMS §4).

Rollouts come from the *old* policy with any solver; only each turn's clean output x0 is
kept. For a fresh σ and ε, x_σ = (1 − σ)·x0 + σ·ε and the velocity target is v* = ε − x0.
With v_old = v_old(x_σ) (no gradient) and v_θ = v_θ(x_σ), the implicit policies are

    v⁺ = (1 − β)·v_old + β·v_θ        v⁻ = (1 + β)·v_old − β·v_θ

and the per-sample loss is r·‖v⁺ − v*‖² + (1 − r)·‖v⁻ − v*‖² (+ λ_ref·‖v_θ − v_ref‖²)
with the optimality weight r = clip(A / A_max / 2 + 1/2, 0, 1). Minimising it pulls v_θ
toward v* for r > ½ (good samples) and pushes it away for r < ½.

Differences from the public DiffusionNFT code (documented in docs/paper_index.md):
* the public policy loss is this one times A_max / β (a constant factor: it rescales the
  learning rate under SGD and is almost invisible to Adam); to carry a public KL/reference
  coefficient λ_pub over, use ``ref_weight = λ_pub·β / A_max``.
* the adaptive weights are computed in float64 as there, then cast to float32.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..sampling import _mean_nonbatch, _per_sample

__all__ = ["optimality_weight", "nft_loss", "ema_update_", "old_policy_decay"]

ADAPTIVE_MIN = 1e-5  # lower clip of the adaptive weight's denominator, as in the public code


def optimality_weight(adv: Tensor, adv_max: float) -> Tensor:
    """r = clip(A / A_max / 2 + 1/2, 0, 1), elementwise (same shape as adv).

    A = 0 -> ½ (neutral), A >= A_max -> 1 (pure positive), A <= −A_max -> 0 (pure negative).
    """
    if not adv_max > 0:
        raise ValueError(f"adv_max must be > 0; got {adv_max}")
    return (adv.to(torch.float32) / adv_max / 2.0 + 0.5).clamp(0.0, 1.0)  # [B]


def nft_loss(v_theta: Tensor, v_old: Tensor, x_sigma: Tensor, sigma: Tensor | float, x0: Tensor,
             eps: Tensor, r: Tensor, beta: float, adaptive: bool, v_ref: Tensor | None = None,
             ref_weight: float = 0.0, weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """DiffusionNFT loss -> (scalar loss, stats).

    v_theta [B, ...] (with gradient), v_old [B, ...] (detached here), x_sigma, x0, eps
    [B, ...]; sigma float, [B] or [B,1,...,1]; r [B] optimality weights in [0, 1];
    0 < beta; v_ref [B, ...] reference velocity (detached here) used when ref_weight > 0;
    weight [B] >= 0 sample weights (0 = masked).

    Per sample (means over the non-batch axes, D elements):
      adaptive=False: e± = mean (v± − v*)²                     (the velocity-space loss)
      adaptive=True:  x̂0± = x_σ − σ·v±,  e± = mean (x̂0± − x0)² / sg(c±),
                      c± = max(mean |x̂0± − x0|, 1e-5)
      ℓ = r·e⁺ + (1 − r)·e⁻ + ref_weight·mean (v_θ − v_ref)²
    loss = Σ w·ℓ / Σ w (the mean over samples with weight > 0 for a 0/1 mask; 0 with a zero
    gradient if none).

    The adaptive weight follows the public DiffusionNFT code exactly: each branch has its
    own stop-gradient normaliser c± computed from that branch's x̂0± (which involves v_θ),
    per sample, clipped below at 1e-5. (ALGORITHMS §4 writes it as 1/mean|x̂0 − x0|; at
    v_θ = v_old, as at the start of an epoch, c⁺ = c⁻ = mean|x̂0_old − x0|.) Since
    x̂0 − x0 = σ·(v* − v) when x_σ = (1 − σ)·x0 + σ·ε, e± = σ·mean (v± − v*)² / mean |v± − v*|.

    stats: loss, positive_loss (mean e⁺), negative_loss (mean e⁻), ref_loss (when used),
    r_mean, old_deviation (mean (v_θ − v_old)²), n_active.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    shape = v_theta.shape
    for name, t in (("v_old", v_old), ("x_sigma", x_sigma), ("x0", x0), ("eps", eps)):
        if t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal v_theta shape {tuple(shape)}")
    B = shape[0]
    if r.shape != (B,):
        raise ValueError(f"r must be [B] = [{B}]; got {tuple(r.shape)}")
    if weight is not None and weight.shape != (B,):
        raise ValueError(f"weight must be [B] = [{B}]; got {tuple(weight.shape)}")
    use_ref = ref_weight != 0.0
    if use_ref and (v_ref is None or v_ref.shape != shape):
        raise ValueError("ref_weight != 0 needs v_ref with v_theta's shape")

    v_theta = v_theta.to(torch.float32)  # [B,C,H,W]
    v_old = v_old.detach().to(torch.float32)  # [B,C,H,W]
    x0 = x0.to(torch.float32)  # [B,C,H,W]
    target = eps.to(torch.float32) - x0  # [B,C,H,W]  v* = ε − x0
    r = r.detach().to(torch.float32)  # [B]

    v_pos = (1.0 - beta) * v_old + beta * v_theta  # [B,C,H,W]
    v_neg = (1.0 + beta) * v_old - beta * v_theta  # [B,C,H,W]
    if adaptive:
        s = _per_sample("sigma", sigma, v_theta)  # [B,1,1,1]
        x_sigma = x_sigma.to(torch.float32)  # [B,C,H,W]
        x0_pos = x_sigma - s * v_pos  # [B,C,H,W]
        x0_neg = x_sigma - s * v_neg  # [B,C,H,W]
        with torch.no_grad():
            c_pos = _mean_nonbatch((x0_pos.double() - x0.double()).abs()).clamp(min=ADAPTIVE_MIN).float()  # [B]
            c_neg = _mean_nonbatch((x0_neg.double() - x0.double()).abs()).clamp(min=ADAPTIVE_MIN).float()  # [B]
        e_pos = _mean_nonbatch((x0_pos - x0) ** 2) / c_pos  # [B]
        e_neg = _mean_nonbatch((x0_neg - x0) ** 2) / c_neg  # [B]
    else:
        e_pos = _mean_nonbatch((v_pos - target) ** 2)  # [B]
        e_neg = _mean_nonbatch((v_neg - target) ** 2)  # [B]
    per = r * e_pos + (1.0 - r) * e_neg  # [B]
    if use_ref:
        ref = _mean_nonbatch((v_theta - v_ref.detach().to(torch.float32)) ** 2)  # [B]
        per = per + ref_weight * ref  # [B]

    if weight is None:
        w = torch.ones_like(per)  # [B]
    else:
        w = weight.detach().to(torch.float32)  # [B]
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError("weight must be finite and >= 0")
    active = w > 0  # [B]
    n_active = int(active.sum())
    if n_active == 0:
        return (per * 0.0).sum(), {"n_active": 0.0}
    loss = torch.where(active, per * w, torch.zeros_like(per)).sum() / w.sum()  # []

    with torch.no_grad():
        stats = {
            "loss": float(loss),
            "positive_loss": float(e_pos[active].mean()),
            "negative_loss": float(e_neg[active].mean()),
            "r_mean": float(r[active].mean()),
            "old_deviation": float(((v_theta - v_old) ** 2)[active].mean()),
            "n_active": float(n_active),
        }
        if use_ref:
            stats["ref_loss"] = float(ref[active].mean())
    return loss, stats


@torch.no_grad()
def ema_update_(old_params: Iterable[Tensor], new_params: Iterable[Tensor], decay: float) -> None:
    """In place: old ← decay·old + (1 − decay)·new, parameter by parameter.

    decay 0 copies the new parameters (the old policy becomes the current one); decay 1
    leaves the old ones unchanged. The two iterables must pair up one to one with equal
    shapes.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1]; got {decay}")
    old_list, new_list = list(old_params), list(new_params)
    if len(old_list) != len(new_list):
        raise ValueError(f"{len(old_list)} old parameters but {len(new_list)} new ones")
    from .distributed import full_tensor, is_dtensor
    for o, n in zip(old_list, new_list):
        if o.shape != n.shape:
            raise ValueError(f"parameter shapes differ: {tuple(o.shape)} vs {tuple(n.shape)}")
        if is_dtensor(n) and not is_dtensor(o):     # FSDP-sharded policy, replicated old copy: gather
            n = full_tensor(n)
        with torch.no_grad():
            o.lerp_(n.to(o.dtype), 1.0 - decay)


def old_policy_decay(step: int, max_decay: float, ramp: float, flat: int = 0) -> float:
    """EMA decay of the old policy at training step ``step``, ramped up from 0.

    0 for step < flat, then max_decay·min(1, (step − flat) / ramp) (ramp = 0: max_decay at
    once). The public DiffusionNFT schedule min((step − flat)·uprate, uphold) is the same
    with max_decay = uphold and ramp = uphold / uprate (its presets: flat 0, uprate 0.001,
    uphold 0.5 -> ramp 500; flat 75, uprate 0.0075, uphold 0.999 -> ramp 133.2).
    Early on the old policy follows θ closely (decay ≈ 0), later it lags as a slow EMA.
    """
    if not 0.0 <= max_decay <= 1.0:
        raise ValueError(f"max_decay must lie in [0, 1]; got {max_decay}")
    if ramp < 0 or flat < 0 or step < 0:
        raise ValueError(f"step, ramp and flat must be >= 0; got {step}, {ramp}, {flat}")
    if step < flat:
        return 0.0
    if ramp == 0:
        return float(max_decay)
    return float(max_decay * min(1.0, (step - flat) / ramp))
