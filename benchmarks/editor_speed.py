"""Tiny-editor speed: edits/s at batch 1 and 64 with 10 ODE steps, training-step time at batch 64,
peak memory. Prints a table and writes JSON.

    python benchmarks/editor_speed.py [--editor tiny|tiny:PATH] [--threads 2] [--compile] [--out runs/bench/editor_speed.json]

--compile adds the batch-64 edit through torch.compile (TinyEditor.compile), with live and
with frozen weights (`compile(freeze=True)`, what `editrl bench --compile` uses), and each
one-off compile time (cold: inductor's on-disk cache empty; warm: a second process).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--editor", default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time batch-64 edits through torch.compile")
    ap.add_argument("--out", default="runs/bench/editor_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from editrl.editors import load_editor
    from editrl.pretrain import PretrainConfig, flow_matching_loss, make_batch
    from editrl.editors.tiny import Tokenizer

    ed = load_editor(args.editor)
    n_params = sum(p.numel() for p in ed.net.parameters())
    cfg = PretrainConfig(batch_size=64, model=ed.cfg)
    batch = make_batch(cfg, 0, Tokenizer(ed.cfg.vocab))
    src = [((batch["source"][i].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy() for i in range(64)]
    from editrl.world.grammar import GrammarConfig, sample_session
    texts = [sample_session(123, i, GrammarConfig(turns=1)).turns[0].explicit for i in range(64)]

    rows = []
    for bs in (1, 64):
        gen = torch.Generator().manual_seed(0)
        ed.edit(src[:bs], texts[:bs], generator=gen, steps=args.steps)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ed.edit(src[:bs], texts[:bs], generator=gen, steps=args.steps)
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        rows.append({"what": f"edit, batch {bs}, {args.steps} ODE steps", "seconds": t, "edits_per_s": bs / t})

    if args.compile:
        for freeze in (False, True):
            label = "compiled, frozen weights" if freeze else "compiled"
            ed.compile(freeze=freeze)
            gen = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            ed.edit(src, texts, generator=gen, steps=args.steps)                # compiles
            rows.append({"what": f"torch.compile ({label}), first batch-64 edit",
                         "seconds": time.perf_counter() - t0, "edits_per_s": None})
            if ed._compiled is None:
                raise SystemExit("torch.compile failed (see above); no compiled numbers")
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ed.edit(src, texts, generator=gen, steps=args.steps)
                times.append(time.perf_counter() - t0)
            t = float(np.median(times))
            rows.append({"what": f"edit, batch 64, {args.steps} ODE steps, {label}", "seconds": t,
                         "edits_per_s": 64 / t})
        ed._compiled = ed._frozen_at = None

    ed.net.train()
    opt = torch.optim.AdamW(ed.net.parameters(), lr=1e-5)
    times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        loss = flow_matching_loss(ed, batch, torch.Generator().manual_seed(i), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    rows.append({"what": "train step, batch 64", "seconds": float(np.median(times)), "edits_per_s": None})

    result = {"editor": args.editor, "params": n_params, "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cpus": torch.get_num_threads(),
              "peak_rss_mb": round(peak_rss_mb(), 1), "rows": rows}
    print(f"{'measurement':<58} {'seconds':>10} {'edits/s':>10}")
    for r in rows:
        eps = "-" if r["edits_per_s"] is None else f"{r['edits_per_s']:.1f}"
        print(f"{r['what']:<58} {r['seconds']:>10.4f} {eps:>10}")
    print(f"params {n_params / 1e6:.2f}M, threads {args.threads}, peak RSS {result['peak_rss_mb']} MB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
