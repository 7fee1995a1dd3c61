"""`editrl ablate`: the papers' design studies on ShapesWorld, over several seeds, read top to bottom.

1. **Arms.** Each study compares arms that differ from the base recipe (the `shapes-nft`
   preset plus the user's overrides) in one knob: assignment (broadcast vs per-turn),
   fusion (advantage vs reward level), scoring (binary, graded, hybrid), turn aggregation (mean,
   min, product, last, success-gated, discounted; on broadcast assignment, the only one that
   trains on the aggregate), trajectory filtering (on vs off),
   algorithm (DiffusionNFT vs Flow-GRPO), training turns (K = 3 vs K = 1), rollout branching
   (each trajectory on its own outputs vs all G going on from a shared, successful or random,
   output; on per-turn assignment, the only one it is defined for), and the control
   every RL claim needs: continued supervised pretraining of the same base for the same
   wall time. Arms shared by several studies (the base) run once.
2. **Runs.** Every (arm, seed) trains for the same wall-time budget into
   `DIR/runs/<arm>/seed_<s>/train` and is benchmarked on the same held-out 3-turn sessions
   with the same editor noise (`.../bench`), so arms compare *paired* by session. The base
   editor is benchmarked once (`DIR/runs/base_editor/bench`). Every stage resumes.
3. **Table.** Per arm: success@1..K (per session averaged over seeds) with a 95% bootstrap
   interval over sessions, the difference to the study's first arm and to the untrained
   base with paired bootstrap intervals, and the seed-to-seed spread of success@K.
   `DIR/ablation.json` and `DIR/ablation.md`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..session import EditrlInputError, atomic_write_text

# study -> [(arm, overrides)]; "@grpo" switches the preset, "@supervised" runs the control.
STUDIES: dict[str, list[tuple[str, list[str]]]] = {
    "assignment": [("base", []), ("@other_assignment", [])],      # the assignment the base does not use
    "fusion": [("base", []), ("reward_fusion", ["adv.fusion=reward"])],
    "scoring": [("base", []), ("@other_scorings", [])],           # every scoring the base does not use
    "aggregation": [("base", [])] + [(f"agg_{m}", [f"adv.aggregation={m}"])
                                     for m in ("min", "product", "last", "success_gated", "discounted")],
    "trajectory_filter": [("base", []), ("no_trajectory_filter", ["adv.trajectory_filter=false"])],
    "algorithm": [("base", []), ("grpo", ["@grpo"])],
    "train_turns": [("base", []), ("train_k1", ["turns=1"])],
    "branching": [("base", []), ("@other_branches", [])],         # every rollout branching the base does not use
    "control": [("base", []), ("supervised", ["@supervised"])],
}
EVAL_SEED = 2_025_000        # held-out benchmark sessions of the ablation (never trained on)


@dataclass
class AblateConfig:
    out: Path
    studies: list[str] = field(default_factory=lambda: list(STUDIES))
    seeds: int = 3
    minutes: float = 5.0           # wall-time budget of every (arm, seed) run
    sessions: int = 100            # held-out 3-turn sessions per benchmark
    turns: int = 3
    preset: str = "shapes-nft"
    grpo_preset: str = "shapes-grpo"
    overrides: list[str] = field(default_factory=list)   # applied to every RL arm
    supervised_lr: float = 1e-4    # continued pretraining: peak lr (cosine to 5% over the budget)
    bootstrap: int = 1000
    jobs: int = 1                  # (arm, seed) runs at once, each in its own process
    threads: int = 0               # torch threads per run (0 = the preset's; with jobs > 1: cores // jobs)

    def run_threads(self) -> int:
        if self.threads:
            return self.threads
        if self.jobs > 1:
            import os
            return max(1, (os.cpu_count() or 1) // self.jobs)
        return 0


def arms(cfg: AblateConfig) -> dict[str, list[str]]:
    unknown = [s for s in cfg.studies if s not in STUDIES]
    if unknown:
        raise EditrlInputError(f"unknown study {unknown[0]!r} (expected: {', '.join(STUDIES)})")
    out: dict[str, list[str]] = {}
    for s in cfg.studies:
        for name, ov in study_arms(cfg, s):
            out.setdefault(name, ov)
    return out


def study_arms(cfg: AblateConfig, study: str) -> list[tuple[str, list[str]]]:
    """The arms of one study, placeholders resolved against the base recipe."""
    from .advantages import ADV_SCORINGS
    from .train import BRANCHES

    base = base_config(cfg)
    adv = base.adv
    out = []
    for name, ov in STUDIES[study]:
        if name == "@other_branches":
            out += [(f"branch_{other}", [f"branch={other}"]) for other in BRANCHES if other != base.branch]
            continue
        if name == "@other_assignment":
            other = "broadcast" if adv.assignment == "per_turn" else "per_turn"
            name, ov = other, [f"adv.assignment={other}"]
        elif name == "@other_scorings":
            out += [(other, [f"adv.scoring={other}"]) for other in ADV_SCORINGS if other != adv.scoring]
            continue
        if study == "aggregation" and adv.assignment != "broadcast":
            # turn aggregation shapes the trajectory reward, which only broadcast assignment
            # trains on: under per-turn assignment every arm of this study is the base run
            # itself, so the study runs on broadcast assignment (its reference: broadcast + the
            # base's aggregation, the assignment study's other arm)
            name = "broadcast" if name == "base" else f"broadcast_{name}"
            ov = ["adv.assignment=broadcast", *ov]
        out.append((name, ov))
    if study == "branching" and adv.assignment != "per_turn":
        # branched rows are no trajectories to broadcast over: on a broadcast base the study
        # runs on per-turn assignment (its reference: per-turn + the base's branching)
        out = [("per_turn" if n == "base" else f"per_turn_{n}", ["adv.assignment=per_turn", *o]) for n, o in out]
    return out


def base_config(cfg: AblateConfig):
    """The training config of the base arm (its preset plus the user's overrides)."""
    from ..config import load_config
    from .train import TrainConfig

    return load_config(TrainConfig, cfg.preset, list(cfg.overrides))


def train_arm(cfg: AblateConfig, arm: str, ov: list[str], seed: int, out: Path, log: Callable[[str], None]) -> Path:
    """Train one (arm, seed) for the budget; returns the weights file to benchmark."""
    if ov == ["@supervised"]:
        from ..config import load_config
        from ..pretrain import PretrainConfig, pretrain

        steps = max(10, int(cfg.minutes * 60 / 0.6))   # cosine length ~ the budget at ~0.6 s/step
        pc = load_config(PretrainConfig, "tiny-pretrain", [
            "init=tiny", f"seed={seed}", f"lr={cfg.supervised_lr}", "warmup_steps=0", f"max_steps={steps}",
            f"max_minutes={cfg.minutes}", "eval_every=0", "ckpt_every=100"]
            + ([f"threads={cfg.run_threads()}"] if cfg.run_threads() else []))
        pretrain(pc, out, log=log)
        return out / "model.safetensors"
    from ..config import load_config
    from .train import TrainConfig, train

    preset, extra = cfg.preset, list(ov)
    if extra == ["@grpo"]:
        preset, extra = cfg.grpo_preset, []
    base = [f"seed={seed}", f"max_minutes={cfg.minutes}", "max_steps=1000000", "eval_every=0", "final_eval=false"]
    threads = [f"threads={cfg.run_threads()}"] if cfg.run_threads() else []
    tc = load_config(TrainConfig, preset, base + threads + list(cfg.overrides) + extra)
    res = train(tc, out, log=log)
    return Path(res["final"]) / "model.safetensors"


def bench_weights(cfg: AblateConfig, editor: str, out: Path) -> Path:
    from ..bench import BenchConfig, run_bench

    run_bench(BenchConfig(suite="shapes", editor=editor, judge="program", out=out, sessions=cfg.sessions,
                          turns=cfg.turns, seed=EVAL_SEED, form="explicit", steps=10, no_cache=True, bootstrap=0,
                          strips=4))
    return out


def success_matrix(run_dir: Path) -> tuple[list[str], np.ndarray, int]:
    """(session ids, success_all [N, K] as 0/1, judge-error turns) of a finished bench run."""
    from ..bench.harness import load_run
    from ..bench.metrics import ERR, FAIL, outcomes_from_records

    res, records = load_run(run_dir)
    ids = sorted({sid for sid, _ in records})
    n_turns = [max(k for s, k in records if s == sid) for sid in ids]
    o = outcomes_from_records(ids, n_turns, records)
    bad = ((o.status == FAIL) | (o.status == ERR)).any(-1) | o.missing | ~o.exists     # [N, K]
    ok = ~bad
    return ids, np.cumprod(ok, axis=1).astype(float), int((o.status == ERR).sum())


def bootstrap_ci(x: np.ndarray, n_boot: int, seed: int) -> tuple[float, float] | None:
    """95% percentile interval of the mean over rows of x [N] (None without resamples)."""
    if n_boot <= 0 or len(x) == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))                           # [n_boot, N]
    m = x[idx].mean(1)
    return float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))


def summarise(cfg: AblateConfig, mats: dict[str, list[np.ndarray]], base_mat: np.ndarray) -> dict[str, Any]:
    """Per arm: mean over seeds per session, then rates, intervals and paired differences."""
    K = base_mat.shape[1]
    arm_rows: dict[str, dict[str, Any]] = {}
    per_session = {a: np.mean(np.stack(m), 0) for a, m in mats.items() if m}                  # [N, K]
    for a, m in per_session.items():
        seeds = np.stack(mats[a])                                                          # [S, N, K]
        arm_rows[a] = {
            "seeds": len(mats[a]),
            "success_all": [float(m[:, k].mean()) for k in range(K)],
            "ci95": [bootstrap_ci(m[:, k], cfg.bootstrap, k) for k in range(K)],
            "seed_values_at_K": [float(s[:, K - 1].mean()) for s in seeds],
            "vs_base_editor": {"diff": float((m[:, K - 1] - base_mat[:, K - 1]).mean()),
                               "ci95": bootstrap_ci(m[:, K - 1] - base_mat[:, K - 1], cfg.bootstrap, 7)},
        }
    studies = []
    for s in cfg.studies:
        resolved = study_arms(cfg, s)
        ref = resolved[0][0]
        rows = []
        for name, _ in resolved:
            if name not in per_session:
                continue
            r = {"arm": name, **arm_rows[name]}
            if name != ref and ref in per_session:
                d = per_session[name][:, K - 1] - per_session[ref][:, K - 1]
                r["vs_reference"] = {"diff": float(d.mean()), "ci95": bootstrap_ci(d, cfg.bootstrap, 11)}
            rows.append(r)
        studies.append({"study": s, "reference": ref, "rows": rows})
    base = {"success_all": [float(base_mat[:, k].mean()) for k in range(K)],
            "ci95": [bootstrap_ci(base_mat[:, k], cfg.bootstrap, k) for k in range(K)]}
    return {"turns": K, "sessions": int(base_mat.shape[0]), "seeds": cfg.seeds, "minutes": cfg.minutes,
            "preset": cfg.preset, "overrides": cfg.overrides, "base_editor": base, "studies": studies}


def _ci(c) -> str:
    return "" if not c else f" [{c[0]:+.3f}, {c[1]:+.3f}]"


def markdown(t: dict[str, Any]) -> str:
    K = t["turns"]
    lines = [f"{t['sessions']} held-out {K}-turn sessions, {t['seeds']} seeds per arm, {t['minutes']:g} min per run "
             f"(preset {t['preset']}{', ' + ' '.join(t['overrides']) if t['overrides'] else ''}). "
             f"success@k averaged over seeds per session; 95% bootstrap intervals over sessions; "
             f"Δ paired by session.", "",
             "| study | arm | " + " | ".join(f"success@{k}" for k in range(1, K + 1))
             + f" | Δ@{K} vs reference | Δ@{K} vs base editor | seeds' success@{K} |",
             "|---|---|" + "---|" * (K + 3)]
    b = t["base_editor"]
    lines.append("| - | base editor (no post-training) | " + " | ".join(
        f"{v:.3f}" for v in b["success_all"]) + " | - | - | - |")
    for st in t["studies"]:
        for r in st["rows"]:
            cells = [f"{v:.3f}{' ' + '[' + f'{c[0]:.2f}, {c[1]:.2f}' + ']' if c else ''}"
                     for v, c in zip(r["success_all"], r["ci95"])]
            vr = r.get("vs_reference")
            vb = r["vs_base_editor"]
            lines.append(f"| {st['study']} | {r['arm']} | " + " | ".join(cells)
                         + f" | {'-' if not vr else format(vr['diff'], '+.3f') + _ci(vr['ci95'])}"
                         + f" | {vb['diff']:+.3f}{_ci(vb['ci95'])} | "
                         + ", ".join(f"{v:.3f}" for v in r["seed_values_at_K"]) + " |")
    return "\n".join(lines) + "\n"


def run_ablation(cfg: AblateConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    if cfg.seeds < 1 or cfg.sessions < 1 or cfg.minutes <= 0 or cfg.jobs < 1 or cfg.threads < 0:
        raise EditrlInputError("--seeds, --sessions and --jobs must be at least 1, --minutes positive, --threads >= 0")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise EditrlInputError(f"--out {out} exists and is not a folder")
    todo = arms(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablation_config.json", json.dumps(
        {**{k: v for k, v in cfg.__dict__.items() if k != "out"}, "arms": todo}, indent=2, default=str) + "\n")
    log("benchmarking the base editor")
    base_ids, base_mat, _ = success_matrix(bench_weights(cfg, "tiny", out / "runs" / "base_editor" / "bench"))
    mats: dict[str, list[np.ndarray]] = {a: [] for a in todo}
    n, total = 0, len(todo) * cfg.seeds
    jobs = [(seed, arm, ov) for seed in range(cfg.seeds) for arm, ov in todo.items()]   # seed-major: a stopped
    futures = {}                                                                        # ablation has every arm at equal depth
    pool = None
    if cfg.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=multiprocessing.get_context("spawn"))
        for seed, arm, ov in jobs:
            if not (out / "runs" / arm / f"seed_{seed}" / "bench" / "results.json").is_file():
                futures[(seed, arm)] = pool.submit(run_arm, cfg, arm, ov, seed, out / "runs" / arm / f"seed_{seed}")
    for seed in range(cfg.seeds):
        for arm, ov in todo.items():
            n += 1
            d = out / "runs" / arm / f"seed_{seed}"
            log(f"[{n}/{total}] {arm} seed {seed}")
            if (seed, arm) in futures:
                futures[(seed, arm)].result()
            elif not (d / "bench" / "results.json").is_file():
                run_arm(cfg, arm, ov, seed, d)
            ids, mat, _ = success_matrix(d / "bench")
            if ids != base_ids:
                raise EditrlInputError(f"{d / 'bench'}: not the ablation's sessions")
            mats[arm].append(mat)
        table = summarise(cfg, mats, base_mat)
        atomic_write_text(out / "ablation.json", json.dumps(table, indent=2) + "\n")
        atomic_write_text(out / "ablation.md", markdown(table))
    if pool is not None:
        pool.shutdown()
    return table


def run_arm(cfg: AblateConfig, arm: str, ov: list[str], seed: int, d: Path) -> Path:
    """Train and benchmark one (arm, seed) into `d` (a worker process's whole job with --jobs)."""
    if cfg.run_threads():
        import torch
        torch.set_num_threads(cfg.run_threads())
    weights = train_arm(cfg, arm, ov, seed, d / "train", log=lambda m: None)
    return bench_weights(cfg, f"tiny:{weights}", d / "bench")
