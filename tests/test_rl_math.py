"""Hand-computed checks for editrl.rl: advantages (ALGORITHMS §6-7), Flow-GRPO loss (§3)
and DiffusionNFT loss (§4). Pure tensor math, CPU, a second or two in all."""

from __future__ import annotations

import math

import pytest
import torch

from editrl.rl import (
    REWARDS,
    AdvantageConfig,
    aggregate_turns,
    broadcast,
    compute_advantages,
    ema_update_,
    fuse,
    grpo_loss,
    group_filter,
    group_normalise,
    nft_loss,
    old_policy_decay,
    optimality_weight,
    per_turn_advantages,
    scores_from_verdicts,
    lineage_success,
    trajectory_filter,
    transition_kl,
    verdict_success,
)
from editrl.rl.rollout import choose_parents
from editrl.sampling import kl_between_means
from editrl.session import CheckResult, TurnVerdict

EPS = 1e-4
NAN = float("nan")
T, F = True, False


# ----------------------------------------------------------------------------- helpers

def _check(spec):
    """None -> not applicable; 'judge_error'; ('pass'|'fail', score)."""
    if spec is None:
        return CheckResult()
    if spec == "judge_error":
        return CheckResult(status="judge_error")
    status, score = spec
    return CheckResult(status=status, score=score)


def tv(sid, turn, IF=None, CC=None, GA=None, CU=None):
    return TurnVerdict(session_id=sid, turn=turn, IF=_check(IF), CC=_check(CC), GA=_check(GA), CU=_check(CU))


def ic(sid, turn, if_score, cc_score):
    """A verdict with IF and CC only, graded; pass iff score >= 0.5."""
    st = lambda s: "pass" if s >= 0.5 else "fail"  # noqa: E731
    return tv(sid, turn, IF=(st(if_score), if_score), CC=(st(cc_score), cc_score))


def norm(values):
    """(x − mean)/(pop std + eps) by hand, for a plain list."""
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / n)
    return [(v - m) / (sd + EPS) for v in values]


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol, rtol=tol, equal_nan=True)


W_IF_ONLY = [1.0, 0.0, 0.0, 0.0]
W_IF_CC = [0.5, 0.5, 0.0, 0.0]


# ----------------------------------------------------------------------------- verdicts -> scores

def test_scores_from_verdicts_binary_graded_masks_and_padding():
    v = [
        [  # session a, K = 2
            [tv("a", 1, IF=("pass", 0.9), CC=("fail", 0.4)), tv("a", 2, IF=("pass", 0.7), CU=("pass", 1.0))],
            [tv("a", 1, IF="judge_error", CC=("pass", 0.8)), None],
        ],
        [  # session b, K = 3
            [tv("b", 1, IF=("pass", 1.0), CC=("pass", 1.0)), tv("b", 2, IF=("fail", 0.0)),
             tv("b", 3, IF=("pass", 0.6), GA=("pass", 0.75))],
            [tv("b", 1, IF=("fail", 0.25)), tv("b", 2, IF=("pass", 1.0)), tv("b", 3, IF=("pass", 0.5))],
        ],
    ]
    g = scores_from_verdicts(v, "graded")
    b = scores_from_verdicts(v, "binary")
    assert g.score.shape == (2, 2, 3, 4) and g.score.dtype == torch.float32
    assert close(g.score[0, 0, 0], [0.9, 0.4, NAN, NAN])
    assert close(b.score[0, 0, 0], [1.0, 0.0, NAN, NAN])
    assert close(g.score[0, 0, 1], [0.7, NAN, NAN, 1.0])
    assert close(g.score[0, 1, 0], [NAN, 0.8, NAN, NAN])  # the errored IF has no value
    assert g.applicable[0, 1, 0].tolist() == [T, T, F, F]  # judge_error still "applies"
    assert g.present.tolist() == [[[T, T, F], [T, T, F]], [[T, T, T], [T, T, T]]]
    assert g.error.tolist() == [[[F, F, F], [T, T, F]], [[F, F, F], [F, F, F]]]
    assert g.missing.tolist() == [[[F, F, F], [F, T, F]], [[F, F, F], [F, F, F]]]
    assert g.success.tolist() == [[[F, T, F], [F, F, F]], [[T, F, T], [F, T, T]]]
    assert torch.isnan(g.score[0, :, 2]).all()  # absent turn: no value
    assert g.scored[0, 1].any().item() is False  # an errored or missing turn is never scored
    assert g.session_ids == ["a", "b"]


def test_scores_from_verdicts_rejects_bad_input():
    ok = tv("a", 1, IF=("pass", 1.0))
    with pytest.raises(ValueError, match="mixes sessions"):
        scores_from_verdicts([[[ok], [tv("b", 1, IF=("pass", 1.0))]]])
    with pytest.raises(ValueError, match="expected turn 2"):
        scores_from_verdicts([[[ok, tv("a", 3, IF=("pass", 1.0))]]])
    with pytest.raises(ValueError, match="different turn counts"):
        scores_from_verdicts([[[ok], [ok, tv("a", 2, IF=("pass", 1.0))]]])
    with pytest.raises(ValueError, match="graded scoring needs a score"):
        scores_from_verdicts([[[tv("a", 1, IF=("pass", None))]]], "graded")
    assert scores_from_verdicts([[[tv("a", 1, IF=("pass", None))]]], "binary").score[0, 0, 0, 0] == 1.0
    with pytest.raises(ValueError, match="G = 1"):
        scores_from_verdicts([[[ok]], [[ok], [ok]]])
    with pytest.raises(ValueError, match="scoring"):
        scores_from_verdicts([[[ok]]], "fuzzy")


# ----------------------------------------------------------------------------- aggregation

S = torch.tensor([[0.2, 0.8, NAN, 0.5]])  # [1, K=4]; turn 3 not applicable
V = torch.tensor([[T, T, F, T]])


@pytest.mark.parametrize("mode,expected", [
    ("mean", 0.5),
    ("min", 0.2),
    ("product", 0.2 * 0.8 * 0.5),
    ("last", 0.5),
    # γ = 0.5, last valid turn index 3: weights 0.125, 0.25, -, 1
    ("discounted", (0.125 * 0.2 + 0.25 * 0.8 + 1.0 * 0.5) / (0.125 + 0.25 + 1.0)),
])
def test_aggregate_modes_skip_inapplicable_turns(mode, expected):
    out = aggregate_turns(S, V, mode, gamma=0.5)
    assert out.shape == (1,) and close(out, [expected])


def test_aggregate_last_skips_trailing_missing_turns_and_nan_when_never_valid():
    s = torch.tensor([[0.2, 0.8, 0.3, NAN], [0.1, NAN, NAN, NAN], [NAN, NAN, NAN, NAN]])
    v = torch.tensor([[T, T, T, F], [T, F, F, F], [F, F, F, F]])
    assert close(aggregate_turns(s, v, "last"), [0.3, 0.1, NAN])
    for mode in ("mean", "min", "product", "discounted"):
        out = aggregate_turns(s, v, mode)
        assert torch.isnan(out[2]) and not torch.isnan(out[:2]).any()


def test_aggregate_success_gated():
    succ = torch.tensor([[T, F, T, T], [T, T, T, T], [F, T, T, T]])  # success is a turn property
    s = S.expand(3, 4)
    v = V.expand(3, 4)
    # gates Π_{j<=k} success_j: [1,0,0,0], [1,1,1,1], [0,0,0,0]; mean over the valid k = 0, 1, 3
    assert close(aggregate_turns(s, v, "success_gated", success=succ), [1 / 3, 1.0, 0.0])
    with pytest.raises(ValueError, match="success"):
        aggregate_turns(s, v, "success_gated")


def test_aggregate_discounted_equal_gamma_one_is_mean_and_batch_shapes():
    s = torch.rand(2, 3, 4)
    v = torch.rand(2, 3, 4) > 0.3
    v[..., 0] = True
    assert close(aggregate_turns(s, v, "discounted", gamma=1.0), aggregate_turns(s, v, "mean"))
    assert aggregate_turns(s, v, "min").shape == (2, 3)


# ----------------------------------------------------------------------------- normalisation

def test_group_normalise_masked_members_population_std():
    x = torch.tensor([[1.0, 2.0, 3.0, NAN], [1.0, 2.0, 3.0, 100.0]])
    valid = torch.tensor([[T, T, T, F], [T, T, T, F]])
    sd = math.sqrt(2 / 3)  # population std of 1, 2, 3
    expected = [-1 / (sd + EPS), 0.0, 1 / (sd + EPS), 0.0]
    out = group_normalise(x, valid)
    assert close(out[0], expected) and close(out[1], expected)  # masked value is irrelevant


def test_group_normalise_equal_members_and_lone_member_give_exact_zero():
    x = torch.tensor([[0.3, 0.3, 0.3], [0.7, NAN, NAN]])
    valid = torch.tensor([[T, T, T], [T, F, F]])
    out = group_normalise(x, valid)
    assert torch.equal(out, torch.zeros(2, 3))


def test_group_normalise_rejects_nan_in_valid_member():
    with pytest.raises(ValueError, match="NaN"):
        group_normalise(torch.tensor([[NAN, 1.0]]), torch.tensor([[T, T]]))


# ----------------------------------------------------------------------------- fusion

# A group where the two fusion levels disagree in sign: IF spreads over the whole [0, 1]
# range, CC only over 0.2. Reward-level fusion is dominated by IF, so trajectory c (lowest
# IF, best CC) is below the group mean; advantage-level fusion puts both rewards on the
# same within-group scale and c comes out above the mean, a below c.
IF3 = [1.0, 0.0, 0.0]
CC3 = [0.4, 0.5, 0.6]


def _R3():
    R = torch.full((1, 3, 4), NAN)
    R[0, :, 0] = torch.tensor(IF3)
    R[0, :, 1] = torch.tensor(CC3)
    return R, ~torch.isnan(R)


def test_fusion_levels_differ_in_sign_ordering():
    R, present = _R3()
    w = [0.3, 0.3, 0.2, 0.2]  # GA, CU absent for everyone -> IF, CC renormalised to 0.5 / 0.5
    a_rew = fuse(R, present, w, "reward")
    a_adv = fuse(R, present, w, "advantage")
    fused = [0.5 * i + 0.5 * c for i, c in zip(IF3, CC3)]  # 0.70, 0.25, 0.30
    assert close(a_rew[0], norm(fused))
    assert close(a_adv[0], [0.5 * i + 0.5 * c for i, c in zip(norm(IF3), norm(CC3))])
    a, b, c = a_rew[0].tolist()
    assert a > c > b and c < 0
    a, b, c = a_adv[0].tolist()
    assert c > a > b and c > 0


def test_fusion_drops_reward_not_present_for_every_valid_member():
    R, present = _R3()
    R2, p2 = R.clone(), present.clone()
    R2[0, :2, 2] = torch.tensor([0.9, 0.1])  # GA present for a, b only
    p2[0, :2, 2] = True
    for level in ("reward", "advantage"):
        assert close(fuse(R2, p2, [0.3, 0.3, 0.2, 0.2], level), fuse(R, present, [0.3, 0.3, 0.2, 0.2], level))
    # ... but enters when the member lacking it is not valid
    valid = torch.tensor([[T, T, F]])
    out = fuse(R2, p2, [0.25, 0.25, 0.5, 0.0], "reward", valid=valid)
    f = [0.25 * IF3[i] + 0.25 * CC3[i] + 0.5 * [0.9, 0.1][i] for i in range(2)]
    assert close(out[0], norm(f) + [0.0])


def test_fusion_no_usable_reward_gives_zero():
    R = torch.full((1, 2, 4), NAN)
    R[0, 0, 0] = 1.0  # IF only for member 0
    out = fuse(R, ~torch.isnan(R), [1.0, 1.0, 1.0, 1.0], "advantage", valid=torch.tensor([[T, T]]))
    assert torch.equal(out, torch.zeros(1, 2))


# ----------------------------------------------------------------------------- assignment

def test_broadcast_equals_tiling():
    A = torch.randn(2, 3)
    out = broadcast(A, 4)
    assert out.shape == (2, 3, 4)
    assert torch.equal(out, A.unsqueeze(-1).repeat(1, 1, 4))


def _turn_scores_if(values):
    """values [G][K] of IF -> turn_scores [1,G,K,4], scored mask, valid."""
    t = torch.full((1, len(values), len(values[0]), 4), NAN)
    t[0, :, :, 0] = torch.tensor(values)
    scored = ~torch.isnan(t)
    return t, scored, scored.any(-1)


def test_per_turn_turn_vs_session_normalisation():
    t, scored, valid = _turn_scores_if([[1.0, 0.5], [0.0, 0.5]])
    a_turn = per_turn_advantages(t, scored, valid, W_IF_ONLY, "reward", "turn")
    # turn 1: 1 vs 0 -> ±0.5/(0.5+eps); turn 2: equal -> 0
    assert close(a_turn[0], [[0.5 / (0.5 + EPS), 0.0], [-0.5 / (0.5 + EPS), 0.0]])
    a_sess = per_turn_advantages(t, scored, valid, W_IF_ONLY, "reward", "session")
    # all four samples pooled: mean 0.5, pop std sqrt(0.125)
    sd = math.sqrt(0.125)
    assert close(a_sess[0], [[0.5 / (sd + EPS), 0.0], [-0.5 / (sd + EPS), 0.0]])
    # with one reward the two fusion levels coincide
    assert close(per_turn_advantages(t, scored, valid, W_IF_ONLY, "advantage", "session"), a_sess)


def test_per_turn_invalid_sample_masked_and_excluded():
    t, scored, valid = _turn_scores_if([[1.0, 0.0], [0.0, 0.5], [0.5, 1.0]])
    valid[0, 2, 1] = False  # e.g. a judge error at turn 2 of trajectory 2
    a = per_turn_advantages(t, scored, valid, W_IF_ONLY, "advantage", "turn")
    assert close(a[0, :, 0], norm([1.0, 0.0, 0.5]))
    assert close(a[0, :, 1], norm([0.0, 0.5]) + [0.0])


# ----------------------------------------------------------------------------- filters

def test_trajectory_filter_zeros_turns_after_first_failure():
    A = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0], [5.0, 6.0, 7.0, 8.0]]])
    succ = torch.tensor([[[T, F, T, F], [F, T, T, T], [T, T, T, T]]])
    out, masked = trajectory_filter(A, succ)
    assert masked.tolist() == [[[F, F, T, T], [F, T, T, T], [F, F, F, F]]]
    assert out.tolist() == [[[1.0, 2.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [5.0, 6.0, 7.0, 8.0]]]
    assert int(masked.sum()) == 5
    # absent trailing turns are not counted
    present = torch.tensor([[[T, T, T, F], [T, T, F, F], [T, T, T, T]]])
    _, masked_p = trajectory_filter(A, succ, present)
    assert masked_p.tolist() == [[[F, F, T, F], [F, T, F, F], [F, F, F, F]]]


def test_group_filter_thresholds():
    R = torch.tensor([
        [0.5, 0.5, 0.5],      # std 0 -> masked
        [0.1, 0.5, 0.9],      # keep
        [0.8, 1.0, 1.0],      # mean 0.933 >= 0.9 -> masked
        [0.2, 0.26, 0.2],     # std 0.028 <= 0.05 -> masked
        [0.0, 1.0, NAN],      # keep (NaN member is invalid)
        [NAN, NAN, NAN],      # no valid member: no statistic, kept
    ])
    valid = ~torch.isnan(R)
    assert group_filter(R, valid).tolist() == [F, T, F, F, T, T]
    # exact boundaries (values exact in binary): std 0.0625, mean 0.5625
    R2 = torch.tensor([[0.5, 0.625]])
    v2 = torch.ones(1, 2, dtype=torch.bool)
    assert group_filter(R2, v2, std_min=0.0625, mean_max=1.0).tolist() == [F]  # std <= std_min
    assert group_filter(R2, v2, std_min=0.0624, mean_max=1.0).tolist() == [T]
    assert group_filter(R2, v2, std_min=0.0, mean_max=0.5625).tolist() == [F]  # mean >= mean_max
    assert group_filter(R2, v2, std_min=0.0, mean_max=0.5626).tolist() == [T]


# ----------------------------------------------------------------------------- compute_advantages

def _cfg(**kw):
    base = dict(weights={"IF": 0.5, "CC": 0.5}, trajectory_filter=False, group_filter=False, adv_clip=None)
    base.update(kw)
    return AdvantageConfig(**base)


def _session(sid, trajs):
    """trajs: list of [(IF, CC) | None | 'err'] per turn."""
    out = []
    for traj in trajs:
        row = []
        for k, t in enumerate(traj):
            if t is None:
                row.append(None)
            elif t == "err":
                row.append(tv(sid, k + 1, IF="judge_error", CC=("pass", 0.9)))
            else:
                row.append(ic(sid, k + 1, *t))
        out.append(row)
    return out


GROUP_A = [[(1.0, 0.8), (0.9, 0.7)], [(0.2, 0.9), (0.6, 0.6)], [(0.7, 0.5), (0.1, 0.9)]]
GROUP_B = [[(0.3, 0.3), (0.4, 0.4)], [(0.9, 0.9), (0.8, 0.2)], [(0.5, 0.1), (0.2, 0.6)]]


def test_compute_advantages_broadcast_by_hand():
    res = compute_advantages([_session("a", GROUP_A)], _cfg(fusion="reward"))
    fused = [0.5 * (t[0][0] + t[1][0]) / 2 + 0.5 * (t[0][1] + t[1][1]) / 2 for t in GROUP_A]
    assert close(res.fused[0], fused)
    assert close(res.A[0], [[a, a] for a in norm(fused)])
    assert res.mask.all()
    assert close(res.rewards[0, :, 0], [(t[0][0] + t[1][0]) / 2 for t in GROUP_A])
    assert torch.isnan(res.rewards[..., 2:]).all()  # GA, CU never apply: NaN, not 0
    s = res.stats
    assert s["reward/IF"] == pytest.approx(sum((t[0][0] + t[1][0]) / 2 for t in GROUP_A) / 3)
    assert "reward/GA" not in s and "reward/CU" not in s
    assert s["success/turn_1"] == pytest.approx(2 / 3)  # (0.2, 0.9) fails IF
    assert s["success/turn_2"] == pytest.approx(2 / 3)  # (0.1, 0.9) fails IF
    assert s["mask/trained_share"] == 1.0 and s["mask/absent_share"] == 0.0


def test_all_equal_rewards_give_zero_advantage():
    sess = _session("a", [[(0.6, 0.6), (0.6, 0.6)]] * 4)
    for assignment in ("broadcast", "per_turn"):
        for fusion in ("reward", "advantage"):
            res = compute_advantages([sess], _cfg(assignment=assignment, fusion=fusion))
            assert torch.equal(res.A, torch.zeros(1, 4, 2))
    res = compute_advantages([sess], _cfg(group_filter=True))
    assert res.keep.tolist() == [[F, F]] and not res.mask.any()
    assert res.stats["mask/group_filtered_share"] == 1.0 and res.stats["group/filtered_share"] == 1.0


@pytest.mark.parametrize("fusion", ["reward", "advantage"])
def test_judge_error_masks_trajectory_with_broadcast(fusion):
    bad = [GROUP_A[0], [GROUP_A[1][0], "err"], GROUP_A[2]]
    missing = [GROUP_A[0], GROUP_A[1], [GROUP_A[2][0], None]]
    cfg = _cfg(fusion=fusion)
    res = compute_advantages([_session("a", bad), _session("b", GROUP_B), _session("c", missing)], cfg)
    assert not torch.isnan(res.A).any()
    assert res.A[0, 1].tolist() == [0.0, 0.0] and res.mask[0, 1].tolist() == [F, F]
    assert res.A[2, 2].tolist() == [0.0, 0.0] and res.mask[2, 2].tolist() == [F, F]
    assert torch.isnan(res.rewards[0, 1]).all() and torch.isnan(res.fused[0, 1])  # no value made up
    # the others in the group are normalised among themselves only ...
    alone = compute_advantages([_session("a", [GROUP_A[0], GROUP_A[2]])], cfg)
    assert close(res.A[0, [0, 2]], alone.A[0])
    # ... and other groups are untouched
    assert close(res.A[1], compute_advantages([_session("b", GROUP_B)], cfg).A[0])
    s = res.stats
    assert s["count/judge_error_turns"] == 2.0 and s["count/missing_verdict_turns"] == 1.0
    assert s["mask/judge_error_share"] == pytest.approx(4 / 18)  # two whole trajectories of 2 turns
    assert s["mask/trained_share"] == pytest.approx(14 / 18)


@pytest.mark.parametrize("per_turn_norm", ["turn", "session"])
def test_per_turn_advantages_do_not_depend_on_turn_aggregation(per_turn_norm):
    """Turn aggregation shapes the trajectory reward; per-turn assignment never trains on it
    (which is why `editrl ablate` runs its aggregation study on broadcast assignment)."""
    sessions = [_session("a", GROUP_A), _session("b", GROUP_B)]
    res = {m: compute_advantages(sessions, _cfg(assignment="per_turn", per_turn_norm=per_turn_norm, group_filter=True,
                                                 trajectory_filter=True, aggregation=m))
           for m in ("mean", "min", "product", "last", "success_gated", "discounted")}
    for m, r in res.items():
        assert torch.equal(r.A, res["mean"].A) and torch.equal(r.mask, res["mean"].mask), m
    broadcast = {m: compute_advantages(sessions, _cfg(aggregation=m)).A for m in ("mean", "min", "last")}
    assert not torch.equal(broadcast["mean"], broadcast["min"]) and not torch.equal(broadcast["mean"], broadcast["last"])


def test_judge_error_masks_only_its_turn_per_turn():
    bad = [GROUP_A[0], [GROUP_A[1][0], "err"], GROUP_A[2]]
    cfg = _cfg(assignment="per_turn", per_turn_norm="turn", fusion="reward")
    res = compute_advantages([_session("a", bad), _session("b", GROUP_B)], cfg)
    assert res.mask[0].tolist() == [[T, T], [T, F], [T, T]]
    assert res.A[0, 1, 1] == 0.0
    f1 = [0.5 * t[0][0] + 0.5 * t[0][1] for t in GROUP_A]
    f2 = [0.5 * GROUP_A[g][1][0] + 0.5 * GROUP_A[g][1][1] for g in (0, 2)]
    assert close(res.A[0, :, 0], norm(f1))
    assert close(res.A[0, [0, 2], 1], norm(f2))
    assert close(res.A[1], compute_advantages([_session("b", GROUP_B)], cfg).A[0])
    assert res.stats["mask/judge_error_share"] == pytest.approx(1 / 12)


def test_trajectory_filter_in_compute_advantages_counts_and_excludes():
    # trajectory 1 fails turn 1 (IF 0.2): its turns 2, 3 are filtered
    sess = _session("a", [[(1.0, 0.9), (0.9, 0.9), (0.8, 0.6)],
                          [(0.2, 0.9), (0.6, 0.6), (1.0, 1.0)],
                          [(0.7, 0.5), (0.6, 0.9), (0.7, 0.7)]])
    res = compute_advantages([sess], _cfg(assignment="per_turn", fusion="reward", trajectory_filter=True))
    assert res.mask[0].tolist() == [[T, T, T], [T, F, F], [T, T, T]]
    assert res.A[0, 1, 0] != 0.0  # the failed turn keeps its advantage
    assert res.A[0, 1, 1:].tolist() == [0.0, 0.0]
    # filtered turns are left out of the turn-2 statistics
    assert close(res.A[0, [0, 2], 1], norm([0.9, 0.75]))
    assert res.stats["mask/trajectory_filtered_share"] == pytest.approx(2 / 9)
    b = compute_advantages([sess], _cfg(fusion="reward", trajectory_filter=True))
    assert b.mask[0].tolist() == [[T, T, T], [T, F, F], [T, T, T]]
    assert torch.isfinite(b.A).all() and b.A[0, 1, 0] != 0.0


def test_absent_turns_sessions_of_different_length_and_shares_sum_to_one():
    s1 = _session("a", [[(1.0, 1.0), (0.2, 0.9)], [(0.5, 0.5), (0.9, 0.9)]])
    s2 = _session("b", [[(1.0, 1.0), (0.2, 0.9), (0.7, 0.7)], [(0.5, 0.5), "err", (0.9, 0.9)]])
    res = compute_advantages([s1, s2], _cfg(group_filter=True, trajectory_filter=True))
    st = res.stats
    assert st["mask/absent_share"] == pytest.approx(2 / 12)
    assert not res.mask[0, :, 2].any() and res.A[0, :, 2].tolist() == [0.0, 0.0]
    shares = [st[f"mask/{k}_share"] for k in ("judge_error", "trajectory_filtered", "no_reward",
                                                "group_filtered", "trained")]
    assert sum(shares) == pytest.approx(1.0)


@pytest.mark.parametrize("aggregation", ["mean", "min", "product", "last", "success_gated", "discounted"])
@pytest.mark.parametrize("assignment,norm_mode", [("broadcast", "turn"), ("per_turn", "turn"), ("per_turn", "session")])
def test_every_setting_gives_finite_advantages_zero_outside_mask(aggregation, assignment, norm_mode):
    s1 = _session("a", [[(1.0, 0.8), (0.9, 0.7), (0.2, 0.9)], [(0.2, 0.9), "err", (0.4, 0.6)],
                        [(0.7, 0.5), (0.1, 0.9), None]])
    s2 = _session("b", GROUP_B)
    cfg = AdvantageConfig(aggregation=aggregation, assignment=assignment, per_turn_norm=norm_mode,
                          group_filter=False)
    res = compute_advantages([s1, s2], cfg)
    assert res.A.shape == res.mask.shape == (2, 3, 3)
    assert torch.isfinite(res.A).all() and bool((res.A[~res.mask] == 0).all())
    assert not res.mask[~res.scores.present].any() and not res.mask[res.scores.error].any()
    assert res.mask.any()


def test_adv_clip_and_config_validation():
    sess = _session("a", [[(1.0, 1.0)]] + [[(0.0, 0.0)]] * 30)  # one outlier: |A| ~ 5.5
    res = compute_advantages([sess], _cfg(fusion="reward", adv_clip=2.0))
    assert res.A.max() == 2.0
    with pytest.raises(ValueError, match="aggregation"):
        AdvantageConfig(aggregation="median")
    with pytest.raises(ValueError, match="unknown rewards"):
        AdvantageConfig(weights={"IF": 1.0, "XX": 1.0})
    with pytest.raises(ValueError, match="weights"):
        AdvantageConfig(weights={"IF": 0.0})
    assert AdvantageConfig().weight_vector() == [0.3, 0.3, 0.2, 0.2] and REWARDS == ("IF", "CC", "GA", "CU")


# ----------------------------------------------------------------------------- Flow-GRPO

def test_grpo_on_policy_ratio_one_and_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 7.0, 0.5])
    a_clip = torch.tensor([1.0, -2.0, 5.0, 0.5])
    loss, st = grpo_loss(logp, logp.detach().clone(), adv, clip_range=1e-4, adv_clip=5.0)
    assert loss.item() == pytest.approx(-a_clip.mean().item())
    assert st["ratio_mean"] == 1.0 and st["ratio_max"] == 1.0 and st["clip_frac"] == 0.0
    assert st["approx_kl"] == 0.0
    loss.backward()
    assert close(logp.grad, -a_clip / 4)


def test_grpo_clipping_and_clip_frac():
    eps = 0.2
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 1.0, 0.9])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    loss, st = grpo_loss(logp, old, adv, clip_range=eps)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped, no gradient); A<0, r=1.5: max(1.5, 1.2) = 1.5
    # r=1: -1; r=0.9 (inside the range): -0.9
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 1.0 - 0.9) / 4)
    assert st["clip_frac"] == 0.5 and st["ratio_max"] == pytest.approx(1.5)
    loss.backward()
    assert close(logp.grad, torch.tensor([0.0, 1.5, -1.0, -0.9]) / 4)


def test_grpo_kl_adds_and_masked_entries_excluded():
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    old = logp + torch.tensor([0.01, -0.02, 0.3, 5.0])
    adv = torch.tensor([1.0, -1.0, 3.0, 100.0])
    kl = torch.tensor([0.1, 0.3, 9.0, 9.0])
    base, _ = grpo_loss(logp, old, adv, 0.1)
    with_kl, st = grpo_loss(logp, old, adv, 0.1, kl=kl, beta=0.04)
    assert (with_kl - base).item() == pytest.approx(0.04 * kl.mean().item(), rel=1e-5)
    assert st["kl_mean"] == pytest.approx(kl.mean().item())
    w = torch.tensor([1.0, 1.0, 0.0, 0.0])
    masked, st_m = grpo_loss(logp, old, adv, 0.1, kl=kl, beta=0.04, weight=w)
    first2, st_2 = grpo_loss(logp[:2], old[:2], adv[:2], 0.1, kl=kl[:2], beta=0.04)
    assert masked.item() == pytest.approx(first2.item())
    assert st_m["ratio_max"] == pytest.approx(st_2["ratio_max"]) and st_m["n_active"] == 2.0
    # masked entries holding nan reach neither the loss nor the gradient
    lp = logp.clone().requires_grad_(True)
    bad_adv = torch.tensor([1.0, -1.0, NAN, NAN])
    loss, _ = grpo_loss(lp, old, bad_adv, 0.1, weight=w)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and lp.grad[2:].tolist() == [0.0, 0.0]
    zero, st0 = grpo_loss(lp, old, adv, 0.1, weight=torch.zeros(4))
    assert zero.item() == 0.0 and st0 == {"n_active": 0.0}


def test_transition_kl_delegates_and_hand_value():
    mean = torch.randn(3, 2, 4, 4)
    ref = mean + 1.0
    assert close(transition_kl(mean, ref, torch.full((3,), 0.5)), [2.0, 2.0, 2.0])
    # per-unit-time std 1 with dt = -0.25 -> transition std 0.5
    assert close(transition_kl(mean, ref, 1.0, dt=-0.25), [2.0, 2.0, 2.0])
    std = torch.tensor([0.3, 0.5, 0.7]).reshape(3, 1, 1, 1)
    assert close(transition_kl(mean, ref, std), kl_between_means(mean, ref, std))
    with pytest.raises(ValueError, match="dt"):
        transition_kl(mean, ref, 1.0, dt=0.1)


# ----------------------------------------------------------------------------- DiffusionNFT

def _nft_batch(B=3, D=(2, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *D, generator=g)
    eps = torch.randn(B, *D, generator=g)
    sigma = torch.tensor([0.3, 0.6, 0.9])[:B]
    s = sigma.reshape(-1, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * eps
    v_old = torch.randn(B, *D, generator=g)
    return x0, eps, sigma, x_sigma, v_old


@pytest.mark.parametrize("adaptive", [False, True])
def test_nft_at_old_policy_loss_is_old_error(adaptive):
    x0, eps, sigma, x_sigma, v_old = _nft_batch()
    r = torch.tensor([0.0, 0.3, 1.0])
    loss, st = nft_loss(v_old.clone(), v_old, x_sigma, sigma, x0, eps, r, beta=0.7, adaptive=adaptive)
    err = (v_old - (eps - x0)) ** 2
    if adaptive:  # x̂0 − x0 = σ·(v* − v): σ²·mean e² / (σ·mean|e|)
        s = sigma
        per = s * err.flatten(1).mean(1) / (v_old - (eps - x0)).abs().flatten(1).mean(1)
    else:
        per = err.flatten(1).mean(1)
    assert loss.item() == pytest.approx(per.mean().item(), rel=1e-5)
    assert st["positive_loss"] == pytest.approx(st["negative_loss"], rel=1e-5)
    assert st["old_deviation"] == 0.0


def test_nft_gradient_closed_form_at_old_policy():
    x0, eps, sigma, x_sigma, v_old = _nft_batch()
    B, D = v_old.shape[0], v_old[0].numel()
    r = torch.tensor([0.0, 0.3, 1.0])
    beta = 0.4
    v = v_old.clone().requires_grad_(True)
    loss, _ = nft_loss(v, v_old, x_sigma, sigma, x0, eps, r, beta=beta, adaptive=False)
    loss.backward()
    # d/dv_θ [r·mean(v⁺−v*)² + (1−r)·mean(v⁻−v*)²] at v_θ = v_old (v⁺ = v⁻ = v_old):
    # r·2β(v_old−v*)/D − (1−r)·2β(v_old−v*)/D = 2β(2r−1)(v_old−v*)/D; the batch mean adds 1/B
    expected = 2 * beta * (2 * r - 1).reshape(-1, 1, 1, 1) * (v_old - (eps - x0)) / D / B
    assert close(v.grad, expected, tol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_nft_sign_positive_pulls_negative_pushes(adaptive):
    x0, eps, sigma, x_sigma, v_old = _nft_batch()
    target = eps - x0
    for r_val, should_decrease in ((1.0, True), (0.0, False)):
        v = v_old.clone().requires_grad_(True)
        loss, _ = nft_loss(v, v_old, x_sigma, sigma, x0, eps, torch.full((3,), r_val), beta=1.0,
                           adaptive=adaptive)
        loss.backward()
        v_new = v.detach() - 1e-2 * v.grad
        before = (v_old - target).flatten(1).norm(dim=1)
        after = (v_new - target).flatten(1).norm(dim=1)
        assert bool((after < before).all()) if should_decrease else bool((after > before).all())


def test_nft_adaptive_matches_hand_computation():
    x0 = torch.tensor([[0.0, 0.0]])
    eps = torch.tensor([[1.0, -1.0]])
    sigma = torch.tensor([0.5])
    x_sigma = torch.tensor([[0.5, -0.5]])
    v_old = torch.tensor([[0.0, 0.0]])
    v = torch.tensor([[2.0, 0.0]], requires_grad=True)
    r = torch.tensor([0.25])
    # β = 0.5: v⁺ = [1, 0], v⁻ = [−1, 0]; x̂0⁺ = [0, −0.5], x̂0⁻ = [1, −0.5]
    # c⁺ = mean|x̂0⁺| = 0.25, c⁻ = 0.75; e⁺ = 0.125/0.25 = 0.5, e⁻ = 0.625/0.75 = 5/6
    loss, st = nft_loss(v, v_old, x_sigma, sigma, x0, eps, r, beta=0.5, adaptive=True)
    assert st["positive_loss"] == pytest.approx(0.5) and st["negative_loss"] == pytest.approx(5 / 6)
    assert loss.item() == pytest.approx(0.25 * 0.5 + 0.75 * 5 / 6)
    loss.backward()
    # stop-gradient weights: d e⁺/dv = (2/D)(x̂0⁺ − x0)(−σβ)/c⁺, d e⁻/dv = (2/D)(x̂0⁻ − x0)(+σβ)/c⁻
    sb = 0.25
    g_pos = torch.tensor([0.0, -0.5]) * (-sb) / 0.25
    g_neg = torch.tensor([1.0, -0.5]) * sb / 0.75
    assert close(v.grad[0], 0.25 * g_pos + 0.75 * g_neg)


def test_nft_reference_term_gradient_and_weights():
    x0, eps, sigma, x_sigma, v_old = _nft_batch()
    B, D = v_old.shape[0], v_old[0].numel()
    v_ref = v_old + 0.3
    v = v_old.clone().requires_grad_(True)
    r = torch.full((3,), 0.5)  # 2r − 1 = 0: the policy term has no gradient at v_old
    loss, st = nft_loss(v, v_old, x_sigma, sigma, x0, eps, r, beta=0.5, adaptive=False,
                        v_ref=v_ref, ref_weight=0.1)
    loss.backward()
    assert close(v.grad, 2 * 0.1 * (v_old - v_ref) / D / B, tol=1e-6)
    assert st["ref_loss"] == pytest.approx(0.09, rel=1e-5)
    # weight 0 excludes a sample from the mean
    w = torch.tensor([1.0, 0.0, 1.0])
    lw, _ = nft_loss(v_old + 0.1, v_old, x_sigma, sigma, x0, eps, r, 0.5, False, weight=w)
    keep = [0, 2]
    l2, _ = nft_loss((v_old + 0.1)[keep], v_old[keep], x_sigma[keep], sigma[keep], x0[keep], eps[keep],
                     r[keep], 0.5, False)
    assert lw.item() == pytest.approx(l2.item(), rel=1e-6)


def test_optimality_weight_clip():
    A = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    assert optimality_weight(A, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_ema_update_and_decay_ramp():
    old = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    new = [torch.tensor([3.0, 6.0]), torch.tensor([[4.0]])]
    ema_update_(old, new, 0.75)
    assert old[0].tolist() == [1.5, 3.0] and old[1].tolist() == [[1.0]]
    ema_update_(old, new, 1.0)
    assert old[0].tolist() == [1.5, 3.0]
    ema_update_(old, new, 0.0)
    assert old[0].tolist() == [3.0, 6.0] and old[1].tolist() == [[4.0]]
    p = torch.nn.Parameter(torch.zeros(2))
    ema_update_([p], [torch.ones(2)], 0.5)  # parameters update in place without autograd
    assert p.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError):
        ema_update_(old, new[:1], 0.5)

    assert old_policy_decay(0, 0.5, 500) == 0.0
    assert old_policy_decay(250, 0.5, 500) == pytest.approx(0.25)
    assert old_policy_decay(500, 0.5, 500) == 0.5 and old_policy_decay(10_000, 0.5, 500) == 0.5
    assert old_policy_decay(3, 0.9, 0) == 0.9
    # the public schedule min((step − flat)·uprate, uphold) with ramp = uphold / uprate
    for step in (0, 74, 75, 100, 150, 208, 209, 400):
        public = 0.0 if step < 75 else min((step - 75) * 0.0075, 0.999)
        assert old_policy_decay(step, 0.999, 0.999 / 0.0075, flat=75) == pytest.approx(public)


# ----------------------------------------------------------------------------- evaluation EMA

def test_weight_ema_closed_form_dtypes_and_errors():
    from editrl.rl.ema import ema_export, ema_init, ema_state_update_

    e0 = {"w": torch.tensor([1.0, -2.0]), "h": torch.tensor([0.5], dtype=torch.bfloat16), "n": torch.tensor([3])}
    ema = ema_init(e0)
    assert ema["h"].dtype == torch.float32 and ema["n"].dtype == torch.int64
    s = {"w": torch.tensor([3.0, 2.0]), "h": torch.tensor([1.5], dtype=torch.bfloat16), "n": torch.tensor([7])}
    d = 0.9
    for _ in range(5):
        ema_state_update_(ema, s, d)
    # a constant input: ema_n = d^n·e0 + (1 − d^n)·s
    expect = d ** 5 * e0["w"] + (1 - d ** 5) * s["w"]
    assert torch.allclose(ema["w"], expect, atol=1e-6)
    assert torch.equal(ema["n"], s["n"])                    # non-floating tensors are copied
    out = ema_export(ema, s)
    assert out["h"].dtype == torch.bfloat16 and out["w"].dtype == torch.float32
    # decay 0 copies, decay 1 keeps
    ema2 = ema_init(e0)
    ema_state_update_(ema2, s, 1.0)
    assert torch.equal(ema2["w"], e0["w"])
    ema_state_update_(ema2, s, 0.0)
    assert torch.equal(ema2["w"], s["w"])
    # the input is not modified, and the EMA holds its own copy
    assert torch.equal(e0["w"], torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="keys"):
        ema_state_update_(ema, {"w": s["w"]}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_state_update_(ema, {**s, "w": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match="decay"):
        ema_state_update_(ema, s, 1.5)


def test_group_filter_judges_the_cells_advantages_are_normalised_over():
    """Per-turn assignment filters each (session, turn) cell on its fused turn rewards: a
    saturated turn 1 is dropped, while turn 2, whose samples differ, is kept — although the
    trajectory rewards (mean 0.91 >= 0.9) would drop the whole group, as broadcast does."""
    sess = _session("a", [[(1.0, 1.0), (1.0, 1.0)], [(1.0, 1.0), (0.3, 1.0)],
                          [(1.0, 1.0), (0.3, 1.0)], [(1.0, 1.0), (1.0, 1.0)]])
    res = compute_advantages([sess], _cfg(assignment="per_turn", fusion="reward", group_filter=True))
    assert res.keep.tolist() == [[F, T]]
    assert not res.mask[0, :, 0].any() and res.mask[0, :, 1].all()
    assert close(res.A[0, :, 1], norm([1.0, 0.65, 0.65, 1.0]))
    assert res.stats["group/filtered_share"] == pytest.approx(0.5)
    assert res.stats["mask/group_filtered_share"] == pytest.approx(0.5)
    b = compute_advantages([sess], _cfg(fusion="reward", group_filter=True))
    assert b.keep.tolist() == [[F, F]] and not b.mask.any()
    # session norm: one decision per session over its 8 pooled turn samples (mean 0.91: dropped)
    s = compute_advantages([sess], _cfg(assignment="per_turn", per_turn_norm="session", fusion="reward",
                                        group_filter=True))
    assert s.keep.tolist() == [[F, F]] and not s.mask.any()
    s2 = compute_advantages([sess], _cfg(assignment="per_turn", per_turn_norm="session", fusion="reward",
                                         group_filter=True, group_mean_max=0.95))
    assert s2.keep.tolist() == [[T, T]] and s2.mask.all()


def test_hybrid_scoring_grades_only_cells_without_a_success():
    # turn 1: every trajectory fails -> graded scores rank them; turn 2: mixed -> binary
    sess = _session("a", [[(0.2, 0.9), (0.9, 0.9)], [(0.4, 0.6), (0.3, 0.8)], [(0.1, 0.7), (0.7, 0.6)]])
    res = compute_advantages([sess], _cfg(scoring="hybrid", assignment="per_turn", fusion="reward"))
    assert close(res.A[0, :, 0], norm([0.55, 0.5, 0.4]))           # 0.5·IF + 0.5·CC, graded
    assert close(res.A[0, :, 1], norm([1.0, 0.5, 1.0]))            # binary: traj 1 fails IF, passes CC
    assert res.stats["group/graded_share"] == pytest.approx(0.5)
    binary = compute_advantages([sess], _cfg(scoring="binary", assignment="per_turn", fusion="reward"))
    assert close(binary.A[0, :, 0], [0.0, 0.0, 0.0])               # nothing to rank without grades
    assert close(binary.A[0, :, 1], res.A[0, :, 1])
    assert "group/graded_share" not in binary.stats


def test_hybrid_scoring_looks_at_the_samples_the_statistics_use():
    # turn 2's only success belongs to trajectory 0, which failed turn 1: per-turn assignment with the
    # trajectory filter leaves it out, so turn 2's live samples (1, 2) all fail and are graded
    sess = _session("a", [[(0.2, 0.9), (0.9, 0.9)], [(0.9, 0.9), (0.3, 0.8)], [(0.8, 0.8), (0.4, 0.9)]])
    res = compute_advantages([sess], _cfg(scoring="hybrid", assignment="per_turn", fusion="reward",
                                          trajectory_filter=True))
    assert close(res.A[0, :, 1], [0.0, *norm([0.55, 0.65])])
    assert close(res.A[0, :, 0], norm([0.5, 1.0, 1.0]))            # turn 1 is mixed: binary
    # broadcast normalises whole trajectories: turn 2 holds a success, so it stays binary
    bc = compute_advantages([sess], _cfg(scoring="hybrid", assignment="broadcast", fusion="reward"))
    bin_bc = compute_advantages([sess], _cfg(scoring="binary", assignment="broadcast", fusion="reward"))
    assert close(bc.A, bin_bc.A) and bc.stats["group/graded_share"] == 0.0


def test_hybrid_scoring_needs_scores_and_is_a_known_choice():
    sess = [[[tv("a", 1, IF=("fail", None), CC=("pass", 1.0))], [tv("a", 1, IF=("fail", 0.3), CC=("pass", 1.0))]]]
    with pytest.raises(ValueError, match="graded scoring needs a score"):
        compute_advantages(sess, _cfg(scoring="hybrid", assignment="per_turn"))
    with pytest.raises(ValueError, match="scoring"):
        AdvantageConfig(scoring="lexicographic")


def test_hybrid_graded_cells_use_their_own_group_filter_threshold():
    # turn 1: every trajectory fails, graded fused rewards 0.65 / 0.655 / 0.66 (std 0.0041);
    # turn 2: mixed pass/fail, binary
    sess = _session("a", [[(0.40, 0.9), (0.9, 0.9)], [(0.41, 0.9), (0.3, 0.8)], [(0.42, 0.9), (0.9, 0.6)]])
    kw = dict(scoring="hybrid", assignment="per_turn", fusion="reward", group_filter=True, group_mean_max=1.0)
    res = compute_advantages([sess], _cfg(**kw))                        # fallback_std_min 0.001 < 0.0041
    assert res.keep.tolist() == [[T, T]]
    assert close(res.A[0, :, 0], norm([0.65, 0.655, 0.66]))
    assert res.stats["group/graded_kept_share"] == 1.0
    strict = compute_advantages([sess], _cfg(**kw, fallback_std_min=0.05))
    assert strict.keep.tolist() == [[F, T]] and close(strict.A[0, :, 0], [0.0] * 3)
    assert strict.stats["group/graded_kept_share"] == 0.0
    assert close(strict.A[0, :, 1], res.A[0, :, 1])                     # the binary cell is untouched
    # graded scoring everywhere: the same cell is judged by group_std_min and dropped
    graded = compute_advantages([sess], _cfg(**{**kw, "scoring": "graded"}))
    assert not graded.keep[0, 0] and "group/graded_kept_share" not in graded.stats
    # broadcast: a group holding a graded cell takes the lower threshold
    bc = compute_advantages([sess], _cfg(**{**kw, "assignment": "broadcast"}))
    assert bc.keep.tolist() == [[T, T]]
    with pytest.raises(ValueError, match="fallback_std_min"):
        AdvantageConfig(fallback_std_min=-0.1)


def test_group_filter_takes_one_threshold_per_group():
    R = torch.tensor([[0.5, 0.51], [0.5, 0.51]])  # [B=2, G=2], std 0.005 each
    valid = torch.ones(2, 2, dtype=torch.bool)
    assert group_filter(R, valid, torch.tensor([0.001, 0.01]), 1.0).tolist() == [True, False]
    assert group_filter(R, valid, 0.001, 1.0).tolist() == [True, True]


# ----------------------------------------------------------------------------- branched rollouts

def test_verdict_success_is_the_success_scores_from_verdicts_counts():
    cases = [tv("s", 1, IF=("pass", 1.0), CC=("pass", 0.9)), tv("s", 1, IF=("pass", 1.0), CC=("fail", 0.2)),
             tv("s", 1, IF=("pass", 1.0), CC="judge_error"), tv("s", 1, IF=("pass", 1.0))]
    ts = scores_from_verdicts([[[v] for v in cases]], "binary")
    assert [verdict_success(v) for v in cases] == [T, F, F, T] == ts.success[0, :, 0].tolist()
    assert verdict_success(None) is False


def test_choose_parents_picks_uniformly_among_successes_else_among_live():
    success = torch.tensor([[F, T, F, T], [F, F, F, F], [T, F, F, F], [F, F, T, F]])   # [B=4, G=4]
    live = torch.tensor([[T, T, T, T], [T, F, T, F], [T, T, T, T], [T, T, F, T]])
    gen = torch.Generator().manual_seed(0)
    picks = torch.stack([choose_parents(success, live, gen) for _ in range(2000)])    # [N, B]
    assert set(picks[:, 0].tolist()) == {1, 3}                       # only the successes
    assert set(picks[:, 1].tolist()) == {0, 2}                       # none succeeded: any live one
    assert set(picks[:, 2].tolist()) == {0}                          # the one success
    assert set(picks[:, 3].tolist()) == {0, 1, 3}                    # its success is not live
    share = (picks[:, 0] == 1).float().mean().item()
    assert abs(share - 0.5) < 0.05                                   # uniform among the pool
    a = choose_parents(success, live, torch.Generator().manual_seed(7))
    b = choose_parents(success, live, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)                                         # a pure function of the generator
    with pytest.raises(ValueError, match="must both be"):
        choose_parents(success, live[:, :3])


def test_lineage_success_reads_the_parents_turns():
    # B=1, G=3, K=3: turn-1 parent 2 (failed), turn-2 parent 0 (passed); the last turn is each one's own
    success = torch.tensor([[[T, T, F], [F, F, T], [F, T, T]]])     # [1, G, K]
    parents = torch.tensor([[2, 0, -1]])                             # [1, K]
    got = lineage_success(success, parents)
    assert got.tolist() == [[[F, T, F], [F, T, T], [F, T, T]]]
    with pytest.raises(ValueError, match="parents"):
        lineage_success(success, torch.tensor([[0, 0]]))


def test_branched_advantages_filter_by_lineage_and_refuse_broadcast():
    # one session, G=2, K=2. Row 0 failed turn 1, row 1 passed it; the rollout continued from row 1,
    # so both turn-2 samples sit on a passed turn 1 and keep their advantages
    v = [[[tv("s", 1, IF=("fail", 0.0)), tv("s", 2, IF=("pass", 1.0))],
          [tv("s", 1, IF=("pass", 1.0)), tv("s", 2, IF=("fail", 0.0))]]]
    cfg = AdvantageConfig(scoring="binary", assignment="per_turn", group_filter=False, weights={"IF": 1.0})
    plain = compute_advantages(v, cfg)
    assert plain.mask[0, :, 1].tolist() == [F, T]                    # own rows: row 0 is filtered at turn 2
    res = compute_advantages(v, cfg, parents=torch.tensor([[1, -1]]))
    assert res.mask[0, :, 1].tolist() == [T, T]
    assert close(res.A[0, :, 1], norm([1.0, 0.0]))                  # the two edits of one input compared
    assert close(res.A[0, :, 0], norm([0.0, 1.0]))
    # continued from the failed row: every turn-2 sample is after a failure
    res = compute_advantages(v, cfg, parents=torch.tensor([[0, -1]]))
    assert res.mask[0, :, 1].tolist() == [F, F]
    assert res.stats["mask/trajectory_filtered_share"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="per_turn"):
        compute_advantages(v, AdvantageConfig(scoring="binary", assignment="broadcast"), parents=torch.tensor([[1, -1]]))
