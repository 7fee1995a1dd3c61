"""report.html: one self-contained page per benchmark run.

The page holds the run's settings, the per-turn metric table with 95% intervals, plots
(per-turn success and success@k with interval bands; IF / CC / GA / CU), and image strips
of the first `--strips` sessions (failures first): source → each turn's output, with the
instruction, its explicit form, the text the editor was given and every check's verdict and
reason, colour-coded pass / fail / judge_error / missing. Images and plots are embedded as
base64 data URIs (small images shown upscaled with nearest-neighbour), so the file can be mailed
or archived alone. Rendered with jinja2 and autoescaping: every piece of user text (session
ids, instructions, reasons, raw judge text) is escaped.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..session import CHECKS, EditrlInputError, Session, atomic_write_text

STRIP_PX = 160          # displayed size of each image in a strip
TEMPLATE = "report.html.j2"
RATE_COLUMNS = ("IF", "CC", "GA", "CU", "success", "success_all", "marginal", "O")
TASK_COLUMNS = ("IF", "CC", "GA", "CU", "success", "O")


def _png_data_uri(img: np.ndarray) -> str:
    """uint8 [H, W, 3] -> data URI. Small images are embedded as they are and upscaled with
    nearest-neighbour by the page (CSS `image-rendering: pixelated`: a third of the bytes of
    upscaling them here); large ones are shrunk to twice the displayed size."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), "RGB")
    if max(im.size) > STRIP_PX * 2:
        im.thumbnail((STRIP_PX * 2, STRIP_PX * 2), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fig_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_rates(per_turn: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Two PNG plots: success / success@k / marginal with 95% bands, and IF / CC / GA / CU."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [r["turn"] for r in per_turn]

    def series(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = np.array([np.nan if r[name] is None else r[name] for r in per_turn], float)
        ci = [r["ci95"].get(name) for r in per_turn]
        lo = np.array([np.nan if c is None else c[0] for c in ci], float)
        hi = np.array([np.nan if c is None else c[1] for c in ci], float)
        return y, lo, hi

    plots = []
    for title, names in (("success per turn (95% bands)", ("success", "success_all", "marginal")),
                         ("checks per turn (95% intervals)", CHECKS)):
        fig, ax = plt.subplots(figsize=(5.6, 3.3))
        for j, name in enumerate(names):
            y, lo, hi = series(name)
            if np.all(np.isnan(y)):
                continue
            label = {"success_all": "success@k"}.get(name, name)
            if title.startswith("success"):
                (line,) = ax.plot(turns, y, marker="o", label=label)
                ax.fill_between(turns, lo, hi, alpha=0.2, color=line.get_color())
            else:
                x = np.array(turns, float) + (j - 1.5) * 0.06
                ax.errorbar(x, y, yerr=[np.nan_to_num(y - lo), np.nan_to_num(hi - y)], marker="o", capsize=3, label=label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(turns)
        ax.set_xlabel("turn")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)
        plots.append({"title": title, "uri": _fig_data_uri(fig)})
        plt.close(fig)
    return plots


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _cell(row: dict[str, Any], name: str) -> dict[str, str]:
    ci = row["ci95"].get(name)
    return {"value": _fmt(row[name]), "ci": "" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"}


def session_order(sessions: Sequence[Session], records: dict, n: int) -> list[Session]:
    """The first n sessions of the suite, those with a failure / error / missing turn first."""
    def bad(s: Session) -> bool:
        for k in range(1, s.n_turns + 1):
            rec = records.get((s.id, k), {})
            if rec.get("status") != "judged":
                return True
            if any(c.get("status") in ("fail", "judge_error") for c in rec["verdict"].values() if isinstance(c, dict)):
                return True
        return False
    first = list(sessions[:n])
    return [s for s in first if bad(s)] + [s for s in first if not bad(s)]


def strip(s: Session, records: dict, images) -> dict[str, Any]:
    """One session's strip: the source and every turn with its text and verdicts."""
    turns = []
    outcome = "all turns succeeded"
    for k in range(1, s.n_turns + 1):
        rec = records.get((s.id, k), {})
        cell: dict[str, Any] = {"turn": k, "instruction": rec.get("instruction", s.turns[k - 1].instruction),
                                "explicit": rec.get("explicit"), "used": rec.get("used"),
                                "context": rec.get("context") or [], "checks": [], "status": rec.get("status", "missing")}
        if cell["status"] == "judged":
            try:
                cell["image"] = _png_data_uri(images.load(s, k))
            except EditrlInputError:
                cell["image"] = None
            v = rec["verdict"]
            for c in CHECKS:
                r = v[c]
                if r["status"] is None:
                    continue
                cell["checks"].append({"name": c, "status": r["status"], "reason": r.get("reason") or "",
                                       "raw": r.get("raw") if r["status"] == "judge_error" else None})
            statuses = {x["status"] for x in cell["checks"]}
            cell["verdict"] = "judge_error" if "judge_error" in statuses else ("fail" if "fail" in statuses else "pass")
        else:
            cell["image"] = None
            cell["verdict"] = "missing"
        if outcome == "all turns succeeded" and cell["verdict"] != "pass":
            outcome = {"fail": f"failed at turn {k}", "judge_error": f"judge error at turn {k}",
                       "missing": f"image missing from turn {k}"}[cell["verdict"]]
        turns.append(cell)
    gc = s.global_constraint
    return {"id": s.id, "source": _png_data_uri(images.load(s, 0)), "constraint": gc.text if gc else None,
            "outcome": outcome, "ok": outcome == "all turns succeeded", "turns": turns}


def render_report(results: dict[str, Any], suite, records: dict, images, strips: int = 24) -> str:
    """The HTML text of the report."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    per_turn = results["per_turn"]
    table = [{"turn": r["turn"], "n": r["n"], "cells": [_cell(r, c) for c in RATE_COLUMNS],
              "judge_errors": r["judge_errors"], "by_check": r["judge_errors_by_check"],
              "missing": r["missing"], "undecided": r["undecided"], "agreement": r.get("agreement")}
             for r in per_turn]
    by_task = [{"task_type": r["task_type"], "turns": r["turns"], "cells": [_cell(r, c) for c in TASK_COLUMNS],
                "judge_errors": r["judge_errors"], "missing": r["missing"]} for r in results.get("by_task") or []]
    shown = session_order(suite.sessions, records, strips)
    st = results["settings"]
    return env.get_template(TEMPLATE).render(
        r=results, s=st, run=results.get("run", {}), table=table, columns=RATE_COLUMNS,
        by_task=by_task, task_columns=TASK_COLUMNS,
        plots=plot_rates(per_turn) if per_turn else [], strips=[strip(x, records, images) for x in shown],
        n_strips=len(shown), fmt=_fmt)


def write_report(path: str | Path, results: dict[str, Any], suite, records: dict, images, strips: int = 24) -> None:
    atomic_write_text(path, render_report(results, suite, records, images, strips))
