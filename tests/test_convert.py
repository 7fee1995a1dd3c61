"""editrl.convert: MICE-Bench JSONL and EdiVal CSV -> editrl sessions."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from editrl.convert import (
    bracket_names,
    convert,
    convert_edival,
    convert_mice,
    has_pronoun,
    load_foreign_sessions,
    map_task_type,
    parse_rule,
    sniff_format,
    split_rule,
)
from editrl.session import EditrlInputError, Session, Turn, read_sessions, write_sessions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CM = DATA / "mice" / "cm_train_metadata.jsonl"
CU = DATA / "mice" / "cu_dev_metadata.jsonl"
EDIVAL = DATA / "edival" / "oai_instruction_generation_output.csv"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(scope="module")
def cm():
    return convert_mice(_need(CM))


@pytest.fixture(scope="module")
def cu():
    return convert_mice(_need(CU))


@pytest.fixture(scope="module")
def edival():
    return convert_edival(_need(EDIVAL))


# ------------------------------------------------------------------ real data: counts

def test_cm_all_records_convert(cm):
    sessions, failures = cm
    assert failures == []
    assert len(sessions) == 1850
    assert all(s.n_turns == 3 for s in sessions)
    assert len({s.id for s in sessions}) == 1850
    # every content-memory record carries a parsed session rule from turn 1
    kinds = {s.global_constraint.kind for s in sessions}
    assert kinds == {"color_of_changes", "material_of_changes"}
    assert all(s.global_constraint.from_turn == 1 and s.global_constraint.value for s in sessions)


def test_cu_all_records_convert(cu):
    sessions, failures = cu
    assert failures == []
    assert len(sessions) == 120
    assert all(s.n_turns == 3 and s.global_constraint is None for s in sessions)


def test_edival_572_sessions_of_3_turns(edival):
    sessions, failures = edival
    assert failures == []
    assert len(sessions) == 572
    assert all(s.n_turns == 3 for s in sessions)
    assert len({s.id for s in sessions}) == 572
    assert all(s.id.startswith("edival-") and s.source_image.startswith("images/") for s in sessions)


# --------------------------------------------------------------- real data: contents

def test_cm_first_record_fields(cm):
    s = cm[0][0]
    first = json.loads(CM.read_text(encoding="utf-8").splitlines()[0])
    assert s.id == "mice-00001-056257b296835f65"
    assert s.source_image == first["image"] == "source_image/056257b296835f65.jpg"
    assert s.source_sha256 is None
    assert s.meta == {"source": "mice", "source_file": CM.name, "line": 1}
    t1 = s.turns[0]
    assert t1.instruction == first["instruction"][0]  # the editor sees the full text
    assert t1.explicit == "Change the background to [gym]"
    assert t1.task_type == "background"
    assert t1.target == {"names": ["gym"]}
    assert t1.params == {
        "source_task_type": "background_change",
        "bg_consistency": False,
        "unchanged_objects": ["plastic silver robot figurine"],
        "available_objects": ["plastic silver robot figurine"],
        "all_objects": ["plastic silver robot figurine", "plastic green tree"],
    }
    assert [t.task_type for t in s.turns] == ["background", "replace", "count"]
    assert s.turns[2].target == {"names": ["teapot", "3"]}


def test_cm_rule_split_on_real_lines(cm):
    sessions = cm[0]
    s1, s2 = sessions[0], sessions[1]
    gc = s1.global_constraint
    assert gc.kind == "color_of_changes" and gc.value == "peach" and gc.from_turn == 1
    assert gc.text.startswith("Set a persistent rule for all following edits: peach color")
    assert gc.text.endswith("or any untouched area.")
    assert "With this rule active" not in gc.text
    assert s2.global_constraint.value == "pink"
    assert s2.global_constraint.text.startswith("Apply a standing constraint")
    for s in sessions:
        assert s.turns[0].instruction.startswith(s.global_constraint.text)
        assert "With this rule active" in s.turns[0].instruction
        for t in s.turns[1:]:  # turns 2-3 carry no rule text
            assert "With this rule active" not in t.instruction
            assert s.global_constraint.text not in t.instruction
        assert "rule" not in (s.turns[0].explicit or "").lower()


def test_cm_all_six_templates_and_multiword_material(cm):
    openings = {
        ("Set a persistent rule", "color_of_changes"),
        ("Set a persistent rule", "material_of_changes"),
        ("Apply a standing constraint", "color_of_changes"),
        ("Apply a standing constraint", "material_of_changes"),
        ("From now on", "color_of_changes"),
        ("From now on", "material_of_changes"),
    }
    seen = set()
    for s in cm[0]:
        gc = s.global_constraint
        opening = next(o for o, _ in openings if gc.text.startswith(o))
        seen.add((opening, gc.kind))
        assert f"{gc.value} {'color' if gc.kind == 'color_of_changes' else 'material'}" in gc.text
    assert seen == openings
    assert "stainless steel" in {s.global_constraint.value for s in cm[0]}


def test_cu_pronouns(cu):
    s = cu[0][0]
    assert [t.instruction for t in s.turns] == [
        "Change the color of paper blue sign to yellow", "Change its color to black", "Remove it"]
    assert [t.pronoun for t in s.turns] == [False, True, True]
    assert s.turns[1].explicit == "Change the color of [paper yellow sign] to [black]"
    by_text = {t.instruction: t.pronoun for s in cu[0] for t in s.turns}
    assert by_text["Change its color to black"] is True
    assert sum(t.pronoun for s in cu[0] for t in s.turns) > 100


def test_edival_first_image(edival):
    s = edival[0][0]
    assert s.id == "edival-0000" and s.source_image == "images/0.png"
    assert s.meta["source"] == "edival" and s.meta["image_index"] == 0
    # stray surrounding double quotes are stripped from the cumulative lists
    assert s.turns[1].instruction == "Change the count of painted white leaf pattern to 4"
    assert s.turns[1].explicit == "Change the count of [painted white leaf pattern] to [4]"
    assert s.turns[1].target == {"names": ["painted white leaf pattern", "4"]}
    assert [t.task_type for t in s.turns] == ["add", "count", "background"]
    # per-turn params come from that turn's row
    assert s.turns[0].params["unchanged_objects"] == ["painted white leaf pattern"]
    assert s.turns[2].params["bg_consistency"] is False
    assert s.turns[2].params["available_objects"] == ["painted white leaf pattern"]
    assert s.turns[0].params["source_task_type"] == "subject_add"
    for s in edival[0]:
        for t in s.turns:
            assert not t.instruction.startswith('"') and not t.explicit.startswith('"')


def test_round_trip_sample(cm, cu, edival, tmp_path):
    sample = cm[0][:40] + cu[0][:40] + edival[0][:40]
    out = tmp_path / "sessions.jsonl"
    assert write_sessions(out, sample) == len(sample)
    back = read_sessions(out)
    assert [s.model_dump() for s in back] == [s.model_dump() for s in sample]


# ------------------------------------------------------------------------ unit pieces

@pytest.mark.parametrize("src,dst", [
    ("subject_add", "add"), ("subject_remove", "remove"), ("subject_replace", "replace"),
    ("color_alter", "color"), ("material_alter", "material"), ("position_change", "position"),
    ("count_change", "count"), ("background_change", "background"), ("text_change", "text"),
    ("style_change", "style"), ("weather_change", "other"), ("", "other"), (None, "other"),
])
def test_task_type_mapping(src, dst):
    assert map_task_type(src) == dst


def test_task_types_in_real_data(cm, cu, edival):
    for sessions, _ in (cm, cu, edival):
        for s in sessions:
            for t in s.turns:
                assert t.task_type == map_task_type(t.params["source_task_type"]) != "other"


@pytest.mark.parametrize("explicit,names", [
    ("Replace [plastic silver robot figurine] with [teapot]", ["plastic silver robot figurine", "teapot"]),
    ("Add text '[Summer 78]' on the image", ["Summer 78"]),
    ("Add [bowtie] on the [above] of [cotton white shirt]", ["bowtie", "above", "cotton white shirt"]),
    ('Change the material of [mouse] to ["wood"]', ["mouse", "wood"]),
    ("Remove the cat", []),
    ("Add [] here", []),
    (None, []),
])
def test_bracket_parsing(explicit, names):
    assert bracket_names(explicit) == names


@pytest.mark.parametrize("text,expected", [
    ("Change its color to black", True),
    ("Remove it", True),
    ("Change the count of them to 3", True),
    ("Make THEIR hats red", True),
    ("They should be blue", True),
    ("Add text 'High Five' on it", True),
    ("Add text 'Let it snow' on the image", False),           # quoted literal text
    ("Replace the text 'IT'S A' on cotton white shirt with 'BAMBOO'", False),
    ("remain the paper yellow post-it notes unchanged", False),  # not a standalone word
    ("Change the item to a kite", False),
    ("Change the color of italic sign", False),
])
def test_pronoun_detection(text, expected):
    assert has_pronoun(text) is expected


@pytest.mark.parametrize("rule,kind,value", [
    ("Set a persistent rule for all following edits: peach color must be applied exclusively "
     "to the specific object being directly added or modified — do not colorize the background.",
     "color_of_changes", "peach"),
    ("Set a persistent rule for all following edits: denim material must be applied exclusively "
     "to the specific object — do not change the texture, material, or appearance.",
     "material_of_changes", "denim"),
    ("Apply a standing constraint to all subsequent edits: only the object directly involved in "
     "each edit should receive pink color — the background must remain unaffected.",
     "color_of_changes", "pink"),
    ("Apply a standing constraint to all subsequent edits: only the object directly involved in "
     "each edit should be given stainless steel material — keep their original material.",
     "material_of_changes", "stainless steel"),
    ("From now on, every edit must use light blue color only on the object that is being added "
     "or changed — leave all unmodified regions in their original colors.",
     "color_of_changes", "light blue"),
    ("From now on, every edit must apply paper material only to the object that is being added "
     "or changed — leave the texture untouched.", "material_of_changes", "paper"),
    ("From now on, keep every edit small and tidy.", "other", None),
])
def test_parse_rule(rule, kind, value):
    gc = parse_rule(rule)
    assert (gc.kind, gc.value, gc.text, gc.from_turn) == (kind, value, rule, 1)


def test_split_rule():
    rule = "Set a persistent rule for all following edits: teal color must be applied exclusively."
    assert split_rule(f"{rule} With this rule active, Remove the cat") == (rule, "Remove the cat")
    assert split_rule(f"{rule} Remove the cat") == (rule, "Remove the cat")  # no marker
    assert split_rule("Remove the cat") is None
    assert split_rule("Change its color to black") is None


def _rule_line():
    # "their" inside the rule text is not a pronoun of the edit
    return {"image": "a/b.jpg", "turns": 1,
            "instruction": ["From now on, every edit must use red color only on the object — "
                            "leave all regions in their original colors. With this rule active, Remove cat"],
            "formatted_instruction": ["Remove [cat]"], "task_type": ["subject_remove"],
            "bg_consistency": [True], "unchanged_objects": [[]], "available_objects": [[]],
            "all_objects": [["cat"]]}


# ---------------------------------------------------------------- malformed MICE lines

def _mice_record(**over):
    rec = {"image": "source_image/abc.jpg",
           "instruction": ["Change the color of cup to red", "Remove it"],
           "formatted_instruction": ["Change the color of [cup] to [red]", "Remove [red cup]"],
           "task_type": ["color_alter", "subject_remove"],
           "bg_consistency": [True, True],
           "unchanged_objects": [["table"], ["table"]],
           "available_objects": [["table", "red cup"], ["table"]],
           "all_objects": [["table", "cup"], ["table", "cup", "red cup"]],
           "turns": 2}
    rec.update(over)
    return rec


def test_mice_rule_text_pronoun_not_counted(tmp_path):
    rule_line = _rule_line()
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(rule_line) + "\n", encoding="utf-8")
    (s,), failures = convert_mice(p)
    assert failures == []
    assert s.turns[0].pronoun is False
    assert s.global_constraint.value == "red"


def test_mice_malformed_lines_reported(tmp_path):
    bad_len = _mice_record(task_type=["color_alter"])
    no_field = _mice_record()
    del no_field["formatted_instruction"]
    lines = [
        json.dumps(_mice_record()),                   # 1 ok
        '{"image": "x.jpg", "instruction": [',        # 2 not JSON
        json.dumps(bad_len),                          # 3 list length != turns
        "",                                           # 4 blank: skipped, not a record
        json.dumps(no_field),                         # 5 missing field
        json.dumps(_mice_record(turns=0)),            # 6 bad turns
        json.dumps([1, 2]),                           # 7 not an object
        json.dumps(_mice_record(task_type=["color_alter", 7])),  # 8 not a string
        json.dumps(_mice_record(image="source_image/abc.jpg")),  # 9 ok, same image
    ]
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sessions, failures = convert_mice(p)
    assert [s.id for s in sessions] == ["mice-00001-abc", "mice-00009-abc"]
    assert [s.meta["line"] for s in sessions] == [1, 9]
    assert sessions[0].turns[1].pronoun is True
    assert [w for w, _ in failures] == ["m.jsonl:2", "m.jsonl:3", "m.jsonl:5", "m.jsonl:6",
                                        "m.jsonl:7", "m.jsonl:8"]
    reasons = dict(failures)
    assert reasons["m.jsonl:2"].startswith("malformed JSON")
    assert reasons["m.jsonl:3"] == "field 'task_type': 1 entries but turns = 2"
    assert reasons["m.jsonl:5"] == "missing field: formatted_instruction"
    assert reasons["m.jsonl:6"] == "field 'turns': expected a positive integer, got 0"
    assert reasons["m.jsonl:7"] == "a record must be a JSON object, got list"
    assert reasons["m.jsonl:8"] == "field 'task_type.1': expected a string, got int"

    out = tmp_path / "out.jsonl"
    report = convert("mice", p, out)
    assert (report["records"], report["converted"], report["failed"]) == (8, 2, 6)
    assert report["failures"][0] == {"where": "m.jsonl:2", "reason": reasons["m.jsonl:2"]}
    assert len(read_sessions(out)) == 2


def test_mice_real_file_with_one_broken_line(tmp_path):
    lines = _need(CU).read_text(encoding="utf-8").splitlines()[:10]
    lines[4] = lines[4][: len(lines[4]) // 2]  # truncate line 5
    p = tmp_path / "cu10.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sessions, failures = convert_mice(p)
    assert len(sessions) == 9
    assert [w for w, _ in failures] == ["cu10.jsonl:5"]
    assert failures[0][1].startswith("malformed JSON")
    assert "mice-00005" not in " ".join(s.id for s in sessions)
    assert sessions[4].id.startswith("mice-00006-")


# -------------------------------------------------------------- malformed EdiVal rows

HEADER = ["image_index", "turns", "task_type", "instructions", "format_instructions",
          "bg_consistency", "unchanged_objects", "available_objects", "all_objects"]


def _edival_rows(index, n=2, over=None):
    over = over or {}
    instr = ["Add cat", '"Change the count of cat to 2"', "Remove cat"][:n]
    fmt = ["Add [cat]", '"Change the count of [cat] to [2]"', "Remove [cat]"][:n]
    types = ["subject_add", "count_change", "subject_remove"][:n]
    rows = []
    for t in range(1, n + 1):
        row = {"image_index": str(index), "turns": str(t), "task_type": repr(types[:t]),
               "instructions": repr(instr[:t]), "format_instructions": repr(fmt[:t]),
               "bg_consistency": "True", "unchanged_objects": "[]",
               "available_objects": "['cat']", "all_objects": "['cat']"}
        row.update(over.get(t, {}))
        rows.append(row)
    return rows


def _write_csv(path, rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HEADER, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def test_edival_malformed_groups_reported(tmp_path):
    rows = (_edival_rows(0)                                                   # lines 2-3 ok
            + [r for r in _edival_rows(1, 3) if r["turns"] != "2"]            # 4-5: no turn 2
            + _edival_rows(2, 2, {1: {"instructions": "['Add dog']"}})        # 6-7 disagree
            + _edival_rows(3, 2, {2: {"bg_consistency": "maybe"}})            # 8-9
            + _edival_rows(4, 2, {2: {"all_objects": "__import__('os')"}})    # 10-11
            + _edival_rows(5, 3))                                             # 12-14 ok
    p = tmp_path / "e.csv"
    _write_csv(p, rows)
    sessions, failures = convert_edival(p)
    assert [s.id for s in sessions] == ["edival-0000", "edival-0005"]
    assert sessions[1].n_turns == 3 and sessions[0].n_turns == 2
    assert sessions[1].turns[1].instruction == "Change the count of cat to 2"
    assert sessions[1].source_image == "images/5.png"
    assert failures == [
        ("e.csv:4", "image_index 1: no row for turn 2 of 3"),
        ("e.csv:6", "image_index 2: column 'instructions' of the turn-1 row (line 6) "
                    "disagrees with the turn-2 row (line 7)"),
        ("e.csv:8", "turn 2 (line 9): column 'bg_consistency': expected True/False, got 'maybe'"),
        ("e.csv:10", "turn 2 (line 11): column 'all_objects': not a python list literal: "
                     "\"__import__('os')\""),
    ]
    report = convert("edival", p, tmp_path / "out.jsonl")
    assert (report["records"], report["converted"], report["failed"]) == (6, 2, 4)


def test_edival_missing_columns_is_an_input_error(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("image_index,turns\n0,1\n", encoding="utf-8")
    with pytest.raises(EditrlInputError, match="not an EdiVal CSV"):
        convert_edival(p)


# ------------------------------------------------------------------------ convert()

def test_convert_bad_format_and_missing_file(tmp_path):
    out = tmp_path / "out.jsonl"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(_mice_record()) + "\n", encoding="utf-8")
    with pytest.raises(EditrlInputError, match="unknown format 'magicbrush'"):
        convert("magicbrush", src, out)
    with pytest.raises(EditrlInputError, match="no such file"):
        convert("mice", tmp_path / "nope.jsonl", out)
    with pytest.raises(EditrlInputError, match="no such file"):
        convert_edival(tmp_path / "nope.csv")
    assert not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.jsonl"]


def test_convert_nothing_converts_writes_nothing(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("not json\n{}\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(EditrlInputError, match="no record converted") as e:
        convert("mice", src, out)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.jsonl"]


def test_convert_real_edival(tmp_path):
    out = tmp_path / "edival.jsonl"
    report = convert("edival", _need(EDIVAL), out)
    assert report["format"] == "edival" and report["output"] == str(out)
    assert (report["records"], report["converted"], report["failed"], report["failures"]) == (572, 572, 0, [])
    assert len(read_sessions(out)) == 572


# --------------------------------------------------------------- load_foreign_sessions

def test_load_foreign_sessions(cu, tmp_path):
    got = load_foreign_sessions(_need(CU))
    assert got is not None and [s.id for s in got] == [s.id for s in cu[0]]
    assert sniff_format(CU) == "mice"
    assert sniff_format(_need(EDIVAL)) == "edival"

    ours = tmp_path / "ours.jsonl"
    write_sessions(ours, [Session(id="s1", source_image="a.png",
                                  turns=[Turn(instruction="Remove the cat", task_type="remove")])])
    assert load_foreign_sessions(ours) is None
    other_csv = tmp_path / "other.csv"
    other_csv.write_text("a,b\n1,2\n", encoding="utf-8")
    assert load_foreign_sessions(other_csv) is None
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{not json\n", encoding="utf-8")
    assert load_foreign_sessions(junk) is None

    small = tmp_path / "small.csv"
    _write_csv(small, _edival_rows(7, 3))
    (s,) = load_foreign_sessions(small)
    assert s.id == "edival-0007" and s.n_turns == 3
