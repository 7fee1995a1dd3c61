"""The RL recipe end to end on a small random tiny editor: grouped rollouts, GRPO and NFT steps,
exact resume after a stop, and the `editrl train` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from editrl.config import load_config  # noqa: E402
from editrl.editors.tiny import load_tiny  # noqa: E402
from editrl.rl.rollout import grouped_rollout  # noqa: E402
from editrl.rl.train import TrainConfig, train, training_sessions  # noqa: E402
from editrl.session import EditrlInputError  # noqa: E402
from editrl.world.grammar import session_scenes  # noqa: E402
from editrl.world.render import render  # noqa: E402
from run_metrics import metric_rows, untimed_rows  # noqa: E402




def small_cfg(ckpt, **kw) -> TrainConfig:
    base = dict(init=f"tiny:{ckpt}", sessions_per_step=2, group=3, turns=2, rollout_steps=3, max_steps=3,
                minibatch=8, final_eval=False, threads=1, ckpt_every=1, lr=1e-3)
    base.update(kw)
    return load_config(TrainConfig, None, {k: v for k, v in base.items() if k != "adv"} | ({"adv": kw["adv"]} if "adv" in kw else {}))


def test_grouped_rollout_feeds_each_trajectory_its_own_output(small_ckpt):
    ed = load_tiny(f"tiny:{small_ckpt}")
    cfg = small_cfg(small_ckpt)
    sessions = training_sessions(cfg, 0)
    sources = [render(session_scenes(s)[0]) for s in sessions]
    ro = grouped_rollout(ed, sessions, sources, G=3, K=2, steps=3, solver="sde", store=True,
                         generator=torch.Generator().manual_seed(0))
    assert len(ro.turns) == 2 and ro.turns[0].inputs.shape[0] == 6
    for b in range(2):
        for g in range(3):
            imgs = ro.images[b][g]
            assert np.array_equal(imgs[0], sources[b]) and len(imgs) == 3
    # turn 2's input row is turn 1's output row
    assert torch.equal(ro.turns[1].inputs, ro.turns[0].outputs)
    # trajectories of one group differ (different noise), and SDE steps were stored
    assert not np.array_equal(ro.images[0][0][1], ro.images[0][1][1])
    tr = ro.turns[0].transitions
    assert tr is not None and tr.x.shape[:2] == (6, 2) and torch.isfinite(tr.log_prob).all()


def test_grpo_and_nft_steps_run_and_change_weights(small_ckpt, tmp_path):
    before = load_tiny(f"tiny:{small_ckpt}").state_dict()
    adv = {"group_filter": False, "trajectory_filter": False}
    for alg in ("grpo", "nft"):
        cfg = small_cfg(small_ckpt, algorithm=alg, max_steps=2, adv=adv)
        res = train(cfg, tmp_path / alg, log=lambda m: None)
        rows = metric_rows(tmp_path / alg)
        assert [r["step"] for r in rows] == [1, 2]
        assert all("reward/IF" in r and "mask/trained_share" in r for r in rows)
        if alg == "grpo":
            # one update per rollout: the recomputed log-probabilities are on-policy, ratio exactly 1
            assert rows[0]["grpo/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
            assert rows[0]["grpo/clip_frac"] == 0.0
        else:
            assert rows[0]["nft/samples"] > 0
        after = load_tiny(f"tiny:{res['final']}").state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), alg


def test_resume_after_stop_continues_metrics_identically(small_ckpt, tmp_path):
    adv = {"group_filter": False}
    cfg = small_cfg(small_ckpt, algorithm="nft", max_steps=3, adv=adv)
    train(cfg, tmp_path / "full", log=lambda m: None)
    train(cfg, tmp_path / "cut", log=lambda m: None, stop_at=1)
    train(cfg, tmp_path / "cut", log=lambda m: None)

    assert untimed_rows(tmp_path / "full") == untimed_rows(tmp_path / "cut")
    a = load_tiny(f"tiny:{tmp_path / 'full' / 'final'}").state_dict()
    b = load_tiny(f"tiny:{tmp_path / 'cut' / 'final'}").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different config in the same folder is refused
    with pytest.raises(EditrlInputError, match="different config"):
        train(small_cfg(small_ckpt, algorithm="nft", lr=5e-4, adv=adv), tmp_path / "cut", log=lambda m: None)


def test_train_cli_smoke_and_bad_input(small_ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "editrl.cli", "train", "--config", "shapes-nft", "--out", str(tmp_path / "run"),
           f"init=tiny:{small_ckpt}", "sessions_per_step=2", "group=2", "turns=1", "rollout_steps=2", "max_steps=1",
           "final_eval=false", "threads=1", "eval_every=0"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 1 and os.path.exists(summary["final"] + "/model.safetensors")
    bad = subprocess.run(cmd[:8] + ["group=1"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "group must be at least 2" in bad.stderr and "Traceback" not in bad.stderr


def test_train_survives_sigkill_and_resumes_metrics_identically(small_ckpt, tmp_path):
    """Kill -9 a real `editrl train` process mid-run; the resumed run's metrics.jsonl and final
    weights equal those of a run that was never interrupted (CPU, same seed)."""
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--config", "shapes-nft", f"init=tiny:{small_ckpt}", "sessions_per_step=2", "group=3", "turns=2",
            "rollout_steps=3", "max_steps=6", "minibatch=8", "final_eval=false", "threads=1", "eval_every=0",
            "ckpt_every=1", "lr=1e-3", "adv.group_filter=false"]
    cmd = lambda out: [sys.executable, "-m", "editrl.cli", "train", "--out", str(out), *args]  # noqa: E731
    ref = subprocess.run(cmd(tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    p = subprocess.Popen(cmd(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert not (run / "final").exists(), "the run finished before it could be killed"
    done = subprocess.run(cmd(run), capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from step" in done.stderr

    assert untimed_rows(tmp_path / "ref") == untimed_rows(metrics)
    assert [r["step"] for r in untimed_rows(metrics)] == list(range(1, 7))
    a = load_tiny(f"tiny:{tmp_path / 'ref' / 'final'}").state_dict()
    b = load_tiny(f"tiny:{run / 'final'}").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_tracking_writes_scalars_and_session_strips(small_ckpt, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_cfg(small_ckpt, algorithm="nft", max_steps=2, track="tensorboard", track_strips_every=1,
                    track_strips=2, adv={"group_filter": False})
    train(cfg, tmp_path / "run", log=lambda m: None)
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    assert "reward/IF" in tags["scalars"] and "success/turn_1" in tags["scalars"]
    assert [e.step for e in ea.Scalars("reward/fused")] == [1, 2]
    imgs = [t for t in tags["images"] if t.startswith("sessions/")]
    assert len(imgs) == 2
    ev = ea.Images(imgs[0])
    assert [e.step for e in ev] == [1, 2] and ev[0].width == 3 * 64 and ev[0].height == 64 + 3
    # a missing backend name is a clear error
    with pytest.raises(EditrlInputError, match="unknown tracking backend"):
        train(small_cfg(small_ckpt, track="mlflow"), tmp_path / "bad", log=lambda m: None)


def test_joint_intent_training_updates_both_policies_and_resumes_exactly(small_ckpt, tmp_path):
    """intent.train: the tiny policy samples each trajectory's texts, gets the turn's advantage
    through token-level GRPO, is checkpointed with its optimiser, and a stopped run resumes to
    the same metrics and the same final text and image policies."""
    from editrl.intent.tiny import PolicyConfig, TinyIntentPolicy, load_policy, save_policy

    torch.manual_seed(0)
    pol = TinyIntentPolicy(PolicyConfig(dim=32, heads=2, enc_layers=1, dec_layers=1, max_out=24))
    save_policy(pol, tmp_path / "pol.safetensors")
    adv = {"group_filter": False, "trajectory_filter": False}
    cfg = small_cfg(small_ckpt, algorithm="nft", max_steps=2, adv=adv,
                    intent={"spec": f"tiny:{tmp_path / 'pol.safetensors'}", "train": True, "lr": 1e-2})
    train(cfg, tmp_path / "full", log=lambda m: None)
    train(cfg, tmp_path / "cut", log=lambda m: None, stop_at=1)
    train(cfg, tmp_path / "cut", log=lambda m: None)

    full = untimed_rows(tmp_path / "full")
    assert full == untimed_rows(tmp_path / "cut")
    assert all("text/exact" in r and "text/referent_acc" in r for r in full)
    assert full[0]["text/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and full[0]["text/tokens"] > 0
    a, _ = load_policy(tmp_path / "full" / "final" / "intent.safetensors")
    b, _ = load_policy(tmp_path / "cut" / "final" / "intent.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), pol.state_dict().values()))
    with pytest.raises(EditrlInputError, match="intent.train needs"):
        small_cfg(small_ckpt, intent={"spec": "rules", "train": True})


def test_rules_intent_in_rollouts_gives_the_gold_explicit_text(small_ckpt):
    from editrl.rl.joint_intent import IntentActor, IntentConfig

    cfg = small_cfg(small_ckpt, turns=3)
    sessions = training_sessions(cfg, 0)
    actor = IntentActor(IntentConfig(spec="rules"))
    actor.reset(sessions, 2)
    ed = load_tiny(f"tiny:{small_ckpt}")
    ro = grouped_rollout(ed, sessions, [render(session_scenes(s)[0]) for s in sessions], 2, 3, steps=2,
                         batch_text_fn=lambda k: actor.texts(k))
    for k, tb in enumerate(ro.turns, start=1):
        for i, text in enumerate(tb.texts):
            s = sessions[i // 2]
            if s.n_turns >= k:
                assert text == s.turns[k - 1].explicit
    assert actor.text_stats()["text/exact"] == 1.0


def test_evaluation_ema_follows_theta_step_by_step_and_resumes(small_ckpt, tmp_path):
    """ema_decay d: after each step the saved EMA is d·EMA + (1 − d)·θ (θ from the same state
    file), DIR/final holds the EMA (not θ), and a stopped + resumed run ends with the same EMA."""
    from editrl.checkpoint import load_state, unprefixed

    d = 0.6
    cfg = small_cfg(small_ckpt, algorithm="nft", max_steps=3, ema_decay=d, adv={"group_filter": False})
    run = tmp_path / "cut"
    ema_prev = load_tiny(f"tiny:{small_ckpt}").state_dict()
    for stop in (1, 2, 3):
        train(cfg, run, log=lambda m: None, stop_at=stop)
        tensors, meta = load_state(run / "state.safetensors")
        assert meta["step"] == stop
        theta, ema = unprefixed(tensors, "model"), unprefixed(tensors, "ema")
        for k, v in ema.items():
            if v.is_floating_point():
                assert torch.allclose(v, d * ema_prev[k] + (1 - d) * theta[k], atol=1e-6), k
        ema_prev = ema
    final = load_tiny(f"tiny:{run / 'final'}").state_dict()
    assert all(torch.equal(final[k], ema_prev[k]) for k in final)
    assert any(not torch.equal(final[k], theta[k]) for k in final)          # the EMA, not θ
    # an uninterrupted run writes the same final weights
    full = train(cfg, tmp_path / "full", log=lambda m: None)
    again = load_tiny(f"tiny:{full['final']}").state_dict()
    assert all(torch.equal(again[k], final[k]) for k in final)
    with pytest.raises(ValueError, match="ema_decay"):
        small_cfg(small_ckpt, ema_decay=1.0)


def test_nft_without_negatives_trains_only_on_positive_advantages(small_ckpt):
    from editrl.rl.train import nft_update, step_generator

    ed = load_tiny(f"tiny:{small_ckpt}")
    cfg = small_cfg(small_ckpt, algorithm="nft")
    sessions = training_sessions(cfg, 0)
    sources = [render(session_scenes(s)[0]) for s in sessions]
    ro = grouped_rollout(ed, sessions, sources, G=3, K=2, steps=3, generator=torch.Generator().manual_seed(0))
    A = torch.tensor([[[1.0, -0.5], [-1.0, 0.0], [0.0, 0.5]], [[0.2, 0.2], [-0.2, -0.2], [0.0, 0.0]]])   # [B, G, K]
    mask = torch.ones(2, 3, 2, dtype=torch.bool)
    old = ed.policy_copy()
    both = nft_update(cfg, ed, old, None, ro, A, mask, step_generator(cfg, 0, 1))
    ed.net.zero_grad(set_to_none=True)
    pos_cfg = small_cfg(small_ckpt, algorithm="nft", nft_negatives=False)
    pos = nft_update(pos_cfg, ed, old, None, ro, A, mask, step_generator(cfg, 0, 1))
    assert both["nft/samples"] == 12 and pos["nft/samples"] == float((A > 0).sum()) == 4
    assert pos["nft/r_mean"] > 0.5 > both["nft/r_mean"] - 1e-6
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ed.trainable_parameters())


def test_branched_rollout_continues_every_trajectory_from_its_parent(small_ckpt):
    ed = load_tiny(f"tiny:{small_ckpt}")
    cfg = small_cfg(small_ckpt, turns=3)
    sessions = training_sessions(cfg, 0)
    sources = [render(session_scenes(s)[0]) for s in sessions]
    G, calls = 3, []

    def branch(k):
        calls.append(k)
        return [2, 0] if k == 1 else [1, 1]

    ro = grouped_rollout(ed, sessions, sources, G=G, K=3, steps=2, generator=torch.Generator().manual_seed(0),
                         branch=branch)
    assert calls == [1, 2] and ro.parents.tolist() == [[2, 1, -1], [0, 1, -1]]
    for k in (1, 2):                                   # turn k+1's inputs are all the parent's turn-k output
        for b in range(2):
            p = int(ro.parents[b, k - 1])
            for g in range(G):
                assert torch.equal(ro.turns[k].inputs[b * G + g], ro.turns[k - 1].outputs[b * G + p])
    for b in range(2):                                 # images: the parents' lineage, then the row's own output
        p1, p2 = int(ro.parents[b, 0]), int(ro.parents[b, 1])
        for g in range(G):
            imgs = ro.images[b][g]
            assert len(imgs) == 4 and np.array_equal(imgs[2], ro.images[b][p2][2])
            assert np.array_equal(imgs[1], ro.images[b][p1][1])
    # the G edits of one input still differ (their own noise)
    assert not np.array_equal(ro.images[0][0][3], ro.images[0][1][3])


@pytest.mark.parametrize("overlap", [True, False])
def test_success_branching_continues_from_a_judged_success(overlap):
    """With the shipped editor and the program judge, the parent of every turn is a trajectory
    whose turn passed whenever one did (the verdicts are read as soon as the turn is judged)."""
    from editrl.judges import load_judge
    from editrl.rl.rewards import RewardPipeline
    from editrl.rl.rollout import choose_parents

    ed = load_tiny("tiny")
    cfg = load_config(TrainConfig, None, dict(sessions_per_step=3, group=3, turns=2, final_eval=False))
    sessions = training_sessions(cfg, 0)
    sources = [render(session_scenes(s)[0]) for s in sessions]
    pipe = RewardPipeline(load_judge("program"), overlap=overlap)
    pipe.begin(sessions, 3, explicit=True)
    gen = torch.Generator().manual_seed(0)
    branch = lambda k: choose_parents(torch.tensor(pipe.turn_success(k)), torch.ones(3, 3, dtype=torch.bool), gen)  # noqa: E731
    ro = grouped_rollout(ed, sessions, sources, 3, 2, steps=4, generator=torch.Generator().manual_seed(1),
                         on_turn=pipe.turn_done, branch=branch)
    verdicts, _ = pipe.verdicts()
    pipe.close()
    from editrl.rl import verdict_success
    ok = [[verdict_success(verdicts[b][g][0]) for g in range(3)] for b in range(3)]
    assert any(any(r) for r in ok)                     # the shipped editor passes some first turns
    for b in range(3):
        if any(ok[b]):
            assert ok[b][int(ro.parents[b, 0])]
    assert all(v is not None for b in verdicts for g in b for v in g)   # every turn judged once, none lost


def test_branched_training_resumes_identically_and_refuses_broadcast(small_ckpt, tmp_path):
    adv = {"group_filter": False, "assignment": "per_turn"}
    cfg = small_cfg(small_ckpt, algorithm="nft", max_steps=2, branch="success", adv=adv)
    train(cfg, tmp_path / "full", log=lambda m: None)
    train(cfg, tmp_path / "cut", log=lambda m: None, stop_at=1)
    train(cfg, tmp_path / "cut", log=lambda m: None)
    assert untimed_rows(tmp_path / "full") == untimed_rows(tmp_path / "cut")
    with pytest.raises(ValueError, match="per_turn"):
        small_cfg(small_ckpt, branch="success", adv={"assignment": "broadcast"})
    with pytest.raises(EditrlInputError, match="intent.spec"):
        train(small_cfg(small_ckpt, branch="success", adv=adv, intent={"spec": "rules"}), tmp_path / "intent",
              log=lambda m: None)
    with pytest.raises(EditrlInputError, match="one process"):
        train(small_cfg(small_ckpt, branch="success", adv=adv, session_rng=True), tmp_path / "rng", log=lambda m: None)
    with pytest.raises(ValueError, match="branch must be one of"):
        small_cfg(small_ckpt, branch="sometimes")
