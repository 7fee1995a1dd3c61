"""Benchmark metrics per turn over sessions, with bootstrap intervals (DESIGN §6).

Every verdict of a run becomes an array over sessions × turns (`Outcomes`). Every rate is a
ratio of two per-session sums — `sum(num) / sum(den)` at turn k — which makes the bootstrap
one matrix product: resampling sessions with replacement is a matrix of counts C [B, N], and
C @ num, C @ den give every rate of every resample at once.

Conventions:
- IF, CC, GA, CU at turn k: passes / (passes + fails) over turns where the check applies.
  A judge error is in neither; it is counted in `judge_errors` (and per check).
- `success` at k: the turn passes every applicable check, over *decided* turns (no judge
  error on any check, image present).
- `success_all` (success@k): sessions whose turns 1..k all succeeded, over sessions that
  have a turn k and whose turns 1..k are all decided. A session with an undecided turn
  (judge error or missing image) at or before k is left out of success@k's denominator and
  counted in `undecided`: counting it as a failure would punish the editor for the judge,
  and counting a known failure while dropping unknowns would bias toward failure. When
  errors strike sessions regardless of their outcome, leaving them out keeps the estimate
  unbiased.
- `marginal` at k: success at k among sessions that succeeded through k-1 (k = 1: among all
  sessions), over decided turns; null when no session qualifies.
- `O` = sqrt(IF · CC) at a turn; the run's `O` is the one at the last turn.
- Sessions shorter than k are not counted at k: `n` is the number of sessions with a turn k.
- A rate with an empty denominator is null (None), never 0.
- Intervals: 95% percentile bootstrap over sessions (resample sessions, recompute the
  rate; resamples where the rate is undefined are dropped), seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..session import CHECKS

NA, PASS, FAIL, ERR = 0, 1, 2, 3
_CODE = {None: NA, "pass": PASS, "fail": FAIL, "judge_error": ERR}
RATES = ("IF", "CC", "GA", "CU", "success", "success_all", "marginal")
COMPARED = ("success", "success_all", "IF", "CC", "O")


@dataclass
class Outcomes:
    """Every verdict of a run over sessions (rows) and turns (columns)."""
    session_ids: list[str]
    status: np.ndarray    # int8 [N, K, 4]: NA / PASS / FAIL / ERR for IF, CC, GA, CU
    exists: np.ndarray    # bool [N, K]: the session has a turn k
    missing: np.ndarray   # bool [N, K]: the editor's image is missing (turn excluded)

    @property
    def n_turns(self) -> int:
        return self.status.shape[1]

    def subset(self, ids: Sequence[str], turns: int | None = None) -> "Outcomes":
        """Rows for `ids` (in that order), first `turns` columns."""
        row = {s: i for i, s in enumerate(self.session_ids)}
        idx = np.array([row[s] for s in ids], dtype=np.int64)
        K = self.n_turns if turns is None else turns
        return Outcomes(list(ids), self.status[idx, :K], self.exists[idx, :K], self.missing[idx, :K])


def outcomes_from_records(session_ids: Sequence[str], n_turns: Sequence[int],
                          records: Mapping[tuple[str, int], Mapping[str, Any]]) -> Outcomes:
    """Build `Outcomes` from benchmark records keyed by (session id, turn).

    A record is `{"status": "judged", "verdict": TurnVerdict dict}` or `{"status": "missing"}`;
    every existing turn must have one.
    """
    N, K = len(session_ids), max(n_turns, default=0)
    status = np.zeros((N, K, len(CHECKS)), np.int8)
    exists = np.zeros((N, K), bool)
    missing = np.zeros((N, K), bool)
    for i, (sid, nt) in enumerate(zip(session_ids, n_turns)):
        exists[i, :nt] = True
        for k in range(1, nt + 1):
            rec = records.get((sid, k))
            if rec is None:
                raise ValueError(f"no record for session {sid} turn {k}")
            if rec["status"] == "missing":
                missing[i, k - 1] = True
                continue
            v = rec["verdict"]
            for c, name in enumerate(CHECKS):
                status[i, k - 1, c] = _CODE[v[name]["status"]]
    return Outcomes(list(session_ids), status, exists, missing)


# --------------------------------------------------------------------------- per session

def ratio_parts(o: Outcomes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (num, den), float [N, K] each: the rate at turn k is num[:, k].sum() / den[:, k].sum()."""
    st = o.status                                                      # [N, K, 4]
    live = o.exists & ~o.missing                                       # [N, K]
    has_err = (st == ERR).any(-1)                                      # [N, K]
    decided = live & ~has_err                                          # [N, K]
    success = decided & ((st == NA) | (st == PASS)).all(-1)            # [N, K]
    ok_through = np.logical_and.accumulate(success, axis=1)            # [N, K] turns 1..k all succeeded
    clean_through = np.logical_and.accumulate(decided, axis=1)         # [N, K] turns 1..k all decided
    prev_ok = np.concatenate([np.ones((len(st), 1), bool), ok_through[:, :-1]], axis=1)  # [N, K]
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for c, name in enumerate(CHECKS):
        parts[name] = (live & (st[..., c] == PASS), live & np.isin(st[..., c], (PASS, FAIL)))
    parts["success"] = (success, decided)
    den_all = o.exists & clean_through
    parts["success_all"] = (den_all & ok_through, den_all)
    den_marg = prev_ok & decided
    parts["marginal"] = (den_marg & success, den_marg)
    return {k: (a.astype(np.float64), b.astype(np.float64)) for k, (a, b) in parts.items()}


def turn_counts(o: Outcomes) -> list[dict[str, Any]]:
    """Per turn: n, judge errors (turns with any; per check), missing, undecided for success@k."""
    live = o.exists & ~o.missing
    err = (o.status == ERR) & live[..., None]                          # [N, K, 4]
    decided_through = np.logical_and.accumulate(live & ~err.any(-1), axis=1)
    rows = []
    for k in range(o.n_turns):
        rows.append({
            "turn": k + 1,
            "n": int(o.exists[:, k].sum()),
            "judge_errors": int(err[:, k].any(-1).sum()),
            "judge_errors_by_check": {c: int(err[:, k, j].sum()) for j, c in enumerate(CHECKS)},
            "missing": int((o.exists[:, k] & o.missing[:, k]).sum()),
            "undecided": int((o.exists[:, k] & ~decided_through[:, k]).sum()),
        })
    return rows


# ----------------------------------------------------------------------------- rates

def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num / den with NaN where den == 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def rates(parts: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Point estimates: name -> [K] (NaN where undefined), plus O = sqrt(IF · CC)."""
    out = {name: _ratio(num.sum(0), den.sum(0)) for name, (num, den) in parts.items()}
    out["O"] = np.sqrt(out["IF"] * out["CC"])
    return out


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """int [B, N]: how often each of n sessions is drawn in each of B resamples (with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))                         # [B, N]
    flat = idx + (np.arange(n_boot) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=n_boot * n).reshape(n_boot, n)


def bootstrap_rates(parts: Mapping[str, tuple[np.ndarray, np.ndarray]], counts: np.ndarray) -> dict[str, np.ndarray]:
    """name -> [B, K]: every rate recomputed on every resample (one matmul per side)."""
    names = list(parts)
    K = next(iter(parts.values()))[0].shape[1]
    NUM = np.concatenate([parts[n][0] for n in names], axis=1)         # [N, M*K]
    DEN = np.concatenate([parts[n][1] for n in names], axis=1)         # [N, M*K]
    C = counts.astype(np.float64)                                      # [B, N]
    R = _ratio(C @ NUM, C @ DEN)                                       # [B, M*K]
    out = {n: R[:, j * K:(j + 1) * K] for j, n in enumerate(names)}
    out["O"] = np.sqrt(out["IF"] * out["CC"])
    return out


def percentile_ci(samples: np.ndarray, point: np.ndarray) -> list[list[float] | None]:
    """[B, K] resampled values -> per turn [lo, hi] (2.5 / 97.5 percentiles), None where the point is undefined."""
    out: list[list[float] | None] = []
    for k in range(samples.shape[1]):
        col = samples[:, k]
        col = col[~np.isnan(col)]
        if np.isnan(point[k]) or not len(col):
            out.append(None)
        else:
            lo, hi = np.percentile(col, [2.5, 97.5])
            out.append([float(lo), float(hi)])
    return out


def _val(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def per_turn_metrics(o: Outcomes, n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """The `per_turn` rows of results.json: rates, counts and 95% intervals."""
    parts = ratio_parts(o)
    point = rates(parts)
    ci: dict[str, list] = {}
    if n_boot > 0 and o.status.shape[0] > 0:
        boot = bootstrap_rates(parts, bootstrap_counts(len(o.session_ids), n_boot, seed))
        ci = {name: percentile_ci(boot[name], point[name]) for name in (*RATES, "O")}
    rows = []
    for k, counts in enumerate(turn_counts(o)):
        row: dict[str, Any] = {"turn": counts["turn"], "n": counts["n"]}
        row.update({name: _val(point[name][k]) for name in (*RATES, "O")})
        row.update({key: v for key, v in counts.items() if key not in ("turn", "n")})
        row["ci95"] = {name: (ci[name][k] if ci else None) for name in (*RATES, "O")}
        rows.append(row)
    return rows


def overall_metrics(per_turn: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The `overall` block: O and success@k at the last turn, and totals."""
    if not per_turn:
        return {"O": None, "success_all_last": None, "turns": 0, "judge_errors": 0, "missing": 0}
    last = per_turn[-1]
    return {"O": last["O"], "O_ci95": last["ci95"]["O"],
            "success_all_last": last["success_all"], "success_all_last_ci95": last["ci95"]["success_all"],
            "turns": last["turn"],
            "judge_errors": sum(r["judge_errors"] for r in per_turn),
            "missing": sum(r["missing"] for r in per_turn)}


# ------------------------------------------------------------------------- per task type

TASK_RATES = ("IF", "CC", "GA", "CU", "success")
TASK_COMPARED = ("success", "IF", "CC")


def task_labels(session_ids: Sequence[str], n_turns: Sequence[int], label: Mapping[tuple[str, int], str | None]) -> np.ndarray:
    """object [N, K]: the task type of every existing turn (None where the turn or its label is absent)."""
    K = max(n_turns, default=0)
    out = np.full((len(session_ids), K), None, dtype=object)
    for i, (sid, nt) in enumerate(zip(session_ids, n_turns)):
        for k in range(1, nt + 1):
            out[i, k - 1] = label.get((sid, k))
    return out


def task_order(tasks: np.ndarray) -> list[str]:
    """The labels present, in TASK_TYPES order, then any other label alphabetically."""
    from ..session import TASK_TYPES

    present = {t for t in tasks.ravel() if t is not None}
    return [t for t in TASK_TYPES if t in present] + sorted(present - set(TASK_TYPES))


def task_parts(o: Outcomes, mask: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (num, den) float [N, 1]: the per-turn rates of TASK_RATES pooled over the turns in mask [N, K].

    These rates are per cell (a turn passes or fails on its own), so masking `exists` and
    summing over turns pools every turn of the task type, whatever its position in the session.
    """
    parts = ratio_parts(Outcomes(o.session_ids, o.status, o.exists & mask, o.missing))
    return {n: (parts[n][0].sum(1, keepdims=True), parts[n][1].sum(1, keepdims=True)) for n in TASK_RATES}


def per_task_metrics(o: Outcomes, tasks: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """The `by_task` rows of results.json: per task type, IF / CC / GA / CU / success over every
    judged turn of that type (all positions pooled), counts, and 95% bootstrap intervals over sessions."""
    C = bootstrap_counts(len(o.session_ids), n_boot, seed) if n_boot > 0 and o.session_ids else None
    err = (o.status == ERR).any(-1)                                    # [N, K]
    rows = []
    for t in task_order(np.where(o.exists, tasks, None)):
        mask = o.exists & (tasks == t)                                 # [N, K]
        parts = task_parts(o, mask)
        point = rates(parts)
        row: dict[str, Any] = {"task_type": t, "turns": int(mask.sum())}
        row.update({n: _val(point[n][0]) for n in (*TASK_RATES, "O")})
        row["judge_errors"] = int((err & mask & ~o.missing).sum())
        row["missing"] = int((mask & o.missing).sum())
        boot = bootstrap_rates(parts, C) if C is not None else None
        row["ci95"] = {n: (percentile_ci(boot[n], point[n])[0] if boot is not None else None) for n in (*TASK_RATES, "O")}
        rows.append(row)
    return rows


def paired_task_differences(a: Outcomes | Sequence[Outcomes], b: Outcomes | Sequence[Outcomes], tasks: np.ndarray,
                            n_boot: int = 1000, seed: int = 0, metrics: Iterable[str] = TASK_COMPARED) -> list[dict[str, Any]]:
    """Per task type, B − A for each metric over the turns every run holds, with a paired bootstrap
    interval (the resamples draw sessions, as `paired_differences`; several runs per side pool)."""
    a, b = _runs(a), _runs(b)
    metrics = list(metrics)
    C = bootstrap_counts(len(a[0].session_ids), n_boot, seed) if n_boot > 0 and a[0].session_ids else None
    both = _held_by_all(a + b)
    rows = []
    for t in task_order(np.where(both, tasks, None)):
        mask = both & (tasks == t)
        pa, pb = (pooled_parts(side, lambda o: task_parts(o, mask)) for side in (a, b))
        ra, rb = rates(pa), rates(pb)
        ba, bb = (bootstrap_rates(pa, C), bootstrap_rates(pb, C)) if C is not None else (None, None)
        row: dict[str, Any] = {"task_type": t, "turns": int(mask.sum())}
        for m in metrics:
            d = rb[m][0] - ra[m][0]
            ci = None
            if ba is not None and not np.isnan(d):
                ci = percentile_ci(bb[m] - ba[m], np.array([d]))[0]
            row[m] = {"a": _val(ra[m][0]), "b": _val(rb[m][0]), "diff": _val(d), "ci95": ci}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ paired

def _runs(x: Outcomes | Sequence[Outcomes]) -> list[Outcomes]:
    return [x] if isinstance(x, Outcomes) else list(x)


def _held_by_all(runs: Sequence[Outcomes]) -> np.ndarray:
    """bool [N, K]: the turns every run holds. Raises unless the runs hold the same sessions and turns."""
    first = runs[0]
    if any(o.session_ids != first.session_ids or o.n_turns != first.n_turns for o in runs):
        raise ValueError("paired runs must hold the same sessions and turns")
    return np.logical_and.reduce([o.exists for o in runs])


def pooled_parts(runs: Sequence[Outcomes], parts_of=ratio_parts) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (num, den) [N, K]: `parts_of` summed over runs of the same sessions (e.g. training
    seeds), so a rate pools every run's verdicts of a session, and a bootstrap that draws a session
    draws it in every run. Without judge errors the pooled rate is the mean of the runs' rates."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for o in runs:
        for name, (num, den) in parts_of(o).items():
            if name in out:
                out[name] = (out[name][0] + num, out[name][1] + den)
            else:
                out[name] = (num, den)
    return out


def paired_differences(a: Outcomes | Sequence[Outcomes], b: Outcomes | Sequence[Outcomes], n_boot: int = 1000,
                       seed: int = 0, metrics: Iterable[str] = COMPARED) -> list[dict[str, Any]]:
    """Per turn, B − A for each metric with a paired bootstrap interval.

    Each side is one run or several runs of the same sessions (pooled by `pooled_parts`); all must
    hold the same sessions in the same order (see `Outcomes.subset`), and only turns every run holds
    count. Each resample draws sessions once and recomputes both sides' rates on the same draw.
    """
    a, b = _runs(a), _runs(b)
    both = _held_by_all(a + b)                                         # [N, K]
    a = [Outcomes(o.session_ids, o.status, both, o.missing) for o in a]
    b = [Outcomes(o.session_ids, o.status, both, o.missing) for o in b]
    metrics = list(metrics)
    pa, pb = pooled_parts(a), pooled_parts(b)
    ra, rb = rates(pa), rates(pb)
    N = len(a[0].session_ids)
    if n_boot > 0 and N:
        C = bootstrap_counts(N, n_boot, seed)
        ba, bb = bootstrap_rates(pa, C), bootstrap_rates(pb, C)
    rows = []
    for k in range(a[0].n_turns):
        row: dict[str, Any] = {"turn": k + 1, "n": int(both[:, k].sum())}
        for m in metrics:
            d = rb[m][k] - ra[m][k]
            ci = None
            if n_boot > 0 and N and not np.isnan(d):
                ci = percentile_ci((bb[m][:, k] - ba[m][:, k])[:, None], np.array([d]))[0]
            row[m] = {"a": _val(ra[m][k]), "b": _val(rb[m][k]), "diff": _val(d), "ci95": ci}
        rows.append(row)
    return rows
