"""VLM rewards in RL training: what judging during the rollout saves.

Runs a few `editrl train` steps of the shipped tiny editor with `reward.judge=vlm:URL` against
the loopback OpenAI-compatible server (tests/loopback_judge_server.py) answering each request
after a fixed delay, with `reward.overlap` on and off, and reports per step: rollout seconds,
seconds still waited for the judge after the rollout, whole step seconds, judge requests.
The same run also with the exact program judge, for reference. Prints a table, writes JSON.

    python benchmarks/reward_overlap.py [--delay 0.2] [--concurrency 16] [--steps 3] [--out runs/bench/reward_overlap.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay", type=float, default=0.2, help="server seconds per request")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=4, help="B sessions per step")
    ap.add_argument("--group", type=int, default=8, help="G trajectories per session")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/reward_overlap.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from editrl.config import load_config
    from editrl.rl.train import TrainConfig, train
    from loopback_judge_server import LoopbackJudgeServer

    base = dict(init="tiny", algorithm="nft", sessions_per_step=args.sessions, group=args.group, turns=3,
                rollout_steps=10, max_steps=args.steps, final_eval=False, threads=args.threads, ckpt_every=1000)
    rows = []
    with LoopbackJudgeServer(delay=args.delay) as srv, tempfile.TemporaryDirectory() as tmp:
        arms = [("program judge", {"judge": "program"}),
                ("vlm:URL, judged after the rollout", {"judge": f"vlm:{srv.url}", "model": srv.model,
                                                       "concurrency": args.concurrency, "overlap": False}),
                ("vlm:URL, judged during the rollout", {"judge": f"vlm:{srv.url}", "model": srv.model,
                                                       "concurrency": args.concurrency, "overlap": True})]
        for i, (name, reward) in enumerate(arms):
            cfg = load_config(TrainConfig, None, {**base, "reward": reward})
            n0 = srv.n_requests
            t0 = time.time()
            train(cfg, Path(tmp) / str(i), log=lambda m: None)
            wall = time.time() - t0
            ms = [json.loads(x) for x in (Path(tmp) / str(i) / "metrics.jsonl").read_text().splitlines()]
            mean = lambda k: sum(r[k] for r in ms) / len(ms)      # noqa: E731
            step_s = mean("time/rollout_s") + mean("time/reward_s") + mean("time/update_s")
            rows.append({"arm": name, "steps": len(ms), "rollout_s": mean("time/rollout_s"),
                         "reward_wait_s": mean("time/reward_wait_s"), "step_s": step_s,
                         "requests_per_step": (srv.n_requests - n0) / len(ms), "wall_s": wall})
    hdr = f"{'arm':38s} {'rollout s':>10s} {'wait s':>8s} {'step s':>8s} {'requests':>9s}"
    print(hdr)
    for r in rows:
        print(f"{r['arm']:38s} {r['rollout_s']:10.2f} {r['reward_wait_s']:8.2f} {r['step_s']:8.2f} {r['requests_per_step']:9.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(), "rows": rows,
                               "load_average": os.getloadavg()[0]}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
