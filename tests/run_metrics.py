"""Reading a training run's metrics.jsonl in tests (tests/ is on sys.path via conftest)."""

from __future__ import annotations

import json
from pathlib import Path


def metric_rows(run: Path) -> list[dict]:
    """Every row of RUN/metrics.jsonl (RUN may also be the file itself)."""
    path = run if run.suffix == ".jsonl" else run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def untimed_rows(run: Path) -> list[dict]:
    """The rows without their wall-clock fields (time/*, elapsed_min): what two runs of the same
    seed must share exactly."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "elapsed_min"} for r in metric_rows(run)]
