"""The one data model every stage reads: Session, Turn, GlobalConstraint, TurnVerdict.

A session is one source image plus K instructions (and optionally a global constraint that
governs later turns). It is stored as JSONL, one session per line (DESIGN §4). Reading a
file validates every record and rejects the first invalid one with its line number and
the dotted path of the offending field; `write_sessions` writes atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

TaskType = Literal[
    # the nine ShapesWorld / benchmark categories
    "add", "remove", "replace", "color", "material", "position", "count", "background", "size",
    # real-world records also carry these
    "text", "style", "other",
]
TASK_TYPES: tuple[str, ...] = TaskType.__args__  # type: ignore[attr-defined]

ConstraintKind = Literal["color_of_changes", "fill_of_changes", "material_of_changes", "protect", "other"]
CONSTRAINT_KINDS: tuple[str, ...] = ConstraintKind.__args__  # type: ignore[attr-defined]

Status = Literal["pass", "fail", "judge_error"]
CHECKS = ("IF", "CC", "GA", "CU")


class EditrlInputError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, strict=True)


class GlobalConstraint(_Model):
    text: str = Field(min_length=1)
    kind: ConstraintKind
    value: Any = None
    from_turn: int = Field(default=1, ge=1)


class Turn(_Model):
    instruction: str = Field(min_length=1)   # what the editor is shown (pronouns allowed)
    explicit: str | None = None              # unambiguous, bracketed form
    task_type: TaskType
    target: dict[str, Any] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    expected: dict[str, Any] | None = None   # ShapesWorld: ground-truth scene after the turn
    pronoun: bool = False                    # the instruction refers to its object by pronoun


class Session(_Model):
    id: str = Field(min_length=1)
    source_image: str = Field(min_length=1)
    source_sha256: str | None = None
    global_constraint: GlobalConstraint | None = None
    turns: list[Turn] = Field(min_length=1)
    source_scene: dict[str, Any] | None = None  # ShapesWorld: the scene of the source image
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("source_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError("must be 64 lowercase hex digits")
        return v

    @property
    def n_turns(self) -> int:
        return len(self.turns)

    def constraint_active(self, turn: int) -> bool:
        """Whether the global constraint is in force at 1-based turn `turn`."""
        return self.global_constraint is not None and turn >= self.global_constraint.from_turn


class CheckResult(_Model):
    """One check of one turn: a verdict, a graded score in [0, 1] and a reason.

    `status` is None when the check does not apply to the turn (e.g. CU on a turn without a
    pronoun); a judge that could not decide gives `judge_error`, never a made-up score.
    """
    status: Status | None = None
    score: float | None = None
    reason: str = ""
    raw: str | None = None  # raw judge text, when a model produced it
    votes: list[Status] | None = None  # each vote's status, when several samples were drawn
    agreement: float | None = None     # share of valid votes agreeing with the majority


class TurnVerdict(_Model):
    session_id: str
    turn: int
    IF: CheckResult = Field(default_factory=CheckResult)
    CC: CheckResult = Field(default_factory=CheckResult)
    GA: CheckResult = Field(default_factory=CheckResult)
    CU: CheckResult = Field(default_factory=CheckResult)

    def checks(self) -> dict[str, CheckResult]:
        return {c: getattr(self, c) for c in CHECKS}

    @property
    def has_error(self) -> bool:
        return any(c.status == "judge_error" for c in self.checks().values())

    @property
    def success(self) -> bool | None:
        """Every applicable check passed; None when a judge error leaves it undecided."""
        if self.has_error:
            return None
        return all(c.status in (None, "pass") for c in self.checks().values())

    def failed(self) -> list[str]:
        return [name for name, c in self.checks().items() if c.status == "fail"]


# ----------------------------------------------------------------------------------- I/O

def _format_validation_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "<record>"
    msg = e["msg"]
    if e.get("type") == "literal_error":
        msg = f"{msg} (got {e.get('input')!r})"
    elif e.get("type") == "extra_forbidden":
        msg = "unknown field"
    return f"field '{loc}': {msg}"


def parse_session(line: str, where: str) -> Session:
    """Parse one JSONL line; `where` (e.g. 'sessions.jsonl:3') prefixes any error."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise EditrlInputError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise EditrlInputError(f"{where}: a session must be a JSON object, got {type(obj).__name__}")
    try:
        return Session.model_validate(obj)
    except ValidationError as e:
        raise EditrlInputError(f"{where}: {_format_validation_error(e)}") from None


def read_sessions(path: str | os.PathLike, check_images: bool = False,
                  check_hashes: bool = False) -> list[Session]:
    """Read and validate a sessions JSONL file.

    With `check_images`, every `source_image` (relative to the file's folder) must exist;
    with `check_hashes`, its SHA-256 must equal `source_sha256` when that is given.
    """
    path = Path(path)
    if not path.is_file():
        raise EditrlInputError(f"{path}: no such file")
    sessions: list[Session] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise EditrlInputError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            s = parse_session(line, where)
            if s.id in seen:
                raise EditrlInputError(f"{where}: field 'id': duplicate session id {s.id!r} (first on line {seen[s.id]})")
            seen[s.id] = i
            if check_images or check_hashes:
                img = resolve_image(path, s.source_image)
                if not img.is_file():
                    raise EditrlInputError(f"{where}: field 'source_image': file not found: {img}")
                if check_hashes and s.source_sha256 and sha256_file(img) != s.source_sha256:
                    raise EditrlInputError(f"{where}: field 'source_sha256': does not match {img}")
            sessions.append(s)
    if not sessions:
        raise EditrlInputError(f"{path}: no sessions in file")
    return sessions


def resolve_image(sessions_file: str | os.PathLike, image: str) -> Path:
    p = Path(image)
    return p if p.is_absolute() else Path(sessions_file).parent / p


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(path: str | os.PathLike) -> str:
    """Identity of a weights file. For safetensors: sha256 of the header with its keys sorted,
    then the tensor bytes: the library writes the metadata map in an arbitrary order, so two
    saves of the same weights and metadata differ as files but not here. Other files: the
    file's sha256."""
    if not str(path).endswith(".safetensors"):
        return sha256_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        try:
            n = int.from_bytes(head, "little")
            header = json.loads(f.read(n)) if len(head) == 8 and n < (1 << 27) else None
        except ValueError:                      # not UTF-8, or not JSON
            header = None
        if not isinstance(header, dict):
            return sha256_file(path)            # not a readable safetensors header: the raw bytes
        h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def session_to_json(s: Session) -> str:
    return json.dumps(s.model_dump(mode="json", exclude_defaults=False), sort_keys=False,
                      separators=(",", ":"), ensure_ascii=False)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside `path`; on success it is fsynced and renamed onto `path`, on
    failure removed. Whatever is written there appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_sessions(path: str | os.PathLike, sessions: Iterable[Session]) -> int:
    lines = [session_to_json(s) for s in sessions]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
