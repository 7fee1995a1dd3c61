"""Reconstruction vs the in-context baseline, before and after joint RL (Edit-R2's claim, and
the combination no paper tried), on long ShapesWorld sessions. Reads top to bottom; every
step is an `editrl` command, so a killed study resumes where it stopped.

    python recipes/intent_study.py --out runs/intent-study [--sessions 200] [--seed 777]
        [--minutes 10] [--editor tiny] [--policy runs/intent-tiny/policy.safetensors]

1. The tiny intent policy: `editrl intent train` unless --policy is given.
2. Held-out benchmark rows on `shapes-long` (5 turns, rules and pronouns everywhere), one
   editor, program judge:
   in-context (the whole history), raw, `rules`, `tiny` (supervised), gold explicit (bound).
3. Three RL runs of `--minutes` each from the same editor, on training sessions of the same
   grammar:
   - edit-r2:      Flow-GRPO on the image + token-level GRPO on the tiny policy (joint);
   - mt-editflow:  DiffusionNFT with the broadcast trajectory advantage, in-context text;
   - nft+joint:    DiffusionNFT + broadcast + joint tiny-policy GRPO (the combination).
4. Their benchmark rows, and DIR/study.md + DIR/study.json: success@k per row with 95%
   bootstrap intervals, the difference to the in-context baseline, and CU over all pronoun
   turns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

EDITRL = str(Path(sys.executable).with_name("editrl"))


def sh(*args: str) -> dict:
    """Run one editrl command; its result is the last stdout line (JSON)."""
    print("$ editrl " + " ".join(args), file=sys.stderr, flush=True)
    r = subprocess.run([EDITRL, *args], stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        sys.exit(f"editrl {args[0]} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench(out: Path, name: str, editor: str, args: argparse.Namespace, *extra: str) -> dict:
    sh("bench", "--suite", "shapes-long", "--sessions", str(args.sessions), "--seed", str(args.seed),
       "--editor", editor, "--judge", "program", "--out", str(out / "bench" / name), "--no-cache", "--strips", "8",
       *extra)
    res = json.loads((out / "bench" / name / "results.json").read_text())
    res["pronoun_cu"] = pronoun_cu(out / "bench" / name / "records.jsonl")
    return res


def pronoun_cu(records: Path) -> dict:
    """CU over every judged pronoun turn of a run (judge errors left out, and counted)."""
    n = passed = errors = 0
    for line in records.read_text().splitlines():
        status = json.loads(line).get("verdict", {}).get("CU", {}).get("status")
        if status in ("pass", "fail"):
            n += 1
            passed += status == "pass"
        elif status == "judge_error":
            errors += 1
    return {"rate": passed / n if n else None, "turns": n, "judge_errors": errors}


def train(out: Path, name: str, preset: str, args: argparse.Namespace, *overrides: str) -> Path:
    run = out / "rl" / name
    sh("train", "--config", preset, "--out", str(run), f"init={args.editor}", f"max_minutes={args.minutes}",
       "max_steps=100000", "turns=5", "constraint_share=0.6", "pronoun_prob=0.9", "final_eval=false",
       f"seed={args.train_seed}", *overrides)
    return run / "final"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=777, help="held-out shapes-long sessions")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=10.0, help="wall time of each RL run")
    ap.add_argument("--editor", default="tiny")
    ap.add_argument("--policy", type=Path, default=None, help="a trained tiny intent policy (else trained here)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    # 1. the supervised intent policy
    policy = args.policy
    if policy is None:
        policy = out / "intent-tiny" / "policy.safetensors"
        if not policy.is_file():
            sh("intent", "train", "--out", str(policy.parent))
    tiny = f"tiny:{policy}"

    # 2. rows without RL
    rows: dict[str, dict] = {}
    rows["in-context"] = bench(out, "in_context", args.editor, args, "--form", "in_context")
    rows["raw"] = bench(out, "raw", args.editor, args, "--form", "raw")
    rows["rules"] = bench(out, "rules", args.editor, args, "--intent", "rules")
    rows["tiny (supervised)"] = bench(out, "tiny", args.editor, args, "--intent", tiny)
    rows["gold explicit (bound)"] = bench(out, "explicit", args.editor, args, "--form", "explicit")

    # 3. RL runs and their rows
    a = train(out, "edit-r2", "shapes-grpo", args, f"intent.spec={tiny}", "intent.train=true", "form=explicit")
    rows["edit-r2: GRPO + joint tiny"] = bench(out, "edit-r2", f"tiny:{a}", args, "--intent", f"tiny:{a / 'intent.safetensors'}")
    b = train(out, "mt-editflow", "shapes-nft", args, "adv.assignment=broadcast", "form=in_context")
    rows["mt-editflow: NFT + broadcast, in-context"] = bench(out, "mt-editflow", f"tiny:{b}", args, "--form", "in_context")
    c = train(out, "nft-joint", "shapes-nft", args, "adv.assignment=broadcast", f"intent.spec={tiny}",
              "intent.train=true", "form=explicit")
    rows["NFT + broadcast + joint tiny"] = bench(out, "nft-joint", f"tiny:{c}", args, "--intent", f"tiny:{c / 'intent.safetensors'}")
    rows["rules, editor after NFT + joint"] = bench(out, "nft-joint-rules", f"tiny:{c}", args, "--intent", "rules")

    # 4. the table
    base = rows["in-context"]

    def s_at(res: dict, k: int) -> dict:
        return next(r for r in res["per_turn"] if r["turn"] == k)

    K = max(r["turn"] for r in base["per_turn"])
    lines = [f"Held-out shapes-long: {args.sessions} sessions, seed {args.seed}, editor {args.editor}, "
             f"RL runs {args.minutes} min each.", "",
             "| row | " + " | ".join(f"success@{k}" for k in range(1, K + 1)) + f" | 95% CI @{K} | Δ@{K} vs in-context "
             "| CU, pronoun turns |",
             "|---|" + "---|" * (K + 3)]
    table = {}
    for name, res in rows.items():
        cells = [s_at(res, k)["success_all"] for k in range(1, K + 1)]
        ci = (s_at(res, K).get("ci95") or {}).get("success_all")
        delta = cells[-1] - s_at(base, K)["success_all"]
        lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) +
                     f" | {('[%.3f, %.3f]' % tuple(ci)) if ci else '-'} | {delta:+.3f} | "
                     + (f"{cu['rate']:.3f} ({cu['turns']})" if (cu := res["pronoun_cu"])["rate"] is not None else "-")
                     + " |")
        table[name] = {"success_all": cells, "ci_last": ci, "delta_last_vs_in_context": delta,
                       "CU": [s_at(res, k).get("CU") for k in range(1, K + 1)], "CU_pronoun_turns": res["pronoun_cu"]}
    (out / "study.md").write_text("\n".join(lines) + "\n")
    (out / "study.json").write_text(json.dumps(table, indent=2) + "\n")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps({"out": str(out), "rows": table}))


if __name__ == "__main__":
    main()
