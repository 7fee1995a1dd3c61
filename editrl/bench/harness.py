"""`editrl bench`: run a suite through an editor, judge every turn, aggregate, report.

The recipe, top to bottom (`run_bench`):

1. **Load** the suite (sessions + source images), the editor and the judge, and pin the run's
   settings in `DIR/settings.json` (a resumed run must use the same ones).
2. **Editor phase.** Every session is rolled out turn by turn on the editor's own outputs
   (`editrl.rollout.rollout`), in batches of `--batch-size` sessions; batch b is seeded from
   (seed, b), so a resumed run regenerates a batch to the same images. Outputs are written
   atomically to `DIR/images/<session id>/turn_<k>.png` (the source as `turn_0.png`); a
   batch whose images all exist is skipped. An `outputs:DIR` editor generates nothing: its
   images are read where they are.
3. **Judge phase.** Every (session, turn) without a line in `DIR/records.jsonl` becomes a
   `JudgeRequest`. Its content address (`cache_key`) is looked up in the verdict cache;
   the misses of each chunk go to the judge in one `judge.judge(list)` call (the judge
   handles its own concurrency); verdicts without judge errors go into the cache in one
   transaction; then the chunk's records are appended to `records.jsonl` and fsynced. A
   killed run loses at most the chunk in flight (a torn last line is cut off on resume) and
   judges only what is missing when restarted.
4. **Aggregate** the records into per-turn metrics with bootstrap intervals
   (`editrl.bench.metrics`), write `results.json` and `report.html` atomically.

Everything that depends only on the inputs (records' verdicts, results' metrics and
settings) is identical between a run and a killed-and-resumed run; what differs (timings,
judge calls, cache hits) sits under `timing` in a record and under `run` in results.json.
A resumed run keeps every record it finds, `missing` ones included: after adding images
that were missing, run again into a new folder (the cache makes that cheap).

5. `compare_runs` (`editrl bench compare`): paired per-turn differences of two finished runs
   of the same suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np

from ..intent import load_reconstructor
from ..judges.base import JudgeRequest, image_hash
from ..session import EditrlInputError, Session, TurnVerdict, atomic_write_text
from .cache import NoCache, VerdictCache, default_cache_path
from .metrics import (COMPARED, TASK_COMPARED, outcomes_from_records, overall_metrics, paired_differences,
                      paired_task_differences, per_task_metrics, per_turn_metrics, task_labels)
from .suites import Suite, load_suite, sessions_digest

FORMS = ("auto", "explicit", "raw", "in_context")
JUDGE_OPTIONS = ("model", "protocol", "votes", "temperature", "think", "concurrency", "timeout", "retries",
                 "threshold", "max_tokens", "device", "dtype", "batch_size")

# progress(description, total) -> advance(n)
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass
class BenchConfig:
    """One `editrl bench` run (the command's options)."""
    suite: str
    editor: str
    judge: str
    out: Path
    sessions: int | None = None      # shapes: how many (default 50); a file: the first N
    turns: int | None = None         # shapes: turns per session (default 3); a file: truncate to K
    seed: int = 0                    # shapes sessions, editor noise, bootstrap
    form: str = "auto"               # the text the editor sees: explicit | raw | in_context | auto
    steps: int | None = None         # ODE steps (editor's default)
    batch_size: int = 32             # sessions per editor batch
    cache: Path | None = None        # verdict cache (default: $EDITRL_CACHE_DIR or ~/.cache/editrl)
    no_cache: bool = False
    bootstrap: int = 1000            # resamples for the 95% intervals (0: none)
    strips: int = 24                 # sessions shown in the report
    allow_missing: bool = False      # outputs:DIR: a missing image marks that turn and later ones `missing`
    chunk_size: int = 64             # requests per judge call / per records append
    judge_workers: int = 0           # program judge: worker processes, 0 = auto (`judge_workers_for`); VLM judges have --concurrency
    judge_options: dict[str, Any] = field(default_factory=dict)
    intent: str = "none"             # reconstructor writing the editor's text: none | rules | tiny[:PATH] | llm:...
    compile: bool = False            # tiny editor: inference through torch.compile (same numbers to rounding)


@dataclass
class RunStats:
    """What this invocation did (differs between a run and a resumed run)."""
    images_generated: int = 0
    records_resumed: int = 0
    judge_calls: int = 0             # turns sent to the judge
    judge_batches: int = 0           # judge.judge() invocations
    model_calls: int | None = None   # model requests made (retries and votes included), for judges that count them
    cache_hits: int = 0
    editor_seconds: float = 0.0
    judge_seconds: float = 0.0       # the whole judge phase (loading images, cache, judge, records)
    judge_cpu_seconds: float = 0.0   # CPU time of this process in the judge phase (not inflated by a busy machine)
    judge_call_seconds: float = 0.0  # inside judge.judge()
    judge_workers: int = 1           # processes that judged (1: this one)


# --------------------------------------------------------------------------- 1. loading

def load_judge(spec: str, **options: Any):
    """`editrl.judges.load_judge` when present; otherwise the program judge alone."""
    try:
        from ..judges import load_judge as _load
    except ImportError:
        _load = None
    if _load is not None:
        return _load(spec, **options)
    if spec == "program":
        if options:
            raise EditrlInputError(f"judge options ({', '.join(options)}) apply to vlm judges, not to 'program'")
        from ..judges.program import ProgramJudge
        return ProgramJudge()
    raise EditrlInputError(f"unknown judge {spec!r} (expected program, vlm:URL or vlm-local:PATH)")


AUTO_WORKERS_MIN_TURNS = 1000     # --judge-workers 0: 2 workers win from ~500 turns on 2 cores (docs/RESULTS.md, session 19)
AUTO_WORKERS_MAX = 8


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):     # pragma: no cover - not Linux
        return os.cpu_count() or 1


def judge_workers_for(requested: int, judge_id: str, n_turns: int, chunk_size: int) -> int:
    """Worker processes of a judge phase. `requested` > 0 is taken as given; 0 (auto) gives
    the program judge one process per usable core (at most 8, at most one per chunk) when
    the run judges at least AUTO_WORKERS_MIN_TURNS turns, below which starting the workers
    costs what they save; any other judge gets one (VLM judges overlap through --concurrency)."""
    if requested > 0:
        return requested
    if judge_id != "program" or n_turns < AUTO_WORKERS_MIN_TURNS:
        return 1
    return min(usable_cores(), AUTO_WORKERS_MAX, -(-n_turns // chunk_size))


class ProcessPoolJudge:
    """A stateless, CPU-bound judge (the program judge) spread over worker processes.

    The judge phase hands whole chunks of sessions to the workers (`judge_phase`): each
    worker reads and hashes the chunk's images, computes the cache keys, looks them up in
    the cache (its own read connection), judges the misses and returns finished records
    and new cache entries; the parent only writes the cache and appends records, in chunk
    order, so records and results are those of one process. `judge` (a plain batched call,
    split into one slice per worker) serves other callers. Verdicts, judge id and params
    are the wrapped judge's, so cache keys and results do not change."""

    def __init__(self, judge: Any, workers: int) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.inner, self.workers = judge, workers
        self.judge_id, self.prompt_version = judge.judge_id, judge.prompt_version
        self.pool = ProcessPoolExecutor(max_workers=workers)
        self._phase_pool = None

    def phase_pool(self, context: dict[str, Any]):
        """A pool whose workers hold `context` (suite, images, texts, form, cache path),
        given once per worker rather than with every chunk."""
        from concurrent.futures import ProcessPoolExecutor

        if self._phase_pool is None:
            self._phase_pool = ProcessPoolExecutor(max_workers=self.workers, initializer=_phase_worker_init,
                                                   initargs=({**context, "judge": self.inner},))
        return self._phase_pool

    def params(self) -> dict[str, Any]:
        return self.inner.params()

    def judge(self, requests: Sequence[JudgeRequest]) -> list[TurnVerdict]:
        n = -(-len(requests) // self.workers)   # ceil
        parts = [list(requests[i:i + n]) for i in range(0, len(requests), n)]
        return [v for part in self.pool.map(self.inner.judge, parts) for v in part]

    def close(self) -> None:
        self.pool.shutdown()
        if self._phase_pool is not None:
            self._phase_pool.shutdown()


_PHASE: dict[str, Any] = {}        # a judge-phase worker's context (set by its initializer)


class _RecordingCache:
    """A worker's view of the verdict cache: lookups read the cache, writes are kept and
    sent back to the parent, which alone writes the cache."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.new = inner, []

    def get_many(self, keys: Sequence[str]) -> dict[str, TurnVerdict]:
        return self.inner.get_many(keys)

    def put_many(self, items, judge_id: str) -> int:
        items = list(items)
        self.new.extend(items)
        return len(items)


def _phase_worker_init(context: dict[str, Any]) -> None:
    _PHASE.update(context)
    _PHASE["cache"] = VerdictCache(context["cache_path"]) if context["cache_path"] else NoCache()


def _phase_worker_chunk(work: list[tuple[int, list[int]]]) -> tuple[str, list[tuple[str, str]], dict[str, float]]:
    """Load, hash, look up and judge the turns `work` = [(session index, turns)]; returns the
    finished records as records.jsonl lines, the new cache entries as (key, verdict JSON)
    and the counters. Serialising here leaves the parent only writes to do: a chunk comes
    back as one string instead of nested dicts and models to unpickle."""
    ctx = _PHASE
    sessions = ctx["suite"].sessions
    pending = [p for i, ks in work
               for p in pending_requests(sessions[i], ks, ctx["images"], ctx["texts"], ctx["form"], ctx["same_size"])]
    stats = RunStats()
    cache = _RecordingCache(ctx["cache"])
    done = judge_chunk(pending, ctx["judge"], cache, stats)
    entries = [(k, v.model_dump_json()) for k, v in cache.new if not v.has_error]
    counts = {k: getattr(stats, k) for k in ("judge_calls", "judge_batches", "cache_hits", "judge_call_seconds")}
    return _record_lines(done), entries, counts


def resolve_form(form: str, editor_spec: str) -> str:
    """`auto` -> in_context for editors that take a context (the tiny editor), else raw."""
    if form not in FORMS:
        raise EditrlInputError(f"--form {form!r}: expected one of {', '.join(FORMS)}")
    if form != "auto":
        return form
    return "in_context" if editor_spec == "tiny" or editor_spec.startswith("tiny:") else "raw"


def turn_texts_all(sessions: Sequence[Session], form: str) -> dict[tuple[str, int], tuple[str, list[str]]]:
    """(session id, turn) -> (text the editor is given, context); raises for a missing explicit form."""
    from ..rollout import turn_texts

    return {(s.id, k): turn_texts(s, k, form) for s in sessions for k in range(1, s.n_turns + 1)}


def check_editor_inputs(editor: Any, suite: Suite, texts: dict[tuple[str, int], tuple[str, list[str]]]) -> None:
    """Reject what the editor cannot take (image size, unknown words) before any work is done."""
    canvas = getattr(getattr(editor, "cfg", None), "canvas", None)
    if canvas:
        for s in suite.sessions:
            h, w = suite.source(s).shape[:2]
            if (h, w) != (canvas, canvas):
                raise EditrlInputError(f"session {s.id}: the editor edits {canvas}x{canvas} images, the source is {w}x{h}")
    tok = getattr(editor, "tokenizer", None)
    if tok is not None:
        for (sid, k), (text, ctx) in texts.items():
            try:
                for t in (text, *ctx):
                    tok.ids(t)
            except EditrlInputError as e:
                raise EditrlInputError(f"session {sid} turn {k}: {e}") from None


def check_judge_inputs(judge: Any, suite: Suite) -> None:
    """The program judge needs ShapesWorld scenes: say so before the editor runs."""
    if getattr(judge, "judge_id", "") == "program":
        bad = next((s for s in suite.sessions if s.source_scene is None or any(t.expected is None for t in s.turns)), None)
        if bad is not None:
            raise EditrlInputError(f"session {bad.id}: the program judge needs ShapesWorld sessions (source_scene and "
                                   f"expected scenes); use a vlm judge for {suite.kind} records")


def run_settings(cfg: BenchConfig, suite: Suite, form: str, steps: int | None, judge: Any, precomputed: bool,
                 weights_sha256: str | None = None) -> dict[str, Any]:
    """Everything a verdict or an image depends on; a resumed run must match it exactly
    (including the editor's weights: a checkpoint overwritten between runs is not mixed)."""
    try:
        version = metadata.version("editrl")
    except metadata.PackageNotFoundError:
        version = "unknown"
    editor: dict[str, Any] = {"spec": cfg.editor, "form": form, "requested_form": cfg.form}
    if precomputed:
        editor["root"] = str(Path(cfg.editor[len("outputs:"):]).resolve())
    else:
        editor.update({"steps": steps, "solver": "ode", "batch_size": cfg.batch_size, "seed": cfg.seed})
        if weights_sha256:
            editor["weights_sha256"] = weights_sha256
    params = json.loads(json.dumps(judge.params(), sort_keys=True, default=str))
    return {"suite": {**suite.describe(), "sessions_sha256": sessions_digest(suite.sessions)},
            "editor": editor,
            "judge": {"spec": cfg.judge, "id": judge.judge_id, "prompt_version": judge.prompt_version,
                      "params": params, "options": {k: v for k, v in sorted(cfg.judge_options.items())}},
            "allow_missing": cfg.allow_missing, "seed": cfg.seed, "editrl_version": version}


def pin_settings(out: Path, settings: dict[str, Any]) -> bool:
    """Write DIR/settings.json, or check it against an earlier run's. Returns True on resume."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            diff = _first_difference(old, settings)
            raise EditrlInputError(f"--out {out} holds a run with other settings ({diff}); use a new --out folder")
        return True
    if (out / "records.jsonl").exists() or (out / "images").exists():
        raise EditrlInputError(f"--out {out} holds files but no settings.json; use a new --out folder")
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
    return False


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
    return f"{where}: was {json.dumps(a)}, now {json.dumps(b)}"


# ---------------------------------------------------------------------- 2. editor phase

def write_intents(path: Path, suite: Suite, intents: dict) -> None:
    """DIR/intent.jsonl: every turn's reconstruction (what the editor was given, the trace, any error)."""
    lines = [json.dumps({"session_id": s.id, "turn": k, "instruction": s.turns[k - 1].instruction,
                         "explicit": intents[(s.id, k)].explicit, "trace": intents[(s.id, k)].trace,
                         "error": intents[(s.id, k)].error}, ensure_ascii=False)
             for s in suite.sessions for k in range(1, s.n_turns + 1)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def load_or_reconstruct(reconstructor: Any, suite: Suite, path: Path, progress: Progress | None = None) -> dict:
    """The run's reconstructions: read back from DIR/intent.jsonl when a run is resumed (a
    sampling reconstructor must not change its texts under images already made), else
    computed turn by turn across sessions."""
    from ..intent import Reconstruction, reconstruct_sessions

    if path.is_file():
        out = {}
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[(r["session_id"], int(r["turn"]))] = Reconstruction(r["explicit"], r.get("trace", ""), r.get("error"))
        if all((s.id, k) in out for s in suite.sessions for k in range(1, s.n_turns + 1)):
            return out
    advance = progress("reconstructing", sum(s.n_turns for s in suite.sessions)) if progress else None
    return reconstruct_sessions(reconstructor, suite.sessions, advance)


def _batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def generated_path(out: Path, session_id: str, turn: int) -> Path:
    return out / "images" / session_id / f"turn_{turn}.png"


def generate_images(editor: Any, suite: Suite, form: str, steps: int, seed: int, batch_size: int,
                    out: Path, progress: Progress | None = None,
                    texts: dict[tuple[str, int], tuple[str, list[str]]] | None = None) -> int:
    """Roll out every session whose images are not all on disk; returns images written."""
    from ..rollout import rollout
    from ..session import atomic_write_bytes
    from ..world.io import png_bytes

    sessions = suite.sessions
    batches = [list(range(i, min(len(sessions), i + batch_size))) for i in range(0, len(sessions), batch_size)]

    def complete(s: Session) -> bool:
        return all(generated_path(out, s.id, k).is_file() for k in range(0, s.n_turns + 1))

    todo = [(b, idx) for b, idx in enumerate(batches) if not all(complete(sessions[i]) for i in idx)]
    advance = progress("editing", sum(sessions[i].n_turns for _, idx in todo for i in idx)) if progress else None
    written = 0
    for b, idx in todo:
        batch = [sessions[i] for i in idx]
        sources = [suite.source(s) for s in batch]
        outs = rollout(editor, batch, sources, form=form, steps=steps, seed=_batch_seed(seed, b),
                       batch_size=len(batch), progress=advance, texts=texts)
        for s, src, imgs in zip(batch, sources, outs):
            for k, img in enumerate(imgs, start=1):
                atomic_write_bytes(generated_path(out, s.id, k), png_bytes(img))
            atomic_write_bytes(generated_path(out, s.id, 0), png_bytes(src))  # last: marks the session complete
            written += len(imgs)
    return written


# ----------------------------------------------------------------------- 3. judge phase

def read_records(path: Path, repair: bool = True) -> dict[tuple[str, int], dict[str, Any]]:
    """Records already judged, keyed by (session id, turn). A torn last line (a run killed
    mid-write) is cut off the file (left alone without `repair`); a corrupt line before the
    last is an error."""
    if not path.is_file():
        return {}
    lines = path.read_bytes().split(b"\n")     # the last item is b"" when the file ends with a newline
    records: dict[tuple[str, int], dict[str, Any]] = {}
    good = 0                                     # byte offset just after the last good line
    for i, raw in enumerate(lines):
        tail = i == len(lines) - 1               # text after the last newline: a torn write
        rec = None
        if not tail:
            try:
                rec = json.loads(raw)
                key = (rec["session_id"], rec["turn"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                rec = None
                if i < len(lines) - 2 or lines[-1]:
                    raise EditrlInputError(f"{path}:{i + 1}: corrupt record; remove that line (or the folder) to resume") from None
        if rec is None:
            if repair and good < sum(len(x) + 1 for x in lines) - 1:
                with open(path, "r+b") as f:     # cut the torn tail of a killed run
                    f.truncate(good)
                    os.fsync(f.fileno())
            break
        records[key] = rec
        good += len(raw) + 1
    return records


@dataclass
class _Pending:
    record: dict[str, Any]                 # the record without verdict / cache / timing
    request: JudgeRequest | None = None    # None for a missing image
    hashes: list[str] | None = None


class ImageSource:
    """Where the images of a run are: generated under DIR/images, or an outputs:DIR folder.
    The judge phase asks for each session's paths once (`paths`) and hands them back to the
    other methods; without them each method works them out itself."""

    def __init__(self, suite: Suite, out: Path, editor: Any) -> None:
        self.suite, self.out = suite, out
        self.outputs = editor if getattr(editor, "precomputed", False) else None
        self._resolved_dirs: dict[str, str] = {}     # folder -> str(Path(folder).resolve())

    def output_path(self, s: Session, k: int) -> Path:
        return self.outputs.path(s.id, k) if self.outputs is not None else generated_path(self.out, s.id, k)

    def paths(self, s: Session) -> list[Path | None]:
        """[source, output of turn 1, ..., output of turn n]; the source is None when the
        suite renders it."""
        return [self.suite.source_path(s)] + [self.output_path(s, k) for k in range(1, s.n_turns + 1)]

    def _resolved(self, p: Path) -> str:
        """str(p.resolve()), resolving each folder once: a file that is not a symbolic link
        resolves to its resolved folder joined with its name."""
        folder, name = os.path.split(p)
        if name in ("", ".", "..") or os.path.islink(p):
            return str(p.resolve())
        if folder not in self._resolved_dirs:
            self._resolved_dirs[folder] = str(Path(folder).resolve())
        return os.path.join(self._resolved_dirs[folder], name)

    def output_ref(self, s: Session, k: int, path: Path | None = None) -> str:
        """The path written into records: relative to DIR for generated images, else resolved."""
        p = path or self.output_path(s, k)
        return str(p.relative_to(self.out)) if self.outputs is None else self._resolved(p)

    def source_ref(self, s: Session, path: Path | None = None) -> str | None:
        if self.outputs is None:
            return str(generated_path(self.out, s.id, 0).relative_to(self.out))
        p = path or self.suite.source_path(s)
        return None if p is None else self._resolved(p)

    def first_missing(self, s: Session, paths: Sequence[Path | None] | None = None) -> int | None:
        """The first turn whose output is not a file (outputs:DIR only), as the editor's
        `first_missing` finds it."""
        if self.outputs is None:
            return None
        if paths is None:
            return self.outputs.first_missing(s.id, s.n_turns)
        return next((k for k in range(1, s.n_turns + 1) if not paths[k].is_file()), None)

    def load(self, s: Session, k: int, path: Path | None = None) -> np.ndarray:
        """Image of turn k (0 = the source). A plain RGB PNG is read by the fast path; any
        other file (or a missing or broken one) the ordinary way, which reports errors."""
        from ..world._fastparse import read_png

        if path is None:
            path = self.output_path(s, k) if k else self.suite.source_path(s)
        img = read_png(path) if path is not None else None
        if img is not None:
            return img
        if k == 0:
            return self.suite.source(s)
        if self.outputs is not None:
            return self.outputs.load(s.id, k)
        from ..world.render import load_png
        return load_png(path)


def check_missing(images: ImageSource, sessions: Sequence[Session], allow_missing: bool) -> int:
    """Without --allow-missing, a missing output image is an error naming the file."""
    missing = [(s, k) for s in sessions if (k := images.first_missing(s)) is not None]
    if missing and not allow_missing:
        s, k = missing[0]
        more = f" (and {len(missing) - 1} more sessions)" if len(missing) > 1 else ""
        raise EditrlInputError(f"missing output image {images.output_path(s, k)}{more}; "
                               f"use --allow-missing to score those turns as missing")
    return len(missing)


def pending_requests(s: Session, turns: Sequence[int], images: ImageSource, texts: dict, form: str,
                     same_size: bool) -> list[_Pending]:
    """The not-yet-recorded turns of one session: records with requests (images loaded and
    hashed once per session) or `missing` records."""
    paths = images.paths(s)
    m = images.first_missing(s, paths)
    last_present = s.n_turns if m is None else m - 1
    need = max((k for k in turns if k <= last_present), default=0)
    imgs = [images.load(s, k, paths[k]) for k in range(0, need + 1)]
    if same_size:
        for k in range(1, need + 1):
            if imgs[k].shape != imgs[0].shape:
                h, w = imgs[0].shape[:2]
                raise EditrlInputError(f"{paths[k]}: {imgs[k].shape[1]}x{imgs[k].shape[0]} image, but the "
                                       f"program judge needs the suite's size {w}x{h}")
    hashes = [image_hash(im) for im in imgs]
    src_ref = images.source_ref(s, paths[0])
    out = []
    for k in turns:
        t = s.turns[k - 1]
        used, ctx = texts[(s.id, k)]
        rec = {"session_id": s.id, "turn": k, "status": "judged" if k <= last_present else "missing",
               "instruction": t.instruction, "explicit": t.explicit, "used": used, "context": ctx,
               "task_type": t.task_type, "pronoun": t.pronoun,
               "images": {"source": src_ref, "output": images.output_ref(s, k, paths[k])}}
        if k > last_present:
            out.append(_Pending({**rec, "verdict": None, "cache_hit": None}))
            continue
        req = JudgeRequest(session=s, turn=k, images=imgs[: k + 1],
                           explicit=t.explicit if form in ("explicit", "intent") else None)
        out.append(_Pending(rec, req, hashes[: k + 1]))
    return out


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def cache_keys(judge: Any, todo: Sequence[_Pending]) -> list[str]:
    """`cache_key(judge, p.request, p.hashes)` of every pending request, with each session's
    text serialized once rather than once per turn. The payload's JSON (sorted keys, no
    indent) is put together from the JSON of its parts, which is the text json.dumps gives
    for the whole (tests/test_bench.py holds this to cache_key)."""
    judge_part = (f'"judge": {_json(judge.judge_id)}, "params": {_json(judge.params())}, '
                  f'"prompt_version": {_json(judge.prompt_version)}')
    texts: dict[int, tuple[str, list[str]]] = {}       # id(session) -> (constraint and scene, turns)
    keys = []
    for p in todo:
        req, s = p.request, p.request.session
        if id(s) not in texts:
            constraint = s.global_constraint.model_dump(mode="json") if s.global_constraint else None
            texts[id(s)] = (f'"constraint": {_json(constraint)}, "source_scene": {_json(s.source_scene)}',
                            [_json(t.model_dump(mode="json")) for t in s.turns])
        head, turns = texts[id(s)]
        hashes = list(p.hashes) if p.hashes is not None else [image_hash(i) for i in req.images[: req.turn + 1]]
        doc = (f'{{"explicit": {_json(req.explicit)}, "images": {_json(hashes)}, {judge_part}, '
               f'"text": {{{head}, "turns": [{", ".join(turns[: req.turn])}]}}, "turn": {_json(req.turn)}}}')
        keys.append(hashlib.sha256(doc.encode()).hexdigest())
    return keys


def judge_chunk(chunk: Sequence[_Pending], judge: Any, cache: Any, stats: RunStats) -> list[dict[str, Any]]:
    """Cache lookups, one judge call for the misses, cache writes; returns the finished records."""
    todo = [p for p in chunk if p.request is not None]
    keys = cache_keys(judge, todo)
    hits = cache.get_many(keys)
    miss = [j for j, key in enumerate(keys) if key not in hits]
    verdicts: dict[int, TurnVerdict] = {}
    dt = 0.0
    if miss:
        t0 = time.perf_counter()
        fresh = judge.judge([todo[j].request for j in miss])
        dt = time.perf_counter() - t0
        if len(fresh) != len(miss):
            raise RuntimeError(f"judge {judge.judge_id} returned {len(fresh)} verdicts for {len(miss)} requests")
        verdicts = dict(zip(miss, fresh))
        cache.put_many(((keys[j], v) for j, v in verdicts.items()), judge.judge_id)
        stats.judge_calls += len(miss)
        stats.judge_batches += 1
        stats.judge_call_seconds += dt
    stats.cache_hits += len(todo) - len(miss)
    done = []
    j = 0
    for p in chunk:
        if p.request is None:
            done.append(p.record)
            continue
        hit = j not in verdicts
        v = (hits[keys[j]] if hit else verdicts[j]).model_dump(mode="json")
        v["session_id"], v["turn"] = p.request.session.id, p.request.turn   # a cached verdict may be another session's
        done.append({**p.record, "verdict": v, "cache_hit": hit,
                     "timing": {"judge_s": 0.0 if hit else dt / len(miss)}})
        j += 1
    return done


def _chunks(pending: Iterator[_Pending], size: int) -> Iterator[list[_Pending]]:
    buf: list[_Pending] = []
    for p in pending:
        buf.append(p)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def judge_phase(suite: Suite, images: ImageSource, judge: Any, cache: Any, texts: dict, form: str,
                records_path: Path, chunk_size: int, stats: RunStats, progress: Progress | None = None) -> dict:
    """Judge every turn not yet in records.jsonl; returns all records."""
    records = read_records(records_path)
    stats.records_resumed = len(records)
    todo = [(s, [k for k in range(1, s.n_turns + 1) if (s.id, k) not in records]) for s in suite.sessions]
    todo = [(s, ks) for s, ks in todo if ks]
    advance = progress("judging", sum(len(ks) for _, ks in todo)) if progress else None
    same_size = getattr(judge, "judge_id", "") == "program"
    if isinstance(judge, ProcessPoolJudge) and todo:
        return _judge_phase_workers(suite, images, judge, cache, texts, form, records_path, chunk_size, stats,
                                    advance, todo, same_size)
    pending = (p for s, ks in todo for p in pending_requests(s, ks, images, texts, form, same_size))
    with _RecordsFile(records_path) as f:
        for chunk in _chunks(pending, chunk_size):
            done = judge_chunk(chunk, judge, cache, stats)
            f.write(_record_lines(done))
            for r in done:
                records[(r["session_id"], r["turn"])] = r
            if advance:
                advance(len(done))
    return records


def _record_lines(done: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in done)


class _RecordsFile:
    """records.jsonl opened for appending. Every chunk is written and flushed at once (a
    killed process loses nothing it wrote); fsync, which only guards against a machine
    crash, runs at most once per `sync_every` seconds and on close, not once per chunk.
    A torn last line after a crash is cut off by `read_records`."""

    def __init__(self, path: Path, sync_every: float = 1.0) -> None:
        self.f = open(path, "a", encoding="utf-8")
        self.sync_every, self.synced = sync_every, time.monotonic()

    def write(self, text: str) -> None:
        self.f.write(text)
        self.f.flush()
        if time.monotonic() - self.synced >= self.sync_every:
            os.fsync(self.f.fileno())
            self.synced = time.monotonic()

    def __enter__(self) -> "_RecordsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _judge_phase_workers(suite: Suite, images: ImageSource, judge: ProcessPoolJudge, cache: Any, texts: dict,
                         form: str, records_path: Path, chunk_size: int, stats: RunStats, advance, todo,
                         same_size: bool) -> dict:
    """The judge phase on worker processes: chunks of whole sessions (about `chunk_size`
    turns) are read, hashed, looked up and judged in the workers; this process writes the
    cache and appends the records in chunk order (the same records as one process)."""
    index = {s.id: i for i, s in enumerate(suite.sessions)}
    chunks: list[list[tuple[int, list[int]]]] = [[]]
    n = 0
    for s, ks in todo:
        if n >= chunk_size:
            chunks.append([])
            n = 0
        chunks[-1].append((index[s.id], ks))
        n += len(ks)
    pool = judge.phase_pool({"suite": suite, "images": images, "texts": texts, "form": form, "same_size": same_size,
                             "cache_path": None if cache.path is None else str(cache.path)})
    with _RecordsFile(records_path) as f:
        for (text, entries, st), work in zip(pool.map(_phase_worker_chunk, chunks), chunks):
            if entries:
                cache.put_texts(entries, judge.judge_id)
            for k, v in st.items():
                setattr(stats, k, getattr(stats, k) + v)
            f.write(text)
            if advance:
                advance(sum(len(ks) for _, ks in work))
    return read_records(records_path)         # the file is the record: resumed and new lines alike


# -------------------------------------------------------------------------- 4. results

def aggregate(suite: Suite, records: dict, settings: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    """results.json without the `run` block: a pure function of the records and settings."""
    sessions = suite.sessions
    o = outcomes_from_records([s.id for s in sessions], [s.n_turns for s in sessions], records)
    per_turn = per_turn_metrics(o, n_boot=cfg.bootstrap, seed=cfg.seed)
    agreement = vote_agreement(sessions, records)
    if agreement is not None:
        for row, a in zip(per_turn, agreement):
            row["agreement"] = a
    tasks = task_labels(o.session_ids, [s.n_turns for s in sessions],
                        {(s.id, k): t.task_type for s in sessions for k, t in enumerate(s.turns, 1)})
    return {"suite": cfg.suite, "editor": cfg.editor, "judge": settings["judge"]["id"],
            "n_sessions": len(sessions), "per_turn": per_turn, "overall": overall_metrics(per_turn),
            "by_task": per_task_metrics(o, tasks, n_boot=cfg.bootstrap, seed=cfg.seed),
            "settings": settings, "bootstrap": {"resamples": cfg.bootstrap, "seed": cfg.seed, "interval": "percentile 95%"}}


def vote_agreement(sessions: Sequence[Session], records: dict) -> list[float | None] | None:
    """Per turn, the mean `agreement` (share of valid votes agreeing with the majority) over
    checks that carry one; None when no verdict of the run does (a single vote per check)."""
    K = max(s.n_turns for s in sessions)
    sums, counts = np.zeros(K), np.zeros(K)
    for (sid, k), rec in records.items():
        for c in (rec.get("verdict") or {}).values():
            if isinstance(c, dict) and c.get("agreement") is not None and k <= K:
                sums[k - 1] += c["agreement"]
                counts[k - 1] += 1
    if not counts.any():
        return None
    return [float(a / n) if n else None for a, n in zip(sums, counts)]


def run_bench(cfg: BenchConfig, progress: Progress | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole benchmark; returns the summary (also written as DIR/results.json and report.html)."""
    from ..editors import load_editor
    from .report import write_report

    t_start = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise EditrlInputError(f"--out {out} exists and is not a folder")
    if min(cfg.batch_size, cfg.chunk_size) < 1 or cfg.judge_workers < 0 or cfg.bootstrap < 0 or cfg.strips < 0:
        raise EditrlInputError("--batch-size and --chunk-size must be at least 1, --judge-workers, "
                               "--bootstrap and --strips at least 0 (--judge-workers 0: auto)")
    unknown = set(cfg.judge_options) - set(JUDGE_OPTIONS)
    if unknown:
        raise EditrlInputError(f"unknown judge option(s): {', '.join(sorted(unknown))}")

    # 1. suite, editor, judge, settings
    suite = load_suite(cfg.suite, cfg.sessions, cfg.turns, cfg.seed)
    reconstructor = load_reconstructor(cfg.intent)
    if reconstructor is not None and cfg.form not in ("auto", "explicit"):
        raise EditrlInputError(f"--intent {cfg.intent} writes the editor's text itself; drop --form {cfg.form}")
    form = "intent" if reconstructor is not None else resolve_form(cfg.form, cfg.editor)
    editor = load_editor(cfg.editor, mode="in_context" if form == "in_context" else "explicit")
    precomputed = bool(getattr(editor, "precomputed", False))
    if cfg.compile:
        if not hasattr(editor, "compile"):
            raise EditrlInputError(f"--compile applies to the tiny editor, not {cfg.editor}")
        editor.compile(freeze=True)             # a benchmark never changes the editor's weights
    if cfg.steps is not None and cfg.steps < 1:
        raise EditrlInputError(f"--steps must be at least 1, got {cfg.steps}")
    steps = None if precomputed else (cfg.steps or getattr(editor, "default_steps", 10))
    judge = load_judge(cfg.judge, **cfg.judge_options)
    if cfg.judge_workers > 1 and judge.judge_id != "program":
        raise EditrlInputError("--judge-workers applies to the program judge; vlm judges take --concurrency")
    check_judge_inputs(judge, suite)
    if reconstructor is not None:
        intents = load_or_reconstruct(reconstructor, suite, out / "intent.jsonl", progress)
        texts = {key: (rec.explicit, []) for key, rec in intents.items()}
    else:
        texts = turn_texts_all(suite.sessions, form)
    images = ImageSource(suite, out, editor)
    n_missing = check_missing(images, suite.sessions, cfg.allow_missing)
    if not precomputed:
        check_editor_inputs(editor, suite, texts)
    settings = run_settings(cfg, suite, form, steps, judge, precomputed, getattr(editor, "weights_sha256", None))
    if reconstructor is not None:
        params = reconstructor.params() if hasattr(reconstructor, "params") else None
        settings["intent"] = {"spec": cfg.intent, "name": reconstructor.name,
                              "id": getattr(reconstructor, "reconstructor_id", None),
                              "params": json.loads(json.dumps(params, sort_keys=True, default=str)),
                              "weights_sha256": getattr(reconstructor, "weights_sha256", None),
                              "texts_sha256": hashlib.sha256(json.dumps(sorted((f"{a}/{b}", t) for (a, b), (t, _) in texts.items()))
                                                             .encode()).hexdigest()}
    out.mkdir(parents=True, exist_ok=True)
    resumed = pin_settings(out, settings)
    if reconstructor is not None and not (out / "intent.jsonl").is_file():
        write_intents(out / "intent.jsonl", suite, intents)
    if log and resumed:
        log(f"resuming the run in {out}")
    if log and n_missing:
        log(f"{n_missing} session(s) with missing output images: those turns are scored as missing")
    stats = RunStats()

    # 2. editor phase
    if not precomputed:
        t0 = time.perf_counter()
        stats.images_generated = generate_images(editor, suite, form, steps, cfg.seed, cfg.batch_size, out, progress,
                                                 texts=texts if reconstructor is not None else None)
        stats.editor_seconds = time.perf_counter() - t0

    # 3. judge phase
    cache = NoCache() if cfg.no_cache else VerdictCache(cfg.cache or default_cache_path())
    calls_before = getattr(judge, "calls", None)
    t0, c0 = time.perf_counter(), time.process_time()
    stats.judge_workers = judge_workers_for(cfg.judge_workers, judge.judge_id,
                                            sum(s.n_turns for s in suite.sessions), cfg.chunk_size)
    judging = ProcessPoolJudge(judge, stats.judge_workers) if stats.judge_workers > 1 else judge
    try:
        records = judge_phase(suite, images, judging, cache, texts, form, out / "records.jsonl", cfg.chunk_size,
                              stats, progress)
    finally:
        cache.close()
        if judging is not judge:
            judging.close()
    stats.judge_seconds = time.perf_counter() - t0
    stats.judge_cpu_seconds = time.process_time() - c0
    if isinstance(calls_before, int):
        stats.model_calls = judge.calls - calls_before

    # 4. results and report
    results = aggregate(suite, records, settings, cfg)
    if reconstructor is not None:
        results["intent"] = {"spec": cfg.intent, "turns": len(intents),
                             "errors": sum(r.error is not None for r in intents.values()),
                             "file": "intent.jsonl"}
    results["run"] = {**stats.__dict__, "cache": None if cache.path is None else str(cache.path),
                      "resumed": resumed, "seconds": time.perf_counter() - t_start}
    t0 = time.perf_counter()
    write_report(out / "report.html", results, suite, records, images, strips=cfg.strips)
    results["run"]["report_seconds"] = time.perf_counter() - t0
    results["run"]["seconds"] = time.perf_counter() - t_start
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return summary(results, out)


def summary(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """The one-line JSON the command prints last."""
    run = results["run"]
    judged = run["judge_calls"] + run["cache_hits"]
    return {"suite": results["suite"], "editor": results["editor"], "judge": results["judge"],
            "n_sessions": results["n_sessions"],
            "per_turn": [{"turn": r["turn"], "n": r["n"], "success": r["success"], "success_all": r["success_all"]}
                         for r in results["per_turn"]],
            "O": results["overall"]["O"], "success_all_last": results["overall"]["success_all_last"],
            "judge_errors": results["overall"]["judge_errors"], "missing": results["overall"]["missing"],
            "judge_calls": run["judge_calls"], "cache_hits": run["cache_hits"], "model_calls": run["model_calls"],
            "records_resumed": run["records_resumed"], "images_generated": run["images_generated"],
            "seconds": round(run["seconds"], 3), "judge_seconds": round(run["judge_seconds"], 3),
            "judge_turns_per_s": round(judged / run["judge_seconds"], 1) if judged and run["judge_seconds"] > 0 else None,
            "paths": {"results": str(out / "results.json"), "records": str(out / "records.jsonl"),
                      "report": str(out / "report.html")}}


# ----------------------------------------------------------------------- 5. comparing

def load_run(run_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple[str, int], dict[str, Any]]]:
    """(results.json, records) of a finished run; read-only."""
    d = Path(run_dir)
    path = d / "results.json"
    if not path.is_file():
        raise EditrlInputError(f"{d}: no results.json (not a finished editrl bench run)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        key = results["settings"]["suite"]["key"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise EditrlInputError(f"{path}: not an editrl bench results file") from None
    if not isinstance(key, str):
        raise EditrlInputError(f"{path}: not an editrl bench results file")
    return results, read_records(d / "records.jsonl", repair=False)


def _judge_identity(results: dict[str, Any]) -> dict[str, Any]:
    """The judge settings that decide a run's verdicts (id, prompt version, params, options)."""
    j = (results.get("settings") or {}).get("judge")
    return {k: j.get(k) for k in ("id", "prompt_version", "params", "options")} if isinstance(j, dict) else {}


RunDirs = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def compare_runs(dir_a: RunDirs, dir_b: RunDirs, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per turn, B − A for success, success@k, IF, CC and O over the sessions both sides hold
    (matched by id), with paired bootstrap intervals; and per task type (`by_task`), B − A for
    success, IF and CC over every turn of that type. The runs must share a suite.

    A side may be several runs of the same sessions (e.g. one checkpoint per training seed): its
    rates pool every run's verdicts of a session (`metrics.pooled_parts`; without judge errors, the
    mean of the runs' rates), and each bootstrap resample draws a session in every run at once. The
    interval then covers the session draw for these runs, not a new training seed."""
    dirs_a = [dir_a] if isinstance(dir_a, (str, os.PathLike)) else list(dir_a)
    dirs_b = [dir_b] if isinstance(dir_b, (str, os.PathLike)) else list(dir_b)
    if not dirs_a or not dirs_b:
        raise EditrlInputError("bench compare needs at least one run on each side")
    for dirs in (dirs_a, dirs_b):
        seen: dict[Path, Any] = {}
        for d in dirs:
            if Path(d).resolve() in seen:
                raise EditrlInputError(f"run {d} is listed twice on one side (it would count twice)")
            seen[Path(d).resolve()] = d
    runs = [(side, d, *load_run(d)) for side, dirs in (("A", dirs_a), ("B", dirs_b)) for d in dirs]
    suite = runs[0][2]["settings"]["suite"]["key"]
    for _, d, res, _ in runs[1:]:
        if res["settings"]["suite"]["key"] != suite:
            raise EditrlInputError(f"the runs used different suites ({runs[0][1]}: {suite}; {d}: {res['settings']['suite']['key']})")

    def turns_of(records: dict) -> dict[str, int]:
        n: dict[str, int] = {}
        for sid, k in records:
            n[sid] = max(n.get(sid, 0), k)
        return n

    turns = [turns_of(rec) for _, _, _, rec in runs]
    common = sorted(set.intersection(*(set(t) for t in turns)))
    if not common:
        raise EditrlInputError(f"the runs {', '.join(str(d) for _, d, _, _ in runs)} have no session in common")
    K = min(max(t[s] for s in common) for t in turns)
    outs = [outcomes_from_records(common, [min(t[s], K) for s in common], rec) for t, (_, _, _, rec) in zip(turns, runs)]
    oa = [o for o, r in zip(outs, runs) if r[0] == "A"]
    ob = [o for o, r in zip(outs, runs) if r[0] == "B"]
    rows = paired_differences(oa, ob, n_boot=n_boot, seed=seed)  # a turn counts only where every run has it
    label: dict = {}
    for _, _, _, rec in reversed(runs):  # A's first run's labels win
        label.update({key: r["task_type"] for key, r in rec.items() if r.get("task_type")})
    tasks = task_labels(common, [K] * len(common), label)
    by_task = paired_task_differences(oa, ob, tasks, n_boot=n_boot, seed=seed)
    differs = None
    j0 = _judge_identity(runs[0][2])
    for _, d, res, _ in runs[1:]:
        j = _judge_identity(res)
        if j != j0:
            what = _first_difference(j0, j)
            if len(runs) == 2:
                differs = what.replace(": was ", ": A ").replace(", now ", ", B ")
            else:
                differs = what.replace(": was ", f": {runs[0][1]} ").replace(", now ", f", {d} ")
            break

    def joined(side: str, field: str) -> Any:
        """The side's value of a results field, or its distinct values joined when the runs differ."""
        vals = [res.get(field) for s, _, res, _ in runs if s == side]
        distinct = list(dict.fromkeys(str(v) for v in vals))
        return vals[0] if len(distinct) == 1 else ", ".join(distinct)

    def only(side: str) -> int:
        held = set().union(*(set(t) for t, r in zip(turns, runs) if r[0] == side))
        return len(held - set(common))

    return {"a": ",".join(map(str, dirs_a)), "b": ",".join(map(str, dirs_b)),
            "runs_a": [str(d) for d in dirs_a], "runs_b": [str(d) for d in dirs_b], "suite": suite,
            "editor_a": joined("A", "editor"), "editor_b": joined("B", "editor"),
            "judge_a": joined("A", "judge"), "judge_b": joined("B", "judge"), "judge_settings_differ": differs,
            "common_sessions": len(common), "only_a": only("A"), "only_b": only("B"),
            "metrics": list(COMPARED), "bootstrap": {"resamples": n_boot, "seed": seed, "paired": True},
            "per_turn": rows, "task_metrics": list(TASK_COMPARED), "by_task": by_task}
