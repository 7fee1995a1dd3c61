"""VLM rewards in RL training (`reward.judge`), judged while the rollout runs, and training
sessions read from a sessions file (`suite`).

The HTTP judge is the loopback OpenAI-compatible server (tests/loopback_judge_server.py) with
answers decided by the images it is sent; the local judge is a tiny random Qwen2-VL built from
config (tests/tiny_vlm.py); the real editor is a tiny random FLUX.1-Kontext pipeline saved
with `save_pretrained` (tests/tiny_pipelines.py)."""

from __future__ import annotations

import hashlib
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
from editrl.judges import load_judge  # noqa: E402
from editrl.rl.advantages import AdvantageConfig, compute_advantages  # noqa: E402
from editrl.rl.rewards import RewardPipeline, TrainingSessions, _square  # noqa: E402
from editrl.rl.rollout import grouped_rollout  # noqa: E402
from editrl.rl.train import TrainConfig, train, training_sessions  # noqa: E402
from editrl.session import EditrlInputError  # noqa: E402
from editrl.world.io import png_bytes  # noqa: E402

NO_FILTERS = {"group_filter": False, "trajectory_filter": False}



def small_cfg(ckpt, **kw) -> TrainConfig:
    base = dict(init=f"tiny:{ckpt}", sessions_per_step=2, group=3, turns=2, rollout_steps=3, max_steps=2,
                minibatch=8, final_eval=False, threads=1, ckpt_every=1, lr=1e-3, adv=NO_FILTERS)
    base.update(kw)
    return load_config(TrainConfig, None, base)


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "elapsed_min"} for r in rs]


def by_last_image(check: str, body: dict) -> str:
    """A judge that looks at the images: "yes" or "no" from a hash of the last one sent."""
    urls = [p["image_url"]["url"] for m in body["messages"] if isinstance(m["content"], list)
            for p in m["content"] if p.get("type") == "image_url"]
    return "yes" if int(hashlib.sha256(urls[-1].encode()).hexdigest()[:8], 16) % 2 else "no"


def test_overlapped_judging_gives_the_same_run_as_judging_after_the_rollout(small_ckpt, tmp_path):
    """reward.overlap judges turn k on a thread while turn k+1 rolls out: the verdicts, hence
    every logged number but the timings, equal judging after the rollout."""
    for overlap in (True, False):
        train(small_cfg(small_ckpt, reward={"overlap": overlap}), tmp_path / str(overlap), log=lambda m: None)
    a, b = rows(tmp_path / "True"), rows(tmp_path / "False")
    assert untimed(a) == untimed(b)
    assert all(r["reward/judge_calls"] == 2 * 3 * 2 for r in a)     # B x G x K turns, each judged once
    assert all("time/reward_wait_s" in r for r in a)


def test_pipeline_judges_each_turn_as_it_is_done_and_errors_become_masks(small_ckpt, judge_server):
    """The HTTP judge receives turn 1's requests before turn 2 is sampled; with 30% faulty
    replies, every faulty check is a judge_error, the advantage of its sample is exactly 0 and
    masked, and the other samples keep their rewards."""
    judge_server.answer = by_last_image
    judge_server.fault_rate = 0.3
    judge = load_judge(f"vlm:{judge_server.url}", model=judge_server.model, concurrency=4)
    pipe = RewardPipeline(judge, overlap=True)
    ed = load_tiny(f"tiny:{small_ckpt}")
    cfg = small_cfg(small_ckpt)
    sessions = training_sessions(cfg, 0)
    src = TrainingSessions("shapes", 0, 2, 0.3, 0.6)
    sources = [src.source(s) for s in sessions]
    def hook(k, rows_k):
        assert len(rows_k) == 6 and all(len(imgs) == k + 1 for _, _, imgs in rows_k)
        pipe.turn_done(k, rows_k)
        assert len(pipe.pending) == k        # turn k is with the judge before turn k + 1 is sampled

    pipe.begin(sessions, 3, explicit=True)
    grouped_rollout(ed, sessions, sources, 3, 2, steps=2, generator=torch.Generator().manual_seed(0), on_turn=hook)
    verdicts, _ = pipe.verdicts()
    pipe.close()
    assert pipe.calls == 12
    flat = [v for b in verdicts for g in b for v in g]
    assert all(v is not None for v in flat)
    errors = [v for v in flat if v.has_error]
    assert judge_server.faults and errors            # some replies were faulty ...
    assert len(errors) < len(flat)                   # ... and the others were read
    res = compute_advantages(verdicts, AdvantageConfig(assignment="per_turn", group_filter=False,
                                                       trajectory_filter=False))
    for b in range(2):
        for g in range(3):
            for k in range(2):
                if verdicts[b][g][k].has_error:
                    assert not bool(res.mask[b, g, k]) and float(res.A[b, g, k]) == 0.0
    assert res.stats["count/judge_error_turns"] == len(errors)


def test_training_with_an_http_vlm_reward(small_ckpt, judge_server, tmp_path):
    """`reward.judge=vlm:URL`: rewards come from the server, faulty replies are counted and
    masked, the weights move, and the run resumes exactly (same replies for the same images)."""
    judge_server.answer = by_last_image
    judge_server.fault_rate = 0.3
    reward = {"judge": f"vlm:{judge_server.url}", "model": judge_server.model, "concurrency": 4}
    cfg = small_cfg(small_ckpt, algorithm="nft", reward=reward, max_steps=2)
    train(cfg, tmp_path / "full", log=lambda m: None)
    rs = rows(tmp_path / "full")
    assert [r["step"] for r in rs] == [1, 2]
    assert sum(r["count/judge_error_turns"] for r in rs) > 0
    assert all(r["reward/judge_calls"] == 12 for r in rs)
    assert all(0 < r["nft/samples"] < 12 or r["nft/samples"] == 0 for r in rs)
    assert judge_server.n_requests >= 24
    before = load_tiny(f"tiny:{small_ckpt}").state_dict()
    after = load_tiny(f"tiny:{tmp_path / 'full' / 'final'}").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    train(cfg, tmp_path / "cut", log=lambda m: None, stop_at=1)
    train(cfg, tmp_path / "cut", log=lambda m: None)
    assert untimed(rows(tmp_path / "cut")) == untimed(rs)


@pytest.fixture(scope="module")
def tiny_vlm_path(tmp_path_factory):
    from tiny_vlm import save_tiny_qwen2vl

    return save_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"))


def test_a_local_vlm_that_cannot_answer_trains_nothing(small_ckpt, tiny_vlm_path, tmp_path):
    """A random tiny Qwen2-VL (`reward.judge=vlm-local:PATH`) writes no parseable verdict:
    every turn is a judge_error, every sample is masked, the steps are skipped, the weights
    stay as they were. No reward is made up."""
    cfg = small_cfg(small_ckpt, reward={"judge": f"vlm-local:{tiny_vlm_path}", "max_tokens": 8},
                    sessions_per_step=1, group=2, max_steps=1)
    train(cfg, tmp_path / "run", log=lambda m: None)
    (r,) = rows(tmp_path / "run")
    assert r["count/judge_error_turns"] == 1 * 2 * 2
    assert r["skipped"] == "no trained sample (all masked)"
    before = load_tiny(f"tiny:{small_ckpt}").state_dict()
    after = load_tiny(f"tiny:{tmp_path / 'run' / 'final'}").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ sessions from a file

def write_suite(root, sizes=((40, 56), (64, 48), (50, 50))) -> object:
    """A sessions file (editrl schema) of photos-like random images of different sizes."""
    rng = np.random.RandomState(0)
    lines = []
    for i, (h, w) in enumerate(sizes):
        (root / f"src{i}.png").write_bytes(png_bytes((rng.rand(h, w, 3) * 255).astype(np.uint8)))
        lines.append(json.dumps({"id": f"s{i}", "source_image": f"src{i}.png", "turns": [
            {"instruction": "make the cup red", "explicit": "make the cup red", "task_type": "color"},
            {"instruction": "now remove it", "explicit": "remove the red cup", "task_type": "remove", "pronoun": True}]}))
    path = root / "sessions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_file_suite_sessions_are_shuffled_passes_and_sources_one_size(tmp_path):
    path = write_suite(tmp_path)
    src = TrainingSessions(str(path), seed=3, turns=2, constraint_share=0.3, pronoun_prob=0.6, image_size=32)
    first = [s.id for step in range(3) for s in src.sessions(step, 1, 0)]
    assert sorted(first) == ["s0", "s1", "s2"]                           # one pass: each session once
    assert [s.id for s in src.sessions(1, 2, 0)] == [s.id for s in src.sessions(1, 2, 0)]   # pure in (seed, step)
    assert all(src.source(s).shape == (32, 32, 3) for s in src.suite.sessions)
    keep = TrainingSessions(str(path), seed=3, turns=2, constraint_share=0.3, pronoun_prob=0.6)
    keep.source(keep.suite.sessions[0])
    with pytest.raises(EditrlInputError, match="image_size"):
        keep.source(keep.suite.sessions[1])
    img = (np.arange(40 * 60 * 3) % 255).astype(np.uint8).reshape(40, 60, 3)
    out = _square(img, 20)                                   # 40x60 -> 20x30 -> centre 20x20
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    sq = np.ascontiguousarray(img[:20, :20])
    assert np.array_equal(_square(sq, 20), sq)              # already the size: unchanged
    flat = np.full((30, 50, 3), 77, np.uint8)
    assert (_square(flat, 10) == 77).all()                  # a flat image stays flat


def test_program_reward_on_a_file_suite_is_a_one_line_error(tmp_path):
    path = write_suite(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "editrl.cli", "train", "--config", "shapes-nft", f"suite={path}",
                        "max_steps=1", "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert "program judge needs ShapesWorld sessions" in p.stderr.strip().splitlines()[-1]


def test_kontext_lora_trained_on_a_sessions_file_with_an_http_vlm_reward(judge_server, tmp_path):
    """The real-editor path end to end from the command line: a tiny FLUX.1-Kontext pipeline
    (save_pretrained), sessions of real-size images from a JSONL file brought to 32x32, rewards
    from the OpenAI-compatible judge; the LoRA is trained and written."""
    from tiny_pipelines import save_tiny_flux_kontext
    from editrl.editors import load_editor

    judge_server.answer = by_last_image
    model = save_tiny_flux_kontext(tmp_path / "kontext")
    path = write_suite(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["train", "--config", "kontext-nft", f"model.path={model}", f"suite={path}", "image_size=32",
            f"reward.judge=vlm:{judge_server.url}", f"reward.model={judge_server.model}", "max_steps=1",
            "final_eval=false", "sessions_per_step=2", "group=2", "turns=2", "rollout_steps=2", "minibatch=4",
            "threads=1", "model.dtype=float32", "model.lora_rank=4", "model.max_sequence_length=16",
            "model.gradient_checkpointing=false", "adv.group_filter=false", "adv.trajectory_filter=false",
            "--out", str(run)]
    p = subprocess.run([sys.executable, "-m", "editrl.cli", *args], capture_output=True, text=True, env=env, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    (r,) = rows(run)
    assert r["reward/judge_calls"] == 2 * 2 * 2 and judge_server.n_requests >= 8
    assert r["nft/samples"] > 0
    sent = [m for body in judge_server.requests for m in body["messages"]]
    assert any("make the cup red" in json.dumps(m) for m in sent)
    trained = load_editor(f"flux-kontext:{run / 'final'}")
    assert any(bool(v.abs().sum() > 0) for k, v in trained.state_dict().items() if "lora_B" in k)
