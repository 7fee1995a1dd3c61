"""`editrl demo`: the main job on the embedded default, read top to bottom.

1. **Before.** Benchmark the shipped tiny editor on held-out 3-turn ShapesWorld sessions with
   the exact program judge (`DIR/before`, a normal `editrl bench` run).
2. **Post-train.** Multi-turn DiffusionNFT (the `shapes-nft` preset, any key=value override)
   for a wall-time budget (`DIR/train`, a normal `editrl train` run).
3. **After.** Benchmark the post-trained editor on the same sessions with the same noise
   (`DIR/after`).
4. **Compare.** Paired per-turn differences with bootstrap intervals (`bench compare`), and
   `DIR/report.html`: the before/after table, success@k curves, the training curves, and
   example sessions before and after side by side.

Every stage resumes: a killed demo re-run with the same `--out` continues where it stopped
(the benchmarks and the training checkpoint are resumable; an `after` run made with other
weights is redone, never mixed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .session import EditrlInputError, atomic_write_text

DEMO_SEED = 4242           # held-out benchmark sessions (training draws from another stream)


@dataclass
class DemoConfig:
    out: Path
    sessions: int = 100            # held-out sessions benchmarked before and after
    turns: int = 3
    seed: int = DEMO_SEED
    minutes: float = 5.0           # post-training wall-time budget
    preset: str = "shapes-nft"
    overrides: list[str] = field(default_factory=list)
    strips: int = 8                # example sessions shown before/after in the report
    bootstrap: int = 1000


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bench_stage(cfg: DemoConfig, editor: str, out: Path, progress=None) -> dict[str, Any]:
    from .bench import BenchConfig, run_bench

    bc = BenchConfig(suite="shapes", editor=editor, judge="program", out=out, sessions=cfg.sessions, turns=cfg.turns,
                     seed=cfg.seed, form="explicit", steps=10, no_cache=True, bootstrap=cfg.bootstrap,
                     strips=cfg.strips)
    run_bench(bc, progress=progress)
    return json.loads((out / "results.json").read_text())


def train_stage(cfg: DemoConfig, out: Path, log: Callable[[str], None], progress=None) -> dict[str, Any]:
    from .config import load_config
    from .rl.train import TrainConfig, train

    # The demo's own settings first, then the user's overrides (which win).
    base = [f"max_minutes={cfg.minutes}", "eval_every=0", "final_eval=false", f"turns={cfg.turns}", "max_steps=100000"]
    tc = load_config(TrainConfig, cfg.preset, base + list(cfg.overrides))
    if tc.algorithm != "nft":
        log(f"note: the demo runs the {tc.algorithm} algorithm (preset {cfg.preset})")
    return train(tc, out, log=log, progress=progress)


def training_curves(metrics_path: Path) -> list[dict[str, Any]]:
    if not metrics_path.is_file():
        return []
    rows = []
    for line in metrics_path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print, bench_progress=None,
             train_progress=None) -> dict[str, Any]:
    from .bench.harness import compare_runs
    from .editors.tiny import SHIPPED

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise EditrlInputError(f"--out {out} exists and is not a folder")
    if cfg.sessions < 1 or cfg.turns < 1:
        raise EditrlInputError("--sessions and --turns must be at least 1")
    if cfg.minutes <= 0:
        raise EditrlInputError(f"--minutes must be positive, got {cfg.minutes}")
    if not SHIPPED.is_file():
        raise EditrlInputError(f"the shipped tiny-editor checkpoint is missing ({SHIPPED})")
    out.mkdir(parents=True, exist_ok=True)

    log("1/4 benchmarking the shipped editor")
    before = bench_stage(cfg, "tiny", out / "before", bench_progress)

    log(f"2/4 multi-turn post-training ({cfg.preset}, {cfg.minutes:g} min)")
    summary = train_stage(cfg, out / "train", log, train_progress)
    final = Path(summary["final"]) / "model.safetensors"

    log("3/4 benchmarking the post-trained editor")
    after_dir = out / "after"
    digest = file_sha256(final)
    stamp = after_dir / "weights.sha256"
    if after_dir.exists() and (not stamp.is_file() or stamp.read_text().strip() != digest):
        shutil.rmtree(after_dir)        # made with other weights: redo, never mix
    after_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, digest + "\n")
    after = bench_stage(cfg, f"tiny:{final}", after_dir, bench_progress)

    log("4/4 comparing")
    cmp = compare_runs(out / "before", after_dir, n_boot=cfg.bootstrap, seed=cfg.seed)
    atomic_write_text(out / "compare.json", json.dumps(cmp, indent=2) + "\n")
    curves = training_curves(out / "train" / "metrics.jsonl")
    from .demo_report import write_demo_report
    write_demo_report(out / "report.html", cfg, before, after, cmp, curves, out)
    result = {"out": str(out), "train": {"steps": summary["steps"], "minutes": summary["minutes"], "final": str(final)},
              "report": str(out / "report.html"),
              "before": before["per_turn"], "after": after["per_turn"]}
    atomic_write_text(out / "demo.json", json.dumps(result, indent=2) + "\n")
    return result
