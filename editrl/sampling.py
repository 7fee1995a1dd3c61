"""Flow-matching sampling math: σ schedule, Euler ODE step, Flow-GRPO SDE step with
log-probability, windowed SDE, and the equal-std Gaussian KL (ALGORITHMS §1-3).

Pure functions with no model knowledge and no file system. Every function casts its
tensor inputs to float32 and returns float32 (bf16 overflows in the SDE mean; Flow-GRPO
computes in float32 too).

Axes: B batch, C,H,W image/latent, T denoising steps. Image-like tensors may have any
rank >= 1 whose first axis is B; per-sample scalars (σ, std) are reshaped to
[B, 1, ..., 1] so they broadcast against them.

Conventions (see the individual docstrings for the details):

* σ = 1 is pure noise, σ = 0 clean; a schedule runs σ_0 = 1 > σ_1 > ... > σ_T = 0 and
  dt = σ_{i+1} − σ_i < 0.
* SDE std at σ = 1 (where σ / (1 − σ) divides by zero) follows Flow-GRPO's public code
  exactly: only the denominator uses σ_1, i.e. std_0 = a·sqrt(1 / (1 − σ_1)).
* ``noise_level = 0`` makes the SDE step the ODE step bit for bit; its log-prob is
  undefined (a Dirac) and is returned as zeros of shape [B] with no gradient.
* Log-probs are averaged (not summed) over the non-batch axes, as Flow-GRPO does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SDEStep",
    "sigma_schedule",
    "ode_step",
    "sde_std",
    "sde_step_with_logprob",
    "gaussian_log_prob",
    "kl_between_means",
    "sample_sde_window",
    "sde_mask",
]

ScalarOrTensor = float | Tensor

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- helpers

def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Standard normal float32 noise of `shape` on `device`, drawn from `generator` on the
    generator's own device (editrl's seeded generators live on the CPU) and then moved: the
    same seed gives the same noise on every device."""
    src = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=src).to(device)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_batched(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have a leading batch axis, got a 0-d tensor")


def _per_sample(name: str, s: ScalarOrTensor, x: Tensor) -> Tensor:
    """σ-like value -> float32 tensor of shape [B|1, 1, ..., 1] with x.ndim axes."""
    t = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    batch = x.shape[0]
    if t.ndim == 0:
        return t.reshape([1] * x.ndim)  # [1,1,...]
    if t.ndim == 1 and t.shape[0] in (1, batch):
        return t.reshape(-1, *([1] * (x.ndim - 1)))  # [B,1,...]
    if t.ndim == x.ndim and t.shape[0] in (1, batch) and all(d == 1 for d in t.shape[1:]):
        return t  # [B,1,...]
    raise ValueError(
        f"{name} must be a float, a 0-d tensor, a [B] tensor or a [B,1,...,1] tensor "
        f"with B={batch}; got shape {tuple(t.shape)} for an input of shape {tuple(x.shape)}"
    )


def _mean_nonbatch(t: Tensor) -> Tensor:
    """[B, ...] -> [B]: mean over every axis but the first (identity for [B])."""
    return t.reshape(t.shape[0], -1).mean(dim=1)  # [B]


def _check_sigmas(sigma: Tensor, sigma_next: Tensor) -> None:
    """One host sync: 0 < σ <= 1 and 0 <= σ_next < σ elementwise."""
    bad = (sigma <= 0) | (sigma > 1) | (sigma_next < 0) | (sigma_next >= sigma)  # broadcast
    if bool(bad.any()):
        if bool((sigma <= 0).any()):
            raise ValueError(
                "sigma must be > 0 for an SDE step: the drift divides by σ "
                "(σ = 0 is the end of sampling, there is no step from it)"
            )
        if bool((sigma > 1).any()):
            raise ValueError("sigma must be <= 1 (σ = 1 is pure noise)")
        if bool((sigma_next < 0).any()):
            raise ValueError("sigma_next must be >= 0")
        raise ValueError("sigma_next must be < sigma (sampling goes from noise to data, dt < 0)")


# --------------------------------------------------------------------------- schedule

def sigma_schedule(num_steps: int, shift: float = 1.0) -> Tensor:
    """σ_0 = 1 > σ_1 > ... > σ_T = 0 (T = num_steps), linear in i, then time-shifted.

    The SD3/FLUX shift is σ' = shift·σ / (1 + (shift − 1)·σ); shift = 1 is the identity,
    shift > 1 spends more steps at high noise. Computed in float64, returned float32 with
    the endpoints set to exactly 1 and 0. Returns Tensor[T+1].
    """
    _check_int("num_steps", num_steps, 1)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)):
        raise ValueError(f"shift must be a positive float, got {shift!r}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite float > 0, got {shift}")
    sig = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)  # [T+1]
    if shift != 1.0:
        sig = shift * sig / (1.0 + (shift - 1.0) * sig)  # [T+1]
    sig = sig.to(torch.float32)  # [T+1]
    sig[0] = 1.0
    sig[-1] = 0.0
    return sig


# --------------------------------------------------------------------------- ODE step

def ode_step(x: Tensor, v: Tensor, sigma: ScalarOrTensor, sigma_next: ScalarOrTensor) -> Tensor:
    """Euler step of the probability-flow ODE: x_next = x + v·(σ_next − σ).

    x, v: [B, ...]; sigma, sigma_next: float, 0-d, [B] or [B,1,...,1]. Returns [B, ...].
    """
    _check_batched("x", x)
    x = _f32(x)  # [B,C,H,W]
    v = _f32(v)  # [B,C,H,W]
    s = _per_sample("sigma", sigma, x)  # [B,1,1,1]
    s_next = _per_sample("sigma_next", sigma_next, x)  # [B,1,1,1]
    dt = s_next - s  # [B,1,1,1]
    return x + v * dt  # [B,C,H,W]


# --------------------------------------------------------------------------- SDE step

def sde_std(
    sigma: ScalarOrTensor,
    sigma_next: ScalarOrTensor,
    noise_level: float = 0.7,
    sigma_max_fallback: ScalarOrTensor | None = None,
) -> Tensor:
    """Flow-GRPO diffusion coefficient std_i = a·sqrt(σ / (1 − σ)), a = noise_level.

    This is the per-unit-time std; the transition std is std_i·sqrt(−dt).

    σ = 1 convention (exactly Flow-GRPO's public code): where σ == 1 the *denominator*
    uses σ_1 instead, std = a·sqrt(σ / (1 − σ_1)) = a·sqrt(1 / (1 − σ_1)); the numerator
    keeps σ = 1. σ_1 is ``sigma_max_fallback`` when given, else ``sigma_next`` (σ = 1 only
    occurs at a schedule's first step, whose σ_next is σ_1, so the default is right for
    any schedule from :func:`sigma_schedule`). Keeping Flow-GRPO's exact value keeps our
    noise scale, log-probs and clip ranges comparable with the published hyper-parameters
    (replacing σ in the numerator as well would give a·sqrt(σ_1 / (1 − σ_1)), smaller by
    a factor sqrt(σ_1), about 5 % at T = 10).

    Inputs broadcast against each other; returns float32.
    """
    a = float(noise_level)
    if not math.isfinite(a) or a < 0:
        raise ValueError(f"noise_level must be a finite float >= 0, got {noise_level}")
    s = torch.as_tensor(sigma, dtype=torch.float32)  # [B,1,1,1] or scalar
    fb_src = sigma_next if sigma_max_fallback is None else sigma_max_fallback
    fb = torch.as_tensor(fb_src, dtype=torch.float32, device=s.device)  # [B,1,1,1] or scalar
    if bool(((s <= 0) | (s > 1)).any()):
        raise ValueError("sigma must lie in (0, 1] for the SDE std")
    _check_fallback(s, fb)
    return _sde_std(s, fb, a)  # [B,1,1,1]


def _check_fallback(s: Tensor, fb: Tensor) -> None:
    if bool(((s == 1) & ((fb < 0) | (fb >= 1))).any()):
        raise ValueError("the σ = 1 fallback (σ_1) must lie in [0, 1)")


def _sde_std(s: Tensor, fb: Tensor, a: float) -> Tensor:
    """sde_std without argument checks (the caller has done them)."""
    denom_sigma = torch.where(s == 1, fb, s)  # [B,1,1,1]
    return a * torch.sqrt(s / (1.0 - denom_sigma))  # [B,1,1,1]


class SDEStep(NamedTuple):
    """Result of :func:`sde_step_with_logprob` (all float32).

    prev_sample: x_{i+1}, [B, ...] (the sampled one, or the stored one passed in).
    log_prob:    [B], log N(x_{i+1}; mean, std²) averaged over the non-batch axes;
                 zeros (no gradient) when noise_level = 0.
    mean:        μ_i, [B, ...].
    std:         transition std std_i·sqrt(−dt), [B, 1, ..., 1]; zeros when noise_level = 0.
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def sde_step_with_logprob(
    x: Tensor,
    v: Tensor,
    sigma: ScalarOrTensor,
    sigma_next: ScalarOrTensor,
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    *,
    sigma_max_fallback: ScalarOrTensor | None = None,
) -> SDEStep:
    """One Flow-GRPO SDE step x_i -> x_{i+1} with its Gaussian log-probability.

    With dt = σ_next − σ < 0 and std_i = :func:`sde_std`:
        μ = x + [v + std_i²/(2σ)·(x + (1 − σ)·v)]·dt
        x_{i+1} = μ + std_i·sqrt(−dt)·ε,  ε ~ N(0, I)
        log_prob = mean over non-batch axes of log N(x_{i+1}; μ, (std_i·sqrt(−dt))²)

    Args:
        x, v: [B, ...] current sample and predicted velocity (any float dtype).
        sigma, sigma_next: float, 0-d, [B] or [B,1,...,1]; need 0 < σ <= 1 and
            0 <= σ_next < σ (σ = 0 raises ValueError: the drift divides by σ).
        noise_level: a >= 0. a = 0 returns the ODE step bit for bit (mean == prev_sample
            == :func:`ode_step`), std zeros and log_prob zeros of shape [B] (the transition
            is a Dirac, its density undefined; zeros carry no gradient). With a stored
            ``prev_sample`` and a = 0 that sample is returned unchanged, log_prob zeros.
        generator: drawn from for ε when neither ``prev_sample`` nor ``noise`` is given.
        prev_sample: a stored x_{i+1}: nothing is sampled and the log-prob of that
            transition under (x, v) is computed (training recomputes log p_θ this way;
            identical inputs give a bit-identical log_prob).
        noise: explicit ε of x's shape (cannot be combined with ``prev_sample``).
        sigma_max_fallback: σ_1 used in the std where σ == 1 (default: sigma_next).

    The log-prob differentiates through μ only (x_{i+1} is detached, as in Flow-GRPO).
    """
    _check_batched("x", x)
    if prev_sample is not None and noise is not None:
        raise ValueError("pass at most one of prev_sample (stored transition) and noise")
    x = _f32(x)  # [B,C,H,W]
    v = _f32(v)  # [B,C,H,W]
    if v.shape != x.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal x shape {tuple(x.shape)}")
    if prev_sample is not None:
        prev_sample = _f32(prev_sample)  # [B,C,H,W]
        if prev_sample.shape != x.shape:
            raise ValueError(
                f"prev_sample shape {tuple(prev_sample.shape)} must equal x shape {tuple(x.shape)}"
            )
    if noise is not None:
        noise = _f32(noise)  # [B,C,H,W]
        if noise.shape != x.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x shape {tuple(x.shape)}")
    a = float(noise_level)
    if not math.isfinite(a) or a < 0:
        raise ValueError(f"noise_level must be a finite float >= 0, got {noise_level}")

    s = _per_sample("sigma", sigma, x)  # [B,1,1,1]
    s_next = _per_sample("sigma_next", sigma_next, x)  # [B,1,1,1]
    _check_sigmas(s, s_next)
    batch_shape = (x.shape[0],) + (1,) * (x.ndim - 1)

    if a == 0.0:
        mean = ode_step(x, v, s, s_next)  # [B,C,H,W]
        out = mean if prev_sample is None else prev_sample  # [B,C,H,W]
        std = torch.zeros(batch_shape, dtype=torch.float32, device=x.device)  # [B,1,1,1]
        log_prob = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)  # [B]
        return SDEStep(out, log_prob, mean, std)

    dt = s_next - s  # [B,1,1,1]  (< 0)
    if sigma_max_fallback is None:
        fb = s_next  # [B,1,1,1]  (already checked to lie in [0, σ))
    else:
        fb = _per_sample("sigma_max_fallback", sigma_max_fallback, x)  # [B,1,1,1]
        _check_fallback(s, fb)
    std_dev = _sde_std(s, fb, a)  # [B,1,1,1]
    mean = x + (v + std_dev**2 / (2.0 * s) * (x + (1.0 - s) * v)) * dt  # [B,C,H,W]
    std = (std_dev * torch.sqrt(-dt)).expand(batch_shape).clone()  # [B,1,1,1]

    if prev_sample is None:
        if noise is None:
            noise = randn(x.shape, generator, x.device)  # [B,C,H,W]
        prev_sample = mean + std * noise  # [B,C,H,W]

    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)  # [B]
    return SDEStep(prev_sample, log_prob, mean, std)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: ScalarOrTensor) -> Tensor:
    """log N(x; mean, std²) elementwise, averaged over every non-batch axis -> [B].

    x, mean: [B, ...]; std broadcastable (e.g. [B,1,...,1]) and > 0 (not checked: a zero
    std gives ±inf/nan). Same formula as torch.distributions.Normal.log_prob.
    """
    _check_batched("x", x)
    x = _f32(x)  # [B,C,H,W]
    mean = _f32(torch.as_tensor(mean, device=x.device))  # [B,C,H,W]
    std = _f32(torch.as_tensor(std, device=x.device))  # [B,1,1,1]
    lp = -((x - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _HALF_LOG_2PI  # [B,C,H,W]
    return _mean_nonbatch(lp)  # [B]


def kl_between_means(mean_a: Tensor, mean_b: Tensor, std: ScalarOrTensor) -> Tensor:
    """KL(N(μ_a, std²) ‖ N(μ_b, std²)) = ‖μ_a − μ_b‖² / (2·std²), averaged over the
    non-batch axes like the log-prob (ALGORITHMS §3) -> [B].

    Pass the transition std (``SDEStep.std``). std must be > 0.
    """
    _check_batched("mean_a", mean_a)
    mean_a = _f32(mean_a)  # [B,C,H,W]
    mean_b = _f32(torch.as_tensor(mean_b, device=mean_a.device))  # [B,C,H,W]
    std = _f32(torch.as_tensor(std, device=mean_a.device))  # [B,1,1,1]
    kl = (mean_a - mean_b) ** 2 / (2.0 * std**2)  # [B,C,H,W]
    return _mean_nonbatch(kl)  # [B]


# --------------------------------------------------------------------------- windowed SDE

def sample_sde_window(
    num_steps: int, window: int, batch_size: int, generator: torch.Generator
) -> Tensor:
    """Per-sample start index of the SDE window, uniform in [0, num_steps − window].

    Drawn from ``generator`` (on its device) and never reseeded here, so successive calls
    give fresh windows and a run is reproducible from its seed. window = num_steps gives
    all zeros (every step SDE); window = 0 means pure ODE (starts are still drawn but mark
    nothing). Returns LongTensor[B].
    """
    _check_int("num_steps", num_steps, 1)
    _check_int("window", window, 0)
    _check_int("batch_size", batch_size, 1)
    if window > num_steps:
        raise ValueError(f"window ({window}) must be <= num_steps ({num_steps})")
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            "generator must be a torch.Generator (the run's seeded one); "
            f"got {type(generator).__name__}"
        )
    high = num_steps - window + 1
    return torch.randint(
        0, high, (batch_size,), generator=generator, device=generator.device, dtype=torch.long
    )  # [B]


def sde_mask(starts: Tensor, window: int, num_steps: int) -> Tensor:
    """BoolTensor[B, T]: True at steps starts[b] <= i < starts[b] + window (the SDE steps).

    Exactly ``window`` True per row; window = 0 gives all False (pure ODE).
    """
    _check_int("num_steps", num_steps, 1)
    _check_int("window", window, 0)
    if window > num_steps:
        raise ValueError(f"window ({window}) must be <= num_steps ({num_steps})")
    starts = torch.as_tensor(starts)  # [B]
    if starts.ndim != 1:
        raise ValueError(f"starts must be a 1-d [B] tensor, got shape {tuple(starts.shape)}")
    if starts.dtype.is_floating_point or starts.dtype.is_complex or starts.dtype == torch.bool:
        raise ValueError(f"starts must be an integer tensor, got {starts.dtype}")
    if starts.numel() and bool(((starts < 0) | (starts > num_steps - window)).any()):
        raise ValueError(f"starts must lie in [0, num_steps - window] = [0, {num_steps - window}]")
    steps = torch.arange(num_steps, device=starts.device)  # [T]
    st = starts.to(torch.long).unsqueeze(1)  # [B,1]
    return (steps >= st) & (steps < st + window)  # [B,T]
