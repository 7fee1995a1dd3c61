"""The task curriculum (editrl/rl/curriculum.py): hand-computed priorities and EMA updates,
the Gumbel top-k draw's frequencies, session selection from the training stream, and exact
resume of a run that uses it."""

from __future__ import annotations

import json
import os
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from editrl.config import load_config  # noqa: E402
from editrl.rl.curriculum import (CurriculumConfig, TaskCurriculum, ema_update, gumbel_top_k,  # noqa: E402
                                  informative_cells, session_priority)
from editrl.rl.train import TrainConfig, session_source, train, training_sessions  # noqa: E402
from run_metrics import untimed_rows  # noqa: E402


def fake_session(*types):
    return SimpleNamespace(turns=[SimpleNamespace(task_type=t) for t in types])


def test_session_priority_floors_and_priors_by_hand():
    q = {"color": 0.01, "count": 0.5}
    # color floored to 0.05, count 0.5, size unseen -> prior 1.0
    assert session_priority(["color", "count", "size"], q, floor=0.05, prior=1.0) == pytest.approx(1.55)
    assert session_priority(["color", "color"], q, floor=0.2, prior=1.0) == pytest.approx(0.4)


def test_ema_update_by_hand():
    q = {"a": 0.5, "b": 0.2}
    out = ema_update(q, {"a": 1.0, "c": 0.0}, decay=0.9, prior=1.0)
    assert out == pytest.approx({"a": 0.9 * 0.5 + 0.1 * 1.0, "b": 0.2, "c": 0.9 * 1.0 + 0.1 * 0.0})
    assert q == {"a": 0.5, "b": 0.2}                      # pure: the input is untouched


def test_gumbel_top_k_draws_proportionally_without_replacement():
    rng = np.random.default_rng(0)
    w = [1.0, 2.0, 7.0]
    picks = Counter(gumbel_top_k(w, 1, rng)[0] for _ in range(20000))
    freq = np.array([picks[i] for i in range(3)]) / 20000
    assert np.allclose(freq, np.array(w) / sum(w), atol=0.015)
    for _ in range(50):
        got = gumbel_top_k([0.3, 1.0, 0.2, 5.0, 0.1], 3, rng)
        assert len(set(got)) == 3 and got == sorted(got)
    assert gumbel_top_k(w, 3, rng) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot keep"):
        gumbel_top_k(w, 4, rng)
    with pytest.raises(ValueError, match="positive"):
        gumbel_top_k([1.0, 0.0], 1, rng)


def test_update_counts_a_group_informative_when_any_of_its_samples_trained():
    cur = TaskCurriculum(CurriculumConfig(mode="task", decay=0.5, prior=1.0), seed=0, turns=2)
    sessions = [fake_session("color", "count"), fake_session("count", "size")]
    mask = torch.zeros(2, 3, 2, dtype=torch.bool)   # [B, G, K]
    mask[0, 1, 1] = True                             # session 0 turn 2 (count) trained one sample
    assert informative_cells(mask).tolist() == [[False, True], [False, False]]
    stats = cur.update(sessions, mask)
    # color: 0/1, count: 1/2, size: 0/1; each from the prior 1.0 with decay 0.5
    assert cur.q == pytest.approx({"color": 0.5, "count": 0.75, "size": 0.5})
    assert stats["curriculum/informative_share"] == pytest.approx(1 / 4)
    assert stats["curriculum/q_count"] == pytest.approx(0.75)
    # state round trip
    other = TaskCurriculum(cur.cfg, seed=0, turns=2)
    other.load_state(json.loads(json.dumps(cur.state())))
    assert other.q == cur.q
    # off: nothing is tracked
    off = TaskCurriculum(CurriculumConfig(), seed=0, turns=2)
    assert off.update(sessions, mask) == {} and off.q == {}


def test_selection_leans_toward_informative_types_and_is_reproducible():
    cfg = TrainConfig(sessions_per_step=16, turns=3, curriculum=CurriculumConfig(mode="task", pool=4, floor=0.05))
    src = session_source(cfg)
    plain = training_sessions(cfg, 3, src)                          # no curriculum: the stream as drawn
    assert [s.id for s in plain] == [s.id for s in src.sessions(3, 16, 7_919)]
    cur = TaskCurriculum(cfg.curriculum, cfg.seed, cfg.turns)
    cur.q = {t: 0.05 for t in ("add", "background", "color", "material", "remove", "replace", "position", "size")}
    cur.q["count"] = 1.0
    pool = src.sessions(3, 64, 7_919)
    picked = training_sessions(cfg, 3, src, cur)
    assert len(picked) == 16 and len({s.id for s in picked}) == 16
    assert {s.id for s in picked} <= {s.id for s in pool}
    assert [s.id for s in training_sessions(cfg, 3, src, cur)] == [s.id for s in picked]   # same state, same draw

    def count_share(ss):
        types = [t.task_type for s in ss for t in s.turns]
        return types.count("count") / len(types)
    assert count_share(picked) > 2 * count_share(pool)
    with pytest.raises(ValueError, match="curriculum.mode"):
        CurriculumConfig(mode="hard")
    with pytest.raises(ValueError, match="curriculum.pool"):
        CurriculumConfig(pool=0)


def test_training_with_the_curriculum_resumes_exactly(small_ckpt, tmp_path):
    base = dict(init=f"tiny:{small_ckpt}", algorithm="nft", sessions_per_step=2, group=3, turns=2, rollout_steps=3,
                max_steps=3, minibatch=8, final_eval=False, threads=1, ckpt_every=1, lr=1e-3,
                adv={"group_filter": False}, curriculum={"mode": "task", "pool": 3, "decay": 0.5})
    cfg = load_config(TrainConfig, None, base)
    train(cfg, tmp_path / "full", log=lambda m: None)
    train(cfg, tmp_path / "cut", log=lambda m: None, stop_at=2)
    train(cfg, tmp_path / "cut", log=lambda m: None)

    full = untimed_rows(tmp_path / "full")
    assert full == untimed_rows(tmp_path / "cut")
    assert all(any(k.startswith("curriculum/q_") for k in r) for r in full)


def test_group_outcomes_benchmark_classifies_groups_among_live_trajectories():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "group_outcomes.py"
    spec = importlib.util.spec_from_file_location("group_outcomes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t, f = True, False
    alive = torch.tensor([t, t, f, t])
    assert mod.group_outcome(torch.tensor([t, t, f, t]), alive) == "pass"      # the dead one's failure is not counted
    assert mod.group_outcome(torch.tensor([f, f, t, f]), alive) == "fail"
    assert mod.group_outcome(torch.tensor([t, f, f, t]), alive) == "mixed"
    assert mod.group_outcome(torch.tensor([t, t, t, t]), torch.zeros(4, dtype=torch.bool)) == "dead"
