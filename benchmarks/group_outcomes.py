"""Where RL's signal is: the outcome of every (session, turn) group of a grouped rollout.

With binary rewards a group whose G trajectories all succeed (or all fail) has zero advantage
and trains nothing. This rolls out an editor on the training stream of `editrl train` (the
same sessions, sampler and judge), groups G trajectories per session for K turns, and counts,
per turn and per task type, the groups that all pass, all fail, are mixed (the only ones that
train), or are dead (every trajectory already failed an earlier turn, so the trajectory
filter masks the turn).

    python benchmarks/group_outcomes.py --editor tiny [--steps 4] [--batches 6] [--out runs/bench/group_outcomes.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch

from editrl.editors import load_editor
from editrl.rl.advantages import scores_from_verdicts
from editrl.rl.rewards import load_reward_judge
from editrl.rl.rollout import grouped_rollout
from editrl.rl.train import TrainConfig, judge_rollout, session_source, step_generator, training_sessions
from editrl.session import EditrlInputError

OUTCOMES = ("pass", "fail", "mixed", "dead")


def group_outcome(success: torch.Tensor, alive: torch.Tensor) -> str:
    """success, alive [G] bool -> the outcome of one (session, turn) group among its live trajectories."""
    s = success[alive]  # [n_alive]
    if len(s) == 0:
        return "dead"
    return "pass" if bool(s.all()) else "fail" if not bool(s.any()) else "mixed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--editor", default="tiny")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per edit (the shapes-nft preset: 4)")
    ap.add_argument("--solver", default="ode", choices=("ode", "sde"))
    ap.add_argument("--sessions", type=int, default=16, help="sessions per batch")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--first-step", type=int, default=1000, help="training-stream step of the first batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/group_outcomes.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        cfg = TrainConfig(init=a.editor, sessions_per_step=a.sessions, group=a.group, turns=a.turns,
                          rollout_steps=a.steps, solver=a.solver)
        editor = load_editor(a.editor, mode="explicit")
    except (EditrlInputError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    editor.set_training(False)
    src, judge = session_source(cfg), load_reward_judge(cfg.reward)
    by_turn: Counter = Counter()
    by_type: dict[str, Counter] = defaultdict(Counter)
    for i in range(a.batches):
        step = a.first_step + i
        sessions = training_sessions(cfg, step, src)
        ro = grouped_rollout(editor, sessions, [src.source(s) for s in sessions], a.group, a.turns, steps=a.steps,
                             solver=a.solver, generator=step_generator(cfg, step, 0))
        success = scores_from_verdicts(judge_rollout(judge, sessions, ro), "binary").success  # [B, G, K]
        for b, s in enumerate(sessions):
            alive = torch.ones(a.group, dtype=torch.bool)  # [G]
            for k in range(min(a.turns, s.n_turns)):
                out = group_outcome(success[b, :, k], alive)
                by_turn[(k + 1, out)] += 1
                by_type[s.turns[k].task_type][out] += 1
                alive = alive & success[b, :, k]
    rows = {"turns": {}, "types": {}}
    print(f"{'':12s} {'groups':>6s} " + " ".join(f"{o:>6s}" for o in OUTCOMES))
    for k in range(1, a.turns + 1):
        n = sum(by_turn[(k, o)] for o in OUTCOMES)
        rows["turns"][k] = {"groups": n, **{o: by_turn[(k, o)] / n for o in OUTCOMES}} if n else {"groups": 0}
        if n:
            print(f"turn {k:<7d} {n:6d} " + " ".join(f"{by_turn[(k, o)] / n:6.2f}" for o in OUTCOMES))
    for t in sorted(by_type):
        n = sum(by_type[t].values())
        rows["types"][t] = {"groups": n, **{o: by_type[t][o] / n for o in OUTCOMES}}
        print(f"{t:12s} {n:6d} " + " ".join(f"{by_type[t][o] / n:6.2f}" for o in OUTCOMES))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"editor": a.editor, "steps": a.steps, "solver": a.solver, "sessions": a.sessions,
                                 "group": a.group, "batches": a.batches, **rows}, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
