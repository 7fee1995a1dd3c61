"""One RL step's rollouts, verdicts, advantages and NFT gradient on this rank's shard of a fixed
global batch; run by tests/test_distributed.py as 1 plain process or W processes under
`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes W ...` (gloo).

Writes OUT/rank<r>.pt: the global advantages and mask (same on every rank), this rank's slice,
the global-mean NFT loss, the global trained-sample count and the all-reduced gradient of every
trainable parameter (flattened).

    python tests/dist_worker.py --ckpt MODEL.safetensors --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from editrl.config import load_config  # noqa: E402
from editrl.editors.tiny import load_tiny  # noqa: E402
from editrl.judges.program import ProgramJudge  # noqa: E402
from editrl.rl import distributed as D  # noqa: E402
from editrl.rl import train as T  # noqa: E402
from editrl.rl.advantages import compute_advantages  # noqa: E402
from editrl.world.grammar import session_scenes  # noqa: E402
from editrl.world.render import render  # noqa: E402

STEP = 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sessions", type=int, default=4)
    args = ap.parse_args()

    if D.launched():
        try:   # the accelerate way (gloo on CPU under ACCELERATE_USE_CPU); plain torch as fallback
            from accelerate import PartialState
            PartialState()
        except ImportError:
            pass
        D.init_from_env("gloo")
    r, w = D.rank(), D.world_size()

    cfg = load_config(T.TrainConfig, None, dict(
        init=f"tiny:{args.ckpt}", sessions_per_step=args.sessions, group=3, turns=2, rollout_steps=3, minibatch=4,
        threads=1, final_eval=False, nft_shared_noise=True,
        adv={"group_filter": False, "trajectory_filter": False}))
    B, G, K = cfg.sessions_per_step, cfg.group, cfg.turns

    policy = load_tiny(cfg.init)
    params = [p for p in policy.trainable_parameters() if p.requires_grad]
    D.broadcast_params_(params)          # identical start on every rank (DDP does this when wrapping)
    old = policy.policy_copy()

    # rollouts of this rank's whole groups, one generator per global session
    sessions = T.training_sessions(cfg, STEP)
    a, b = D.shard_bounds(B, r, w)
    local = D.shard(sessions, r, w)
    gidx = list(range(a, b))
    sources = [render(session_scenes(s)[0]) for s in local]
    old.set_training(False)
    ro = D.rollout_sessions(old, local, sources, G, K, gidx,
                            lambda gi: D.session_generator(cfg.seed, STEP, 0, gi),
                            form=cfg.form, steps=cfg.rollout_steps, solver=cfg.solver, noise_level=cfg.noise_level)

    # rewards on the shard, advantages on the global batch, then this rank's slice
    verdicts = T.judge_rollout(ProgramJudge(), local, ro)
    adv = compute_advantages(D.gather_verdicts(verdicts), cfg.adv)
    A, mask = D.local_slice(adv.A, B, r, w), D.local_slice(adv.mask, B, r, w)

    # NFT gradient over the shard's trained samples, scaled to the global sample mean, all-reduced
    def draws_fn(shape):   # per-global-session re-noising tables, as train.py draws them
        return D.nft_draws(lambda gi: D.session_generator(cfg.seed, STEP, 1, gi), gidx, G, K, shape,
                           cfg.nft_sigma_min, cfg.nft_shared_noise)

    policy.set_training(True)
    st = T.nft_update(cfg, policy, old, None, ro, A, mask, torch.Generator(), draws_fn)
    n_local = int(st["nft/samples"])
    n_global = D.global_count(n_local)
    D.scale_grads_(params, D.grad_scale(n_local, n_global, reduce="mean"))
    D.sync_gradients_(params, mean=True)
    loss = D.global_mean(st.get("nft/loss", 0.0), n_local)
    stats = D.all_reduce_mean({"nft/loss": st.get("nft/loss", float("nan"))}, weights={"nft/loss": n_local})

    A_gathered, mask_gathered = D.gather_verdict_tensors(A, mask)     # padded all-gather of [B_local, G, K]

    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    os.makedirs(args.out, exist_ok=True)
    torch.save({"rank": r, "world": w, "bounds": (a, b), "A_global": adv.A, "mask_global": adv.mask,
                "A_local": A, "mask_local": mask,
                "A_gathered": A_gathered, "mask_gathered": mask_gathered, "loss": loss, "loss_weighted_stat": stats.get("nft/loss"),
                "n_local": n_local, "n_global": n_global, "grad": grad, "is_main": D.is_main(),
                "session_ids": ro.session_ids, "adv_stats": adv.stats},
               os.path.join(args.out, f"rank{r}.pt"))
    D.barrier()
    if D.initialized():
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
