"""editrl.session: the schema (DESIGN §4), JSONL I/O with line + field errors, TurnVerdict semantics."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from editrl.session import (
    CheckResult,
    EditrlInputError,
    Session,
    TurnVerdict,
    read_sessions,
    session_to_json,
    sha256_file,
    weights_sha256,
    write_sessions,
)
from editrl.world.grammar import GrammarConfig, sample_session
from editrl.world.io import png_bytes
from editrl.world.render import render
from editrl.world.scene import Scene

VALID = {
    "id": "s0001",
    "source_image": "images/s0001_0.png",
    "source_sha256": None,
    "global_constraint": {"text": "Never touch the blue square.", "kind": "protect",
                          "value": {"id": 1, "object": "blue square at center"}, "from_turn": 1},
    "turns": [
        {"instruction": "Make the red circle yellow", "explicit": "Recolor [red circle at top left] to [yellow]",
         "task_type": "color", "target": {"id": 0}, "params": {"color": "yellow"}, "expected": None},
        {"instruction": "Make it hollow", "explicit": "Change the fill of [yellow circle at top left] to [hollow]",
         "task_type": "material", "target": {"id": 0}, "params": {"fill": "hollow"}, "pronoun": True},
    ],
}


def _rec(**changes) -> dict:
    d = copy.deepcopy(VALID)
    d.update(changes)
    return d


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _file_with_bad_line3(tmp_path: Path, bad: str) -> Path:
    """Line 1 valid, line 2 blank (blank lines still count), line 3 the bad record."""
    return _write_lines(tmp_path / "sess.jsonl", [json.dumps(_rec(id="a")), "", bad])


def _expect_error(path: Path, *fragments: str, **kw) -> str:
    with pytest.raises(EditrlInputError) as ei:
        read_sessions(path, **kw)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------------- round trip

def _world_sessions(tmp_path: Path, n: int = 6) -> tuple[Path, list[Session]]:
    """ShapesWorld sessions with their source images and hashes, as `world sample` writes them."""
    sessions = []
    for i in range(n):
        s = sample_session(11, i, GrammarConfig(turns=4, constraint_share=0.5))
        data = png_bytes(render(Scene.from_dict(s.source_scene)))
        img = tmp_path / s.source_image
        img.parent.mkdir(parents=True, exist_ok=True)
        img.write_bytes(data)
        s.source_sha256 = hashlib.sha256(data).hexdigest()
        sessions.append(s)
    path = tmp_path / "sessions.jsonl"
    assert write_sessions(path, sessions) == n
    return path, sessions


def test_shapesworld_session_round_trip(tmp_path):
    path, sessions = _world_sessions(tmp_path)
    back = read_sessions(path, check_images=True, check_hashes=True)
    assert back == sessions
    assert [session_to_json(s) for s in back] == [session_to_json(s) for s in sessions]
    assert any(s.global_constraint is not None for s in back)
    assert any(t.pronoun for s in back for t in s.turns)
    # writing what was read gives the same bytes
    again = tmp_path / "again.jsonl"
    write_sessions(again, back)
    assert again.read_bytes() == path.read_bytes()
    assert sha256_file(tmp_path / back[0].source_image) == back[0].source_sha256


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path, _ = _world_sessions(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "sessions.jsonl"]
    assert path.read_text(encoding="utf-8").count("\n") == 2


def test_minimal_record_defaults():
    s = Session.model_validate({"id": "x", "source_image": "a.png",
                                "turns": [{"instruction": "Add a cat", "task_type": "add"}]})
    t = s.turns[0]
    assert t.params == {} and t.pronoun is False and t.explicit is None and t.expected is None
    assert s.global_constraint is None and s.meta == {} and s.n_turns == 1
    assert not s.constraint_active(1)


def test_constraint_active_from_turn():
    s = Session.model_validate(_rec(global_constraint={"text": "r", "kind": "other", "from_turn": 2}))
    assert [s.constraint_active(k) for k in (1, 2, 3)] == [False, True, True]


# ------------------------------------------------------------------------ invalid records

def _del(d: dict, *path):
    for p in path[:-1]:
        d = d[p]
    del d[path[-1]]


def _set(d: dict, value, *path):
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


def _bad(mod) -> str:
    d = _rec()
    mod(d)
    return json.dumps(d)


BAD_RECORDS = [
    # (name, line 3 text, fragments the message must contain)
    ("malformed_json", '{"id": "b", "turns": [', ["malformed JSON"]),
    ("not_an_object", "[1, 2, 3]", ["JSON object"]),
    ("unknown_task_type", _bad(lambda d: _set(d, "paint", "turns", 0, "task_type")),
     ["turns.0.task_type", "'paint'"]),
    ("unknown_task_type_turn2", _bad(lambda d: _set(d, "zoom", "turns", 1, "task_type")),
     ["turns.1.task_type", "'zoom'"]),
    ("unknown_constraint_kind", _bad(lambda d: _set(d, "never_red", "global_constraint", "kind")),
     ["global_constraint.kind", "'never_red'"]),
    ("missing_id", _bad(lambda d: _del(d, "id")), ["field 'id'", "required"]),
    ("missing_source_image", _bad(lambda d: _del(d, "source_image")), ["field 'source_image'", "required"]),
    ("missing_task_type", _bad(lambda d: _del(d, "turns", 0, "task_type")), ["turns.0.task_type", "required"]),
    ("missing_instruction", _bad(lambda d: _del(d, "turns", 1, "instruction")), ["turns.1.instruction", "required"]),
    ("missing_constraint_text", _bad(lambda d: _del(d, "global_constraint", "text")),
     ["global_constraint.text", "required"]),
    ("extra_top_level_field", _bad(lambda d: _set(d, 1, "colour")), ["field 'colour'", "unknown field"]),
    ("extra_turn_field", _bad(lambda d: _set(d, "x", "turns", 0, "hint")), ["turns.0.hint", "unknown field"]),
    ("extra_constraint_field", _bad(lambda d: _set(d, 2, "global_constraint", "to_turn")),
     ["global_constraint.to_turn", "unknown field"]),
    ("wrong_type_turns", _bad(lambda d: _set(d, "abc", "turns")), ["field 'turns'"]),
    ("wrong_type_instruction", _bad(lambda d: _set(d, 5, "turns", 0, "instruction")), ["turns.0.instruction"]),
    ("wrong_type_params", _bad(lambda d: _set(d, [1], "turns", 1, "params")), ["turns.1.params"]),
    ("wrong_type_from_turn", _bad(lambda d: _set(d, "later", "global_constraint", "from_turn")),
     ["global_constraint.from_turn"]),
    ("from_turn_zero", _bad(lambda d: _set(d, 0, "global_constraint", "from_turn")), ["global_constraint.from_turn"]),
    ("wrong_type_id", _bad(lambda d: _set(d, 7, "id")), ["field 'id'"]),
    ("empty_id", _bad(lambda d: _set(d, "", "id")), ["field 'id'"]),
    ("empty_instruction", _bad(lambda d: _set(d, "", "turns", 0, "instruction")), ["turns.0.instruction"]),
    ("no_turns", _bad(lambda d: _set(d, [], "turns")), ["field 'turns'"]),
    ("bad_sha", _bad(lambda d: _set(d, "ABC", "source_sha256")), ["field 'source_sha256'", "hex"]),
]


@pytest.mark.parametrize("name,line,fragments", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_invalid_record_names_file_line_and_field(tmp_path, name, line, fragments):
    path = _file_with_bad_line3(tmp_path, line)
    msg = _expect_error(path, "sess.jsonl:3:", *fragments)
    assert msg.startswith(str(path) + ":3:")


def test_duplicate_id(tmp_path):
    path = _write_lines(tmp_path / "sess.jsonl",
                        [json.dumps(_rec(id="a")), json.dumps(_rec(id="b")), json.dumps(_rec(id="a"))])
    msg = _expect_error(path, "sess.jsonl:3:", "field 'id'", "duplicate", "'a'")
    assert "line 1" in msg


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text, encoding="utf-8")
    _expect_error(path, "empty.jsonl", "no sessions")


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.jsonl", "nope.jsonl", "no such file")


def test_missing_image_only_checked_on_request(tmp_path):
    path, sessions = _world_sessions(tmp_path, 3)
    (tmp_path / sessions[2].source_image).unlink()
    assert len(read_sessions(path)) == 3          # schema only: fine
    _expect_error(path, "sessions.jsonl:3:", "field 'source_image'", "not found", check_images=True)
    _expect_error(path, "sessions.jsonl:3:", "field 'source_image'", check_hashes=True)


def test_sha_mismatch(tmp_path):
    path, sessions = _world_sessions(tmp_path, 3)
    img = tmp_path / sessions[2].source_image
    img.write_bytes(img.read_bytes() + b"\0")
    assert len(read_sessions(path, check_images=True)) == 3   # exists: fine without hashes
    _expect_error(path, "sessions.jsonl:3:", "field 'source_sha256'", check_hashes=True)


def test_missing_image_relative_to_sessions_file(tmp_path, monkeypatch):
    """`source_image` is relative to the sessions file's folder, not the working directory."""
    path, _ = _world_sessions(tmp_path / "suite", 2)
    monkeypatch.chdir(tmp_path)
    assert len(read_sessions(path, check_images=True, check_hashes=True)) == 2


def test_non_utf8_file_is_input_error(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(_rec()).encode() + b"\n\xff\xfe\x00\x81\n")
    _expect_error(path, "bin.jsonl")


def test_lax_coercion_of_wrong_types_is_rejected(tmp_path):
    path = _file_with_bad_line3(tmp_path, _bad(lambda d: _set(d, "yes", "turns", 0, "pronoun")))
    _expect_error(path, "sess.jsonl:3:", "turns.0.pronoun")


# ----------------------------------------------------------------------------- verdicts

def _v(**checks) -> TurnVerdict:
    return TurnVerdict(session_id="s", turn=1, **{k: CheckResult(status=v, score=None if v is None else 1.0)
                                                 for k, v in checks.items()})


def test_verdict_all_not_applicable_is_success():
    v = _v()
    assert v.success is True and v.failed() == [] and not v.has_error


def test_verdict_none_means_not_applicable():
    v = _v(IF="pass", CC="pass", GA=None, CU=None)
    assert v.success is True and v.failed() == []


def test_verdict_any_fail_fails():
    v = _v(IF="pass", CC="fail", GA=None, CU="fail")
    assert v.success is False
    assert v.failed() == ["CC", "CU"]


def test_verdict_judge_error_makes_success_undecided():
    assert _v(IF="pass", CC="judge_error").success is None
    v = _v(IF="fail", CC="judge_error")            # an error leaves it undecided even next to a fail
    assert v.success is None and v.has_error and v.failed() == ["IF"]


def test_verdict_rejects_unknown_status():
    with pytest.raises(Exception):
        CheckResult(status="maybe")


def test_weights_sha256_ignores_the_order_safetensors_writes_metadata_in(tmp_path):
    """safetensors writes its metadata map in an arbitrary order, so saving the same weights
    twice can give two different files; their weights digest must agree, and differ as soon
    as a tensor or a metadata value does."""
    import struct

    import torch
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}
    meta = {f"k{i}": str(i) for i in range(12)}
    p1, p2 = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    save_file(tensors, p1, metadata=meta)
    # the same header with the metadata keys in reverse order, the same tensor bytes
    raw = p1.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))                         # keep the data offset
    p2.write_bytes(struct.pack("<Q", n) + text + raw[8 + n:])
    assert sha256_file(p1) != sha256_file(p2)
    assert weights_sha256(p1) == weights_sha256(p2)

    p3 = tmp_path / "three.safetensors"
    save_file({**tensors, "b": torch.ones(4) * 2}, p3, metadata=meta)
    assert weights_sha256(p3) != weights_sha256(p1)
    p4 = tmp_path / "four.safetensors"
    save_file(tensors, p4, metadata={**meta, "k0": "changed"})
    assert weights_sha256(p4) != weights_sha256(p1)
    # not safetensors, or not readable as such: the file's own sha256
    other = tmp_path / "w.bin"
    other.write_bytes(b"\x00" * 10)
    assert weights_sha256(other) == sha256_file(other)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 20)
    assert weights_sha256(broken) == sha256_file(broken)
