"""`editrl bench`: suites, the harness (editor phase, cached and resumable judge phase),
metrics with bootstrap intervals, and the HTML report.

    from editrl.bench import BenchConfig, run_bench
    summary = run_bench(BenchConfig(suite="shapes", editor="tiny", judge="program", out=Path("runs/b")))
"""

from .harness import BenchConfig, compare_runs, run_bench

__all__ = ["BenchConfig", "run_bench", "compare_runs"]
