"""CPU time of the ShapesWorld parser against an earlier revision of it, and an A/B check
that both return the same `Parsed` (to the bit).

The baseline is `editrl/world/parse.py` as of `--baseline` (a git revision), loaded as a
module of the `editrl.world` package from a temporary file; the current one is the
working tree's. Both parse the same images, interleaved over `--repeats` rounds, and the
ratio of their `time.process_time()` totals is reported (robust to machine load, unlike
the absolute numbers). Images: ground-truth renders of random sessions ("clean", every
pixel a palette colour) and model-like versions of them and of faulted turns ("degraded":
blur, colour shift, noise at several levels, texture, ghosts).

    python benchmarks/parse_speed.py --sessions 200 --repeats 3 --out runs/bench/parse_speed.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from editrl.world import parse as current
from editrl.world.check import FAULTS, add_texture, make_fault
from editrl.world.grammar import GrammarConfig, sample_session, session_scenes
from editrl.world.render import degrade, render
from editrl.world.verify import judge_parsed

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "dadc49a"     # the parser before the clean-render tables, the per-plane memory and direct labelling


def load_baseline(rev: str):
    """`editrl/world/parse.py` at git revision `rev`, as module `editrl.world._parse_<rev>`."""
    src = subprocess.run(["git", "show", f"{rev}:editrl/world/parse.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "parse_baseline.py"
    path.write_text(src)
    name = f"editrl.world._parse_{rev.replace('~', '_').replace('^', '_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def images(sessions: int, seed: int, turns: int = 5) -> dict[str, list]:
    """{"clean": [...], "degraded": [...]} of (image, session, turn index) for judge timing."""
    out = {"clean": [], "degraded": []}
    levels = ((0.3, 0.8, 0.02), (0.3, 0.8, 0.05), (0.8, 1.3, 0.08))     # blur range, noise std
    for i in range(sessions):
        s = sample_session(seed, i, GrammarConfig(turns=turns))
        scenes = session_scenes(s)
        rng = np.random.default_rng([seed, i, 99])
        for k in range(1, len(scenes)):
            img = render(scenes[k])
            out["clean"].append((img, s, k))
            lo, hi, noise = levels[(i + k) % len(levels)]
            out["degraded"].append((degrade(img, rng, blur=(lo, hi), noise=noise), s, k))
        k = int(rng.integers(1, len(scenes)))
        out["degraded"].append((degrade(add_texture(render(scenes[k]), rng), rng), s, k))
        for fault in FAULTS[i % len(FAULTS)::5]:               # a few faults per session
            for k in range(1, len(scenes)):
                img = make_fault(fault, s, k, scenes, rng)
                if img is not None:
                    out["clean" if fault != "ghost" else "degraded"].append((img, s, k))
                    out["degraded"].append((degrade(img, rng), s, k))
                    break
    return out


def same(p, q) -> str | None:
    """None when Parsed p and q are equal field by field (floats and their types exactly), else what differs."""
    if (p.background, p.canvas) != (q.background, q.canvas):
        return "background/canvas"
    if p.texture_fraction != q.texture_fraction or type(p.texture_fraction) is not type(q.texture_fraction):
        return f"texture {p.texture_fraction!r} {q.texture_fraction!r}"
    if len(p.objects) != len(q.objects) or len(p.residue) != len(q.residue):
        return "counts"
    for a, b in zip(p.objects, q.objects):
        fa = (a.color, a.shape, a.size, a.fill, a.cell, a.center, a.bbox, a.area, a.iou)
        fb = (b.color, b.shape, b.size, b.fill, b.cell, b.center, b.bbox, b.area, b.iou)
        if fa != fb or [type(v) for v in fa] != [type(v) for v in fb]:
            return f"object {fa} {fb}"
        if a.mask.dtype != b.mask.dtype or not np.array_equal(a.mask, b.mask):
            return "object mask"
    for a, b in zip(p.residue, q.residue):
        fa, fb = (a.cell, a.center, a.area, a.peak), (b.cell, b.center, b.area, b.peak)
        if fa != fb or [type(v) for v in fa] != [type(v) for v in fb]:
            return f"residue {fa} {fb}"
        if not np.array_equal(a.mask, b.mask):
            return "residue mask"
    return None


def check(old, sets: dict[str, list]) -> dict[str, int]:
    """Asserts old and new parse (and so the verdicts) agree on every image; returns counts."""
    n = {}
    for kind, items in sets.items():
        for j, (img, s, k) in enumerate(items):
            p, q = old.parse(img, 64), current.parse(img, 64)
            why = same(p, q)
            if why:
                raise AssertionError(f"{kind} image {j} (session {s.id} turn {k}): {why}")
            scenes = session_scenes(s)
            args = (scenes[k - 1], scenes[k], s.turns[k - 1], k, s.global_constraint, s.id)
            if judge_parsed(p, *args) != judge_parsed(q, *args):
                raise AssertionError(f"{kind} image {j}: verdicts differ")
        n[kind] = len(items)
    return n


def forget(mod) -> None:
    """Empties the parser's per-plane memory of clean renders, so that a round only profits
    from what repeats within the image list (consecutive turns of a session share planes)."""
    cache = getattr(mod, "_STRUCTURES", None)
    if cache is not None:
        cache.clear()


def time_parse(fn, imgs: list[np.ndarray]) -> float:
    t0 = time.process_time()
    for img in imgs:
        fn(img, 64)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=606)
    ap.add_argument("--repeats", type=int, default=4, help="interleaved rounds of old and new")
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the old parse.py")
    ap.add_argument("--no-check", action="store_true", help="skip the A/B equality check")
    ap.add_argument("--out", default="runs/bench/parse_speed.json")
    a = ap.parse_args()
    old = load_baseline(a.baseline)
    sets = images(a.sessions, a.seed)
    counts = {k: len(v) for k, v in sets.items()}
    checked = None if a.no_check else check(old, sets)
    for items in sets.values():                                # warm caches (templates, tables)
        for img, _, _ in items[:20]:
            old.parse(img, 64), current.parse(img, 64)
    rows = {}
    for kind, items in sets.items():
        imgs = [img for img, _, _ in items]
        t_old = t_new = 0.0
        for r in range(a.repeats):               # alternate which goes first
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                if which == 0:
                    t_old += time_parse(old.parse, imgs)
                else:
                    forget(current)
                    t_new += time_parse(current.parse, imgs)
        n = len(imgs) * a.repeats
        rows[kind] = {"images": len(imgs), "old_us": 1e6 * t_old / n, "new_us": 1e6 * t_new / n,
                      "ratio": t_old / t_new}
    print(f"baseline {a.baseline}; {a.repeats} interleaved rounds (new parse's plane memory emptied before each); A/B check: "
          f"{'skipped' if checked is None else f'{sum(checked.values())} images identical'}")
    print(f"{'images':<10} {'n':>6} {'old us':>9} {'new us':>9} {'old/new':>8}")
    for kind, r in rows.items():
        print(f"{kind:<10} {r['images']:>6} {r['old_us']:>9.1f} {r['new_us']:>9.1f} {r['ratio']:>8.2f}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"baseline": a.baseline, "sessions": a.sessions, "seed": a.seed, "repeats": a.repeats,
                   "counts": counts, "checked": checked, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
