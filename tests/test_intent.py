"""Session-intent reconstruction: the query holds no gold, `rules` is exact on ShapesWorld and
follows objects by name on real records, the accuracies are what docs/INTENT.md defines, and
`editrl intent eval` / `editrl bench --intent` work from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editrl.convert import convert_mice
from editrl.intent import RulesReconstructor, load_reconstructor, query_for, reconstruct_sessions, visible_objects
from editrl.intent.base import RawInstruction, source_objects
from editrl.intent.evaluate import contains, names, evaluate_sessions, gold_referent, governing_rule
from editrl.intent.rules import _updated_name, reconstruct_records
from editrl.session import EditrlInputError, GlobalConstraint, Session, Turn
from editrl.world.grammar import GrammarConfig, sample_session

from test_cli import assert_bad_input, last_json, run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CU = DATA / "mice" / "cu_dev_metadata.jsonl"
CM = DATA / "mice" / "cm_train_metadata.jsonl"


def _record(instructions, explicit, lists, rule=None) -> Session:
    """A real-record-like session: per turn (unchanged, available, all) object lists."""
    turns = [Turn(instruction=i, explicit=e, task_type="other",
                  params={"unchanged_objects": u, "available_objects": a, "all_objects": al},
                  pronoun=any(w in i.lower().split() for w in ("it", "its", "their", "them")))
             for i, e, (u, a, al) in zip(instructions, explicit, lists)]
    return Session(id="r", source_image="x.png", turns=turns, global_constraint=rule)


# ------------------------------------------------------------------------------ the query

def test_query_holds_only_what_is_known_before_the_turn():
    s = _record(["Change the color of paper blue sign to yellow", "Change its color to black", "Remove it"],
                ["Change the color of [paper blue sign] to [yellow]", "Change the color of [paper yellow sign] to [black]",
                 "Remove [paper black sign]"],
                [(["board"], ["board", "paper yellow sign"], ["board", "paper blue sign", "paper yellow sign"]),
                 (["board"], ["board", "paper black sign"], ["board", "paper yellow sign", "paper black sign"]),
                 (["board"], ["board"], ["board", "paper black sign"])])
    q = query_for(s, 2, ["Change the color of [paper blue sign] to [yellow]"])
    assert q.instructions == ("Change the color of paper blue sign to yellow", "Change its color to black")
    assert q.objects == (("board", "paper blue sign"), ("board", "paper yellow sign"))   # not turn 2's result
    assert "paper black sign" not in json.dumps(q.objects) and not hasattr(q, "explicit")
    assert source_objects(s) == ("board", "paper blue sign")
    with pytest.raises(ValueError):
        query_for(s, 2, [])                                  # the earlier turn's text is required
    rec = RulesReconstructor().reconstruct([q])[0]
    assert rec.explicit == "Change the color of [paper yellow sign] to black" and rec.error is None
    assert "paper yellow sign" in rec.trace


# ------------------------------------------------------------------------------ ShapesWorld

def test_rules_is_the_grammars_gold_on_long_shapes_sessions():
    cfg = GrammarConfig(turns=5, constraint_share=0.6, pronoun_prob=0.9)
    sessions = [sample_session(3, i, cfg) for i in range(400)]
    recs = reconstruct_sessions(RulesReconstructor(), sessions)
    bad = [(s.id, k) for s in sessions for k in range(1, 6) if recs[(s.id, k)].explicit != s.turns[k - 1].explicit]
    assert not bad, bad[:5]
    kinds = {s.global_constraint.kind for s in sessions if s.global_constraint}
    assert kinds == {"color_of_changes", "fill_of_changes", "protect"}
    assert sum(t.pronoun for s in sessions for t in s.turns) > 500


def test_rules_reports_an_unreadable_instruction_as_an_error():
    s = sample_session(0, 0, GrammarConfig(turns=2))
    bad = s.model_copy(update={"turns": [s.turns[0].model_copy(update={"instruction": "Do something nice"}), s.turns[1]]})
    rec = RulesReconstructor().reconstruct([query_for(bad, 1)])[0]
    assert rec.error and "cannot read" in rec.error and rec.explicit == "Do something nice"
    rec2 = RulesReconstructor().reconstruct([query_for(bad, 2, ["Do something nice"])])[0]
    assert rec2.error is not None                       # the state cannot be tracked past turn 1


# ------------------------------------------------------------------------------ real records

def test_name_substitution_without_object_lists():
    assert _updated_name("paper blue sign", "Change the color of paper blue sign to yellow") == "paper yellow sign"
    assert _updated_name("green leaf", "Change its color to red") == "red leaf"
    assert _updated_name("tray", "Change its color to black") == "black tray"
    assert _updated_name("wood brown chair", "Change the material of wood brown chair to metal") == "metal brown chair"
    assert _updated_name("cat", "Replace the cat with a dog") == "a dog"
    s = Session(id="r", source_image="x.png", turns=[
        Turn(instruction="Change the color of green leaf to red", task_type="color"),
        Turn(instruction="Change its color to navy", task_type="color", pronoun=True),
        Turn(instruction="Remove it", task_type="remove", pronoun=True)])
    recs = reconstruct_sessions(RulesReconstructor(), [s])
    assert recs[("r", 2)].explicit == "Change the color of [red leaf] to navy"
    assert recs[("r", 3)].explicit == "Remove [navy leaf]"


def test_rule_injection_and_a_part_named_by_possessive():
    rule = GlobalConstraint(text="From now on, every edit must use navy color only on the object", kind="color_of_changes",
                            value="navy", from_turn=1)
    s = _record(["From now on, every edit must use navy color only on the object that is being added or changed. "
                 "With this rule active, Add a hat on the dog", "Change the material of their strap to leather",
                 "Remove the hat"],
                ["Add [hat] on [dog]", "Change the material of [fabric black strap] to [leather]", "Remove [hat]"],
                [(["dog", "fabric black pants", "fabric black strap"], ["dog", "fabric black pants", "fabric black strap", "hat"],
                  ["dog", "fabric black pants", "fabric black strap", "hat"]),
                 (["dog", "hat", "fabric black pants"], ["dog", "hat", "fabric black pants", "leather black strap"],
                  ["dog", "hat", "fabric black strap", "leather black strap"]),
                 (["dog"], ["dog"], ["dog", "hat"])], rule=rule)
    recs = reconstruct_sessions(RulesReconstructor(), [s])
    assert "[navy] color" in recs[("r", 1)].explicit and "With this rule" not in recs[("r", 1)].explicit
    assert "[fabric black strap]" in recs[("r", 2)].explicit and "[navy]" in recs[("r", 2)].explicit
    assert "[navy]" not in recs[("r", 3)].explicit                      # a removal is not governed
    assert governing_rule(s, 2) == "navy" and governing_rule(s, 3) is None


def test_accuracy_definitions():
    assert contains("Recolor [red circle at top left] to [blue]", "red circle at top left")
    assert not names("Recolor [red circle at top left] to [blue]", "red circle at top")      # the whole bracket
    assert names("Recolor [red circle at top left] to [blue]", "Red circle at top-left") is False
    assert names("remove the red circle at top left now", "red circle at top left")      # no brackets: words
    assert contains("remove THE  Red-Circle", "red-circle")
    s = sample_session(5, 1, GrammarConfig(turns=3))
    for k, t in enumerate(s.turns, start=1):
        ref = gold_referent(s, k, None)
        assert (ref is None) == (t.task_type in ("add", "background"))
    res = evaluate_sessions(RawInstruction(), [sample_session(5, i, GrammarConfig(turns=3, pronoun_prob=1.0)) for i in range(30)])
    assert res["summary"]["referent_accuracy_pronoun"] == 0.0      # "it" names nothing
    res = evaluate_sessions(RulesReconstructor(), [sample_session(5, i, GrammarConfig(turns=3)) for i in range(30)])
    assert res["summary"]["referent_accuracy"] == 1.0 and res["summary"]["exact_match"] == 1.0


@pytest.mark.skipif(not CU.is_file(), reason="shared MICE-Bench data not present")
def test_rules_on_real_mice_pronoun_sessions():
    sessions, _ = convert_mice(CU)
    res = evaluate_sessions(RulesReconstructor(), sessions)["summary"]
    assert res["pronoun_referent_turns"] > 150
    assert res["referent_accuracy_pronoun"] >= 0.95 and res["errors"] == 0
    none = evaluate_sessions(RawInstruction(), sessions)["summary"]
    assert none["referent_accuracy_pronoun"] == 0.0


# ------------------------------------------------------------------------------ command line

def test_load_reconstructor_specs():
    assert load_reconstructor("none") is None and isinstance(load_reconstructor("rules"), RulesReconstructor)
    with pytest.raises(EditrlInputError, match="unknown --intent"):
        load_reconstructor("magic")


def test_intent_eval_cli(tmp_path):
    r = run("intent", "eval", "--suite", "shapes-long", "--sessions", "20", "--intent", "rules", "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    res = last_json(r.stdout)
    assert res["referent_accuracy"] == 1.0 and res["constraint_accuracy"] == 1.0 and res["turns"] == 100
    rows = [json.loads(x) for x in (tmp_path / "ev" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and all(r["explicit"] == r["gold"] for r in rows)
    r = run("intent", "eval", "--suite", "shapes", "--intent", "oracle")
    assert_bad_input(r.stdout, r.stderr, r.returncode, "unknown --intent")


def test_bench_with_rules_gives_the_editor_the_reconstruction(tmp_path):
    out = tmp_path / "b"
    args = ("bench", "--suite", "shapes-long", "--sessions", "3", "--turns", "2", "--editor", "tiny", "--judge", "program",
            "--intent", "rules", "--out", out, "--no-cache", "--steps", "2", "--bootstrap", "0")
    r = run(*args)
    assert r.returncode == 0, r.stderr
    intents = [json.loads(x) for x in (out / "intent.jsonl").read_text().splitlines()]
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(intents) == 6 and {(i["session_id"], i["turn"]): i["explicit"] for i in intents} == \
        {(x["session_id"], x["turn"]): x["used"] for x in records}
    assert all(x["used"] == x["explicit"] for x in records)           # rules = gold on ShapesWorld
    results = json.loads((out / "results.json").read_text())
    assert results["intent"]["errors"] == 0 and results["settings"]["intent"]["name"] == "rules"
    r = run(*args)                                                      # resumes: nothing redone
    assert r.returncode == 0 and last_json(r.stdout)["images_generated"] == 0
    r = run("bench", "--suite", "shapes", "--sessions", "2", "--editor", "tiny", "--judge", "program",
            "--intent", "rules", "--form", "raw", "--out", tmp_path / "c")
    assert_bad_input(r.stdout, r.stderr, r.returncode, "--intent rules")


# ------------------------------------------------------------------------------ tiny policy and text GRPO

def _small_policy(seed: int = 0):
    import torch

    from editrl.intent.tiny import PolicyConfig, TinyIntentPolicy
    torch.manual_seed(seed)
    return TinyIntentPolicy(PolicyConfig(dim=32, heads=2, enc_layers=1, dec_layers=1))


def _sampled(policy, n=6, seed=0):
    import torch

    from editrl.intent.tiny import query_text
    sessions = [sample_session(9, i, GrammarConfig(turns=2)) for i in range(n)]
    qs = [query_for(s, 2, [s.turns[0].explicit]) for s in sessions]
    src, mask = policy.encode_inputs([query_text(q) for q in qs])
    ids, lp = policy.generate(src, mask, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    return src, mask, ids, lp


def test_text_grpo_on_policy_ratio_is_one():
    import torch

    from editrl.rl.text_grpo import text_grpo_loss
    policy = _small_policy()
    src, mask, ids, lp_sample = _sampled(policy)
    valid = ids != policy.tok.pad
    lp = policy.token_logprobs(src, mask, ids)
    assert torch.allclose(lp[valid], lp_sample[valid], atol=1e-5)     # sampling log-probs = recomputed ones
    loss, st = text_grpo_loss(lp, lp.detach(), torch.ones(len(ids)), valid.float())
    assert st["ratio_mean"] == pytest.approx(1.0) and st["ratio_max"] == pytest.approx(1.0) and st["clip_frac"] == 0.0
    assert loss.item() == pytest.approx(-1.0)                        # −A·r with r = 1, A = 1


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_text_grpo_step_moves_sampled_tokens_with_the_advantage(sign):
    import torch

    from editrl.rl.text_grpo import text_grpo_loss
    policy = _small_policy(1)
    src, mask, ids, _ = _sampled(policy, seed=3)
    valid = (ids != policy.tok.pad).float()
    before = (policy.token_logprobs(src, mask, ids) * valid).sum(1).detach()      # [B] sequence log-probs
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    lp = policy.token_logprobs(src, mask, ids)
    loss, _ = text_grpo_loss(lp, lp.detach(), torch.full((len(ids),), sign), valid)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = (policy.token_logprobs(src, mask, ids) * valid).sum(1).detach()
    delta = (after - before).sum()
    assert (delta > 0) if sign > 0 else (delta < 0), float(delta)


def test_text_grpo_masks_and_clips():
    import torch

    from editrl.rl.text_grpo import text_grpo_loss
    lp = torch.zeros(2, 3, requires_grad=True)
    old = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 0.0]])          # token (0, 1): ratio e ≈ 2.72, clipped
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])          # the second sample masked out
    loss, st = text_grpo_loss(lp, old, torch.tensor([1.0, 100.0]), mask, clip_range=0.2)
    assert st["n_tokens"] == 2 and st["clip_frac"] == 0.5
    assert loss.item() == pytest.approx(-(1.0 + 1.2) / 2)          # max(−r, −clip(r)) with A = 1
    loss.backward()
    assert lp.grad[1].abs().sum() == 0 and lp.grad[0, 1] == 0 and lp.grad[0, 0] != 0   # clipped token: no gradient
    z, st = text_grpo_loss(lp, old, torch.ones(2), torch.zeros(2, 3))
    assert z.item() == 0.0 and st == {"n_tokens": 0}


def test_tiny_policy_scene_objects_are_one_position_each():
    import torch

    from editrl.intent.tiny import PolicyConfig, TinyIntentPolicy, query_text, scene_words
    s = sample_session(9, 3, GrammarConfig(turns=3, constraint_share=0.6, pronoun_prob=0.9))
    q = query_for(s, 2, [s.turns[0].explicit])
    text = query_text(q)
    words = TinyIntentPolicy(PolicyConfig(dim=32, heads=2, enc_layers=1, dec_layers=1, scene_tokens="words"))
    objs = TinyIntentPolicy(PolicyConfig(dim=32, heads=2, enc_layers=1, dec_layers=1))
    assert objs.cfg.scene_tokens == "objects"
    w_src, w_mask = words.encode_inputs([text])
    o_src, o_mask = objs.encode_inputs([text])
    assert w_src.dim() == 2 and o_src.dim() == 3 and o_mask.shape == o_src.shape[:2]
    items = scene_words(s.source_scene).split(" ; ")                      # objects + the background
    n_scene_words = sum(len(words.tok.ids(i)) for i in items) + len(items) - 1   # + the ';' separators
    assert int(o_mask.sum()) == int(w_mask.sum()) - n_scene_words + len(items)
    groups = [[objs.tok.itos[i] for i in g if i] for g in o_src[0].tolist()]
    assert groups[0] == ["<scene>"]
    for item, g in zip(items, groups[1:]):                                # each item: one position
        assert g == ["<scene>"] + item.split()
    assert groups[len(items) + 1] == ["<hist>"]
    # a batch mixing lengths pads whole positions; every output is still a log-prob per token
    src, mask = objs.encode_inputs([text, query_text(query_for(s, 1))])
    ids, lp = objs.generate(src, mask, temperature=1.0, generator=torch.Generator().manual_seed(0))
    valid = ids != objs.tok.pad
    assert torch.allclose(objs.token_logprobs(src, mask, ids)[valid], lp[valid], atol=1e-5)


def test_tiny_policy_config_from_older_weights_reads_words():
    import json

    from editrl.intent.tiny import PolicyConfig
    d = json.loads(PolicyConfig().to_json())
    del d["scene_tokens"]
    assert PolicyConfig.from_json(json.dumps(d)).scene_tokens == "words"
    with pytest.raises(ValueError, match="scene_tokens"):
        PolicyConfig(scene_tokens="pixels")


def test_tiny_policy_save_load_and_reconstructor(tmp_path):
    import torch

    from editrl.intent.tiny import TinyPolicyReconstructor, load_policy, load_tiny_policy, save_policy
    policy = _small_policy(2)
    save_policy(policy, tmp_path / "policy.safetensors")
    loaded, sha = load_policy(tmp_path)
    assert len(sha) == 64
    for a, b in zip(policy.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    rec = load_tiny_policy(f"tiny:{tmp_path}")
    s = sample_session(9, 0, GrammarConfig(turns=2))
    out = rec.reconstruct([query_for(s, 1)])
    assert len(out) == 1 and isinstance(out[0].explicit, str)           # untrained: any text, or an error
    real = _record(["Remove the lamp"], ["Remove [lamp]"], [(["desk"], ["desk"], ["desk", "lamp"])])
    assert TinyPolicyReconstructor(policy).reconstruct([query_for(real, 1)])[0].error   # ShapesWorld only
    (tmp_path / "bad.pt").write_bytes(b"x")
    with pytest.raises(EditrlInputError, match="safetensors"):
        load_policy(tmp_path / "bad.pt")


def test_edit_with_intent_records_the_reconstruction(tmp_path):
    r = run("world", "sample", "--sessions", "3", "--turns", "3", "--seed", "4", "--out", tmp_path / "w")
    assert r.returncode == 0, r.stderr
    r = run("edit", "--session", f"{tmp_path / 'w' / 'sessions.jsonl'}#s00001", "--intent", "rules", "--steps", "2",
            "--out", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    res = last_json(r.stdout)
    from editrl.session import read_sessions
    s = next(x for x in read_sessions(tmp_path / "w" / "sessions.jsonl") if x.id == "s00001")
    assert [t["used"] for t in res["turns"]] == [t.explicit for t in s.turns]
    assert all(t["intent"]["error"] is None for t in res["turns"])
    r = run("edit", "--image", tmp_path / "w" / "images" / "s00001_0.png", "--intent", "rules", "--mode", "in_context",
            "--out", tmp_path / "f", "Make it blue")
    assert_bad_input(r.stdout, r.stderr, r.returncode, "--intent")
