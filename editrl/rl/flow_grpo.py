"""The Flow-GRPO loss over stored SDE transitions (ALGORITHMS §3). Pure tensor math.

For each stored transition n (one SDE step of one turn of one trajectory), with
r_n = exp(logp_θ − logp_old) and A_n clipped to ±A_max:

    L = Σ_n w_n·max(−A_n·r_n, −A_n·clip(r_n, 1 − ε, 1 + ε)) / Σ_n w_n  +  β·KL

KL = ‖μ_θ − μ_ref‖² / (2·(std·sqrt(−dt))²), averaged over the non-batch axes like the
log-prob (:func:`editrl.sampling.kl_between_means`). The log-probs come from
:func:`editrl.sampling.sde_step_with_logprob`; the per-transition advantage is the turn's
advantage from :mod:`editrl.rl.advantages` repeated over the turn's stored steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sampling import kl_between_means

__all__ = ["grpo_loss", "transition_kl"]


def grpo_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, clip_range: float, adv_clip: float = 5.0,
              kl: Tensor | None = None, beta: float = 0.0,
              weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient surrogate of Flow-GRPO -> (scalar loss, stats).

    logp [N] (with gradient), logp_old [N] (rollout policy; detached here), adv [N],
    kl [N] per-transition KL to the reference (with gradient), weight [N] >= 0. Any shape
    is accepted as long as all given tensors share it; every reduction runs over all of it.

    * Advantages are clipped to ±adv_clip before use (Flow-GRPO A_max = 5).
    * ``weight`` is the sample mask: the loss and the KL term are weighted means
      Σ w·ℓ / Σ w, i.e. for a 0/1 mask the mean over entries with weight > 0 — masked
      transitions neither contribute nor dilute the mean. Every stat is taken over entries
      with weight > 0. With no active entry the loss is 0 with a zero gradient (still
      connected to logp) and the stats only report ``n_active`` = 0.
    * The total is policy + β·KL (added only when ``kl`` is given and β != 0).

    stats: policy_loss, kl_mean (when kl given), clip_frac (share of |r − 1| > ε),
    ratio_mean, ratio_max, approx_kl (½·mean (logp − logp_old)², as Flow-GRPO logs it),
    n_active.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0; got {clip_range}")
    if not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0; got {adv_clip}")
    shape = logp.shape
    for name, t in (("logp_old", logp_old), ("adv", adv), ("kl", kl), ("weight", weight)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal logp shape {tuple(shape)}")
    logp = logp.to(torch.float32)  # [N]
    logp_old = logp_old.detach().to(torch.float32)  # [N]
    a = adv.detach().to(torch.float32).clamp(-adv_clip, adv_clip)  # [N]
    if weight is None:
        w = torch.ones_like(logp)  # [N]
    else:
        w = weight.detach().to(torch.float32)  # [N]
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError("weight must be finite and >= 0")

    active = w > 0  # [N]
    zero = torch.zeros_like(logp)  # [N]
    # masked entries are replaced before any arithmetic, so whatever they hold (even
    # inf/nan) reaches neither the loss nor the gradient
    a = torch.where(active, a, zero)  # [N]
    log_ratio = torch.where(active, logp - logp_old, zero)  # [N]
    ratio = torch.exp(log_ratio)  # [N]
    unclipped = -a * ratio  # [N]
    clipped = -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # [N]
    per = torch.maximum(unclipped, clipped)  # [N]

    wsum = w.sum()  # []
    n_active = int(active.sum())
    if n_active == 0:
        loss = (per * 0.0).sum()  # []  zero, with a (zero) gradient path to logp
        return loss, {"n_active": 0.0}

    policy = (per * w).sum() / wsum  # []
    loss = policy  # []
    stats: dict[str, float] = {"policy_loss": float(policy.detach())}
    if kl is not None:
        kl_mean = (torch.where(active, kl.to(torch.float32), zero) * w).sum() / wsum  # []
        if beta != 0.0:
            loss = loss + beta * kl_mean  # []
        stats["kl_mean"] = float(kl_mean.detach())

    with torch.no_grad():
        r_act = ratio[active]  # [n_active]
        stats["clip_frac"] = float(((r_act - 1.0).abs() > clip_range).float().mean())
        stats["ratio_mean"] = float(r_act.mean())
        stats["ratio_max"] = float(r_act.max())
        stats["approx_kl"] = float(0.5 * (log_ratio[active] ** 2).mean())
        stats["n_active"] = float(n_active)
    return loss, stats


def transition_kl(mean: Tensor, mean_ref: Tensor, std: Tensor | float,
                  dt: Tensor | float | None = None) -> Tensor:
    """KL(N(μ_θ, s²) ‖ N(μ_ref, s²)) per transition -> [N], averaged over non-batch axes.

    mean, mean_ref: [N, ...] the SDE means of the policy and of the reference model for
    the same x_i. ``std`` is the *transition* std s = std_i·sqrt(−dt) (``SDEStep.std`` or
    ``Transitions.std``) when ``dt`` is None; with ``dt`` (σ_{i+1} − σ_i < 0) it is the
    per-unit-time std_i of :func:`editrl.sampling.sde_std` and s = std_i·sqrt(−dt). A
    per-transition std may be given as [N] and is reshaped to [N, 1, ...]. Delegates to
    :func:`editrl.sampling.kl_between_means`.
    """
    def per_sample(t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=mean.device)  # [], [N] or [N,1,1,1]
        if t.ndim == 1 and mean.ndim > 1:
            t = t.reshape(-1, *([1] * (mean.ndim - 1)))  # [N,1,1,1]
        return t

    s = per_sample(std)  # [N,1,1,1] or []
    if dt is not None:
        d = per_sample(dt)  # [N,1,1,1] or []
        if bool((d >= 0).any()):
            raise ValueError("dt = σ_next − σ must be < 0")
        s = s * torch.sqrt(-d)  # [N,1,1,1]
    return kl_between_means(mean, mean_ref, s)  # [N]
