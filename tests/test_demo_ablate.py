"""`editrl demo` (bench -> multi-turn NFT -> bench -> before/after report) and `editrl ablate`
(design studies over seeds, paired intervals), end to end at toy budgets, plus the table math."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from editrl.rl.ablate import STUDIES, AblateConfig, bootstrap_ci, markdown, summarise  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TOY = ["sessions_per_step=2", "group=2", "rollout_steps=2", "threads=1"]


def run(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "editrl.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_demo_end_to_end_writes_before_after_and_resumes(tmp_path):
    out = tmp_path / "demo"
    p = run(["demo", "--out", str(out), "--sessions", "3", "--minutes", "0.01", *TOY])
    assert p.returncode == 0, p.stderr
    last = json.loads(p.stdout.strip().splitlines()[-1])
    before = json.loads((out / "before" / "results.json").read_text())["per_turn"]
    after = json.loads((out / "after" / "results.json").read_text())["per_turn"]
    assert last["before"] == before and last["after"] == after
    assert [r["turn"] for r in before] == [1, 2, 3] and all(r["n"] == 3 for r in after)
    html = (out / "report.html").read_text()
    assert "before and after" in html and html.count("data:image/png;base64,") >= 2 + 3 * (1 + 2 * 3)
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["common_sessions"] == 3 and len(cmp["per_turn"]) == 3
    assert sum(r["turns"] for r in cmp["by_task"]) == 9 and "By task type" in html
    # after benchmarks the post-trained weights, not the shipped ones
    assert "train/final/model.safetensors" in json.loads((out / "after" / "results.json").read_text())["editor"]
    # a re-run resumes: no new image is generated, the same result comes back
    p2 = run(["demo", "--out", str(out), "--sessions", "3", "--minutes", "0.01", *TOY])
    assert p2.returncode == 0, p2.stderr
    assert json.loads(p2.stdout.strip().splitlines()[-1])["after"] == after


def test_demo_bad_input_is_one_line_error(tmp_path):
    p = run(["demo", "--out", str(tmp_path / "d"), "--minutes", "0"])
    assert p.returncode == 2 and "minutes must be positive" in p.stderr and "Traceback" not in p.stderr
    p = run(["demo", "--out", str(tmp_path / "d2"), "--minutes", "0.01", "group=1"])
    assert p.returncode == 2 and "group must be at least 2" in p.stderr and "Traceback" not in p.stderr


def test_ablate_toy_run_has_every_arm_and_intervals(tmp_path):
    out = tmp_path / "abl"
    p = run(["ablate", "--out", str(out), "--studies", "control,fusion", "--seeds", "1", "--minutes", "0.01",
             "--sessions", "2", *TOY])
    assert p.returncode == 0, p.stderr
    t = json.loads((out / "ablation.json").read_text())
    arms = {r["arm"] for s in t["studies"] for r in s["rows"]}
    assert arms == {"base", "supervised", "reward_fusion"}
    for s in t["studies"]:
        for r in s["rows"]:
            assert len(r["success_all"]) == 3 and all(c is not None for c in r["ci95"])
            assert r["seeds"] == 1
    md = (out / "ablation.md").read_text()
    assert "| control | supervised |" in md and "| fusion | reward_fusion |" in md
    bad = run(["ablate", "--out", str(out), "--studies", "nope"])
    assert bad.returncode == 2 and "unknown study" in bad.stderr


def test_summarise_paired_differences_and_bootstrap():
    # 4 sessions x 3 turns; arm "x" succeeds everywhere the base does plus one more session at turn 3
    base = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], float)
    better = base.copy()
    better[3, 2] = 1
    cfg = AblateConfig(out=None, studies=["fusion"], seeds=2, bootstrap=200)
    t = summarise(cfg, {"base": [base, base], "reward_fusion": [better, base]}, base)
    rows = {r["arm"]: r for r in t["studies"][0]["rows"]}
    assert rows["base"]["success_all"] == [0.75, 0.5, 0.25]
    # averaged over the two seeds, session 4 succeeds half the time at turn 3
    assert rows["reward_fusion"]["success_all"][2] == pytest.approx(0.375)
    assert rows["reward_fusion"]["vs_reference"]["diff"] == pytest.approx(0.125)
    assert rows["reward_fusion"]["seed_values_at_K"] == [0.5, 0.25]
    lo, hi = rows["reward_fusion"]["vs_reference"]["ci95"]
    assert 0.0 <= lo <= 0.125 <= hi <= 0.5
    assert "reward_fusion" in markdown(t)
    assert bootstrap_ci(np.ones(5), 100, 0) == (1.0, 1.0) and bootstrap_ci(np.ones(5), 0, 0) is None
    assert set(STUDIES) >= {"assignment", "fusion", "scoring", "aggregation", "trajectory_filter", "algorithm",
                            "train_turns", "branching", "control"}


def test_assignment_study_compares_the_base_with_the_other_assignment(tmp_path):
    """The base preset's own assignment is never run a second time as the 'other' arm."""
    from editrl.rl.ablate import AblateConfig, arms, study_arms

    per_turn_base = AblateConfig(out=tmp_path, studies=["assignment"])               # shapes-nft: per_turn
    assert study_arms(per_turn_base, "assignment") == [("base", []), ("broadcast", ["adv.assignment=broadcast"])]
    broadcast_base = AblateConfig(out=tmp_path, studies=["assignment"], overrides=["adv.assignment=broadcast"])
    assert arms(broadcast_base) == {"base": [], "per_turn": ["adv.assignment=per_turn"]}


def test_aggregation_study_runs_on_broadcast_assignment(tmp_path):
    """Per-turn assignment ignores turn aggregation: on the per-turn preset the study's arms
    carry broadcast assignment, its reference being the assignment study's broadcast arm."""
    from editrl.rl.ablate import AblateConfig, arms, study_arms

    per_turn_base = AblateConfig(out=tmp_path, studies=["assignment", "aggregation"])   # shapes-nft: per_turn
    agg = study_arms(per_turn_base, "aggregation")
    assert agg[0] == ("broadcast", ["adv.assignment=broadcast"])
    assert agg[1] == ("broadcast_agg_min", ["adv.assignment=broadcast", "adv.aggregation=min"])
    assert len(agg) == 6 and all(ov[0] == "adv.assignment=broadcast" for _, ov in agg)
    assert list(arms(per_turn_base)) == ["base", "broadcast"] + [name for name, _ in agg[1:]]   # broadcast runs once
    broadcast_base = AblateConfig(out=tmp_path, studies=["aggregation"], overrides=["adv.assignment=broadcast"])
    assert study_arms(broadcast_base, "aggregation")[:2] == [("base", []), ("agg_min", ["adv.aggregation=min"])]


def test_scoring_study_compares_the_base_with_every_other_scoring(tmp_path):
    from editrl.rl.ablate import AblateConfig, study_arms

    binary_base = AblateConfig(out=tmp_path, studies=["scoring"])                     # shapes-nft: binary
    assert study_arms(binary_base, "scoring") == [("base", []), ("graded", ["adv.scoring=graded"]),
                                                  ("hybrid", ["adv.scoring=hybrid"])]
    graded_base = AblateConfig(out=tmp_path, studies=["scoring"], overrides=["adv.scoring=graded"])
    assert study_arms(graded_base, "scoring") == [("base", []), ("binary", ["adv.scoring=binary"]),
                                                  ("hybrid", ["adv.scoring=hybrid"])]


def test_ablate_parallel_jobs_match_the_table_layout_and_resume(tmp_path):
    """--jobs 2 runs (arm, seed) pairs in two processes; the table has every arm and seed, and
    a re-run finds every run done (nothing is trained again)."""
    out = tmp_path / "abl"
    args = ["ablate", "--out", str(out), "--studies", "fusion", "--seeds", "2", "--minutes", "0.01", "--sessions", "2",
            "--jobs", "2", "--threads", "1", *TOY]
    p = run(args)
    assert p.returncode == 0, p.stderr
    t = json.loads((out / "ablation.json").read_text())
    rows = {r["arm"]: r for r in t["studies"][0]["rows"]}
    assert set(rows) == {"base", "reward_fusion"} and all(r["seeds"] == 2 for r in rows.values())
    marks = sorted((out / "runs").glob("*/seed_*/bench/results.json"))
    assert len(marks) == 4
    before = [m.stat().st_mtime_ns for m in marks]
    assert run(args).returncode == 0
    assert [m.stat().st_mtime_ns for m in marks] == before


def test_training_curve_moving_mean_has_no_edge_dip_and_skips_missing_steps():
    """The demo report's rollout curve: a constant series stays constant to its ends (no zero
    padding), interior points equal the plain moving average, and a step without the metric
    is left out of its windows instead of counting as 0."""
    from editrl.demo_report import moving_mean

    assert np.allclose(moving_mean(np.full(9, 0.8), 4), 0.8)
    y = np.arange(10.0)
    plain = np.convolve(y, np.ones(3) / 3, mode="same")
    assert np.allclose(moving_mean(y, 3)[1:-1], plain[1:-1])
    assert moving_mean(y, 3)[0] == pytest.approx(0.5) and moving_mean(y, 3)[-1] == pytest.approx(8.5)
    gappy = np.array([0.9, np.nan, 0.9, 0.9, np.nan, np.nan, np.nan, 0.6])
    out = moving_mean(gappy, 3)
    assert np.allclose(out[:4], 0.9) and np.isnan(out[5]) and out[-1] == pytest.approx(0.6)
    assert np.array_equal(moving_mean(y, 1), y)


def test_branching_study_runs_every_other_branching_on_per_turn_assignment(tmp_path):
    from editrl.rl.ablate import AblateConfig, arms, study_arms

    per_turn_base = AblateConfig(out=tmp_path, studies=["branching"])                 # shapes-nft: per_turn, none
    assert study_arms(per_turn_base, "branching") == [("base", []), ("branch_success", ["branch=success"]),
                                                       ("branch_random", ["branch=random"])]
    success_base = AblateConfig(out=tmp_path, studies=["branching"], overrides=["branch=success"])
    assert arms(success_base) == {"base": [], "branch_none": ["branch=none"], "branch_random": ["branch=random"]}
    broadcast_base = AblateConfig(out=tmp_path, studies=["branching"], overrides=["adv.assignment=broadcast"])
    assert study_arms(broadcast_base, "branching") == [
        ("per_turn", ["adv.assignment=per_turn"]),
        ("per_turn_branch_success", ["adv.assignment=per_turn", "branch=success"]),
        ("per_turn_branch_random", ["adv.assignment=per_turn", "branch=random"])]
