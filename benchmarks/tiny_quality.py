"""Tiny-editor quality on fresh ShapesWorld sessions, chained over turns, by the exact judge.

For each text form (explicit instructions, and the in-context baseline: raw instructions with
the session history), every session is rolled out turn by turn on the editor's own outputs
and each turn is judged against the expected scenes. Prints per-turn IF / CC / GA / CU,
success, success@k (all turns 1..k succeeded) and marginal success, and per-edit-type turn
success; writes JSON.

    python benchmarks/tiny_quality.py [--editor tiny|tiny:PATH] [--sessions 200] [--turns 3] [--seed 777]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--editor", default="tiny")
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--forms", default="explicit,in_context")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/tiny_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from editrl.quality import evaluate_editor

    res = evaluate_editor(args.editor, args.sessions, args.turns, args.seed, args.steps, args.forms.split(","))
    res.pop("strips")
    for form, r in res["forms"].items():
        print(f"\n{form}  ({res['sessions']} sessions, seed {res['seed']}, {res['steps']} ODE steps, {r['seconds']} s)")
        print(f"{'turn':>4} {'IF':>6} {'CC':>6} {'GA':>6} {'CU':>6} {'succ':>6} {'succ@k':>7} {'marg':>6}")
        f = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
        for row in r["per_turn"]:
            print(f"{row['turn']:>4} {f(row['IF'])} {f(row['CC'])} {f(row['GA'])} {f(row['CU'])} "
                  f"{f(row['success'])} {f(row['success_all']):>7} {f(row['marginal'])}")
        print("success by edit type (all turns):", r["success_by_type"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
