"""Closed-form and cross checks for editrl.sampling (ALGORITHMS §1-3)."""

from __future__ import annotations

import math

import pytest
import torch

from editrl.sampling import (
    SDEStep,
    gaussian_log_prob,
    kl_between_means,
    ode_step,
    sample_sde_window,
    sde_mask,
    sde_std,
    sde_step_with_logprob,
    sigma_schedule,
)

B, C, H, W = 4, 3, 5, 5


def _xv(seed: int = 0, dtype=torch.float32, shape=(B, C, H, W)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return x, v


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.ndim))


# ----------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("shift", [1.0, 0.3, 3.0, 7.5])
@pytest.mark.parametrize("n", [1, 2, 10, 50])
def test_schedule_endpoints_monotone(n, shift):
    s = sigma_schedule(n, shift)
    assert s.dtype == torch.float32 and s.shape == (n + 1,)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all())


def test_schedule_linear_and_shift_closed_form():
    n = 10
    lin = 1.0 - torch.arange(n + 1, dtype=torch.float64) / n
    assert torch.allclose(sigma_schedule(n), lin.float(), atol=1e-7, rtol=0)
    for shift in (0.5, 3.0):
        want = shift * lin / (1 + (shift - 1) * lin)
        assert torch.allclose(sigma_schedule(n, shift), want.float(), atol=1e-6, rtol=0)
    # shift > 1 spends longer at high noise, shift < 1 at low noise
    mid = slice(1, n)
    assert bool((sigma_schedule(n, 3.0)[mid] > sigma_schedule(n)[mid]).all())
    assert bool((sigma_schedule(n, 0.5)[mid] < sigma_schedule(n)[mid]).all())


@pytest.mark.parametrize("bad", [dict(num_steps=0), dict(num_steps=-3), dict(num_steps=2.0),
                                 dict(num_steps=3, shift=0.0), dict(num_steps=3, shift=-1.0),
                                 dict(num_steps=3, shift=float("nan"))])
def test_schedule_validation(bad):
    with pytest.raises(ValueError):
        sigma_schedule(**bad)


# ----------------------------------------------------------------------------- ODE / SDE

def test_ode_step_closed_form_and_per_sample_sigma():
    x, v = _xv()
    assert torch.equal(ode_step(x, v, 0.8, 0.6), x + v * (torch.tensor(0.6) - torch.tensor(0.8)))
    sig = torch.tensor([1.0, 0.9, 0.5, 0.2])
    nxt = torch.tensor([0.9, 0.5, 0.2, 0.0])
    out = ode_step(x, v, sig, nxt)
    for b in range(B):
        assert torch.equal(out[b : b + 1], ode_step(x[b : b + 1], v[b : b + 1], sig[b].item(), nxt[b].item()))


@pytest.mark.parametrize("sig,nxt", [(1.0, 0.9), (0.5, 0.3), (0.1, 0.0)])
def test_noise_level_zero_is_ode_exactly(sig, nxt):
    x, v = _xv(1)
    g = torch.Generator().manual_seed(0)
    step = sde_step_with_logprob(x, v, sig, nxt, noise_level=0.0, generator=g)
    ode = ode_step(x, v, sig, nxt)
    assert torch.equal(step.prev_sample, ode)
    assert torch.equal(step.mean, ode)
    assert torch.equal(step.log_prob, torch.zeros(B))
    assert torch.equal(step.std, torch.zeros(B, 1, 1, 1))
    # stored transition under a = 0: returned unchanged, log_prob zeros
    stored = sde_step_with_logprob(x, v, sig, nxt, noise_level=0.0, prev_sample=x)
    assert torch.equal(stored.prev_sample, x) and torch.equal(stored.log_prob, torch.zeros(B))


def test_mean_closed_form_and_std():
    x, v = _xv(2)
    sig, nxt, a = 0.6, 0.45, 0.9
    step = sde_step_with_logprob(x, v, sig, nxt, noise_level=a, generator=torch.Generator().manual_seed(1))
    std_dev = a * math.sqrt(sig / (1 - sig))
    dt = nxt - sig
    mu = x + (v + std_dev**2 / (2 * sig) * (x + (1 - sig) * v)) * dt
    assert torch.allclose(step.mean, mu, atol=1e-6, rtol=1e-6)
    assert step.std.shape == (B, 1, 1, 1)
    assert torch.allclose(step.std, torch.full((B, 1, 1, 1), std_dev * math.sqrt(-dt)), atol=1e-7)
    assert isinstance(step, SDEStep) and step.log_prob.shape == (B,)


@pytest.mark.parametrize("sig,nxt", [(1.0, 0.9), (0.7, 0.6), (0.1, 0.0)])
def test_log_prob_matches_torch_normal(sig, nxt):
    x, v = _xv(3)
    step = sde_step_with_logprob(x, v, sig, nxt, generator=torch.Generator().manual_seed(2))
    ref = torch.distributions.Normal(step.mean, step.std).log_prob(step.prev_sample).mean(_dims(x))
    assert torch.allclose(step.log_prob, ref, atol=1e-5, rtol=0)
    # and the helper alone
    assert torch.allclose(gaussian_log_prob(step.prev_sample, step.mean, step.std), ref, atol=1e-5, rtol=0)


def test_explicit_noise_and_generator_reproducible():
    x, v = _xv(4)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    step = sde_step_with_logprob(x, v, 0.5, 0.4, noise=eps)
    assert torch.equal(step.prev_sample, step.mean + step.std * eps)
    want = (-(eps**2) / 2 - torch.log(step.std) - 0.5 * math.log(2 * math.pi)).mean(_dims(x))
    assert torch.allclose(step.log_prob, want, atol=1e-5, rtol=0)
    s1 = sde_step_with_logprob(x, v, 0.5, 0.4, generator=torch.Generator().manual_seed(5))
    s2 = sde_step_with_logprob(x, v, 0.5, 0.4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1.prev_sample, s2.prev_sample)


@pytest.mark.parametrize("sig,nxt", [(1.0, 0.9), (0.5, 0.4), (0.2, 0.0)])
def test_recompute_stored_transition_ratio_exactly_one(sig, nxt):
    x, v = _xv(5)
    old = sde_step_with_logprob(x, v, sig, nxt, generator=torch.Generator().manual_seed(3))
    new = sde_step_with_logprob(x.clone(), v.clone(), sig, nxt, prev_sample=old.prev_sample.clone())
    assert torch.equal(new.prev_sample, old.prev_sample)
    assert torch.equal(new.log_prob, old.log_prob)
    assert torch.equal(torch.exp(new.log_prob - old.log_prob), torch.ones(B))
    # a different velocity (another policy) gives a different probability
    other = sde_step_with_logprob(x, v + 0.05, sig, nxt, prev_sample=old.prev_sample)
    assert bool((torch.exp(other.log_prob - old.log_prob) != 1).all())


def test_log_prob_gradient_flows_to_v_only_through_mean():
    x, v = _xv(6)
    old = sde_step_with_logprob(x, v, 0.5, 0.4, generator=torch.Generator().manual_seed(0))
    v2 = v.clone().requires_grad_(True)
    lp = sde_step_with_logprob(x, v2, 0.5, 0.4, prev_sample=old.prev_sample).log_prob
    lp.sum().backward()
    assert v2.grad is not None and torch.isfinite(v2.grad).all() and v2.grad.abs().sum() > 0


def test_empirical_moments_match():
    n = 40000
    x0, v0 = _xv(7, shape=(1, 3))
    x, v = x0.expand(n, 3), v0.expand(n, 3)
    step = sde_step_with_logprob(x, v, 0.7, 0.55, noise_level=1.0, generator=torch.Generator().manual_seed(11))
    emp_mean = step.prev_sample.mean(0)
    emp_std = step.prev_sample.std(0)
    std = step.std[0, 0].item()
    assert torch.allclose(emp_mean, step.mean[0], atol=5 * std / math.sqrt(n))
    assert torch.allclose(emp_std, torch.full((3,), std), rtol=0.03)


def test_sigma_one_first_step_finite_and_convention():
    s = sigma_schedule(10)
    x, v = _xv(8)
    step = sde_step_with_logprob(x, v, s[0], s[1], noise_level=0.7, generator=torch.Generator().manual_seed(0))
    for t in step:
        assert torch.isfinite(t).all()
    # Flow-GRPO convention: std_0 = a * sqrt(1 / (1 - sigma_1))
    want_std0 = 0.7 * math.sqrt(1.0 / (1.0 - s[1].item()))
    assert sde_std(1.0, s[1].item(), 0.7) == pytest.approx(want_std0, rel=1e-6)
    assert sde_std(1.0, 0.5, 0.7, sigma_max_fallback=0.9) == pytest.approx(0.7 * math.sqrt(10.0), rel=1e-6)
    assert step.std[0].item() == pytest.approx(want_std0 * math.sqrt(s[0].item() - s[1].item()), rel=1e-5)
    # one-step schedule (sigma_1 = 0): still finite
    one = sde_step_with_logprob(x, v, 1.0, 0.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(t).all() for t in one)
    # away from sigma = 1 the plain formula
    assert sde_std(0.5, 0.4, 0.7) == pytest.approx(0.7, rel=1e-6)


def test_per_sample_sigmas_match_scalar_calls():
    x, v = _xv(9)
    sig = torch.tensor([1.0, 0.8, 0.5, 0.1])
    nxt = torch.tensor([0.9, 0.6, 0.4, 0.0])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    fb = torch.full((B,), 0.9)
    batched = sde_step_with_logprob(x, v, sig, nxt, noise=eps, sigma_max_fallback=fb)
    for b in range(B):
        one = sde_step_with_logprob(x[b : b + 1], v[b : b + 1], sig[b].item(), nxt[b].item(),
                                    noise=eps[b : b + 1], sigma_max_fallback=0.9)
        assert torch.allclose(batched.prev_sample[b : b + 1], one.prev_sample, atol=1e-6)
        assert torch.allclose(batched.log_prob[b : b + 1], one.log_prob, atol=1e-6)


@pytest.mark.parametrize("sig,nxt", [(0.0, 0.0), (0.5, 0.5), (0.5, 0.6), (1.2, 0.9), (0.5, -0.1)])
def test_sde_sigma_validation(sig, nxt):
    x, v = _xv()
    with pytest.raises(ValueError):
        sde_step_with_logprob(x, v, sig, nxt)


def test_sde_argument_validation():
    x, v = _xv()
    with pytest.raises(ValueError):
        sde_step_with_logprob(x, v, 0.5, 0.4, prev_sample=x, noise=x)
    with pytest.raises(ValueError):
        sde_step_with_logprob(x, v, 0.5, 0.4, noise_level=-0.1)
    with pytest.raises(ValueError):
        sde_step_with_logprob(x, v[:, :1], 0.5, 0.4)
    with pytest.raises(ValueError):
        sde_step_with_logprob(x, v, torch.full((B + 1,), 0.5), 0.4)
    with pytest.raises(ValueError):
        sde_std(0.0, 0.0, 0.7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_outputs_float32(dtype):
    x, v = _xv(10, dtype=dtype)
    sig = torch.tensor([0.9, 0.5, 0.5, 0.3], dtype=dtype)
    nxt = torch.tensor([0.7, 0.25, 0.25, 0.0], dtype=dtype)
    assert ode_step(x, v, sig, nxt).dtype == torch.float32
    for a in (0.0, 0.7):
        step = sde_step_with_logprob(x, v, sig, nxt, noise_level=a, generator=torch.Generator().manual_seed(0))
        assert all(t.dtype == torch.float32 for t in step)
        again = sde_step_with_logprob(x, v, sig, nxt, noise_level=a, prev_sample=step.prev_sample.to(dtype))
        assert all(t.dtype == torch.float32 for t in again)
    assert sde_std(sig, nxt, 0.7).dtype == torch.float32
    assert gaussian_log_prob(x, v, torch.tensor(0.5, dtype=dtype)).dtype == torch.float32
    assert kl_between_means(x, v, torch.tensor(0.5, dtype=dtype)).dtype == torch.float32
    assert sigma_schedule(4, 3.0).dtype == torch.float32


# ----------------------------------------------------------------------------- KL

def test_kl_zero_and_closed_form():
    x, _ = _xv(11)
    std = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(B, 1, 1, 1)
    assert torch.equal(kl_between_means(x, x.clone(), std), torch.zeros(B))
    c = 0.05
    kl = kl_between_means(x + c, x, std)
    assert torch.allclose(kl, c**2 / (2 * std.view(B) ** 2), rtol=1e-4)
    y = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(x, std.expand_as(x)), torch.distributions.Normal(y, std.expand_as(x))
    ).mean(_dims(x))
    assert torch.allclose(kl_between_means(x, y, std), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- windows

def test_window_range_and_batch_diversity():
    g = torch.Generator().manual_seed(0)
    for t, w in [(10, 2), (10, 1), (12, 5), (10, 10), (10, 0)]:
        starts = sample_sde_window(t, w, 64, g)
        assert starts.dtype == torch.long and starts.shape == (64,)
        assert int(starts.min()) >= 0 and int(starts.max()) <= t - w
    starts = sample_sde_window(10, 2, 64, torch.Generator().manual_seed(1))
    assert len(set(starts.tolist())) > 1


def test_window_reproducible_and_fresh_per_call():
    g1, g2 = torch.Generator().manual_seed(123), torch.Generator().manual_seed(123)
    a1, b1 = sample_sde_window(10, 3, 64, g1), sample_sde_window(10, 3, 64, g1)
    a2, b2 = sample_sde_window(10, 3, 64, g2), sample_sde_window(10, 3, 64, g2)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)  # successive calls draw new windows (no internal reseed)


def test_sde_mask():
    g = torch.Generator().manual_seed(0)
    for t, w in [(10, 2), (10, 1), (7, 7), (10, 0)]:
        starts = sample_sde_window(t, w, 32, g)
        m = sde_mask(starts, w, t)
        assert m.dtype == torch.bool and m.shape == (32, t)
        assert torch.equal(m.sum(1), torch.full((32,), w))
        for b in range(32):
            s = int(starts[b])
            assert m[b, s : s + w].all() and not m[b, :s].any() and not m[b, s + w :].any()
    assert sde_mask(torch.zeros(3, dtype=torch.long), 10, 10).all()
    assert not sde_mask(torch.tensor([0, 5, 10]), 0, 10).any()


def test_window_validation():
    g = torch.Generator().manual_seed(0)
    for args in [(0, 0, 4), (10, 11, 4), (10, -1, 4), (10, 2, 0)]:
        with pytest.raises(ValueError):
            sample_sde_window(*args, g)
    with pytest.raises(ValueError):
        sample_sde_window(10, 2, 4, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sde_mask(torch.tensor([9]), 2, 10)  # window would run past the last step
    with pytest.raises(ValueError):
        sde_mask(torch.tensor([-1]), 2, 10)
    with pytest.raises(ValueError):
        sde_mask(torch.tensor([0.0]), 2, 10)
    with pytest.raises(ValueError):
        sde_mask(torch.tensor([0]), 11, 10)


def test_randn_draws_on_the_generators_device_and_moves_the_noise():
    """`randn` (initial and SDE noise): the seeded CPU generator's own draws, then moved, so a
    seed gives the same noise on any device; the SDE step's noise is that draw."""
    from editrl.sampling import randn

    a = randn((2, 3, 4, 4), torch.Generator().manual_seed(7), "cpu")
    assert a.dtype == torch.float32 and torch.equal(a, torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7)))
    if torch.cuda.is_available():
        assert torch.equal(randn((2, 3, 4, 4), torch.Generator().manual_seed(7), "cuda").cpu(), a)
    x, v = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    st = sde_step_with_logprob(x, v, 0.5, 0.4, noise_level=0.7, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(st.prev_sample, st.mean + st.std * a)
