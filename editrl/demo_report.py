"""DIR/report.html of `editrl demo`: before/after table with paired intervals, success@k
curves, training curves and example sessions before and after (self-contained page)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bench.report import _fig_data_uri, _png_data_uri
from .session import atomic_write_text

METRICS = ("success", "success_all", "IF", "CC")
LABELS = {"success_all": "success@k"}


def plot_before_after(before: Sequence[dict], after: Sequence[dict]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.3))
    for name, rows, color in (("before", before, "#8c959f"), ("after", after, "#0969da")):
        turns = [r["turn"] for r in rows]
        y = np.array([np.nan if r["success_all"] is None else r["success_all"] for r in rows], float)
        ci = [r["ci95"].get("success_all") for r in rows]
        lo = np.array([np.nan if c is None else c[0] for c in ci], float)
        hi = np.array([np.nan if c is None else c[1] for c in ci], float)
        ax.plot(turns, y, marker="o", color=color, label=f"{name}: success@k")
        ax.fill_between(turns, lo, hi, color=color, alpha=0.2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks([r["turn"] for r in before])
    ax.set_xlabel("turn k")
    ax.set_title("all-turns success@k, 95% bands", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    uri = _fig_data_uri(fig)
    plt.close(fig)
    return uri


def moving_mean(y: np.ndarray, w: int) -> np.ndarray:
    """Centred moving average over `w` points that averages only the finite values in each
    window: the ends use the points they have (no zero padding), and a step without the
    metric (skipped, NaN) neither counts as 0 nor breaks the line; a window with no finite
    value stays NaN."""
    y = np.asarray(y, float)                                               # [N]
    if w <= 1 or y.size == 0:
        return y
    ok = np.isfinite(y)
    k = np.ones(w)
    lo = (w - 1) // 2
    total = np.convolve(np.where(ok, y, 0.0), k, mode="full")[lo: lo + y.size]
    count = np.convolve(ok.astype(float), k, mode="full")[lo: lo + y.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def plot_training(rows: Sequence[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    w = max(1, len(rows) // 20)

    def smooth(key: str) -> np.ndarray:
        return moving_mean(np.array([r.get(key, np.nan) for r in rows], float), w)

    fig, ax = plt.subplots(figsize=(5.6, 3.3))
    mk = "o" if len(rows) < 30 else None      # a short run shows its points
    ax.plot(steps, smooth("reward/fused"), label="fused reward", color="#1f2328", marker=mk)
    for k in sorted({int(key.rsplit("_", 1)[1]) for r in rows for key in r if key.startswith("success/turn_")}):
        ax.plot(steps, smooth(f"success/turn_{k}"), label=f"rollout success, turn {k}", marker=mk)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("RL step")
    ax.set_title(f"training rollouts (moving average over {w} steps)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    uri = _fig_data_uri(fig)
    plt.close(fig)
    return uri


def example_pairs(out: Path, n: int) -> list[dict[str, Any]]:
    """The first n sessions: where before and after differ in outcome first."""
    from .bench.harness import load_run, read_records
    from .bench.suites import load_suite
    from .world.render import load_png

    res, _ = load_run(out / "before")
    st = res["settings"]["suite"]
    recs = {name: read_records(out / name / "records.jsonl", repair=False) for name in ("before", "after")}
    suite = load_suite("shapes", st.get("sessions"), st.get("turns"), res["settings"]["seed"])

    def outcome(name: str, sid: str, K: int) -> int:
        for k in range(1, K + 1):
            r = recs[name].get((sid, k), {})
            v = r.get("verdict") or {}
            if r.get("status") != "judged" or any(isinstance(c, dict) and c.get("status") != "pass"
                                                  and c.get("status") is not None for c in v.values()):
                return k - 1
        return K

    items = []
    for s in suite.sessions:
        a, b = outcome("before", s.id, s.n_turns), outcome("after", s.id, s.n_turns)
        items.append((a == b, s, a, b))
    items.sort(key=lambda t: t[0])
    shown = []
    for _, s, a, b in items[:n]:
        rows = {}
        for name, ok in (("before", a), ("after", b)):
            cells = []
            for k in range(1, s.n_turns + 1):
                p = out / name / "images" / s.id / f"turn_{k}.png"
                cells.append({"turn": k, "uri": _png_data_uri(load_png(p)) if p.is_file() else None,
                              "ok": k <= ok})
            rows[name] = {"turns_ok": ok, "cells": cells}
        shown.append({"id": s.id, "source": _png_data_uri(suite.source(s)),
                      "constraint": s.global_constraint.text if s.global_constraint else None,
                      "texts": [t.explicit or t.instruction for t in s.turns], **rows})
    return shown


def write_demo_report(path: Path, cfg, before: dict, after: dict, cmp: dict, curves: list, out: Path) -> None:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "bench" / "templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("demo.html.j2").render(
        cfg=cfg, before=before, after=after, cmp=cmp, metrics=METRICS, labels=LABELS,
        curve=plot_before_after(before["per_turn"], after["per_turn"]), training=plot_training(curves),
        n_steps=len(curves), minutes=curves[-1]["elapsed_min"] if curves else 0.0,
        examples=example_pairs(out, cfg.strips))
    atomic_write_text(path, html)
