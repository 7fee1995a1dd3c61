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
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

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


class _EtaColumn(TimeRemainingColumn):
    """Rich's time-remaining estimate, capped by a wall-time budget: a task updated with the field
    `left_s` (seconds its `max_minutes` still allows, from the run's own clock) never shows more."""

    def render(self, task):  # type: ignore[no-untyped-def]
        left = task.fields.get("left_s")
        if left is None or task.finished:
            return super().render(task)
        est = task.time_remaining
        remaining = left if est is None else min(est, left)
        return Text(_clock(remaining), style="progress.remaining")


def _clock(seconds: float) -> str:
    m, s = divmod(int(max(0.0, seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _time_left(max_minutes: float, row: dict) -> float | None:
    """Seconds a run's `max_minutes` still allows after its row's `elapsed_min` (None: no limit)."""
    if not max_minutes or max_minutes <= 0 or "elapsed_min" not in row:
        return None
    return max(0.0, max_minutes * 60.0 - float(row["elapsed_min"]) * 60.0)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), _EtaColumn(), console=err, transient=False)


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
    if out.exists() and not out.is_dir():
        raise EditrlInputError(f"--out {out} exists and is not a folder")
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
        err.print(escape(f"  {f['where']}: {f['reason']}"))
    emit(summary)


# ------------------------------------------------------------------------------ edit

@app.command("edit")
def edit_cmd(
    instructions: list[str] = typer.Argument(None, help="one instruction per turn"),
    editor: str = typer.Option("tiny", "--editor", help="tiny | tiny:PATH | flux-kontext:PATH | qwen-edit:PATH"),
    image: Optional[Path] = typer.Option(None, "--image", help="input image (PNG)"),
    session: Optional[str] = typer.Option(None, "--session", help="replay a ShapesWorld session: FILE.jsonl#ID (or FILE.jsonl for the first)"),
    out: Path = typer.Option(..., "--out"),
    mode: str = typer.Option("explicit", "--mode", help="explicit | in_context"),
    intent: str = typer.Option("none", "--intent", help="rewrite each instruction first: none | rules | tiny[:PATH] | llm:..."),
    steps: int = typer.Option(10, "--steps"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Run one session: each turn edits the previous turn's output. Writes turn_<k>.png and turns.json."""
    import torch

    from .editors import load_editor
    from .session import atomic_write_text, read_sessions, resolve_image
    from .session import atomic_write_bytes
    from .world.io import png_bytes
    from .world.render import load_png

    _positive("steps", steps)
    sess = None
    if session:
        file, _, sid = session.partition("#")
        sessions = read_sessions(file, check_images=True)
        sess = next((s for s in sessions if s.id == sid), None) if sid else sessions[0]
        if sess is None:
            raise EditrlInputError(f"{file}: no session with id {sid!r}")
        if instructions:
            raise EditrlInputError("give either instructions or --session, not both")
        image = resolve_image(file, sess.source_image)
        texts = [t.explicit if (mode == "explicit" and t.explicit) else t.instruction for t in sess.turns]
        raw = [t.instruction for t in sess.turns]
    else:
        if image is None or not instructions:
            raise EditrlInputError("give --image and at least one instruction (or --session FILE.jsonl#ID)")
        texts = raw = list(instructions)
    if not Path(image).is_file():
        raise EditrlInputError(f"--image {image}: file not found")
    try:
        img = load_png(image)
    except Exception as e:
        raise EditrlInputError(f"--image {image}: not a readable image ({e})") from None
    traces: list[Any] = [None] * len(texts)
    if intent != "none":
        from .intent import load_reconstructor, reconstruct_sessions
        from .session import Session, Turn

        if mode != "explicit":
            raise EditrlInputError("--intent writes explicit instructions: use --mode explicit")
        reconstructor = load_reconstructor(intent)
        if sess is None:   # free instructions: a ShapesWorld image's scene is read by the parser
            sess = Session(id="edit", source_image=str(image), turns=[Turn(instruction=t, task_type="other") for t in raw],
                           source_scene=_parsed_scene(img_path=image))
        recs = reconstruct_sessions(reconstructor, [sess])
        texts = [recs[(sess.id, k)].explicit for k in range(1, len(raw) + 1)]
        traces = [{"trace": recs[(sess.id, k)].trace, "error": recs[(sess.id, k)].error} for k in range(1, len(raw) + 1)]
    ed = load_editor(editor, mode=mode)
    canvas = getattr(getattr(ed, "cfg", None), "canvas", None)
    if canvas and img.shape[:2] != (canvas, canvas):
        raise EditrlInputError(f"--image {image}: the editor edits {canvas}x{canvas} images, got {img.shape[1]}x{img.shape[0]}")
    tok = getattr(ed, "tokenizer", None)
    if tok is not None:  # reject an unknown word before anything is written
        for text in texts:
            tok.ids(text)
    gen = torch.Generator().manual_seed(seed)
    atomic_write_bytes(out / "turn_0.png", png_bytes(img))
    rows = []
    scenes = None
    if sess is not None and sess.source_scene is not None and all(t.expected is not None for t in sess.turns):
        from .world.grammar import session_scenes
        from .world.verify import judge_turn
        scenes = session_scenes(sess)
    for k, text in enumerate(texts, start=1):
        src, img = img, ed.edit([img], [text], [raw[: k - 1]], generator=gen, steps=steps)[0]
        atomic_write_bytes(out / f"turn_{k}.png", png_bytes(img))
        row: dict[str, Any] = {"turn": k, "instruction": raw[k - 1], "used": text, "image": f"turn_{k}.png"}
        if traces[k - 1] is not None:
            row["intent"] = traces[k - 1]
        if scenes is not None:
            v = judge_turn(img, scenes[k - 1], scenes[k], sess.turns[k - 1], k, sess.global_constraint, sess.id,
                           source_image=src)
            row["verdict"] = {c: (r.status, r.reason) for c, r in v.checks().items() if r.status}
            row["success"] = v.success
        rows.append(row)
        err.print(f"turn {k}: {escape(text)}" + (f"  -> {'pass' if row.get('success') else 'FAIL'}" if "success" in row else ""))
    summary = {"editor": editor, "mode": mode, "intent": intent, "steps": steps, "seed": seed, "out": str(out), "turns": rows}
    atomic_write_text(out / "turns.json", json.dumps(summary, indent=2) + "\n")
    emit(summary)


def _parsed_scene(img_path: Path) -> dict[str, Any] | None:
    """The ShapesWorld scene an image shows, read by the program judge's parser, or None when
    it is not a clean ShapesWorld image (some object not fully recognised)."""
    from .world.parse import parse
    from .world.render import load_png
    from .world.scene import CELL_NAMES, Scene

    try:
        p = parse(load_png(img_path))
    except Exception:
        return None
    if p.background is None or any(None in (d.shape, d.size, d.fill, d.cell) for d in p.objects):
        return None
    try:
        return Scene.from_dict({"background": p.background, "canvas": p.canvas, "objects": [
            {"id": i, "shape": d.shape, "color": d.color, "size": d.size, "fill": d.fill, "cell": CELL_NAMES[d.cell]}
            for i, d in enumerate(p.objects)]}).to_dict()
    except (ValueError, KeyError):
        return None


# -------------------------------------------------------------------------- pretrain

@app.command("pretrain", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def pretrain_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="run folder (resumes if it holds a run)"),
    config: Optional[str] = typer.Option(None, "--config", help="preset name (editrl/configs) or YAML path"),
) -> None:
    """Supervised flow-matching pretraining of the tiny editor; key=value arguments override the config."""
    from .config import load_config, to_dict
    from .pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, config, list(ctx.args))
    err.print(f"pretraining the tiny editor -> {out}  ({json.dumps({k: v for k, v in to_dict(cfg).items() if k != 'model'})})")
    with _progress() as prog:
        task = prog.add_task("pretraining", total=cfg.max_steps)

        def on_progress(step: int, total: int, row: dict) -> None:
            prog.update(task, completed=step, description=f"pretraining loss {row['loss']:.4f}",
                        left_s=_time_left(cfg.max_minutes, row))
            if any(k.startswith("eval/") for k in row):
                err.print({k: round(v, 3) for k, v in row.items() if k.startswith("eval/")})

        summary = pretrain(cfg, out, log=lambda m: err.print(m), progress=on_progress)
    emit(summary)


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="run folder (resumes if it holds a run)"),
    config: Optional[str] = typer.Option(None, "--config", help="preset (shapes-nft, shapes-grpo, kontext-grpo, "
                                         "kontext-nft, qwen-edit-grpo, qwen-edit-nft) or YAML path"),
) -> None:
    """Multi-turn RL post-training (Flow-GRPO or DiffusionNFT); key=value arguments override the config.
    Writes DIR/metrics.jsonl, DIR/state.safetensors (resumable) and DIR/final (load with --editor tiny:DIR/final;
    LoRA runs of a diffusers editor: --editor flux-kontext:DIR/final or qwen-edit:DIR/final)."""
    from .config import load_config, to_dict
    from .rl.train import TrainConfig, train

    cfg = load_config(TrainConfig, config, list(ctx.args))
    if out.exists() and not out.is_dir():
        raise EditrlInputError(f"--out {out} exists and is not a folder")
    err.print(f"{cfg.algorithm} post-training of {escape(cfg.init)} -> {escape(str(out))}")
    with _progress() as prog:
        task = prog.add_task("training", total=cfg.max_steps)

        def on_progress(step: int, total: int, row: dict) -> None:
            succ = [row[k] for k in sorted(row) if k.startswith("success/turn_")]
            desc = f"{cfg.algorithm} reward {row.get('reward/fused', float('nan')):.3f} success/turn " + \
                   " ".join(f"{v:.2f}" for v in succ)
            prog.update(task, completed=step, description=desc, left_s=_time_left(cfg.max_minutes, row))
            if any(k.startswith("eval/") for k in row):
                err.print({k: round(v, 3) for k, v in row.items() if k.startswith("eval/")})

        summary = train(cfg, out, log=lambda m: err.print(escape(m)), progress=on_progress)
    if "eval" in summary:
        summary["eval"] = {"per_turn": summary["eval"]["per_turn"], "overall": summary["eval"]["overall"]}
    emit(summary)


@app.command("ablate", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def ablate_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="ablation folder (a re-run resumes)"),
    studies: str = typer.Option("all", "--studies", help="comma-separated: assignment, fusion, scoring, aggregation, "
                                "trajectory_filter, algorithm, train_turns, branching, control (or all)"),
    seeds: int = typer.Option(3, "--seeds"),
    minutes: float = typer.Option(5.0, "--minutes", help="wall-time budget of every (arm, seed) run"),
    sessions: int = typer.Option(100, "--sessions", help="held-out 3-turn sessions per benchmark"),
    config: str = typer.Option("shapes-nft", "--config", help="base RL preset; key=value arguments override every RL arm"),
    jobs: int = typer.Option(1, "--jobs", help="(arm, seed) runs at once, each in its own process"),
    threads: int = typer.Option(0, "--threads", help="torch threads per run (0: the preset's; with --jobs > 1, cores / jobs)"),
) -> None:
    """The papers' design studies over several seeds: each arm trained for the same wall time,
    benchmarked on the same held-out sessions, compared paired by session with intervals.
    Writes DIR/ablation.md and DIR/ablation.json."""
    from .rl.ablate import STUDIES, AblateConfig, markdown, run_ablation

    names = list(STUDIES) if studies.strip() == "all" else [x.strip() for x in studies.split(",") if x.strip()]
    cfg = AblateConfig(out=out, studies=names, seeds=seeds, minutes=minutes, sessions=sessions, preset=config,
                       overrides=list(ctx.args), jobs=jobs, threads=threads)
    table = run_ablation(cfg, log=lambda m: err.print(escape(m)))
    err.print(markdown(table))
    emit({"out": str(out), "table": str(out / "ablation.md"), "studies": [s["study"] for s in table["studies"]]})


# ----------------------------------------------------------------------------- bench

bench_app = typer.Typer(add_completion=False, help="Run SUITE through EDITOR and judge every turn with JUDGE: writes "
                        "DIR/results.json, records.jsonl and report.html (resumable, verdicts cached). "
                        "'bench compare DIR_A DIR_B': paired per-turn differences.")
app.add_typer(bench_app, name="bench")
intent_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Session-intent reconstruction: rewrite each instruction into an explicit one.")
app.add_typer(intent_app, name="intent")


@intent_app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def intent_train(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="run folder: DIR/policy.safetensors (use with --intent tiny:DIR) and metrics.jsonl"),
) -> None:
    """Supervised training of the tiny intent policy on grammar-made pairs; key=value arguments
    override editrl.intent.tiny.IntentTrainConfig (steps, batch_size, lr, seed, model.dim, ...)."""
    from .config import load_config
    from .intent.tiny import IntentTrainConfig, train_policy

    cfg = load_config(IntentTrainConfig, None, list(ctx.args))
    if out.exists() and not out.is_dir():
        raise EditrlInputError(f"--out {out} exists and is not a folder")
    emit(train_policy(cfg, out, log=lambda m: err.print(escape(m))))


@intent_app.command("eval")
def intent_eval(
    suite: str = typer.Option(..., "--suite", help="shapes | shapes-long | a sessions JSONL (editrl, MICE-Bench or EdiVal records)"),
    intent: str = typer.Option(..., "--intent", help="none | rules | tiny | tiny:PATH | llm:hf:PATH | llm:URL#MODEL"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for summary.json and rows.jsonl (every turn)"),
    sessions: Optional[int] = typer.Option(None, "--sessions", help="shapes: how many (default 50); a file: the first N"),
    turns: Optional[int] = typer.Option(None, "--turns", help="shapes: turns per session; a file: at most K turns"),
    seed: int = typer.Option(0, "--seed", help="shapes sessions"),
) -> None:
    """Run a reconstructor over every turn of SUITE and score it against the bracketed explicit instructions."""
    from .bench.suites import load_suite
    from .intent import load_reconstructor
    from .intent.base import RawInstruction
    from .intent.evaluate import evaluate_sessions
    from .session import atomic_write_text

    s = load_suite(suite, sessions, turns, seed)
    rec = load_reconstructor(intent) or RawInstruction()
    if out is not None and out.exists() and not out.is_dir():
        raise EditrlInputError(f"--out {out} exists and is not a folder")
    t0 = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task(f"intent {intent}", total=sum(x.n_turns for x in s.sessions))
        res = evaluate_sessions(rec, s.sessions, progress=lambda n: bar.advance(task, n))
    summary = {"suite": suite, "kind": s.kind, "intent": intent, "sessions": len(s.sessions), **res["summary"],
               "seconds": round(time.perf_counter() - t0, 3)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "rows.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in res["rows"]))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = Table(title=escape(f"intent {intent} on {suite} ({len(s.sessions)} sessions, {summary['turns']} turns)"))
    for col in ("measure", "value", "turns"):
        table.add_column(col)
    table.add_row("referent accuracy", _rate(summary["referent_accuracy"]), str(summary["referent_turns"]))
    table.add_row("  on pronoun turns", _rate(summary["referent_accuracy_pronoun"]), str(summary["pronoun_referent_turns"]))
    table.add_row("constraint accuracy", _rate(summary["constraint_accuracy"]), str(summary["constraint_turns"]))
    table.add_row("exact match", _rate(summary["exact_match"]), str(summary["turns"]))
    table.add_row("reconstructor errors", str(summary["errors"]), str(summary["turns"]))
    err.print(table)
    emit(summary)



def _rate(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    suite: Optional[str] = typer.Option(None, "--suite", help="shapes | a sessions JSONL (editrl, MICE-Bench or EdiVal records)"),
    editor: Optional[str] = typer.Option(None, "--editor", help="tiny | tiny:PATH | outputs:DIR (DIR/<session id>/turn_<k>.png) | "
                                         "flux-kontext:PATH | qwen-edit:PATH (diffusers pipeline folder or LoRA run)"),
    judge: Optional[str] = typer.Option(None, "--judge", help="program | vlm:URL | vlm-local:PATH"),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (resumes if it holds the same run)"),
    sessions: Optional[int] = typer.Option(None, "--sessions", help="shapes: how many (default 50); a file: the first N"),
    turns: Optional[int] = typer.Option(None, "--turns", help="shapes: turns per session (default 3); a file: at most K turns"),
    seed: int = typer.Option(0, "--seed", help="shapes sessions, editor noise and bootstrap"),
    form: str = typer.Option("auto", "--form", help="text the editor sees: explicit | raw | in_context | auto"),
    intent: str = typer.Option("none", "--intent", help="reconstruct each instruction first: none | rules | tiny[:PATH] | llm:hf:PATH | llm:URL#MODEL"),
    steps: Optional[int] = typer.Option(None, "--steps", help="ODE steps (default: the editor's)"),
    batch_size: int = typer.Option(32, "--batch-size", help="sessions per editor batch"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="verdict cache (default $EDITRL_CACHE_DIR/judgements.sqlite or ~/.cache/editrl/judgements.sqlite)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write the verdict cache"),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples for the 95% intervals (0: none)"),
    strips: int = typer.Option(24, "--strips", help="sessions shown as image strips in report.html"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="outputs:DIR: score a missing image (and later turns) as missing instead of failing"),
    chunk_size: int = typer.Option(64, "--chunk-size", help="turns per judge call and per records.jsonl append"),
    judge_workers: int = typer.Option(0, "--judge-workers", help="program judge: worker processes (0: one per core when the run judges 1,000 turns or more, else 1)"),
    compile_editor: bool = typer.Option(False, "--compile", help="tiny editor: run it through torch.compile with frozen weights (~1.3-1.5x faster at batch 64 after a one-off compile of ~0.5-1 min per batch size)"),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="vlm judges: the model name"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="vlm judges: judging protocol"),
    votes: Optional[int] = typer.Option(None, "--votes", help="vlm judges: samples per verdict (majority)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="vlm judges: sampling temperature"),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="vlm judges: let the model reason first"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="vlm judges: requests in flight"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="vlm judges: seconds per request"),
    retries: Optional[int] = typer.Option(None, "--retries", help="vlm judges: retries per request"),
) -> None:
    """Run SUITE through EDITOR, judge every turn with JUDGE; write DIR/results.json, records.jsonl, report.html."""
    if ctx.invoked_subcommand is not None:
        return
    from .bench import BenchConfig, run_bench

    given = {"--suite": suite, "--editor": editor, "--judge": judge, "--out": out}
    absent = [k for k, v in given.items() if v is None]
    if absent:
        raise EditrlInputError(f"bench needs {', '.join(absent)} (or: editrl bench compare DIR_A DIR_B)")
    opts = {"model": judge_model, "protocol": protocol, "votes": votes, "temperature": temperature, "think": think,
            "concurrency": concurrency, "timeout": timeout, "retries": retries}
    cfg = BenchConfig(suite=suite, editor=editor, judge=judge, out=out, sessions=sessions, turns=turns, seed=seed,
                      form=form, steps=steps, batch_size=batch_size, cache=cache, no_cache=no_cache,
                      bootstrap=bootstrap, strips=strips, allow_missing=allow_missing, chunk_size=chunk_size,
                      judge_workers=judge_workers, intent=intent, compile=compile_editor,
                      judge_options={k: v for k, v in opts.items() if v is not None})
    bars: list[Progress] = []   # started on first use, so that bad input prints one line only

    def progress(description: str, total: int):
        if total == 0:
            return lambda n: None
        if not bars:
            bars.append(_progress())
            bars[0].start()
        task = bars[0].add_task(description, total=total)
        return lambda n: bars[0].advance(task, n)

    try:
        summary = run_bench(cfg, progress=progress, log=lambda m: err.print(escape(m)))
    finally:
        if bars:
            bars[0].stop()
    results = json.loads((out / "results.json").read_text())
    table = Table(title=escape(f"{editor} on {suite} ({summary['n_sessions']} sessions, judge {summary['judge']})"))
    for col in ("k", "n", "IF", "CC", "GA", "CU", "succ", "s@k", "marg", "err", "miss"):
        table.add_column(col, no_wrap=True)
    for r in results["per_turn"]:
        table.add_row(str(r["turn"]), str(r["n"]), *(_rate(r[c]) for c in ("IF", "CC", "GA", "CU", "success", "success_all", "marginal")),
                      str(r["judge_errors"]), str(r["missing"]))
    err.print(table)
    err.print(f"O = {_rate(summary['O'])}; judge calls {summary['judge_calls']}, cache hits {summary['cache_hits']}, "
              f"resumed {summary['records_resumed']} records; {summary['seconds']:.1f} s -> {escape(str(out / 'report.html'))}")
    emit(summary)


def _run_list(arg: str) -> list[Path]:
    """One bench run folder, or several joined by commas (an existing folder whose name holds a comma is one run)."""
    if Path(arg).exists() or "," not in arg:
        return [Path(arg)]
    parts = [a for a in arg.split(",") if a]
    if not parts:
        raise EditrlInputError(f"no run folder in {arg!r}")
    return [Path(a) for a in parts]


@bench_app.command("compare")
def bench_compare(
    dir_a: str = typer.Argument(..., help="run A (the baseline); several runs of the same sessions, e.g. one per training seed, as DIR1,DIR2,..."),
    dir_b: str = typer.Argument(..., help="run B, or several as DIR1,DIR2,..."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="paired bootstrap resamples"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Per-turn differences B - A (success, success@k, IF, CC, O), and per task type (success, IF, CC), with paired bootstrap intervals over common sessions.

    A side given as several runs pools them per session (the mean of their rates when no judge
    failed); each resample draws a session in every run, so the interval covers the session draw
    for these runs (more seeds per side average out training noise; they do not widen it)."""
    from .bench import compare_runs

    if bootstrap < 0:
        raise EditrlInputError(f"--bootstrap must be at least 0, got {bootstrap}")
    runs_a, runs_b = _run_list(dir_a), _run_list(dir_b)
    res = compare_runs(runs_a, runs_b, n_boot=bootstrap, seed=seed)

    def side(runs: list[Path], editor: Any) -> str:
        return str(editor) if len(runs) == 1 else f"{len(runs)} runs"

    table = Table(title=escape(f"B - A over {res['common_sessions']} common sessions "
                               f"(A: {side(runs_a, res['editor_a'])}, B: {side(runs_b, res['editor_b'])})"))
    for col in ("turn", "metric", "A", "B", "B - A", "95% CI (paired)"):
        table.add_column(col, no_wrap=True)
    for r in res["per_turn"]:
        for m in res["metrics"]:
            d = r[m]
            ci = "-" if d["ci95"] is None else f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            table.add_row(str(r["turn"]), {"success_all": "success@k"}.get(m, m), _rate(d["a"]), _rate(d["b"]),
                          "-" if d["diff"] is None else f"{d['diff']:+.3f}", ci, end_section=m == res["metrics"][-1])
    err.print(table)
    if res["by_task"]:
        table = Table(title="B - A by task type (every turn of the type, all positions)")
        for col in ("task type", "turns", "metric", "A", "B", "B - A", "95% CI (paired)"):
            table.add_column(col, no_wrap=True)
        for r in res["by_task"]:
            for m in res["task_metrics"]:
                d = r[m]
                ci = "-" if d["ci95"] is None else f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
                table.add_row(escape(r["task_type"]), str(r["turns"]), m, _rate(d["a"]), _rate(d["b"]),
                              "-" if d["diff"] is None else f"{d['diff']:+.3f}", ci, end_section=m == res["task_metrics"][-1])
        err.print(table)
    if res["judge_settings_differ"]:
        err.print(f"note: the runs were judged with different judge settings ({escape(res['judge_settings_differ'])}); "
                  f"a difference may come from the judge, not the editor")
    emit(res)


# ------------------------------------------------------------------------------ demo

@app.command("demo", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo(ctx: typer.Context,
         out: Path = typer.Option(Path("runs/demo"), "--out", help="demo folder (a re-run resumes)"),
         sessions: int = typer.Option(100, "--sessions", help="held-out 3-turn sessions benchmarked before and after"),
         minutes: float = typer.Option(5.0, "--minutes", help="post-training wall-time budget"),
         config: str = typer.Option("shapes-nft", "--config", help="RL preset (key=value arguments override it)"),
         seed: int = typer.Option(4242, "--seed", help="benchmark sessions and noise")) -> None:
    """The main job on the embedded default: benchmark the shipped tiny editor on held-out
    ShapesWorld sessions, post-train it with multi-turn DiffusionNFT, benchmark it again and
    write DIR/report.html (before/after with paired intervals, curves, example sessions).
    The last line printed is JSON with `before` and `after`, each the per_turn list of its
    results.json."""
    import torch

    from .demo import DemoConfig, run_demo

    _positive("sessions", sessions)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = DemoConfig(out=out, sessions=sessions, minutes=minutes, preset=config, overrides=list(ctx.args), seed=seed)
    with _progress() as prog:
        tasks: dict[str, Any] = {}

        def bench_progress(name: str, total: int):
            t = prog.add_task(name, total=total)
            return lambda n: prog.advance(t, n)

        def train_progress(step: int, total: int, row: dict) -> None:
            if "train" not in tasks:
                tasks["train"] = prog.add_task("post-training", total=None)
            succ = " ".join(f"{row[k]:.2f}" for k in sorted(row) if k.startswith("success/turn_"))
            prog.update(tasks["train"], completed=step, description=f"post-training step {step}: rollout success/turn {succ}")

        result = run_demo(cfg, log=lambda m: err.print(escape(m)), bench_progress=bench_progress,
                          train_progress=train_progress)
    cmp = json.loads((out / "compare.json").read_text())
    table = Table(title=f"shipped tiny editor before / after {result['train']['steps']} steps "
                        f"({result['train']['minutes']:.1f} min) of multi-turn post-training; "
                        f"{sessions} held-out sessions, exact judge")
    for col in ("turn", "success before", "after", "Δ [95% CI]", "success@k before", "after", "Δ [95% CI]"):
        table.add_column(col)
    for r in cmp["per_turn"]:
        cells = [str(r["turn"])]
        for m in ("success", "success_all"):
            d = r[m]
            ci = "" if not d["ci95"] else f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            cells += [_rate(d["a"]), _rate(d["b"]), ("-" if d["diff"] is None else f"{d['diff']:+.3f}") + ci]
        table.add_row(*cells)
    err.print(table)
    err.print(f"report: {escape(result['report'])}")
    emit({"before": result["before"], "after": result["after"], "report": result["report"], "train": result["train"]})


# ------------------------------------------------------------------------------ entry

def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except EditrlInputError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit,) as e:
        sys.exit(e.exit_code)
    except (NotADirectoryError, IsADirectoryError, PermissionError, FileNotFoundError) as e:
        err.print(f"[red]error:[/red] cannot use {e.filename or 'a path'}: {e.strerror}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as e:  # usage errors from the (vendored) click parser, then real failures
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            if not e.format_message():  # no arguments: the help was printed
                sys.exit(e.exit_code)
            hint = ""
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                hint = f" (see '{ctx.command_path} --help')"
            err.print(f"[red]error:[/red] {escape(e.format_message() + hint)}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if os.environ.get("EDITRL_DEBUG"):
            raise
        err.print(f"[red]internal error:[/red] {escape(f'{type(e).__name__}: {e}')} (set EDITRL_DEBUG=1 for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
