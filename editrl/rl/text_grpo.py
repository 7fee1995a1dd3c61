"""Token-level GRPO for the intent policy (Edit-R2's text objective, ALGORITHMS §8). Pure math.

Each sampled reconstruction y = (y_1..y_T) of turn k of trajectory g gets that turn's
advantage A (the same one the image samples of the turn get). Per token:

    r_t = exp(log π_θ(y_t | y_<t, x) − log π_old(y_t | y_<t, x))
    ℓ_t = max(−A·r_t, −A·clip(r_t, 1 − ε, 1 + ε))

L_text = Σ_{i,t} m_{i,t}·ℓ_{i,t} / Σ_{i,t} m_{i,t}  (a token-level mean over every valid token
of the batch, so long and short texts weigh by their tokens), optionally + β·KL to a
reference policy (the k3 estimator exp(q − p) − (q − p) − 1 per token, q = log π_ref). The
joint objective is L = L_image + λ_text·L_text.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["text_grpo_loss"]


def text_grpo_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, mask: Tensor, clip_range: float = 0.2,
                   adv_clip: float = 5.0, logp_ref: Tensor | None = None,
                   beta: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """logp [B, T] (with gradient) and logp_old [B, T] per-token log-probs, adv [B] (one per
    sequence), mask [B, T] (1 for the sequence's tokens incl. its end token, 0 for padding
    and for masked samples). Returns (scalar loss, stats: policy_loss, ratio_mean,
    ratio_max, clip_frac, kl_ref (when given), n_tokens)."""
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0; got {clip_range}")
    if logp.shape != logp_old.shape or logp.shape != mask.shape or adv.shape != logp.shape[:1]:
        raise ValueError(f"shapes: logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)}, "
                         f"mask {tuple(mask.shape)}, adv {tuple(adv.shape)} (expected [B, T], [B, T], [B, T], [B])")
    m = mask.detach().to(torch.float32)                                                    # [B, T]
    n = m.sum()
    lp = logp.to(torch.float32)
    a = adv.detach().to(torch.float32).clamp(-adv_clip, adv_clip)[:, None]                # [B, 1]
    log_ratio = (lp - logp_old.detach().to(torch.float32)) * m                             # [B, T]
    ratio = torch.exp(log_ratio)
    per_tok = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range))  # [B, T]
    if float(n) == 0:
        return (lp * 0.0).sum(), {"n_tokens": 0}
    loss = (per_tok * m).sum() / n
    stats = {"policy_loss": float(loss.detach()), "n_tokens": int(n)}
    with torch.no_grad():
        valid = m > 0
        r = ratio[valid]
        stats.update(ratio_mean=float(r.mean()), ratio_max=float(r.max()),
                     clip_frac=float(((r - 1).abs() > clip_range).float().mean()))
    if logp_ref is not None:
        d = (logp_ref.detach().to(torch.float32) - lp) * m                                # q − p
        kl = ((torch.exp(d) - d - 1) * m).sum() / n
        stats["kl_ref"] = float(kl.detach())
        if beta:
            loss = loss + beta * kl
    return loss, stats
