"""Convert real-world multi-turn editing records into editrl sessions.

Two public formats are read (see shared/data/README.md):

* **MICE-Bench** JSONL (``cm_*`` "content memory" and ``cu_*`` "content understanding"
  metadata): one record per line with per-turn lists ``instruction``,
  ``formatted_instruction`` (bracketed explicit form), ``task_type``, ``bg_consistency``,
  ``unchanged_objects``, ``available_objects``, ``all_objects`` and a ``turns`` count.
  One record becomes one session, ``id = "mice-<line:05d>-<image stem>"``; the record's
  ``image`` path is kept as is (the images are not shipped).
* **EdiVal-Bench** CSV (``oai_instruction_generation_output.csv``): one row per
  (image_index, turn) with *cumulative* python-literal lists (``instructions``,
  ``format_instructions``, ``task_type``) and per-turn ``bg_consistency`` /
  ``unchanged_objects`` / ``available_objects`` / ``all_objects``. Rows are grouped by
  ``image_index`` into one session (``id = "edival-<index:04d>"``). EdiVal ships no image
  paths, so ``source_image`` is the convention ``images/<image_index>.png`` (relative to
  the sessions file, like every editrl ``source_image``); put the images there, or rewrite
  the field, before running anything that opens them. Cells are parsed with
  ``ast.literal_eval``, never ``eval``.

Per turn: ``instruction`` is what the editor is shown, ``explicit`` the bracketed form,
``task_type`` the source type mapped onto editrl's enum (unknown types -> ``other``; the
original is kept in ``params["source_task_type"]``), ``target = {"names": [...]}`` the
bracketed phrases of the explicit form, and ``pronoun`` whether the instruction refers to
something by a standalone "it/its/them/their/they" (quoted literal text such as
``Add text 'Let it snow'`` and a split-off session rule are not searched).

Session rules (MICE "content memory"): the first turn of those records starts with a
persistent rule followed by "With this rule active, <edit>". The full instruction stays
turn 1's ``instruction`` (the editor sees it); the rule sentence becomes the session's
``GlobalConstraint`` (``from_turn`` = that turn). The six templates seen in the data::

    Set a persistent rule for all following edits: <X> color must be applied exclusively ...
    Set a persistent rule for all following edits: <X> material must be applied exclusively ...
    Apply a standing constraint to all subsequent edits: only the object ... should receive <X> color — ...
    Apply a standing constraint to all subsequent edits: only the object ... should be given <X> material — ...
    From now on, every edit must use <X> color only on the object ...
    From now on, every edit must apply <X> material only to the object ...

``<X> color`` -> kind ``color_of_changes``, ``<X> material`` -> ``material_of_changes``,
value ``<X>`` (one to three words, e.g. "peach", "light blue", "stainless steel"); a rule
whose value does not parse is kept with kind ``other`` and value None.

A record that cannot be converted (non-JSON line, missing field, list lengths that
disagree with ``turns``, a missing EdiVal turn row, cumulative lists that disagree, ...)
is not fatal: it is returned as ``(f"{file}:{line}", reason)`` and every other record
still converts. ``convert()`` writes the result atomically and raises
``EditrlInputError`` when nothing converts.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .session import (
    TASK_TYPES,
    EditrlInputError,
    GlobalConstraint,
    Session,
    Turn,
    _format_validation_error,
    write_sessions,
)

log = logging.getLogger(__name__)

FORMATS = ("mice", "edival")

Failure = tuple[str, str]

# source task type -> editrl task type
TASK_TYPE_MAP: dict[str, str] = {
    "subject_add": "add",
    "subject_remove": "remove",
    "subject_replace": "replace",
    "color_alter": "color",
    "material_alter": "material",
    "position_change": "position",
    "count_change": "count",
    "background_change": "background",
    "text_change": "text",
    "style_change": "style",
}

MICE_FIELDS = ("image", "instruction", "formatted_instruction", "task_type", "bg_consistency",
               "unchanged_objects", "available_objects", "all_objects", "turns")
MICE_TURN_LISTS = ("instruction", "formatted_instruction", "task_type", "bg_consistency",
                   "unchanged_objects", "available_objects", "all_objects")
OBJECT_FIELDS = ("unchanged_objects", "available_objects", "all_objects")

EDIVAL_COLUMNS = ("image_index", "turns", "task_type", "instructions", "format_instructions",
                  "bg_consistency", "unchanged_objects", "available_objects", "all_objects")
EDIVAL_CUMULATIVE = ("instructions", "format_instructions", "task_type")


# ------------------------------------------------------------------------- text helpers

def map_task_type(source: Any) -> str:
    """Map a benchmark task type onto editrl's enum; unknown -> 'other'."""
    if not isinstance(source, str):
        return "other"
    key = source.strip().lower()
    if key in TASK_TYPE_MAP:
        return TASK_TYPE_MAP[key]
    return key if key in TASK_TYPES else "other"


_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def bracket_names(explicit: str | None) -> list[str]:
    """The bracketed phrases of an explicit instruction, in order.

    'Replace [a red cup] with [teapot]' -> ['a red cup', 'teapot']; surrounding quotes
    inside a bracket ('["wood"]') are dropped; empty brackets are skipped.
    """
    if not explicit:
        return []
    names = []
    for m in _BRACKET.finditer(explicit):
        name = _strip_wrapping_quotes(m.group(1).strip()).strip()
        if name:
            names.append(name)
    return names


_PRONOUN = re.compile(r"(?<![\w-])(?:it|its|them|their|they)(?![\w-])", re.IGNORECASE)
# a quoted literal: a quote not preceded by a word character up to a quote not followed by
# one, so apostrophes inside ("IT'S", "they're") do not end it
_QUOTED = re.compile(r"""(?<!\w)(['"]).*?\1(?!\w)""", re.DOTALL)


def has_pronoun(instruction: str) -> bool:
    """A standalone it/its/them/their/they outside quoted literal text ("post-it" is not)."""
    return bool(_PRONOUN.search(_QUOTED.sub(" ", instruction)))


def _strip_wrapping_quotes(s: str) -> str:
    """'"Change the count of X to 4"' -> 'Change the count of X to 4' (only a wrapping pair)."""
    t = s.strip()
    while len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'" and t[0] not in t[1:-1]:
        t = t[1:-1].strip()
    return t if t else s


# ------------------------------------------------------------------------ session rules

RULE_MARKER = re.compile(r"\bWith this rule active,\s*", re.IGNORECASE)
# openings of a rule when no "With this rule active," marker follows it
_RULE_OPENINGS = re.compile(
    r"^\s*(?:Set a persistent rule\b|Apply a standing constraint\b|From now on,|"
    r"For all (?:following|subsequent) edits\b)", re.IGNORECASE)
# "<value> color|material" right after the word that introduces it, or after the colon
_RULE_VALUE = re.compile(
    r"(?:\b(?:use|uses|using|receive|receives|given|apply|applies|applied)\s+|:\s*)"
    r"(?P<value>[A-Za-z][A-Za-z-]*(?:\s+[A-Za-z][A-Za-z-]*){0,2}?)\s+"
    r"(?P<what>colou?r|material)\b", re.IGNORECASE)
_VALUE_STOPWORDS = {"the", "a", "an", "only", "any", "no", "same", "one", "its", "their",
                    "original", "every", "each", "this", "that", "be", "must", "should"}


def split_rule(instruction: str) -> tuple[str, str] | None:
    """Split a leading session rule off an instruction: (rule_text, edit_text) or None.

    The rule is everything before "With this rule active,"; without that marker a known
    rule opening ("Set a persistent rule", "Apply a standing constraint", "From now on,")
    ends at its first sentence end.
    """
    m = RULE_MARKER.search(instruction)
    if m:
        rule, edit = instruction[:m.start()].strip(), instruction[m.end():].strip()
        if rule and edit:
            return rule, edit
        return None
    if _RULE_OPENINGS.match(instruction):
        end = re.search(r"[.!;]\s+(?=\S)", instruction)
        if end:
            rule, edit = instruction[:end.end()].strip(), instruction[end.end():].strip()
            if rule and edit:
                return rule, edit
    return None


def parse_rule(rule: str, from_turn: int = 1) -> GlobalConstraint:
    """A GlobalConstraint from the rule text (kind/value from '<X> color|material')."""
    for m in _RULE_VALUE.finditer(rule):
        value = " ".join(m.group("value").split())
        if value.lower().split()[0] in _VALUE_STOPWORDS:
            continue
        kind = "material_of_changes" if m.group("what").lower() == "material" else "color_of_changes"
        return GlobalConstraint(text=rule, kind=kind, value=value, from_turn=from_turn)
    return GlobalConstraint(text=rule, kind="other", value=None, from_turn=from_turn)


# -------------------------------------------------------------------------------- turns

def _make_turn(instruction: str, explicit: str | None, source_type: Any,
               params: dict[str, Any], rule_split: tuple[str, str] | None = None) -> Turn:
    edit_text = rule_split[1] if rule_split else instruction
    return Turn(
        instruction=instruction,
        explicit=explicit,
        task_type=map_task_type(source_type),
        target={"names": bracket_names(explicit)},
        params={"source_task_type": source_type, **params},
        pronoun=has_pronoun(edit_text),
    )


def _check_str_list(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _RecordError(f"field '{field}': expected a list of strings")
    return value


class _RecordError(Exception):
    """One record cannot be converted (becomes a failure, never fatal)."""


def _session_or_error(build) -> Session:
    try:
        return build()
    except ValidationError as e:
        raise _RecordError(_format_validation_error(e)) from None


def _require_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise EditrlInputError(f"{p}: no such file")
    return p


# --------------------------------------------------------------------------------- MICE

def _mice_record(obj: Any, line_no: int, source_file: str) -> Session:
    if not isinstance(obj, dict):
        raise _RecordError(f"a record must be a JSON object, got {type(obj).__name__}")
    missing = [f for f in MICE_FIELDS if f not in obj]
    if missing:
        raise _RecordError(f"missing field{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    n = obj["turns"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise _RecordError(f"field 'turns': expected a positive integer, got {n!r}")
    for f in MICE_TURN_LISTS:
        v = obj[f]
        if not isinstance(v, list):
            raise _RecordError(f"field '{f}': expected a list, got {type(v).__name__}")
        if len(v) != n:
            raise _RecordError(f"field '{f}': {len(v)} entries but turns = {n}")
    image = obj["image"]
    if not isinstance(image, str) or not image.strip():
        raise _RecordError("field 'image': expected a non-empty string")
    for k in range(n):
        for f in ("instruction", "formatted_instruction", "task_type"):
            if not isinstance(obj[f][k], str):
                raise _RecordError(f"field '{f}.{k}': expected a string, got {type(obj[f][k]).__name__}")
        if not obj["instruction"][k].strip():
            raise _RecordError(f"field 'instruction.{k}': empty instruction")
        if not isinstance(obj["bg_consistency"][k], bool):
            raise _RecordError(f"field 'bg_consistency.{k}': expected true/false, got {obj['bg_consistency'][k]!r}")
        for f in OBJECT_FIELDS:
            _check_str_list(obj[f][k], f"{f}.{k}")

    constraint: GlobalConstraint | None = None
    turns: list[Turn] = []
    for k in range(n):
        instruction = obj["instruction"][k]
        split = split_rule(instruction) if constraint is None else None
        if split is not None:
            constraint = parse_rule(split[0], from_turn=k + 1)
        params = {"bg_consistency": obj["bg_consistency"][k],
                  **{f: list(obj[f][k]) for f in OBJECT_FIELDS}}
        turns.append(_make_turn(instruction, obj["formatted_instruction"][k], obj["task_type"][k],
                                params, split))
    stem = Path(image).stem or "image"
    return _session_or_error(lambda: Session(
        id=f"mice-{line_no:05d}-{stem}",
        source_image=image,
        source_sha256=None,
        global_constraint=constraint,
        turns=turns,
        meta={"source": "mice", "source_file": source_file, "line": line_no},
    ))


def _mice_scan(path: Path) -> tuple[list[Session], list[Failure], int]:
    sessions: list[Session] = []
    failures: list[Failure] = []
    records = 0
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path.name}:{line_no}"
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                records += 1
                failures.append((where, f"not UTF-8 text ({e.reason} at byte {e.start})"))
                continue
            if not text.strip():
                continue
            records += 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                failures.append((where, f"malformed JSON ({e.msg} at column {e.colno})"))
                continue
            try:
                s = _mice_record(obj, line_no, path.name)
            except _RecordError as e:
                failures.append((where, str(e)))
                continue
            if s.id in seen:  # cannot happen (the line number is in the id), kept as a guard
                failures.append((where, f"duplicate session id {s.id!r} (first on line {seen[s.id]})"))
                continue
            seen[s.id] = line_no
            sessions.append(s)
    return sessions, failures, records


def convert_mice(path: str | os.PathLike) -> tuple[list[Session], list[Failure]]:
    """MICE-Bench JSONL -> (sessions, failures); failures are (f"{file}:{line}", reason)."""
    sessions, failures, _ = _mice_scan(_require_file(path))
    return sessions, failures


# ------------------------------------------------------------------------------- EdiVal

def _literal_list(cell: str | None, field: str) -> list[str]:
    if cell is None:
        raise _RecordError(f"column '{field}': missing")
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise _RecordError(f"column '{field}': not a python list literal: {cell[:60]!r}") from None
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _RecordError(f"column '{field}': expected a list of strings")
    return value


def _parse_bool(cell: str | None, field: str) -> bool:
    v = (cell or "").strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise _RecordError(f"column '{field}': expected True/False, got {cell!r}")


def _edival_session(index: int, rows: dict[int, list[tuple[int, dict]]], source_file: str) -> Session:
    for t, lst in sorted(rows.items()):
        if len(lst) > 1:
            raise _RecordError(f"image_index {index}: {len(lst)} rows for turn {t} "
                               f"(lines {', '.join(str(ln) for ln, _ in lst)})")
    by_turn = {t: lst[0] for t, lst in rows.items()}
    n = max(by_turn)
    missing = [t for t in range(1, n + 1) if t not in by_turn]
    if missing:
        raise _RecordError(f"image_index {index}: no row for turn{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(map(str, missing))} of {n}")
    last_line, last = by_turn[n]
    cum = {f: _literal_list(last[f], f) for f in EDIVAL_CUMULATIVE}
    for f, v in cum.items():
        if len(v) != n:
            raise _RecordError(f"image_index {index}: column '{f}' of the turn-{n} row "
                               f"has {len(v)} entries, expected {n}")
    for t in range(1, n):
        line, row = by_turn[t]
        for f in EDIVAL_CUMULATIVE:
            v = _literal_list(row[f], f)
            if v != cum[f][:t]:
                raise _RecordError(f"image_index {index}: column '{f}' of the turn-{t} row (line {line}) "
                                   f"disagrees with the turn-{n} row (line {last_line})")
    turns: list[Turn] = []
    for t in range(1, n + 1):
        line, row = by_turn[t]
        try:
            params = {"bg_consistency": _parse_bool(row["bg_consistency"], "bg_consistency"),
                      **{f: _literal_list(row[f], f) for f in OBJECT_FIELDS}}
        except _RecordError as e:
            raise _RecordError(f"turn {t} (line {line}): {e}") from None
        instruction = _strip_wrapping_quotes(cum["instructions"][t - 1])
        explicit = _strip_wrapping_quotes(cum["format_instructions"][t - 1])
        if not instruction.strip():
            raise _RecordError(f"turn {t}: empty instruction")
        turns.append(_make_turn(instruction, explicit, cum["task_type"][t - 1], params))
    first_line = min(ln for ln, _ in by_turn.values())
    return _session_or_error(lambda: Session(
        id=f"edival-{index:04d}",
        source_image=f"images/{index}.png",
        source_sha256=None,
        global_constraint=None,
        turns=turns,
        meta={"source": "edival", "source_file": source_file, "image_index": index,
              "line": first_line},
    ))


def _edival_scan(path: Path) -> tuple[list[Session], list[Failure], int]:
    failures: list[Failure] = []
    groups: dict[int, dict[int, list[tuple[int, dict]]]] = {}
    group_line: dict[int, int] = {}
    bad_rows = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, restkey="__extra__")
            header = reader.fieldnames or []
            missing = [c for c in EDIVAL_COLUMNS if c not in header]
            if missing:
                raise EditrlInputError(f"{path}: not an EdiVal CSV (missing column"
                                       f"{'s' if len(missing) > 1 else ''}: {', '.join(missing)})")
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                where = f"{path.name}:{start}"
                if not any((v or "").strip() for k, v in row.items() if k != "__extra__"):
                    continue
                if "__extra__" in row or any(row.get(c) is None for c in EDIVAL_COLUMNS):
                    bad_rows += 1
                    n_fields = len(header) + len(row.get("__extra__", [])) - sum(
                        row.get(c) is None for c in header)
                    failures.append((where, f"expected {len(header)} fields, got {n_fields}"))
                    continue
                try:
                    index = int(row["image_index"].strip())
                    turn = int(row["turns"].strip())
                    if index < 0 or turn < 1:
                        raise ValueError
                except ValueError:
                    bad_rows += 1
                    failures.append((where, f"bad image_index/turns: {row['image_index']!r}, {row['turns']!r}"))
                    continue
                groups.setdefault(index, {}).setdefault(turn, []).append((start, row))
                group_line.setdefault(index, start)
    except UnicodeDecodeError as e:
        raise EditrlInputError(f"{path}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise EditrlInputError(f"{path}: malformed CSV ({e})") from None

    sessions: list[Session] = []
    for index, rows in groups.items():
        try:
            sessions.append(_edival_session(index, rows, path.name))
        except _RecordError as e:
            failures.append((f"{path.name}:{group_line[index]}", str(e)))
    failures.sort(key=lambda w: int(w[0].rsplit(":", 1)[1]))
    return sessions, failures, len(groups) + bad_rows


def convert_edival(path: str | os.PathLike) -> tuple[list[Session], list[Failure]]:
    """EdiVal-Bench CSV -> (sessions, failures); one session per image_index.

    A failure's location is the first line of the offending image's rows (or the bad row).
    """
    sessions, failures, _ = _edival_scan(_require_file(path))
    return sessions, failures


# ------------------------------------------------------------------------------ driver

def convert(fmt: str, in_path: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Convert `in_path` (format `fmt`) into an editrl sessions JSONL at `out_path`.

    The output is written atomically and only when at least one record converts.
    `records` counts input records (MICE: non-blank lines; EdiVal: image groups plus
    unusable rows), so records == converted + failed.
    """
    if fmt not in FORMATS:
        raise EditrlInputError(f"unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})")
    src = _require_file(in_path)
    dst = Path(out_path)
    if dst.exists() and dst.resolve() == src.resolve():
        raise EditrlInputError(f"{dst}: output would overwrite the input file")
    scan = _mice_scan if fmt == "mice" else _edival_scan
    sessions, failures, records = scan(src)
    if not sessions:
        first = f"; first: {failures[0][0]}: {failures[0][1]}" if failures else ""
        raise EditrlInputError(f"{src}: no record converted from {fmt} ({len(failures)} failed{first})")
    write_sessions(dst, sessions)
    return {
        "format": fmt,
        "input": str(src),
        "output": str(dst),
        "records": records,
        "converted": len(sessions),
        "failed": len(failures),
        "failures": [{"where": w, "reason": r} for w, r in failures],
    }


def sniff_format(path: str | os.PathLike) -> str | None:
    """'edival' for a .csv with the EdiVal header, 'mice' for a JSONL whose first record
    has `formatted_instruction`, else None. Reads only the first line / record."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            if p.suffix.lower() == ".csv":
                header = next(csv.reader(f), [])
                return "edival" if all(c in header for c in EDIVAL_COLUMNS) else None
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    return "mice" if isinstance(obj, dict) and "formatted_instruction" in obj else None
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, OSError):
        return None
    return None


def load_foreign_sessions(path: str | os.PathLike) -> list[Session] | None:
    """Sessions from a MICE JSONL or EdiVal CSV, or None when `path` is neither
    (the caller then reads it as editrl sessions). Records that fail are logged as a
    warning and skipped; a file in which nothing converts raises EditrlInputError."""
    fmt = sniff_format(path)
    if fmt is None:
        return None
    sessions, failures = convert_mice(path) if fmt == "mice" else convert_edival(path)
    if not sessions:
        first = f"; first: {failures[0][0]}: {failures[0][1]}" if failures else ""
        raise EditrlInputError(f"{path}: no record converted from {fmt} ({len(failures)} failed{first})")
    if failures:
        log.warning("%s: %d %s record(s) skipped; first: %s: %s", path, len(failures), fmt,
                    failures[0][0], failures[0][1])
    return sessions
