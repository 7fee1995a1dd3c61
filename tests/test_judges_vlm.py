"""VLM judges against real components: a real HTTP server on loopback (tests/loopback_judge_server.py)
behind `vlm:URL`, and a tiny random Qwen2-VL saved to disk (tests/tiny_vlm.py) behind
`vlm-local:PATH`. Every fault a model or server can produce must come back as `judge_error`
for exactly the checks it spoils, never as a pass or fail."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy import ndimage

from editrl.judges import JudgeRequest, ProgramJudge, load_judge
from editrl.judges.clients import chat_messages
from editrl.judges.prompts import Vote, applicable_checks, build_prompt, parse_value
from editrl.judges.similarity import content_consistency, kept_region
from editrl.judges.vlm import combine_votes, known_scenes
from editrl.session import EditrlInputError, GlobalConstraint, Session, Turn
from editrl.world.grammar import GrammarConfig, sample_session, session_scenes
from editrl.world.render import render
from editrl.world.scene import COLORS
from loopback_judge_server import FAULTS, FAULTS_ALL_CHECKS, LoopbackJudgeServer

VLM_CHECKS = ("IF", "GA", "CU")


def shapes_requests(n: int, turns: int = 3, seed: int = 0) -> list[JudgeRequest]:
    """Every turn of n ShapesWorld sessions, judged on the world's own ground-truth images."""
    out = []
    for i in range(n):
        s = sample_session(seed, i, GrammarConfig(turns=turns))
        imgs = [render(sc) for sc in session_scenes(s)]
        out += [JudgeRequest(s, k, imgs) for k in range(1, turns + 1)]
    return out


def rich_request() -> JudgeRequest:
    """A ShapesWorld turn with a rule in force and a pronoun: IF, GA and CU are all asked."""
    for r in shapes_requests(12):
        if r.session.constraint_active(r.turn) and r.session.turns[r.turn - 1].pronoun:
            return r
    raise AssertionError("no turn with both a rule and a pronoun in the first sessions")


def real_world_request(turn: int = 2) -> JudgeRequest:
    """A session without scenes (like a converted real-world record): CC must be asked of the model."""
    s = Session(id="photo1", source_image="photo1.png",
                global_constraint=GlobalConstraint(text="Keep the sky exactly as it is.", kind="other"),
                turns=[Turn(instruction="Paint the car red", explicit="Recolor [car] to [red]", task_type="color"),
                       Turn(instruction="Now make it bigger", explicit="Enlarge [red car]", task_type="size",
                            pronoun=True)])
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    return JudgeRequest(s, turn, imgs)


def http_judge(server: LoopbackJudgeServer, **kw):
    opts = dict(timeout=5.0, retries=2, backoff=0.01, concurrency=1, min_side=64)
    opts.update(kw)
    return load_judge("vlm:" + server.url, **opts)


def asked(v, checks=VLM_CHECKS):
    return {c: getattr(v, c) for c in checks if getattr(v, c).status is not None}


# ------------------------------------------------------------------------- loading

def test_load_judge_forms_and_bad_specs(tmp_path):
    assert isinstance(load_judge("program", protocol=None, votes=None), ProgramJudge)
    with pytest.raises(EditrlInputError, match=r"vlm:URL.*vlm-local:PATH"):
        load_judge("gpt-judge")
    with pytest.raises(EditrlInputError, match="http"):
        load_judge("vlm:localhost:8000")
    for model in (None, "some-model"):   # nothing listens on the discard port
        with pytest.raises(EditrlInputError, match="unreachable"):
            load_judge("vlm:http://127.0.0.1:9/v1", model=model, timeout=2.0)
    with pytest.raises(EditrlInputError, match="temperature"):
        load_judge("vlm:http://127.0.0.1:9/v1", votes=3, temperature=0.0)
    with pytest.raises(EditrlInputError, match="protocol"):
        load_judge("vlm:http://127.0.0.1:9/v1", protocol="likert")
    with pytest.raises(EditrlInputError, match="unknown option"):
        load_judge("vlm:http://127.0.0.1:9/v1", temprature=0.5)
    with pytest.raises(EditrlInputError, match="not a model folder"):
        load_judge(f"vlm-local:{tmp_path / 'missing'}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(EditrlInputError, match="not a loadable") as e:
        load_judge(f"vlm-local:{tmp_path}")
    assert "\n" not in str(e.value)


def test_model_discovered_and_request_shape(judge_server):
    reqs = shapes_requests(4)
    judge = http_judge(judge_server, concurrency=4)
    assert judge.judge_id == f"vlm:{judge_server.url}#{judge_server.model}"
    assert judge.prompt_version.startswith("binary-v1")
    verdicts = judge.judge(reqs)
    assert judge.calls == judge_server.n_requests == len(reqs)
    bodies = {LoopbackJudgeServer.prompt_text(b): b for b in judge_server.requests}
    for r, v in zip(reqs, verdicts):
        assert (v.session_id, v.turn) == (r.session.id, r.turn)
        assert v.IF.status == "pass" and v.IF.raw and v.IF.score == 1.0
        assert v.CC.status == "pass" and v.CC.reason.startswith("by image similarity") and v.CC.raw is None
        assert (v.GA.status is not None) == r.session.constraint_active(r.turn)
        assert (v.CU.status is not None) == r.session.turns[r.turn - 1].pronoun
        body = bodies[LoopbackJudgeServer.prompt_text({"messages": chat_messages(judge.plan(r, known_scenes(r.session)).prompt, 64)})]
        parts = body["messages"][1]["content"]
        assert sum(p["type"] == "image_url" for p in parts) == (2 if r.turn == 1 else 3)
        text = LoopbackJudgeServer.prompt_text(body)
        assert r.session.turns[r.turn - 1].instruction in text
        assert ("<GA>" in text) == r.session.constraint_active(r.turn)
        assert ("<CU>" in text) == r.session.turns[r.turn - 1].pronoun
        assert "<CC>" not in text   # measured from pixels in ShapesWorld


def test_real_world_turn_asks_cc_and_shows_referent(judge_server):
    r = real_world_request()
    judge = http_judge(judge_server)
    [v] = judge.judge([r])
    text = LoopbackJudgeServer.prompt_text(judge_server.requests[0])
    for tag in ("<IF>", "<CC>", "<GA>", "<CU>"):
        assert tag in text
    assert "Enlarge [red car]" in text and "Keep the sky exactly as it is." in text and "Paint the car red" in text
    assert v.CC.status == "pass" and v.CC.reason.startswith("asked of the VLM")
    assert all(c.status == "pass" for c in v.checks().values())
    [v1] = judge.judge([real_world_request(turn=1)])
    assert v1.CU.status is None and v1.GA.status == "pass"


# --------------------------------------------------------------------------- faults

@pytest.mark.parametrize("kind", FAULTS)
def test_each_fault_spoils_exactly_its_checks(judge_server, kind):
    r = rich_request()
    judge = http_judge(judge_server)
    judge_server.script.append({"kind": "fault", "fault": kind})
    [v] = judge.judge([r])
    spoiled = set(VLM_CHECKS) if kind in FAULTS_ALL_CHECKS else {"IF"}
    for c, res in asked(v).items():
        if c in spoiled:
            assert res.status == "judge_error" and res.score is None, (c, res)
            assert res.raw == judge_server.fault_text(kind, judge_server.requests[0])
        else:
            assert res.status == "pass"
    assert v.CC.status == "pass"   # decided from pixels, whatever the model says
    why = {"malformed": "no <IF> tag", "refusal": "refusal", "empty": "empty reply", "conflict": "conflicting",
           "bad_value": "neither yes nor no"}[kind]
    assert why in v.IF.reason


def test_graded_faults_and_threshold(judge_server):
    r = rich_request()
    judge = http_judge(judge_server, protocol="graded")
    judge_server.script.extend([{"kind": "answer", "value": 4}, {"kind": "answer", "value": 2},
                                {"kind": "fault", "fault": "bad_value"}, {"kind": "fault", "fault": "conflict"}])
    four, two, bad, conflict = (judge.judge([r])[0] for _ in range(4))
    assert "<IF_score>" in LoopbackJudgeServer.prompt_text(judge_server.requests[0])
    assert all(c.status == "pass" and c.score == 0.75 for c in asked(four).values())
    assert all(c.status == "fail" and c.score == 0.25 for c in asked(two).values())
    assert bad.IF.status == "judge_error" and "out of range" in bad.IF.reason and bad.GA.status == "pass"
    assert conflict.IF.status == "judge_error" and "conflicting" in conflict.IF.reason


def test_strict_parsing():
    P = lambda text, graded=False, t=4: parse_value(text, "IF", graded, threshold=t)  # noqa: E731
    assert P("<IF> YES </IF><IF_reason>the square is blue</IF_reason>").status == "pass"
    assert P("<IF> YES </IF><IF_reason>the square is blue</IF_reason>").reason == "the square is blue"
    assert P("<if>no</if>").status == "fail"
    for bad, why in [("<IF>yes</IF> and again <IF>yes</IF>", "repeated"), ("<IF>yes", "no <IF> tag"),
                     ("<IF>yes.</IF>", "neither"), ("   ", "empty reply"), ("I cannot evaluate images.", "refusal"),
                     ("<IF>yes</IF><IF>yes", "repeated"), ("<think>hmm <IF>no</IF>", "inside <think>")]:
        v = P(bad)
        assert v.status == "judge_error" and why in v.reason, (bad, v)
    assert P("<think>maybe <IF>no</IF> at first</think>\n<IF>yes</IF>").status == "pass"
    assert P("template-opened thinking <IF>no</IF></think><IF>yes</IF>").status == "pass"
    g = P("<IF_score> 5 </IF_score>", graded=True)
    assert (g.status, g.score) == ("pass", 1.0)
    assert P("<IF_score>3</IF_score>", graded=True).status == "fail"
    assert P("<IF_score>3</IF_score>", graded=True, t=3).status == "pass"
    for bad, why in [("<IF_score>4.5</IF_score>", "whole number"), ("<IF_score>0</IF_score>", "out of range"),
                     ("<IF_score>four</IF_score>", "whole number"), ("<IF>yes</IF>", "no <IF_score> tag")]:
        v = P(bad, graded=True)
        assert v.status == "judge_error" and why in v.reason, (bad, v)


def test_transient_500_is_retried(judge_server):
    judge = http_judge(judge_server, retries=2)
    judge_server.script.extend([{"kind": "http", "status": 500}, {"kind": "http", "status": 503},
                                {"kind": "answer", "value": "no"}])
    [v] = judge.judge([rich_request()])
    assert judge_server.n_requests == 3 and judge.calls == 3
    assert all(c.status == "fail" for c in asked(v).values())


def test_persistent_errors_become_judge_errors(judge_server):
    judge = http_judge(judge_server, retries=2)
    judge_server.script.extend([{"kind": "http", "status": 500}] * 3)
    [v] = judge.judge([rich_request()])
    assert judge_server.n_requests == 3
    for c in asked(v).values():
        assert c.status == "judge_error" and "HTTP 500" in c.reason and "after 3 tries" in c.reason and c.raw is None
    assert v.CC.status == "pass"
    # a 4xx other than 429 is the request's fault: no retry
    wrong = http_judge(judge_server, model="no-such-model", retries=3)
    judge_server.reset()
    [v] = wrong.judge([rich_request()])
    assert judge_server.n_requests == 1 and "HTTP 404" in v.IF.reason and v.IF.status == "judge_error"


def test_stall_past_timeout_is_bounded(judge_server):
    judge = http_judge(judge_server, timeout=0.3, retries=1)
    judge_server.script.extend([{"kind": "stall", "seconds": 5.0}] * 2)
    t0 = time.monotonic()
    [v] = judge.judge([rich_request()])
    wall = time.monotonic() - t0
    assert wall < 1.5, wall    # 2 tries x 0.3 s + backoff, not the 10 s the server would stall
    for c in asked(v).values():
        assert c.status == "judge_error" and "timeout after 0.3s after 2 tries" in c.reason


def test_thirty_percent_faulty_replies(judge_server):
    reqs = shapes_requests(34)          # 102 turns
    judge_server.reset(fault_rate=0.3)
    judge = http_judge(judge_server, concurrency=8)
    verdicts = judge.judge(reqs)
    n_faulty = len(judge_server.faults)
    assert 0.2 * len(reqs) < n_faulty < 0.4 * len(reqs)
    assert sum(v.IF.status == "judge_error" for v in verdicts) == n_faulty
    for r, v in zip(reqs, verdicts):
        msgs = chat_messages(judge.plan(r, known_scenes(r.session)).prompt, 64)
        key = LoopbackJudgeServer.request_key({"messages": msgs})
        faulty = int(key[:8], 16) / 16 ** 8 < 0.3
        kind = judge_server.fault_kinds[int(key[8:16], 16) % len(judge_server.fault_kinds)] if faulty else None
        for c, res in asked(v).items():
            spoiled = faulty and (c == "IF" or kind in FAULTS_ALL_CHECKS)
            assert res.status == ("judge_error" if spoiled else "pass"), (c, kind, res)
        assert v.CC.status == "pass"


def test_concurrency_overlaps(judge_server):
    reqs = shapes_requests(5)           # 15 turns: 2 rounds of 8 concurrent calls
    judge_server.reset(delay=0.2)
    t0 = time.monotonic()
    http_judge(judge_server, concurrency=1).judge(reqs)
    serial = time.monotonic() - t0
    judge_server.reset(delay=0.2)
    t0 = time.monotonic()
    verdicts = http_judge(judge_server, concurrency=8).judge(reqs)
    parallel = time.monotonic() - t0
    assert all(v.IF.status == "pass" for v in verdicts)
    assert judge_server.max_in_flight >= 6
    assert serial / parallel > 3.0, (serial, parallel)


# ---------------------------------------------------------------------------- votes

def test_votes_majority_tie_and_agreement(judge_server):
    r = rich_request()
    judge = http_judge(judge_server, votes=3, temperature=0.7)
    yes, no = judge_server.well_formed, lambda b: judge_server.well_formed(b, "no")
    body = {"messages": chat_messages(judge.plan(r, known_scenes(r.session)).prompt, 64)}
    judge_server.script.append({"kind": "choices", "texts": [yes(body), no(body), yes(body)]})
    [v] = judge.judge([r])
    assert judge_server.requests[0]["n"] == 3 and judge_server.requests[0]["temperature"] == 0.7
    assert v.IF.status == "pass" and v.IF.votes == ["pass", "fail", "pass"]
    assert v.IF.agreement == pytest.approx(2 / 3) and v.IF.score == pytest.approx(2 / 3)
    assert "2 of 3 valid votes" in v.IF.reason and v.IF.raw.count("----- vote") == 3
    # one invalid vote: the majority of the valid ones
    judge_server.script.append({"kind": "choices", "texts": [no(body), "no tags here", no(body)]})
    [v] = judge.judge([r])
    assert v.IF.status == "fail" and v.IF.votes == ["fail", "judge_error", "fail"] and v.IF.agreement == 1.0
    assert "1 invalid" in v.IF.reason
    # a tie among the valid votes is no verdict
    judge_server.script.append({"kind": "choices", "texts": [no(body), "I'm sorry, I can't.", yes(body)]})
    [v] = judge.judge([r])
    assert v.IF.status == "judge_error" and v.IF.reason.startswith("tie") and v.IF.score is None
    # no valid vote at all
    judge_server.script.append({"kind": "choices", "texts": ["", "", ""]})
    [v] = judge.judge([r])
    assert v.IF.status == "judge_error" and "no valid vote" in v.IF.reason


def test_votes_without_server_n_support(judge_server):
    judge_server.reset(honor_n=False)
    judge = http_judge(judge_server, votes=3, temperature=0.7)
    judge_server.script.extend([{"kind": "answer", "value": "yes"}, {"kind": "answer", "value": "no"},
                                {"kind": "answer", "value": "no"}])
    [v] = judge.judge([rich_request()])
    assert [b.get("n", 1) for b in judge_server.requests] == [3, 2, 1] and judge.calls == 3
    assert v.IF.status == "fail" and v.IF.votes == ["pass", "fail", "fail"]


def test_combine_votes_graded_mean():
    votes = [Vote("pass", 1.0), Vote("pass", 0.75), Vote("fail", 0.25), Vote("judge_error", reason="x")]
    status, score, reason, agree = combine_votes(votes)
    assert status == "pass" and score == pytest.approx(2 / 3) and agree == pytest.approx(2 / 3)


def test_think_first(judge_server):
    judge = http_judge(judge_server, think=True)
    assert judge.params()["think"] and judge.params()["max_tokens"] == 1024
    judge_server.script.append({"kind": "text", "text": "<think>At first <IF>no</IF>, but the square did turn "
                                                         "blue.</think><IF>yes</IF><IF_reason>blue now</IF_reason>"})
    [v] = judge.judge([real_world_request(turn=1)])
    assert "<think>" in LoopbackJudgeServer.prompt_text(judge_server.requests[0])
    assert v.IF.status == "pass" and v.IF.reason == "blue now"


# ----------------------------------------------------------------------- graded-expect over HTTP

def test_graded_expect_http_needs_logprobs(judge_server):
    judge = http_judge(judge_server, protocol="graded-expect")
    [v] = judge.judge([rich_request()])
    e = 3 * 0.1 + 4 * 0.6 + 5 * 0.3   # the server's digit distribution
    for c in asked(v).values():
        assert c.status == "pass" and c.score == pytest.approx((e - 1) / 4)
    assert judge_server.requests[-1]["logprobs"] is True
    judge_server.reset(logprobs=False)
    with pytest.raises(EditrlInputError, match="log-probabilities"):
        http_judge(judge_server, protocol="graded-expect")


# ------------------------------------------------------------------------- CC by pixels

def test_cc_by_similarity_on_shapesworld():
    reqs = shapes_requests(40)
    scenes = {r.session.id: session_scenes(r.session) for r in reqs}
    for r in reqs:
        sc = scenes[r.session.id]
        gt = content_consistency(r.prev, r.image, sc[r.turn - 1], sc[r.turn])
        assert gt.status == "pass" and gt.score == 1.0, (r.session.turns[r.turn - 1].task_type, gt.reason)
    n_checked = 0
    for r in reqs:
        sc = scenes[r.session.id]
        prev, nxt = sc[r.turn - 1], sc[r.turn]
        if prev.background != nxt.background:
            continue
        far = ndimage.binary_erosion(kept_region(prev, nxt), iterations=5)   # well away from the edit
        ys, xs = np.nonzero(far)
        if len(ys) == 0:
            continue
        y, x = ys[len(ys) // 2], xs[len(ys) // 2]
        bad = r.image.copy()
        bad[y - 3: y + 3, x - 3: x + 3] = max(COLORS.values(), key=lambda c: int(np.abs(np.subtract(c, bad[y, x])).max()))
        res = content_consistency(r.prev, bad, prev, nxt)
        assert res.status == "fail" and res.score < 0.8, res.reason
        n_checked += 1
    assert n_checked > 60
    # the output of the turn unchanged (edit not done) is IF's failure, not CC's
    r = reqs[0]
    sc = scenes[r.session.id]
    assert content_consistency(r.prev, r.prev, sc[0], sc[1]).status == "pass"


# ------------------------------------------------------------------------ local tiny VLM

@pytest.fixture(scope="session")
def tiny_vlm_path(tmp_path_factory):
    from tiny_vlm import save_tiny_qwen2vl

    return save_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"))


def test_local_tiny_vlm_end_to_end(tiny_vlm_path):
    reqs = shapes_requests(2) + [real_world_request()]
    judge = load_judge(f"vlm-local:{tiny_vlm_path}", max_tokens=24, batch_size=4, threads=1)
    assert judge.judge_id.startswith(f"vlm-local:{tiny_vlm_path}#")
    verdicts = judge.judge(reqs)
    assert judge.calls == len(reqs)
    n_errors = 0
    for r, v in zip(reqs, verdicts):
        checks = applicable_checks(r.session, r.turn, ask_cc=known_scenes(r.session) is None)
        for c, res in v.checks().items():
            if c not in checks:
                assert res.status is None or c == "CC"
                continue
            # never invented: the verdict is exactly what the strict parser reads in the kept raw reply
            assert res.raw is not None
            assert res.status == parse_value(res.raw, c, False).status
            n_errors += res.status == "judge_error"
    assert n_errors > 0   # a random model writes no well-formed tags


def test_local_graded_expect_matches_hand_computed_logits(tiny_vlm_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

    reqs = shapes_requests(1)[:2]
    judge = load_judge(f"vlm-local:{tiny_vlm_path}", protocol="graded-expect", max_tokens=2, batch_size=2,
                       min_digit_mass=0.0, min_side=0, threads=1)
    verdicts = judge.judge(reqs)

    # independently: the saved model's logits after "<IF_score>" in the templated prompt
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(tiny_vlm_path, local_files_only=True)
    improc = Qwen2VLImageProcessorPil.from_pretrained(tiny_vlm_path, local_files_only=True)
    template = (tiny_vlm_path / "chat_template.jinja").read_text()
    digits = [tok.convert_tokens_to_ids(d) for d in "12345"]
    for r, v in zip(reqs, verdicts):
        s, k = r.session, r.turn
        prompt = build_prompt(s, k, r.images, applicable_checks(s, k, ask_cc=False), graded=True)
        content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in prompt.parts]
        text = tok.apply_chat_template([{"role": "system", "content": prompt.system}, {"role": "user", "content": content}],
                                       chat_template=template, tokenize=False, add_generation_prompt=True) + "<IF_score>"
        px = improc(images=prompt.images, return_tensors="pt")
        per_image = [int(g.prod()) // improc.merge_size ** 2 for g in px["image_grid_thw"]]
        pieces = text.split("<|image_pad|>")
        assert len(pieces) == len(per_image) + 1
        text = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(per_image, pieces[1:]))
        ids = tok(text, return_tensors="pt")["input_ids"]
        mm = (ids == model.config.image_token_id).long()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                           pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"]).logits[0, -1]
        p = torch.softmax(logits[digits].double(), dim=0)
        expect = float((p * torch.arange(1, 6, dtype=torch.double)).sum())
        assert v.IF.status in ("pass", "fail")
        assert v.IF.score == pytest.approx((expect - 1) / 4, abs=1e-4)
        assert v.IF.raw.startswith("<IF_score>")
    # by default a model that is not answering with a digit gives no score
    strict = load_judge(f"vlm-local:{tiny_vlm_path}", protocol="graded-expect", max_tokens=2, min_side=0, threads=1)
    [v] = strict.judge(reqs[:1])
    assert v.IF.status == "judge_error" and "score digits hold only" in v.IF.reason and v.IF.score is None
    assert not math.isnan(verdicts[0].IF.score)


def test_expected_digit_vote_reads_the_answer_position():
    from editrl.judges.clients import Sample, TokenInfo
    from editrl.judges.vlm import expected_digit_vote

    def sample(pieces: list[str], at: dict[str, float]) -> Sample:
        # per-character tokens; the digit after the answer's <IF_score> carries the distribution `at`
        text = "".join(pieces)
        answer = text.rfind("<IF_score>") + len("<IF_score>")
        toks = [TokenInfo(ch, {k: math.log(p) for k, p in at.items()} if i == answer else {ch: 0.0})
                for i, ch in enumerate(text)]
        return Sample(text=text, tokens=toks)

    dist = {"2": 0.5, "4": 0.25, "x": 0.25}
    v = expected_digit_vote(sample(["<think>maybe <IF_score>1</IF_score></think>", "<IF_score>4</IF_score>"], dist),
                            "IF", threshold=3, min_mass=0.5)
    assert v.status == "fail" and v.raw_score == pytest.approx((2 * 0.5 + 4 * 0.25) / 0.75)
    v = expected_digit_vote(sample(["<IF_score>4</IF_score>"], dist), "IF", threshold=3, min_mass=0.8)
    assert v.status == "judge_error" and "75.0%" in v.reason
    v = expected_digit_vote(sample(["<IF_score>4</IF_score> <IF_score>5</IF_score>"], dist), "IF", 3, 0.5)
    assert v.status == "judge_error" and "2 <IF_score> tags" in v.reason
    v = expected_digit_vote(Sample(text="<IF_score>4</IF_score>"), "IF", 3, 0.5)
    assert v.status == "judge_error" and "log-probabilities" in v.reason
