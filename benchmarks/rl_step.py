"""Time of one multi-turn RL step, split into rollout / reward / loss / optimiser, against the
model's own unavoidable passes measured in the same process.

For each variant (DiffusionNFT with ODE rollouts, Flow-GRPO with the SDE on every step, Flow-GRPO
with a 3-step SDE window) it runs `editrl.rl.train.train` for warm-up + N steps (no evaluation)
and reads the per-phase times from metrics.jsonl. Then it times the passes that step cannot
avoid, with the same batch sizes:

* rollout: K turns x (text encoding + T net forwards) at batch B*G, no gradient, with the
  instructions of the timed run's sessions turn by turn (longer texts cost more attention);
* update, NFT: per trained sample one old-policy forward (no gradient) + one forward and
  backward of θ, in minibatches of `minibatch`;
* update, GRPO: per stored in-window transition one forward and backward of θ;
* plus, in either, one reference forward (no gradient) per trained sample when the config
  asks for a reference term (GRPO `kl_beta > 0`, NFT `nft_ref_weight > 0`): the KL to the
  reference cannot be had without it.

overhead = step time / unavoidable time (target <= 1.15); the reward (program judge) is
reported separately, as `overhead_model` excludes it. Peak RSS is the process's.

    python benchmarks/rl_step.py [--steps 6] [--sessions 8 --group 8 --turns 3 --T 10] [--out runs/bench/rl_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls after one warm-up call (this VM's speed drifts by ~10%)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def unavoidable_rollout(ed, n: int, K: int, T: int, texts_by_turn: list[list[str]]) -> float:
    """K x (encode + T forwards) at batch n, no gradient, with each turn's real instructions
    (their token count sets the cross-attention cost)."""
    src = torch.rand(n, 3, ed.cfg.canvas, ed.cfg.canvas) * 2 - 1
    sig = ed.sigmas(T)

    @torch.no_grad()
    def run():
        for k in range(K):
            cond = ed.encode(src, texts_by_turn[k][:n], [[] for _ in range(n)])
            x = torch.randn_like(src)
            for i in range(T):
                ed.velocity(x, sig[i].expand(n), cond)

    return timed(run)


def unavoidable_update(ed, frozen: list, n_samples: int, minibatch: int, texts: list[str]) -> float:
    """Forward+backward of θ plus one no-grad forward of each `frozen` model (NFT's old policy,
    the reference) over n_samples in minibatches."""
    c = ed.cfg.canvas
    ed.net.train()

    def run():
        left = n_samples
        while left > 0:
            m = min(minibatch, left)
            left -= m
            src = torch.rand(m, 3, c, c) * 2 - 1
            x = torch.randn(m, 3, c, c)
            s = torch.rand(m) * 0.9 + 0.05
            for other in frozen:
                with torch.no_grad():
                    other.velocity(x, s, other.encode(src, texts[:m], [[] for _ in range(m)]))
            v = ed.velocity(x, s, ed.encode(src, texts[:m], [[] for _ in range(m)]))
            (v ** 2).mean().backward()
        ed.net.zero_grad(set_to_none=True)

    t = timed(run)
    ed.net.eval()
    return t


def run_variant(name: str, overrides: dict, args) -> dict:
    from editrl.config import load_config
    from editrl.editors import load_editor
    from editrl.rl.train import TrainConfig, train, training_sessions
    from editrl.rollout import turn_texts

    base = {"sessions_per_step": args.sessions, "group": args.group, "turns": args.turns, "rollout_steps": args.T,
            "max_steps": args.steps + 1, "eval_every": 0, "final_eval": False, "ckpt_every": 10_000,
            "threads": args.threads, "init": args.editor}
    preset = overrides.pop("preset")
    items = {**base, **overrides}
    cfg = load_config(TrainConfig, preset, [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in items.items()])
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run", log=lambda m: None)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    phases = {p: float(np.mean([r.get(f"time/{p}_s", 0.0) for r in rows])) for p in ("rollout", "reward", "loss", "optim")}
    step = sum(phases.values())
    ed = load_editor(args.editor)
    old = load_editor(args.editor)
    # the instructions the timed steps rolled out, turn by turn (G copies of each session's)
    sessions = training_sessions(cfg, 1)
    by_turn = [[turn_texts(s, k, cfg.form)[0] for s in sessions for _ in range(cfg.group)] for k in range(1, cfg.turns + 1)]
    pooled = [x for turn in by_turn for x in turn]
    want = max(64, cfg.minibatch)                       # update minibatches: instructions of every turn
    texts = (pooled[:: max(1, len(pooled) // want)] * want)[:want]
    n_roll = args.sessions * args.group
    t_roll = unavoidable_rollout(ed, n_roll, args.turns, args.T, by_turn)
    needs_ref = cfg.kl_beta > 0 or cfg.nft_ref_weight > 0
    if cfg.algorithm == "nft":
        n_train = float(np.mean([r.get("nft/samples", 0.0) for r in rows]))
        frozen = [old] + ([load_editor(args.editor)] if needs_ref else [])
    else:
        n_train = float(np.mean([r.get("grpo/transitions", 0.0) for r in rows]))
        frozen = [old] if needs_ref else []          # `old` stands in for the frozen reference
    t_upd = unavoidable_update(ed, frozen, int(round(n_train)), cfg.minibatch, texts)
    model_time = t_roll + t_upd
    return {"variant": name, "steps_timed": len(rows), "reference_forward": needs_ref, **{f"{p}_s": round(v, 3) for p, v in phases.items()},
            "step_s": round(step, 3), "trained_samples": n_train,
            "unavoidable_rollout_s": round(t_roll, 3), "unavoidable_update_s": round(t_upd, 3),
            "overhead": round(step / model_time, 3),
            "overhead_model": round((step - phases["reward"]) / model_time, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--editor", default="tiny")
    ap.add_argument("--steps", type=int, default=6, help="timed RL steps per variant (after one warm-up step)")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--T", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="nft,grpo-full,grpo-window3")
    ap.add_argument("--out", default="runs/bench/rl_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # group filtering off: every variant trains on the same share of its samples
    variants = {"nft": {"preset": "shapes-nft", "adv.group_filter": False},
                "grpo-full": {"preset": "shapes-grpo", "window": 0, "adv.group_filter": False},
                "grpo-window3": {"preset": "shapes-grpo", "window": 3, "adv.group_filter": False}}
    rows = [run_variant(v, dict(variants[v]), args) for v in args.variants.split(",")]
    cols = ("variant", "rollout_s", "reward_s", "loss_s", "optim_s", "step_s", "trained_samples",
            "unavoidable_rollout_s", "unavoidable_update_s", "overhead", "overhead_model", "peak_rss_mb")
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>14}" if isinstance(r[c], str) else f"{r[c]:>14.3f}" for c in cols))
    result = {"editor": args.editor, "B": args.sessions, "G": args.group, "K": args.turns, "T": args.T,
              "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
