"""Benchmark-harness speed: the judge phase with the program judge (turns/s over ground-truth
outputs), a fully cached re-run (seconds, judge calls = 0), and the VLM judge's HTTP
throughput (requests/s) against the loopback OpenAI-compatible server with a fixed
per-request delay at several concurrencies. Prints a table and writes JSON.

    python benchmarks/bench_speed.py [--sessions 200] [--turns 5] [--delay 0.05]
                                     [--concurrency 1 4 16 64] [--crossover 40 100 200 300 500]
                                     [--out runs/bench_speed.json]

The program judge runs in one process, in 2 worker processes, and with the default
(`--judge-workers 0`, auto), and one process and 2 workers are compared on growing runs
(`--crossover`), which is where the auto setting's threshold comes from.

Turns/s are given twice: by wall time, and by this process's CPU time (on a machine shared
with other work, the CPU-time figure is the closer estimate of an idle machine's speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))   # the loopback judge server lives with the tests


def run(out: Path, suite: Path, editor: str, judge: str, **kw) -> dict:
    from editrl.bench import BenchConfig, run_bench
    from editrl.world import parse

    # every run starts cold: the parser's per-plane memory would otherwise hold the earlier
    # runs' planes (the same images), and worker processes inherit it
    parse._STRUCTURES.clear()
    run_bench(BenchConfig(suite=str(suite), editor=editor, judge=judge, out=out, strips=4, **kw))
    return json.loads((out / "results.json").read_text())["run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.05, help="loopback server delay per request (s)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--http-seconds", type=float, default=2.0, help="aim for about this long per concurrency")
    ap.add_argument("--crossover", type=int, nargs="*", default=[40, 100, 200, 300, 500],
                    help="session counts at which one process and 2 workers are compared")
    ap.add_argument("--out", default="runs/bench_speed.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from editrl.world.grammar import GrammarConfig
    from editrl.world.io import write_world
    from loopback_judge_server import LoopbackJudgeServer

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="editrl-bench-speed-") as tmp:
        tmp = Path(tmp)
        world = tmp / "world"
        write_world(world, args.sessions, args.seed, GrammarConfig(turns=args.turns), targets=True)
        suite, outputs = world / "sessions.jsonl", f"outputs:{world / 'targets'}"
        n_turns = args.sessions * args.turns
        cache = tmp / "cache.sqlite"

        # 1. program judge in one process, empty cache: the judge phase does everything once
        r = run(tmp / "first", suite, outputs, "program", cache=cache, judge_workers=1)
        rows.append({"what": f"program judge, {args.sessions}x{args.turns} turns, one process, empty cache", "turns": n_turns,
                     "seconds": r["judge_seconds"], "cpu_seconds": r["judge_cpu_seconds"],
                     "turns_per_s": n_turns / r["judge_seconds"], "turns_per_cpu_s": n_turns / r["judge_cpu_seconds"],
                     "judge_calls": r["judge_calls"], "inside_judge_s": r["judge_call_seconds"],
                     "whole_run_s": r["seconds"]})
        r = run(tmp / "workers2", suite, outputs, "program", no_cache=True, judge_workers=2)
        rows.append({"what": "program judge, 2 worker processes, no cache", "turns": n_turns,
                     "seconds": r["judge_seconds"], "cpu_seconds": r["judge_cpu_seconds"],
                     "turns_per_s": n_turns / r["judge_seconds"], "judge_calls": r["judge_calls"],
                     "whole_run_s": r["seconds"]})
        # the default (--judge-workers 0: auto), what `editrl bench` does unless told otherwise
        r = run(tmp / "auto", suite, outputs, "program", no_cache=True)
        rows.append({"what": f"program judge, default (auto: {r['judge_workers']} process(es)), no cache", "turns": n_turns,
                     "workers": r["judge_workers"], "seconds": r["judge_seconds"], "cpu_seconds": r["judge_cpu_seconds"],
                     "turns_per_s": n_turns / r["judge_seconds"], "judge_calls": r["judge_calls"],
                     "whole_run_s": r["seconds"]})
        # 2. the same outputs in a new folder, same cache, one process: no judge call at all
        r = run(tmp / "cached", suite, outputs, "program", cache=cache, judge_workers=1)
        rows.append({"what": "program judge, fully cached re-run", "turns": n_turns,
                     "seconds": r["judge_seconds"], "cpu_seconds": r["judge_cpu_seconds"],
                     "turns_per_s": n_turns / r["judge_seconds"], "turns_per_cpu_s": n_turns / r["judge_cpu_seconds"],
                     "judge_calls": r["judge_calls"], "cache_hits": r["cache_hits"], "whole_run_s": r["seconds"]})
        # where worker processes start to pay (AUTO_WORKERS_MIN_TURNS): 1 vs 2 workers on the first n sessions
        for n in sorted(x for x in args.crossover if x <= args.sessions):
            secs = {}
            for w in (1, 2):
                r = run(tmp / f"cross{n}_{w}", suite, outputs, "program", sessions=n, no_cache=True, judge_workers=w)
                secs[w] = r["judge_seconds"]
            rows.append({"what": f"crossover: {n * args.turns} turns, 1 process vs 2 workers", "turns": n * args.turns,
                         "seconds": secs[1], "seconds_2_workers": secs[2], "turns_per_s": n * args.turns / secs[1],
                         "turns_per_s_2_workers": n * args.turns / secs[2], "judge_calls": n * args.turns})
        # 3. VLM judge over HTTP, loopback server answering after a fixed delay
        with LoopbackJudgeServer(delay=args.delay) as srv:
            for c in args.concurrency:
                n_sessions = max(2, min(args.sessions, round(args.http_seconds * c / args.delay / args.turns)))
                srv.reset()
                r = run(tmp / f"http{c}", suite, outputs, f"vlm:{srv.url}", sessions=n_sessions, no_cache=True,
                        chunk_size=max(64, 2 * c), judge_options={"concurrency": c, "retries": 0})
                n = r["model_calls"]
                rows.append({"what": f"vlm judge over HTTP, {1000 * args.delay:.0f} ms/request, concurrency {c}",
                             "requests": n, "seconds": r["judge_seconds"], "cpu_seconds": r["judge_cpu_seconds"],
                             "requests_per_s": n / r["judge_seconds"], "ideal_requests_per_s": c / args.delay,
                             "max_in_flight": srv.max_in_flight, "judge_calls": r["judge_calls"]})

    print(f"{'measurement':<58} {'n':>6} {'seconds':>8} {'per s':>9} {'per CPU s':>10} {'calls':>6}")
    for r in rows:
        n = r.get("turns", r.get("requests"))
        per_s = r.get("turns_per_s", r.get("requests_per_s"))
        per_cpu = r.get("turns_per_cpu_s")
        print(f"{r['what']:<58} {n:>6} {r['seconds']:>8.3f} {per_s:>9.1f} "
              f"{'' if per_cpu is None else f'{per_cpu:.1f}':>10} {r['judge_calls']:>6}")
        if "seconds_2_workers" in r:
            print(f"{'  ... with 2 workers':<58} {n:>6} {r['seconds_2_workers']:>8.3f} {r['turns_per_s_2_workers']:>9.1f}")
    load = os.getloadavg()
    result = {"rows": rows, "sessions": args.sessions, "turns": args.turns, "delay_s": args.delay,
              "machine": {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in load], "python": platform.python_version()},
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {load[0]:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
