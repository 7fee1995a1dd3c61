"""The `editrl` command (DESIGN §3): results as the last stdout line, exit codes 0 / 2 (one-line
message, no traceback) / 1. Most cases run the installed console script in a subprocess (the
faithful path, ~1 s each); a few edge cases run `editrl.cli.main` in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from editrl.cli import main
from editrl.session import read_sessions, sha256_file
from editrl.world.grammar import session_scenes
from editrl.world.render import load_png, render

EDITRL = Path(sys.executable).with_name("editrl")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("EDITRL_DEBUG", None)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    if not EDITRL.exists():
        pytest.skip(f"console script not installed: {EDITRL}")
    return subprocess.run([str(EDITRL), *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=120)


def last_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert lines, "no stdout"
    return json.loads(lines[-1])


def assert_bad_input(stdout: str, stderr: str, code: int, *fragments: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, nothing on stdout."""
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    assert lines[0].startswith("error:"), lines[0]
    assert stdout == "", stdout
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- world sample

@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    base = tmp_path_factory.mktemp("sample")
    runs = []
    for name in ("A", "B"):
        r = run("world", "sample", "--sessions", 5, "--turns", 3, "--seed", 7, "--out", base / name, "--targets")
        assert r.returncode == 0, r.stderr
        runs.append(r)
    return base, runs


def test_sample_same_seed_same_bytes(sampled):
    base, runs = sampled
    a, b = files_of(base / "A"), files_of(base / "B")
    assert sorted(a) == sorted(b)
    assert a == b
    assert "sessions.jsonl" in a and sum(k.startswith("images/") for k in a) == 5
    assert not [k for k in a if k.endswith(".tmp") or "/." in k or k.startswith(".")]   # no temp files left


def test_sample_last_line_json(sampled):
    base, runs = sampled
    summary = last_json(runs[0].stdout)
    assert summary["sessions"] == 5 and summary["turns"] == 3 and summary["seed"] == 7
    assert Path(summary["sessions_file"]) == base / "A" / "sessions.jsonl"
    assert Path(summary["targets"]) == base / "A" / "targets"
    assert "Traceback" not in runs[0].stderr


def test_sample_targets_equal_rendered_expected(sampled):
    base, _ = sampled
    out = base / "A"
    sessions = read_sessions(out / "sessions.jsonl", check_images=True, check_hashes=True)
    assert len(sessions) == 5
    for s in sessions:
        scenes = session_scenes(s)
        assert np.array_equal(load_png(out / s.source_image), render(scenes[0]))
        assert sha256_file(out / s.source_image) == s.source_sha256
        names = sorted(p.name for p in (out / "targets" / s.id).iterdir())
        assert names == [f"turn_{k}.png" for k in (1, 2, 3)]
        for k in (1, 2, 3):
            assert np.array_equal(load_png(out / "targets" / s.id / f"turn_{k}.png"), render(scenes[k])), (s.id, k)


def test_validate_accepts_sampled_suite(sampled):
    base, _ = sampled
    r = run("validate", base / "A" / "sessions.jsonl")
    assert r.returncode == 0, r.stderr
    res = last_json(r.stdout)
    assert res["sessions"] == 5 and res["turns"] == 15


# ------------------------------------------------------------------------- world check

def test_world_check_perfect_judge():
    r = run("world", "check", "--sessions", 20, "--seed", 1)
    assert r.returncode == 0, r.stderr
    rep = last_json(r.stdout)
    assert rep["gt_pass_rate"] == 1.0 and rep["perturbation_detect_rate"] == 1.0
    assert rep["sessions"] == 20 and rep["gt_turns"] == 60 and rep["perturbations"] > 100


# --------------------------------------------------------------------------- bad input

VALID = {"id": "s1", "source_image": "images/s1_0.png",
         "turns": [{"instruction": "Make the red circle blue", "task_type": "color"}]}


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _case_malformed(tmp: Path):
    f = _jsonl(tmp / "s.jsonl", [VALID, {**VALID, "id": "s2"}, '{"id": "s3", "turns": ['])
    return ["validate", f, "--no-images"], ["s.jsonl:3:", "malformed JSON"]


def _case_enum(tmp: Path):
    bad = {**VALID, "id": "s3", "turns": [{"instruction": "x", "task_type": "teleport"}]}
    f = _jsonl(tmp / "s.jsonl", [VALID, {**VALID, "id": "s2"}, bad])
    return ["validate", f, "--no-images"], ["s.jsonl:3:", "turns.0.task_type", "teleport"]


def _case_missing_image(tmp: Path):
    f = _jsonl(tmp / "s.jsonl", [VALID])
    return ["validate", f], ["s.jsonl:1:", "source_image", "not found"]


CASES = {
    "validate_malformed_json": _case_malformed,
    "validate_unknown_enum": _case_enum,
    "validate_missing_image": _case_missing_image,
    "sample_turns_11": lambda tmp: (["world", "sample", "--sessions", 2, "--turns", 11, "--out", tmp / "o"], ["turns"]),
    "sample_sessions_0": lambda tmp: (["world", "sample", "--sessions", 0, "--out", tmp / "o"], ["--sessions"]),
    "sample_missing_option": lambda tmp: (["world", "sample", "--out", tmp / "o"], ["--sessions"]),
    "unknown_command": lambda tmp: (["frobnicate"], ["frobnicate"]),
    "convert_unknown_format": lambda tmp: (["convert", "--from", "foo", _jsonl(tmp / "in.jsonl", [VALID]),
                                            "--out", tmp / "o" / "out.jsonl"], ["foo"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    args, fragments = CASES[case](tmp_path)
    r = run(*args, cwd=tmp_path)
    assert_bad_input(r.stdout, r.stderr, r.returncode, *fragments)
    assert not (tmp_path / "o").exists()          # nothing written


def test_convert_broken_input_creates_no_output(tmp_path):
    src = _jsonl(tmp_path / "mice.jsonl", ['{"image": "a.png"', {"image": "b.png", "turns": 2}])
    out = tmp_path / "out" / "sessions.jsonl"
    r = run("convert", "--from", "mice", src, "--out", out)
    assert_bad_input(r.stdout, r.stderr, r.returncode, "mice.jsonl", "no record converted")
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------ in-process edge cases

def call(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ei:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return ei.value.code, cap.out, cap.err


def test_in_process_convert_missing_input(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code, so, se = call(capsys, "convert", "--from", "edival", tmp_path / "nope.csv", "--out", out)
    assert_bad_input(so, se, code, "nope.csv")
    assert not out.exists()


def test_in_process_sample_matches_subprocess(sampled, tmp_path, capsys):
    base, runs = sampled
    code, so, _ = call(capsys, "world", "sample", "--sessions", 5, "--turns", 3, "--seed", 7,
                       "--out", tmp_path / "C", "--targets")
    assert code == 0
    assert files_of(tmp_path / "C") == files_of(base / "A")
    assert {k: v for k, v in last_json(so).items() if k not in ("out", "sessions_file", "targets", "seconds")} == \
        {k: v for k, v in last_json(runs[0].stdout).items() if k not in ("out", "sessions_file", "targets", "seconds")}


def test_in_process_validate_non_utf8_is_bad_input(tmp_path, capsys):
    f = tmp_path / "bin.jsonl"
    f.write_bytes(b"\xff\xfe\x00garbage\n")
    code, so, se = call(capsys, "validate", f, "--no-images")
    assert_bad_input(so, se, code, "bin.jsonl")


def test_in_process_sample_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "F"
    f.write_text("x")
    code, so, se = call(capsys, "world", "sample", "--sessions", 2, "--out", f)
    assert_bad_input(so, se, code, "not a folder")


def test_in_process_no_arguments_has_no_empty_error(capsys):
    code, so, se = call(capsys)
    assert "Usage" in so + se
    assert "error:  (" not in se, se


def test_eta_is_capped_by_the_wall_time_budget():
    from types import SimpleNamespace

    from editrl.cli import _EtaColumn, _time_left

    assert _time_left(0, {"elapsed_min": 3.0}) is None and _time_left(30, {}) is None
    assert _time_left(30, {"elapsed_min": 29.5}) == pytest.approx(30.0) and _time_left(30, {"elapsed_min": 31}) == 0.0
    col = _EtaColumn()
    task = lambda est, **f: SimpleNamespace(fields=f, finished=False, time_remaining=est)  # noqa: E731
    assert col.render(task(9 * 3600.0, left_s=125.0)).plain == "0:02:05"   # 100,000 steps: hours; 30 minutes cap it
    assert col.render(task(60.0, left_s=125.0)).plain == "0:01:00"         # the steps end first
    assert col.render(task(None, left_s=125.0)).plain == "0:02:05"         # no speed measured yet
