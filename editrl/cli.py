"""editrl's command line. Progress goes to stderr; where a command has a result it prints it as
one JSON object on the last line of stdout. Exit codes: 0 success, 2 bad input (one-line
message), 1 internal failure."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .session import EditrlInputError

err = Console(stderr=True)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Multi-turn image editing: benchmark and RL-post-train editors over whole sessions.")
world_app = typer.Typer(add_completion=False, no_args_is_help=True, help="ShapesWorld, the embedded verifiable world.")
app.add_typer(world_app, name="world")


def emit(obj: dict[str, Any]) -> None:
    """The command's result: one JSON object, the last line of stdout."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err, transient=False)


def _positive(name: str, v: int) -> int:
    if v < 1:
        raise EditrlInputError(f"--{name} must be at least 1, got {v}")
    return v


# ------------------------------------------------------------------------------ world

@world_app.command("sample")
def world_sample(
    sessions: int = typer.Option(..., "--sessions", help="number of sessions"),
    turns: int = typer.Option(3, "--turns", help="turns per session (1-10)"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    targets: bool = typer.Option(False, "--targets", help="also write every turn's ground truth as DIR/targets/<id>/turn_<k>.png"),
    constraint_share: float = typer.Option(0.3, "--constraint-share", help="share of sessions opening with a global rule"),
    pronoun_prob: float = typer.Option(0.6, "--pronoun-prob", help="chance of a pronoun when one is possible"),
    min_objects: int = typer.Option(2, "--min-objects"),
    max_objects: int = typer.Option(4, "--max-objects"),
) -> None:
    """Write DIR/sessions.jsonl and the source images of N ShapesWorld sessions (same seed, same bytes)."""
    from .world.grammar import GrammarConfig
    from .world.io import write_world

    _positive("sessions", sessions)
    try:
        cfg = GrammarConfig(turns=turns, constraint_share=constraint_share, pronoun_prob=pronoun_prob,
                            min_objects=min_objects, max_objects=max_objects)
    except ValueError as e:
        raise EditrlInputError(str(e)) from None
    t0 = time.time()
    with _progress() as prog:
        task = prog.add_task("sampling sessions", total=sessions)
        summary = write_world(out, sessions, seed, cfg, targets, progress=lambda n: prog.advance(task, n))
    summary["seconds"] = round(time.time() - t0, 2)
    err.print(f"wrote {summary['sessions']} sessions ({summary['turns']} turns each) to {out}")
    emit(summary)


@world_app.command("check")
def world_check(
    sessions: int = typer.Option(500, "--sessions"),
    seed: int = typer.Option(0, "--seed"),
    turns: int = typer.Option(3, "--turns"),
    degrade: bool = typer.Option(False, "--degrade", help="blur, noise, colour shift and soft edges on every image"),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), "--workers"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the full report as JSON here"),
) -> None:
    """Judge ground truth (must pass) and single-fault perturbations (must be caught)."""
    from .world.check import run_check
    from .world.grammar import GrammarConfig

    _positive("sessions", sessions)
    try:
        cfg = GrammarConfig(turns=turns)
    except ValueError as e:
        raise EditrlInputError(str(e)) from None
    t0 = time.time()
    with _progress() as prog:
        task = prog.add_task("checking the judge", total=sessions)
        report = run_check(sessions, seed, degrade_images=degrade, workers=max(1, workers),
                           progress=lambda n: prog.advance(task, n), cfg=cfg)
    report["seconds"] = round(time.time() - t0, 2)
    table = Table(title=f"ShapesWorld judge check: {sessions} sessions, seed {seed}{', degraded' if degrade else ''}")
    for col in ("fault", "n", "caught", "rate", "caught by"):
        table.add_column(col)
    for fault, v in report["per_fault"].items():
        rate = "-" if v["detect_rate"] is None else f"{v['detect_rate']:.3f}"
        table.add_row(fault, str(v["n"]), str(v["caught"]), rate, ", ".join(f"{k} {n}" for k, n in v["caught_by"].items()))
    err.print(table)
    err.print(f"ground truth: {report['gt_turns']} turns, pass rate {report['gt_pass_rate']:.4f}; "
              f"perturbations: {report['perturbations']}, detect rate {report['perturbation_detect_rate']:.4f}; "
              f"graded CC means {json.dumps({k: round(v, 3) for k, v in report['graded_cc_mean'].items()})}")
    if out is not None:
        from .session import atomic_write_text
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    emit(report)


# ------------------------------------------------------------------------ data files

@app.command("validate")
def validate(
    path: Path = typer.Argument(..., help="a sessions.jsonl file"),
    images: bool = typer.Option(True, "--images/--no-images", help="require every source image to exist (and match its hash)"),
) -> None:
    """Validate a sessions file: schema, unique ids, source images and their hashes."""
    from .session import read_sessions

    sessions = read_sessions(path, check_images=images, check_hashes=images)
    n_turns = sum(s.n_turns for s in sessions)
    err.print(f"{path}: {len(sessions)} valid sessions, {n_turns} turns")
    emit({"path": str(path), "sessions": len(sessions), "turns": n_turns,
          "with_constraint": sum(s.global_constraint is not None for s in sessions)})


@app.command("convert")
def convert_cmd(
    fmt: str = typer.Option(..., "--from", help="mice | edival"),
    src: Path = typer.Argument(..., help="input records (MICE-Bench JSONL or the EdiVal CSV)"),
    out: Path = typer.Option(..., "--out", help="output sessions.jsonl"),
) -> None:
    """Convert MICE-Bench or EdiVal records into editrl's session schema (images not included)."""
    from .convert import convert

    summary = convert(fmt, src, out)
    err.print(f"{summary['converted']} of {summary['records']} records converted, {summary['failed']} failed -> {out}")
    for f in summary["failures"][:10]:
        err.print(f"  {f['where']}: {f['reason']}")
    emit(summary)


# ------------------------------------------------------------------------------ demo

@app.command("demo")
def demo(out: Path = typer.Option(Path("runs/demo"), "--out"),
         sessions: int = typer.Option(200, "--sessions")) -> None:
    """The main job on the embedded default (for now: a ShapesWorld suite and a judge check)."""
    from .world.check import run_check
    from .world.grammar import GrammarConfig
    from .world.io import write_world

    _positive("sessions", sessions)
    cfg = GrammarConfig(turns=3)
    with _progress() as prog:
        t = prog.add_task("sampling a suite", total=sessions)
        sample = write_world(out / "suite", sessions, 0, cfg, True, progress=lambda n: prog.advance(t, n))
        t = prog.add_task("checking the judge", total=sessions)
        clean = run_check(sessions, 1, cfg=cfg, progress=lambda n: prog.advance(t, n))
        t = prog.add_task("checking the judge (degraded)", total=sessions)
        degraded = run_check(sessions, 1, cfg=cfg, degrade_images=True, progress=lambda n: prog.advance(t, n))
    table = Table(title="ShapesWorld judge")
    for col in ("images", "gt pass rate", "perturbations", "detect rate", "graded CC gt / ghost / texture"):
        table.add_column(col)
    for name, r in (("clean", clean), ("degraded", degraded)):
        g = r["graded_cc_mean"]
        table.add_row(name, f"{r['gt_pass_rate']:.4f}", str(r["perturbations"]), f"{r['perturbation_detect_rate']:.4f}",
                      f"{g['ground_truth']:.3f} / {g.get('ghost', float('nan')):.3f} / {g['texture']:.3f}")
    err.print(table)
    err.print(f"suite with ground-truth targets: {out / 'suite'}")
    emit({"suite": sample, "check": {k: {x: r[x] for x in ("gt_pass_rate", "perturbation_detect_rate", "perturbations")}
                                     for k, r in (("clean", clean), ("degraded", degraded))}})


# ------------------------------------------------------------------------------ entry

def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except EditrlInputError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit,) as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as e:  # usage errors from the (vendored) click parser, then real failures
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            hint = ""
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                hint = f" (see '{ctx.command_path} --help')"
            err.print(f"[red]error:[/red] {e.format_message()}{hint}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if os.environ.get("EDITRL_DEBUG"):
            raise
        err.print(f"[red]internal error:[/red] {type(e).__name__}: {e} (set EDITRL_DEBUG=1 for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
