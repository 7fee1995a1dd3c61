"""Multi-process RL (issue 7): 2 CPU processes under `accelerate launch` (gloo) give the same
global advantages, loss and all-reduced gradient as 1 process on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from editrl.editors.tiny import TinyConfig, TinyEditor  # noqa: E402
from editrl.rl import distributed as D  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
SMALL = TinyConfig(channels=(16, 32, 32), blocks=(1, 1, 1), text_dim=32, text_layers=1, heads=2)
SESSIONS = 5          # uneven over 2 ranks (3 + 2 groups): checks the global sample weighting


def test_shard_bounds_whole_contiguous_deterministic():
    for n in range(0, 12):
        for w in range(1, 5):
            blocks = [D.shard_bounds(n, r, w) for r in range(w)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(blocks[i][1] == blocks[i + 1][0] for i in range(w - 1))
            sizes = [b - a for a, b in blocks]
            assert max(sizes) - min(sizes) <= 1
            items = list(range(n))
            assert sum((D.shard(items, r, w) for r in range(w)), []) == items
    assert D.local_slice(torch.arange(5), rank=1, world=2).tolist() == [3, 4]
    with pytest.raises(ValueError):
        D.shard_bounds(4, 2, 2)


def test_single_process_paths_are_no_ops():
    assert not D.initialized() and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(D.all_gather_padded(x), x)
    assert D.gather_verdicts([[1], [2]]) == [[1], [2]]
    assert D.all_reduce_mean({"a": 1.5}) == {"a": 1.5}
    assert D.grad_scale(7) == 1.0 and D.global_mean(2.0, 3) == 2.0 and D.global_count(4) == 4.0
    g1, g2 = D.session_generator(0, 1, 0, 3), D.session_generator(0, 1, 0, 3)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd: list[str], timeout: int = 120, fsdp: bool = False) -> subprocess.CompletedProcess:
    env = _env()
    if fsdp:
        env["ACCELERATE_USE_FSDP"] = "true"
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _accelerate_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    if exe.exists():
        return [str(exe)]
    if shutil.which("accelerate"):
        return [shutil.which("accelerate")]
    return [sys.executable, "-m", "accelerate.commands.launch"]


def _small_ckpt(tmp_path: Path) -> tuple[TinyEditor, Path]:
    """A small random tiny editor (non-zero output layer) saved to tmp_path."""
    torch.manual_seed(0)
    ed = TinyEditor(SMALL)
    torch.nn.init.normal_(ed.net.out.weight, std=0.05)
    ckpt = tmp_path / "model.safetensors"
    ed.save(ckpt)
    return ed, ckpt


def _launch_two() -> list[str]:
    """`accelerate launch` for 2 gloo processes (`--cpu --num_processes 2` silently starts ONE
    process; --multi_gpu with ACCELERATE_USE_CPU gives gloo DDP)."""
    launch = _accelerate_cmd()
    if launch[-1] != "accelerate.commands.launch":
        launch = launch + ["launch"]
    return [*launch, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port())]


def test_two_processes_match_one_process(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    ed, ckpt = _small_ckpt(tmp_path)
    args = [str(WORKER), "--ckpt", str(ckpt), "--sessions", str(SESSIONS)]

    _run([sys.executable, *args, "--out", str(tmp_path / "one")])
    _run([*_launch_two(), *args, "--out", str(tmp_path / "two")])

    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    assert one["world"] == 1 and [d["world"] for d in ranks] == [2, 2], "accelerate did not start 2 processes"
    assert [d["bounds"] for d in ranks] == [(0, 3), (3, 5)] and [d["is_main"] for d in ranks] == [True, False]
    assert ranks[0]["session_ids"] + ranks[1]["session_ids"] == one["session_ids"]

    # advantages: computed on the gathered global batch, identical to 1 process, bit for bit
    assert one["mask_global"].any() and one["A_global"].abs().sum() > 0
    for d in ranks:
        assert torch.equal(d["A_global"], one["A_global"]) and torch.equal(d["mask_global"], one["mask_global"])
        a, b = d["bounds"]
        assert torch.equal(d["A_local"], one["A_global"][a:b]) and torch.equal(d["mask_local"], one["mask_global"][a:b])
        assert d["adv_stats"] == one["adv_stats"]
        assert torch.equal(d["A_gathered"], one["A_global"]) and torch.equal(d["mask_gathered"], one["mask_global"])
    assert ranks[0]["n_local"] + ranks[1]["n_local"] == one["n_local"] == one["n_global"] == ranks[0]["n_global"]
    assert ranks[0]["n_local"] != ranks[1]["n_local"]          # the uneven split is really exercised

    # global-mean NFT loss and the all-reduced gradient match 1 process
    for d in ranks:
        assert d["loss"] == pytest.approx(one["loss"], abs=1e-5, rel=1e-5)
        assert d["loss_weighted_stat"] == pytest.approx(one["loss"], abs=1e-5, rel=1e-5)
        g, g1 = d["grad"], one["grad"]
        assert g1.abs().max() > 0
        assert torch.allclose(g, g1, atol=1e-5, rtol=0)
        assert float((g - g1).norm() / g1.norm()) < 1e-5
    assert torch.equal(ranks[0]["grad"], ranks[1]["grad"])     # every rank holds the same gradient


def _train_rows(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def _assert_same_rows(one: list[dict], two: list[dict]) -> None:
    assert len(one) == len(two)
    for a, b in zip(one, two):
        for k, v in a.items():
            if k.startswith("time/") or k == "elapsed_min":
                continue
            if isinstance(v, float):
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
            else:
                assert b[k] == v, k


def test_editrl_train_two_processes_match_one(tmp_path):
    """`editrl train` itself under `accelerate launch` (2 gloo processes) gives the metrics and the
    final weights of one process with per-session random streams (session_rng=true)."""
    from editrl.editors.tiny import load_tiny

    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    ed, ckpt = _small_ckpt(tmp_path)
    over = [f"init=tiny:{ckpt}", "sessions_per_step=3", "group=3", "turns=2", "rollout_steps=2", "max_steps=2",
            "minibatch=8", "final_eval=false", "eval_every=0", "threads=1", "session_rng=true", "lr=1e-3",
            "adv.group_filter=false", "adv.trajectory_filter=false", "ckpt_every=1",
            "adv.scoring=graded", "ema_decay=0"]    # graded: a random toy editor's binary scores are all 0 (no gradient)
    _run([sys.executable, "-m", "editrl.cli", "train", "--config", "shapes-nft", "--out", str(tmp_path / "one"), *over],
         timeout=240)
    _run([*_launch_two(), "-m", "editrl.cli", "train",
          "--config", "shapes-nft", "--out", str(tmp_path / "two"), *over], timeout=240)

    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert len(one) == len(two) == 2                              # rank 0 alone writes metrics
    _assert_same_rows(one, two)
    wa = load_tiny(f"tiny:{tmp_path / 'one' / 'final'}").state_dict()
    wb = load_tiny(f"tiny:{tmp_path / 'two' / 'final'}").state_dict()
    # The all-reduce sums gradients in another order (differences ~1e-9); AdamW's first steps
    # divide by sqrt(v), so parameters whose gradient is ~0 amplify that to a few % of one
    # update (measured: max 6e-5 against updates of 2e-3 at lr 1e-3). Hence: within 10% of
    # the largest update, while every logged metric above agrees to 1e-4.
    moved = max(float((wa[k] - ed.state_dict()[k]).abs().max()) for k in wa)
    assert moved > 1e-4                                                   # it trained
    assert all(torch.allclose(wa[k], wb[k], atol=0.1 * moved) for k in wa)


def test_deepspeed_launch_is_refused(monkeypatch):
    """A DeepSpeed launch would silently keep a whole model per process: refused."""
    from editrl.session import EditrlInputError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(EditrlInputError, match="fsdp.yaml"):
        D.init_from_env()


def _launch_fsdp_yaml() -> list[str]:
    """The shipped recipes/accelerate/fsdp.yaml, on 2 CPU processes (ACCELERATE_USE_CPU gives gloo)."""
    launch = _accelerate_cmd()
    if launch[-1] != "accelerate.commands.launch":
        launch = launch + ["launch"]
    return [*launch, "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
            "--main_process_port", str(_free_port())]


@pytest.mark.parametrize("algo", ["shapes-nft", "shapes-grpo"])
def test_fsdp_two_processes_match_one(tmp_path, algo):
    """`editrl train` launched with recipes/accelerate/fsdp.yaml (2 gloo processes): the residual
    blocks are sharded with FSDP2 (each rank holds half), 5 sessions split 3 / 2 make the ranks
    run different numbers of rollouts and micro-batches (padded in lockstep), and the run still
    gives the 1-process metrics, final weights and a resumable checkpoint."""
    from editrl.checkpoint import load_state
    from editrl.editors.tiny import ResBlock, load_tiny

    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    ed, ckpt = _small_ckpt(tmp_path)
    over = [f"init=tiny:{ckpt}", "sessions_per_step=5", "group=2", "turns=2", "rollout_steps=2", "max_steps=2",
            "minibatch=4", "final_eval=true", "eval_sessions=2", "eval_steps=2", "eval_every=0", "threads=1",
            "session_rng=true", "lr=1e-3", "adv.group_filter=false", "adv.trajectory_filter=false", "ckpt_every=1",
            "adv.scoring=graded", "ema_decay=0"]    # graded: a random toy editor's binary scores are all 0 (no gradient)
    if algo == "shapes-grpo":
        over += ["window=0", "kl_beta=0.01"]
    _run([sys.executable, "-m", "editrl.cli", "train", "--config", algo, "--out", str(tmp_path / "one"), *over],
         timeout=240)
    two = tmp_path / "two"
    res = _run([*_launch_fsdp_yaml(), "-m", "editrl.cli", "train", "--config", algo, "--out", str(two), "max_steps=1",
                *over[:5], *over[6:]], timeout=240)
    n_blocks = sum(isinstance(m, ResBlock) for m in ed.net.modules())
    assert f"FSDP: {n_blocks} modules sharded over 2 processes" in res.stdout + res.stderr
    # resume the sharded run from its (gathered) checkpoint for the second step
    _run([*_launch_two(), "-m", "editrl.cli", "train", "--config", algo, "--out", str(two), *over], timeout=240, fsdp=True)

    _assert_same_rows(_train_rows(tmp_path / "one"), _train_rows(two))
    wa = load_tiny(f"tiny:{tmp_path / 'one' / 'final'}").state_dict()
    wb = load_tiny(f"tiny:{two / 'final'}").state_dict()
    moved = max(float((wa[k] - ed.state_dict()[k]).abs().max()) for k in wa)
    assert moved > 1e-4                                                   # it trained
    assert all(torch.allclose(wa[k], wb[k], atol=0.1 * moved) for k in wa)  # see the DDP test above
    # rank 0 evaluated the gathered weights (the other rank waited): same verdicts as 1 process
    ra, rb = (json.loads((d / "eval" / "final" / "results.json").read_text()) for d in (tmp_path / "one", two))
    assert rb["n_sessions"] == ra["n_sessions"] == 2
    assert [t["success_all"] for t in rb["per_turn"]] == [t["success_all"] for t in ra["per_turn"]]
    # the checkpoint holds full (gathered) tensors of the model and the optimizer
    tensors, _ = load_state(two / "state.safetensors")
    for k, v in ed.state_dict().items():
        assert tensors[f"model/{k}"].shape == v.shape, k


@pytest.mark.parametrize("preset,kind", [("kontext-nft", "flux-kontext"), ("qwen-edit-grpo", "qwen-edit")])
def test_fsdp_lora_on_diffusers_editors_matches_one_process(tmp_path, preset, kind):
    """A diffusers editor with LoRA under FSDP (its transformer blocks and the transformer
    sharded; the old policy and the reference are the second adapter / the disabled adapter of
    that same sharded transformer): 2 processes give the 1-process metrics and LoRA weights."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install accelerate)")
    from safetensors.torch import load_file
    from tiny_pipelines import save_tiny_flux_kontext, save_tiny_qwen_edit

    model = (save_tiny_flux_kontext if kind == "flux-kontext" else save_tiny_qwen_edit)(tmp_path / "pipe")
    over = [f"model.path={model}", "sessions_per_step=3", "group=2", "turns=2", "rollout_steps=2", "minibatch=4",
            "threads=1", "model.dtype=float32", "model.lora_rank=4", "model.max_sequence_length=16",
            "model.gradient_checkpointing=false", "adv.group_filter=false", "adv.trajectory_filter=false",
            "session_rng=true", "final_eval=false", "eval_every=0", "max_steps=2"]
    _run([sys.executable, "-m", "editrl.cli", "train", "--config", preset, "--out", str(tmp_path / "one"), *over],
         timeout=240)
    res = _run([*_launch_two(), "-m", "editrl.cli", "train", "--config", preset, "--out", str(tmp_path / "two"), *over],
               timeout=240, fsdp=True)
    assert "modules sharded over 2 processes" in res.stdout + res.stderr
    _assert_same_rows(_train_rows(tmp_path / "one"), _train_rows(tmp_path / "two"))
    a = load_file(tmp_path / "one" / "final" / "lora.safetensors")
    b = load_file(tmp_path / "two" / "final" / "lora.safetensors")
    assert a.keys() == b.keys()
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-5       # it trained
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k        # measured: 1.5e-8
